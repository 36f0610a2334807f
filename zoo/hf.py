"""transformers integration: `ZooConfig`, `ZooForCausalLM` (save_pretrained / from_pretrained / generate).

ZooLM stays the model; `ZooForCausalLM` is a thin adapter that holds one (`.model`) and speaks
transformers' conventions: `forward(input_ids, attention_mask, past_key_values | cache, labels)` returning a
`CausalLMOutputWithPast`, a `Cache` subclass around the blocks' own caches, Auto* registration
(done by `import zoo` once transformers is imported: see `zoo/__init__.py`).

    model = ZooForCausalLM.from_zoo(zoo_lm)            # or AutoModelForCausalLM.from_pretrained(dir)
    model.save_pretrained(dir)                         # model.safetensors + config.json + recipe.yaml
    model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=True, top_p=0.9)

The directory's config.json holds the resolved recipe (`ZooConfig.recipe`); recipe.yaml is the same
recipe for zoo's own tools (`zoo.build_model("dir/recipe.yaml")`). Loading checks the weights file
against the model the config builds before transformers touches it, so a directory mixing two recipes,
or a damaged safetensors file, fails with an error naming the file instead of loading random weights.

Generation. `generate` owns sampling, top-k/top-p, repetition penalty, beam reordering and stopping;
this module only has to produce next-token logits and carry the cache. Each block keeps its own typed
cache (`zoo.blocks.base.BlockCache`) inside `ZooGenerationCache`, which transformers sees as a `Cache`;
beam search reorders it through each block's `reorder_cache` hook.

Left padding (batch > 1 with prompts of different lengths; the attention mask is zeros then ones in
every row) must leave each row generating exactly what it generates alone. One mechanism, generic over
blocks:

  * When every layer's block can prefill the padded batch at once (`Block.init_left_padded_cache` gives
    a cache: the attention blocks, which rotate each row at its own positions and mask its padding keys;
    feed-forward layers are per token), the batch runs as one forward through those caches.
  * Otherwise prefill runs row by row: each row's real tokens alone, batch 1, from an empty cache. Every
    block therefore sees exactly the sequence it would see alone (no padding reaches an SSM state, a conv
    window, an infini segment or selective attention's first-token column; RoPE positions start at 0),
    with each block's fast path. Each layer's per-row caches are then merged by its block's
    `merge_left_padded` hook into one cache whose rows all end at the same position of a shared timeline
    (the padded prompt length L); row r's own tokens start at `row_start[r]` = L - (its length). How each
    family merges (stacked states, left-padded K/V read with `row_start`, groups of rows by segment
    phase) is written beside the family; the default, for a block that defines no merge, decodes each row
    as its own group (`RowGroups`), exact for any block.
  * Either way the logits at padding positions are zero, and decoding then runs through ZooLM's own
    layer loop.
Without padding (batch 1, or equal lengths) everything runs batched through ZooLM with one ZooCache.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from zoo.blocks.base import RowGroups
from zoo.config import Recipe, load_recipe
from zoo.model import ZooCache, ZooLM

__all__ = ["ZooConfig", "ZooForCausalLM", "ZooGenerationCache", "ZooLoadError", "output_cache",
           "register"]


class ZooLoadError(ValueError):
    pass


class ZooConfig(PretrainedConfig):
    """The resolved recipe (`Recipe.to_dict()`), plus the few fields transformers' tools read."""

    model_type = "zoo"
    recipe: Optional[dict] = None
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.recipe is not None:
            recipe = load_recipe(self.recipe)      # RecipeError names the field
            self.recipe = recipe.to_dict()
            m = recipe.model
            self.vocab_size, self.hidden_size, self.num_hidden_layers = m.vocab_size, m.d_model, m.n_layers
            self.tie_word_embeddings = m.tie_embeddings
        super().__post_init__(**kwargs)

    @classmethod
    def from_recipe(cls, recipe: Recipe, **kwargs) -> "ZooConfig":
        return cls(recipe=recipe.to_dict(), **kwargs)


class ZooGenerationCache(Cache):
    """The blocks' own caches (a `zoo.model.ZooCache`) as a transformers `Cache`.

    `zoo.layers[i]` is layer i's block cache (a `RowGroups` for a layer decoded in groups of rows).
    `row_start` [batch] (None without padding): where each row's own tokens begin on the shared
    timeline. `seen` counts the timeline's positions, padding included, as transformers'
    `get_seq_length` expects. `blocks`: the model's blocks, whose `reorder_cache` hooks beam search
    calls (None: each cache's own `index_rows`, the hook's default)."""

    is_compileable = False

    def __init__(self, zoo_cache: ZooCache, row_start: Optional[torch.Tensor] = None, blocks=None):
        super().__init__(layers=[])
        self.zoo = zoo_cache
        self.row_start = row_start
        self.blocks = blocks

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.zoo.seen

    @property
    def is_croppable(self) -> bool:
        return False   # recurrent states cannot be rolled back

    @property
    def is_initialized(self) -> bool:
        return self.zoo.seen > 0

    @property
    def batch_size(self) -> int:
        return self.zoo.layers[0].batch_size if self.zoo.layers else 0

    @property
    def row_cached(self) -> List[bool]:
        """Per layer: whether its rows are decoded in groups (a `RowGroups`, or one among a parallel block's
        branches or a shared-block layer's mixer and attention caches)."""
        return [_row_grouped(c) for c in self.zoo.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the result is row beam_idx[i] of the cache."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        blocks = self.blocks or [None] * len(self.zoo.layers)
        self.zoo.layers = [c.index_rows(indices) if block is None else block.reorder_cache(c, indices)
                           for block, c in zip(blocks, self.zoo.layers)]
        if self.row_start is not None:
            self.row_start = self.row_start[indices.to(self.row_start.device)]

    def batch_repeat_interleave(self, repeats: int):
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("ZooGenerationCache: recurrent block states cannot be cropped")

    def reset(self):
        raise NotImplementedError("ZooGenerationCache: build a new cache instead (model.init_cache)")

    def nbytes(self) -> int:
        """Bytes held by the block caches' tensors (what `state_bytes` predicts, summed over layers)."""
        return self.zoo.nbytes()

    def __repr__(self):
        return f"ZooGenerationCache(seen={self.zoo.seen}, layers={len(self.zoo.layers)}, bytes={self.nbytes()})"


def _row_grouped(cache) -> bool:
    return isinstance(cache, RowGroups) or any(_row_grouped(c) for c in getattr(cache, "branches", ()))


class ZooForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ZooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True    # no assisted generation: recurrent states cannot be rolled back
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}   # used when tie_word_embeddings

    def __init__(self, config: ZooConfig, model: Optional[ZooLM] = None):
        super().__init__(config)
        if config.recipe is None:
            raise ZooLoadError("ZooConfig.recipe: missing (a resolved zoo recipe, Recipe.to_dict())")
        self.model = model if model is not None else ZooLM(load_recipe(config.recipe))
        self.post_init()

    @classmethod
    def from_zoo(cls, model: ZooLM) -> "ZooForCausalLM":
        """Wrap an existing ZooLM (its weights are shared, not copied)."""
        p = next(model.parameters())
        hf = cls(ZooConfig.from_recipe(model.recipe), model=model)
        return hf.to(device=p.device, dtype=p.dtype)

    def _init_weights(self, module):
        pass   # ZooLM initialises itself (reset_parameters); transformers' default would undo Mamba's init

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # forward builds a ZooGenerationCache; a DynamicCache has no place for SSM states

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def init_cache(self, batch_size: int) -> ZooGenerationCache:
        blocks = list(self.model.layers)   # each layer's reorder_cache: its mixer's (and a shared block's)
        return ZooGenerationCache(self.model.init_cache(batch_size), blocks=blocks)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[ZooGenerationCache] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                cache: Optional[ZooGenerationCache] = None, **kwargs):
        # transformers >= 5.24 hands the generation cache over as `cache`, earlier releases as
        # `past_key_values`: dropping either one silently restarts every decoding step from an empty cache
        if cache is not None:
            if past_key_values is not None and past_key_values is not cache:
                raise ValueError("cache, past_key_values: two different caches given; pass one")
            past_key_values = cache
        for name in ("inputs_embeds", "position_ids"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: not supported by ZooForCausalLM (positions come from each block's cache "
                                 f"and the attention mask)")
        if input_ids is None:
            raise ValueError("input_ids: required")
        if past_key_values is not None and not isinstance(past_key_values, ZooGenerationCache):
            raise ValueError(f"past_key_values: expected a ZooGenerationCache (model.init_cache), "
                             f"got {type(past_key_values).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is None and use_cache and labels is None:
            past_key_values = self.init_cache(input_ids.shape[0])
        pads = _left_padding(attention_mask, input_ids, past_key_values)
        if pads is not None and labels is not None:
            raise ValueError("labels: training with padding is not supported here; pass unpadded sequences")
        if pads is not None and (past_key_values is None or past_key_values.zoo.seen == 0):
            # without use_cache too: a padded row's logits are those of the row alone
            past_key_values = past_key_values or self.init_cache(input_ids.shape[0])
            logits = _prefill_left_padded(self.model, input_ids, pads, past_key_values)
            loss = aux = None
        else:
            out = self.model(input_ids, labels=labels, cache=None if past_key_values is None else past_key_values.zoo)
            logits, loss, aux = out.logits, out.loss, out.aux_loss
        if loss is not None and aux is not None:
            loss = loss + aux
        return _causal_lm_output(loss, logits, past_key_values if use_cache else None)

    # -- save / load ---------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory, "recipe.yaml").write_text(self.model.recipe.to_yaml())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            config = kwargs.get("config")
            if not isinstance(config, ZooConfig):
                config = ZooConfig.from_pretrained(path)
            check_weights(path, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


# The output's cache field: `cache` from transformers 5.24 on (`past_key_values` is then a deprecated alias
# that warns), `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _causal_lm_output(loss, logits, cache) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def output_cache(output) -> Optional[ZooGenerationCache]:
    """The cache of a `ZooForCausalLM` output or of `generate(..., return_dict_in_generate=True)`, under
    whichever name this transformers uses."""
    names = {f.name for f in dataclasses.fields(output)}
    return getattr(output, "cache" if "cache" in names else "past_key_values")


def check_weights(directory, config: ZooConfig) -> None:
    """Raise ZooLoadError naming the file when `directory`'s safetensors do not fit the model `config`
    builds (another recipe's weights) or cannot be read (truncated, corrupt)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ZooLoadError(f"{directory}: no *.safetensors weights file")
    with torch.device("meta"):
        expected = {f"model.{k}": tuple(v.shape) for k, v in ZooLM(load_recipe(config.recipe)).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("model.lm_head.weight", None)
    found = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    found[name] = (tuple(sf.get_slice(name).get_shape()), f)
        except (SafetensorError, OSError, ValueError) as err:
            raise ZooLoadError(f"{f}: unreadable or corrupt safetensors file ({err})") from None
    for name, shape in expected.items():
        if name not in found:
            raise ZooLoadError(f"{directory}: weights for another model: {name} (recipe "
                               f"{config.recipe.get('name')!r} in config.json) is missing from "
                               f"{', '.join(f.name for f in files)}")
        if found[name][0] != shape:
            raise ZooLoadError(f"{found[name][1]}: weights for another model: {name} has shape {found[name][0]}, "
                               f"the recipe {config.recipe.get('name')!r} in config.json builds {shape}")
    extra = sorted(set(found) - set(expected) - {"model.lm_head.weight"})
    if extra:
        raise ZooLoadError(f"{found[extra[0]][1]}: weights for another model: {extra[0]} (and {len(extra) - 1} more) "
                           f"has no place in recipe {config.recipe.get('name')!r}")
    # the header parsed; a truncated data section shows only when a tensor is read
    for f in files:
        size, need = f.stat().st_size, _safetensors_data_end(f)
        if size < need:
            raise ZooLoadError(f"{f}: truncated safetensors file ({size} bytes, its header describes {need})")


def _safetensors_data_end(f: Path) -> int:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


# -- left padding --------------------------------------------------------------------------------------

def _left_padding(attention_mask, input_ids, cache: Optional[ZooGenerationCache]) -> Optional[torch.Tensor]:
    """Per-row count of leading padding positions, None when there is none; checks the mask is left
    padding (zeros then ones) and agrees with the padding the cache was built with."""
    if attention_mask is None:
        if cache is not None and cache.row_start is not None:
            raise ValueError("attention_mask: required to continue a left-padded batch")
        return None
    seen = 0 if cache is None else cache.zoo.seen
    b, t = input_ids.shape
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (b, seen + t):
        raise ValueError(f"attention_mask: expected shape [batch, cached + new tokens] = [{b}, {seen + t}], "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.bool)
    pads = (~mask).long().cumprod(1).sum(1)                 # leading zeros per row
    holes = (~mask).sum(1) != pads
    if holes.any():
        r = int(holes.nonzero()[0])
        raise ValueError(f"attention_mask: row {r} has a 0 after a 1; zoo generation supports left padding only "
                         f"(zeros then ones in every row)")
    if (pads >= seen + t).any():
        raise ValueError(f"attention_mask: row {int((pads >= seen + t).nonzero()[0])} is all padding")
    have = cache.row_start if cache is not None and cache.row_start is not None else None
    if seen > 0 and not torch.equal(pads.cpu(), (have if have is not None else torch.zeros_like(pads)).cpu()):
        raise ValueError("attention_mask: its padding differs from the padding the cache was prefilled with")
    return pads if pads.any() else None


@torch.no_grad()
def _prefill_left_padded(model: ZooLM, input_ids, pads, cache: ZooGenerationCache):
    """The padded batch in one forward where every block takes it (`Block.init_left_padded_cache`), row by
    row otherwise (`_prefill_rows`); the logits at padding positions are zero (module docstring)."""
    row_start = pads.to(input_ids.device)
    p = next(model.parameters())
    layers = [layer.init_left_padded_cache(row_start, p.device, p.dtype) for layer in model.layers]
    if any(c is None for c in layers):
        return _prefill_rows(model, input_ids, pads, cache)
    b, length = input_ids.shape
    logits = model(input_ids, cache=ZooCache(layers)).logits
    padding = torch.arange(length, device=logits.device)[None] < row_start[:, None]
    logits = logits.masked_fill(padding[..., None], 0.0)
    cache.zoo.layers, cache.zoo.seen, cache.row_start = layers, length, row_start
    return logits


@torch.no_grad()
def _prefill_rows(model: ZooLM, input_ids, pads, cache: ZooGenerationCache):
    """Run each row's real tokens alone, then merge each layer's row caches with its block's
    `merge_left_padded` hook (module docstring)."""
    b, length = input_ids.shape
    logits, rows = None, []
    for r in range(b):
        row_cache = model.init_cache(1)
        out = model(input_ids[r:r + 1, int(pads[r]):], cache=row_cache)
        if logits is None:
            logits = out.logits.new_zeros(b, length, out.logits.shape[-1])
        logits[r, int(pads[r]):] = out.logits[0]
        rows.append(row_cache)
    row_start = pads.to(input_ids.device)
    layers = [layer.merge_left_padded([rc.layers[i] for rc in rows], row_start, length)
              for i, layer in enumerate(model.layers)]
    cache.zoo.layers, cache.zoo.seen, cache.row_start = layers, length, row_start
    return logits


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type "zoo" (idempotent)."""
    AutoConfig.register("zoo", ZooConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)


register()
