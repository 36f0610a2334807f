"""The block contract as code: what every sequence mixer gives the layer stack, streaming, generation
(left padding, beam search) and context parallel.

A block family subclasses `Block` in its own folder (`zoo/blocks/<family>/`), with a typed cache (a
dataclass on `BlockCache`), and registers with `zoo.registry.register_block`. Nothing else needs an
edit: `zoo.model.ZooLM` calls `Block.run` layer after layer, `zoo.hf` calls the hooks below.

    @register_block("mamba2", config=Mamba2Config)
    class Mamba2Block(Block):
        def __init__(self, d_model, cfg, layer_idx, kernels=None): ...
        def forward(self, x, *, cache=None, cp=None, seq_idx=None): ...   # Tensor, or (Tensor, aux_loss)
        def init_cache(self, batch_size, device=None, dtype=torch.float32) -> Mamba2Cache: ...
        def state_bytes(self, seq_len, batch_size=1, dtype=torch.bfloat16) -> int: ...
        # hooks with defaults: merge_left_padded (generation with left padding), reorder_cache (beams)
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional, Sequence, TypeVar, Union

import torch
import torch.nn as nn

__all__ = ["AuxLoss", "Block", "BlockCache", "BlockOutput", "RowGroups", "left_padded_cat", "split_aux"]

AuxLoss = Optional[torch.Tensor]
# A block without an auxiliary loss returns its output; one with (Taipan's capacity loss, selective
# attention's memory loss) returns (output, aux_loss), aux_loss None where a call adds nothing.
BlockOutput = Union[torch.Tensor, tuple[torch.Tensor, AuxLoss]]

C = TypeVar("C", bound="BlockCache")


def split_aux(result: BlockOutput) -> tuple[torch.Tensor, AuxLoss]:
    """(output, aux_loss) from what a block's forward returned, whichever form."""
    return result if isinstance(result, tuple) else (result, None)


@dataclass
class BlockCache:
    """A block's inference state for a batch of rows, updated in place by `forward(x, cache=...)`.

    A family's cache is a dataclass on this one. Every tensor field holds the batch first; `nbytes`,
    `index_rows` and `stack` work field by field on them. Fields named in `BOOKKEEPING` (a left-padded
    batch's `row_start`) are not state: `nbytes` leaves them out. Non-tensor fields (a position `pos`)
    are copied as they are."""

    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("row_start",)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (bookkeeping included)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    def nbytes(self) -> int:
        """Bytes the state holds: what `Block.state_bytes` predicts for the same tokens and batch."""
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if name not in self.BOOKKEEPING)

    def allocated_nbytes(self) -> int:
        """Bytes of every tensor the cache holds, bookkeeping and spare capacity included (a preallocated
        K/V buffer's unfilled slots, `zoo.blocks.attention.cache`): its memory, where `nbytes` is its state."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def batch_size(self) -> int:
        return next((t.shape[0] for t in self.tensors().values() if t.dim() > 0), 0)

    def index_rows(self: C, indices: torch.Tensor) -> C:
        """A new cache whose row i is row indices[i] of this one (beam search, row selection)."""
        return dataclasses.replace(self, **{name: t[indices.to(t.device)] for name, t in self.tensors().items()})

    @classmethod
    def stack(cls: type[C], caches: Sequence[C]) -> C:
        """The caches' rows one after another in one cache (tensor fields concatenated along the batch;
        the other fields from the first). Exact for state with no notion of position (conv, SSM)."""
        first = caches[0]
        return dataclasses.replace(first, **{name: torch.cat([c.tensors()[name] for c in caches])
                                             for name in first.tensors()})


@dataclass
class RowGroups(BlockCache):
    """A batch a block decodes in groups of rows: `groups` holds (rows, cache) pairs, rows a LongTensor of
    batch indices, cache one block cache for those rows; each group runs as its own batched forward and
    the groups never mix. `Block.merge_left_padded`'s default (one group per row: every row decodes
    alone, exact for any block), and what a family returns when only some rows can share one call
    (infini: the rows whose segment phase agrees). `Block.run` dispatches it; forward never sees it."""

    groups: list[tuple[torch.Tensor, BlockCache]] = dataclasses.field(default_factory=list)

    def nbytes(self) -> int:
        return sum(c.nbytes() for _, c in self.groups)

    def allocated_nbytes(self) -> int:
        return sum(c.allocated_nbytes() for _, c in self.groups)

    @property
    def batch_size(self) -> int:
        return sum(len(rows) for rows, _ in self.groups)

    def index_rows(self, indices: torch.Tensor) -> "RowGroups":
        """Row i of the result is row indices[i]: each group keeps the new rows that come from its own."""
        where = {}
        for gi, (rows, _) in enumerate(self.groups):
            for p, r in enumerate(rows.tolist()):
                where[r] = (gi, p)
        picked = [where[j] for j in indices.tolist()]
        groups = []
        for gi, (rows, cache) in enumerate(self.groups):
            new_rows = [i for i, (gj, _) in enumerate(picked) if gj == gi]
            if new_rows:
                pos = torch.tensor([picked[i][1] for i in new_rows], device=rows.device)
                groups.append((torch.tensor(new_rows, device=rows.device), cache.index_rows(pos)))
        return RowGroups(groups)

    def run(self, block: "Block", x: torch.Tensor) -> tuple[torch.Tensor, AuxLoss]:
        """block(x) group by group; the output's rows in batch order (aux: the rows-weighted mean)."""
        y, aux = None, None
        for rows, cache in self.groups:
            out, a = split_aux(block(x[rows], cache=cache))
            if y is None:
                y = out.new_empty(x.shape[0], *out.shape[1:])
            y[rows] = out
            if a is not None:
                a = a * (len(rows) / x.shape[0])
                aux = a if aux is None else aux + a
        return y, aux


def left_padded_cat(tensors: Sequence[torch.Tensor], value=0, first: int = 0) -> torch.Tensor:
    """[1, n_i, ...] tensors -> [batch, max n_i, ...], each row right-aligned after `value` padding (the
    left-padding merge of caches that grow along time: K/V, flags, scores). With `first` = 1 a row's first
    entry stays in front of its padding (selective attention's first key, which its op recognises by
    index 0)."""
    n = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = t.new_full((1, n - t.shape[1], *t.shape[2:]), value)
        out.append(torch.cat([t[:, :first], pad, t[:, first:]], 1))
    return torch.cat(out)


class Block(nn.Module, metaclass=abc.ABCMeta):
    """A sequence mixer [batch, length, d_model] -> [batch, length, d_model] at any layer of a ZooLM.

    Construction: `cls(d_model, cfg, layer_idx, kernels=None)`; `cfg` is the family's config dataclass
    (the recipe's fields), `kernels` the model's op -> implementation mapping (`model.kernels`, passed
    by the block to its ops as `impl=`; empty: each op chooses, see zoo.ops.dispatch).

    Capabilities the layer stack checks before it runs (class attributes):
    - `supports_seq_idx`: forward takes `seq_idx` (packed documents, each token sees its own document);
    - `supports_cp`: forward takes a context-parallel handle `cp`. A block without a cp path keeps the
      default False and ZooLM refuses cp naming the block, rather than running it wrong.
    - `passthrough`: the block adds nothing (no mixer); the layer skips its norm.
    """

    supports_seq_idx: ClassVar[bool] = False
    supports_cp: ClassVar[bool] = False
    # True for a layer without a mixer (the `none` block: forward returns zeros): the layer then has no mixer
    # norm either, and is its feed-forward alone (Nemotron-H's MLP layers)
    passthrough: ClassVar[bool] = False

    def __init__(self, d_model: int, cfg, layer_idx: int, kernels: Optional[Mapping[str, str]] = None):
        super().__init__()
        self.d_model, self.cfg, self.layer_idx = d_model, cfg, layer_idx
        self.kernels = dict(kernels or {})

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, *, cache: Optional[BlockCache] = None, cp=None,
                seq_idx: Optional[torch.Tensor] = None) -> BlockOutput:
        """x [batch, length, d_model] -> the output of the same shape, or (output, aux_loss) for a block
        with an auxiliary loss (the model adds the layers' aux losses into `ZooOutput.aux_loss`).

        - cache (from `init_cache`): x continues the sequence the cache has seen, and the cache is
          updated in place. The whole sequence at once, any split of it into chunks through one cache,
          and token by token give the same output (within float tolerance).
        - cp (`zoo.distributed.ContextParallel`): x is this rank's shard; the output is the matching
          shard of the single-process output (gradients: see zoo.distributed). Not with a cache.
        - seq_idx [batch, length] int: packed documents (`supports_seq_idx`); not with cache or cp.
        """

    @abc.abstractmethod
    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> BlockCache:
        """An empty cache (no token seen) for `batch_size` rows."""

    @abc.abstractmethod
    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        """Bytes of inference state after `seq_len` tokens (K/V, window, SSM and conv state, memory):
        equal to `init_cache(batch_size, dtype=dtype)`'s `nbytes()` after those tokens."""

    # -- hooks, with defaults -----------------------------------------------------------------------

    def merge_left_padded(self, caches: Sequence[BlockCache], row_start: torch.Tensor, length: int) -> BlockCache:
        """One cache for a left-padded batch from its rows' caches.

        caches[r]: row r's cache after its own tokens alone (batch 1, from position 0); row_start [batch]:
        where each row's tokens begin on the shared timeline of `length` positions (its padding before).
        The result continues every row on that timeline; decoding through it must give each row exactly
        what it gives alone. Default: `RowGroups`, one group per row, exact for any block but one forward
        call per row. Blocks whose state has no notion of position return `type(caches[0]).stack(caches)`;
        blocks with positions merge with `left_padded_cat` and read `row_start` in forward."""
        device = row_start.device
        return RowGroups([(torch.tensor([r], device=device), c) for r, c in enumerate(caches)])

    def init_left_padded_cache(self, row_start: torch.Tensor, device=None,
                               dtype=torch.float32) -> Optional[BlockCache]:
        """An empty cache through which forward can prefill a left-padded batch at once, or None.

        row_start [batch]: where each row's own tokens begin (its padding before). A block that returns a
        cache here promises that forward, given the padded batch through it, gives each row at its own
        positions exactly what the row alone gives, whatever the padding holds, and leaves a cache that
        decodes on as `merge_left_padded`'s would. Default None: zoo.hf then prefills row by row and merges
        with `merge_left_padded` (exact for any block). The attention blocks mask the padding keys."""
        return None

    def reorder_cache(self, cache: BlockCache, indices: torch.Tensor) -> BlockCache:
        """The cache whose row i is row indices[i] of `cache` (beam search). Default: `cache.index_rows`."""
        return cache.index_rows(indices)

    # -- what the layer stack calls ---------------------------------------------------------------

    def run(self, x: torch.Tensor, *, cache: Optional[BlockCache] = None, cp=None,
            seq_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, AuxLoss]:
        """forward, its result as (output, aux_loss); a `RowGroups` cache runs group by group."""
        if isinstance(cache, RowGroups):
            return cache.run(self, x)
        return split_aux(self(x, cache=cache, cp=cp, seq_idx=seq_idx))
