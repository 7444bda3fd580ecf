import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so a failure can be replayed (W4A8_SEED=... to pin it)."""
    value = int(os.environ.get("W4A8_SEED", torch.seed() % (2**31)))
    torch.manual_seed(value)
    print(f"seed={value}")
    return value
