"""QAT training pieces: the KD loss, the BF16 compensated optimizer, the schedule, a tiny Lightning run."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from qat.apply import quantize_model
from trainer.config import load_config
from trainer.losses import kd_loss, next_token_ce
from trainer.module import QATModule
from trainer.optim import AdamWBF16, lightning_precision, param_groups, stochastic_round, warmup_cosine


def test_kd_loss_matches_float64_kl_and_masks_padding():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for temp in (1.0, 2.0):
        ps, pt = F.log_softmax(s.double() / temp, -1), F.log_softmax(t.double() / temp, -1)
        kl = (pt.exp() * (pt - ps)).sum(-1)
        ref = (kl * mask).sum() / mask.sum() * temp**2
        torch.testing.assert_close(kd_loss(s, t, mask, temp).double(), ref, rtol=1e-5, atol=1e-6)
    assert kd_loss(t, t).abs() < 1e-6
    # Masked positions do not matter.
    s2 = s.clone()
    s2[0, 3:] = 100.0
    torch.testing.assert_close(kd_loss(s2, t, mask), kd_loss(s, t, mask))


def test_next_token_ce_masks_padding():
    torch.manual_seed(0)
    logits, ids = torch.randn(1, 4, 7), torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0]])
    ref = F.cross_entropy(logits[0, :2], ids[0, 1:3])
    torch.testing.assert_close(next_token_ce(logits, ids, mask), ref)


def test_bf16_updates_below_resolution_move_only_with_compensation():
    """lr * 1 = 1e-4 is below bf16's half-spacing at 1.0 (2^-8): uncompensated bf16 never moves."""
    finals = {}
    for comp in ("none", "kahan", "stochastic"):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = AdamWBF16([p], lr=1e-4, compensation=comp)
        for _ in range(100):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
        finals[comp] = p.float().mean().item()
    ref = torch.nn.Parameter(torch.ones(4096))
    opt = torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        ref.grad = torch.full_like(ref, -1.0)
        opt.step()
    exact = ref.mean().item()  # 1.01
    assert finals["none"] == 1.0
    assert abs(finals["stochastic"] - exact) < 5e-4
    # Kahan: the bf16 weight plus its compensation buffer is the exact sum; the weight is its bf16 rounding.
    assert abs(finals["kahan"] - exact) <= 2**-7


def test_adamw_bf16_on_fp32_params_equals_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = AdamWBF16([a], lr=1e-2, weight_decay=0.1)
    ob = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stochastic_round_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)... in ulps
    g = torch.Generator().manual_seed(0)
    r = stochastic_round(x, torch.bfloat16, g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 2e-5


def test_schedule_and_param_groups(tiny_model):
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    model = tiny_model("llama")
    quantize_model(model, "w4a8")
    from qat.spec import QuantSpec, TensorSpec

    model2 = tiny_model("llama")
    quantize_model(model2, QuantSpec(weight=TensorSpec(bits=4, learnable="lsq")))
    groups = {g["name"]: g for g in param_groups(model2, 1e-5, 0.1, 1e-3)}
    assert groups["quantizer"]["lr"] == 1e-3 and groups["quantizer"]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in groups["decay"]["params"])
    n_norm = sum(1 for n, _ in model2.named_parameters() if "norm" in n)
    assert len(groups["no_decay"]["params"]) == n_norm
    n_scales = sum(1 for n, _ in model2.named_parameters() if n.endswith("weight_quantizer.scale"))
    assert len(groups["quantizer"]["params"]) == n_scales > 0
    assert "fp_decay" not in groups and groups["no_decay"]["lr"] == 1e-5
    # fp_lr: only the quantized linears' weights keep lr; embeddings, head and norms take fp_lr.
    groups = {g["name"]: g for g in param_groups(model2, 1e-3, 0.1, 1e-4, fp_lr=2e-5)}
    quantized = {id(m.weight) for m in model2.modules() if getattr(m, "weight_quantizer", None) is not None}
    assert {id(p) for p in groups["decay"]["params"]} == quantized and groups["decay"]["lr"] == 1e-3
    assert groups["fp_decay"]["lr"] == groups["no_decay"]["lr"] == 2e-5
    assert id(model2.get_input_embeddings().weight) in {id(p) for p in groups["fp_decay"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in model2.parameters() if p.requires_grad)

    # lr_relative: each quantized linear's weight and scales at lr x (its RMS / the median RMS); a weight 4x
    # smaller than the others gets a quarter of the rate, and an Adam step then moves the same share of its grid.
    with torch.no_grad():
        model2.model.layers[0].self_attn.q_proj.weight.mul_(0.25)
    rms = {n: m.weight.float().pow(2).mean().sqrt().item() for n, m in model2.named_modules()
           if getattr(m, "weight_quantizer", None) is not None}
    median = torch.tensor(sorted(rms.values())).median().item()
    groups = {g["name"]: g for g in param_groups(model2, 1e-3, 0.1, 1e-4, lr_relative=True)}
    for n, r in rms.items():
        assert groups[f"{n}.weight"]["lr"] == pytest.approx(1e-3 * r / median, rel=1e-6)
        assert groups[f"{n}.weight_quantizer"]["lr"] == pytest.approx(1e-4 * r / median, rel=1e-6)
        assert groups[f"{n}.weight_quantizer"]["weight_decay"] == 0.0
    q0 = groups["model.layers.0.self_attn.q_proj.weight"]["lr"]
    assert q0 == pytest.approx(0.25 * groups["model.layers.0.self_attn.k_proj.weight"]["lr"], rel=0.2)
    assert "quantizer" not in groups and groups["no_decay"]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in model2.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model2.parameters())


def peaked_llama():
    """A tiny random Llama with larger weights, so its next-token distributions are peaked and 4-bit
    quantization visibly hurts (a default-init one is near uniform: nothing to distil)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("master, autocast", [("bf16", "auto"), ("fp32", "never"), ("fp32", "always")])
def test_tiny_qat_run_lowers_kd_loss(master, autocast):
    teacher, student = peaked_llama(), peaked_llama()
    dtype = torch.bfloat16 if master == "bf16" else torch.float32
    teacher.to(torch.bfloat16)
    student.to(dtype)
    quantize_model(student, "w4a8kv8")
    cfg = load_config(PUBLISHED, [f"train.master_weights={master}", "train.lr=3e-4", "train.max_steps=30",
                             "train.warmup_steps=3"]).train
    module = QATModule(student, teacher, cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (4, 32), generator=g),
             "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(6)]
    with torch.no_grad():
        before = sum(module.losses(b)["kd"].item() for b in data) / len(data)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        precision=lightning_precision(master, autocast), gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data * 5, batch_size=None))
    assert teacher.training is False and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        after = sum(module.losses(b)["kd"].item() for b in data) / len(data)
    print(f"\n{master} master weights, autocast {autocast}: KD {before:.4f} -> {after:.4f}")
    assert math.isfinite(after) and after < 0.7 * before
    assert next(student.parameters()).dtype == dtype


def test_a_bf16_autocast_step_matches_the_fp32_step_to_bf16_precision():
    """Under CPU autocast the matmuls are bf16 and the fake quant fp32: loss and gradients of the fp32 masters
    agree with the fp32 step to bf16's resolution, not bit for bit."""
    teacher, student = peaked_llama(), peaked_llama()
    quantize_model(student, "w4a8kv8")
    module = QATModule(student, teacher, load_config(PUBLISHED, ["train.master_weights=fp32"]).train)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    runs = {}
    for on in (False, True):
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            loss = module.losses(batch)["loss"]
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        runs[on] = (loss.item(), grad, {p.dtype for p in student.parameters()})
    (l32, g32, dt32), (l16, g16, dt16) = runs[False], runs[True]
    assert dt32 == dt16 == {torch.float32}  # masters stay fp32 under autocast
    # measured 0.5% to 7% (two seeds, both symmetric grids): the distillation loss of a peaked model is small
    assert l16 != l32 and abs(l16 - l32) < 0.1 * l32
    # The KD gradient is a small difference of two near-equal distributions, so bf16's rounding shows more in it
    # than in the loss: measured cosine 0.971.
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.95, cos


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_consolidated_folder_reloads_the_student(tmp_path, dtype, bundled_tokenizer):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from qat.load import load
    from qat.spec import QuantSpec, TensorSpec
    from trainer.models import consolidate

    # Loaded as training loads it: `.to(bf16)` would also round the rotary inv_freq buffer, from_pretrained not.
    peaked_llama().save_pretrained(tmp_path / "base")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    quantize_model(student, QuantSpec(weight=TensorSpec(bits=4, learnable="lsq"),
                                      activation=TensorSpec(bits=8, symmetric=False, granularity="token"),
                                      kv=TensorSpec(bits=8, granularity="token")))
    with torch.no_grad():  # a "trained" quantizer: scales off their initial values
        for m in student.modules():
            if hasattr(m, "weight_quantizer") and m.weight_quantizer is not None:
                m.weight_quantizer.scale.mul_(0.9)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = consolidate(student, bundled_tokenizer, tmp_path / "model", SimpleNamespace(global_rank=0))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        # Weights in the dtype the student trained in (an fp32 one is not rounded), quantizer tensors as they are.
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == dtype
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_quantizer.scale").dtype == torch.float32
    again = load(out, dtype=dtype)
    assert torch.equal(student(ids).logits, again(ids).logits)  # the folder is exactly the model trained


def test_quant_stats_scale_range_and_clipped_fraction():
    from qat.linear import QuantLinear
    from qat.spec import TensorSpec
    from trainer.callbacks import weight_quant_stats

    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 7.0, 0.5, 0.0, -1.0, 2.0],
                                       [10.0, 1.0, 1.0, 1.0, -1.0, 0.5, 0.0, 2.0]]))
    q = QuantLinear.from_linear(lin, TensorSpec(bits=4, learnable="lsq"))
    with torch.no_grad():
        q.weight_quantizer.scale.copy_(torch.tensor([[1.0], [0.5]]))
    stats = weight_quant_stats(q)
    # Row 0 fits in [-8, 7] steps of 1.0; row 1 has 10 / 0.5 = 20 > 7.5: one of 16 weights clipped.
    assert stats == {"scale_min": 0.5, "scale_max": 1.0, "clipped": 1 / 16}


def test_loggers_fall_back_to_csv_without_tensorboard(tmp_path, monkeypatch, capsys):
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger

    from trainer import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    loggers = train._loggers(tmp_path)
    assert [type(lg) for lg in loggers] == [CSVLogger]
    assert "tensorboard not installed" in capsys.readouterr().err


def test_kd_loss_topk_is_the_full_kl_at_full_k_and_the_renormalised_kl_below():
    from trainer.losses import kd_loss_topk

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for temp in (1.0, 2.0):
        full = t.topk(40, dim=-1)
        a = kd_loss_topk(s, full.values, full.indices, mask, temp)
        assert torch.allclose(a, kd_loss(s, t, mask, temp), rtol=1e-5, atol=1e-6)
        top = t.topk(7, dim=-1)
        got = kd_loss_topk(s, top.values, top.indices, mask, temp)
        # float64 reference: teacher softmax over its 7 largest logits against the student's full softmax
        p_t = torch.softmax(top.values.double() / temp, -1)
        log_s = torch.log_softmax(s.double() / temp, -1).gather(-1, top.indices)
        kl = (p_t * (p_t.log() - log_s)).sum(-1)
        ref = (kl * mask).sum() / mask.sum() * temp * temp
        assert abs(got.item() - ref.item()) < 1e-5


def test_datamodule_carries_the_teachers_topk_aligned_with_each_block(tmp_path, bundled_tokenizer):
    from transformers import AutoModelForCausalLM

    from trainer.datamodule import TextDataModule

    teacher_dir = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: " + "some words here and there " * (3 + i % 5) for i in range(30)))
    loads = []

    def load():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16).eval()

    kw = dict(path=str(corpus), seq_len=16, tokenizer=bundled_tokenizer, micro_batch_size=3, seed=1,
              cache_dir=tmp_path / "cache", teacher_topk=5, teacher=str(teacher_dir), load_teacher=load)
    dm = TextDataModule(**kw)
    dm.prepare_data()
    dm.setup()
    teacher = load()
    for loader in (dm.dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        with torch.no_grad():
            ref = teacher(input_ids=batch["input_ids"]).logits.float().topk(5, dim=-1)
        assert torch.equal(batch["teacher_topk_indices"].long(), ref.indices)
        assert torch.equal(batch["teacher_topk_values"], ref.values.to(torch.bfloat16))
    dm2 = TextDataModule(**kw)
    dm2.prepare_data()  # cached: the teacher is not loaded again
    assert len(loads) == 2
    assert TextDataModule(**{**kw, "teacher_topk": 6}).topk_file() != dm.topk_file()


def test_tiny_qat_run_from_cached_topk_lowers_the_full_kd_loss():
    teacher, student = peaked_llama(), peaked_llama()
    teacher.to(torch.bfloat16)
    quantize_model(student, "w4a8kv8")
    cfg = load_config(PUBLISHED, ["train.lr=3e-4", "train.max_steps=30", "train.warmup_steps=3",
                             "train.master_weights=fp32"]).train
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(6):
        ids = torch.randint(0, 128, (4, 32), generator=g)
        with torch.no_grad():
            top = teacher(input_ids=ids).logits.float().topk(48, dim=-1)
        data.append({"input_ids": ids, "attention_mask": torch.ones(4, 32, dtype=torch.long),
                     "teacher_topk_values": top.values.to(torch.bfloat16), "teacher_topk_indices": top.indices})
    live = QATModule(student, teacher, cfg)  # scores the full KL with the live teacher
    strip = [{k: v for k, v in b.items() if not k.startswith("teacher_")} for b in data]
    with torch.no_grad():
        before = sum(live.losses(b)["kd"].item() for b in strip) / len(strip)
    module = QATModule(student, None, cfg)  # no teacher: trains from the cache only
    trainer = L.Trainer(max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed",
                        gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data * 5, batch_size=None))
    with torch.no_grad():
        after = sum(live.losses(b)["kd"].item() for b in strip) / len(strip)
    print(f"\ncached top-48 of 128: full KD {before:.4f} -> {after:.4f}")
    assert math.isfinite(after) and after < 0.7 * before


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    teacher = peaked_llama().to(torch.bfloat16)
    grads = []
    for ckpt in (False, True):
        student = peaked_llama()
        quantize_model(student, "w4a8kv8")
        if ckpt:
            from trainer.models import enable_checkpointing

            enable_checkpointing(student)
        student.train()
        cfg = load_config(PUBLISHED, []).train
        module = QATModule(student, teacher, cfg)
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
        loss = module.losses({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["loss"]
        loss.backward()
        assert student.model.gradient_checkpointing == ckpt
        grads.append((loss.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert l0 == l1 and g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n
