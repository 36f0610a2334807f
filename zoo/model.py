"""ZooLM: embedding, a pre-norm residual stack of (mixer, feed-forward) layers, final norm, LM head.

    layer i:  x = x + mixer_i(norm(x));  x = x + ffn_i(norm(x))

Any registered block can sit at any layer: the stack only relies on the block contract,
`zoo.blocks.base.Block` (`run` / forward, init_cache, state_bytes, supports_seq_idx, supports_cp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
import torch.utils.checkpoint

from zoo.blocks.base import BlockCache
from zoo.blocks.moe import MoeFeedForward
from zoo.blocks.shared import SharedBlock
from zoo.config import Recipe, load_recipe
from zoo.distributed import ContextParallel, all_reduce_sum
from zoo.layer import RMSNorm, ZooLayer
from zoo.memory import check_memory
from zoo.ops.dispatch import chosen, describe_kernels
from zoo.ops.loss import cross_entropy

IGNORE_INDEX = -100


@dataclass
class ZooOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    cache: Optional["ZooCache"] = None


@dataclass
class ZooCache:
    """Per-layer block caches plus the number of tokens seen; updated in place by forward."""
    layers: List[BlockCache]
    seen: int = 0

    def nbytes(self) -> int:
        """Bytes of the block caches' state (what `state_bytes` predicts, summed over layers)."""
        return sum(c.nbytes() for c in self.layers)

    def allocated_nbytes(self) -> int:
        """Bytes of every tensor the block caches hold: the state plus bookkeeping and the spare capacity of
        preallocated K/V buffers (at most as much again as their state: they grow by doubling)."""
        return sum(c.allocated_nbytes() for c in self.layers)


class ZooLM(nn.Module):
    def __init__(self, recipe: Recipe, max_memory=None):
        """Refuses (RecipeError) a model whose weights would not fit in the memory available on the default
        device, or in `max_memory` (bytes or "64GiB"; "inf" skips the check; zoo.memory)."""
        super().__init__()
        device = torch.get_default_device()
        if device.type != "meta":
            check_memory(recipe, max_memory, device)
        self.recipe = recipe
        m = recipe.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        # model.shared_blocks: each block's weights once, here; the layers that use it hold their adapters
        self.shared = nn.ModuleDict({name: SharedBlock(m.d_model, spec, m.norm_eps, m.zero_centred_norm, m.kernels)
                                     for name, spec in recipe.shared.items()})
        # model.kernels: passed by the blocks to their ops as impl=
        self.layers = nn.ModuleList(ZooLayer(m.d_model, spec, i, m.norm_eps, kernels=m.kernels,
                                             residual_multiplier=m.residual_multiplier,
                                             zero_centred_norm=m.zero_centred_norm, shared_blocks=self.shared)
                                    for i, spec in enumerate(recipe.layers))
        self.norm = RMSNorm(m.d_model, m.norm_eps, m.zero_centred_norm)
        self.checkpoint_layers = False  # activation checkpointing: recompute each layer in backward
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=m.head_bias)
        self.reset_parameters()
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 style: N(0, std) for linears and embeddings, residual projections (`out_proj`)
        scaled by 1/sqrt(2 n_layers) so the residual stream's variance stays O(1) with depth.
        Parameters a block initialises itself (Mamba's dt bias, A_log) carry `_no_reinit`."""
        std = self.recipe.model.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * len(self.layers)) if name.endswith("out_proj") else 1.0
                if not getattr(module.weight, "_no_reinit", False):
                    nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                bias = getattr(module, "bias", None)
                if bias is not None and not getattr(bias, "_no_reinit", False):
                    nn.init.zeros_(bias)
            elif hasattr(module, "init_weights"):  # weights that are not nn.Linear (stacked MoE experts)
                module.init_weights(std, 1 / math.sqrt(2 * len(self.layers)))

    @torch.no_grad()
    def init_head_bias(self, counts) -> None:
        """Start the LM head's bias (`model.head_bias`) at the log unigram frequencies of `counts` [vocab_size]
        (token counts; add-one smoothed, so a token never seen starts at about -ln(total)): the first logits are
        the unigram model, and tokens the data never holds are suppressed from step 0."""
        bias = self.lm_head.bias
        if bias is None:
            raise ValueError("model.head_bias: false; the LM head has no bias to initialise")
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        if counts.numel() != bias.numel() or bool((counts < 0).any()):
            raise ValueError(f"counts: expected {bias.numel()} non-negative token counts (model.vocab_size), got "
                             f"{counts.numel()}")
        bias.copy_(torch.log((counts + 1) / (counts.sum() + counts.numel())).to(bias.dtype))

    def forward(self, input_ids, labels=None, cache: Optional[ZooCache] = None, cp_group=None,
                seq_idx=None, cp_layout: Optional[str] = None) -> ZooOutput:
        """seq_idx [batch, length] int (optional): document ids of packed sequences (`train.cross_doc:
        false`). A document is a maximal run of equal consecutive ids (a change of id starts a new one,
        so ids may repeat non-adjacently). Contract: with seq_idx the output at every token equals what
        that token's document alone, run through the same model from its own position 0, would give:
        attention is masked at document boundaries, recurrent and convolution state is zeroed at them,
        rotary positions restart (zoo.ops.documents). Every block supports it; with a cache it is
        refused (streaming continues one sequence).

        cp_group (a process group, or the default group's `torch.distributed.group.WORLD`): context
        parallel. input_ids and labels are this rank's shards in layout `cp_layout` (default the recipe's
        train.cp_layout, zigzag), cut by `zoo.distributed.shard`; logits come back for the local tokens,
        and loss / aux_loss hold the global values on every rank. Each rank's backward yields its share of
        the parameter gradients: sum them over the group (DDP over the cp ranks, or
        `zoo.distributed.all_reduce_grads`) to get the single-process gradients."""
        cp = None
        if cp_group is not None:
            if cache is not None:
                raise ValueError("cache: a cache continues one sequence on one process; pass either cache or cp_group")
            unsupported = sorted({l.block_type for l in self.layers if not l.mixer.supports_cp})   # shared: attn
            if unsupported:
                raise ValueError(f"cp_group: context parallel is not supported by block(s) {', '.join(unsupported)}; "
                                 f"run them on one process")
            layout = cp_layout or getattr(self.recipe.train, "cp_layout", "zigzag")
            cp = ContextParallel.from_shard(cp_group, input_ids.shape[1], layout)
        if seq_idx is not None:
            unsupported = sorted({l.block_type for l in self.layers if not l.mixer.supports_seq_idx})
            if unsupported:
                raise ValueError(f"seq_idx: document masking (train.cross_doc: false) is not supported by "
                                 f"block(s) {', '.join(unsupported)}; use train.cross_doc: true")
        x = self.embed(input_ids)
        if self.recipe.model.embedding_multiplier != 1:
            x = x * self.recipe.model.embedding_multiplier
        embeddings = x if len(self.shared) else None   # what shared blocks read beside the hidden state (Zamba)
        aux = None
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.checkpoint_layers and self.training and layer_cache is None and torch.is_grad_enabled():
                x, block_aux = torch.utils.checkpoint.checkpoint(layer, x, None, cp, seq_idx, embeddings,
                                                                 use_reentrant=False)
            else:
                x, block_aux = layer(x, cache=layer_cache, cp=cp, seq_idx=seq_idx, embeddings=embeddings)
            if block_aux is not None:
                aux = block_aux if aux is None else aux + block_aux
        if cache is not None:
            cache.seen += input_ids.shape[1]
        logits = self.lm_head(self.norm(x))
        if self.recipe.model.logits_divisor != 1:
            logits = logits / self.recipe.model.logits_divisor
        cap = self.recipe.model.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None and cp is not None:
            loss = _context_parallel_loss(logits, labels, cp)
        elif labels is not None:
            # labels are aligned with input_ids: position t predicts labels[t + 1]; the last position's
            # target is IGNORE_INDEX, so the logits are read in place (no sliced copy, no zero-filled
            # gradient). The loss in at least float32 (a bf16 log-softmax over the vocabulary loses ~2
            # digits), block by block: no float32 copy of the logits, no [tokens, vocab] log-probabilities.
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            loss = cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX)
        return ZooOutput(logits=logits, loss=loss, aux_loss=aux, cache=cache)

    def init_cache(self, batch_size: int, device=None, dtype=None) -> ZooCache:
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        return ZooCache([layer.init_cache(batch_size, device, dtype) for layer in self.layers])

    def update_router_biases(self, group=None) -> None:
        """After an optimizer step: every MoE layer with `bias_update_rate` moves its router's correction bias
        towards balance by the load it routed since the last step, summed over `group` (None: this process)."""
        for module in self.modules():
            if isinstance(module, MoeFeedForward):
                module.update_correction_bias(group)

    def num_params(self) -> dict:
        """Parameter counts split embedding / non-embedding (the LM head counts as embedding)."""
        seen, emb, total = set(), 0, 0
        emb_params = {id(self.embed.weight), id(self.lm_head.weight)}
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            emb += p.numel() if id(p) in emb_params else 0
        return {"total": total, "embedding": emb, "non_embedding": total - emb}

    def describe(self, context: int = 4096) -> str:
        """A table: layer, block, ffn, parameters, inference state (bytes/token at `context`, bf16)."""
        rows = [("layer", "block", "ffn", "params", f"state B/tok @{context}", "state @1K", "state @32K")]
        for i, layer in enumerate(self.layers):
            params = sum(p.numel() for p in layer.parameters())   # a shared block's weights: its own row
            sb = layer.state_bytes
            ffn = layer.ffn.cfg.type if layer.ffn is not None else "none"
            rows.append((str(i), layer.block_type, ffn, f"{params:,}", f"{sb(context) / context:,.1f}",
                         _human_bytes(sb(1024)), _human_bytes(sb(32768))))
        for name, block in self.shared.items():
            users = ",".join(str(i) for i, layer in enumerate(self.layers) if layer._shared and layer._shared[0] is block)
            rows.append((f"shared {name}", f"attn (layers {users or 'none'})", block.ffn_cfg.type,
                         f"{sum(p.numel() for p in block.parameters()):,}", "-", "-", "-"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) if c >= 3 else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n = self.num_params()
        total_state = sum(layer.state_bytes(context) for layer in self.layers)
        lines.append(f"recipe {self.recipe.name}: {n['total']:,} params ({n['non_embedding']:,} non-embedding, "
                     f"{n['embedding']:,} embedding); inference state @{context} tokens: {_human_bytes(total_state)}")
        device = next(self.parameters()).device
        lines.append(f"kernels ({device.type}): {describe_kernels(device, self.recipe.model.kernels)}")
        return "\n".join(lines)

    def kernels(self) -> dict:
        """op -> the implementation its calls run with on the model's device (zoo.ops.dispatch)."""
        return chosen(next(self.parameters()).device, self.recipe.model.kernels)


def _context_parallel_loss(logits, labels, cp: ContextParallel):
    """The single-process loss from shards: each chunk's last token predicts the first label of the next
    chunk, which another rank may hold (all-gathered: one label per chunk and row); the sum over
    predicted tokens and their count are summed over the group (the sum with an identity backward, so
    each rank's backward covers its own tokens once)."""
    chunks = cp.chunks()
    firsts = torch.stack([labels[:, c.local_start] for c in chunks])  # [chunks per rank, batch]
    gathered = [torch.empty_like(firsts) for _ in range(cp.world_size)]
    dist.all_gather(gathered, firsts.contiguous(), group=cp.group)
    first_of = {c.index: gathered[c.rank][i] for r in range(cp.world_size) for i, c in enumerate(cp.chunks(r))}
    targets = []
    for c in chunks:
        nxt = first_of[c.index + 1] if c.index + 1 < cp.n_chunks else torch.full_like(firsts[0], IGNORE_INDEX)
        targets.append(torch.cat([labels[:, c.local_start + 1:c.local_end], nxt[:, None]], dim=1))
    targets = torch.cat(targets, dim=1).flatten()
    pred = logits.flatten(0, 1)
    pred = pred.float() if pred.element_size() < 4 else pred
    total = all_reduce_sum(F.cross_entropy(pred, targets, ignore_index=IGNORE_INDEX, reduction="sum"), cp.group)
    count = (targets != IGNORE_INDEX).sum()
    dist.all_reduce(count, group=cp.group)
    return total / count


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def build_model(recipe_or_path, overrides=(), max_memory=None) -> ZooLM:
    """Build a ZooLM from a Recipe, a recipe path, or a mapping (max_memory: see ZooLM)."""
    recipe = recipe_or_path if isinstance(recipe_or_path, Recipe) else load_recipe(recipe_or_path, overrides)
    return ZooLM(recipe, max_memory=max_memory)
