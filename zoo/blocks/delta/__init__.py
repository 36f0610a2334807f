"""The delta-rule family: `deltanet`, `gated_deltanet`, `kda` (block.py), their config and cache."""
from zoo.blocks.delta.block import DeltaNetBlock, GatedDeltaNetBlock, HeadRMSNorm, KDABlock
from zoo.blocks.delta.cache import DeltaCache
from zoo.blocks.delta.config import DeltaConfig

__all__ = ["DeltaCache", "DeltaConfig", "DeltaNetBlock", "GatedDeltaNetBlock", "HeadRMSNorm", "KDABlock"]
