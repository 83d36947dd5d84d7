"""What bench/peers.py runs on: the peer virtualenvs (found or skipped with a line), their scripts as subprocesses
at the bench's thread count, the one scorer every row goes through, and the tables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from qat.apply import quantize_model
from qat.spec import parse
from trainer.config import load_config
from trainer.eval import base_model, eval_windows, perplexity

SCRIPTS = Path(__file__).resolve().parent / "peer_scripts"
# What each peer's venv must import (its script's imports), and its packages whose versions the record keeps.
PEERS = {
    "llmc": ("llmcompressor", ("llmcompressor", "compressed_tensors", "torch", "transformers")),
    "torchao": ("torchao", ("torchao", "torch", "transformers")),
}


def peer_python(venv: Optional[str], peer: str) -> tuple[Optional[str], Optional[str]]:
    """(the venv's python, None) when it exists and imports the peer, else (None, the one line that says why it is
    skipped)."""
    module = PEERS[peer][0]
    if not venv:
        return None, f"{peer}: skipped (no virtualenv given)"
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        return None, f"{peer}: skipped ({venv} has no bin/python; create it with {module} to run these rows)"
    probe = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True, env=peer_env())
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{peer}: skipped ({py} cannot import {module}: {last})"
    return str(py), None


def peer_env(threads: Optional[int] = None) -> dict[str, str]:
    """The environment of a peer subprocess: this process's thread count (one heavy process per core budget)."""
    env = dict(os.environ)
    n = str(threads or torch.get_num_threads())
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false")
    return env


def peer_versions(python: str, peer: str) -> dict[str, str]:
    mods = PEERS[peer][1]
    code = ("import importlib, json; print(json.dumps({m: getattr(importlib.import_module(m), '__version__', '?') "
            f"for m in {list(mods)!r}}}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=peer_env())
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if out.returncode == 0 and lines else {}


def run_peer(python: str, script: str, args: list[str], log: Path) -> dict:
    """Run bench/peer_scripts/<script> in the peer's venv, its output streamed to `log` (progress can be watched
    there); its last stdout line is its JSON record, and a failure raises with the log's tail."""
    cmd = [python, str(SCRIPTS / script), *args]
    out_file, err_file = log.with_suffix(".out"), log
    with open(out_file, "w") as out, open(err_file, "w") as err:
        rc = subprocess.run(cmd, stdout=out, stderr=err, env=peer_env()).returncode
    stdout = out_file.read_text().strip().splitlines()
    if rc != 0 or not stdout:
        tail = "\n".join(err_file.read_text().strip().splitlines()[-15:])
        raise RuntimeError(f"{script} failed (exit {rc}):\n{tail}")
    return json.loads(stdout[-1])


class Scorer:
    """Perplexity of every row on the windows and with the model loading of `distqat eval` (its defaults: the
    bundled Wikipedia test split, eval.max_tokens in eval.seq_len windows): FP is distqat eval's own loader, a
    peer's row is that model with the peer's state (dequantized weights) loaded over it."""

    def __init__(self, model: str, overrides: Optional[list[str]] = None) -> None:
        self.cfg = load_config(None, [f"model.name_or_path={model}", *(overrides or [])])
        _, self.load_fp = base_model(self.cfg, quantized=False)
        from qat.io.models import load_tokenizer  # lazy: the tokenizer loads once, here

        self.tokenizer = load_tokenizer(model)
        self.windows = eval_windows(self.cfg, self.tokenizer)

    def score(self, model: torch.nn.Module) -> float:
        return perplexity(model, self.windows, self.cfg.eval.batch_size, progress=False)

    def fp(self) -> float:
        return self.score(self.load_fp())

    def with_state(self, state_file: Path, activations: Optional[str] = None) -> torch.nn.Module:
        """The FP model with `state_file`'s tensors loaded over it (each must name a parameter of the model: a
        peer that wrote other names would else be scored as FP), and with `activations` (a short name such as
        w16a8) fake-quantizing the activations the way distqat does."""
        model = self.load_fp()
        state = load_file(str(state_file))
        own = dict(model.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown or not state:
            raise ValueError(f"{state_file}: {len(unknown)} of {len(state)} tensors name no parameter "
                             f"(e.g. {unknown[:3]})")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))
        if activations:
            print(quantize_model(model, parse(activations)), file=sys.stderr)
        return model

    def score_state(self, state_file: Path, activations: Optional[str] = None) -> float:
        return self.score(self.with_state(state_file, activations))


def train_elapsed(log: str) -> Optional[float]:
    """Seconds of training in a `distqat train` log: the `elapsed` of its last progress line (qat.io.progress's
    42s / 1m05s / 2h03m), without the command's start-up; None when it has none."""
    found = re.findall(r"train: step .*\| elapsed (?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", log)
    if not found:
        return None
    h, m, s = (int(x or 0) for x in found[-1])
    return 3600.0 * h + 60.0 * m + s


def ratio(value: Optional[float], base: Optional[float]) -> str:
    """value / base as '1.06x', or '' where either is missing."""
    if value is None or not base:
        return ""
    return f"{value / base:.2f}x"


def seconds_text(s: Optional[float]) -> str:
    if s is None:
        return ""
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m else f"{s:.1f} s"


def ptq_table(rows: list[dict], baseline: Callable[[dict], Optional[dict]]) -> str:
    """Markdown: each PTQ row's perplexity and quantize time, and both as a ratio to `baseline(row)` (the
    llm-compressor row of the same method)."""
    lines = ["| w4g64 weight-only, symmetric | perplexity | quantize wall time | ppl / llm-compressor's | "
             "time / llm-compressor's |", "|---|---|---|---|---|"]
    for r in rows:
        base = baseline(r) or {}
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {seconds_text(r.get('seconds'))} | "
                     f"{ratio(r['ppl'], base.get('ppl')) if base is not r else ''} | "
                     f"{ratio(r.get('seconds'), base.get('seconds')) if base is not r else ''} |")
    return "\n".join(lines)


def qat_table(rows: list[dict]) -> str:
    """Markdown: each QAT row's start and end perplexity, the end as a ratio to torchao's at the same lr."""
    torchao = {r["lr"]: r for r in rows if r["peer"] == "torchao"}
    lines = ["| 8da4w (int4 g64 weights, int8 per-token activations) | lr | steps | start | after QAT | "
             "after / torchao's | train wall time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = torchao.get(r["lr"])
        rel = ratio(r["end_ppl"], base["end_ppl"]) if base is not None and base is not r else ""
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['steps']} | {r['start_ppl']:.2f} | {r['end_ppl']:.2f} | "
                     f"{rel} | {seconds_text(r.get('seconds'))} |")
    return "\n".join(lines)
