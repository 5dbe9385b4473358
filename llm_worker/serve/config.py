"""What ``mmcache-llm serve`` takes (``LLMServeConfig``): one frozen dataclass, checked at start."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from encoder_worker.media import MediaLimits
from encoder_worker.video import VideoLimits, VideoSampling
from llm_worker.elastic.policy import STAGES

ROLES = ("prefill", "decode", "both", "elastic")
ELASTIC_ROLES = STAGES
"""The stages an elastic worker serves (``llm_worker.elastic.policy``)."""
"""The stages an ``elastic`` worker serves, one at a time (``llm_worker.elastic.role``)."""


@dataclass(frozen=True)
class LLMServeConfig:
    """Everything ``mmcache-llm serve`` takes."""

    role: str
    """``prefill``, ``decode``, ``both`` (the aggregated baseline, no cache) or ``elastic`` (holds the
    vision tower and the language model; serves one of ``ELASTIC_ROLES`` at a time and switches
    on ``POST /v1/role``: ``llm_worker.elastic.app``)."""
    cache_url: str | None = None
    """The sidecar: ``unix:///path.sock`` (zero-copy reads) or ``http://host:port``; unused by ``both``."""
    initial_role: str | None = None
    """``elastic`` only: the stage served first (``encode``, ``prefill`` or ``decode``)."""
    encoder_batch: int = 8
    """``elastic`` only: most images per encoder forward while it encodes."""
    encoder_schedule: str = "fcfs"
    """``elastic`` only: its encode queue's order, ``fcfs`` or ``sjf`` (``encoder_worker.batcher``)."""
    load_window_s: float = 3.0
    """``elastic`` only: seconds its ``busy`` load signal looks back (``llm_worker.elastic.load``)."""
    model: str = "tiny-llava"
    """``tiny-llava`` (built on first use into data_dir) or a local Hugging Face directory."""
    data_dir: str = "./mmcache-data"
    host: str = "127.0.0.1"
    port: int = 8472
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``; None: ``cuda`` when a GPU is visible, else ``cpu``."""
    dtype: str | None = None
    """Weights and KV dtype (``bfloat16``, ...); None: float32 on the CPU, the checkpoint's on a GPU."""
    max_batch: int = 64
    """Most requests in one decode step; more wait to join."""
    max_waiting: int = 256
    """Decode and both: most requests waiting to join the decode batch; more are refused with 503
    and ``Retry-After`` (never queued without bound)."""
    max_images_per_request: int = 64
    cache_token: str | None = None
    """Bearer token of the sidecar, if it has one."""
    stack_token: str | None = field(default=None, repr=False)
    """The stack's control credential (``MMCACHE_STACK_TOKEN``, which ``mmcache up`` makes per
    stack): routes that change this worker's state (``POST /v1/role``) need it as ``Authorization:
    Bearer``; without one configured they are off (401)."""
    media: MediaLimits = field(default_factory=MediaLimits)
    """Limits on the images a ``both`` (or an encoding ``elastic``) worker fetches itself."""
    video: VideoLimits = field(default_factory=VideoLimits)
    """Limits on the videos a ``both`` (or an encoding ``elastic``) worker fetches and decodes itself."""
    video_sampling: VideoSampling = field(default_factory=VideoSampling)
    """``both``: how a video is sampled when the request names no ``video`` options."""
    max_video_groups: int = 4096
    """Prefill: most video frame groups one request may name."""
    encoder_cache_bytes: int = 0
    """``both`` only: an in-process LRU of image embeddings this large (0: none, encode every image)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {', '.join(ROLES)}")
        if self.role != "both" and not self.cache_url:
            raise ValueError(f"role={self.role!r} needs cache_url (the sidecar's unix:// or http:// URL)")
        if self.role == "elastic" and self.initial_role not in ELASTIC_ROLES:
            raise ValueError(f"role='elastic' needs initial_role, one of {', '.join(ELASTIC_ROLES)}; "
                             f"got {self.initial_role!r}")
        if self.role != "elastic" and self.initial_role is not None:
            raise ValueError(f"initial_role is for role='elastic' (this worker is a {self.role} worker)")
        if self.encoder_batch < 1:
            raise ValueError(f"encoder_batch={self.encoder_batch} must be >= 1")
        if self.load_window_s <= 0:
            raise ValueError(f"load_window_s={self.load_window_s} must be > 0")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting={self.max_waiting} must be >= 0")
        if self.max_images_per_request < 1:
            raise ValueError(f"max_images_per_request={self.max_images_per_request} must be >= 1")
        if self.device is not None and self.device.startswith("cuda") and not torch.cuda.is_available():
            # NOTE: is_available() counts devices without creating a CUDA context
            raise ValueError(f"--device {self.device}: no CUDA device is visible to this process (or torch is "
                             "a CPU build); use --device cpu, or leave --device out to take a GPU where there is one")
