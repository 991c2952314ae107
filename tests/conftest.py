"""Shared fixtures: synthetic FLAME-format assets (written once per test session)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_flame_paths(tmp_path_factory):
    """A small synthetic FLAME model + landmark embedding + masks in the real file formats."""
    from ofer.world.head import write_synthetic_flame

    return write_synthetic_flame(tmp_path_factory.mktemp("flame"), n_vertices=600, seed=0)


@pytest.fixture(scope="session")
def synthetic_flame(synthetic_flame_paths):
    """A FLAME layer (float64) on the synthetic assets."""
    from ofer.flame import FLAME

    return FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, dtype=torch.float64)
