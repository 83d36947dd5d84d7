"""QLoRA's memory: gradient checkpointing that recomputes in QLoRA mode, and the chunked cross-entropy that never
holds the (tokens, vocab) logits. Memory is counted, not timed: the bytes of the tensors autograd keeps for
backward (torch.autograd.graph.saved_tensors_hooks), parameters and buffers excluded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers.models import save_tiny_teacher, tiny_llama
from peft.tuners.tuners_utils import BaseTunerLayer

from qat.apply import quantize_model
from qat.qlora.base import pack_model
from qat.runtime import packed
from qat.runtime.packed import PackedLinear
from qat.spec import parse
from trainer import losses
from trainer.config import load_config
from trainer.losses import CHUNKED_CE, chunked_next_token_ce, next_token_ce
from trainer.models import enable_checkpointing
from trainer.module import QATModule
from trainer.qlora import ChunkedCE, build

ROOT = Path(__file__).resolve().parents[1]


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the block, `exclude`'s left out."""

    def __init__(self, exclude: torch.nn.Module) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.nbytes():
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def reference_ce(hidden, head, ids, mask, softcap=None):
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return next_token_ce(logits, ids, mask)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_ce_equals_the_unchunked_loss_and_gradients_in_float64(softcap, masked):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 37, bias=True, dtype=torch.float64)
    ids = torch.randint(0, 37, (2, 9))
    mask = (torch.rand(2, 9) > 0.4).long() if masked else None
    want = reference_ce(hidden, head, ids, mask, softcap)
    want_grads = torch.autograd.grad(want, [hidden, head.weight, head.bias])
    for chunk in (1, 4, 100):
        got = chunked_next_token_ce(hidden, head, ids, mask, softcap, chunk=chunk)
        grads = torch.autograd.grad(got, [hidden, head.weight, head.bias])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_chunked_ce_on_a_model_keeps_a_fraction_of_the_logits_bytes():
    model = tiny_llama(torch.float64).requires_grad_(False)  # the head frozen, as QLoRA's
    for p in model.model.layers.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 24))
    loss_of = ChunkedCE.of(model)
    assert loss_of is not None
    with SavedBytes(model) as full:
        want = next_token_ce(model(input_ids=ids).logits, ids)
    with SavedBytes(model) as chunked:
        got = loss_of({"input_ids": ids}, None)
    params = list(model.model.layers.parameters())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # The unchunked loss keeps the log-softmax of the 46 predicting positions over the vocabulary (128), the
    # chunked one their gradient with respect to the hidden state (64 wide) in its place; the rest is the same.
    assert full.total - chunked.total >= 46 * (128 - 64) * 8


def test_chunked_ce_of_a_softcapping_model_and_declined_for_other_heads():
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0)
    model = tf.Gemma2ForCausalLM(cfg).double().eval()
    loss_of = ChunkedCE.of(model)
    assert loss_of is not None and loss_of.softcap == 2.0
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(loss_of({"input_ids": ids}, None), next_token_ce(model(input_ids=ids).logits, ids),
                               rtol=1e-12, atol=1e-12)
    original = model.forward

    def scaled(*args, **kwargs):  # a model that scales its logits after the head (as Cohere's logit_scale)
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    assert ChunkedCE.of(model) is None


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, bundled_tokenizer):
    return save_tiny_teacher(tmp_path_factory.mktemp("qmem") / "base", bundled_tokenizer, max_positions=64,
                             init_range=0.1)


def student_of(base, checkpointing: bool, scheme: str = "w4g32"):
    cfg = load_config(None, [f"model.name_or_path={base}", f"quant.scheme={scheme}", "train.mode=qlora",
                             "model.dtype=float32", "lora.r=4", "lora.dropout=0.0",
                             f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)  # the adapters' random A
    student, teacher, _, _ = build(cfg, lambda: None, enable_checkpointing)
    assert teacher is None
    torch.manual_seed(1)
    for n, p in student.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters something to differentiate through
            p.data.normal_(0, 0.1)
    return QATModule(student, None, cfg.train), student


@pytest.mark.parametrize("scheme", ["w4g32", "wnf4g32"])
def test_gradient_checkpointing_lowers_qlora_saved_bytes_and_keeps_the_gradients(tiny_base, scheme):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 48))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "assistant_mask": (torch.arange(48) >= 20).long().expand(2, -1)}
    grads, saved = [], []
    for checkpointing in (False, True):
        module, student = student_of(tiny_base, checkpointing, scheme)
        layers = student.get_base_model().model.layers
        assert all(layer.training is checkpointing for layer in layers)
        # the base's own modules stay in eval (dropouts off) whether or not its layers recompute
        base_modules = [n for n, m in layers.named_modules()
                        if n.count(".") > 0 and "lora_" not in n and not isinstance(m, BaseTunerLayer)]
        assert base_modules and not [n for n in base_modules if layers.get_submodule(n).training]
        with SavedBytes(student) as counted:
            loss = module.losses(batch)["loss"]
        loss.backward()
        saved.append(counted.total)
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    assert saved[1] < saved[0] / 2, saved
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        # recomputation repeats the same fp32 operations on the same inputs: the same bits
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_qlora_losses_go_through_the_chunked_ce_and_equal_the_logits_loss(tiny_base):
    module, student = student_of(tiny_base, False)
    assert isinstance(getattr(student, CHUNKED_CE), ChunkedCE)
    ids = torch.randint(0, 1000, (2, 32))
    mask = (torch.arange(32) >= 10).long().expand(2, -1)
    got = module.losses({"input_ids": ids, "attention_mask": torch.ones_like(ids), "assistant_mask": mask})
    logits = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    want = next_token_ce(logits, ids, mask)
    torch.testing.assert_close(got["loss"], want, rtol=1e-6, atol=1e-6)
    assert set(got) == {"ce", "loss"}


def test_the_chunked_ce_of_packed_blocks_keeps_each_example_to_itself(tiny_base):
    module, student = student_of(tiny_base, False)
    ids = torch.randint(0, 1000, (2, 32))
    positions = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, -1)  # two examples per block
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "assistant_mask": mask, "position_ids": positions}
    got = module.losses(batch)["loss"]
    logits = student(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False).logits
    torch.testing.assert_close(got, next_token_ce(logits, ids, mask), rtol=1e-6, atol=1e-6)
    # and it is not the loss of one long sequence: the second example must not see the first
    assert abs(float(got) - float(next_token_ce(student(input_ids=ids).logits, ids, mask))) > 1e-4


@pytest.mark.parametrize("recipe", ["int4", "nf4", "qalora"])
def test_qlora_recipes_checkpoint_by_default(recipe):
    cfg = load_config(ROOT / "configs" / "qlora" / f"{recipe}.yaml")
    assert cfg.train.mode == "qlora" and cfg.train.gradient_checkpointing


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32asym", "w8g32asym", "w3g32", "w4", "wnf4g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_in_tiles_computes_what_the_whole_weight_computes(scheme, dtype, monkeypatch):
    model = tiny_llama(dtype)
    quantize_model(model, parse(scheme))
    pack_model(model, double_quant="nf4" in scheme)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    torch.manual_seed(0)
    results = []
    for tile in (1 << 30, 32 * 64):  # whole, then tiles of 32 rows (64 wide) / 32 columns
        monkeypatch.setattr(packed, "TILE_ELEMENTS", tile)
        out = []
        for m in layers:
            x = torch.randn(2, 5, m.in_features, dtype=dtype, generator=torch.Generator().manual_seed(1),
                            requires_grad=True)
            y = m(x)
            y.backward(torch.ones_like(y))
            out += [y.detach(), x.grad]
        results.append(out)
    tiled = [m for m in layers if m.tile_rows() < m.out_features]
    assert tiled  # the small tile did split layers
    if scheme != "w4":
        assert any(m.tile_cols() < m.in_features for m in layers)
    # Every output element is one dot product over the whole reduction either way; the BLAS may still sum it in
    # another order for another shape (fp32 here: a few ulps), so: equal up to the last bit or two.
    tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("vocab", [1 << 10, 1 << 17])
def test_chunked_ce_chunks_hold_enough_rows_at_a_large_vocabulary(vocab, monkeypatch):
    """CE_CHUNK_ELEMENTS logits a chunk, but never fewer than CE_MIN_ROWS rows: at 128k a 16 MB chunk is 32 rows,
    and each chunk reads the whole head twice."""
    seen = []
    apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: seen.append(a[4]) or apply(*a))
    head = torch.nn.Linear(4, vocab, bias=False)
    losses.chunked_next_token_ce(torch.randn(1, 3, 4), head, torch.randint(0, vocab, (1, 3)))
    assert seen == [max(losses.CE_MIN_ROWS, losses.CE_CHUNK_ELEMENTS // vocab)]
    assert seen[0] == (losses.CE_MIN_ROWS if vocab > 1 << 15 else losses.CE_CHUNK_ELEMENTS // vocab)
