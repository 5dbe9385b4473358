"""Shared pytest hooks: tests marked ``gpu`` are skipped on machines without a CUDA GPU; torch
uses one CPU thread (the tiny test models gain nothing from more, and on a loaded 2-core
machine a second intra-op thread made each small matmul wait milliseconds)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NOTE: torch.cuda.is_available() counts devices without creating a CUDA context.
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
