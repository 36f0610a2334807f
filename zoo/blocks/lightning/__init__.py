"""The lightning-attention family: `lightning`, MiniMax's linear attention with a fixed decay per head (block.py),
and its context-parallel path (cp.py)."""
from zoo.blocks.lightning.block import LightningBlock, LightningCache, LightningConfig

__all__ = ["LightningBlock", "LightningCache", "LightningConfig"]
