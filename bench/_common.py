"""What several benchmarks share: the model shapes they build at random init, and GPU warm-up; the models
bench/suite.py's model part makes (a tiny random one for smoke runs, the bundled GGUF as an HF folder); the switch
that turns the fused fake-quant kernel off."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

# Random-init shapes (speed does not depend on the weights, so no model files are needed).
SHAPES = {
    # The bundled model's shape (576-wide: groups of 64).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Llama-3.2-1B's shape.
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    # A few hundred thousand parameters: CPU smoke runs (bench/suite.py --cpu-smoke) of every code path.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def missing_gpu_stack(name: str, need_cuda: bool, hint: str = "") -> Optional[str]:
    """None where a Triton benchmark can run here, else the line that says what is missing."""
    if need_cuda and not torch.cuda.is_available():
        return f"{name} needs a CUDA GPU (torch.cuda.is_available() is False{hint})"
    if importlib.util.find_spec("triton") is None:
        return f"{name} needs triton (pip install triton)."
    return None


def heat(seconds: float) -> None:
    """Run bf16 matmuls for a while first: an H100's clocks settle lower once it is warm, which else
    favours whatever is timed first."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


@contextlib.contextmanager
def kernel_disabled():
    """The fused fake-quant kernels (int and fp4) switched off, so that the reference torch ops run: qat.quantizers
    binds them when it is imported, so its bindings are the ones replaced (qat.kernels' too)."""
    import qat.kernels  # lazy: bench scripts import qat after their own device checks
    import qat.quantizers  # lazy: as above

    names = ("fused_fake_quant_rows", "fused_fp4_fake_quant_rows")
    saved = [(mod, name, getattr(mod, name)) for mod in (qat.kernels, qat.quantizers) for name in names]
    for mod, name, _ in saved:
        setattr(mod, name, _no_kernel)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _no_kernel(*args, **kwargs) -> None:
    return None  # what fused_fake_quant_rows says where no kernel applies


def model_shapes(text: str) -> list[str]:
    """--shapes of model names (argparse type): each one of SHAPES, or a usage error naming the bad one."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in SHAPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown shape {bad[0] if bad else text!r}; use one of {sorted(SHAPES)}")
    return names


def matrix_shapes(text: str) -> list[tuple[int, int]]:
    """--shapes of matrices "<in>x<out>,..." (argparse type), or a usage error naming the malformed one."""
    out = []
    for s in [s.strip() for s in text.split(",") if s.strip()]:
        parts = s.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{s!r} is not <in_features>x<out_features>, e.g. 4096x11008")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise argparse.ArgumentTypeError("give at least one <in_features>x<out_features> shape")
    return out


def make_tiny_model(path: str) -> int:
    """The smoke run's model: a random 2-layer Llama with the bundled tokenizer's vocabulary, as the tests'
    (tests/helpers/models.py) at 256 positions and init range 0.1."""
    import transformers as tf  # lazy: only bench/suite.py's model part builds models here

    from qat.io.models import load_tokenizer  # lazy: as above

    tok = load_tokenizer("bundled:smollm2-135m")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, eos_token_id=tok.eos_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return 0


def convert_gguf(gguf: str, path: str) -> int:
    """The bundled GGUF as a bf16 HF folder, the way qat.io.models.bundled_model_path converts it."""
    import transformers as tf  # lazy: as above

    src = Path(gguf)
    dense = {"quantization_config": tf.GgufConfig(dequantize=True)} if hasattr(tf, "GgufConfig") else {}
    tok = tf.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = tf.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16, **dense)
    model.hf_quantizer = None  # dequantized already: save a plain config
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = Path(path + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return 0
