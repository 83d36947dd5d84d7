"""Bad input to every command: exit 2 (130 when interrupted), a last stderr line `distqat <command>: error: ...`
naming the file, folder or config key at fault, no traceback, and nothing left that looks like a finished output.

The cases run `trainer.cli.main` in-process (most fail before a model loads); the inputs they break are built once
per module around a tiny 2-layer Llama with the bundled tokenizer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pytest
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from trainer.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "DISTQAT_DEBUG"}, "OMP_NUM_THREADS": "1"}
# What a command leaves when it finished: none of it may be under the case's output folder after a refusal.
FINISHED = ("model", "eval.json", "eval.png", "ptq_report.json", "manifest.json", "generated/manifest.json",
            "adapters", "qlora_eval.json", "report.md", "runs/report.md", "int")
TEXT = "The quick brown fox jumps over the lazy dog while the river runs on to the sea.\n" * 24


def _linked(src: Path, dst: Path, drop: tuple[str, ...] = (), files: Optional[dict] = None) -> Path:
    """A copy of a folder by hard links (cheap); `drop` removed, `files` written as new files (never through a link)."""
    shutil.copytree(src, dst, copy_function=os.link)
    for name in (*drop, *(files or {})):
        (dst / name).unlink(missing_ok=True)
    for name, data in (files or {}).items():
        (dst / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return dst


@pytest.fixture(scope="module")
def d(tmp_path_factory, bundled_tokenizer) -> Path:
    """The shared inputs: a tiny model, broken copies of it, a fake-quant and a converted folder, texts."""
    import pyarrow as pa
    import pyarrow.parquet as parquet
    import torch
    from transformers import AutoModelForCausalLM

    from qat.apply import quantize_model
    from qat.export import convert_folder

    d = tmp_path_factory.mktemp("bad_inputs")
    base = save_tiny_teacher(d / "tiny_base", bundled_tokenizer)
    cfg = json.loads((base / "config.json").read_text())
    weights = (base / "model.safetensors").read_bytes()
    _linked(base, d / "no_config", drop=("config.json",))
    _linked(base, d / "bad_json", files={"config.json": "{not json"})
    _linked(base, d / "truncated", files={"model.safetensors": weights[: len(weights) // 2]})
    _linked(base, d / "pickle_only", drop=("model.safetensors",), files={"pytorch_model.bin": b"\x80\x04junk"})
    _linked(base, d / "remote_code", files={"config.json": json.dumps({**cfg, "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}})})
    _linked(base, d / "no_weights", drop=("model.safetensors",))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    quantize_model(model, "w4g32")
    model.save_pretrained(d / "fq")
    bundled_tokenizer.save_pretrained(d / "fq")
    _linked(d / "fq", d / "fq_noweights", drop=("model.safetensors",))
    convert_folder(d / "fq", d / "converted")
    shutil.copytree(d / "converted", d / "tampered")
    data = bytearray((d / "tampered" / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last weight
    (d / "tampered" / "model.safetensors").write_bytes(bytes(data))
    (d / "blocker").write_text("a file where a folder should go")
    (d / "text.txt").write_text(TEXT)
    (d / "blank.txt").write_text("   \n\n \t \n  \n")
    (d / "empty.txt").write_text("")
    (d / "small.txt").write_text("A short line.\n")
    (d / "notes.docx").write_bytes(b"PK\x03\x04 not a text file")
    (d / "records.json").write_text(json.dumps([{"body": "hello world"}, {"body": "more words"}]))
    (d / "plain.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines()))
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (d / "not_a_dataset").mkdir()
    (d / "not_a_dataset" / "x.txt").write_text("hello")
    # A finished `distqat generate` folder (shards, settings.json, manifest.json), one shard then overwritten with
    # garbage; written here as generate writes it, so that the battery does not depend on generate running.
    gen = d / "gen_bad"
    gen.mkdir()
    shards = []
    for k in range(2):
        ids = [[int(t) for t in bundled_tokenizer(line)["input_ids"]] for line in TEXT.splitlines()[:2]]
        parquet.write_table(pa.table({"sample_id": [2 * k, 2 * k + 1], "input_ids": ids, "text": ["", ""],
                                 "greedy_len": [3, 3]}), gen / f"shard-{k:05d}.parquet")
        shards.append({"file": f"shard-{k:05d}.parquet", "samples": 2, "tokens": sum(map(len, ids))})
    settings = {"teacher": str(base), "seed": 0, "n_samples": 4}
    (gen / "settings.json").write_text(json.dumps(settings))
    (gen / "manifest.json").write_text(json.dumps({"settings": settings, "samples": 4, "shards": shards,
                                                   "tokens": sum(s["tokens"] for s in shards)}))
    (gen / "shard-00001.parquet").unlink()
    (gen / "shard-00001.parquet").write_bytes(b"this is not parquet" * 10)
    return d


# -- argv builders: the command with small settings that would run, then the case's own keys (later keys win) --


def ev(d: Path, o: Path, *kv: str) -> list[str]:
    return ["eval", PUBLISHED, f"model.name_or_path={d / 'tiny_base'}", f"data.path={d / 'text.txt'}",
            "eval.max_tokens=64", "eval.seq_len=32", f"output_dir={o}", *kv]


def pq(d: Path, o: Path, *kv: str) -> list[str]:
    return ["ptq", PUBLISHED, f"model.name_or_path={d / 'tiny_base'}", "ptq.method=rtn", "quant.scheme=w4g32",
            f"data.path={d / 'text.txt'}", f"output_dir={o}", *kv]


def tr(d: Path, o: Path, *kv: str) -> list[str]:
    return ["train", PUBLISHED, f"model.name_or_path={d / 'tiny_base'}", "quant.scheme=w4g32",
            f"data.path={d / 'text.txt'}", "data.seq_len=32", "train.max_steps=2", "train.val_every=1000",
            "distributed.strategy=single", f"output_dir={o}", *kv]


def gen(d: Path, o: Path, *kv: str) -> list[str]:
    return ["generate", PUBLISHED, f"model.name_or_path={d / 'tiny_base'}", "generate.n_samples=4",
            "generate.max_length=12", "generate.batch_size=2", f"output_dir={o}", *kv]


def pl(d: Path, o: Path, *kv: str) -> list[str]:
    return ["pipeline", PUBLISHED, f"model.name_or_path={d / 'tiny_base'}", f"data.path={d / 'text.txt'}",
            "quant.scheme=w4g32", "generate.n_samples=4", "generate.max_length=12", "generate.batch_size=2",
            "data.seq_len=8", "train.max_steps=1", "eval.max_tokens=64", "eval.seq_len=32", f"output_dir={o}", *kv]


def cv(src: Union[Path, str], out: Path) -> list[str]:
    return ["convert", str(src), "--out", str(out)]


def put(path: Path, text: str) -> Path:
    """Write a file the case reads (its folders made), and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def report_in(o: Path, run: Optional[str] = None, text: str = "") -> list[str]:
    """`report` over the runs folder o/runs, with `text` as o/runs/<run>/eval.json when given."""
    (o / "runs").mkdir(parents=True, exist_ok=True)
    if run:
        put(o / "runs" / run / "eval.json", text)
    return ["report", f"output_dir={o / 'runs' / 'report'}"]


@dataclass(frozen=True)
class C:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (the shared inputs, this case's output folder) -> argv
    code: int
    names: Union[str, tuple[str, ...]]  # what the error line must name (substrings)
    prefix: Optional[str] = None  # how the last line starts; default `distqat <command>: error:`


RECIPE_TYPO = "name: x\ntrian:\n  max_steps: 5\n"
FOREIGN = json.dumps({"model": "m", "accuracy": 0.5})
CASES = [
    # config: keys, types, values, recipes, specs
    C("config-unknown-key", lambda d, o: ev(d, o, "quant.weight.bitz=4"), 2,
      ("quant.weight.bitz", "did you mean 'bits'")),
    C("config-moved-ptq-key", lambda d, o: pq(d, o, "ptq.damp=0.05"), 2, ("ptq.damp", "ptq.gptq.damp")),
    C("config-wrong-type", lambda d, o: tr(d, o, "train.max_steps=many"), 2, "train.max_steps"),
    C("config-not-a-choice", lambda d, o: ev(d, o, "eval.split=dev"), 2, "eval.split"),
    C("config-out-of-range", lambda d, o: tr(d, o, "data.val_fraction=0.9"), 2, "data.val_fraction"),
    C("config-recipe-missing", lambda d, o: ["eval", str(o / "nope.yaml"), f"output_dir={o}"], 2, "nope.yaml"),
    C("config-recipe-is-folder", lambda d, o: ["eval", f"{ROOT / 'configs'}/", f"output_dir={o}"], 2,
      ("configs", "folder")),
    C("config-invalid-yaml", lambda d, o: ["eval", str(put(o / "broken.yaml", "a: [1, 2\nb: }")), f"output_dir={o}"],
      2, "broken.yaml"),
    C("config-recipe-unknown-section", lambda d, o: ["train", str(put(o / "typo.yaml", RECIPE_TYPO)), "output_dir="
      f"{o}"], 2, ("trian", "typo.yaml")),
    C("config-recipe-missing-default", lambda d, o: ["eval", str(put(o / "r.yaml", "defaults:\n  - quant/w5z\n")),
      f"output_dir={o}"], 2, "quant/w5z"),
    C("config-key-eval-does-not-read", lambda d, o: ev(d, o, "train.max_steps=5"), 2, "train.max_steps"),
    C("config-key-pipeline-does-not-read", lambda d, o: pl(d, o, "ptq.method=rtn"), 2, "ptq.method"),
    C("config-key-report-does-not-read", lambda d, o: ["report", "quant.scheme=w4", f"output_dir={o}"], 2,
      "quant.scheme"),
    C("config-spec-unparsable", lambda d, o: ev(d, o, "quant.scheme=w4x"), 2, ("quant.scheme", "w4x")),
    C("spec-does-not-fit-eval", lambda d, o: ev(d, o, "quant.scheme=w4g48"), 2, "quant.weight.group_size=48"),
    C("spec-does-not-fit-pipeline", lambda d, o: pl(d, o, "quant.scheme=w4g48"), 2, "quant.weight.group_size=48"),
    C("unknown-command", lambda d, o: ["evaluate", f"output_dir={o}"], 2, "evaluate", "distqat: error:"),
    # model folders
    C("model-missing-eval", lambda d, o: ev(d, o, f"model.name_or_path={d / 'missing_model'}"), 2, "missing_model"),
    C("model-missing-train", lambda d, o: tr(d, o, f"model.name_or_path={d / 'missing_model'}"), 2, "missing_model"),
    C("model-no-config-json", lambda d, o: ev(d, o, f"model.name_or_path={d / 'no_config'}"), 2,
      ("no_config", "config.json")),
    C("model-config-not-json", lambda d, o: pq(d, o, f"model.name_or_path={d / 'bad_json'}"), 2,
      "bad_json/config.json"),
    C("model-truncated-weights", lambda d, o: ev(d, o, f"model.name_or_path={d / 'truncated'}"), 2,
      ("truncated/model.safetensors", "truncated:")),
    C("model-pickle-only", lambda d, o: tr(d, o, f"model.name_or_path={d / 'pickle_only'}"), 2,
      ("pickle_only", "pytorch_model.bin", "pickle")),
    C("model-auto-map-eval", lambda d, o: ev(d, o, f"model.name_or_path={d / 'remote_code'}"), 2,
      ("remote_code", "model.trust_remote_code")),
    C("model-auto-map-generate", lambda d, o: gen(d, o, f"model.name_or_path={d / 'remote_code'}"), 2,
      ("remote_code", "model.trust_remote_code")),
    C("model-no-weight-file", lambda d, o: pq(d, o, f"model.name_or_path={d / 'no_weights'}"), 2, "no_weights"),
    # output folders whose parent is a file
    C("output-eval", lambda d, o: ev(d, o, f"output_dir={d / 'blocker' / 'ev'}"), 2, ("output_dir", "blocker")),
    C("output-ptq", lambda d, o: pq(d, o, f"output_dir={d / 'blocker' / 'pq'}"), 2, ("output_dir", "blocker")),
    C("output-train", lambda d, o: tr(d, o, f"output_dir={d / 'blocker' / 'tr'}"), 2, ("output_dir", "blocker")),
    C("output-pipeline", lambda d, o: pl(d, o, f"output_dir={d / 'blocker' / 'pl'}"), 2, ("output_dir", "blocker")),
    C("output-generate", lambda d, o: gen(d, o, f"generate.out_dir={d / 'blocker' / 'gen'}"), 2,
      ("generate.out_dir", "blocker")),
    C("output-convert", lambda d, o: cv(d / "fq", d / "blocker" / "int"), 2, ("--out", "blocker", "is a file")),
    # data
    C("data-missing-eval", lambda d, o: ev(d, o, f"data.path={d / 'nothere.txt'}"), 2, ("data.path", "nothere.txt")),
    C("data-missing-train", lambda d, o: tr(d, o, f"data.path={d / 'nothere.txt'}"), 2, ("data.path", "nothere.txt")),
    C("data-missing-pipeline", lambda d, o: pl(d, o, f"data.path={d / 'nothere.txt'}"), 2,
      ("data.path", "nothere.txt")),
    C("data-whitespace-only", lambda d, o: ev(d, o, f"data.path={d / 'blank.txt'}"), 2, "blank.txt"),
    C("data-empty-file", lambda d, o: ev(d, o, f"data.path={d / 'empty.txt'}"), 2, "empty.txt"),
    C("data-unsupported-type", lambda d, o: ev(d, o, f"data.path={d / 'notes.docx'}"), 2, ("notes.docx", ".docx")),
    C("data-json-without-text-field", lambda d, o: ev(d, o, f"data.path={d / 'records.json'}"), 2,
      ("records.json", "data.text_field")),
    C("data-jsonl-unparsable", lambda d, o: ev(d, o, f"data.path={d / 'broken.jsonl'}"), 2, "broken.jsonl"),
    C("data-folder-not-a-dataset", lambda d, o: ev(d, o, f"data.path={d / 'not_a_dataset'}"), 2, "not_a_dataset"),
    C("data-instructions-without-fields", lambda d, o: tr(d, o, f"data.path={d / 'plain.jsonl'}",
      "data.format=instructions"), 2, ("plain.jsonl", "messages")),
    C("data-generated-shard-garbage", lambda d, o: tr(d, o, f"data.path={d / 'gen_bad'}"), 2,
      "gen_bad/shard-00001.parquet"),
    C("data-packing-off-for-text", lambda d, o: tr(d, o, "data.packing=false"), 2, "data.packing"),
    # train
    C("train-resume-auto-garbage-checkpoint", lambda d, o: tr(d, put(o / "checkpoints" / "step=5.ckpt",
      "not a checkpoint").parent.parent), 2, ("checkpoints/step=5.ckpt", "train.resume=never")),
    C("train-resume-path-missing", lambda d, o: tr(d, o, f"train.resume={o / 'gone.ckpt'}"), 2,
      ("train.resume", "gone.ckpt")),
    C("train-deepspeed-skip-nonfinite", lambda d, o: tr(d, o, "distributed.strategy=deepspeed",
      "train.skip_nonfinite=2"), 2, "train.skip_nonfinite"),
    C("train-deepspeed-offload-bf16", lambda d, o: tr(d, o, "distributed.strategy=deepspeed",
      "distributed.offload_optimizer=true", "train.master_weights=bf16"), 2,
      ("distributed.offload_optimizer", "train.master_weights=fp32")),
    C("train-deepspeed-autocast-on-cpu", lambda d, o: tr(d, o, "distributed.strategy=deepspeed",
      "train.autocast=always"), 2, ("train.autocast=always", "distributed.strategy=ddp")),
    C("train-qlora-zero3", lambda d, o: tr(d, o, "train.mode=qlora", "distributed.strategy=deepspeed",
      "distributed.zero_stage=3"), 2, "distributed.zero_stage=3"),
    C("train-qlora-qalora-merge-plain-lora", lambda d, o: tr(d, o, "train.mode=qlora", "lora.merge=qalora",
      "lora.variant=lora"), 2, ("lora.merge=qalora", "lora.variant=qalora")),
    C("train-qlora-teacher-topk", lambda d, o: tr(d, o, "train.mode=qlora", "train.teacher_topk=8"), 2,
      "train.teacher_topk"),
    # ptq
    C("ptq-unknown-method", lambda d, o: pq(d, o, "ptq.method=magic"), 2, ("ptq.method", "magic")),
    C("ptq-hqq-with-activations", lambda d, o: pq(d, o, "ptq.method=hqq", "quant.scheme=w4a8kv8"), 2,
      ("ptq.method=hqq", "quant.activation")),
    C("ptq-smoothquant-without-activations", lambda d, o: pq(d, o, "ptq.method=smoothquant"), 2,
      ("ptq.method=smoothquant", "quant.scheme=w8a8")),
    C("ptq-llm-int8-with-w4", lambda d, o: pq(d, o, "ptq.method=llm_int8", "quant.scheme=w4"), 2,
      "ptq.method=llm_int8"),
    C("ptq-calibration-text-too-small", lambda d, o: pq(d, o, "ptq.method=gptq", f"ptq.calib_data={d / 'small.txt'}",
      "ptq.n_samples=4", "ptq.seq_len=64"), 2, ("small.txt", "ptq.n_samples")),
    C("ptq-calibration-file-missing", lambda d, o: pq(d, o, "ptq.method=gptq", f"ptq.calib_data={d / 'nocal.txt'}",
      "ptq.n_samples=4", "ptq.seq_len=64"), 2, ("ptq.calib_data", "nocal.txt")),
    # convert
    C("convert-missing-folder", lambda d, o: cv(d / "missing_fq", o / "int"), 2, "missing_fq"),
    C("convert-base-model", lambda d, o: cv(d / "tiny_base", o / "int"), 2, ("tiny_base", "distqat ptq")),
    C("convert-already-converted", lambda d, o: cv(d / "converted", o / "int"), 2, ("converted", "converted already")),
    C("convert-out-not-empty", lambda d, o: cv(d / "fq", put(o / "occupied" / "keep.txt", "x").parent), 2,
      ("occupied", "not empty")),
    C("convert-ptq-folder-without-weights", lambda d, o: cv(d / "fq_noweights", o / "int"), 2, "fq_noweights"),
    # eval
    C("eval-converted-weights-modified", lambda d, o: ev(d, o, f"model.name_or_path={d / 'tampered'}"), 2,
      ("tampered/model.safetensors", "checksum")),
    C("eval-compare-bogus", lambda d, o: ev(d, o, "eval.compare=[bogus]"), 2, ("eval.compare", "bogus")),
    # report
    C("report-no-eval-json", lambda d, o: report_in(o), 2, ("runs", "eval.json")),
    C("report-broken-eval-json", lambda d, o: report_in(o, "broken_run", "{oops"), 2, "broken_run/eval.json"),
    C("report-foreign-eval-json", lambda d, o: report_in(o, "foreign_run", FOREIGN), 2, "foreign_run/eval.json"),
    # bench
    C("bench-no-name", lambda d, o: ["bench"], 2, "name a benchmark"),
    C("bench-unknown-name", lambda d, o: ["bench", "warp_speed"], 2, "warp_speed"),
    C("bench-decode-bad-shapes", lambda d, o: ["bench", "decode", "--shapes", "foo"], 2, ("--shapes", "foo"),
      "decode.py: error:"),
    C("bench-ptq-missing-model", lambda d, o: ["bench", "ptq", "--model", str(d / "nonexistent_model")], 2,
      "nonexistent_model"),
    # pipeline
    C("pipeline-qlora", lambda d, o: pl(d, o, "train.mode=qlora"), 2, "train.mode"),
]

XFAIL: dict[str, str] = {}
PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=XFAIL[c.id], strict=True)] if c.id in XFAIL
                       else []) for c in CASES]


def _check_refusal(code: int, err: str, o: Path, case: C, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    prefix = case.prefix or (f"distqat {command}: error:" if command in COMMANDS else "distqat: error:")
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(prefix), err[-3000:]
    for name in (case.names,) if isinstance(case.names, str) else case.names:
        assert name in lines[-1], lines[-1]
    left = [p for p in FINISHED if (o / p).exists()]
    left += [str(p) for pattern in ("shard-*.parquet", "*.safetensors", "config.json") for p in o.rglob(pattern)]
    if command == "pipeline":
        left += [str(o / "generated")] if (o / "generated").exists() else []
    assert not left, f"a refused {command} left {left}"


def _as_in_a_fresh_process(monkeypatch) -> None:
    """Libraries' log handlers write to this test's stderr, as they would in a process of its own: one made
    while an earlier test captured stderr holds that test's closed stream, and logging prints a traceback."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `bench` hands its script a new sys.argv
    monkeypatch.delenv("DISTQAT_DEBUG", raising=False)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for h in getattr(logger, "handlers", []):
            if type(h) is logging.StreamHandler:
                monkeypatch.setattr(h, "stream", sys.stderr)


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_is_refused_in_one_line(case: C, d: Path, tmp_path: Path, capsys, monkeypatch):
    _as_in_a_fresh_process(monkeypatch)
    o = tmp_path / "out"
    argv = case.argv(d, o)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors (an unknown command)
        code = e.code
    _check_refusal(code, capsys.readouterr().err, o, case, argv[0])


def test_interrupt_is_exit_130_in_one_line_and_leaves_no_results(d: Path, tmp_path: Path, capsys, monkeypatch):
    import trainer.eval

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    _as_in_a_fresh_process(monkeypatch)
    monkeypatch.setattr(trainer.eval, "perplexity", interrupted)  # as if ctrl-C came while scoring
    o = tmp_path / "out"
    code = main(ev(d, o))
    case = C("interrupt", ev, 130, "interrupted", "distqat eval: interrupted")
    _check_refusal(code, capsys.readouterr().err, o, case, "eval")


def _run_cli(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env or ENV)


@pytest.mark.parametrize("case_id", ["train-resume-auto-garbage-checkpoint", "bench-decode-bad-shapes"])
def test_refusals_read_the_same_in_a_process_of_their_own(case_id: str, d: Path, tmp_path: Path):
    case = next(c for c in CASES if c.id == case_id)
    o = tmp_path / "out"
    argv = case.argv(d, o)
    r = _run_cli(*argv)
    _check_refusal(r.returncode, r.stderr, o, case, argv[0])


def test_debug_shows_the_traceback(d: Path, tmp_path: Path):
    args = ev(d, tmp_path / "out", f"model.name_or_path={d / 'truncated'}")
    r = _run_cli(*args)  # without --debug: one line, exit 2
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("distqat eval: error:"), r.stderr[-3000:]
    for r in (_run_cli(*args, "--debug"), _run_cli(*args, env={**ENV, "DISTQAT_DEBUG": "1"})):
        assert r.returncode != 0 and "Traceback" in r.stderr and "truncated" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("value", ["auto", "always", "never"])
def test_every_documented_choice_of_generate_compile_is_accepted(value: str, d: Path, tmp_path: Path, capsys):
    # Choices YAML would read as booleans (on/off, yes/no) could never be given.
    assert main(gen(d, tmp_path, f"generate.compile={value}", "--print-config")) == 0, capsys.readouterr().err
    assert f"compile: {value}" in capsys.readouterr().out
