"""`none`: a layer without a mixer, so that the layer is its feed-forward alone (Nemotron-H's MLP and MoE
layers, which transformers builds as layers of their own: `model.blocks.F: {type: none, ffn: relu2}`).

The block adds zeros and holds no state (`state_bytes` 0, a cache with no elements that keeps only the
batch size); `passthrough` tells the layer stack to skip the mixer's norm, so the layer has only the FFN's
parameters. Streaming, generation with left padding, packed documents and context parallel pass through.
"""
from zoo.blocks.passthrough.block import NoMixer, NoMixerCache, NoMixerConfig

__all__ = ["NoMixer", "NoMixerCache", "NoMixerConfig"]
