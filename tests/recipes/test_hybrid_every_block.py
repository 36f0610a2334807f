"""One model with every registered block at once: forward, backward, and decoding through the caches."""
import torch

import zoo
from tests.helpers import assert_close

BLOCKS = {
    "A": {"type": "attn", "n_heads": 2},
    "S": {"type": "swa", "n_heads": 2, "window": 5, "block_size": 4},
    "B": {"type": "blockwise", "n_heads": 2, "block_size": 4, "ffn": {"chunk": 5}},
    "R": {"type": "ring", "n_heads": 2, "block_size": 3},
    "I": {"type": "infini", "n_heads": 2, "segment_len": 4},
    "L": {"type": "selective", "n_heads": 2, "block_size": 4},
    "T": {"type": "taipan", "n_heads": 2, "window": 6, "capacity": 0.5},
    "M": {"type": "mamba", "d_state": 4, "ffn": "none"},
    "N": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "ffn": "none"},
}
RECIPE = {"name": "every-block",
          "model": {"d_model": 32, "n_layers": len(BLOCKS), "vocab_size": 61, "pattern": "".join(BLOCKS),
                    "blocks": BLOCKS, "ffn": {"type": "mlp", "mult": 2}},
          "train": {"seq_len": 32}}


def test_covers_every_registered_block():
    assert {b["type"] for b in BLOCKS.values()} == set(zoo.list_blocks())


def test_forward_backward_and_decoding():
    torch.manual_seed(0)
    model = zoo.build_model(RECIPE).double()
    ids = torch.randint(0, 61, (2, 19))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None  # taipan's capacity loss in training mode
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.init_cache(2)
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(ids.shape[1])]
        cache = model.init_cache(2)
        chunks = [model(ids[:, s:e], cache=cache).logits for s, e in ((0, 7), (7, 8), (8, 19))]
    assert_close(torch.cat(steps, 1), whole, 1e-9, "token by token")
    assert_close(torch.cat(chunks, 1), whole, 1e-9, "chunks")
