"""The run-config schema as the one source of truth: help text on every key, --help printing it, the commands' keys
derived from sections, the recommended recipe as the defaults, typed starts, and a schema import free of torch."""

import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import yaml
from helpers import PUBLISHED

from trainer.cli import COMMANDS, main
from trainer.config import (
    ConfigError,
    RunConfig,
    command_reads,
    load_config,
    reads,
    schema_fields,
    schema_keys,
    to_yaml,
)
from trainer.init import lr_relative
from trainer.schema import Resume, Start

ROOT = Path(__file__).resolve().parents[1]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolved(cfg: RunConfig) -> dict:
    return flat(yaml.safe_load(to_yaml(cfg)))


def test_every_key_and_section_has_help_text():
    missing = [name for name, f in schema_fields() if not f.metadata.get("help", "").strip()]
    assert not missing, f"settings without help text: {missing}"
    assert len(schema_keys()) > 140


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"bench", "convert"}))
def test_command_help_shows_each_keys_help_and_allowed_values(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out.split("config keys", 1)[1]
    lines = out.splitlines()
    helps = dict(schema_fields())
    shown = 0
    for i, line in enumerate(lines):
        if not (line.startswith("  ") and not line.startswith("   ") and "=" in line):
            continue
        key = line.split("=", 1)[0].strip()
        f = helps[key]
        # the help's first words on the lines below the key, wrapped to the terminal's width
        below = " ".join(x.strip() for x in lines[i + 1:i + 8] if x.startswith("      "))
        assert " ".join(f.metadata["help"].split()[:6]) in below, key
        for choice in f.metadata.get("choices", ()):
            assert str(choice) in line, (key, choice)
        if "range" in f.metadata:
            assert str(f.metadata["range"][0]) in line and "[" in line, key
        shown += 1
    assert shown == sum(reads(COMMANDS[command].reads, k) for k in schema_keys())


def test_train_help_shows_a_range_and_a_section_heading(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "  quant.weight.bits=4  [2 to 8]" in out and "\ntrain.blockwise: block-wise reconstruction" in out
    assert "  train.blockwise.steps=0  [>= 0]" in out


def test_importing_the_schema_imports_neither_torch_nor_transformers():
    code = ("import sys, trainer.schema, trainer.config, trainer.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'peft') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_command_keys_come_from_sections():
    assert command_reads(("model", "data:text"), ("model.dtype",)) == (
        "model.*", "data.path", "data.text_field", "!model.dtype")
    train = COMMANDS["train"].reads
    # every PTQ setting a start runs with, and not the method (train.init's) nor the llm_int8 baseline
    assert reads(train, "ptq.gptq.clip") and reads(train, "ptq.rotate.kind") and reads(train, "ptq.n_samples")
    assert not reads(train, "ptq.method") and not reads(train, "ptq.llm_int8.threshold")
    assert reads(COMMANDS["ptq"].reads, "data.path") and not reads(COMMANDS["ptq"].reads, "data.seq_len")
    assert not reads(COMMANDS["pipeline"].reads, "eval.compare") and reads(COMMANDS["pipeline"].reads, "eval.tasks")
    with pytest.raises(KeyError, match="neither a section nor a key"):
        command_reads(("modle",))


@pytest.mark.parametrize("old,new,value", [("train.blockwise_steps", "train.blockwise.steps", 16),
                                           ("train.blockwise_samples", "train.blockwise.samples", 16),
                                           ("train.blockwise_seq_len", "train.blockwise.seq_len", 16),
                                           ("train.blockwise_lr", "train.blockwise.lr", 0.5)])
def test_flat_blockwise_keys_name_their_new_place(old, new, value):
    with pytest.raises(ConfigError, match=rf"'{old}' \(command line\).*did you mean '{new}'\?"):
        load_config(None, [f"{old}={value}"])
    assert load_config(None, [f"{new}={value}"]).train.blockwise == replace(RunConfig().train.blockwise,
                                                                            **{new.rsplit(".", 1)[1]: value})


def test_the_defaults_are_the_laptop_recipe_at_full_size():
    """configs/default.yaml holds only sizes: with the same sizes on the command line and no recipe, the config
    is the same, key for key."""
    sizes = [f"{k}={v}" for k, v in flat(yaml.safe_load((ROOT / "configs/default.yaml").read_text())).items()]
    assert resolved(load_config(None, sizes)) == resolved(load_config(ROOT / "configs/default.yaml"))
    cfg = load_config(None, [])
    assert cfg.quant.name == "w4a8kv8" and cfg.train.start == Start("method", method="rotate+gptq")
    assert cfg.ptq.gptq.clip and cfg.generate.first_token == "word" and cfg.train.peak_lr == 6e-4


def test_published_recipe_differs_from_the_defaults_in_the_recommended_keys_only():
    old, new = resolved(load_config(PUBLISHED)), resolved(load_config(None))
    differ = {k for k in old.keys() | new.keys() if old.get(k, "unset") != new.get(k, "unset")}
    # the activation and kv specs are one key each while off (null) and a section of keys while on
    differ = {".".join(k.split(".")[:2]) if k.startswith(("quant.activation", "quant.kv")) else k for k in differ}
    assert differ == {"quant.activation", "quant.kv", "train.init", "train.lr", "train.quantizer_lr",
                      "train.min_lr_ratio", "train.lr_relative", "ptq.gptq.clip", "generate.first_token"}


def test_init_and_resume_are_read_once_into_types(tmp_path):
    assert Start.parse("rtn") == Start("rtn") and Start.parse(" GPTQ ") == Start("method", method="gptq")
    assert Start.parse("rotate+gptq").rotates and not Start.parse("awq+gptq").rotates
    assert Start.parse(str(tmp_path)) == Start("folder", path=str(tmp_path))
    assert RunConfig().train.start.method == "rotate+gptq"
    assert replace(RunConfig().train, mode="qlora").start == Start("rtn")  # qlora trains on its own base
    assert Resume.parse("auto") == Resume("auto") and Resume.parse("never") == Resume("never")
    assert Resume.parse("runs/x/step=3.ckpt") == Resume("path", path="runs/x/step=3.ckpt")


def test_a_rotated_start_gets_relative_rates_unless_told_otherwise(capsys):
    cfg = load_config(None, [])
    assert lr_relative(cfg) is True
    assert "train.lr_relative=true" in capsys.readouterr().err  # one line says so
    assert lr_relative(load_config(None, ["train.lr_relative=false"])) is False
    assert lr_relative(load_config(None, ["train.init=gptq"])) is False
    assert lr_relative(load_config(None, ["train.init=rtn", "train.lr_relative=true"])) is True
    assert lr_relative(load_config(None, ["train.mode=qlora"])) is False
    assert capsys.readouterr().err == ""


def test_sections_the_lower_layers_own_declare_help_too():
    from data.config import GenerateConfig
    from qat.ptq.config import PTQConfig
    from qat.qlora.config import LoRAConfig
    from qat.spec import QuantSpec, TensorSpec

    for cls in (GenerateConfig, PTQConfig, LoRAConfig, QuantSpec, TensorSpec):
        assert all(f.metadata.get("help") for f in fields(cls)), cls.__name__


def test_a_null_lr_is_resolved_by_the_start():
    """train.lr null: 6e-4 from a PTQ start (weights on the grid must cross rounding boundaries), 1e-4 from RTN (6e-4
    stalls the distillation loss there, issue 31); a given lr is kept."""
    lr = lambda *over: load_config(None, list(over)).train.peak_lr  # noqa: E731
    assert lr() == lr("train.init=gptq") == lr("train.init=rotate+gptq") == 6e-4
    assert lr("train.init=rtn") == 1e-4
    assert lr("train.init=rtn", "train.lr=3e-4") == lr("train.init=gptq", "train.lr=3e-4") == 3e-4
    assert lr("train.mode=qlora") == 6e-4
