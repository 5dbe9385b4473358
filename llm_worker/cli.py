"""``mmcache-llm serve --role prefill|decode|both --model tiny-llava --cache unix:///tmp/mmcache.sock``"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from encoder_worker.media import MediaLimits

ROLES = ("prefill", "decode", "both")


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from llm_worker.service import LLMServeConfig, create_app

    config = LLMServeConfig(
        role=args.role, cache_url=args.cache, model=args.model, data_dir=args.data_dir, host=args.host,
        port=args.port, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
        cache_token=args.cache_token or os.environ.get("MMCACHE_TOKEN"),
        media=MediaLimits(allowed_dirs=tuple(args.allowed_dir), allow_http=not args.no_http))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ready = f"mmcache-llm ready: http://{config.host}:{config.port}"
    # NOTE: handler_cancellation: a client that leaves frees its decode-batch row at once.
    web.run_app(create_app(config), host=config.host, port=config.port, handler_cancellation=True,
                print=lambda _msg: print(ready, flush=True), shutdown_timeout=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcache-llm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a prefill, decode or aggregated (both) LLM worker")
    s.add_argument("--role", required=True, choices=ROLES,
                   help="prefill: POST /v1/prefill; decode: POST /v1/decode; both: POST /v1/generate (no cache)")
    s.add_argument("--model", default="tiny-llava", help="tiny-llava or a local Hugging Face directory")
    s.add_argument("--cache", help="the sidecar: unix:///path.sock or http://host:port (prefill and decode)")
    s.add_argument("--data-dir", default="./mmcache-data", help="where built-in models are generated")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8472)
    s.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when a GPU is visible)")
    s.add_argument("--dtype", help="bfloat16, float16, float32 (default: float32 on the CPU, the checkpoint's on GPU)")
    s.add_argument("--max-batch", type=int, default=64, help="most requests per decode step")
    s.add_argument("--allowed-dir", action="append", default=[],
                   help="role both: allow file:// images under this dir (repeatable)")
    s.add_argument("--no-http", action="store_true", help="role both: refuse http(s):// image URLs")
    s.add_argument("--cache-token", help="bearer token of the sidecar (or MMCACHE_TOKEN)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=_serve)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        print(f"mmcache-llm {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
