"""Shared pytest hooks: tests marked ``gpu`` are skipped on machines without a CUDA GPU; torch
uses one CPU thread (the tiny test models gain nothing from more, and on a loaded 2-core
machine a second intra-op thread made each small matmul wait milliseconds); ``model_dir`` is
tiny-llava, built once per run; ``wait_until`` is the one way a test waits for something the
system does in its own time (never a fixed sleep); ``sidecars`` starts ``mmcache serve``
processes and stops them after the test."""

from __future__ import annotations

import time

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


def wait_until(predicate, timeout: float = 30.0, what: str = "the condition"):
    """Poll ``predicate`` (backing off from 1 ms to 50 ms) until it returns something true, and
    return that; ``AssertionError`` naming ``what`` after ``timeout`` seconds. Timeouts are
    generous on purpose: a loaded machine is slow, and a passing test never waits them out."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


@pytest.fixture
def sidecars(tmp_path):
    """A factory of ``mmcache serve`` processes (``sidecars(*flags)``, each with a fresh data dir
    unless the flags name one, on a free port), all stopped, and checked to exit cleanly, after
    the test."""
    from sidecar import SidecarProcess

    started: list = []

    def start(*flags: str, env: dict | None = None):
        args = list(flags)
        if "--data-dir" not in args:
            args += ["--data-dir", str(tmp_path / f"sidecar-{len(started)}")]
        sc = SidecarProcess(*args, env=env).start()
        started.append(sc)
        return sc

    yield start
    for sc in started:
        if sc.proc.poll() is None:
            assert sc.stop() == 0, "".join(sc.output[-30:])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NOTE: torch.cuda.is_available() counts devices without creating a CUDA context.
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
