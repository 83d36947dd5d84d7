import importlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from qat.device import interpret_mode

# The run config's defaults before they became the recommended recipe: tests written against them load it first.
PUBLISHED = str(Path(__file__).resolve().parent / "data" / "published.yaml")

# Everything runs offline: a test that reaches for a hub fails instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The device lane: the second run of `./launch.sh test`, `TRITON_INTERPRET=1 pytest -m lane`. Triton then runs its
# kernels on CPU tensors, so every dispatcher that asks `qat.device.device_path` takes the branch a GPU takes; the
# tests marked `lane` run again there and compare that branch with the reference on tiny shapes.
LANE = interpret_mode()

# The Triton launchers behind each dispatcher's device branch (and tinygemm's, which runs aten's CPU variant on
# CPU tensors): `kernel_calls` counts their calls, so a lane test can assert that its branch really ran.
LAUNCHERS = {
    "fake_quant": ("qat.kernels.fake_quant", "fake_quant_rows"),
    "norm_quant": ("qat.kernels.norm_quant", "rms_norm_quant_rows"),
    "dequantize": ("qat.runtime.triton_ops", "dequantize"),
    "linear_a16": ("qat.runtime.triton_ops", "linear_a16"),
    "linear_gemv": ("qat.runtime.triton_ops", "linear_gemv"),
    "quantize_act_int8": ("qat.runtime.triton_ops", "quantize_act_int8"),
    "linear_a8": ("qat.runtime.triton_ops", "linear_a8"),
    "tinygemm": ("qat.runtime.int_kernels", "linear_tinygemm"),
}


def pytest_collection_modifyitems(config, items):
    """GPU-only tests carry @pytest.mark.cuda, and skip here without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m cuda runs these on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def lane_only(test):
    """A test of a Triton kernel itself, on CPU tensors: it runs in the device lane, where the interpreter is on."""
    skip = pytest.mark.skipif(not LANE, reason="runs in the device lane: TRITON_INTERPRET=1 pytest -m lane")
    return pytest.mark.lane(skip(test))


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """{launcher name: calls during this test}; empty on CPU outside the lane, where no device branch runs."""
    calls: Counter = Counter()
    if not (LANE or torch.cuda.is_available()):
        return calls
    for name, (module, attr) in LAUNCHERS.items():
        mod = importlib.import_module(module)
        real = getattr(mod, attr)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, attr, spy)
    return calls


def tiny_config(family: str):
    """A random-init config of a few KB for each model family the numerics must support."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**common)
    if family == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**common)
    if family == "gemma":
        return tf.GemmaForCausalLM, tf.GemmaConfig(**common, head_dim=16)
    if family == "gemma3":
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**common, head_dim=16)
    raise ValueError(family)


@pytest.fixture
def tiny_model():
    def make(family: str = "llama", attn: str = "sdpa", seed: int = 0):
        cls, cfg = tiny_config(family)
        cfg._attn_implementation = attn
        torch.manual_seed(seed)
        return cls(cfg).eval()

    return make


@pytest.fixture(scope="session")
def bundled_path():
    from qat.io.models import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def bundled_tokenizer(bundled_path):
    from qat.io.models import load_tokenizer

    return load_tokenizer("bundled:smollm2-135m")


@pytest.fixture(scope="session")
def wiki_test_windows(bundled_tokenizer):
    """8 windows of 1,024 tokens spread evenly over the bundled Wikipedia test split (what eval scores)."""
    from data.sources import load_texts, spread_windows, token_stream

    return spread_windows(token_stream(load_texts("bundled:wikitext", "test"), bundled_tokenizer), 1024, 8192)


@pytest.fixture(scope="session")
def fp_ppl(bundled_path, wiki_test_windows):
    from qat.io.models import load_model
    from trainer.eval import perplexity

    t0 = time.perf_counter()
    model = load_model("bundled:smollm2-135m", dtype="float32")
    return perplexity(model, wiki_test_windows, progress=False), time.perf_counter() - t0


def save_tiny_teacher(path, tokenizer, max_positions: int = 128, init_range: float = 0.02):
    """A random 2-layer Llama with the bundled tokenizer's vocabulary, saved (with it) as an HF folder."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         initializer_range=init_range, eos_token_id=tokenizer.eos_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def compressed_tensors_weights(folder) -> dict:
    """{linear name: its weight as compressed-tensors' own decompressor reads it from a converted folder}."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    out = {}
    for group in qc.config_groups.values():
        compressor = BaseCompressor.load_from_registry(group.format)
        for name in group.targets:
            local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            out[name] = compressor.decompress(local, scheme=group)["weight"]
    return out


def hf_and_fake_quant_logits(model, folder, ids) -> tuple:
    """(transformers' from_pretrained logits of a converted folder, the fake-quant model's, the fake-quant model's
    without activation quant): an a8 folder read right equals the second and not the third. Drops the model's
    input quantizers."""
    from transformers import AutoModelForCausalLM

    from qat.linear import QuantLinear

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        got, ref = hf(ids).logits, model(ids).logits
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.input_quantizer = None
        return got, ref, model(ids).logits


def fake_quant_folder(tmp_path, tokenizer, scheme: str):
    """(the tiny teacher fake-quantized by `scheme` in bf16, its saved folder tmp_path / "fq" with the tokenizer)."""
    from transformers import AutoModelForCausalLM

    from qat.apply import quantize_model

    model = AutoModelForCausalLM.from_pretrained(save_tiny_teacher(tmp_path / "teacher", tokenizer),
                                                 dtype=torch.bfloat16)
    quantize_model(model, scheme)
    model.save_pretrained(tmp_path / "fq")
    tokenizer.save_pretrained(tmp_path / "fq")
    return model, tmp_path / "fq"


def tiny_run_dir(root: Path, tokenizer) -> Path:
    """`root` holding what a tiny training run reads: `teacher` (256 positions, weights at init range 0.1) and a
    400-line `corpus.txt`."""
    save_tiny_teacher(root / "teacher", tokenizer, max_positions=256, init_range=0.1)
    (root / "corpus.txt").write_text("\n".join(f"Line {i} of a small corpus, for a tiny run." for i in range(400)))
    return root
