"""zoo: interchangeable long-context sequence blocks composed into language models by YAML recipes."""
from zoo.config import Recipe, RecipeError, load_recipe
from zoo.model import ZooCache, ZooLM, ZooOutput, build_model
from zoo.registry import get_block, list_blocks, register_block
from zoo.train.checkpoint import load_checkpoint

__all__ = ["Recipe", "RecipeError", "ZooCache", "ZooLM", "ZooOutput", "build_model", "get_block",
           "list_blocks", "load_checkpoint", "load_recipe", "register_block"]
__version__ = "0.1.0"
