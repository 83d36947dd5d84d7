"""A full disk at each writer of `generate`, `ptq`, `convert` and `eval`, through the command line: one line naming
the path (and the bytes written or needed, and free), exit 2, what an earlier run wrote unchanged bit for bit, no
temp file or lock left, and a rerun that ends where an uninterrupted run ends. The free-space check refuses before
anything is written; a stop signal in `generate` keeps its finished shards. QLoRA's adapter folder is whole or not
at all.

The commands run in-process (`trainer.cli.main`) on the tiny teacher; the disk fills where each writer's bytes
reach it (a file object, safetensors' writer, the plot), part of them written first, as a real full disk does.
Measured on a 256 KB tmpfs: safetensors reports a full disk as a SafetensorError "... (os error 28)", and
datasets' parquet writer may abort the process (SIGABRT) when its write fails mid-column (200,000 rows a shard);
generate writes the shard's bytes itself."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import matplotlib.figure
import pytest
import safetensors.torch
import transformers.modeling_utils
from helpers import PUBLISHED
from helpers.models import fake_and_packed, tiny_run_dir
from peft import peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

import data.generate
import qat.export.convert
import qat.io.atomic
import qat.io.lock
import qat.ptq.loop
import qat.ptq.progress
from qat.io.atomic import DiskFull
from qat.qlora.adapters import add_adapters, save_adapters
from qat.qlora.config import LoRAConfig
from trainer.cli import main
from trainer.commands import PTQ_PROGRESS_DIR

SIZE = r"\d+(\.\d)? [KMGT]?B"  # qat.io.atomic's sizes: "100 B", "25.2 MB"
NO_SPACE = "No space left on device"


def no_space() -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE)


def safetensors_no_space() -> SafetensorError:
    """What safetensors' save_file raises on a full disk (a 256 KB tmpfs): its own error, not an OSError."""
    return SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")


@pytest.fixture(scope="module")
def root(tmp_path_factory, bundled_tokenizer) -> Path:
    return tiny_run_dir(tmp_path_factory.mktemp("diskfull"), bundled_tokenizer)


def run(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, stderr's last line) of `distqat <argv>`; no traceback on the way."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, (err.strip().splitlines() or [""])[-1]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones (temps, locks) included, by relative path: its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """What a writer or a lock leaves when it does not clean up: every hidden entry (no output is one)."""
    return sorted(p.name for p in folder.rglob(".*"))


class FullFile:
    """A file on a disk with `room` bytes left: a write past them puts what fits, then `then()` (raise ENOSPC as
    the OS does, or send a signal)."""

    def __init__(self, f, room: int, then) -> None:
        self.f, self.room, self.then = f, room, then

    def write(self, chunk) -> int:
        chunk = chunk if isinstance(chunk, str) else bytes(chunk)
        if len(chunk) <= self.room:
            self.room -= len(chunk)
            return self.f.write(chunk)
        self.f.write(chunk[: self.room])
        self.f.flush()
        self.room = 0
        self.then()
        raise no_space()  # `then` sent a signal whose handler did not raise: the disk is full all the same

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_on_open(monkeypatch, module, nth: int, room: int, then) -> None:
    """`module`'s `nth` open for writing gives a FullFile (the earlier and later ones are real files)."""
    opened = 0

    def fake(path, mode="r", *args, **kwargs):
        nonlocal opened
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        opened += 1
        return FullFile(f, room, then) if opened == nth else f

    monkeypatch.setattr(module, "open", fake, raising=False)


def half_written(error):
    """A safetensors save_file that writes the first half of the file, then fails with `error`."""

    def save(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise error

    return save


def raise_(e: BaseException):
    raise e


# -- generate ----------------------------------------------------------------------------------------------------


def gen_args(root: Path, out: Path) -> list:
    return ["generate", PUBLISHED, f"model.name_or_path={root / 'teacher'}", "model.dtype=float32",
            "generate.n_samples=10", "generate.max_length=16", "generate.batch_size=4", "generate.shard_size=4",
            f"generate.out_dir={out}", f"output_dir={out.parent}"]


@pytest.fixture(scope="module")
def gen_ref(root) -> dict[str, bytes]:
    """An uninterrupted generate: three shards (4, 4, 2 samples), settings.json, manifest.json."""
    out = root / "gen_ref"
    assert main(gen_args(root, out)) == 0
    ref = files(out)
    assert sorted(ref) == ["manifest.json", "settings.json", "shard-00000.parquet", "shard-00001.parquet",
                           "shard-00002.parquet"]
    return ref


def first_shard(ref: dict[str, bytes]) -> dict[str, bytes]:
    return {k: ref[k] for k in ("settings.json", "shard-00000.parquet")}


def test_generate_full_disk_at_a_shard_keeps_the_ones_before_and_the_rerun_ends_as_an_uninterrupted_run(
        root, gen_ref, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gen"
    fill_on_open(monkeypatch, data.generate, nth=2, room=100, then=lambda: raise_(no_space()))
    code, line = run(capsys, *gen_args(root, out))
    assert code == 2
    assert re.fullmatch(re.escape(f"distqat generate: error: {out}/shard-00001.parquet: no space left on the device "
                                  "(100 B written when it ran out, ") + SIZE +
                        re.escape(" free); free space or write elsewhere; nothing was left half-written"), line), line
    assert files(out) == first_shard(gen_ref)  # the first shard whole, nothing of the second, no temp, no lock

    monkeypatch.undo()
    code, _ = run(capsys, *gen_args(root, out))
    assert code == 0 and files(out) == gen_ref


def test_generate_stopped_by_sigterm_midway_through_a_shard_keeps_the_ones_before_and_the_rerun_completes_the_set(
        root, gen_ref, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gen"
    fill_on_open(monkeypatch, data.generate, nth=2, room=100, then=lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, line = run(capsys, *gen_args(root, out))
    assert code == 75
    assert line == f"distqat generate: stopped by SIGTERM; 1 of 3 shards written to {out}; the same command writes " \
                   "the rest (exit 75)"
    assert files(out) == first_shard(gen_ref)

    monkeypatch.undo()
    code, _ = run(capsys, *gen_args(root, out))
    assert code == 0 and files(out) == gen_ref


# -- ptq -----------------------------------------------------------------------------------------------------------


def ptq_args(root: Path, out: Path, scheme: str = "w4g32") -> list:
    return ["ptq", PUBLISHED, f"model.name_or_path={root / 'teacher'}", "ptq.method=rtn", f"quant.scheme={scheme}",
            f"data.path={root / 'corpus.txt'}", f"output_dir={out}"]


@pytest.fixture(scope="module")
def ptq_earlier(root) -> Path:
    """A finished ptq run (the earlier run a failed one must leave as it was; convert's source)."""
    out = root / "ptq_earlier"
    assert main(ptq_args(root, out)) == 0
    assert sorted(files(out)) == ["config.yaml", "model/chat_template.jinja", "model/config.json",
                                  "model/generation_config.json", "model/model.safetensors", "model/tokenizer.json",
                                  "model/tokenizer_config.json", "ptq_report.json"]
    return out


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def model_bytes(folder: Path) -> int:
    """The bytes of the tensors a saved model folder holds (what ptq checks the free space for)."""
    return sum(t.numel() * t.element_size() for t in load_file(str(folder / "model.safetensors")).values())


@pytest.mark.parametrize("error", [
    no_space,
    safetensors_no_space,
])
def test_ptq_full_disk_in_the_weights_keeps_the_earlier_model_report_and_config(root, ptq_earlier, tmp_path, capsys,
                                                                              monkeypatch, error):
    out = tmp_path / "ptq"
    shutil.copytree(ptq_earlier, out)
    before = files(out)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_written(error()))
    code, line = run(capsys, *ptq_args(root, out, scheme="w8g32"))  # another scheme: its config differs
    assert code == 2
    need = megabytes(model_bytes(out / "model"))  # w8g32 keeps as many tensors, of the same sizes, as w4g32
    assert re.fullmatch(re.escape(f"distqat ptq: error: {out}/model: no space left on the device ({need} needed, ")
                        + SIZE + re.escape(" free); free space or write elsewhere; the model already there is "
                                           "unchanged"), line), line
    assert files(out) == before  # model/, ptq_report.json and config.yaml the earlier run's; no temp, no lock


def no_room(monkeypatch) -> None:
    """The file system reports 1 MB free (qat.io.atomic asks shutil.disk_usage; 16 MB must stay free)."""
    monkeypatch.setattr(qat.io.atomic.shutil, "disk_usage", lambda path: SimpleNamespace(free=1_000_000))


def test_ptq_without_room_for_the_model_refuses_before_writing_anything(root, ptq_earlier, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "ptq"
    no_room(monkeypatch)
    code, line = run(capsys, *ptq_args(root, out))
    assert code == 2
    need = megabytes(model_bytes(ptq_earlier / "model"))
    assert line == f"distqat ptq: error: {out}: writing model needs {need} and 1.0 MB is free there; free space " \
                   "or write elsewhere (nothing was written)"
    assert not out.exists()  # not even config.yaml, nor the folder the lock made


def test_ptq_stopped_with_no_room_for_its_finished_blocks_ends_in_one_line_and_leaves_nothing(root, tmp_path, capsys,
                                                                                           monkeypatch):
    out = tmp_path / "ptq"
    real, blocks = qat.ptq.loop._quantize_block, []

    def block(*args, **kwargs):  # SIGTERM while the first block is quantized: its end writes the progress file
        blocks.append(1)
        if len(blocks) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(qat.ptq.loop, "_quantize_block", block)
    fill_on_open(monkeypatch, qat.ptq.progress, nth=1, room=1000, then=lambda: raise_(no_space()))
    code, line = run(capsys, *ptq_args(root, out), "ptq.method=gptq", "ptq.n_samples=4", "ptq.seq_len=32")
    assert code == 2 and len(blocks) == 1
    assert re.fullmatch(re.escape(f"distqat ptq: error: {out / PTQ_PROGRESS_DIR}/blocks.pt: no space left on the "
                                  "device (") + SIZE + " needed, " + SIZE + re.escape(
        " free); free space or write elsewhere; nothing was left half-written"), line), line
    assert not out.exists()  # no half-written progress, no temp, no lock: the rerun starts afresh


# -- convert -------------------------------------------------------------------------------------------------------


def test_convert_full_disk_in_a_shard_leaves_no_output_folder_and_no_temp(ptq_earlier, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "int"
    monkeypatch.setattr(qat.export.convert, "save_file", half_written(safetensors_no_space()))
    code, line = run(capsys, "convert", ptq_earlier / "model", "--out", out)
    assert code == 2
    assert re.fullmatch(re.escape(f"distqat convert: error: {out}: no space left on the device (") + SIZE +
                        " needed, " + SIZE + re.escape(" free); free space or write elsewhere; nothing was left "
                                                       "half-written"), line), line
    assert list(tmp_path.iterdir()) == []  # no --out, no temp folder beside it, no lock


def test_convert_without_room_refuses_before_writing_anything(ptq_earlier, tmp_path, capsys, monkeypatch):
    out = tmp_path / "int"
    no_room(monkeypatch)
    code, line = run(capsys, "convert", ptq_earlier / "model", "--out", out)
    assert code == 2
    assert re.fullmatch(re.escape(f"distqat convert: error: {tmp_path}: writing int needs ") + SIZE +
                        re.escape(" and 1.0 MB is free there; free space or write elsewhere (nothing was written)"),
                        line), line
    assert list(tmp_path.iterdir()) == []


# -- eval ----------------------------------------------------------------------------------------------------------


def eval_args(root: Path, out: Path, tokens: int = 64) -> list:
    return ["eval", PUBLISHED, f"model.name_or_path={root / 'teacher'}", f"data.path={root / 'corpus.txt'}",
            "quant.scheme=w4g32", f"eval.max_tokens={tokens}", "eval.seq_len=32", f"output_dir={out}"]


@pytest.fixture(scope="module")
def eval_earlier(root) -> Path:
    out = root / "eval_earlier"
    assert main(eval_args(root, out)) == 0
    assert sorted(files(out)) == ["config.yaml", "eval.json", "eval.png"]
    return out


def fail_eval_json(monkeypatch) -> str:
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if not re.fullmatch(r"\.eval\.\w{8}\.json", self.name):
            return real(self, text, *args, **kwargs)
        real(self, text[:10], *args, **kwargs)
        raise no_space()

    monkeypatch.setattr(Path, "write_text", write_text)
    return "eval.json: no space left on the device (10 B written when it ran out, "


def fail_eval_png(monkeypatch) -> str:
    real = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)
        os.truncate(fname, 64)
        raise no_space()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return "eval.png: no space left on the device (64 B written when it ran out, "


@pytest.mark.parametrize("fail", [fail_eval_json, fail_eval_png])
def test_eval_full_disk_at_a_result_file_keeps_the_earlier_results_whole(root, eval_earlier, tmp_path, capsys,
                                                                         monkeypatch, fail):
    out = tmp_path / "ev"
    shutil.copytree(eval_earlier, out)
    before = files(out)
    message = fail(monkeypatch)
    code, line = run(capsys, *eval_args(root, out, tokens=96))  # other numbers than the earlier run's
    assert code == 2
    name = message.split(":")[0]
    assert re.fullmatch(re.escape(f"distqat eval: error: {out}/{message}") + SIZE + re.escape(
        f" free); free space or write elsewhere; the {name} already there is unchanged"), line), line
    assert files(out) == before  # eval.json, eval.png and config.yaml all the earlier run's; no temp, no lock


# -- the lock, QLoRA's adapters --------------------------------------------------------------------------------------


def test_a_full_disk_at_the_lock_names_it_and_leaves_no_lock(root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ptq"
    out.mkdir()
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        lock = os.readlink(f"/proc/self/fd/{fd}").endswith(".distqat.lock")
        f = real(fd, mode, *args, **kwargs)
        return FullFile(f, 0, lambda: raise_(no_space())) if lock else f

    monkeypatch.setattr(qat.io.lock.os, "fdopen", fdopen)
    code, line = run(capsys, *ptq_args(root, out))
    monkeypatch.undo()
    assert code == 2 and line.startswith(f"distqat ptq: error: {out}/.distqat.lock: "), line
    assert list(out.iterdir()) == []


def test_qlora_adapters_are_one_folder_a_full_disk_leaves_as_it_was(tmp_path, bundled_tokenizer, monkeypatch):
    _, packed = fake_and_packed("w4g32")
    model = add_adapters(packed, LoRAConfig(r=4, dropout=0.0))
    out = tmp_path / "adapters"
    save_adapters(model, out, {"base": "tiny"}, bundled_tokenizer)
    before = files(out)
    assert {"adapter_model.safetensors", "adapter_config.json", "distqat_qlora.json", "tokenizer.json"} <= set(before)
    monkeypatch.setattr(peft_model, "safe_save_file", half_written(no_space()))
    with pytest.raises(DiskFull, match=re.escape(f"{out}: no space left on the device (") + SIZE + " needed, .*; "
                       "the adapters already there is unchanged"):
        save_adapters(model, out, {"base": "other"}, bundled_tokenizer)
    assert files(out) == before and [p.name for p in tmp_path.iterdir()] == ["adapters"]
