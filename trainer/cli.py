"""`distqat <command> [config.yaml] [key=value ...]` (also `python -m trainer`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .config import ConfigError, RunConfig, describe_schema, load_config

# Commands whose capability is not built yet say which issue tracks it, and exit 2.
PENDING: dict[str, str] = {}

COMMANDS = {
    "generate": "the teacher writes its own training text (LLM-QAT data-free)",
    "train": "QAT: distill the full-precision teacher into the fake-quantized student",
    "ptq": "post-training quantization baselines (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), HQQ)",
    "convert": "pack a trained or PTQ model into integer weights (compressed-tensors layout)",
    "pipeline": "LLM-QAT end to end: generate, train, then score FP, the RTN start and the trained student",
    "eval": "perplexity of the full-precision and the fake-quantized model, with a plot",
    "bench": "speed benchmarks, each as a ratio to bf16",
    "report": "collect the results of runs into one table and plot",
}


def _run_eval(cfg: RunConfig) -> int:
    from .eval import run_eval

    run_eval(cfg)
    return 0


def _run_generate(cfg: RunConfig) -> int:
    from data.generate import run_generate

    out = run_generate(cfg)
    manifest = out / "manifest.json"
    if manifest.exists():
        import json

        m = json.loads(manifest.read_text())
        print(f"{m['samples']} samples, {m['tokens']} tokens in {out}")
    else:
        print(f"this rank's shards are in {out}; the manifest follows when every rank is done")
    return 0


def _run_train(cfg: RunConfig) -> int:
    from .train import run_train

    out = run_train(cfg)
    print(f"trained model: {out}")
    return 0


def _run_ptq(cfg: RunConfig) -> int:
    from qat.ptq import ptq_command

    from .config import save_config

    save_config(cfg, cfg.output_dir)
    result = ptq_command(cfg)
    print(f"quantized model: {result.get('model_dir', cfg.output_dir)}")
    return 0


def _run_convert(cfg: RunConfig) -> int:
    from pathlib import Path

    from qat.export import convert_folder

    src = cfg.export.input
    if not src:
        raise ValueError("no model folder to convert: distqat convert <model folder> --out <folder>")
    out = cfg.export.out_dir or f"{str(src).rstrip('/')}-int"
    path = convert_folder(Path(src), Path(out))
    print(f"integer checkpoint: {path}")
    return 0


def _run_pipeline(cfg: RunConfig) -> int:
    from .pipeline import run_pipeline

    run_pipeline(cfg)
    return 0


def _run_report(cfg: RunConfig) -> int:
    from .eval import run_report

    run_report(cfg)
    return 0


HANDLERS: dict[str, Callable[[RunConfig], int]] = {
    "eval": _run_eval, "report": _run_report, "generate": _run_generate, "train": _run_train,
    "ptq": _run_ptq, "convert": _run_convert, "pipeline": _run_pipeline,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distqat",
        description="Distributed quantization-aware training for LLMs.",
        epilog="Each command takes an optional recipe YAML then key=value overrides, e.g.\n"
        "  distqat eval configs/default.yaml quant.scheme=w4g64 eval.max_tokens=4096",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    options = "config keys (key=default {allowed values}):\n" + "\n".join(describe_schema())
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, epilog=options,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("config", nargs="?", help="recipe YAML (e.g. configs/default.yaml); omitted: defaults")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if name == "convert":
            p.usage = "distqat convert <model folder> [--out <folder>] [key=value ...]"
            p.add_argument("--out", help="output folder of the integer checkpoint (export.out_dir)")
    return parser


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def run_bench(argv: list[str]) -> int:
    """`distqat bench <name> [args]`: run bench/<name>.py with its own arguments (each prints its table)."""
    import runpy

    names = sorted(p.stem for p in BENCH_DIR.glob("[!_]*.py")) if BENCH_DIR.is_dir() else []  # _*: shared code
    if not names:
        print("distqat bench: error: the benchmarks live in the source checkout's bench/ folder, which this "
              "installation lacks; run from a clone of the repository", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: distqat bench <name> [args]   (names: {', '.join(names)}; "
              "`distqat bench <name> --help` for its options)")
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"distqat bench: error: no benchmark {name!r}; choose one of {names}", file=sys.stderr)
        return 2
    sys.argv = [str(BENCH_DIR / f"{name}.py"), *argv[1:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # the scripts end with SystemExit(main())
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # the scripts take their own arguments, not config overrides
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # no recipe, only overrides
    if args.command == "convert":
        # `convert <folder>`: the positional is the model to convert, not a recipe.
        if config is not None and not config.endswith((".yaml", ".yml")):
            config, overrides = None, [f"export.input={config}", *overrides]
        if args.out:
            overrides.append(f"export.out_dir={args.out}")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"distqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from .config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    if args.command in PENDING:
        print(f"distqat {args.command}: not built yet: {PENDING[args.command]}", file=sys.stderr)
        return 2
    try:
        return HANDLERS[args.command](cfg)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        # Known bad input (model, data, spec): one line, no traceback.
        print(f"distqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distqat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
