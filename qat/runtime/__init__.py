"""Real quantization at run time: the modules that hold integer, fp8 or codebook weights and compute with them,
and their kernels. Fake quantization (`qat.quantizers`, `qat.linear`, `qat.kernels`) simulates a grid in float
weights for training; the modules here store the grid's codes and run them.

- `int_linear.IntLinear`: a converted layer, 2-8 bit codes (packed into int32 words below 8 bits, `pack`) with
  group or channel scales, 16-bit or per-token int8 activations; its ops `ops` (dequantization, the W*A16 and
  W*A8 linears, per-token int8 activations), each choosing a kernel from its registry (`registry`): the Triton
  kernels (`triton_ops`), torch's tinygemm (`tinygemm`), cuBLAS after dequantization, or the exact torch
  reference (`reference`).
- `int_experts.IntExperts`: a fused MoE experts module (transformers 5 `*Experts`) holding per-expert integer or fp8
  codes stacked along the expert dimension, each routed expert run through the same ops as IntLinear / Fp8Linear.
- `fp8.Fp8Linear`: e4m3 weights and per-token e4m3 activations (`torch._scaled_mm`, or the fp32 reference).
- `kv_cache.IntKVCache`: the integer KV cache of a converted model's `generate`.
- `aqlm.AQLMLinear`: AQLM codes and codebooks, dequantized in forward.
- `llm_int8.Int8OutlierLinear`: LLM.int8()'s vector-wise int8 matmul with high-precision outlier columns.
- `packed.PackedLinear`: the frozen base of a QLoRA run, codes (or NF4 indices) dequantized per matmul.
- `packed_experts.PackedExperts`: the same for fused MoE experts, one `PackedExpertStack` per stacked projection,
  dequantized one expert at a time.

How a model comes to hold them is the methods' business above: `qat.export` (convert, the compressed-tensors
format, loading a converted folder), `qat.ptq` (AQLM, LLM.int8()), `qat.qlora` (the packed base). This package
imports none of its modules, so importing one layer imports no other (and no Triton: its kernels are imported on
first use, after TRITON_INTERPRET is decided).
"""
