import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """CPU always; CUDA as a parameter marked `cuda`, skipped where no GPU is present."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
