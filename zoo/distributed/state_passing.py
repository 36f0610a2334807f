"""Deprecated: Mamba's context-parallel path (conv halo, then state passing) moved to its family's folder,
zoo.blocks.mamba.cp. This module re-exports it, with a DeprecationWarning, for one release."""
from zoo.deprecation import warn_moved

warn_moved(__name__, "zoo.blocks.mamba.cp")

from zoo.blocks.mamba.cp import conv_cp, incoming_states, mamba2_cp, mamba_cp  # noqa: E402

__all__ = ["conv_cp", "incoming_states", "mamba_cp", "mamba2_cp"]
