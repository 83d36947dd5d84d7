"""The config.json keys that say what a saved folder holds: one place, so writers and the reader agree.

- QUANT_KEY: the QuantSpec of a fake-quantized model (QAT student or PTQ result), written by
  `qat.apply.quantize_model` into model.config and so by `save_pretrained`.
- PTQ_KEY: beside QUANT_KEY in a PTQ result: the method and the calibration tokens.
- LLM_INT8_KEY: an LLM.int8() model (its own kind: no QuantSpec, an outlier threshold).
- HF_QUANT_KEY / EXPORT_KEY: an integer checkpoint written by convert: the standard compressed-tensors
  `quantization_config`, and distqat's own record (format version, spec, checksums).
"""

QUANT_KEY = "distqat_quant"
PTQ_KEY = "distqat_ptq"
LLM_INT8_KEY = "distqat_llm_int8"
HF_QUANT_KEY = "quantization_config"
EXPORT_KEY = "distqat_export"
AQLM_KEY = "distqat_aqlm"  # an AQLM model (codes + codebooks + scales, transformers' AQLM layout)
