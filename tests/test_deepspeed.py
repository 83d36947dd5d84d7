"""Real DeepSpeed ZeRO-2/3 with 2 CPU processes (gloo): the student trains, the teacher is sharded, ranks agree."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PUBLISHED

SCRIPT = Path(__file__).parent / "scripts" / "ds_tiny.py"


def _initial_student() -> dict:
    """The state ds_tiny.py starts its student from, to check that training moved it."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1)).state_dict()


@pytest.mark.parametrize("stage,master", [(2, "fp32"), (3, "fp32"), (3, "bf16")])
def test_two_process_zero(stage, master, tmp_path):
    # Lightning re-executes the script per rank; inside pytest its launcher would re-run pytest itself.
    r = subprocess.run([sys.executable, str(SCRIPT), str(stage), "2", str(tmp_path), master],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    a, b = ranks
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"ranks disagree on {k}"
    for rank in ranks:
        assert len(rank["losses"]) == 4 and all(math.isfinite(x) for x in rank["losses"])
    if stage == 3:
        # The frozen teacher is partitioned like the student: each rank holds half of it.
        assert a["teacher_local_numel"] == b["teacher_local_numel"] == a["teacher_numel"] // 2
    else:
        assert a["teacher_local_numel"] == a["teacher_numel"]
    init = _initial_student()
    moved = max((a["state"][k] - v.float()).abs().max().item() for k, v in init.items() if k in a["state"])
    assert moved > 1e-4, "the student did not train"


def test_two_process_zero3_trains_a_moe_student_with_its_experts_sharded(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "3", "2", str(tmp_path), "fp32", "none", "qwen3_moe"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"ranks disagree on {k}"
    assert len(a["losses"]) == 4 and all(math.isfinite(x) for x in a["losses"])
    full = 4 * 2 * 32 * 64  # E x 2I x H of one layer's stacked gate_up_proj
    assert a["experts_local_numel"] == b["experts_local_numel"] == [full // 2, full // 2]  # each rank holds half
    import transformers as tf

    torch.manual_seed(0)
    init = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.1, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2)).state_dict()
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert (a["state"][key] - init[key]).abs().max() > 1e-4, "the experts did not train"
    assert "model.layers.0.mlp.experts.weight_quantizers.gate_up_proj.scale" not in a["state"]  # minmax: no params


@pytest.mark.parametrize("stage,offload", [(2, "optimizer"), (3, "params")])
def test_zero_offload_trains(stage, offload, tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(stage), "1", str(tmp_path), "fp32", offload],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rank = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert len(rank["losses"]) == 4 and all(math.isfinite(x) for x in rank["losses"])
    init = _initial_student()
    moved = max((rank["state"][k] - v.float()).abs().max().item() for k, v in init.items() if k in rank["state"])
    assert moved > 1e-4, "the student did not train"


def test_offload_with_bf16_masters_is_refused_before_any_work():
    from trainer.config import load_config
    from trainer.strategy import deepspeed_config

    cfg = load_config(PUBLISHED, ["distributed.offload_optimizer=true", "train.master_weights=bf16"])
    with pytest.raises(ValueError, match="master_weights=fp32"):
        deepspeed_config(cfg.distributed, cfg.train)
    cfg = load_config(PUBLISHED, ["distributed.offload_optimizer=true", "train.master_weights=fp32"])
    assert deepspeed_config(cfg.distributed, cfg.train)["zero_force_ds_cpu_optimizer"] is False


def test_end_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from qat.io.env import end_process_group

    if dist.is_initialized():
        pytest.skip("this pytest process already has a process group")
    end_process_group()  # none yet: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()
