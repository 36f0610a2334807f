"""Deprecated: selective attention's context-parallel path moved to its family's folder,
zoo.blocks.selective.cp. This module re-exports it, with a DeprecationWarning, for one release."""
from zoo.deprecation import warn_moved

warn_moved(__name__, "zoo.blocks.selective.cp")

from zoo.blocks.selective.cp import selection_column_sums, selective_attention_cp, selective_cp  # noqa: E402

__all__ = ["selective_cp", "selective_attention_cp", "selection_column_sums"]
