"""A stand-in encoder worker in its own process, for tests that kill one (``SIGKILL``) mid-encode:
``python tests/encoder_proc.py CACHE_URL CLAIM_TTL_S ENCODE_S`` serves ``POST /v1/encode`` with a
model that takes ENCODE_S seconds per batch, and prints ``ready PORT`` once it listens."""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aiohttp import web  # noqa: E402

from encoder_worker.app import create_app  # noqa: E402
from encoder_worker.config import EncoderServeConfig  # noqa: E402
from test_encoder_service import CountingEncoder  # noqa: E402


class SlowEncoder(CountingEncoder):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def encode(self, images):
        time.sleep(self.seconds)
        return super().encode(images)


async def main(cache_url: str, ttl_s: float, encode_s: float) -> None:
    config = EncoderServeConfig(cache_url=cache_url, max_batch=8, max_wait_ms=5, claim_ttl_s=ttl_s)
    runner = web.AppRunner(create_app(config, encoder=SlowEncoder(encode_s)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"ready {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
