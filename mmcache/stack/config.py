"""What ``mmcache up`` takes (``StackConfig``): one frozen dataclass, its combinations checked
at start (``mmcache.cli`` builds it from the flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmcache.stack.supervisor import Backoff

ROLES = ("cache", "encoder", "prefill", "decode", "generate", "router")


@dataclass(frozen=True)
class StackConfig:
    """Everything ``mmcache up`` takes."""

    model: str = "tiny-llava"
    data_dir: str = "./mmcache-data"
    host: str = "127.0.0.1"
    """The router's bind address; the sidecar, encoders and workers stay on loopback (``LOOPBACK``)."""
    port: int = 8000
    encoders: int = 2
    prefill: int = 1
    decode: int = 1
    aggregated: bool = False
    """``both`` workers (``--decode`` of them) behind the router; no sidecar, no encoders."""
    host_capacity: str = "2GiB"
    host_policy: str | None = None
    """The sidecars' ``--host-policy`` (``lru``, ``gdsf``, ``cost-lfu``); None: theirs (lru)."""
    cache_device_capacity: str | None = None
    """The sidecars' ``--device-capacity``: a GPU tier the workers read by CUDA IPC (None: none)."""
    device: str | None = None
    dtype: str | None = None
    allowed_dirs: tuple[str, ...] = ()
    http_images: bool = True
    """Whether the encoders (``both`` workers) fetch http(s) images at all (``--no-http-images``)."""
    allow_private_urls: bool = False
    """Whether those fetches may reach private, loopback, link-local and multicast addresses."""
    max_batch: int = 64
    encoder_batch: int | None = None
    """Most images per encoder forward (the encoders' ``--max-batch``); None: theirs (8). Where
    the encoders run on a CPU, 1: a batch is no faster there than its images one by one, and
    every image of a batch (every request in it) waits for the last."""
    encoder_schedule: str | None = None
    """The encoders' ``--schedule``: ``fcfs`` (theirs) or ``sjf`` (the misses of the request with
    the fewest images left first)."""
    encoder_cache: str | None = None
    """With ``aggregated``: the ``both`` workers' in-process embedding LRU (e.g. ``2GiB``)."""
    threads: int | None = None
    """Torch threads per worker (``OMP_NUM_THREADS``); None: torch's default."""
    nice: tuple[tuple[str, int], ...] = ()
    """(role, niceness) pairs: the role's processes run at that CPU priority (0 normal, up to 19
    lowest); roles ``cache``, ``encoder``, ``prefill``, ``decode``, ``generate``, ``router``. For
    stages that share CPU cores: the stage nearest the first token first."""
    video_fps: float | None = None
    """The router's (and ``both`` workers') ``--video-fps``: frames per second sampled from a video
    whose request names none; None: theirs (2)."""
    video_max_frames: int | None = None
    """Their ``--video-max-frames``; None: theirs (16)."""
    startup_timeout_s: float = 600.0
    log_level: str = "warning"
    extra_env: dict[str, str] = field(default_factory=dict)
    backoff: Backoff = Backoff()
    """How long a child that died waits before it is started again."""
    cache_token: str | None = field(default=None, repr=False)
    """The sidecar's bearer token: for the sidecar, the workers and the router, in their
    environment (``MMCACHE_TOKEN``), never their argv."""
    api_key: str | None = field(default=None, repr=False)
    """The router's OpenAI API key: for the router alone, in ``MMCACHE_API_KEY``."""
    tenants: str | None = None
    """The router's API key → tenant file (``--tenants``): each client's images are encoded and
    read in its tenant's scope of the cache."""
    nodes: int = 1
    """Node groups on this machine (each its own sidecar, arena, data dir ``<data_dir>/node-I``,
    encoders, prefill and decode) behind one router, which sends each request to one group."""
    remote: str | None = None
    """The sidecars' remote tier (``--remote URL``): a Redis/Valkey server or cluster they share."""
    redis_cluster: int | None = None
    """Start a cluster of this many ``redis-server`` masters on loopback (a demo) as the remote."""
    routing: str = "cache"
    """The router's ``--routing`` across node groups: ``cache`` or ``load``."""
    claim_ttl_s: float | None = None
    """The encoders' ``--claim-ttl``; None: theirs (30 s)."""
    elastic: bool = False
    """Every encoder, prefill and decode worker is elastic (``mmcache-llm serve --role elastic
    --initial-role R``: holds the vision tower and the LLM, switches stage while serving), and
    the router moves them as the load shifts (``--elastic``)."""
    elastic_interval_s: float | None = None
    """The router's ``--elastic-interval``; None: its default (1 s). Likewise the next four."""
    elastic_high_s: float | None = None
    elastic_low: float | None = None
    elastic_cooldown_s: float | None = None
    elastic_sustain: int | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("--nodes must be >= 1")
        if self.remote and self.redis_cluster:
            raise ValueError("give --remote URL (your store) or --redis-cluster K (a demo cluster), not both")
        if self.redis_cluster is not None and not 1 <= self.redis_cluster <= 16:
            raise ValueError("--redis-cluster must be 1..16 masters")
        if self.elastic and self.aggregated:
            raise ValueError("--elastic is for the EPD stack: its workers switch between encode, prefill and "
                             "decode (the --aggregated baseline has one stage)")
        if self.elastic and self.claim_ttl_s is not None:
            raise ValueError("--claim-ttl is for the EPD stack's encoders; elastic workers claim for 30 s")
        if self.elastic and self.nice:
            raise ValueError("--nice is by role, and an elastic worker changes role: not with --elastic")
        if self.elastic and self.nodes > 1:
            raise ValueError("--elastic moves workers within one node group: use it with --nodes 1")
        knobs = (self.elastic_interval_s, self.elastic_high_s, self.elastic_low, self.elastic_cooldown_s,
                 self.elastic_sustain)
        if not self.elastic and any(k is not None for k in knobs):
            raise ValueError("--elastic-interval, --elastic-high, --elastic-low, --elastic-cooldown and "
                             "--elastic-sustain are for --elastic")
        if self.aggregated and (self.nodes > 1 or self.remote or self.redis_cluster):
            raise ValueError("--nodes, --remote and --redis-cluster are for the EPD stack (the baseline has no cache)")
        if self.remote:
            from mmcache.tiers.remote_config import parse_remote_url

            parse_remote_url(self.remote)
        for name in ("encoders", "prefill", "decode"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        if self.encoder_cache and not self.aggregated:
            raise ValueError("--encoder-cache is for --aggregated (EPD workers share the sidecar)")
        if self.encoder_batch is not None and self.encoder_batch < 1:
            raise ValueError("--encoder-batch must be >= 1")
        if self.aggregated and (self.encoder_schedule or self.encoder_batch):
            raise ValueError("--encoder-schedule and --encoder-batch are for the EPD stack's encoders")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")
        for role, niceness in self.nice:
            if role not in ROLES:
                raise ValueError(f"--nice {role}={niceness}: unknown role; roles: encoder, prefill, decode, "
                                 "sidecar (or cache), router, both (or generate)")
            if not 0 <= niceness <= 19:
                raise ValueError(f"--nice {role}={niceness}: niceness must be 0..19 (raising priority needs root)")
