"""The command line: help of every command, one-line errors, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import COMMANDS, PENDING, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_top_level_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for name in ["generate", "train", "ptq", "convert", "eval", "bench", "report", "pipeline"]:
        assert name in r.stdout
    assert set(COMMANDS) == {"generate", "train", "ptq", "convert", "eval", "bench", "report", "pipeline"}


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"bench"}))  # bench: the scripts' own options
def test_command_help_lists_options(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"distqat {command}" in out
    for key in ["quant.weight.bits", "train.max_steps", "distributed.zero_stage", "model.name_or_path",
                "--print-config"]:
        assert key in out


def test_misspelled_key_is_one_line_without_traceback():
    r = run("train", "configs/llm_qat/w4a8kv8.yaml", "quant.weight.bitz=4")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "quant.weight.bitz" in lines[0] and "bits" in lines[0]
    assert "Traceback" not in r.stderr


def test_every_command_is_built():
    assert PENDING == {}


def test_bench_runs_a_script_with_its_own_arguments(capsys):
    assert main(["bench"]) == 2
    assert "fake_quant" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0 and "distqat bench <name>" in capsys.readouterr().out
    assert main(["bench", "nope"]) == 2
    assert "no benchmark 'nope'" in capsys.readouterr().err
    r = run("bench", "decode", "--help")
    assert r.returncode == 0 and "--scheme" in r.stdout
    r = run("bench", "decode")  # needs CUDA: says so and exits non-zero
    assert r.returncode == 2 and "CUDA" in r.stderr


def test_print_config_applies_overrides(capsys):
    assert main(["eval", "configs/default.yaml", "quant.weight.bits=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "bits: 3" in out and "name: default" in out


def test_overrides_without_recipe(capsys):
    assert main(["eval", "seed=5", "--print-config"]) == 0
    assert "seed: 5" in capsys.readouterr().out


def test_bad_model_path_is_a_clear_error(capsys, tmp_path):
    code = main(["eval", f"model.name_or_path={tmp_path}/missing", f"output_dir={tmp_path}/out"])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not a local folder" in err and "never downloads" in err


def test_launch_help():
    r = subprocess.run(["bash", str(ROOT / "launch.sh"), "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage: ./launch.sh" in r.stdout and "eval" in r.stdout and "train" in r.stdout
