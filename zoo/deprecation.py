"""Old import paths kept for one release: a module that moved warns (DeprecationWarning) and re-exports."""
from __future__ import annotations

import importlib
import warnings


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that module `old` is now `new` (call at the top of the shim module `old`)."""
    warnings.warn(f"{old} is deprecated: import from {new} (the old path goes in the next release)",
                  DeprecationWarning, stacklevel=stacklevel)


def moved_names(old: str, names: dict[str, str]):
    """A module-level `__getattr__` for names that left module `old`: `names` maps each to its new module.
    Imported lazily on first use, with a DeprecationWarning."""
    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} is deprecated: import it from {names[name]} (the old path goes in the next "
                      f"release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
