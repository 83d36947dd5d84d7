"""`distqat eval` with eval.tasks: lm-evaluation-harness on every model an eval scores (fp, the fake-quantized
start, a converted integer folder), offline, on a tiny random Llama and a local multiple-choice task; the
errors of a task that cannot run; the versions and device every eval.json records."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

lm_eval = pytest.importorskip("lm_eval")

from trainer.cli import main  # noqa: E402

QUESTIONS = [("The sky is", ["blue", "green", "loud"], 0), ("Two plus two is", ["five", "four", "six"], 1),
             ("Cats say", ["woof", "moo", "meow"], 2), ("Ice is", ["cold", "hot", "late"], 0),
             ("The sun rises in the", ["west", "east", "sea"], 1), ("Fish live in", ["trees", "sand", "water"], 2),
             ("Snow is", ["white", "black", "sour"], 0), ("A week has seven", ["hours", "days", "cats"], 1)]

TASK = """task: NAME
dataset_path: PATH
dataset_kwargs:
  data_files:
    test: DATA
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
LIMIT = 6  # of the 8 questions


def write_task(folder, name: str, data, path: str = "json") -> None:
    (folder / f"{name}.yaml").write_text(TASK.replace("NAME", name).replace("PATH", path).replace("DATA", str(data)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bundled_tokenizer):
    """A tiny teacher folder, a text to score, and a task folder: tiny_mc (local jsonl), tiny_hub (a hub
    dataset nobody has cached), tiny_nofile (a local data file that does not exist)."""
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_teacher(root / "teacher", bundled_tokenizer)
    (root / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    write_task(tasks, "tiny_mc", data)
    write_task(tasks, "tiny_hub", "test.jsonl", path="distqat-tests/never-cached-dataset")
    write_task(tasks, "tiny_nofile", tasks / "missing.jsonl")
    return root


def eval_args(root, model, out, *extra: str) -> list[str]:
    return ["eval", f"model.name_or_path={model}", f"data.path={root / 'corpus.txt'}", "eval.max_tokens=96",
            "eval.seq_len=32", "eval.plot=false", f"output_dir={out}", *extra]


def task_args(root) -> list[str]:
    return ["eval.tasks=[tiny_mc]", f"eval.task_dir={root / 'tasks'}", f"eval.task_limit={LIMIT}"]


@pytest.fixture(scope="module")
def scored(setup):
    """fp and the w4g32 RTN start scored on tiny_mc: (eval.json, what eval printed)."""
    out = setup / "runs" / "lm"
    assert main(eval_args(setup, setup / "teacher", out, "quant.scheme=w4g32", *task_args(setup))) == 0
    return json.loads((out / "eval.json").read_text())


def lm_eval_direct(root, quantized: bool) -> float:
    """tiny_mc's acc from lm_eval's own simple_evaluate on the teacher loaded as eval loads it."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qat.apply import quantize_model
    from qat.io.models import load_model, load_tokenizer

    model = load_model(root / "teacher", "float32")
    if quantized:
        quantize_model(model, "w4g32")
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(root / "teacher"), batch_size=1, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], limit=LIMIT,
                                  task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False))
    return out["results"]["tiny_mc"]["acc,none"]


def test_eval_scores_each_model_on_a_local_task_as_lm_eval_does(setup, scored):
    assert set(scored["perplexity"]) == set(scored["tasks"]) == {"fp", "w4g32"}
    for label in ("fp", "w4g32"):
        acc = scored["tasks"][label]["tiny_mc"]["acc"]
        assert any(abs(acc - k / LIMIT) < 1e-12 for k in range(LIMIT + 1))  # a share of the questions
        assert "acc_stderr" in scored["tasks"][label]["tiny_mc"]
    assert scored["task_setup"]["tiny_mc"] == {"samples": LIMIT, "fewshot": 0, "version": 1.0}
    assert scored["tasks"]["fp"]["tiny_mc"]["acc"] == lm_eval_direct(setup, quantized=False)
    assert scored["tasks"]["w4g32"]["tiny_mc"]["acc"] == lm_eval_direct(setup, quantized=True)


def test_report_shows_task_columns_and_reads_older_eval_json(setup, scored, capsys):
    old = setup / "runs" / "old"
    old.mkdir()
    (old / "eval.json").write_text(json.dumps({"model": "m", "split": "test", "tokens": 96, "seq_len": 32,
                                               "perplexity": {"fp": 12.5}}))
    capsys.readouterr()
    assert main(["report", f"output_dir={setup / 'runs' / 'report'}"]) == 0
    table = capsys.readouterr().out
    acc = scored["tasks"]["w4g32"]["tiny_mc"]["acc"]
    assert "| run | scheme | tiny_mc/acc |" in table and f"| lm | w4g32 | {acc:.4f} |" in table
    assert "| old | m | 96 | 12.50 |" in table  # no tasks, no versions: still a row of the perplexity table
    assert f"- versions of lm: python {sys.version.split()[0]}, torch {torch.__version__}" in table
    assert (setup / "runs" / "report.md").read_text().strip() == table.strip()


def test_eval_json_records_versions_and_device(setup, scored):
    plain = setup / "plain"  # an eval without tasks records them too
    assert main(eval_args(setup, setup / "teacher", plain, "eval.compare=[fp]")) == 0
    record = json.loads((plain / "eval.json").read_text())
    assert "tasks" not in record
    for rec in (record, scored):
        assert {"python", "torch", "transformers", "datasets", "distqat"} <= set(rec["versions"])
        assert rec["versions"]["torch"] == torch.__version__
        assert rec["device"] == (f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                                 else f"cpu ({torch.get_num_threads()} threads)")
    assert scored["versions"]["lm_eval"] == lm_eval.__version__


def test_a_converted_integer_folder_gets_task_scores(setup, scored, bundled_tokenizer):
    from transformers import AutoModelForCausalLM

    from qat.apply import quantize_model
    from qat.export import convert_folder

    model = AutoModelForCausalLM.from_pretrained(setup / "teacher", dtype=torch.float32)
    quantize_model(model, "w4g32")
    model.save_pretrained(setup / "fq")
    bundled_tokenizer.save_pretrained(setup / "fq")
    convert_folder(setup / "fq", setup / "int")
    assert main(eval_args(setup, setup / "int", setup / "ev_int", *task_args(setup))) == 0
    record = json.loads((setup / "ev_int" / "eval.json").read_text())
    assert set(record["tasks"]) == {"w4g32 (int)"}
    # Weight-only: the integer layers give the fake-quantized model's logits, so its answers.
    assert record["tasks"]["w4g32 (int)"]["tiny_mc"]["acc"] == scored["tasks"]["w4g32"]["tiny_mc"]["acc"]


@pytest.mark.parametrize("task, says", [
    ("tiny_hub", ["task 'tiny_hub' needs its dataset 'distqat-tests/never-cached-dataset'", "offline",
                  "eval.task_dir"]),
    ("tiny_nofile", ["task 'tiny_nofile' cannot load its dataset 'json'", "missing.jsonl"]),
    ("no_such_task_anywhere", ["unknown task 'no_such_task_anywhere'", "eval.task_dir"]),
])
def test_a_task_that_cannot_run_ends_in_one_line_before_any_model_loads(setup, capsys, task, says):
    out = setup / f"bad_{task}"
    capsys.readouterr()
    assert main(eval_args(setup, setup / "teacher", out, f"eval.tasks=[{task}]",
                          f"eval.task_dir={setup / 'tasks'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distqat eval: error: eval.tasks: "), err
    assert all(s in err[0] for s in says), err[0]
    assert not (out / "eval.json").exists()


def test_without_lm_eval_installed_the_error_names_the_extra(setup, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it raises ImportError
    capsys.readouterr()
    assert main(eval_args(setup, setup / "teacher", setup / "no_lm_eval", "eval.tasks=[tiny_mc]")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'distqat[eval]'" in err[0], err


@pytest.mark.parametrize("override, says", [("eval.tasks=tiny_mc", "eval.tasks='tiny_mc' (command line) must be "
                                             "a list, e.g. eval.tasks=[tiny_mc]"),
                                            ("eval.task_dir=/no/such/dir", "eval.task_dir=/no/such/dir: no such")])
def test_bad_task_keys_end_in_one_line(setup, capsys, override, says):
    args = eval_args(setup, setup / "teacher", setup / "bad_key", override)
    if "task_dir" in override:
        args.append("eval.tasks=[tiny_mc]")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_num_fewshot_and_task_limit_reach_lm_eval(setup):
    out = setup / "fewshot"
    assert main(eval_args(setup, setup / "teacher", out, "eval.compare=[fp]", "eval.tasks=[tiny_mc]",
                          f"eval.task_dir={setup / 'tasks'}", "eval.task_limit=2", "eval.num_fewshot=1")) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["task_setup"]["tiny_mc"] == {"samples": 2, "fewshot": 1, "version": 1.0}


def test_pipeline_checks_its_tasks_before_generating(setup, capsys):
    out = setup / "pipe"
    capsys.readouterr()
    assert main(["pipeline", PUBLISHED, f"model.name_or_path={setup / 'teacher'}",
                 f"data.path={setup / 'corpus.txt'}",
                 "quant.scheme=w4g32", "eval.tasks=[tiny_hub]", f"eval.task_dir={setup / 'tasks'}",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'tiny_hub' needs its dataset" in err[0], err
    assert not (out / "generated").exists()
