"""Infini-attention block (`infini`): Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", arXiv 2404.07143.

Per segment of `segment_len` tokens: causal softmax attention inside the segment, retrieval from a
compressive memory (M, z) built from all earlier segments, a learned per-head gate mixing the two,
then the memory update, linear or delta rule (section 2.1 of the paper). The math lives in
`zoo.ops.infini`; this module owns the projections, the gate and the cache.

RoPE is applied on the local path only: the memory path reads and writes the un-rotated q, k, since
the paper puts no positional encoding on it and a memory summed over segments has no single
position to rotate to.

Cache: (M, z) in float32 (float64 for a float64 model: the op's accumulation dtype) plus the k, v
of the unfinished segment (fewer than `segment_len` tokens), so streaming holds constant memory
whatever the length. The cached k is un-rotated; its rotated copy for the local path is recomputed
from the known positions rather than stored.

    config.py  InfiniConfig
    cache.py   InfiniCache and its left-padding merge (rows grouped by segment phase)
    block.py   InfiniAttention (`infini`)
    cp.py      context parallel: the memory carried across chunk boundaries
"""
from zoo.blocks.infini.block import InfiniAttention
from zoo.blocks.infini.cache import InfiniCache
from zoo.blocks.infini.config import InfiniConfig

__all__ = ["InfiniAttention", "InfiniCache", "InfiniConfig"]
