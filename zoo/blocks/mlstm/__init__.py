"""The mLSTM family: `mlstm`, xLSTM's matrix-memory layer (block.py), and its context-parallel path (cp.py)."""
from zoo.blocks.mlstm.block import MLSTMBlock, MLSTMCache, MLSTMConfig

__all__ = ["MLSTMBlock", "MLSTMCache", "MLSTMConfig"]
