"""``mmcache``: run the sidecar and poke a running one.

    mmcache up [--port 8000] [--encoders 2] [--aggregated]   the whole stack, OpenAI API on --port
    mmcache serve --data-dir DIR --port 8470 --socket /tmp/mmcache.sock --host-capacity 4GiB
    mmcache stats http://127.0.0.1:8470
    mmcache put URL NS/HASH file.safetensors       (or a .npy array; --hash-of IMAGE computes HASH)
    mmcache get URL NS/HASH -o out.safetensors
    mmcache warm ./images --data-dir ./mmcache-data  (a running `mmcache up`'s encoders; or --model M --cache URL)
    mmcache export http://127.0.0.1:8470 ./export [--namespace NS];  mmcache import ./export unix:///tmp/mmcache.sock
    mmcache plan --profile P.json --workload image-heavy,rate=4 --workers 6 --slo-ttft 1 --slo-tpot 0.05
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmcache.sidecar.config import ServeConfig
from mmcache.common.cli import ROUTER_ELASTIC_DEFAULTS, HelpFormatter, add_elastic_tuning
from mmcache.core.policies import POLICIES
from mmcache.common.security import make_private_dir, resolve_secret
from mmcache_client.errors import MMCacheError


def _serve(args: argparse.Namespace) -> int:
    from mmcache.sidecar.server import create_app
    from mmcache.common import run_app

    token = resolve_secret(args.token, args.token_file, "MMCACHE_TOKEN", "token")
    flags = {
        "data_dir": args.data_dir, "host": args.host, "port": args.port, "socket": args.socket,
        "host_capacity_bytes": args.host_capacity, "disk_capacity_bytes": args.disk_capacity,
        "max_entry_size_bytes": args.max_entry_size, "token": token, "arena_path": args.arena,
        "host_policy": args.host_policy, "disk_policy": args.disk_policy, "log_level": args.log_level,
        "write_timeout_s": args.write_timeout, "batch_get_budget_bytes": args.batch_get_budget,
        "max_connections": args.max_connections, "header_timeout_s": args.header_timeout,
        "disk_queue_bytes": args.disk_queue, "tenants": args.tenants,
        "remote": args.remote, "remote_ttl_s": args.remote_ttl, "remote_timeout_ms": args.remote_timeout_ms,
        "remote_required": args.remote_required or None, "node": args.node,
        "device_capacity_bytes": args.device_capacity, "device": args.device,
        "max_claims": args.max_claims, "max_claims_per_owner": args.max_claims_per_owner,
        "claim_ttl_max_s": args.claim_ttl_max, "max_event_followers": args.max_event_followers,
        "max_event_followers_per_tenant": args.max_event_followers_per_tenant,
    }
    config = ServeConfig.from_sources(flags, toml_path=args.config,
                                      warn=lambda text: print(f"mmcache serve: warning: {text}", file=sys.stderr))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # NOTE: what the sidecar creates (LMDB's data.mdb and lock.mdb, the status files) is its
    # user's alone: any local user who reads data.mdb reads every cached embedding.
    os.umask(0o077)
    make_private_dir(config.data_dir)
    app = create_app(config)
    # run_app prints the ready line once the sockets listen (scripts wait for it), and handles
    # SIGINT and SIGTERM: in-flight requests finish, then cleanup_ctx flushes disk and removes the socket.
    run_app(app, "mmcache", config.host, config.port, extra=f"unix://{config.socket}" if config.socket else "",
            max_connections=config.max_connections, header_timeout_s=config.header_timeout_s)
    return 0


def _client(args: argparse.Namespace):
    from mmcache_client import CacheClient

    return CacheClient(args.url, token=resolve_secret(args.token, args.token_file, "MMCACHE_TOKEN", "token"))


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(c.stats(), indent=2))
    return 0


def _put(args: argparse.Namespace) -> int:
    import numpy as np

    from mmcache_client import Key, content_hash

    if args.hash_of:
        with open(args.hash_of, "rb") as f:
            key = Key(args.key, content_hash(f.read()))
    else:
        key = Key.from_string(args.key)
    with _client(args) as c:
        if args.file.endswith(".npy"):
            created = c.put(key.namespace, key.hash, np.load(args.file), durable=args.durable)
        else:
            with open(args.file, "rb") as f:
                created = c.put_blob(key.namespace, key.hash, f.read(), durable=args.durable)
    print(json.dumps({"key": key.to_string(), "created": created}))
    return 0


def _get(args: argparse.Namespace) -> int:
    from mmcache_client import Key

    key = Key.from_string(args.key)
    with _client(args) as c:
        entry = c.get(key.namespace, key.hash)
        if entry is None:
            print(json.dumps({"error": f"no entry {key}"}), file=sys.stderr)
            return 1
        with entry:
            if args.output:
                with open(args.output, "wb") as out:
                    out.write(entry.buffer)
            else:
                sys.stdout.buffer.write(entry.buffer)
                sys.stdout.flush()
            print(json.dumps({"key": str(key), "tier": entry.tier, "nbytes": entry.nbytes}), file=sys.stderr)
    return 0


def _role_niceness(text: str) -> tuple[str, int]:
    role, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        role = role.strip()
        return {"sidecar": "cache", "both": "generate"}.get(role, role), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROLE=N (e.g. decode=10)") from None


def _up(args: argparse.Namespace) -> int:
    from mmcache.common.security import is_loopback
    from mmcache.stack.up import StackConfig, run

    cache_token = resolve_secret(None, args.token_file, "MMCACHE_TOKEN", "cache token")
    api_key = resolve_secret(None, args.api_key_file, "MMCACHE_API_KEY", "API key")
    if api_key is None and not is_loopback(args.host):
        print(f"mmcache up: warning: the router on {args.host} takes requests from anyone who reaches it; "
              "set MMCACHE_API_KEY or --api-key-file PATH to require a key", file=sys.stderr)
    config = StackConfig(model=args.model, data_dir=args.data_dir, host=args.host, port=args.port,
                         encoders=args.encoders, prefill=args.prefill, decode=args.decode, aggregated=args.aggregated,
                         host_capacity=args.host_capacity, device=args.device, dtype=args.dtype,
                         allowed_dirs=tuple(args.allowed_dir), http_images=not args.no_http_images,
                         allow_private_urls=args.allow_private_urls, tenants=args.tenants, max_batch=args.max_batch,
                         encoder_batch=args.encoder_batch, encoder_schedule=args.encoder_schedule,
                         encoder_cache=args.encoder_cache, threads=args.threads, nice=tuple(args.nice),
                         video_fps=args.video_fps, video_max_frames=args.video_max_frames,
                         startup_timeout_s=args.startup_timeout, log_level=args.log_level,
                         cache_token=cache_token, api_key=api_key, nodes=args.nodes, remote=args.remote,
                         redis_cluster=args.redis_cluster, routing=args.routing, claim_ttl_s=args.claim_ttl,
                         host_policy=args.host_policy, cache_device_capacity=args.cache_device_capacity,
                         elastic=args.elastic, elastic_interval_s=args.elastic_interval,
                         elastic_high_s=args.elastic_high, elastic_low=args.elastic_low,
                         elastic_cooldown_s=args.elastic_cooldown, elastic_sustain=args.elastic_sustain)
    return run(config)


def _plan(argv: list[str]) -> int:
    """``mmcache plan``: the planner is the LLM workers' (``llm_worker.planner.planner``); run by module
    name, as ``mmcache up`` runs the workers (mmcache imports no worker)."""
    import subprocess

    try:
        return subprocess.call([sys.executable, "-m", "llm_worker.planner.planner", *argv])
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # NOTE: its flags are the planner's own (mmcache plan --help lists them)
        return _plan(argv[1:])
    parser = argparse.ArgumentParser(prog="mmcache", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", add_help=False, help="find the allocation of encoders, prefill and decode workers with "
                   "the most goodput under SLOs, by simulation with measured stage costs (mmcache plan --help)")

    s = sub.add_parser("serve", help="run the cache sidecar (HTTP API + local zero-copy socket)",
                       formatter_class=HelpFormatter)
    s.add_argument("--config", help="TOML file with ServeConfig fields")
    s.add_argument("--data-dir", help="the disk tier (LMDB), the lock and the arena's record (default ./mmcache-data)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port; 0: a free one, printed in the ready line (default 8470)")
    s.add_argument("--socket", help="Unix socket for same-node zero-copy clients")
    s.add_argument("--host-capacity", help="shared-memory arena size, e.g. 4GiB")
    s.add_argument("--disk-capacity", help="LMDB payload bytes, e.g. 100GiB")
    s.add_argument("--max-entry-size", help="largest PUT body (default 256MiB)")
    s.add_argument("--token", help="bearer token every route but /healthz needs; visible in ps: prefer "
                   "MMCACHE_TOKEN or --token-file. Required to bind beyond loopback")
    s.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file (mode 0600)")
    s.add_argument("--arena", help="arena file path (default under /dev/shm)")
    s.add_argument("--host-policy", choices=sorted(POLICIES),
                   help="eviction policy of the shared-memory arena (default lru; cost-lfu keeps what was "
                        "expensive to encode and often used)")
    s.add_argument("--disk-policy", choices=sorted(POLICIES), help="eviction policy of the disk tier (default lru)")
    s.add_argument("--log-level", help="debug, info, warning, error (default info)")
    s.add_argument("--write-timeout", type=float, metavar="S",
                   help="seconds a reader has to take each part of a GET/batch_get answer (default 30)")
    s.add_argument("--batch-get-budget", metavar="SIZE", help="entry bytes per streamed batch_get batch (default 32MiB)")
    s.add_argument("--max-connections", type=int, help="open HTTP connections at most (default: the fd limit allows)")
    s.add_argument("--header-timeout", type=float, metavar="S",
                   help="seconds a new connection has to send its request head (default 5)")
    s.add_argument("--tenants", metavar="FILE",
                   help="TOML/JSON file of token -> tenant: requests are scoped to their token's tenant")
    s.add_argument("--disk-queue", metavar="SIZE",
                   help="bytes of puts the host cannot take queued for disk at most, then 503 (default 1GiB)")
    s.add_argument("--remote", metavar="URL",
                   help="a Redis/Valkey server or cluster below disk, shared by many sidecars: "
                        "redis://[user:pass@]host:port[,host:port...] or rediss:// (password also from "
                        "MMCACHE_REMOTE_PASSWORD)")
    s.add_argument("--remote-ttl", type=float, metavar="S", help="expire remote entries after S seconds")
    s.add_argument("--remote-timeout-ms", type=float, metavar="MS",
                   help="longest wait for one remote call (default 200); past it: a miss or a dropped write")
    s.add_argument("--max-claims", type=int, metavar="N",
                   help="live claims at most, all owners (default 100000); past it: 429 with Retry-After")
    s.add_argument("--max-claims-per-owner", type=int, metavar="M",
                   help="live claims of one owner at most (default 4096); past it: 429 with Retry-After")
    s.add_argument("--max-event-followers", type=int, metavar="N",
                   help="event followers at most, HTTP and local (default 256); past it: 429")
    s.add_argument("--max-event-followers-per-tenant", type=int, metavar="M",
                   help="event followers of one tenant at most (default 64); past it: 429")
    s.add_argument("--claim-ttl-max", type=float, metavar="S",
                   help="longest claim TTL granted, longer asks are clamped (default 120)")
    s.add_argument("--node", metavar="NAME",
                   help="this sidecar's name in inventory events (default hostname:port)")
    s.add_argument("--remote-required", action="store_true",
                   help="refuse to start when the remote cannot be reached (default: start with it marked down)")
    s.add_argument("--device-capacity", metavar="SIZE",
                   help="GPU memory for a device tier above host, read by same-node readers through CUDA IPC "
                        "(default 0: none, and no CUDA context; needs a CUDA GPU)")
    s.add_argument("--device", metavar="DEV", help="the GPU of the device tier (default cuda:0)")
    s.set_defaults(fn=_serve)

    u = sub.add_parser("up", help="run the whole stack: sidecar, encoders, prefill, decode, router (OpenAI API)",
                       formatter_class=HelpFormatter)
    u.add_argument("--model", default="tiny-llava", help="tiny-llava, tiny-qwen2-vl, or a local Hugging Face LLaVA or Qwen2-VL directory")
    u.add_argument("--data-dir", default="./mmcache-data", help="models, the cache's disk tier, its socket")
    u.add_argument("--host", default="127.0.0.1", help="the router's bind address (the sidecar, encoders and "
                   "workers stay on loopback)")
    u.add_argument("--tenants", metavar="FILE", help="TOML/JSON file of API key -> tenant (mode 0600) for the "
                   "router: each client's images are encoded and read in its tenant's scope of the cache")
    u.add_argument("--api-key-file", metavar="PATH",
                   help="the router requires this OpenAI API key (Authorization: Bearer); or MMCACHE_API_KEY")
    u.add_argument("--token-file", metavar="PATH",
                   help="the sidecar's bearer token, handed to the stack's processes in their environment; "
                        "or MMCACHE_TOKEN")
    u.add_argument("--port", type=int, default=8000, help="the router's port (the OpenAI API); 0: a free one, "
                   "printed in the ready line")
    u.add_argument("--encoders", type=int, default=2, help="encoder workers (a request's images are split over them)")
    u.add_argument("--prefill", type=int, default=1, help="prefill workers")
    u.add_argument("--decode", type=int, default=1, help="decode workers (with --aggregated: both workers)")
    u.add_argument("--aggregated", action="store_true",
                   help="the baseline instead: encode + prefill + decode in one worker, no cache")
    u.add_argument("--host-capacity", default="2GiB", help="the cache's shared-memory arena")
    u.add_argument("--host-policy", choices=sorted(POLICIES),
                   help="the arena's eviction policy (default lru; cost-lfu keeps entries that were expensive to "
                        "encode and often used: benchmarks/policy.py measures where it wins)")
    u.add_argument("--device", help="cpu, cuda, cuda:N for the workers (default: cuda when a GPU is visible)")
    u.add_argument("--cache-device-capacity", metavar="SIZE",
                   help="a GPU tier in the cache that prefill reads by CUDA IPC (mmcache serve --device-capacity; "
                        "default: none; needs a CUDA GPU)")
    u.add_argument("--dtype", help="bfloat16, float16, float32 for the workers")
    u.add_argument("--allowed-dir", action="append", default=[], help="allow file:// images under DIR (repeatable)")
    u.add_argument("--no-http-images", action="store_true", help="refuse http(s):// image URLs")
    u.add_argument("--allow-private-urls", action="store_true",
                   help="fetch http(s):// images from (and follow redirects to) private, loopback, link-local and "
                        "multicast addresses too (refused by default: the fetches could reach this host's network)")
    u.add_argument("--max-batch", type=int, default=64, help="most requests per decode step")
    u.add_argument("--encoder-batch", type=int, help="most images per encoder forward (default 8; 1 on a CPU "
                                                    "keeps each request from waiting for the others in its batch)")
    u.add_argument("--encoder-schedule", metavar="fcfs|sjf",
                   help="which queued images the encoders run first: arrival order (default), or those of the "
                        "request with the fewest images left, so that a one-image request does not wait behind five")
    u.add_argument("--encoder-cache", help="with --aggregated: an in-process LRU of embeddings this large, e.g. 2GiB")
    u.add_argument("--video-fps", type=float, help="frames sampled per second of a video whose request names no "
                   "mm_processor_kwargs.fps (default: 2)")
    u.add_argument("--video-max-frames", type=int, help="most frames sampled from a video whose request names no "
                   "mm_processor_kwargs.max_frames (default: 16)")
    u.add_argument("--threads", type=int, help="torch threads per worker process (default: torch's)")
    u.add_argument("--nice", type=_role_niceness, action="append", default=[], metavar="ROLE=N",
                   help="run ROLE's processes (encoder, prefill, decode, sidecar, router, both) at niceness N "
                        "(repeatable), e.g. --nice encoder=5 --nice decode=10 when the stages share CPU cores")
    u.add_argument("--nodes", type=int, default=1,
                   help="node groups on this machine, each its own sidecar, arena, data dir, encoders, prefill and "
                        "decode, behind one router (default 1)")
    u.add_argument("--remote", metavar="URL",
                   help="the sidecars' shared remote tier: redis://[user:pass@]host:port[,host:port...] (a server or a "
                        "cluster) or rediss://; the password better in MMCACHE_REMOTE_PASSWORD")
    u.add_argument("--redis-cluster", type=int, metavar="K",
                   help="start a K-master redis-server cluster on loopback as the remote tier (a demo; needs "
                        "redis-server installed)")
    u.add_argument("--routing", choices=("cache", "load"), default="cache",
                   help="with --nodes: to the group whose host tier holds a request's images (cache, default) "
                        "or by load alone")
    u.add_argument("--claim-ttl", type=float, metavar="S",
                   help="the encoders' claim TTL: a dead encoder's claim is taken over after S seconds (default 30)")
    u.add_argument("--elastic", action="store_true",
                   help="the encoders, prefill and decode workers are elastic: each holds the vision tower and the "
                        "LLM, and the router moves workers between the stages as the load shifts (image-heavy <-> "
                        "text-only), draining each first; --encoders/--prefill/--decode are the starting shape")
    add_elastic_tuning(u, ROUTER_ELASTIC_DEFAULTS, passed_on=True)
    u.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for the stack to come up")
    u.add_argument("--log-level", default="warning", help="the children's log level")
    u.set_defaults(fn=_up)

    from mmcache.ops import portable, warm_cli  # NOTE: light at import (no torch, no pyarrow until a command runs)

    warm_cli.configure(sub.add_parser(
        "warm", formatter_class=HelpFormatter,
        help="encode a corpus (a folder, a list of paths or URLs, a Parquet file) into the cache ahead of traffic"))
    portable.configure_export(sub.add_parser(
        "export", formatter_class=HelpFormatter,
        help="write a sidecar's entries (a namespace or all) to a folder of safetensors shards + a Parquet manifest"))
    portable.configure_import(sub.add_parser(
        "import", formatter_class=HelpFormatter,
        help="load an export into a sidecar, verifying every checksum and skipping keys it holds"))

    for name, fn, hlp in (("stats", _stats, "print a sidecar's stats"), ("put", _put, "store a file"),
                          ("get", _get, "fetch an entry")):
        p = sub.add_parser(name, help=hlp, formatter_class=HelpFormatter)
        p.add_argument("url", help="unix:///path.sock or http://host:port")
        if name != "stats":
            p.add_argument("key", help="NAMESPACE/HASH (put --hash-of: just NAMESPACE)")
        if name == "put":
            p.add_argument("file", help=".safetensors entry (tensor 'embeddings') or .npy array")
            p.add_argument("--hash-of", help="compute HASH as the content hash of this media file")
            p.add_argument("--durable", action="store_true", help="answer once on disk")
        if name == "get":
            p.add_argument("-o", "--output", help="write the safetensors entry here (default stdout)")
        p.add_argument("--token", help="the sidecar's bearer token (or MMCACHE_TOKEN, or --token-file)")
        p.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file")
        p.set_defaults(fn=fn)

    args, extra = parser.parse_known_args(argv)
    if extra:  # NOTE: the command's own usage, not the top-level one
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ValueError, OSError, MMCacheError) as e:
        print(f"mmcache {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
