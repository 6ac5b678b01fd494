import pytest

from tests.patch import tiny


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """family -> directory of a saved tiny random model (built lazily, once)."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = family + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
            cache[key] = tiny.save_random(family, root / name, **overrides)
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _one_thread():
    # The models are tiny: a second thread buys nothing and, on the shared 2-core CI
    # machine, oversubscription makes runs several times slower.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
