"""Shared blocks (Zamba / Zamba2): a transformer block whose weights several layers use, each with its own adapters,
output projection and K/V cache. Not a mixer on its own: a layer names one (`shared: <name>` beside its block's
type) and the block's output joins that layer's mixer input (zoo.layer).

    config.py  SharedBlockConfig (recipe fields under model.shared_blocks.<name>)
    block.py   SharedBlock (the weights, held once by ZooLM.shared), SharedUse (a layer's adapters and projection)
    cache.py   SharedLayerCache (the layer's mixer cache and this use's K/V)
"""
from zoo.blocks.shared.block import AdaptedLinear, LowRank, SharedAttention, SharedBlock, SharedUse
from zoo.blocks.shared.cache import SharedLayerCache
from zoo.blocks.shared.config import SharedBlockConfig

__all__ = ["AdaptedLinear", "LowRank", "SharedAttention", "SharedBlock", "SharedBlockConfig", "SharedLayerCache",
           "SharedUse"]
