"""Deprecated: the windowed blocks' context-parallel paths moved to their families' folders (swa:
zoo.blocks.attention.cp, taipan: zoo.blocks.taipan.cp). This module re-exports them, with a
DeprecationWarning, for one release."""
from zoo.deprecation import warn_moved

warn_moved(__name__, "zoo.blocks.attention.cp (swa) and zoo.blocks.taipan.cp (taipan)")

from zoo.blocks.attention.cp import sliding_window_attention_cp, swa_cp  # noqa: E402
from zoo.blocks.taipan.cp import taipan_cp as _taipan_cp  # noqa: E402

__all__ = ["sliding_window_attention_cp", "swa_cp", "taipan_cp"]


def taipan_cp(block, x, cp, attend=None, cache=None):
    """The old signature; `attend` is ignored (the path imports its op, zoo.ops.taipan, itself)."""
    return _taipan_cp(block, x, cp, cache)
