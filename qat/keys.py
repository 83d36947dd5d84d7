"""The saved-folder contract: every key and file name a writer and a reader of a folder must agree on, in one place.

config.json keys that say what a saved folder holds:
- QUANT_KEY: the QuantSpec of a fake-quantized model (QAT student or PTQ result), written by
  `qat.apply.quantize_model` into model.config and so by `save_pretrained`.
- COVERAGE_KEY: beside QUANT_KEY: the share of the decoder's weight elements quantized, per kind (attention, dense
  MLP, experts, shared experts), and what stays full precision by design (`qat.coverage.Coverage.to_dict`).
- PTQ_KEY: beside QUANT_KEY in a PTQ result: the method and the calibration tokens.
- INIT_KEY: in a QAT student started from a PTQ result: that result's PTQ record (the rotation among it), which
  the student no longer is but still computes in.
- ROTATE_KEY: inside a PTQ_KEY (or INIT_KEY) record: the rotation that turned the model (`qat.ptq.rotate`), its online
  Hadamards among it (`qat.online` reinstalls them from it on every load, a converted folder's included).
- LLM_INT8_KEY: an LLM.int8() model (its own kind: no QuantSpec, an outlier threshold).
- HF_QUANT_KEY / EXPORT_KEY: an integer checkpoint written by convert: the standard compressed-tensors
  `quantization_config`, and distqat's own record (format version, spec, checksums).
- AQLM_KEY: an AQLM model (codes + codebooks + scales, transformers' AQLM layout).
- SOURCE_KEY: a model read from a folder whose weights were stored in a format transformers dequantizes at load
  (gpt-oss's MXFP4 experts): which format, which weights; kept in the student's config and its coverage record.

Other records:
- KV_ATTENTION_PREFIX: the attention functions `qat.kv` registers are this plus the wrapped one's name
  (`eager`, `sdpa` ...); a KV-quantized model's config names one as its attention implementation in memory
  (transformers does not save that setting into config.json).
- FINGERPRINT_KEY: in a QLoRA training checkpoint: the fingerprint of the base its adapters belong to.
- QLORA_RECORD_FILE: beside peft's files in a QLoRA adapters folder: the base the adapters were trained on.
- ADAPTER_LAYOUT_KEY: beside FINGERPRINT_KEY: the adapters' targets, rank, alpha and variant, which a resume compares.

Files that say a folder is finished (a reader that sees them may use the folder; a writer writes them last):
- COMPLETE_MARKER: in a cache folder built once (the bundled model, the bundled text and instruction sets).
- MANIFEST_FILE: in a `distqat generate` folder once every shard exists (counts, token totals, the shards);
  SETTINGS_FILE is written first, with what the samples are made with.
- START_FILE: in each stage folder of a QAT student's start (trainer/init.py): the settings that made it.
"""

QUANT_KEY = "distqat_quant"
COVERAGE_KEY = "distqat_coverage"
PTQ_KEY = "distqat_ptq"
INIT_KEY = "distqat_init"
ROTATE_KEY = "rotate"
LLM_INT8_KEY = "distqat_llm_int8"
HF_QUANT_KEY = "quantization_config"
EXPORT_KEY = "distqat_export"
AQLM_KEY = "distqat_aqlm"
SOURCE_KEY = "distqat_source"
KV_ATTENTION_PREFIX = "distqat_kv_"

FINGERPRINT_KEY = "distqat_base_fingerprint"
QLORA_RECORD_FILE = "distqat_qlora.json"
ADAPTER_LAYOUT_KEY = "distqat_adapter_layout"

COMPLETE_MARKER = "_COMPLETE"
MANIFEST_FILE = "manifest.json"
SETTINGS_FILE = "settings.json"
START_FILE = "start.json"
