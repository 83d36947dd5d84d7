"""kill -9 (and a stop signal) at chosen points of `ptq`, `convert`, `eval` and `pipeline`, then a rerun of the
same command: nothing killed half-way looks finished, and the rerun ends with the uninterrupted run's output
(model tensors bit for bit, perplexities to the last digit).

Each kill is real: tests/scripts/kill_at.py runs the command with one function patched to send the signal to
its own process at its Nth call. The kill points of one command run one after another in one output folder,
each rerun meeting what the kills before it left.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import PUBLISHED
from helpers.models import tiny_run_dir
from safetensors.torch import load_file

from qat.export import convert_folder
from trainer.init import clear_stage

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = ROOT / "tests" / "scripts" / "kill_at.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAVE_WEIGHTS = "transformers.modeling_utils:safe_save_file"  # inside save_pretrained: the config is written already


@pytest.fixture(scope="module")
def root(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("kill"), bundled_tokenizer)


def at(target: str, call: int = 1, when: str = "after", match: str = "") -> list[str]:
    """kill_at.py's arguments for a kill point: the `call`th call of `target` (of those whose arguments hold
    `match`), before it runs or once returned."""
    return [target, "--call", str(call), "--when", when, "--match", match]


def distqat(*args: str, kill: list[str] = ()) -> subprocess.CompletedProcess:
    """The command run to its end, or killed where `kill` (kill_at.py's arguments) says."""
    cmd = [sys.executable, str(KILL_AT), *kill, "--", *args] if kill else [sys.executable, "-m", "trainer", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def killed(point: list[str], *args: str) -> None:
    r = distqat(*args, kill=point)
    assert r.returncode == -9, f"not killed at {point}: exit {r.returncode}\n{r.stderr[-3000:]}"


def stopped(point: list[str], *args: str) -> None:
    """SIGTERM at `point`: exit 75 and one line saying so, the last one."""
    r = distqat(*args, kill=[*point, "--signal", "TERM"])
    assert r.returncode == 75, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert [x for x in lines if "(exit 75)" in x] == [f"distqat {args[0]}: stopped by SIGTERM (exit 75)"]
    assert lines[-1].endswith("(exit 75)")


def finished(*args: str) -> str:
    r = distqat(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def hidden(folder: Path) -> list[str]:
    """Every hidden entry under `folder`: none of the commands' outputs is one; a finished run leaves none."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def temps(folder: Path) -> list[str]:
    """What the atomic writers leave when killed (`.<name>.tmp-XXXXXXXX` folders, `.<stem>.XXXXXXXX.<ext>`
    files): the hidden entries but the output folder's lock, which a kill -9 leaves for the next run to take over."""
    return [p for p in hidden(folder) if not p.endswith(".distqat.lock")]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder} holds no weights"
    return {k: t for f in files for k, t in load_file(f).items()}


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def untimed(x):
    """A report without its timings (the only fields a rerun may change)."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# ptq


def ptq_args(root: Path, out: Path) -> list[str]:
    return ["ptq", PUBLISHED, f"model.name_or_path={root / 'teacher'}", f"data.path={root / 'corpus.txt'}",
            "quant.scheme=w4g16", "ptq.method=gptq", "ptq.n_samples=4", "ptq.seq_len=32", "ptq.progress=false",
            f"output_dir={out}"]


@pytest.fixture(scope="module")
def ptq_ref(root):
    out = root / "ptq_ref"
    finished(*ptq_args(root, out))
    return out


def test_ptq_killed_while_saving_or_before_its_report_reruns_to_the_same_model(root, ptq_ref):
    out = root / "ptq"
    shutil.copytree(ptq_ref, out)  # a finished earlier run in the folder
    args = ptq_args(root, out)
    report = read_json(ptq_ref / "ptq_report.json")

    # kill -9 inside save_pretrained: the earlier run's model and report stay whole; the new one is a temp folder.
    killed(at(SAVE_WEIGHTS), *args)
    assert [p.split(".tmp-")[0] for p in temps(out)] == [".model"]
    half = out / temps(out)[0]
    assert (half / "model.safetensors").is_file() and not (half / "tokenizer.json").exists()
    same_tensors(out / "model", ptq_ref / "model")
    assert read_json(out / "ptq_report.json") == report

    # kill -9 with model/ in place, before ptq_report.json: no report of the model before, beside this one.
    killed(at("trainer.commands:write_json", 1, "before"), *args)
    assert temps(out) == [], "the rerun removed the killed run's temp folder"
    assert not (out / "ptq_report.json").exists()
    same_tensors(out / "model", ptq_ref / "model")

    # A stop signal inside save_pretrained: exit 75, its temp folder (and its lock) gone, the finished model/ kept.
    stopped(at(SAVE_WEIGHTS), *args)
    assert hidden(out) == [] and not (out / "ptq_report.json").exists()
    same_tensors(out / "model", ptq_ref / "model")

    finished(*args)
    same_tensors(out / "model", ptq_ref / "model")
    assert read_json(out / "model" / "config.json") == read_json(ptq_ref / "model" / "config.json")
    assert untimed(read_json(out / "ptq_report.json")) == untimed({**report, "model_dir": str(out / "model")})
    assert hidden(out) == [] and not (out / "ptq_progress").exists()


# ---------------------------------------------------------------------------------------------------------------
# convert


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_convert_killed_or_stopped_mid_write_reruns_to_the_same_checkpoint(root, ptq_ref):
    src = ptq_ref / "model"
    # The reference in this process (a conversion is rounding and packing, the same bits on any number of threads).
    convert_folder(src, root / "conv_ref" / "int")
    ref = files(root / "conv_ref" / "int")
    where = root / "conv"
    args = ("convert", str(src), "--out", str(where / "int"))

    # kill -9 after the weights, before config.json: a temp folder beside --out, no --out.
    killed(at("qat.export.convert:save_file"), *args)
    assert [p.split(".tmp-")[0] for p in temps(where)] == [".int"]
    assert sorted(p.name for p in (where / temps(where)[0]).iterdir()) == ["model.safetensors"]
    assert not (where / "int").exists()

    # A stop signal there: exit 75; the killed run's temp folder and its own are gone (and the lock).
    stopped(at("qat.export.convert:save_file"), *args)
    assert hidden(where) == [] and not (where / "int").exists()

    # kill -9 once the folder is renamed into place: it is whole, and a rerun keeps it (it is this source's).
    killed(at("qat.export.convert:convert_model"), *args)
    assert files(where / "int") == ref
    assert "converted already" in finished(*args)
    assert files(where / "int") == ref and hidden(where) == []
    same_tensors(where / "int", root / "conv_ref" / "int")


# ---------------------------------------------------------------------------------------------------------------
# eval


def eval_args(root: Path, out: Path) -> list[str]:
    return ["eval", PUBLISHED, f"model.name_or_path={root / 'teacher'}", f"data.path={root / 'corpus.txt'}",
            "quant.scheme=w4g16", "eval.compare=[fp,quant]", "eval.max_tokens=256", "eval.seq_len=32",
            f"output_dir={out}"]


def test_eval_killed_between_models_or_while_writing_reruns_to_the_same_numbers(root, pipe_ref):
    # The uninterrupted run's numbers: the pipeline's reference scored the same two models on the same windows.
    rows = ("fp", "w4g16")
    piped = read_json(pipe_ref / "eval.json")
    ref = {k: v for k, v in piped.items() if k not in ("roles", "gap_closed")}
    ref.update(perplexity={k: piped["perplexity"][k] for k in rows}, coverage={k: piped["coverage"][k] for k in rows})
    out = root / "ev"
    args = eval_args(root, out)

    # kill -9 inside the plot's write, both models scored: its temp file, and no eval.json, which is written last
    # (the pipeline's test kills between two models).
    killed(at("matplotlib.figure:Figure.savefig"), *args)
    assert [p.split(".")[1] for p in temps(out)] == ["eval"]
    assert not (out / "eval.json").exists() and not (out / "eval.png").exists()

    # A stop signal between the two models: exit 75, no eval.json with a row missing, the killed run's temp gone.
    stopped(at("trainer.eval:perplexity", 1), *args)
    assert hidden(out) == [] and not (out / "eval.json").exists()

    finished(*args)
    assert read_json(out / "eval.json") == ref
    assert (out / "eval.png").is_file() and hidden(out) == []


# ---------------------------------------------------------------------------------------------------------------
# pipeline


def pipeline_args(root: Path, out: Path) -> list[str]:
    return ["pipeline", PUBLISHED, f"model.name_or_path={root / 'teacher'}", f"data.path={root / 'corpus.txt'}",
            "quant.scheme=w4g16", "generate.n_samples=32", "generate.max_length=33", "generate.batch_size=16",
            "generate.shard_size=16", "data.seq_len=32", "train.max_steps=8", "train.save_every=4",
            "train.lr=1e-3", "train.warmup_steps=2", "train.micro_batch_size=4", "train.val_every=1000",
            "distributed.strategy=single", "eval.max_tokens=256", "eval.seq_len=32", "ptq.n_samples=4",
            "ptq.seq_len=32", "ptq.progress=false", f"output_dir={out}"]


def samples(folder: Path) -> dict[int, list[int]]:
    return {r["sample_id"]: r["input_ids"] for f in sorted(folder.glob("shard-*.parquet"))
            for r in pq.read_table(f).to_pylist()}


@pytest.fixture(scope="module")
def pipe_ref(root):
    out = root / "pipe_ref"
    finished(*pipeline_args(root, out))
    return out


def test_pipeline_killed_in_each_step_reruns_to_the_same_eval(root, pipe_ref):
    ref = pipe_ref
    out = root / "pipe"
    args = pipeline_args(root, out)
    unfinished = ("eval.json", "model", "checkpoints")

    # kill -9 in generate, the second shard written under its temp name, not yet renamed: the first shard only.
    killed(at("os:replace", when="before", match="shard-00001"), *args)
    gen = out / "generated"
    assert sorted(p.name for p in gen.glob("shard-*")) == ["shard-00000.parquet"]
    assert [p.split(".")[1] for p in temps(out)] == ["shard-00001"]
    assert not (gen / "manifest.json").exists() and not any((out / n).exists() for n in unfinished)

    # kill -9 in train, after its first checkpoint: every sample once, the temp shard gone, no student yet.
    killed(at("lightning.pytorch.callbacks.model_checkpoint:ModelCheckpoint._save_checkpoint"), *args)
    assert samples(gen) == samples(ref / "generated") and (gen / "manifest.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step=4.ckpt"]
    assert temps(out) == [] and not (out / "model").exists() and not (out / "eval.json").exists()

    # kill -9 in the final eval, between its third and fourth model: the student is whole (the resumed training
    # ended with the uninterrupted run's weights), the PTQ row built; no eval.json with a row missing.
    base = out / "baseline" / "init"
    killed(at("trainer.eval:perplexity", 3), *args)
    same_tensors(out / "model", ref / "model")
    assert (base / "start.json").is_file() and not (out / "eval.json").exists()

    finished(*args)
    assert read_json(out / "eval.json") == read_json(ref / "eval.json")
    same_tensors(out / "model", ref / "model")
    same_tensors(base / "model", ref / "baseline" / "init" / "model")
    assert hidden(out) == []


def test_a_start_stage_rebuilt_after_a_kill_drops_the_killed_builds_temp_folder(tmp_path):
    """A kill inside a start stage's save (the block-wise stage writes its model/ itself) leaves a temp folder in the
    stage; the rebuild removes it with the earlier build's model, record and report, and nothing else there."""
    stage = tmp_path / "blockwise"
    for name in (".model.tmp-a1b2c3d4", "model"):
        (stage / name).mkdir(parents=True)
        (stage / name / "model.safetensors").write_bytes(b"half")
    for name in ("start.json", "blockwise_report.json", "notes.txt"):
        (stage / name).write_text("{}")
    clear_stage(stage)
    assert sorted(p.name for p in stage.iterdir()) == ["notes.txt"]
