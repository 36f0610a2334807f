import pytest

from tests.distributed.launcher import PoolCache


@pytest.fixture(scope="session")
def ranks():
    """`ranks.run(W, fn, *args)`: fn(*args) on W gloo processes (kept alive across tests), per-rank results."""
    cache = PoolCache()
    yield cache
    cache.close()
