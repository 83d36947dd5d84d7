"""Benchmark: how long the command line takes to answer --help, in fresh processes.

    python -m bench.cli_startup [--repeats 5] [--against PATH] [--json FILE]

Times `python -m trainer --help` and `python -m trainer train --help` (what `distqat --help` and
`distqat train --help` run), each --repeats times in a fresh subprocess, and prints the median wall-clock time.
The commands run from this checkout (it first on PYTHONPATH and as the working directory) and, with --against,
from another checkout of the repository the same way; the ratio column is this tree / the other. Two baseline
rows give the floor: `python -c pass` (the interpreter) and `python -c "import torch"`. The runs of one repeat
are interleaved, so a machine that slows down during the run slows every row alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"python -c pass": ["-c", "pass"], 'python -c "import torch"': ["-c", "import torch"]}
COMMANDS = {"python -m trainer --help": ["-m", "trainer", "--help"],
            "python -m trainer train --help": ["-m", "trainer", "train", "--help"]}


def checkout(text: str) -> Path:
    """--against (argparse type): a checkout of the repository, or a usage error naming what is missing."""
    path = Path(text).expanduser().resolve()
    if not (path / "trainer" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a checkout of the repository (no trainer/__main__.py); "
                                         "make one with: git worktree add <path> <commit>")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per command and tree (median)")
    p.add_argument("--against", type=checkout, help="another checkout of the repository to compare with")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: give at least 1")
    return args


def environment(tree: Path, trees: tuple[Path, ...]) -> dict:
    """This process's environment with `tree` first on PYTHONPATH and no other checkout on it."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() not in trees]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *keep])}


def run_s(args: list[str], tree: Path, env: dict) -> float:
    """Seconds one fresh `python <args>` takes from `tree`; a failing command stops the benchmark."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"python {' '.join(args)} in {tree} exited {r.returncode}: {tail}")
    return seconds


def trainer_origin(tree: Path, env: dict) -> str:
    """Where `import trainer` resolves in the timed processes: the tree's own trainer/, or the run is wrong."""
    r = subprocess.run([sys.executable, "-c", "import trainer; print(trainer.__file__)"], cwd=tree, env=env,
                       capture_output=True, text=True, check=True)
    origin = Path(r.stdout.strip()).resolve()
    if tree not in origin.parents:
        raise RuntimeError(f"python -m trainer from {tree} imports {origin}: another installation shadows it")
    return str(origin.parent)


def measure(envs: dict[Path, dict], repeats: int) -> dict[str, dict[str, float]]:
    """{row label: {tree, or "" for a baseline: median seconds}}, the runs of each repeat interleaved."""
    times: dict[str, dict[str, list[float]]] = {label: {} for label in [*BASELINES, *COMMANDS]}
    for _ in range(repeats):
        for label, args in BASELINES.items():
            times[label].setdefault("", []).append(run_s(args, ROOT, envs[ROOT]))
        for tree, env in envs.items():
            for label, args in COMMANDS.items():
                times[label].setdefault(str(tree), []).append(run_s(args, tree, env))
    return {label: {k: statistics.median(v) for k, v in by_tree.items()} for label, by_tree in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    trees = [ROOT] + ([args.against] if args.against else [])
    envs = {tree: environment(tree, tuple(trees)) for tree in trees}
    try:
        origins = {tree: trainer_origin(tree, envs[tree]) for tree in trees}
        medians = measure(envs, args.repeats)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"bench/cli_startup.py: error: {e}", file=sys.stderr)
        return 2
    print(f"CLI start-up: median of {args.repeats} fresh processes each, python {sys.version.split()[0]}")
    print(f"this tree: {ROOT} (trainer from {origins[ROOT]})")
    if args.against:
        print(f"other:     {args.against} (trainer from {origins[args.against]})")
    print(f"\n{'command':<32} {'this ms':>9} {'other ms':>9} {'this / other':>13}")
    rows = []
    for label, by_tree in medians.items():
        this = by_tree.get("", by_tree.get(str(ROOT)))
        other = by_tree.get(str(args.against)) if args.against else None
        ratio = this / other if other else None
        rows.append({"command": label, "this_ms": this * 1e3, "other_ms": other and other * 1e3, "ratio": ratio})
        other_cell = f"{other * 1e3:>9.0f}" if other else f"{'-':>9}"
        ratio_cell = f"{ratio:>13.3f}" if ratio else f"{'-':>13}"
        print(f"{label:<32} {this * 1e3:>9.0f} {other_cell} {ratio_cell}")
    if args.json:
        record = {"command": "python -m bench.cli_startup " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "repeats": args.repeats, "this": str(ROOT), "other": args.against and str(args.against),
                  "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
