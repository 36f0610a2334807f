"""`parallel`: several mixers on the same normed input, their outputs summed, each with its own output scale
(Falcon-H1 runs attention and Mamba-2 side by side in every layer, arXiv 2507.22448):

    y = sum_i out_scale_i * branch_i(x)

    P: {type: parallel, branches: [{type: attn, n_heads: 4, out_scale: 0.5}, {type: mamba2, head_dim: 16}]}

Each branch is a registered block with its own config (the same fields as under `model.blocks`), so the
layer gets each branch's streaming, left-padding merge, beam reordering, packed documents and context
parallel path: the joint cache holds one cache per branch, and every hook delegates to the branch. A branch
without a cp path (or without packed documents) makes the layer refuse them, naming the branch.
"""
from zoo.blocks.parallel.block import ParallelBlock
from zoo.blocks.parallel.cache import ParallelCache
from zoo.blocks.parallel.config import ParallelConfig

__all__ = ["ParallelBlock", "ParallelCache", "ParallelConfig"]
