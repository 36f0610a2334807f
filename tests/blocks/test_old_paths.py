"""The block families live in their folders (issue 17); the import paths from before the move, kept for one release
with a DeprecationWarning, are gone in 0.1.0 (issue 28: no shim imports back up the layers)."""
import importlib

import pytest

OLD_MODULES = ["zoo.deprecation", "zoo.distributed.state_passing", "zoo.distributed.infini", "zoo.distributed.selective",
               "zoo.distributed.window"]
NEW_HOMES = [("zoo.blocks.mamba.cp", "mamba2_cp"), ("zoo.blocks.infini.cp", "infini_cp"),
             ("zoo.blocks.selective.cp", "selective_attention_cp"), ("zoo.blocks.attention.cp", "swa_cp"),
             ("zoo.ops.taipan", "selective_window_attention"), ("zoo.ops.taipan", "selective_window_attention_ref")]


@pytest.mark.parametrize("old", OLD_MODULES)
def test_old_paths_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_taipan_package_no_longer_reexports_the_op():
    assert not hasattr(importlib.import_module("zoo.blocks.taipan"), "selective_window_attention")


@pytest.mark.parametrize("module, name", NEW_HOMES)
def test_new_homes(module, name):
    assert callable(getattr(importlib.import_module(module), name))


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
