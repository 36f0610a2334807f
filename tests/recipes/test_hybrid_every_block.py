"""One model with every registered block at once: forward, backward, and decoding through the caches."""
import torch

import zoo
from tests.helpers import EVERY_BLOCK, assert_close, every_block_recipe

RECIPE = every_block_recipe("every-block", d_model=32, vocab_size=61, seq_len=32)


def test_covers_every_registered_block():
    assert {b["type"] for b in EVERY_BLOCK.values()} == set(zoo.list_blocks())


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
