"""Selective attention block (`selective`): Leviathan, Kalman & Matias, "Selective Attention Improves
Transformer", arXiv 2410.02703.

Causal softmax attention whose logits are lowered by F, the accumulated "selection" of each key by
earlier queries (head 0's ReLU'd logits; no parameters added), with RoPE on q and k as in `attn`.
The math, the cache step and the eviction rule live in `zoo.ops.selective`; this module owns the
projections and the cache.

Context pruning (the paper's inference-time memory reduction): with `kv_budget` set, the cache keeps
at most that many keys, evicting those with the largest accumulated F (never the first token). The
whole-sequence forward (training, no cache) never prunes. Through the cache a chunk is attended at
once only while no eviction would fall inside it; once the cache is full the tokens go one at a
time, so a pruned stream gives the same output whatever its chunking, equal to decoding token by
token. Different budgets per layer are different letters in a recipe's pattern.

    config.py  SelectiveConfig
    cache.py   SelectiveCache and its left-padding merge ([first key, padding, rest], padding F infinite)
    block.py   SelectiveAttention (`selective`)
    cp.py      context parallel: the selection's running column sums across chunk boundaries
"""
from zoo.blocks.selective.block import SelectiveAttention
from zoo.blocks.selective.cache import SelectiveCache
from zoo.blocks.selective.config import SelectiveConfig

__all__ = ["SelectiveAttention", "SelectiveCache", "SelectiveConfig"]
