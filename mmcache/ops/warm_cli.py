"""``mmcache warm``'s command line: its arguments, the run, the summary (``mmcache.ops.warm``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from mmcache.ops import warm as warm_run
from mmcache.ops.warm import Settings, warm
from mmcache.ops.warm_sources import WarmError
from mmcache.ops.warm_target import StartedEncoder, Target, discover_stack

_MAX_LISTED_FAILURES = 20


def _summary_lines(summary: dict) -> list[str]:
    lines = [f"warm: {summary['images']} images in {summary['seconds']:.1f} s: {summary['hits']} already cached, "
             f"{summary['encoded']} encoded, {summary['failed']} failed (namespace {summary['namespace']})"]
    for failure in summary["failures"][:_MAX_LISTED_FAILURES]:
        lines.append(f"  failed: {failure['name']}: {failure['error']}")
    if summary["failed"] > _MAX_LISTED_FAILURES:
        lines.append(f"  ... and {summary['failed'] - _MAX_LISTED_FAILURES} more (--failures FILE lists them all)")
    return lines


def run_command(args: argparse.Namespace) -> int:
    from mmcache.common.security import resolve_secret
    from mmcache.common.sizes import parse_size

    token = resolve_secret(args.token, args.token_file, "MMCACHE_TOKEN", "token")
    settings = Settings(concurrency=args.concurrency, batch=args.batch, batch_bytes=parse_size(args.batch_bytes),
                        memory_bytes=parse_size(args.memory), max_image_bytes=parse_size(args.max_image_bytes),
                        tenant=args.tenant, max_wait_s=args.max_wait, fetch_timeout_s=args.fetch_timeout,
                        allow_private_urls=args.allow_private_urls)
    for name in ("concurrency", "batch"):
        if getattr(args, name) < (0 if name == "concurrency" else 1):
            raise WarmError(f"--{name}={getattr(args, name)} must be at least {0 if name == 'concurrency' else 1}")
    if settings.tenant is not None:
        from mmcache_client.keys import validate_tenant

        validate_tenant(settings.tenant)
    started = None
    if args.model:
        if not args.cache:
            raise WarmError("--model starts an encoder for the cache named by --cache URL: name it")
        if args.encoder:
            raise WarmError("--model starts an encoder; --encoder names running ones: one or the other")
        started = StartedEncoder(args.model, args.cache, args.data_dir, token, ["--max-batch", str(args.batch)])
        encoders, cache = [started.wait_ready(args.startup_timeout)], args.cache
    elif args.encoder:
        if not args.cache:
            raise WarmError("--encoder needs --cache URL: the sidecar those encoders write to")
        encoders, cache = list(args.encoder), args.cache
    else:
        encoders, cache = discover_stack(args.data_dir)
        cache = args.cache or cache
    try:
        summary = asyncio.run(warm(args.sources, Target(encoders, cache, token, started=started), settings,
                                   column=args.column, quiet=args.quiet, interval_s=args.interval,
                                   failures_path=args.failures))
    finally:
        if started is not None:
            started.stop()
    for line in _summary_lines(summary):
        print(line, file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"} | {"failures": summary["failures"][:20]}))
    return 1 if summary["failed"] else 0


def configure(p: argparse.ArgumentParser) -> None:
    """``mmcache warm``'s arguments (``mmcache.cli``)."""
    p.description = warm_run.__doc__
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder of images (recursive), a text file of paths/URLs (one per line), a Parquet file "
                        "with an image column, or an image file")
    where = p.add_argument_group("where the images go (default: the `mmcache up` running in --data-dir)")
    where.add_argument("--data-dir", default="./mmcache-data",
                       help="a running `mmcache up`'s data dir: its encoders and sidecar are used; with --model, "
                            "where the built-in model is built")
    where.add_argument("--encoder", action="append", default=[], metavar="URL",
                       help="an encoder's URL (repeatable), with --cache")
    where.add_argument("--cache", metavar="URL", help="the sidecar the encoders write to: unix:///path.sock or "
                       "http://host:port")
    where.add_argument("--model", help="start an encoder for this model (tiny-llava, tiny-qwen2-vl, a local "
                       "directory) writing to --cache, and stop it at the end")
    where.add_argument("--tenant", help="warm this tenant's scope of the cache (the router's tenants)")
    where.add_argument("--token", help="the sidecar's bearer token (or MMCACHE_TOKEN, or --token-file)")
    where.add_argument("--token-file", metavar="PATH", help="read the sidecar's bearer token from this file")
    where.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                       help="with --model: seconds for the encoder to come up (a first run builds the model)")
    p.add_argument("--column", help="the Parquet file's image column (default: the first binary column, a "
                   "{bytes, path} struct, or a path/url string column)")
    p.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="encode requests in flight at most (default: two per encoder)")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="most images per encode request (default 8)")
    p.add_argument("--batch-bytes", default="16MiB", metavar="SIZE", help="most image bytes per encode request")
    p.add_argument("--memory", default="256MiB", metavar="SIZE",
                   help="most image bytes held at once: read, queued and in flight (default 256MiB)")
    p.add_argument("--max-image-bytes", default="20MiB", metavar="SIZE",
                   help="larger images fail without an upload (default 20MiB, the encoders' own limit)")
    p.add_argument("--fetch-timeout", type=float, default=30.0, metavar="S", help="seconds per image URL fetched")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="fetch image URLs on private, loopback or link-local addresses (and redirects to them); "
                        "off: each is a named failure, nothing is connected to")
    p.add_argument("--max-wait", type=float, default=0.0, metavar="S",
                   help="longest a batch waits out a busy stack (503s) before its images count as failed "
                        "(default 0: as long as the stack is busy)")
    p.add_argument("--failures", metavar="FILE", help="write every failure here, one JSON object per line")
    p.add_argument("--quiet", action="store_true", help="plain progress lines instead of a bar")
    p.add_argument("--interval", type=float, default=10.0, metavar="S", help="seconds between plain progress lines")
    p.set_defaults(fn=run_command)
