"""What ``mmcache-llm router`` takes (``RouterConfig``), checked at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_worker.elastic.policy import ElasticPolicy
from llm_worker.router.nodes import ROUTINGS, NodeSpec


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``mmcache-llm router`` takes. EPD mode needs encoders, prefill and decode
    workers; aggregated mode needs ``generate`` (``both`` workers) and nothing else."""

    model: str = "tiny-llava"
    """``tiny-llava`` or a local directory: the tokenizer and chat template come from it."""
    data_dir: str = "./mmcache-data"
    served_model_name: str | None = None
    """The ``model`` clients name; default: ``model``'s last path component."""
    encoders: tuple[str, ...] = ()
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    generate: tuple[str, ...] = ()
    cache_url: str | None = None
    """The sidecar, for ``/v1/stats``."""
    cache_token: str | None = None
    api_key: str | None = field(default=None, repr=False)
    stack_token: str | None = field(default=None, repr=False)
    """The stack's control credential (``MMCACHE_STACK_TOKEN``): sent to the workers' state-changing
    routes (``POST /v1/role`` of an elastic switch)."""
    """The OpenAI API key clients send as ``Authorization: Bearer KEY`` on every route but
    ``/healthz`` (401 otherwise); None: no key needed. From ``MMCACHE_API_KEY`` or
    ``--api-key-file`` rather than ``--api-key``, which ``ps`` shows."""
    tenants: str | None = None
    """A TOML/JSON file of API key → tenant (``mmcache.common.tenants``): a client's requests are
    encoded and read in its tenant's scope of the cache, so one tenant never gets an embedding
    another computed or wrote. ``api_key`` stays the default tenant's."""
    host: str = "127.0.0.1"
    port: int = 8000
    default_max_tokens: int = 256
    max_images_per_request: int = 64
    timeout_s: float = 600.0
    """Per call to a worker (an encode of many large images on a CPU takes long)."""
    retry_down_s: float = 5.0
    """How long a worker that could not be reached is passed over (it is still tried when no
    other worker of its role is left)."""
    max_inflight: int = 256
    """Most chat requests in progress at once; more are refused with 503 + ``Retry-After``."""
    nodes: tuple[NodeSpec, ...] = ()
    """Node groups (``llm_worker.router.nodes``), instead of ``encoders``/``prefill``/``decode``/``cache_url``:
    each request goes to one group, by where its images are (``routing``)."""
    video_fps: float = 2.0
    """Frames sampled per second of a video whose request names no ``mm_processor_kwargs.fps``."""
    video_max_frames: int = 16
    """Frames sampled at most from a video whose request names no ``mm_processor_kwargs.max_frames``."""
    max_video_frames: int = 64
    """The most ``max_frames`` a request may ask for."""
    max_videos_per_request: int = 8
    """Most video parts one request may hold."""
    routing: str = "cache"
    """``cache``: to the group whose host tier holds most of a request's image bytes (by load
    where none does); ``load``: by load alone."""
    elastic: bool = False
    """Every EPD worker is elastic (``mmcache-llm serve --role elastic``): a controller moves
    workers between stages as the load shifts (``llm_worker.elastic.controller``)."""
    elastic_interval_s: float = ElasticPolicy.interval_s
    """Seconds between the controller's polls of the workers' load."""
    elastic_high_s: float = ElasticPolicy.high_s
    """A stage whose mean queue delay exceeds this many seconds is hot (wants a worker)."""
    elastic_low: float = ElasticPolicy.low
    """A stage may give a worker while its busy fraction, spread over one worker fewer, stays
    under this (0..1) and its queue delay under ``elastic_high_s / 2``."""
    elastic_cooldown_s: float = ElasticPolicy.cooldown_s
    """Seconds after a switch before the next may start."""
    elastic_sustain: int = ElasticPolicy.sustain
    """Consecutive polls a stage must stay hot (and a donor idle) before a switch."""

    def __post_init__(self) -> None:
        if self.elastic:
            if self.generate or self.nodes:
                raise ValueError("--elastic is for one EPD group (--encoder/--prefill/--decode), not --generate "
                                 "or --node groups")
            self.elastic_policy  # NOTE: checks the settings (finite, in range) the way the simulator's are
        if not 1 <= self.video_max_frames <= self.max_video_frames:
            raise ValueError(f"video_max_frames={self.video_max_frames} must be within 1..max_video_frames="
                             f"{self.max_video_frames}")
        if not 0 < self.video_fps <= 120:
            raise ValueError(f"video_fps={self.video_fps} must be within (0, 120]")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (None: no key needed)")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} must be one of {', '.join(ROUTINGS)}")
        if self.nodes:
            if self.generate or self.encoders or self.prefill or self.decode or self.cache_url:
                raise ValueError("give either --node groups or --encoder/--prefill/--decode/--cache, not both")
            names = [n.name for n in self.nodes]
            if len(set(names)) != len(names):
                raise ValueError(f"node group names must differ: {names}")
            if self.timeout_s <= 0 or self.retry_down_s < 0 or self.default_max_tokens < 1 or self.max_inflight < 1:
                raise ValueError("timeout_s, default_max_tokens and max_inflight must be > 0, retry_down_s >= 0")
            return
        if self.generate and (self.encoders or self.prefill or self.decode):
            raise ValueError("give either --generate (aggregated) or --encoder/--prefill/--decode (EPD), not both")
        if not self.generate and not (self.encoders and self.prefill and self.decode):
            raise ValueError("EPD needs at least one --encoder, --prefill and --decode URL (or --generate URLs)")
        if self.timeout_s <= 0 or self.retry_down_s < 0 or self.default_max_tokens < 1:
            raise ValueError("timeout_s and default_max_tokens must be > 0, retry_down_s >= 0")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight={self.max_inflight} must be >= 1")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (None: no key needed)")

    @property
    def elastic_policy(self) -> ElasticPolicy:
        """The controller's settings, as the simulator takes them (``llm_worker.elastic.policy``)."""
        return ElasticPolicy(interval_s=self.elastic_interval_s, high_s=self.elastic_high_s, low=self.elastic_low,
                             sustain=self.elastic_sustain, cooldown_s=self.elastic_cooldown_s)

    @property
    def mode(self) -> str:
        return "aggregated" if self.generate else "epd"

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model.rstrip("/").rsplit("/", 1)[-1]
