"""What ``mmcache-encoder serve`` takes (``EncoderServeConfig``): one frozen dataclass, checked at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from encoder_worker.batcher import SCHEDULES
from encoder_worker.media import MediaLimits
from encoder_worker.video import VideoLimits


@dataclass(frozen=True)
class EncoderServeConfig:
    """Everything ``mmcache-encoder serve`` takes."""

    cache_url: str
    """The sidecar: ``unix:///path.sock`` (zero-copy puts) or ``http://host:port``."""
    model: str = "tiny-llava"
    """``tiny-llava`` (built on first use into data_dir) or a local Hugging Face directory."""
    data_dir: str = "./mmcache-data"
    """Where built-in models are generated."""
    host: str = "127.0.0.1"
    port: int = 8471
    max_batch: int = 8
    """Most images per model forward."""
    max_wait_ms: float = 5.0
    """Longest a miss waits for others to batch with, in milliseconds."""
    max_images_per_request: int = 64
    cache_token: str | None = None
    """Bearer token of the sidecar, if it has one."""
    salt: str | None = None
    """Tenant salt mixed into the namespace."""
    media: MediaLimits = field(default_factory=MediaLimits)
    video: VideoLimits = field(default_factory=VideoLimits)
    """Bounds on each video (bytes, seconds, frames, pixels, decode time)."""
    max_concurrent_decodes: int = 2
    """Video decodes running at once in this worker; more wait their turn."""
    schedule: str = "fcfs"
    """Which queued misses run next: ``fcfs`` (arrival order) or ``sjf`` (those of the request
    with the fewest images left to encode first; see ``encoder_worker.batcher``)."""
    max_queue_delay_ms: float = 10_000.0
    """Under ``sjf``, a miss queued longer than this runs first (no request starves)."""
    max_queued_images: int = 1024
    """Most misses waiting for the model; a request whose new misses would pass it is refused
    with 503 + ``Retry-After`` (see ``encoder_worker.batcher``)."""
    claims: bool = True
    """Claim each miss through the sidecar before encoding it (``mmcache.core.claims``), so that
    every encoder sharing the cache (this node's and, with a remote tier, every node's) encodes
    a new image once; off: single-flight within this worker only."""
    claim_ttl_s: float = 30.0
    """How long a claim holds without renewal: an owner that dies is taken over after this."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms} must be >= 0")
        if self.max_images_per_request < 1:
            raise ValueError(f"max_images_per_request={self.max_images_per_request} must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms={self.max_queue_delay_ms} must be >= 0")
        if self.max_concurrent_decodes < 1:
            raise ValueError(f"max_concurrent_decodes={self.max_concurrent_decodes} must be >= 1")
        if self.max_queued_images < 1:
            raise ValueError(f"max_queued_images={self.max_queued_images} must be >= 1")
        if not 0.1 <= self.claim_ttl_s <= 600:
            raise ValueError(f"claim_ttl_s={self.claim_ttl_s} must be within 0.1..600 seconds")
