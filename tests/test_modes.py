"""The training modes behind `train.mode` (trainer/modes.py) and the data module built from the run config; the runs
themselves are tested end to end in test_train.py, test_resume.py and test_qlora_train.py."""

from __future__ import annotations

from dataclasses import fields, replace

from trainer.config import TrainConfig, load_config
from trainer.datamodule import TextDataModule
from trainer.modes import MODES, QAT, QLoRA, training_mode
from trainer.optim import lightning_precision


def test_every_train_mode_choice_has_a_mode():
    choices = next(f.metadata["choices"] for f in fields(TrainConfig) if f.name == "mode")
    assert set(MODES) == set(choices)
    for name in choices:
        cfg = load_config(None, [f"train.mode={name}"])
        assert type(training_mode(cfg)) is MODES[name]
    assert training_mode(cfg) is not training_mode(cfg)  # one object a run: QLoRA's finish reads what build kept


def test_the_precision_each_mode_asks_for():
    cfg = load_config(None, [])
    for deepspeed in (False, True):
        assert QAT().precision(cfg, deepspeed) == lightning_precision(cfg.train.master_weights, cfg.train.autocast,
                                                                      deepspeed=deepspeed)
        assert QLoRA().precision(cfg, deepspeed) == "32-true"  # the adapters and the base keep their dtypes


def test_the_data_module_reads_its_settings_from_the_config(bundled_tokenizer):
    cfg = load_config(None, ["data.seq_len=48", "data.val_fraction=0.1", "data.text_field=body",
                             "train.micro_batch_size=3", "train.grad_accum=2", "train.max_steps=5"])
    cfg = replace(cfg, data=replace(cfg.data, chat_template=True))

    def teacher():
        raise AssertionError("loaded only when the top-k cache is built")

    dm = TextDataModule.from_config(cfg.data, cfg.train, tokenizer=bundled_tokenizer, seed=7, world=4,
                                    teacher="some/teacher", load_teacher=teacher)
    d, t = cfg.data, cfg.train
    assert (dm.path, dm.text_field, dm.seq_len, dm.chat_template, dm.val_fraction, dm.format, dm.packing) == (
        d.path, "body", 48, True, 0.1, d.format, d.packing)
    assert (dm.micro_batch_size, dm.seed, dm.total_samples, dm.topk_batch_size) == (3, 7, 5 * 2 * 3 * 4, 3)
    assert (dm.teacher_topk, dm.teacher, dm.load_teacher) == (t.teacher_topk, "some/teacher", teacher)
    assert dm.tokenizer is bundled_tokenizer
