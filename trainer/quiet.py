"""Messages of the libraries under distqat that tell its user nothing: each one fixed at its source where a
setting does it, else filtered alone (one message of one logger or one warning), with the reason.

Lightning's two warnings about this run's own design (the teacher in eval mode, the resumable data order) are
filtered where training starts (trainer/train.py).
"""

from __future__ import annotations

import logging
import os
import warnings

import datasets
import torch
import transformers

from qat.io.progress import bars_wanted


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _drop(logger: str, *prefixes: str) -> None:
    log = logging.getLogger(logger)
    if not any(isinstance(f, DropMessages) and f.prefixes == prefixes for f in log.filters):
        log.addFilter(DropMessages(*prefixes))


def quiet_libraries() -> None:
    """Set up before the command runs (idempotent)."""
    # DeepSpeed picks its accelerator when first used and warns, on stdout, when it falls back to the CPU; it is
    # used even in runs without DeepSpeed (transformers' save_pretrained imports it). Without CUDA the CPU is what
    # distqat computes on, so say so (a user's own DS_ACCELERATOR stands).
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # Lightning advertises its cloud services (litlogger, litmodels) at every start; rank_zero_info logs through
    # whichever of these two loggers Lightning set up last.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        _drop(name, "💡 Tip:")
    # distqat runs its own optimizers under ZeRO on purpose (AdamWBF16's compensated bf16 update; the DeepSpeed
    # config says zero_allow_untested_optimizer) and tests them there: the caution is not the user's to act on.
    _drop("DeepSpeed", "**** You are using ZeRO with an untested optimizer")
    # torch deprecates LeafSpec to library authors; Lightning's _pytree (2.6) still builds one every step.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # peft (0.21) reads the model's is_gradient_checkpointing when it wraps it for QLoRA; transformers 5.24
    # deprecates that name to peft's authors, and nothing in distqat or its config uses it.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not bars_wanted():
        # In a log, the libraries' bars (transformers' "Loading weights", "Writing model shards", datasets'
        # "Generating train split") are carriage-return fragments, not lines; distqat's own long loops print
        # whole progress lines there instead.
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
