"""The config of the `parallel` block: its branches, each a block config plus its output scale."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from zoo.registry import get_block, list_blocks, unknown_name_message


def _default_branches() -> list:
    return [{"type": "attn"}, {"type": "mamba2"}]


@dataclass
class ParallelConfig:
    # Each branch: {type: <block>, out_scale: <float, default 1>, ...that block's fields}. The scale is not
    # called `scale`: attention blocks already have a `scale` field (their softmax scale).
    branches: List[Dict[str, Any]] = field(default_factory=_default_branches)
    VALIDATED_APART = ("branches",)   # not a field: each branch is its own block config (_block_config)

    def __post_init__(self):
        if not isinstance(self.branches, (list, tuple)) or not self.branches:
            raise ValueError(f"branches: expected a non-empty list of block mappings, got {self.branches!r}")
        self.branches = [_normalise(i, spec) for i, spec in enumerate(self.branches)]

    def branch_configs(self) -> list:
        """[(block type, out_scale, the block's config dataclass)] per branch."""
        out = []
        for spec in self.branches:
            fields = {k: v for k, v in spec.items() if k not in ("type", "out_scale")}
            out.append((spec["type"], spec["out_scale"], _block_config(get_block(spec["type"]).config, fields, "")))
        return out

    def width_step(self) -> int:
        """The multiple of model.d_model every branch builds at."""
        return math.lcm(*(cfg.width_step() for _, _, cfg in self.branch_configs()))

    def check(self, d_model: int, seq_len: int) -> None:
        for i, (_, _, cfg) in enumerate(self.branch_configs()):
            if hasattr(cfg, "check"):
                try:
                    cfg.check(d_model=d_model, seq_len=seq_len)
                except ValueError as err:
                    raise ValueError(f"branches.{i}.{err}") from None


def _normalise(i: int, spec) -> dict:
    """The branch as a plain, fully defaulted mapping (so a saved recipe says everything it built)."""
    path = f"branches.{i}"
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with a 'type' key, got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        raise ValueError(f"{path}.type: missing (known: {', '.join(list_blocks())})")
    if kind not in list_blocks():
        raise ValueError(f"{path}.type: " + unknown_name_message("block", kind, list_blocks()))
    if "ffn" in spec:
        raise ValueError(f"{path}.ffn: a branch is a mixer; the layer's feed-forward goes on the parallel block")
    out_scale = spec.pop("out_scale", 1.0)
    if isinstance(out_scale, bool) or not isinstance(out_scale, (int, float)) or not math.isfinite(out_scale) \
            or out_scale == 0:
        raise ValueError(f"{path}.out_scale: must be a finite non-zero number, got {out_scale!r}")
    cfg = _block_config(get_block(kind).config, spec, path + ".")
    return {"type": kind, "out_scale": float(out_scale), **dataclasses.asdict(cfg)}


def _block_config(cls, fields: dict, prefix: str):
    """`cls` validated from `fields` as a recipe's block entry is (types, unknown keys, __post_init__)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), fields))
    except ConfigKeyError as err:
        allowed = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{prefix}{err.key}: unknown key (allowed: out_scale, {allowed})") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"{prefix}{err.full_key or err.key}: {(err.msg or str(err)).splitlines()[0]}") from None
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None
