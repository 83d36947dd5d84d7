"""`lora.adapter=<folder>` in eval and generate: a QLoRA run's adapters over its base model (quantized at load with
the adapter's spec) or over a converted integer checkpoint, un-merged, compute what the merged model computes; a
folder that is no adapter, or an adapter of another base, is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from qat.apply import quantize_model
from qat.export.convert import convert_model
from qat.io.folders import Kind
from qat.io.models import load_model, load_tokenizer
from qat.qlora.adapters import add_adapters, save_adapters
from qat.qlora.base import build_base, fingerprint
from qat.qlora.config import LoRAConfig
from qat.qlora.merge import merge_bf16
from qat.qlora.use import with_adapter
from qat.spec import parse
from trainer import commands
from trainer.config import load_config
from trainer.eval import eval_windows, perplexity, run_eval


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bundled_tokenizer):
    """{"base": the tiny base model, "int": it quantized by w4g32asym and converted to an integer checkpoint}."""
    root = tmp_path_factory.mktemp("use")
    base = save_tiny_teacher(root / "base", bundled_tokenizer, max_positions=256, init_range=0.1)
    fq = load_model(base, torch.float32)
    quantize_model(fq, parse("w4g32asym"))
    convert_model(fq, root / "int", source=base)
    return {"base": base, "int": root / "int"}


def trained(folder_path, out, spec=None, variant="lora"):
    """(a QLoRA run's adapters folder on the packed base of `folder_path`, B non-zero, as train writes it;
    the peft model it was saved from)."""
    base, folder = build_base(folder_path, spec, dtype="float32")
    base_print = fingerprint(base)
    student = add_adapters(base, LoRAConfig(r=2, dropout=0.0, variant=variant))
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    spec = spec if folder.kind is Kind.BASE else folder.spec
    save_adapters(student.eval(), out, {"base": folder.name, "base_kind": folder.kind.value, "fingerprint": base_print,
                                        "spec": spec.to_dict(), "variant": variant, "double_quant": True})
    return student


def ids(n=2, t=24):
    return torch.randint(0, 1000, (n, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind,variant", [("base", "lora"), ("int", "lora"), ("int", "qalora")])
def test_base_and_adapter_unmerged_compute_the_merged_model(folders, tmp_path, kind, variant):
    student = trained(folders[kind], tmp_path / "a", parse("w4g32") if kind == "base" else None, variant)
    x = ids()
    with torch.no_grad():
        merged32 = merge_bf16(copy.deepcopy(student), torch.float32)(x).logits
        merged16 = merge_bf16(student)(x).logits.float()
        model = with_adapter(folders[kind], tmp_path / "a", dtype="float32")
        got = model(x).logits
        torch.testing.assert_close(got, merged32, rtol=1e-4, atol=1e-4)
        # The bf16 merge: within bf16 rounding, the size of bf16-vs-fp32 itself
        assert (got - merged16).abs().max() <= 2 * (merged16 - merged32).abs().max() + 1e-3
        base = with_adapter(folders[kind], tmp_path / "a", dtype="float32", attach=False)(x).logits
        assert (base - got).abs().max() > 1e-3


def test_eval_scores_the_packed_base_and_the_adapter_on_it(folders, tmp_path):
    student = trained(folders["base"], tmp_path / "a", parse("w4g32"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("Instructions and answers, short and plain. " * 40)
    cfg = load_config(PUBLISHED, [f"model.name_or_path={folders['base']}", "model.dtype=float32",
                                  f"lora.adapter={tmp_path / 'a'}", f"data.path={corpus}", "eval.max_tokens=96",
                                  "eval.seq_len=32", "eval.plot=false", f"output_dir={tmp_path / 'ev'}"])
    record = run_eval(cfg)
    # The adapter's spec (w4g32), not the recipe's quant.scheme (w4), quantizes the base.
    assert list(record["perplexity"]) == ["w4g32 packed", "w4g32 + adapter a"]
    windows = eval_windows(cfg, load_tokenizer(str(folders["base"])))
    with torch.no_grad():
        with student.disable_adapter():
            base = perplexity(student, windows, progress=False)
        merged = perplexity(merge_bf16(student, torch.float32), windows, progress=False)
    assert record["perplexity"]["w4g32 packed"] == pytest.approx(base, rel=1e-5)
    assert record["perplexity"]["w4g32 + adapter a"] == pytest.approx(merged, rel=1e-4)


def test_generate_runs_the_adapter_on_its_base(folders, tmp_path, monkeypatch):
    trained(folders["int"], tmp_path / "a")
    seen = {}
    monkeypatch.setattr(commands, "generate", lambda model, *a, **k: seen.setdefault("model", model))
    cfg = load_config(PUBLISHED, [f"model.name_or_path={folders['int']}", f"lora.adapter={tmp_path / 'a'}",
                                  f"generate.out_dir={tmp_path / 'g'}"])
    commands.run_generate(cfg, progress=False)
    x = ids()
    with torch.no_grad():
        want = with_adapter(folders["int"], tmp_path / "a")(x).logits
        assert torch.equal(seen["model"](x).logits, want)


def test_no_adapter_or_another_base_is_refused_in_one_line(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lora.adapter=.* holds no adapter_config.json"):
        with_adapter(folders["int"], tmp_path)
    trained(folders["base"], tmp_path / "a", parse("w4g32"))
    with pytest.raises(ValueError, match="trained on another base"):
        with_adapter(folders["int"], tmp_path / "a")
