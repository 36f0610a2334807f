"""Packed documents (seq_idx) in every block: the packed output equals each document run alone, and so
do the gradients (of the input and of every parameter); streaming with seq_idx is refused."""
import pytest
import torch

import zoo
from tests.helpers import assert_close, make_block

D_MODEL = 24
CASES = {
    "attn": {"n_heads": 4, "n_kv_heads": 2},
    "blockwise": {"n_heads": 3, "block_size": 5},
    "ring": {"n_heads": 2, "n_kv_heads": 1, "block_size": 4},
    "swa": {"n_heads": 4, "n_kv_heads": 2, "window": 6, "block_size": 4},
    "infini": {"n_heads": 2, "segment_len": 4},
    "infini/linear": {"n_heads": 2, "segment_len": 3, "delta_rule": False},
    "selective": {"n_heads": 2, "block_size": 4},
    "taipan": {"n_heads": 2, "window": 6, "capacity": 0.5, "block_size": 4},
    "taipan/rope": {"n_heads": 2, "window": 5, "capacity": 0.5, "block_size": 3, "rope_base": 10000.0},
    "mamba": {"d_state": 4},
    "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4},
    "none": {},
    "parallel": {"branches": [{"type": "attn", "n_heads": 4, "n_kv_heads": 2, "out_scale": 0.5},
                              {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "out_scale": 2.0}]},
    "deltanet": {"n_heads": 2, "head_k_dim": 6, "chunk_size": 4},
    "short_conv": {"d_conv": 4, "bias": True},
    "mla": {"n_heads": 3, "kv_lora_rank": 6, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 5},
    "gated_deltanet": {"n_heads": 4, "n_k_heads": 2, "head_k_dim": 6, "chunk_size": 5},
    "kda": {"n_heads": 2, "head_k_dim": 6, "chunk_size": 3, "allow_neg_eigval": True},
    "rglru": {"n_heads": 3, "lru_width": 18, "chunk_size": 4},
    "lightning": {"n_heads": 3, "chunk_size": 4},
    "mlstm": {"n_heads": 3, "chunk_size": 4},
}

# Three rows of 23 tokens, each with its own boundaries: length-1 documents at the start, in the middle
# and at the end, an id that comes back after another document (a new document all the same), a whole row.
DOC_LENGTHS = [[1, 7, 1, 14], [9, 13, 1], [23]]
DOC_IDS = [[3, 0, 3, 1], [7, 2, 7], [4]]


def packed_seq_idx():
    return torch.stack([torch.repeat_interleave(torch.tensor(ids), torch.tensor(lengths))
                        for ids, lengths in zip(DOC_IDS, DOC_LENGTHS)])


def make(case):
    block = make_block(case.split("/")[0], D_MODEL, **CASES[case])
    if case.startswith("taipan"):
        block.eval()  # training draws Gumbel noise per call: only the evaluation selection is reproducible
    return block


def param_grads(block):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in block.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_each_document_alone(case):
    block = make(case)
    seq_idx = packed_seq_idx()
    x = torch.randn(len(DOC_LENGTHS), seq_idx.shape[1], D_MODEL, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(x.shape, dtype=torch.float64)  # a loss that weighs every output differently

    packed = block(x, seq_idx=seq_idx)
    (packed * weight).sum().backward()
    packed_dx, packed_grads = x.grad.clone(), param_grads(block)
    assert all(g is not None and torch.isfinite(g).all() for g in packed_grads.values()), \
        [n for n, g in packed_grads.items() if g is None]

    block.zero_grad()
    x.grad = None
    rows = []
    for r, lengths in enumerate(DOC_LENGTHS):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        rows.append(torch.cat([block(x[r:r + 1, s:s + n]) for s, n in zip(starts, lengths)], dim=1))
    alone = torch.cat(rows)
    (alone * weight).sum().backward()

    assert_close(packed, alone, 1e-10, "packed vs alone")
    assert_close(packed_dx, x.grad, 1e-10, "grad x")
    for name, want in param_grads(block).items():
        assert_close(packed_grads[name], want, 1e-10, f"grad {name}", floor=1.0)


@pytest.mark.parametrize("case", list(CASES))
def test_one_document_is_no_seq_idx(case):
    block = make(case)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x, seq_idx=torch.full((2, 11), 5)), block(x), 1e-12)


@pytest.mark.parametrize("name", sorted(zoo.list_blocks()))
def test_every_block_supports_seq_idx_and_refuses_it_with_a_cache(name):
    case = next(c for c in CASES if c.split("/")[0] == name)
    block = make(case)
    assert getattr(block, "supports_seq_idx", False)
    x = torch.randn(1, 5, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match="seq_idx: packed documents do not stream through a cache"):
        block(x, cache=block.init_cache(1, dtype=torch.float64), seq_idx=torch.zeros(1, 5, dtype=torch.int64))


def test_bad_seq_idx_names_the_field():
    block = make("attn")
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"seq_idx: expected shape \(2, 5\)"):
        block(x, seq_idx=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="seq_idx: expected an integer dtype"):
        block(x, seq_idx=torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------
# The whole model: every block in one stack, and training with train.cross_doc: false.

def every_block_recipe(**train):
    from tests.recipes.test_hybrid_every_block import RECIPE
    return zoo.load_recipe({**RECIPE, "train": {**RECIPE["train"], **train}})


def test_model_packed_equals_each_document_alone():
    torch.manual_seed(0)
    model = zoo.build_model(every_block_recipe()).double().eval()
    seq_idx = packed_seq_idx()
    ids = torch.randint(0, 61, seq_idx.shape)
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx).logits
        for r, lengths in enumerate(DOC_LENGTHS):
            s = 0
            for n in lengths:
                assert_close(packed[r:r + 1, s:s + n], model(ids[r:r + 1, s:s + n]).logits, 1e-10,
                             f"row {r} document [{s}, {s + n})")
                s += n
    with pytest.raises(ValueError, match="seq_idx: packed documents do not stream through a cache"):
        model(ids[:, :4], cache=model.init_cache(ids.shape[0]), seq_idx=seq_idx[:, :4])


class PackedToyData:
    """Packed rows of documents 3 to 9 tokens long, each an arithmetic run from its own start, through
    the data pipeline's own packing (labels at document starts ignored, seq_idx per row)."""
    bytes_per_token = 1.0

    def _batch(self, seed, batch_size, seq_len):
        import numpy as np
        from zoo.data.packing import pack_batch
        g = np.random.default_rng(seed)
        tokens, docs = np.zeros((batch_size, seq_len), np.int64), np.zeros((batch_size, seq_len), np.int64)
        for r in range(batch_size):
            t, doc = 0, int(g.integers(0, 100))
            while t < seq_len:
                n = min(int(g.integers(3, 10)), seq_len - t)
                tokens[r, t:t + n] = (g.integers(0, 61) + 2 * np.arange(n)) % 61
                docs[r, t:t + n] = doc
                t, doc = t + n, doc + 1
        return pack_batch(tokens, docs)

    def train_batch(self, step, micro, batch_size, seq_len):
        return self._batch(1000 * step + micro, batch_size, seq_len)

    def val_batches(self, n, batch_size, seq_len):
        return [self._batch(10**9 + i, batch_size, seq_len) for i in range(n)]


def test_every_block_trains_with_cross_doc_false(tmp_path):
    from zoo.train.trainer import Trainer
    recipe = every_block_recipe(cross_doc=False, seq_len=24, batch_size=3, lr=3e-3, max_steps=4, warmup_steps=1,
                                eval_every=4, eval_batches=1, save_every=4)
    data = PackedToyData()
    batch = data.train_batch(0, 0, 3, 24)
    assert "seq_idx" in batch and (batch["labels"] == -100).any()
    trainer = Trainer(recipe, data, tmp_path, device="cpu", progress=False, log=lambda s: None)
    seen = []
    original = trainer.model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("seq_idx"))
        return original(*args, **kwargs)

    trainer.model.forward = spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = [trainer.train_step() for _ in range(4)]
    assert seen and all(s is not None for s in seen), "the trainer did not pass seq_idx"
    assert all(torch.isfinite(torch.tensor(losses))), losses
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))
    val_loss, _ = trainer.evaluate()
    assert val_loss < losses[0]


def test_activation_checkpointing_passes_seq_idx():
    """Recomputing each layer in the backward sees the same documents: loss and gradients unchanged."""
    torch.manual_seed(0)
    model = zoo.build_model(every_block_recipe()).double().eval()  # eval: taipan's selection is deterministic
    seq_idx = packed_seq_idx()
    ids = torch.randint(0, 61, seq_idx.shape)
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.checkpoint_layers = checkpointing
        model.training = True  # the checkpointed path runs in training mode only; blocks stay in eval
        out = model(ids, labels=ids, seq_idx=seq_idx)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_close(loss_b, loss_a, 1e-12, "loss")
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], 1e-10, f"grad {name}", floor=1.0)
