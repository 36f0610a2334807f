"""zoo: interchangeable long-context sequence blocks composed into language models by YAML recipes."""
import zoo.blocks  # noqa: F401  (registers the built-in blocks)
from zoo.config import Recipe, RecipeError, load_recipe
from zoo.model import ZooCache, ZooLM, ZooOutput, build_model
from zoo.registry import get_block, list_blocks, register_block
from zoo.train.checkpoint import load_checkpoint

__all__ = ["Recipe", "RecipeError", "ZooCache", "ZooLM", "ZooOutput", "build_model", "get_block",
           "list_blocks", "load_checkpoint", "load_recipe", "register_block"]
__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """`zoo.hf` registers model_type "zoo" with transformers' AutoConfig / AutoModelForCausalLM. Importing
    transformers' model classes takes ~3 s, longer than the rest of `import zoo`, so zoo.hf is imported
    when transformers is: at once if it already is, otherwise right after its own import (a one-shot
    import hook), so `import zoo; AutoModelForCausalLM.from_pretrained(dir)` works in either order."""
    import sys

    if "transformers" in sys.modules:
        _import_hf()
        return
    import importlib.abc
    import importlib.util

    class _AfterTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _import_hf()

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterTransformers())


def _import_hf() -> None:
    try:
        import zoo.hf  # noqa: F401  (registers on import)
    except Exception as err:  # a broken transformers install must not break `import transformers`
        import warnings

        warnings.warn(f"zoo: could not register with transformers' Auto classes ({type(err).__name__}: {err})")


_register_with_transformers()
