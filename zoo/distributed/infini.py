"""Deprecated: infini's context-parallel path moved to its family's folder, zoo.blocks.infini.cp. This
module re-exports it, with a DeprecationWarning, for one release."""
from zoo.deprecation import warn_moved

warn_moved(__name__, "zoo.blocks.infini.cp")

from zoo.blocks.infini.cp import infini_cp  # noqa: E402

__all__ = ["infini_cp"]
