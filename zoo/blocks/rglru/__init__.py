"""The RG-LRU family: `rglru`, Griffin's / RecurrentGemma's recurrent block (block.py) and its context-parallel
path (cp.py)."""
from zoo.blocks.rglru.block import RGLRUBlock, RGLRUCache, RGLRUConfig

__all__ = ["RGLRUBlock", "RGLRUCache", "RGLRUConfig"]
