import os

import pytest
import torch

import attention_proto  # noqa: F401  - sets TRITON_INTERPRET before any kernel module is imported

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
