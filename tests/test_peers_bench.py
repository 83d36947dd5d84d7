"""bench/peers.py without the peers' virtualenvs: its scorer is `distqat eval`'s (the same FP perplexity), a peer's
state is scored as the model it describes, an absent venv is skipped with one line, and the tables' ratios."""

import json
import sys

import pytest
import torch
from helpers.models import save_tiny_teacher
from safetensors.torch import save_file

from bench import peers
from bench._peers_run import Scorer, peer_python, ptq_table, qat_table, ratio, seconds_text, train_elapsed
from qat.apply import quantize_model
from qat.io.models import load_tokenizer
from qat.spec import parse
from trainer.config import load_config
from trainer.eval import perplexity, run_eval

SMALL = ["eval.max_tokens=512", "eval.seq_len=128"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("peers") / "model", load_tokenizer("bundled:smollm2-135m"),
                             max_positions=256, init_range=0.1)


@pytest.fixture(scope="module")
def scorer(tiny):
    return Scorer(str(tiny), SMALL)


def test_fp_row_is_distqat_evals_perplexity(tiny, scorer, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tiny}", f"output_dir={tmp_path}", "eval.compare=[fp]", *SMALL])
    record = run_eval(cfg)
    assert len(scorer.windows) == 4 and all(len(w) == 128 for w in scorer.windows)
    assert scorer.fp() == record["perplexity"]["fp"]


def test_a_peer_state_is_scored_as_the_model_it_describes(scorer, tmp_path):
    model = scorer.load_fp()
    name = "model.layers.0.mlp.down_proj.weight"
    changed = dict(model.named_parameters())[name].detach() * 0.5
    save_file({name: changed.contiguous()}, str(tmp_path / "state.safetensors"))
    with torch.no_grad():
        dict(model.named_parameters())[name].copy_(changed)
    expected = perplexity(model, scorer.windows, progress=False)
    assert scorer.score_state(tmp_path / "state.safetensors") == pytest.approx(expected, rel=1e-9)
    assert abs(expected - scorer.fp()) > 1e-3  # the state changed the score: it was not scored as FP
    # with activations: distqat's int8 per-token fake quant on top of the peer's weights
    quantize_model(model, parse("w16a8"))
    expected_a8 = perplexity(model, scorer.windows, progress=False)
    assert scorer.score_state(tmp_path / "state.safetensors", "w16a8") == pytest.approx(expected_a8, rel=1e-9)
    assert expected_a8 != expected


def test_a_state_naming_no_parameter_is_refused(scorer, tmp_path):
    save_file({"model.layers.0.mlp.down.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="1 of 1 tensors name no parameter"):
        scorer.with_state(tmp_path / "bad.safetensors")


def test_an_absent_venv_is_skipped_with_one_line(tiny, tmp_path, capsys):
    python, line = peer_python(str(tmp_path / "nowhere"), "llmc")
    assert python is None and line.startswith("llmc: skipped (") and "\n" not in line
    out = tmp_path / "out.json"
    assert peers.main(["--model", str(tiny), "--parts", "ptq", "--rows", "rtn-llmc,awq-llmc", "--llmc-venv",
                       str(tmp_path / "nowhere"), "--n-samples", "2", "--seq-len", "32", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("llmc: skipped") == 1
    data = json.loads(out.read_text())
    assert data["ptq"] == {} and data["skipped"]["llmc"].startswith("llmc: skipped")


def test_a_venv_without_the_peer_is_skipped(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)  # distqat's interpreter: no llmcompressor
    python, line = peer_python(str(tmp_path), "llmc")
    assert python is None and "cannot import llmcompressor" in line


def test_tables_and_ratios():
    assert ratio(28.09, 26.55) == "1.06x" and ratio(None, 1.0) == "" and ratio(1.0, None) == ""
    assert seconds_text(482) == "8 min 02 s" and seconds_text(12.34) == "12.3 s" and seconds_text(None) == ""
    rows = {"fp": {"label": "FP", "method": "fp", "ppl": 18.57},
            "rtn-llmc": {"label": "RTN, llm-compressor", "method": "rtn", "ppl": 26.55, "seconds": 10.0},
            "rtn": {"label": "RTN, distqat", "method": "rtn", "ppl": 28.09, "seconds": 5.0}}
    table = ptq_table(list(rows.values()), peers.ptq_baseline(rows)).splitlines()
    assert table[2] == "| FP | 18.57 |  |  |  |"
    assert table[3] == "| RTN, llm-compressor | 26.55 | 10.0 s |  |  |"
    assert table[4] == "| RTN, distqat | 28.09 | 5.0 s | 1.06x | 0.50x |"
    q = [{"label": "torchao", "peer": "torchao", "lr": 1e-4, "steps": 5, "start_ppl": 27.0, "end_ppl": 21.55,
          "seconds": 60.0},
         {"label": "distqat", "peer": "distqat", "lr": 1e-4, "steps": 5, "start_ppl": 28.57, "end_ppl": 21.88},
         {"label": "distqat 6e-4", "peer": "distqat", "lr": 6e-4, "steps": 5, "start_ppl": 28.57, "end_ppl": 27.78}]
    lines = qat_table(q).splitlines()
    assert lines[2] == "| torchao | 0.0001 | 5 | 27.00 | 21.55 |  | 1 min 00 s |"
    assert lines[3] == "| distqat | 0.0001 | 5 | 28.57 | 21.88 | 1.02x |  |"
    assert lines[4] == "| distqat 6e-4 | 0.0006 | 5 | 28.57 | 27.78 |  |  |"  # no torchao row at that lr


def test_the_training_time_is_read_from_distqat_trains_last_progress_line():
    log = ("train: step 1/55 (2%) | loss 0.3 | 900 tokens/s | elapsed 9s | ETA 8m06s\n"
           "train: step 55/55 (100%) | loss 0.2 | 1,000 tokens/s | elapsed 8m06s\nsaved\n")
    assert train_elapsed(log) == 486.0
    assert train_elapsed("train: step 9/9 (100%) | loss 1 | elapsed 1h02m") == 3720.0
    assert train_elapsed("train: step 1/2 (50%) | loss 1 | elapsed 42s | ETA 42s") == 42.0
    assert train_elapsed("no progress") is None
