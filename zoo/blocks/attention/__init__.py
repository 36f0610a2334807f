"""Softmax attention blocks: full causal (`attn`), sliding window (`swa`), blockwise (`blockwise`,
Blockwise Parallel Transformer, arXiv 2305.19370) and `ring` (Ring Attention, arXiv 2310.01889).

All four share projections, GQA and RoPE; they differ only in which attention op they call and in
how much of the past their cache keeps. `ring` is exact causal attention whose context-parallel
form is the ring over devices; on one process it is the blockwise path.

    config.py  AttnConfig, BlockwiseConfig, SwaConfig
    cache.py   AttentionCache (rotated K/V, preallocated, written in place; swa: a ring) and its left-padding
               merge; SlotCache, the buffer mechanics selective's and taipan's caches share
    block.py   CausalSelfAttention and the four registered blocks
    cp.py      context parallel: the ring; swa's halo exchange
    mla.py     multi-head latent attention (`mla`, DeepSeek-V2 / Kimi Linear): K/V expanded from a cached latent
"""
from zoo.blocks.attention.block import (Attention, BlockwiseAttention, CausalSelfAttention, RingAttention,
                                        SlidingWindowAttention)
from zoo.blocks.attention.cache import AttentionCache
from zoo.blocks.attention.config import AttnConfig, BlockwiseConfig, SwaConfig
from zoo.blocks.attention.mla import MLACache, MLAConfig, MultiHeadLatentAttention

__all__ = ["Attention", "AttentionCache", "AttnConfig", "BlockwiseAttention", "BlockwiseConfig",
           "CausalSelfAttention", "MLACache", "MLAConfig", "MultiHeadLatentAttention", "RingAttention",
           "SlidingWindowAttention", "SwaConfig"]
