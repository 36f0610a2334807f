"""Fixtures for the train tests: byte-level prepared data and a recipe file, what scripts/train.py takes."""
import pytest

import zoo

from tests.helpers import CLI_RECIPE, write_prepared


@pytest.fixture(scope="session")
def prepared_bytes(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("data") / "toy-byte")


@pytest.fixture
def cli_recipe(tmp_path):
    path = tmp_path / "tiny-cli.yaml"
    path.write_text(zoo.load_recipe(CLI_RECIPE).to_yaml())
    return path
