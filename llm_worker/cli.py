"""``mmcache-llm``: the LLM workers and the router.

    mmcache-llm serve --role prefill|decode|both --model tiny-llava --cache unix:///tmp/mmcache.sock
    mmcache-llm serve --role elastic --initial-role encode|prefill|decode --cache unix:///tmp/mmcache.sock
    mmcache-llm router --encoder URL [--encoder URL] --prefill URL --decode URL --cache URL --port 8000
    mmcache-llm router --generate URL --port 8000        (the aggregated baseline behind the same API)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmcache.common.cli import HelpFormatter, add_elastic_tuning

from encoder_worker.media import MediaLimits
from encoder_worker.video import VideoSampling
from llm_worker.elastic.policy import STAGES, ElasticPolicy

ROLES = ("prefill", "decode", "both", "elastic")


def _serve(args: argparse.Namespace) -> int:
    from llm_worker.serve.app import create_app
    from llm_worker.serve.config import LLMServeConfig
    from llm_worker.elastic.app import create_app as create_elastic_app
    from mmcache.common.sizes import parse_size
    from mmcache.common.security import resolve_secret
    from mmcache.common import run_app

    config = LLMServeConfig(
        role=args.role, cache_url=args.cache, model=args.model, data_dir=args.data_dir, host=args.host,
        port=args.port, device=args.device, dtype=args.dtype, max_batch=args.max_batch, max_waiting=args.max_waiting,
        cache_token=resolve_secret(args.cache_token, args.cache_token_file, "MMCACHE_TOKEN", "cache token"),
        stack_token=os.environ.get("MMCACHE_STACK_TOKEN") or None,
        media=MediaLimits(allowed_dirs=tuple(args.allowed_dir), allow_http=not args.no_http,
                          allow_private_urls=args.allow_private_urls),
        encoder_cache_bytes=parse_size(args.encoder_cache) if args.encoder_cache else 0,
        video_sampling=VideoSampling(args.video_fps, args.video_max_frames),
        initial_role=args.initial_role, encoder_batch=args.encoder_batch, encoder_schedule=args.encoder_schedule)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # NOTE: handler_cancellation: a client that leaves frees its decode-batch row at once (and a
    # controller that gives up on a role switch puts the elastic worker back in its old role).
    app = create_elastic_app(config) if config.role == "elastic" else create_app(config)
    run_app(app, "mmcache-llm", config.host, config.port, handler_cancellation=True)
    return 0


def _router(args: argparse.Namespace) -> int:
    from llm_worker.router.nodes import NodeSpec
    from llm_worker.router.router import RouterConfig
    from llm_worker.router.app import create_app
    from mmcache.common.security import resolve_secret
    from mmcache.common import run_app

    config = RouterConfig(
        model=args.model, data_dir=args.data_dir, served_model_name=args.served_model_name,
        encoders=tuple(args.encoder), prefill=tuple(args.prefill), decode=tuple(args.decode),
        generate=tuple(args.generate), cache_url=args.cache,
        cache_token=resolve_secret(args.cache_token, args.cache_token_file, "MMCACHE_TOKEN", "cache token"),
        stack_token=os.environ.get("MMCACHE_STACK_TOKEN") or None,
        api_key=resolve_secret(args.api_key, args.api_key_file, "MMCACHE_API_KEY", "API key"),
        tenants=args.tenants, host=args.host, port=args.port,
        default_max_tokens=args.default_max_tokens, timeout_s=args.timeout, max_inflight=args.max_inflight,
        nodes=tuple(NodeSpec.parse(n) for n in args.node), routing=args.routing,
        video_fps=args.video_fps, video_max_frames=args.video_max_frames, max_video_frames=args.max_video_frames,
        elastic=args.elastic, elastic_interval_s=args.elastic_interval, elastic_high_s=args.elastic_high,
        elastic_low=args.elastic_low, elastic_cooldown_s=args.elastic_cooldown, elastic_sustain=args.elastic_sustain)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # NOTE: handler_cancellation: a client that leaves closes the decode stream, and decode drops the request.
    run_app(create_app(config), "mmcache-llm router", config.host, config.port, handler_cancellation=True)
    return 0


def _video_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--video-fps", type=float, default=2.0,
                        help=prefix + "frames sampled per second of a video whose request names no "
                        "mm_processor_kwargs.fps (default: 2)")
    parser.add_argument("--video-max-frames", type=int, default=16,
                        help=prefix + "most frames sampled from a video whose request names no "
                        "mm_processor_kwargs.max_frames (default: 16)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcache-llm", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a prefill, decode or aggregated (both) LLM worker", formatter_class=HelpFormatter)
    s.add_argument("--role", required=True, choices=ROLES,
                   help="prefill: POST /v1/prefill; decode: POST /v1/decode; both: POST /v1/generate (no cache); "
                        "elastic: holds the vision tower and the LLM, serves one of encode (POST /v1/encode), "
                        "prefill, decode at a time and switches on POST /v1/role")
    s.add_argument("--initial-role", choices=STAGES, help="role elastic: the stage it serves first")
    s.add_argument("--encoder-batch", type=int, default=8,
                   help="role elastic: most images per encoder forward while it encodes (default: 8)")
    s.add_argument("--encoder-schedule", choices=("fcfs", "sjf"), default="fcfs",
                   help="role elastic: which queued images run first while it encodes (default: fcfs)")
    s.add_argument("--model", default="tiny-llava", help="tiny-llava or a local Hugging Face directory")
    s.add_argument("--cache", help="the sidecar: unix:///path.sock or http://host:port (prefill and decode)")
    s.add_argument("--data-dir", default="./mmcache-data", help="where built-in models are generated")
    s.add_argument("--host", default="127.0.0.1", help="bind address")
    s.add_argument("--port", type=int, default=8472, help="port; 0: a free one, printed in the ready line")
    s.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when a GPU is visible)")
    s.add_argument("--dtype", help="bfloat16, float16, float32 (default: float32 on the CPU, the checkpoint's on GPU)")
    s.add_argument("--max-batch", type=int, default=64, help="most requests per decode step (default: 64)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="decode, both: most requests waiting to join the decode batch; more get 503 with "
                        "Retry-After (default: 256)")
    s.add_argument("--allowed-dir", action="append", default=[],
                   help="roles both, elastic: allow file:// images under this dir (repeatable)")
    s.add_argument("--no-http", action="store_true", help="roles both, elastic: refuse http(s):// image URLs")
    s.add_argument("--allow-private-urls", action="store_true",
                   help="roles both, elastic: fetch http(s):// images from (and follow redirects to) private, "
                        "loopback, link-local and multicast addresses too (refused by default)")
    s.add_argument("--cache-token", help="bearer token of the sidecar; visible in ps: prefer MMCACHE_TOKEN "
                   "or --cache-token-file")
    s.add_argument("--cache-token-file", metavar="PATH", help="read the sidecar's bearer token from this file")
    s.add_argument("--encoder-cache", help="role both: an in-process LRU of image embeddings this large, e.g. 2GiB")
    _video_args(s, "role both: ")
    s.add_argument("--log-level", default="info", help="debug, info, warning, error")
    s.set_defaults(fn=_serve)
    r = sub.add_parser("router", help="serve the OpenAI API in front of encoders, prefill and decode workers", formatter_class=HelpFormatter)
    r.add_argument("--encoder", action="append", default=[], help="an encoder worker URL (repeatable)")
    r.add_argument("--prefill", action="append", default=[], help="a prefill worker URL (repeatable)")
    r.add_argument("--decode", action="append", default=[], help="a decode worker URL (repeatable)")
    r.add_argument("--generate", action="append", default=[],
                   help="a both (aggregated) worker URL (repeatable); instead of the three above")
    r.add_argument("--cache", help="the sidecar, for GET /v1/stats")
    r.add_argument("--node", action="append", default=[], metavar="SPEC",
                   help="a node group, instead of --encoder/--prefill/--decode/--cache (repeatable): "
                        "name=NAME,cache=URL,encoder=URL,prefill=URL,decode=URL (encoder, prefill, decode "
                        "repeatable); each request goes to one group")
    r.add_argument("--routing", choices=("cache", "load"), default="cache",
                   help="with --node groups: to the group whose host tier holds most of a request's image "
                        "bytes, by load where none does (cache; default), or by load alone (load)")
    r.add_argument("--cache-token", help="bearer token of the sidecar; visible in ps: prefer MMCACHE_TOKEN "
                   "or --cache-token-file")
    r.add_argument("--cache-token-file", metavar="PATH", help="read the sidecar's bearer token from this file")
    r.add_argument("--api-key", help="the OpenAI API key clients must send (Authorization: Bearer KEY); visible "
                   "in ps: prefer MMCACHE_API_KEY or --api-key-file. None: no key needed")
    r.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file")
    r.add_argument("--tenants", metavar="FILE", help="TOML/JSON file of API key -> tenant (mode 0600): each "
                   "client's images are encoded and read in its tenant's scope of the cache")
    r.add_argument("--model", default="tiny-llava", help="tiny-llava or a local directory (tokenizer, chat template)")
    r.add_argument("--served-model-name", help="the model name clients use (default: the model's name)")
    r.add_argument("--data-dir", default="./mmcache-data", help="where built-in models are generated")
    r.add_argument("--host", default="127.0.0.1", help="bind address")
    r.add_argument("--port", type=int, default=8000, help="port; 0: a free one, printed in the ready line")
    r.add_argument("--default-max-tokens", type=int, default=256, help="when a request gives no max_tokens")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per call to a worker")
    r.add_argument("--max-inflight", type=int, default=256,
                   help="most chat requests in progress; more get 503 with Retry-After (default: 256)")
    r.add_argument("--elastic", action="store_true",
                   help="every --encoder/--prefill/--decode worker is elastic (serve --role elastic): move "
                        "workers between the stages as the load shifts; POST /v1/elastic/switch moves one by hand")
    add_elastic_tuning(r, {"interval": ElasticPolicy.interval_s, "high": ElasticPolicy.high_s, "low": ElasticPolicy.low,
                           "cooldown": ElasticPolicy.cooldown_s, "sustain": ElasticPolicy.sustain})
    _video_args(r, "")
    r.add_argument("--max-video-frames", type=int, default=64,
                   help="the most mm_processor_kwargs.max_frames a request may ask for (default: 64)")
    r.add_argument("--log-level", default="info", help="debug, info, warning, error")
    r.set_defaults(fn=_router)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        print(f"mmcache-llm {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
