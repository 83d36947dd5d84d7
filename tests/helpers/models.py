"""Tiny random models (a few KB each) and the folders built from them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import transformers as tf

from qat.apply import quantize_model
from qat.qlora.base import pack_model
from qat.spec import parse


def tiny_config(family: str):
    """A random-init config of a few KB for each model family the numerics must support."""
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


def save_tiny_teacher(path, tokenizer, max_positions: int = 128, init_range: float = 0.02):
    """A random 2-layer Llama with the bundled tokenizer's vocabulary, saved (with it) as an HF folder."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         initializer_range=init_range, eos_token_id=tokenizer.eos_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_moe_teacher(path, tokenizer, max_positions: int = 256, init_range: float = 0.1):
    """A random 2-layer Qwen3-MoE (4 experts, top-2) with the bundled tokenizer's vocabulary, saved with it."""
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=max_positions, initializer_range=init_range,
                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_dir(root: Path, tokenizer) -> Path:
    """`root` holding what a tiny training run reads: `teacher` (256 positions, weights at init range 0.1) and a
    400-line `corpus.txt`."""
    save_tiny_teacher(root / "teacher", tokenizer, max_positions=256, init_range=0.1)
    (root / "corpus.txt").write_text("\n".join(f"Line {i} of a small corpus, for a tiny run." for i in range(400)))
    return root


def fake_quant_folder(tmp_path, tokenizer, scheme: str):
    """(the tiny teacher fake-quantized by `scheme` in bf16, its saved folder tmp_path / "fq" with the tokenizer)."""
    model = tf.AutoModelForCausalLM.from_pretrained(save_tiny_teacher(tmp_path / "teacher", tokenizer),
                                                    dtype=torch.bfloat16)
    quantize_model(model, scheme)
    model.save_pretrained(tmp_path / "fq")
    tokenizer.save_pretrained(tmp_path / "fq")
    return model, tmp_path / "fq"


def tiny_llama(dtype=torch.float32, seed=0, hidden=64, inter=96):
    """A random 2-layer Llama of vocabulary 128 at init range 0.1 (the QLoRA tests' base)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_ids(n=2, t=16, seed=1):
    """(n, t) token ids for tiny_llama's vocabulary."""
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def fake_and_packed(scheme, dtype=torch.float32, double_quant=False, **shape):
    """(tiny_llama fake-quantized by `scheme`, a copy of it packed as the QLoRA base)."""
    fq = tiny_llama(dtype, **shape)
    quantize_model(fq, parse(scheme))
    packed = copy.deepcopy(fq)
    pack_model(packed, double_quant)
    return fq, packed




def far_from_init(cls, cfg, seed: int = 0, biases: bool = False) -> torch.nn.Module:
    """A tiny model (eval mode) whose norm weights, and with `biases` its biases, are far from their init, so a
    rotation's fold that forgot one of them shows in the logits."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.3, 2.0)
            elif biases and name.endswith("bias"):
                p.normal_(0, 0.1)
    return model
