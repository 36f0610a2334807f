"""The gated short-convolution family: `short_conv` (LFM2's convolution layers, block.py), its config and cache."""
from zoo.blocks.conv.block import ShortConvBlock, ShortConvCache, ShortConvConfig

__all__ = ["ShortConvBlock", "ShortConvCache", "ShortConvConfig"]
