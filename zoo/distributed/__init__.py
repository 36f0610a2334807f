"""Context parallel: one sequence spread over the W ranks of a process group, exactly.

Layouts (`layout.py`): the sequence is cut into chunks at `c * L // n` (uneven lengths split into
chunks one token apart: no padding, no loss mask). `contiguous`: n = W, rank r holds chunk r.
`zigzag` (default): n = 2W, rank r holds chunks r and 2W-1-r, concatenated in that order.

The contract every block's context-parallel path meets (`forward(x, cp=handle)`):
- x is this rank's shard [batch, local_len, d_model] in the handle's layout; the output is the
  matching shard of the single-process output on the whole sequence;
- gradients: the input gradient is the matching shard of the single-process input gradient, and the
  parameter gradients summed over the group equal the single-process ones (`comm.all_reduce_grads`);
- a block with state across time treats each of its chunks separately: iterate `cp.chunks()`
  (global chunk index, global [start, end), local slice); zigzag gives each rank two chunks that are
  not adjacent. `cp.all_chunks()` lists every chunk in global order with its owner, `cp.positions()`
  the global positions of the local tokens (RoPE);
- cross-rank tensors move with `comm.all_gather` (backward: the sum over ranks, its adjoint) or point
  to point; a scalar every rank reports (Taipan's aux loss) holds the global value on every rank via
  `comm.all_reduce_sum`, whose backward is the identity, so each rank's backward counts its own
  contribution once;
- `cache` together with `cp` is not supported (context parallel is for training and evaluation).
"""
from zoo.distributed.comm import all_gather, all_reduce_grads, all_reduce_sum
from zoo.distributed.layout import LAYOUTS, Chunk, ContextParallel, chunk_bounds, shard, unshard
from zoo.distributed.ring import ring_attention

__all__ = ["LAYOUTS", "Chunk", "ContextParallel", "all_gather", "all_reduce_grads", "all_reduce_sum",
           "chunk_bounds", "ring_attention", "shard", "unshard"]
