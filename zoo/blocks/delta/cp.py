"""Context parallel for the delta-rule blocks: conv halo, then state passing with a matrix transition.

1. Conv halo: each chunk's short convolution continues from the d_conv - 1 inputs before it (`conv_cp`).
2. The delta rule is affine in the state it starts from: a chunk maps S to M_c S + S_c, where
   M_c = prod_t (I - beta_t k_t k_t^T) D_t is a [d_k, d_k] matrix per head (not a diagonal, as a Mamba
   chunk's decay is) and S_c the end state from zero. One pass of the op gives both: started from [I | 0]
   with values [0 | v], its end state is [M_c | S_c]. The pairs of all chunks are all-gathered in global
   order and combined by H_0 = 0, H_{c+1} = M_c H_c + S_c.
3. Each chunk runs the op again from its incoming state H_c, which gives its outputs exactly.

Two passes of the op per chunk (the first d_k wider in v), one all-gather of d_k (d_k + d_v) numbers per
head and chunk. The backward is autograd's, through the gather and the halo. Exact, no approximation.
"""
from __future__ import annotations

import torch

from zoo.blocks.mamba.cp import conv_cp
from zoo.distributed.halo import gather_chunks, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.ops.delta import delta_rule

__all__ = ["delta_cp"]


def delta_cp(block, x, cp: ContextParallel, cache=None):
    """The delta block's forward on this rank's shard x [b, local, d_model] (chunks in shard order)."""
    refuse_cache(cache, block.name)
    b = x.shape[0]
    cfg = block.cfg
    mixed = conv_cp(block.projections(x), block.conv1d.weight[:, 0], block.conv1d.bias, cp,
                    block.kernels.get("causal_conv1d", "auto")).transpose(1, 2)
    q, k, v = block.heads(mixed)
    beta, g = block.beta(x), block.log_decay(x)
    h, dk, dv = cfg.n_heads, cfg.head_k_dim, cfg.v_dim
    kw = dict(qk_l2norm=cfg.qk_l2norm, chunk_size=block.chunk_size, impl=block.kernels.get("delta_rule", "auto"))
    chunks = cp.chunks()
    start = torch.cat([torch.eye(dk, dtype=beta.dtype, device=x.device).expand(b, h, dk, dk),
                       torch.zeros(b, h, dk, dv, dtype=beta.dtype, device=x.device)], -1)   # [I | 0]
    transitions = []
    for c in chunks:
        sl = c.local
        wide_v = torch.cat([torch.zeros(*v[:, sl].shape[:3], dk, dtype=v.dtype, device=v.device), v[:, sl]], -1)
        _, end = delta_rule(q[:, sl], k[:, sl], wide_v, beta[:, sl], None if g is None else g[:, sl],
                            initial_state=start, output_final_state=True, **kw)
        transitions.append(end)                                            # [b, h, dk, dk + dv] = [M_c | S_c]
    H = _incoming_states(torch.stack(transitions), cp, dk)
    outs = [delta_rule(q[:, c.local], k[:, c.local], v[:, c.local], beta[:, c.local],
                       None if g is None else g[:, c.local], initial_state=state, **kw)
            for c, state in zip(chunks, H)]
    return block.output(torch.cat(outs, 1), x)


def _incoming_states(transitions, cp: ContextParallel, dk: int) -> list:
    """The state entering each of this rank's chunks: H_0 = 0, H_{c+1} = M_c H_c + S_c over all chunks in
    order. The zero entering chunk 0 is taken from the gathered tensor (times 0), so that the all-gather,
    whose backward is collective, stays in the graph of every rank."""
    gathered = gather_chunks(transitions, cp)                              # [n_chunks, b, h, dk, dk + dv]
    M, S = gathered[..., :dk], gathered[..., dk:]
    H, entering = S[0] * 0, []
    for c in range(cp.n_chunks):
        entering.append(H)
        H = M[c] @ H + S[c]
    return [entering[c] for c in cp.chunk_ids()]
