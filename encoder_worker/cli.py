"""``mmcache-encoder serve --model tiny-llava --cache unix:///tmp/mmcache.sock``"""

from __future__ import annotations

import argparse
import logging
import sys

from mmcache.common.cli import HelpFormatter

from encoder_worker.batcher import SCHEDULES
from encoder_worker.media import MediaLimits
from encoder_worker.video import VideoLimits


def _serve(args: argparse.Namespace) -> int:
    from encoder_worker.app import create_app
    from encoder_worker.config import EncoderServeConfig
    from mmcache.common.sizes import parse_size
    from mmcache.common.security import resolve_secret
    from mmcache.common import run_app

    config = EncoderServeConfig(
        cache_url=args.cache, model=args.model, data_dir=args.data_dir, host=args.host, port=args.port,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, salt=args.salt,
        cache_token=resolve_secret(args.cache_token, args.cache_token_file, "MMCACHE_TOKEN", "cache token"),
        schedule=args.schedule, max_queue_delay_ms=args.max_queue_delay_ms, max_queued_images=args.max_queued_images,
        claims=not args.no_claims, claim_ttl_s=args.claim_ttl,
        media=MediaLimits(allowed_dirs=tuple(args.allowed_dir), allow_http=not args.no_http,
                          allow_private_urls=args.allow_private_urls),
        video=VideoLimits(max_bytes=parse_size(args.max_video_bytes), max_seconds=args.max_video_seconds,
                          max_frames=args.max_video_frames, max_decode_s=args.max_video_decode_s))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_app(create_app(config), "mmcache-encoder", config.host, config.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcache-encoder", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve POST /v1/encode", formatter_class=HelpFormatter)
    s.add_argument("--model", default="tiny-llava", help="tiny-llava or a local Hugging Face directory")
    s.add_argument("--cache", required=True, help="the sidecar: unix:///path.sock or http://host:port")
    s.add_argument("--data-dir", default="./mmcache-data", help="where built-in models are generated")
    s.add_argument("--host", default="127.0.0.1", help="bind address")
    s.add_argument("--port", type=int, default=8471, help="port; 0: a free one, printed in the ready line")
    s.add_argument("--max-batch", type=int, default=8, help="most images per model forward")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a miss waits for others to batch with")
    s.add_argument("--schedule", choices=SCHEDULES, default="fcfs",
                   help="which queued misses run first: arrival order, or the request with the fewest images left")
    s.add_argument("--max-queue-delay-ms", type=float, default=10_000.0,
                   help="under --schedule sjf, a miss queued longer than this runs first")
    s.add_argument("--max-queued-images", type=int, default=1024,
                   help="most images waiting for the model; a request whose new images would pass it gets 503 "
                        "with Retry-After (default: 1024)")
    s.add_argument("--claim-ttl", type=float, default=30.0, metavar="S",
                   help="claim each new image through the sidecar before encoding it, for S seconds (renewed "
                        "while queued): every encoder sharing the cache encodes it once; a dead owner's claim "
                        "is taken over after S (default 30)")
    s.add_argument("--no-claims", action="store_true",
                   help="do not claim: single-flight within this worker only")
    s.add_argument("--allowed-dir", action="append", default=[], help="allow file:// under this dir (repeatable)")
    s.add_argument("--no-http", action="store_true", help="refuse http(s):// image URLs")
    s.add_argument("--allow-private-urls", action="store_true",
                   help="fetch http(s):// images from (and follow redirects to) private, loopback, link-local "
                        "and multicast addresses too (refused by default: the fetches could reach this host's "
                        "network)")
    s.add_argument("--max-video-bytes", default="256MiB", help="largest video accepted (default: 256MiB)")
    s.add_argument("--max-video-seconds", type=float, default=600.0, help="longest video accepted (default: 600)")
    s.add_argument("--max-video-frames", type=int, default=64,
                   help="most frames sampled from one video; a request's max_frames may not exceed it (default: 64)")
    s.add_argument("--max-video-decode-s", type=float, default=30.0,
                   help="longest decoding one video may take, in seconds (default: 30)")
    s.add_argument("--salt", help="tenant salt mixed into the namespace")
    s.add_argument("--cache-token", help="bearer token of the sidecar; visible in ps: prefer MMCACHE_TOKEN "
                   "or --cache-token-file")
    s.add_argument("--cache-token-file", metavar="PATH", help="read the sidecar's bearer token from this file")
    s.add_argument("--log-level", default="info", help="debug, info, warning, error")
    s.set_defaults(fn=_serve)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        print(f"mmcache-encoder {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
