"""Shared pytest hooks: tests marked ``gpu`` are skipped on machines without a CUDA GPU; torch
uses one CPU thread (the tiny test models gain nothing from more, and on a loaded 2-core
machine a second intra-op thread made each small matmul wait milliseconds); ``model_dir`` is
tiny-llava, built once per run."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """tiny-llava, built once per run and shared (``--model DIR``); a module that needs another
    model defines its own ``model_dir``."""
    import huggingface_hub

    from encoder_worker.models import ensure_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return ensure_model("tiny-llava", tmp_path_factory.mktemp("models"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NOTE: torch.cuda.is_available() counts devices without creating a CUDA context.
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
