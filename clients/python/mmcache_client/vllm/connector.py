"""``MMCacheECConnector``: mmcache as a vLLM encoder-cache connector (the only module here that
imports vLLM). vLLM builds one per process and role: the scheduler's (``SchedulerSide``) and
each worker's (``WorkerSide``); this class only routes vLLM's hooks to them.

What crosses from the scheduler to the workers each step is ``MMCacheECConnectorMetadata``: the
items to load and a reference to the step's ``scheduled_encoder_inputs``, vLLM's own list of
what the runner encodes after the loads (pickled in one message with the scheduler output, it
stays the same object on the worker's side), so a worker that cannot load an item adds it there
and it is encoded in the same step. What crosses back is ``MMCacheECWorkerMetadata``: the
workers' counters and the items they did not find. The counters reach vLLM's EC connector stats
(``get_ec_connector_stats`` → ``MMCacheECStats``, logged by vLLM's stat loggers as "EC Transfer
metrics").
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorStats
from vllm.logger import init_logger

from mmcache_client.vllm.counters import Counters, reduced, summed
from mmcache_client.vllm.keys import namespace_for
from mmcache_client.vllm.link import CacheLink
from mmcache_client.vllm.saver import SaveQueue
from mmcache_client.vllm.scheduler_side import LoadItem, SchedulerSide
from mmcache_client.vllm.settings import ConnectorSettings
from mmcache_client.vllm.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

SAVE_TIMEOUT_MS = 5000.0
"""The longest one save may take (the saver's calls are off the forward path)."""


class MMCacheECConnectorMetadata(ECConnectorMetadata):
    """Scheduler → workers, per step: ``loads``, and ``encode_list`` (the step's
    ``scheduled_encoder_inputs``: request id → item indices the runner encodes)."""

    def __init__(self, loads: list[LoadItem], encode_list: dict[str, list[int]] | None):
        self.loads = loads
        self.encode_list = encode_list


@dataclass
class MMCacheECWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers → scheduler, per step: counters and the items a worker did not find."""

    counters: dict[str, float] = field(default_factory=dict)
    vanished: list[str] = field(default_factory=list)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> ECConnectorWorkerMetadata:
        assert isinstance(other, MMCacheECWorkerMetadata)
        return MMCacheECWorkerMetadata(summed([self.counters, other.counters]), self.vanished + other.vanished)


@dataclass
class MMCacheECStats(ECConnectorStats):
    """One interval's counters (``mmcache_client.vllm.counters``), summed across workers."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: ECConnectorStats) -> ECConnectorStats:
        return MMCacheECStats(summed([self.data, other.data]))

    def reduce(self) -> dict[str, int | float]:
        return reduced(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class MMCacheECConnector(ECConnectorBase):
    """The EC connector. ``ec_connector_extra_config``: ``url`` (required), ``token``,
    ``namespace``, ``durable``, ``timeout_ms``, ``claim_ttl_ms``, ``save_queue``
    (``mmcache_client.vllm.settings``)."""

    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        ec = vllm_config.ec_transfer_config
        self.settings = ConnectorSettings.from_extra_config(ec.ec_connector_extra_config)
        model_config = vllm_config.model_config
        self.namespace = self.settings.namespace or namespace_for(model_config)
        self.claim_owner = f"vllm:{ec.engine_id}"[:128]
        self.counters = Counters()
        s = self.settings
        side = "scheduler" if role == ECConnectorRole.SCHEDULER else f"worker {socket.gethostname()}:{os.getpid()}"
        is_scheduler = role == ECConnectorRole.SCHEDULER
        link = CacheLink(s.url, s.token, s.timeout_ms, self.counters, f"EC connector ({side})", loud=is_scheduler)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._failed_hooks: set[str] = set()
        if is_scheduler:
            self._scheduler = SchedulerSide(link, self.namespace, self.counters, is_producer=self.is_producer,
                                            is_consumer=self.is_consumer, claim_owner=self.claim_owner,
                                            claim_ttl_ms=s.claim_ttl_ms)
        else:
            saver = None
            if self.is_producer:
                # NOTE: saves are off the forward path, and a durable one waits for the disk commit
                save_link = CacheLink(s.url, s.token, max(s.timeout_ms, SAVE_TIMEOUT_MS), self.counters,
                                      f"EC saver ({side})", loud=False)
                saver = SaveQueue(save_link, self.namespace, capacity=s.save_queue, durable=s.durable,
                                  claim_owner=self.claim_owner, counters=self.counters)
            self._worker = WorkerSide(link, saver, self.namespace, self.counters, device=_load_device(),
                                      dtype=model_config.dtype, widths=dict(ec.mm_encoder_output_widths),
                                      default_width=_inputs_embeds_size(model_config))
        logger.info("mmcache EC connector (%s, %s): %s, namespace %s", side, ec.ec_role, s.url, self.namespace)

    # ------------------------------------------------------------------ scheduler side
    # NOTE: the scheduler's hooks are a containment boundary: an outage is already a miss inside
    # the sides, and anything else (a bug of ours) is logged with its traceback, counted, and
    # answered as a miss: no exception of ours may stop vLLM's scheduler.
    def has_cache_item(self, identifier: str) -> bool:
        return self._contained("has_cache_item", False, self._scheduler.has_cache_item, identifier)

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        return self._contained("ensure_cache_available", True, self._scheduler.ensure_cache_available, request,
                               num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        self._contained("update_state_after_alloc", None, self._scheduler.update_state_after_alloc, request, index)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> ECConnectorMetadata:
        loads = self._contained("build_connector_meta", [], self._scheduler.take_loads)
        return MMCacheECConnectorMetadata(loads, scheduler_output.scheduled_encoder_inputs)

    def update_connector_output(self, connector_output: "ECConnectorOutput") -> None:
        meta = connector_output.ec_connector_worker_meta
        if isinstance(meta, MMCacheECWorkerMetadata):
            self._scheduler.worker_report(meta.counters, meta.vanished)

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        self._contained("request_finished", None, self._scheduler.request_finished, request)
        return False, None

    def get_ec_connector_stats(self) -> ECConnectorStats | None:
        if self._scheduler is None:
            return None  # NOTE: a worker's counters travel in its worker metadata, once
        data = self.counters.take()
        return MMCacheECStats(data) if any(data.values()) else None

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECConnectorStats | None:
        return MMCacheECStats(dict(data or {}))

    # ------------------------------------------------------------------ worker side
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MMCacheECConnectorMetadata)
        if meta.loads:
            self._worker.load(encoder_cache, meta.loads, meta.encode_list)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        if self.is_producer:
            self._contained("save_caches", None, self._worker.save, encoder_cache, mm_hash)

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        counters, vanished = self._worker.take_report()
        if not any(counters.values()) and not vanished:
            return None
        return MMCacheECWorkerMetadata(counters, vanished)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.close()

    def _contained(self, hook: str, default: Any, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - see the NOTE above: logged with its traceback, counted
            self.counters.add("errors")
            if hook not in self._failed_hooks:
                self._failed_hooks.add(hook)
                logger.exception("mmcache EC connector: %s failed; answered as a miss (logged once per hook)", hook)
            return default


def _load_device() -> Any:
    """Where loads land: None (host views) on the CPU, else this worker's CUDA device."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        return f"cuda:{current_platform.current_device()}"
    return None


def _inputs_embeds_size(model_config: Any) -> int | None:
    try:
        return int(model_config.get_inputs_embeds_size())
    except (AttributeError, TypeError, ValueError):
        return None
