"""One registry for every sequence mixer ("block"), in the spirit of timm's model registry.

A block module registers itself with a decorator; recipes name blocks by string. A miss lists what
exists and suggests the closest name, so a typo in a recipe is a one-line fix. The built-in blocks register
when `zoo` is imported (zoo/__init__.py imports zoo.blocks): the registry imports no block, so that blocks,
which import it, sit above it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, is_dataclass

_BLOCKS: dict[str, "BlockEntry"] = {}


@dataclass(frozen=True)
class BlockEntry:
    name: str
    cls: type
    config: type  # dataclass holding the block's recipe fields


def register_block(name: str, config: type):
    """Class decorator: `@register_block("mamba2", config=Mamba2Config)`."""
    if not is_dataclass(config):
        raise TypeError(f"register_block({name!r}): config must be a dataclass, got {config!r}")
    if not callable(getattr(config, "width_step", None)):
        # zoo.sizing scales recipes by d_model: each block says which widths it builds at
        raise TypeError(f"register_block({name!r}): {config.__qualname__} needs a width_step() method (the multiple "
                        "of model.d_model the block builds at; 1 for any)")

    def deco(cls):
        if name in _BLOCKS and _BLOCKS[name].cls is not cls:
            raise ValueError(f"block {name!r} is already registered by {_BLOCKS[name].cls.__qualname__}")
        _BLOCKS[name] = BlockEntry(name, cls, config)
        return cls

    return deco


def list_blocks() -> list[str]:
    return sorted(_BLOCKS)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {kind} {name!r} ({hint}known: {', '.join(known)})"


class UnknownBlockError(KeyError):
    def __str__(self):  # KeyError would show the message quoted as a repr
        return str(self.args[0])


def get_block(name: str) -> BlockEntry:
    if name not in _BLOCKS:
        raise UnknownBlockError(unknown_name_message("block", name, sorted(_BLOCKS)))
    return _BLOCKS[name]
