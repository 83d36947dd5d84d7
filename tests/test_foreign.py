"""Other tools' quantized folders (GPTQ v1/v2, AWQ GEMM, compressed-tensors) read as stored: the folder's
dequantized weights bit for bit in the runtime layers, the QLoRA base and a QAT start, eval scores them, and layouts
we cannot read exactly are refused in one line. The GPTQ/AWQ folders are packed by tests/helpers/foreign.py from
the writers' published loops; the compressed-tensors folder is written by that library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from helpers import PUBLISHED
from helpers.foreign import awq_folder, compressed_tensors_folder, gptq_folder, gptq_layer, quantize
from helpers.models import far_from_init, tiny_config, tiny_ids, tiny_llama, tiny_run_dir
from safetensors.torch import load_file, save_file

from qat.export import convert_model
from qat.export.foreign import inexact_layer, load_foreign_fake_quant
from qat.io.models import ModelError
from qat.keys import HF_QUANT_KEY, PTQ_KEY
from qat.linear import QuantLinear
from qat.load import Kind, inspect, load
from qat.qlora.adapters import add_adapters
from qat.qlora.base import build_base
from qat.qlora.config import LoRAConfig
from qat.qlora.merge import merge_qalora
from qat.runtime.int_linear import IntLinear
from qat.runtime.packed import PackedLinear

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

FOLDERS = {
    "gptq-w4g32-v1": (gptq_folder, {}, "w4g32asym (gptq)"),
    "gptq-w4g32-v2": (gptq_folder, {"v2": True}, "w4g32asym (gptq)"),
    "gptq-w3g32-v1": (gptq_folder, {"bits": 3}, "w3g32asym (gptq)"),
    "gptq-w2g32-v2": (gptq_folder, {"bits": 2, "v2": True}, "w2g32asym (gptq)"),
    "gptq-w8g32-sym": (gptq_folder, {"bits": 8, "sym": True}, "w8g32 (gptq)"),
    "gptq-w4-channel-sym": (gptq_folder, {"group": -1, "sym": True}, "w4 (gptq)"),
    "awq-w4g32": (awq_folder, {}, "w4g32asym (awq)"),
    "ct-w4g32": (compressed_tensors_folder, {}, "w4g32asym (compressed-tensors)"),
    "ct-w8g32-sym": (compressed_tensors_folder, {"bits": 8, "sym": True}, "w8g32 (compressed-tensors)"),
}


def build(kind: str, path: Path, model=None) -> dict[str, np.ndarray]:
    make, kw, _ = FOLDERS[kind]
    return make(model if model is not None else tiny_llama(torch.float16), path, **kw)


def assert_weights(model, expected: dict[str, np.ndarray], cls) -> None:
    for name, w in expected.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, cls), (name, type(mod))
        want = torch.from_numpy(w)
        got = mod.dequantized_weight(torch.float64) if cls is not QuantLinear \
            else mod.weight_quantizer(mod.weight).double()
        assert torch.equal(got, want), name  # (q - z) s: exact in fp32 from fp16 scales
        assert torch.equal(got.float(), want.float()), name


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_a_foreign_folder_is_read_as_stored(kind, tmp_path):
    """inspect names the kind and scheme; load's layers, the QLoRA base and the QAT start all hold the folder's
    dequantized weights bit for bit (float64 reference), where transformers' plain load would re-round them."""
    expected = build(kind, tmp_path / "f")
    folder = inspect(tmp_path / "f")
    assert folder.kind is Kind.FOREIGN and folder.label == FOLDERS[kind][2]
    assert_weights(load(folder, torch.float32), expected, IntLinear)
    base, _ = build_base(folder, None, dtype=torch.float32)
    assert_weights(base, expected, PackedLinear)
    student = load_foreign_fake_quant(folder, torch.float32)
    assert_weights(student, expected, QuantLinear)
    assert inexact_layer(student) is None
    assert getattr(student.config, PTQ_KEY)["method"] == f"{folder.record['format']} folder"
    assert not hasattr(student.config, HF_QUANT_KEY)  # saved, it is our fake-quant kind, not the foreign one
    ids = tiny_ids()
    with torch.no_grad():
        ref = load(folder, torch.float32)(ids).logits
        torch.testing.assert_close(student(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_linears_with_bias_and_a_bf16_start_that_cannot_be_exact(tmp_path):
    """Qwen2's q/k/v biases come from the folder as saved; a bf16 fake-quant start from fp16 scales is not the
    folder's weights, and inexact_layer says which layer shows it."""
    expected = build("gptq-w4g32-v2", tmp_path / "f", far_from_init(*tiny_config("qwen2"), biases=True).half())
    model = load(tmp_path / "f", torch.float32)
    assert_weights(model, expected, IntLinear)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.bias is not None and bool(q.bias.abs().sum() > 0)
    assert torch.equal(q.bias, load_file(tmp_path / "f" / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.bias"].float())
    assert inexact_layer(load_foreign_fake_quant(tmp_path / "f", torch.float32)) is None
    assert inexact_layer(load_foreign_fake_quant(tmp_path / "f", torch.bfloat16)) is not None


def test_the_folders_dtype_keeps_fp16_scales_exact_and_the_dequantized_weights_those_of_the_folder(tmp_path):
    expected = build("gptq-w4g32-v1", tmp_path / "f")
    model = load(tmp_path / "f")  # the saved dtype: fp16 throughout
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.scale.dtype == torch.float16
    want = torch.from_numpy(expected["model.layers.0.mlp.down_proj"])
    assert torch.equal(layer.dequantized_weight(torch.float16), want.half())
    base, _ = build_base(tmp_path / "f", None, dtype=torch.bfloat16)  # bf16 compute: the fp32 product, rounded once
    packed = base.get_submodule("model.layers.0.mlp.down_proj")
    assert packed.compute_dtype == torch.bfloat16
    assert torch.equal(packed.dequantized_weight(), want.to(torch.bfloat16))


def test_qalora_trains_on_a_foreign_base_and_merges_into_our_integer_format(tmp_path):
    """QA-LoRA adapters train on an AWQ base (only they get gradients) and fold exactly into its zero points; the
    merged model converts to distqat's integer checkpoint, whose logits are the adapted model's."""
    build("awq-w4g32", tmp_path / "f")
    base, folder = build_base(tmp_path / "f", None, dtype=torch.float32)
    model = add_adapters(base, LoRAConfig(r=2, dropout=0.0, dtype="float32", variant="qalora"))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    ids = tiny_ids()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None and bool(g.abs().sum() > 0) for n, g in grads.items())
    with torch.no_grad():
        want = model(ids).logits
    merged = merge_qalora(model)
    out = convert_model(merged, tmp_path / "int")
    assert inspect(out).kind is Kind.INT
    with torch.no_grad():
        torch.testing.assert_close(load(out, torch.float32)(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_field_and_what_is_read(tmp_path):
    build("gptq-w4g32-v1", tmp_path / "f")
    cfg_file = tmp_path / "f" / "config.json"
    base_cfg = json.loads(cfg_file.read_text())

    def with_config(**changes) -> str:
        q = {**base_cfg[HF_QUANT_KEY], **changes}
        cfg_file.write_text(json.dumps({**base_cfg, HF_QUANT_KEY: q}))
        with pytest.raises(ModelError) as e:
            inspect(tmp_path / "f")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "bits=5" in with_config(bits=5) and "bits 2, 3, 4, 8" in with_config(bits=5)
    assert "checkpoint_format='marlin'" in with_config(checkpoint_format="marlin")
    assert "dynamic" in with_config(dynamic={"-:.*down": {}})
    assert "pack_dtype='int16'" in with_config(pack_dtype="int16")
    assert "version='gemv'" in with_config(quant_method="awq", version="gemv")
    assert "bits=8" in with_config(quant_method="awq", bits=8)
    assert "zero_point=False" in with_config(quant_method="awq", zero_point=False)
    cfg_file.write_text(json.dumps(base_cfg))
    assert inspect(tmp_path / "f").kind is Kind.FOREIGN


def _rewrite(path: Path, name: str, **tensors) -> None:
    f = path / "model.safetensors"
    state = load_file(str(f))
    state.update({f"{name}.{k}": v for k, v in tensors.items()})
    save_file(state, str(f), metadata={"format": "pt"})


def test_act_order_and_an_underflowed_v1_zero_point_are_refused_in_one_line(tmp_path, capsys, bundled_tokenizer):
    """desc_act=true with a g_idx that is not position // group_size (groups of scattered inputs) and a v1 zero
    point of 0 (stored as -1, which AutoGPTQ's packer smears over the word) are not read: one line each."""
    name = "model.layers.1.mlp.up_proj"
    build("gptq-w4g32-v1", tmp_path / "f")
    k = 64
    perm = np.random.default_rng(0).permutation(k)
    _rewrite(tmp_path / "f", name, g_idx=torch.from_numpy((perm // 32).astype(np.int32)))
    with pytest.raises(Exception, match=r"g_idx .*desc_act=false") as e:
        load(tmp_path / "f")
    assert "\n" not in str(e.value)
    from trainer.cli import main

    (tmp_path / "c.txt").write_text("A few words to score, and a few more. " * 40)
    bundled_tokenizer.save_pretrained(tmp_path / "f")
    assert main(["eval", PUBLISHED, f"model.name_or_path={tmp_path / 'f'}", f"data.path={tmp_path / 'c.txt'}",
                 "eval.max_tokens=96", "eval.seq_len=32", f"output_dir={tmp_path / 'ev'}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "up_proj.g_idx" in last and "desc_act=false" in last, last

    build("gptq-w4g32-v1", tmp_path / "g")
    w = tiny_llama(torch.float16).get_submodule(name).weight.detach()
    codes, zero, scale = quantize(w, 4, 32, sym=False)
    zero[0, 0] = 0  # a zero point of 0: v1 cannot store it
    _rewrite(tmp_path / "g", name, **gptq_layer(codes, zero, scale, 4, v1=True))
    with pytest.raises(Exception, match=r"qzeros holds 15 .*gptq_v2"):
        load(tmp_path / "g")
    # The same layer in v2 stores the zero point itself, and is read.
    build("gptq-w4g32-v2", tmp_path / "h")
    _rewrite(tmp_path / "h", name, **gptq_layer(codes, zero, scale, 4, v1=False))
    got = load(tmp_path / "h", torch.float32).get_submodule(name).dequantized_weight(torch.float64)
    want = (torch.from_numpy(codes).reshape(-1, 2, 32) - torch.from_numpy(zero)[..., None]) \
        * torch.from_numpy(scale.astype(np.float64))[..., None]
    assert torch.equal(got, want.reshape(got.shape))


def test_a_sym_folder_whose_zero_points_are_not_the_centre_is_refused(tmp_path):
    build("gptq-w4g32-v1", tmp_path / "f")  # asymmetric codes
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    cfg[HF_QUANT_KEY]["sym"] = True
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="sym=true but some zero point is not 8"):
        load(tmp_path / "f")


def test_compressed_tensors_act_order_is_refused(tmp_path):
    build("ct-w4g32", tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    cfg[HF_QUANT_KEY]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"actorder='group'.*actorder null or static"):
        inspect(tmp_path / "f")


def test_autogptq_quantize_config_json_beside_a_plain_config_is_read(tmp_path):
    expected = build("gptq-w4g32-v1", tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    q = cfg.pop(HF_QUANT_KEY)
    del q["quant_method"]
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "f" / "quantize_config.json").write_text(json.dumps(q))
    assert inspect(tmp_path / "f").kind is Kind.FOREIGN
    assert_weights(load(tmp_path / "f", torch.float32), expected, IntLinear)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, bundled_tokenizer):
    """The tiny teacher, its corpus and a GPTQ folder made from it (with the tokenizer)."""
    root = tiny_run_dir(tmp_path_factory.mktemp("foreign"), bundled_tokenizer)
    teacher = tf.AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float16)
    gptq_folder(teacher, root / "gptq", bits=4, group=32, sym=False)
    bundled_tokenizer.save_pretrained(root / "gptq")
    return root


def test_train_init_from_a_gptq_folder_starts_at_its_weights(run_dirs, tmp_path):
    """train.init=<gptq folder>: the student's step 0 is the folder's model (lr 0 for two steps gives its logits),
    and the trained student is a QAT folder that records where it started."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "trainer", "train", PUBLISHED, f"model.name_or_path={run_dirs / 'teacher'}",
            f"data.path={run_dirs / 'corpus.txt'}", "data.seq_len=32", "train.save_every=100", "train.val_every=1000",
            "train.micro_batch_size=2", "distributed.strategy=single", "quant.scheme=w4g32asym",
            f"train.init={run_dirs / 'gptq'}", "train.max_steps=2", "train.lr=0", "train.quantizer_lr=0",
            f"output_dir={out}"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = inspect(out / "model")
    assert trained.kind is Kind.QAT and trained.config["distqat_init"]["format"] == "gptq"
    ids = tiny_ids(t=32)
    with torch.no_grad():
        torch.testing.assert_close(load(out / "model", "float32")(ids).logits,
                                   load(run_dirs / "gptq", torch.float32)(ids).logits, rtol=1e-5, atol=1e-5)


def test_train_init_refuses_a_foreign_folder_of_another_scheme(run_dirs, tmp_path):
    from trainer.config import load_config
    from trainer.init import check_init

    cfg = load_config(PUBLISHED, [f"model.name_or_path={run_dirs / 'teacher'}", "quant.scheme=w4g64",
                                  f"train.init={run_dirs / 'gptq'}"])
    with pytest.raises(ValueError, match="w4g32asym"):
        check_init(cfg)


def test_eval_scores_a_gptq_folder_as_its_fake_quant_start(run_dirs, tmp_path):
    from trainer.cli import main

    start = load_foreign_fake_quant(run_dirs / "gptq", torch.float32)
    start.save_pretrained(tmp_path / "fq")
    shutil.copy(run_dirs / "gptq" / "tokenizer.json", tmp_path / "fq")
    shutil.copy(run_dirs / "gptq" / "tokenizer_config.json", tmp_path / "fq")
    ppl = {}
    for name, path in (("gptq", run_dirs / "gptq"), ("fq", tmp_path / "fq")):
        assert main(["eval", PUBLISHED, f"model.name_or_path={path}", f"data.path={run_dirs / 'corpus.txt'}",
                     "eval.max_tokens=96", "eval.seq_len=32", "model.dtype=float32",
                     f"output_dir={tmp_path / ('ev' + name)}"]) == 0
        ppl.update(json.loads((tmp_path / ("ev" + name) / "eval.json").read_text())["perplexity"])
    assert set(ppl) == {"w4g32asym (gptq)", "w4g32asym (saved)"}
    assert ppl["w4g32asym (gptq)"] == pytest.approx(ppl["w4g32asym (saved)"], rel=1e-6)


def test_qlora_run_on_a_gptq_folder_trains_and_its_qalora_merge_is_exact(run_dirs, tmp_path):
    """train.mode=qlora with model.name_or_path=<gptq folder>: the base is the folder's codes (its kind recorded
    with the adapters), training lowers the held-out loss, and the QA-LoRA merge keeps what it trained."""
    out = tmp_path / "qa"
    argv = [sys.executable, "-m", "trainer", "train", PUBLISHED, f"model.name_or_path={run_dirs / 'gptq'}",
            "train.mode=qlora", "model.dtype=float32", "data.path=bundled:instructions", "data.format=instructions",
            "data.seq_len=64", "train.max_steps=8", "train.micro_batch_size=2", "train.lr=2e-3",
            "train.save_every=8", "train.val_every=1000", "lora.r=2", "lora.variant=qalora", "lora.merge=qalora",
            "distributed.strategy=single", f"output_dir={out}"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "adapters" / "distqat_qlora.json").read_text())
    assert record["base_kind"] == "foreign" and record["spec"]["weight"]["group_size"] == 32
    losses = json.loads((out / "qlora_eval.json").read_text())["held_out_loss"]
    assert losses["trained"] < losses["base"]
    assert abs(losses["merged (qalora)"] - losses["trained"]) < 1e-3
    assert inspect(out / "model").kind is Kind.INT


@pytest.mark.lane
@pytest.mark.parametrize("kind", ["gptq-w4g32-v1", "gptq-w8g32-sym", "awq-w4g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_foreign_base_on_the_device_path_is_the_folders_weight(kind, dtype, tmp_path, kernel_calls):
    """fp16 scales under an fp32 or bf16 compute dtype: on the device path (a GPU; the Triton interpreter in the
    lane) the packed base's dequantization gives the folder's weight rounded once to the compute dtype."""
    from qat.device import device_path

    expected = build(kind, tmp_path / "f")
    base, _ = build_base(tmp_path / "f", None, dtype=dtype)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, PackedLinear)}
    on_device = device_path(next(iter(layers.values())).qweight, "int_linear")
    for name, m in layers.items():
        assert m.scale.dtype == (torch.float32 if dtype == torch.float32 else torch.float16)
        assert torch.equal(m.dequantized_weight(), torch.from_numpy(expected[name]).to(dtype)), name
    assert kernel_calls["dequantize"] == (len(layers) if on_device else 0)
