"""A tiny QAT run under DeepSpeed on CPU processes (gloo):
`python ds_tiny.py STAGE DEVICES OUT [MASTER [OFFLOAD [FAMILY]]]`, FAMILY llama (default) or qwen3_moe.

Lightning re-executes this script once per rank. Each rank writes its view of the student after the
run (gathered under ZeRO-3) and its losses to OUT/rank<r>.pt, so the test can check the ranks agree.
"""

import sys
import warnings

import lightning as L
import torch
import transformers as tf

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from qat.apply import quantize_model  # noqa: E402
from qat.io.env import end_process_group  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.module import QATModule  # noqa: E402
from trainer.optim import lightning_precision  # noqa: E402
from trainer.strategy import make_strategy  # noqa: E402


class Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def main():
    stage, devices, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    master = sys.argv[4] if len(sys.argv) > 4 else "fp32"
    offload = sys.argv[5] if len(sys.argv) > 5 else "none"
    family = sys.argv[6] if len(sys.argv) > 6 else "llama"
    extra = {"none": [], "optimizer": ["distributed.offload_optimizer=true"],
             "params": ["distributed.offload_optimizer=true", "distributed.offload_params=true"]}[offload]
    cfg = load_config(None, [*extra, "distributed.strategy=deepspeed", f"distributed.zero_stage={stage}",
                             f"train.master_weights={master}", "train.lr=3e-4", "train.max_steps=4",
                             "train.micro_batch_size=2"])

    def llama():
        torch.manual_seed(0)
        small = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.1)
        if family == "qwen3_moe":
            return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**small, intermediate_size=96, moe_intermediate_size=32,
                                                            num_experts=4, num_experts_per_tok=2)).eval()
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small, intermediate_size=96)).eval()

    teacher, student = llama().to(torch.bfloat16), llama()
    quantize_model(student, "w4a8kv8")
    module = QATModule(student, teacher, cfg.train)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(8)]
    rec = Record()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=make_strategy(cfg.distributed, cfg.train, devices),
                        precision=lightning_precision(master), max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[rec], use_distributed_sampler=True)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert len(rec.losses) == 4 and all(loss == loss for loss in rec.losses), rec.losses  # ran, no NaN
    import contextlib

    gather = contextlib.nullcontext()
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        state = {k: v.detach().float().clone() for k, v in student.state_dict().items()}
        teacher_numel = sum(p.numel() for p in teacher.parameters())
    local_teacher = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher.parameters())
    local_experts = [p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                     for n, p in student.named_parameters() if n.endswith("experts.gate_up_proj")]
    torch.save({"state": state, "losses": rec.losses, "teacher_numel": teacher_numel,
                "teacher_local_numel": local_teacher, "experts_local_numel": local_experts},
               f"{out}/rank{trainer.global_rank}.pt")
    end_process_group()  # as distqat's CLI does: a group left to interpreter exit aborted a run (1 in 12)


if __name__ == "__main__":
    main()
