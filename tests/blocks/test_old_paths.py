"""Import paths from before the block families moved into their folders (issue 17) keep working for one
release, with a DeprecationWarning, and give the objects at their new homes."""
import importlib
import sys

import pytest

MOVED_MODULES = [   # old module, a name, its new module
    ("zoo.distributed.state_passing", "mamba2_cp", "zoo.blocks.mamba.cp"),
    ("zoo.distributed.state_passing", "incoming_states", "zoo.blocks.mamba.cp"),
    ("zoo.distributed.infini", "infini_cp", "zoo.blocks.infini.cp"),
    ("zoo.distributed.selective", "selective_attention_cp", "zoo.blocks.selective.cp"),
    ("zoo.distributed.window", "swa_cp", "zoo.blocks.attention.cp"),
    ("zoo.distributed.window", "sliding_window_attention_cp", "zoo.blocks.attention.cp"),
]
MOVED_NAMES = [     # a package that stays, a name that left it, its new module
    ("zoo.blocks.taipan", "selective_window_attention", "zoo.ops.taipan"),
    ("zoo.blocks.taipan", "selective_window_attention_ref", "zoo.ops.taipan"),
]


@pytest.mark.parametrize("old, name, new", MOVED_MODULES)
def test_moved_module_warns_and_reexports(old, name, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import from .*{new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old, name, new", MOVED_NAMES)
def test_moved_name_warns_and_reexports(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} is deprecated: import it from {new}"):
        got = getattr(module, name)
    assert got is getattr(importlib.import_module(new), name)


def test_old_taipan_cp_signature():
    sys.modules.pop("zoo.distributed.window", None)
    with pytest.warns(DeprecationWarning):
        from zoo.distributed.window import taipan_cp
    import inspect
    assert list(inspect.signature(taipan_cp).parameters) == ["block", "x", "cp", "attend", "cache"]


@pytest.mark.parametrize("package, names", [
    ("zoo.blocks.attention", ["AttnConfig", "CausalSelfAttention", "SlidingWindowAttention", "AttentionCache"]),
    ("zoo.blocks.mamba", ["MambaBlock", "Mamba2Block", "MambaConfig", "Mamba2Config", "MambaCache"]),
    ("zoo.blocks.infini", ["InfiniAttention", "InfiniConfig", "InfiniCache"]),
    ("zoo.blocks.selective", ["SelectiveAttention", "SelectiveConfig", "SelectiveCache"]),
    ("zoo.blocks.taipan", ["TaipanBlock", "TaipanConfig", "TaipanCache"]),
])
def test_family_packages_export_their_blocks(package, names):
    module = importlib.import_module(package)
    assert all(hasattr(module, n) for n in names)
