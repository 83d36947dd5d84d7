"""The bench package as `distqat bench` sees it: every benchmark is a module with main(argv) (the shared code and
the suite's parts are _* modules, listed by no one), bench/cli_startup.py's table on cheap stand-in commands, and
bench/moe.py's rows on a tiny MoE layer on CPU."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest

from bench import cli_startup
from trainer.cli import bench_names, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_is_a_module_with_main_of_argv():
    names = bench_names()
    on_disk = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert set(names) == {n for n in on_disk if not n.startswith("_")}
    assert {"suite", "cli_startup", "decode"} <= set(names)
    for name in names:
        tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text())
        mains = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main"]
        assert mains and [a.arg for a in mains[0].args.args] == ["argv"], f"bench/{name}.py: def main(argv) -> int"
        assert ast.unparse(mains[0].returns) == "int", name


def test_bench_runs_main_with_the_arguments_and_the_program_name(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    argv0 = list(sys.argv)
    assert main(["bench", "cli_startup", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "cli_startup.py: error: --repeats 0: give at least 1"
    assert sys.argv == argv0  # the benchmark's sys.argv does not outlive it


def test_cli_startup_prints_medians_and_the_ratio_to_the_other_tree(tmp_path, capsys, monkeypatch):
    # The machinery on `python -c pass` stand-ins: the real commands take seconds each on shared cores.
    monkeypatch.setattr(cli_startup, "BASELINES", {"python -c pass": ["-c", "pass"]})
    monkeypatch.setattr(cli_startup, "COMMANDS", {"python -m trainer --help": ["-c", "import trainer"]})
    out = tmp_path / "startup.json"
    assert cli_startup.main(["--repeats", "2", "--against", str(ROOT), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"this tree: {ROOT} (trainer from {ROOT / 'trainer'})" in text and f"other:     {ROOT}" in text
    rows = {line.split("  ")[0]: line.split() for line in text.splitlines() if line.startswith("python ")}
    assert rows["python -c pass"][-2:] == ["-", "-"]  # a baseline has no other tree
    assert float(rows["python -m trainer --help"][-1]) > 0
    record = json.loads(out.read_text())
    assert record["repeats"] == 2 and record["other"] == str(ROOT)
    command = next(r for r in record["rows"] if r["command"] == "python -m trainer --help")
    assert command["this_ms"] > 0 and command["ratio"] == pytest.approx(command["this_ms"] / command["other_ms"])


def test_cli_startup_refuses_a_folder_that_is_no_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_startup.parse_args(["--against", str(tmp_path)])
    assert e.value.code == 2 and "is not a checkout of the repository" in capsys.readouterr().err


def test_moe_bench_prints_and_records_every_variant_against_the_own_experts(tmp_path, capsys, monkeypatch):
    # The tiny shape on CPU: the code path of every variant, numbers that mean nothing (no timing asserted).
    from bench import moe

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch reference, not the kernels in the interpreter
    assert moe.fit_group("w4g128", (576, 192)) == "w4g64" and moe.fit_group("w4g128a8", (2048, 768)) == "w4g128a8"
    assert moe.fit_group("w8a8", (64, 32)) == "w8a8"
    out = tmp_path / "moe.json"
    argv = ["--device", "cpu", "--shape", "tiny", "--tokens", "16", "--infer-tokens", "4,16", "--rounds", "1",
            "--repeats", "1", "--json", str(out)]
    assert moe.main(argv) == 0
    text = capsys.readouterr().out
    assert "QAT step: forward + backward" in text and "no int kernels" in text  # CPU: the torch reference runs
    record = json.loads(out.read_text())
    assert record["complete"] and record["device"] == "cpu" and record["dtype"] == "float32"
    qat = {(r["variant"], r["scheme"]): r for r in record["qat_step"]}
    # no fused row on CPU: the kernel runs on CUDA (or in Triton's interpreter)
    assert set(qat) == {("own", "-"), ("own-loop", "-"), ("reference", "w4a8"), ("reference", "w4g32")}
    infer = {(r["tokens"], r["variant"], r["scheme"]): r for r in record["inference"]}
    assert set(infer) == {(n, v, s) for n in (4, 16) for v, s in
                          [("own", "-"), ("own-loop", "-"), ("int", "w4g32"), ("int", "w8a8")]}
    for r in [*qat.values(), *infer.values()]:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ms"] > 0
    for r in qat.values():
        assert r["ratio"] == pytest.approx(r["ms"] / qat[("own", "-")]["ms"])
    for r in infer.values():
        assert r["ratio"] == pytest.approx(r["ms"] / infer[(r["tokens"], "own", "-")]["ms"])
    for n in (4, 16):
        assert infer[(n, "own", "-")]["ratio"] == 1.0
        a16, a8 = infer[(n, "int", "w4g32")], infer[(n, "int", "w8a8")]
        assert a16["max_rel_diff"] == 0.0 and a8["max_rel_diff"] < 1e-5  # the converted experts compute the fake quant
        assert a16["impl"] == "reference" and a16["convert_s"] > 0


def test_hessian_bench_times_both_forms_and_they_agree(capsys):
    assert main(["bench", "hessian", "--widths", "200,70", "--tokens", "64", "--threads", "1", "--rounds", "1"]) == 0
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(200, 1, 2), (70, 1, 1)]
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0 and r[5].strip().endswith("x")
        assert float(r[6]) == 0.0  # each block multiplies the same columns as the full product


def test_grids_bench_table_marks_the_best_grid_and_refuses_activation_schemes(capsys):
    from bench import grids

    rows = [{"scheme": "FP", "grid": "", "ppl": 18.0}, {"scheme": "w4", "grid": "signed", "ppl": 36.0},
            {"scheme": "w4", "grid": "full", "ppl": 40.0}, {"scheme": "w4", "grid": "qmax", "ppl": 37.5}]
    lines = grids.table(rows).splitlines()
    assert lines[2] == "| FP |  | 18.000 |  |"
    assert lines[3] == "| w4 | signed | **36.000** | 0.900x |"
    assert lines[4] == "| w4 | full | 40.000 | 1.000x |" and lines[5] == "| w4 | qmax | 37.500 | 0.938x |"
    assert grids.main(["--schemes", "w4a8"]) == 2
    assert "weight-only symmetric int" in capsys.readouterr().err
