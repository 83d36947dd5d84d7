"""Lightning strategies: DeepSpeed ZeRO-2/3 on GPUs, and the same DeepSpeed path on CPU (gloo)."""

from __future__ import annotations

import io
import os
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy

from qat.io.atomic import atomic_file, disk_full, ensure_space

from .config import DistributedConfig, TrainConfig
from .optim import resolve_master_weights


def _no_shm_comm() -> None:
    # DeepSpeed JIT-builds a shared-memory comm op (~2 min) on its first CPU init; gloo does the job.
    import deepspeed.ops  # lazy: DeepSpeed costs seconds to import and only its strategy needs it

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but whole or not at all: serialized in memory first (as Lightning does), so the
    size is known and checked against the free space, then written to a temp file beside the checkpoint and renamed
    (Lightning writes the file in place; a full disk left a truncated step=N.ckpt)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("distqat's checkpoint writer takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        with atomic_file(path, need=data.nbytes) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)


class _AtomicDeepSpeed:
    """DeepSpeed's checkpoint folder, whole or not at all: every rank writes its part into a temp folder beside the
    checkpoint, the ranks agree that all parts were written, then rank 0 renames it into place. A rank that ran out
    of disk raises its DiskFull; the others say which rank failed; the temp folder goes and the previous checkpoints
    stay."""

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        tmp = final.parent / f".{final.name}.tmp-{self.broadcast(secrets.token_hex(4))}"  # clean_stale's pattern
        error: Optional[BaseException] = None
        try:
            ensure_space(final.parent, _local_state_bytes(self), f"this rank's part of {final.name}")
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below, whatever failed
            error = disk_full(e, final, tmp) or e
        failed = torch.tensor([self.global_rank if error is not None else -1], device=self.root_device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if int(failed) >= 0:
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier()
            if error is not None:
                raise error
            raise OSError(f"rank {int(failed)} could not write its part of {final}; the previous checkpoints stay")
        if self.is_global_zero:
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
        self.barrier()


def _local_state_bytes(strategy: Any) -> int:
    """What this rank writes into a DeepSpeed checkpoint, about: its parameters (their ZeRO-3 partitions) and its
    optimizer state (ZeRO partitions it over the ranks)."""
    engine = strategy.deepspeed_engine
    params = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in engine.module.parameters())
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = sum(t.numel() * t.element_size() for st in getattr(opt, "state", {}).values() for t in st.values()
                if isinstance(t, torch.Tensor))
    return params + state


class AtomicDeepSpeedStrategy(_AtomicDeepSpeed, DeepSpeedStrategy):
    strategy_name = "deepspeed_atomic"


class CPUDeepSpeedStrategy(_AtomicDeepSpeed, DeepSpeedStrategy):
    """DeepSpeedStrategy on CPU processes (gloo), so CI exercises real ZeRO partitioning.

    Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs on its CPU accelerator.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, **kwargs: Any) -> None:
        _no_shm_comm()
        super().__init__(process_group_backend="gloo", **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads the device index as the local rank.
        return torch.device("cpu", self.local_rank)


def deepspeed_config(dist_cfg: DistributedConfig, train_cfg: TrainConfig) -> dict:
    """The DeepSpeed config for a run: ZeRO stage, offload, precision; the optimizer stays ours."""
    qlora = train_cfg.mode == "qlora"
    if train_cfg.skip_nonfinite:
        raise ValueError("train.skip_nonfinite skips a batch by leaving out its backward pass, which DeepSpeed "
                         "does not allow; set it to 0 or use distributed.strategy=single or ddp")
    if qlora and dist_cfg.zero_stage == 3:
        raise ValueError("distributed.zero_stage=3 with train.mode=qlora: ZeRO-3 partitions parameters, and the "
                         "packed base is integer buffers it cannot partition; use distributed.zero_stage=2, which "
                         "partitions the adapters' gradients and optimizer state")
    zero: dict[str, Any] = {"stage": dist_cfg.zero_stage, "overlap_comm": torch.cuda.is_available(),
                            "contiguous_gradients": True}
    offload = dist_cfg.offload_optimizer or dist_cfg.offload_params
    master = resolve_master_weights(train_cfg.master_weights, offload)  # auto takes fp32 when offloading
    if offload and master == "bf16" and not qlora:
        # DeepSpeed's bf16-master mode with offload accepts only its own CPU Adam, which has no
        # compensated update; offloading therefore goes with classic fp32 masters.
        raise ValueError("distributed.offload_optimizer/offload_params need train.master_weights=fp32 or auto "
                         "(DeepSpeed offloads bf16 master weights only with its own CPU Adam)")
    if dist_cfg.offload_params and not dist_cfg.offload_optimizer:
        raise ValueError("distributed.offload_params needs distributed.offload_optimizer=true as well")
    if dist_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist_cfg.offload_params:
        if dist_cfg.zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist_cfg.zero_stage == 3:
        # Frozen teacher parameters are partitioned too and gathered layer by layer in its forward.
        zero["stage3_param_persistence_threshold"] = 0
    bf16: dict[str, Any] = {"enabled": True}
    if master == "bf16":
        # ZeRO keeps bf16 partitions as the master copy and our optimizer (AdamWBF16) updates them
        # with its compensated step; otherwise DeepSpeed would keep fp32 masters.
        bf16.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    # QLoRA: no DeepSpeed precision mode, which would cast the adapters (lora.dtype) and the base's scales. fp32
    # masters on CPU: plain fp32 ZeRO, computing in fp32 like Lightning's 32-true there (trainer/optim.py).
    mixed = not qlora and (master == "bf16" or torch.cuda.is_available())
    config: dict[str, Any] = {
        "zero_optimization": zero,
        **({"bf16": bf16} if mixed else {}),
        "gradient_clipping": train_cfg.grad_clip,
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if dist_cfg.offload_optimizer:
        # Our optimizer (AdamWBF16: compensated bf16 updates) steps the CPU partitions; DeepSpeed would
        # otherwise insist on its own CPU Adam, which has no bf16-master mode and needs a C++ build.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def make_strategy(dist_cfg: DistributedConfig, train_cfg: TrainConfig, devices: int) -> Strategy:
    """auto: DeepSpeed across several processes, one device otherwise."""
    name = dist_cfg.strategy
    timeout = timedelta(seconds=dist_cfg.timeout_s)
    if name == "auto":
        name = "deepspeed" if devices > 1 else "single"
    if name == "single":
        return SingleDeviceStrategy(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"),
                                    checkpoint_io=AtomicCheckpointIO())
    if name == "ddp":
        return DDPStrategy(process_group_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout,
                           checkpoint_io=AtomicCheckpointIO())
    config = deepspeed_config(dist_cfg, train_cfg)
    # QLoRA checkpoints hold the adapters, not the frozen base (rebuilt from its folder at resume).
    frozen = {"exclude_frozen_parameters": train_cfg.mode == "qlora"}
    if torch.cuda.is_available():
        return AtomicDeepSpeedStrategy(config=config, timeout=timeout, **frozen)
    return CPUDeepSpeedStrategy(config=config, timeout=timeout, **frozen)
