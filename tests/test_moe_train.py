"""QAT of an MoE student end to end on CPU: the teacher writes the data, the student starts from a PTQ of its
experts, trains with gradient checkpointing, logs each expert's load, resumes, and every stage reports coverage."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PUBLISHED
from helpers.models import save_tiny_moe_teacher

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = [f"model.layers.{i}.mlp.experts" for i in range(2)]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, bundled_tokenizer):
    root = tmp_path_factory.mktemp("moe")
    save_tiny_moe_teacher(root / "teacher", bundled_tokenizer)
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [row for f in sorted(out.glob("logs/version_*/metrics.csv")) for row in csv.DictReader(f.open())]


def test_pipeline_on_a_moe_teacher_quantizes_every_expert_and_logs_routing(moe_dir, tmp_path):
    out = tmp_path / "pipe"
    common = [PUBLISHED, f"model.name_or_path={moe_dir / 'teacher'}", "quant.scheme=w4a8kv8",
              "generate.n_samples=32", "generate.max_length=33", "generate.batch_size=16", "generate.shard_size=16",
              "data.seq_len=32", "train.lr=1e-3", "train.warmup_steps=1", "train.micro_batch_size=4",
              "train.save_every=4", "train.val_every=1000", "train.stats_every=2", "train.gradient_checkpointing=true",
              "distributed.strategy=single", "eval.max_tokens=256", "eval.seq_len=32", "train.init=gptq",
              "ptq.n_samples=8", "ptq.seq_len=32", "ptq.progress=false", f"output_dir={out}"]
    r = run("pipeline", *common, "train.max_steps=6")
    assert "coverage: 100.00%" in r.stderr
    rec = json.loads((out / "eval.json").read_text())
    assert set(rec["perplexity"]) == {"fp", "w4a8kv8", "w4a8kv8 (gptq)", "w4a8kv8 (qat)"}
    for label, cov in rec["coverage"].items():
        if label == "fp":
            assert cov["share"] == 0.0
            continue
        assert cov["share"] == 1.0, label
        assert cov["kinds"]["experts"]["share"] == 1.0 and cov["full_precision_apart"]["router"] == 2 * 4 * 64
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["distqat_coverage"]["kinds"]["experts"]["quantized"] == 2 * 4 * (2 * 32 * 64 + 64 * 32)
    rows = metrics(out)
    for name in EXPERTS:
        loads = [[float(row[f"routing/{name}/expert_{e}"]) for e in range(4)]
                 for row in rows if row.get(f"routing/{name}/expert_0")]
        assert loads, "the routing load is logged"
        # each logged row counts the tokens of the steps since the last one: 2 top-k slots per token
        assert all(sum(load) % 2 == 0 and sum(load) > 0 for load in loads)

    # resume: the same pipeline with more steps reuses its data and start and trains on from its last checkpoint
    r = run("pipeline", *common, "train.max_steps=8")
    runs = [sorted({int(row["step"]) for row in csv.DictReader(f.open()) if row.get("train/loss")})
            for f in sorted(out.glob("logs/version_*/metrics.csv"))]
    assert runs[0] == list(range(6)) and runs[-1][-1] == 7 and runs[-1][0] >= 4, runs


def test_router_kd_is_the_kl_of_the_routers_softmax_and_zero_for_the_teacher_itself():
    import copy

    import torch
    import torch.nn.functional as F
    import transformers as tf

    from qat.apply import quantize_model
    from trainer.config import load_config
    from trainer.module import QATModule

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    teacher = tf.Qwen3MoeForCausalLM(cfg).eval()
    train = load_config(PUBLISHED, ["train.router_kd=0.5"]).train
    batch = {"input_ids": torch.randint(0, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    same = QATModule(copy.deepcopy(teacher), teacher, train)
    assert float(same.losses(batch)["router_kd"].detach()) == 0.0

    student = copy.deepcopy(teacher).requires_grad_(True)  # the first module froze the teacher it copies
    quantize_model(student, "w2g16")
    module = QATModule(student, teacher, train)
    out = module.losses(batch)
    captured = {}
    for name, model in (("s", student), ("t", teacher)):
        captured[name] = [model.model.layers[i].mlp.gate(
            model.model.layers[i].post_attention_layernorm(h))[0] for i, h in enumerate(_mlp_inputs(model, batch))]
    expected = torch.stack([(F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
                            for s, t in zip(captured["s"], captured["t"])]).mean()
    assert float(out["router_kd"]) == pytest.approx(float(expected), rel=1e-5) and float(expected) > 0
    assert float(out["loss"]) == pytest.approx(float(out["kd"] + 0.5 * out["router_kd"]), rel=1e-6)
    out["loss"].backward()
    assert student.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the routing term trains the router


def _mlp_inputs(model, batch):
    """Each decoder layer's residual stream after attention (what its post-attention norm reads)."""
    seen = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(a[0]))
             for layer in model.model.layers]
    import torch

    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return [x.reshape(-1, x.shape[-1]) for x in seen]


def test_ptq_convert_and_eval_of_a_moe_report_full_coverage(moe_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of a small corpus, for a tiny run." for i in range(200)))
    r = run("ptq", PUBLISHED, f"model.name_or_path={moe_dir / 'teacher'}", "quant.scheme=w4g32", "ptq.method=gptq",
            f"data.path={corpus}", "ptq.n_samples=8", "ptq.seq_len=32", "ptq.progress=false",
            f"output_dir={tmp_path / 'ptq'}")
    assert "ptq: 100.00% of the decoder's" in r.stderr
    report = json.loads((tmp_path / "ptq" / "ptq_report.json").read_text())
    assert report["coverage"]["share"] == 1.0 and report["coverage"]["kinds"]["experts"]["share"] == 1.0
    r = run("convert", str(tmp_path / "ptq" / "model"), "--out", str(tmp_path / "int"))
    assert "convert: 100.00% of the decoder's" in r.stderr
    run("eval", PUBLISHED, f"model.name_or_path={tmp_path / 'int'}", f"data.path={corpus}", "eval.seq_len=32",
        "eval.max_tokens=256", f"output_dir={tmp_path / 'eval'}")
    rec = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (label, cov), = rec["coverage"].items()
    assert cov["share"] == 1.0 and cov["kinds"]["experts"]["quantized"] == 2 * 4 * (2 * 32 * 64 + 64 * 32)


def test_lr_relative_gives_each_expert_stack_its_rate_and_its_scales_theirs():
    import torch
    import transformers as tf

    from qat.apply import quantize_model
    from qat.spec import QuantSpec, TensorSpec
    from trainer.optim import param_groups

    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    quantize_model(model, QuantSpec(weight=TensorSpec(bits=4, learnable="lsq")))
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(0.25)  # a rotation folded a small norm into it
    weights = {n: p for n, p in model.named_parameters()
               if n.endswith(("experts.gate_up_proj", "experts.down_proj")) or n.endswith("proj.weight")}
    rms = {n: p.detach().float().pow(2).mean().sqrt().item() for n, p in weights.items()}
    median = torch.tensor(sorted(rms.values())).median().item()
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1, 1e-4, lr_relative=True)}
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    assert groups[stack]["params"][0] is weights[stack]
    assert groups[stack]["lr"] == pytest.approx(1e-3 * rms[stack] / median, rel=1e-6)
    scales = groups["model.layers.0.mlp.experts.weight_quantizers.gate_up_proj"]
    assert scales["params"][0] is model.model.layers[0].mlp.experts.weight_quantizers["gate_up_proj"].scale
    assert scales["lr"] == pytest.approx(1e-4 * rms[stack] / median, rel=1e-6) and scales["weight_decay"] == 0.0
    assert groups[stack]["lr"] < 0.5 * groups["model.layers.1.mlp.experts.gate_up_proj"]["lr"]
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for _ in model.parameters())


def test_a_router_trains_at_a_rate_relative_to_its_size():
    import torch
    import transformers as tf

    from qat.apply import quantize_model
    from trainer.optim import param_groups

    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    quantize_model(model, "w4")
    router = model.model.layers[0].mlp.gate.weight
    with torch.no_grad():
        router.normal_(std=1e-5)  # the bundled MoE's near-uniform router
    quantized = [p for n, p in model.named_parameters() if n.endswith(("proj.weight", "gate_up_proj", "down_proj"))]
    median = torch.tensor(sorted(p.detach().pow(2).mean().sqrt().item() for p in quantized)).median().item()
    for relative in (False, True):
        groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1, 1e-4, lr_relative=relative)}
        g = groups["router:model.layers.0.mlp.gate"]
        assert g["params"] == [router] and g["weight_decay"] == 0.0
        assert g["lr"] == pytest.approx(1e-3 * router.detach().pow(2).mean().sqrt().item() / median, rel=1e-6)
        assert g["lr"] < 1e-6
