"""Which lines and branches of the dispatch functions the device lane executes.

    python tests/scripts/lane_coverage.py [--json out.json] [--data .coverage.lane] [--reuse]

Runs the lane (TRITON_INTERPRET=1 pytest -m lane) under coverage.py with branch measurement over qat/, then prints,
for each function that chooses between a device kernel and its reference (DISPATCHERS), the lines and branch arcs the
lane never took. docs/BENCHMARKS.md ("Still to measure") lists what stays unexecuted on CPU and why.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[2]
# file -> dispatch functions in it (Class.method for methods): every function in qat/ that calls device_path, and
# those that choose an implementation after it (tests/test_device.py holds the list to the code)
DISPATCHERS = {
    "qat/device.py": ["device_path", "launch_device"],
    "qat/quantizers.py": ["fake_quant"],
    "qat/kernels/__init__.py": ["_kernel_runs", "fused_fake_quant_rows", "fused_fp4_fake_quant_rows",
                                "fused_rms_norm_quant"],
    "qat/runtime/registry.py": ["KernelRegistry.resolve"],
    "qat/runtime/int_kernels.py": ["_use_triton", "_fallback", "_linear_default", "_int_mm_runs", "_a16_tinygemm",
                                   "dequantize"],
    "qat/runtime/ops.py": ["resolve_impl", "dequantize_weight", "linear_a16", "quantize_act_int8", "linear_a8"],
    "qat/runtime/tinygemm.py": ["tinygemm_supported", "_tinygemm_pack", "_tinygemm_mm", "prepared"],
    "qat/runtime/fp8.py": ["scaled_mm_supported", "linear_fp8"],
    "qat/runtime/llm_int8.py": ["int_matmul", "Int8OutlierLinear.forward"],
    "qat/runtime/packed.py": ["PackedLinear.dequantized_weight"],
    "qat/runtime/packed_experts.py": ["PackedExpertStack.expert_weight"],
    "qat/fast.py": ["_RMSNormQuant.forward"],
}


def functions(node: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method defined in `node` (Class.method for methods)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield from functions(child, prefix + child.name + ".")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child


def spans(path: Path) -> dict[str, tuple[int, int]]:
    """{qualified name: (first line, last line)} of the functions of a file."""
    return {name: (fn.lineno, fn.end_lineno) for name, fn in functions(ast.parse(path.read_text()))}


def run_lane(data: Path) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "1", "COVERAGE_FILE": str(data)}
    cmd = [sys.executable, "-m", "coverage", "run", "--branch", "--source=qat", "-m", "pytest", "-q", "-m", "lane",
           "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def report(data: Path) -> dict:
    cov = coverage.Coverage(data_file=str(data), branch=True)
    cov.load()
    rows = {}
    for rel, names in DISPATCHERS.items():
        path = ROOT / rel
        fn_spans = spans(path)
        analysis = cov._analyze(str(path))  # coverage's own per-file analysis: statements, missing lines and arcs
        missing = set(analysis.missing)
        arcs = analysis.missing_branch_arcs()
        lines = path.read_text().splitlines()
        for name in names:
            assert name in fn_spans, f"{rel}: no function {name} (update DISPATCHERS)"
            lo, hi = fn_spans[name]
            stmts = [n for n in analysis.statements if lo <= n <= hi]
            miss = sorted(n for n in missing if lo <= n <= hi)
            branch = {src: dst for src, dst in arcs.items() if lo <= src <= hi}
            rows[f"{rel}::{name}"] = {
                "statements": len(stmts), "missed": len(miss),
                "missed_lines": {n: lines[n - 1].strip() for n in miss},
                "missed_branches": {src: {"line": lines[src - 1].strip(), "never_to": dst}
                                    for src, dst in branch.items()},
            }
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / ".coverage.lane")
    p.add_argument("--json", type=Path)
    p.add_argument("--reuse", action="store_true", help="report on --data from an earlier run")
    args = p.parse_args(argv)
    if not args.reuse:
        rc = run_lane(args.data)
        if rc != 0:
            print(f"the lane failed (pytest exit {rc}); the coverage below is of a failing run", file=sys.stderr)
    rows = report(args.data)
    print("| dispatch function | statements | executed | never executed |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        never = "; ".join(f"{n}: `{t}`" for n, t in r["missed_lines"].items()) or "-"
        print(f"| `{name}` | {r['statements']} | {r['statements'] - r['missed']} | {never} |")
    print("\nBranches never taken (line: the arc's targets; -1 is the function's exit):")
    for name, r in rows.items():
        for src, b in r["missed_branches"].items():
            print(f"- `{name}` {src}: `{b['line']}` never to {b['never_to']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
