"""The command line: help of every command, one-line errors, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import COMMANDS, main
from trainer.config import reads, schema_keys

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


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"bench", "convert"}))  # bench, convert: own arguments
def test_command_help_lists_the_keys_it_reads(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"distqat {command}" in out and "--print-config" in out
    # A key's line is indented two spaces (its help below it, six; section headings none).
    listed = {line.split("=", 1)[0].strip() for line in out.split("config keys", 1)[1].splitlines()[1:]
              if line.startswith("  ") and not line.startswith("   ") and "=" in line}
    assert listed == {k for k in schema_keys() if reads(COMMANDS[command].reads, k)}
    # train and pipeline read the ptq settings a PTQ start (train.init=<method>) runs with, not ptq.method.
    wants = {"train": ["quant.weight.bits", "train.max_steps", "distributed.zero_stage", "lora.r", "train.mode",
                       "train.init", "ptq.awq.grid", "ptq.n_samples"],
             "eval": ["quant.weight.bits", "eval.max_tokens", "data.path"],
             "ptq": ["quant.weight.bits", "ptq.gptq.damp", "ptq.awq.grid", "ptq.llm_int8.threshold"],
             "generate": ["generate.n_samples", "seed"], "report": ["output_dir"],
             "pipeline": ["generate.n_samples", "train.max_steps", "eval.max_tokens", "train.blockwise.steps",
                          "ptq.gptq.damp"]}[command]
    unread = {"train": ["eval.max_tokens", "ptq.method", "generate.n_samples"],
              "eval": ["train.max_steps", "distributed.zero_stage", "data.seq_len", "ptq.method"],
              "ptq": ["train.max_steps", "eval.max_tokens", "generate.n_samples"],
              "generate": ["quant.weight.bits", "train.max_steps"], "report": ["model.name_or_path"],
              "pipeline": ["ptq.method", "eval.compare", "lora.r"]}[command]
    assert set(wants) <= listed and not set(unread) & listed


def test_convert_takes_a_folder_and_out_and_no_config_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "folder" in out and "--out" in out and "reads no config keys" in out
    assert "quant.weight.bits" not in out and "export." not in out


def test_a_key_the_command_does_not_read_is_refused_in_one_line():
    r = run("eval", "train.max_steps=5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "eval does not read 'train.max_steps'" in r.stderr and "eval.*" in r.stderr


def test_misspelled_key_is_one_line_without_traceback():
    r = run("train", "configs/llm_qat/w4a8kv8.yaml", "quant.weight.bitz=4")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "quant.weight.bitz" in lines[0] and "bits" in lines[0]
    assert "Traceback" not in r.stderr


def test_every_command_is_built():
    # convert and bench take their own arguments; every other command runs on the config
    assert {n for n, c in COMMANDS.items() if c.run is None} == {"convert", "bench"}


def test_bench_runs_a_script_with_its_own_arguments(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err  # an error: on stderr, one line naming the benchmarks
    assert "fake_quant" in err and err.count("\n") == 1
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
