"""What ``mmcache up`` tells each child (``ChildArgs``): the flags of the encoders, the LLM
workers, the elastic workers and the router, from the stack's config. The children check their
own flags; this only passes the user's on."""

from __future__ import annotations

from typing import Any

from mmcache.stack.config import StackConfig

LOOPBACK = "127.0.0.1"
"""Where the sidecar, encoders and workers listen: ``--host`` exposes the router alone."""


class ChildArgs:
    def __init__(self, config: StackConfig):
        self.config = config

    def worker(self) -> list[str]:
        c = self.config
        args = ["--model", c.model, "--data-dir", c.data_dir, "--host", LOOPBACK, "--port", "0",
                "--log-level", c.log_level]
        return args

    def llm(self, role: str, node: Any = None) -> list[str]:
        c = self.config
        args = ["serve", "--role", role, *self.worker(), "--max-batch", str(c.max_batch)]
        if role != "both":
            args += ["--cache", f"unix://{node.socket}"]
        elif c.encoder_cache:
            args += ["--encoder-cache", c.encoder_cache]
        for flag, value in (("--device", c.device), ("--dtype", c.dtype)):
            if value:
                args += [flag, value]
        return args

    def encoder(self) -> list[str]:
        c = self.config
        return [*(["--max-batch", str(c.encoder_batch)] if c.encoder_batch else []),
                *(["--schedule", c.encoder_schedule] if c.encoder_schedule else []),
                *(["--claim-ttl", str(c.claim_ttl_s)] if c.claim_ttl_s else [])]

    def elastic(self, role: str, node: Any) -> list[str]:
        """An elastic worker's flags: the LLM's, the encoder's (it may encode) and its first stage."""
        c = self.config
        return [*self.llm("elastic", node), "--initial-role", role, *self.media(),
                *(["--encoder-batch", str(c.encoder_batch)] if c.encoder_batch else []),
                *(["--encoder-schedule", c.encoder_schedule] if c.encoder_schedule else [])]

    def elastic_router(self) -> list[str]:
        c = self.config
        if not c.elastic:
            return []
        return ["--elastic", *(a for flag, value in (
            ("--elastic-interval", c.elastic_interval_s), ("--elastic-high", c.elastic_high_s),
            ("--elastic-low", c.elastic_low), ("--elastic-cooldown", c.elastic_cooldown_s),
            ("--elastic-sustain", c.elastic_sustain)) if value is not None for a in (flag, str(value)))]

    def media(self) -> list[str]:
        """Where the encoders (``both`` workers) may take images from."""
        c = self.config
        return [*(a for d in c.allowed_dirs for a in ("--allowed-dir", d)),
                *([] if c.http_images else ["--no-http"]),
                *(["--allow-private-urls"] if c.allow_private_urls else [])]

    def video(self) -> list[str]:
        """How videos are sampled by default (the router's and ``both`` workers' flags)."""
        c = self.config
        return [*(["--video-fps", str(c.video_fps)] if c.video_fps is not None else []),
                *(["--video-max-frames", str(c.video_max_frames)] if c.video_max_frames is not None else [])]
