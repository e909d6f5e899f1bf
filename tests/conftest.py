"""Shared test set-up: the `gpu` marker skips itself where no CUDA GPU is visible."""

import pytest

from lib.engine.gpu import gpu_available


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible (GPU tests run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
