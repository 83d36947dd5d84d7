"""The foundation under PTQ, export, data and the trainer: where caches live, which rank this process is,
atomic writes, offline model/tokenizer loading (incl. the bundled model), and the one reader of saved folders.

Nothing here imports Lightning, DeepSpeed, the run config, or the PTQ/export packages.
"""
