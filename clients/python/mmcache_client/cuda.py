"""CUDA on the client side: device tensors shared by the sidecar (CUDA IPC), and a pinned arena.

Two ways an entry reaches a reader's GPU on one node (``docs/architecture.md``, "The device tier"):

- **CUDA IPC.** A sidecar with a device tier holds entries in GPU memory and answers a
  ``lease_device`` with, per tensor, torch's own IPC handle (``cudaIpcMemHandle``, the ref-counter
  slot, the event): ``handle_doc`` turns one into plain JSON and ``import_doc`` rebuilds the
  tensor in the reader, a view of the sidecar's memory. No pickle crosses the socket: the doc is
  data, and only ``rebuild_cuda_tensor`` is ever called with it.
- **A pinned arena.** Without a device tier (or when it is full), the reader copies from its
  read-only mapping of the host arena. ``pin_host_buffer`` registers that mapping once with
  ``cudaHostRegister`` (read-only mappings with ``cudaHostRegisterReadOnly``), so the copy runs
  at pinned speed, asynchronously.

Importing this module and calling ``cuda_available`` create no CUDA context.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

HOST_REGISTER_PORTABLE = 0x01
"""``cudaHostRegisterPortable``: pinned for every CUDA context, not just the current device's."""
HOST_REGISTER_READ_ONLY = 0x08
"""``cudaHostRegisterReadOnly`` (CUDA 11.1+): pin memory the process may only read."""
IPC_HANDLE_BYTES = 64
"""``CUDA_IPC_HANDLE_SIZE``: a ``cudaIpcMemHandle_t`` / ``cudaIpcEventHandle_t``."""
REF_COUNTER_SLOTS = 10000
"""torch's ``CUDA_IPC_REF_COUNTER_FILE_SIZE``: slots per ref-counter file (the offset indexes them)."""
MAX_DEVICES = 1024
_DTYPES = ("bfloat16", "float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
"""The dtypes an entry's tensors have (``mmcache_client.entry_spec.DTYPES``)."""
_ALREADY_REGISTERED, _NOT_REGISTERED = 712, 713
"""``cudaErrorHostMemoryAlreadyRegistered``, ``cudaErrorHostMemoryNotRegistered``."""
_STORAGE_CLASSES = ("TypedStorage", "UntypedStorage")
_IPC_FIELDS = ("size", "stride", "offset", "storage", "dtype", "device", "handle", "storage_bytes",
               "storage_offset_bytes", "ref_counter", "ref_counter_offset", "event", "event_sync")


def cuda_available() -> bool:
    """True only with torch and a usable CUDA device; creates no CUDA context."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{what} must be base64 text")
    return base64.b64decode(text, validate=True)


def handle_doc(reduced: tuple) -> dict:
    """A CUDA tensor's IPC handle (``torch.multiprocessing.reductions.reduce_tensor`` of it) as
    JSON-able data for ``import_doc``."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    fn, args = reduced
    if fn is not rebuild_cuda_tensor:
        raise ValueError(f"not a CUDA tensor's IPC handle: {fn!r}")
    (_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes, storage_offset_bytes,
     _requires_grad, ref_counter, ref_counter_offset, event, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": int(offset), "storage": storage_cls.__name__,
            "dtype": str(dtype).removeprefix("torch."), "device": int(device), "handle": _b64(handle),
            "storage_bytes": int(storage_bytes), "storage_offset_bytes": int(storage_offset_bytes),
            "ref_counter": _b64(ref_counter), "ref_counter_offset": int(ref_counter_offset),
            "event": _b64(event), "event_sync": bool(event_sync)}


def ipc_args(doc: Any) -> tuple:
    """``rebuild_cuda_tensor``'s arguments from a ``handle_doc``, every field checked (a doc that
    does not add up raises ``ValueError``, nothing is called)."""
    import torch

    if not isinstance(doc, dict) or set(doc) != set(_IPC_FIELDS):
        raise ValueError(f"an IPC handle must have exactly the fields {', '.join(_IPC_FIELDS)}")
    ints = ("offset", "device", "storage_bytes", "storage_offset_bytes", "ref_counter_offset")
    if not all(isinstance(doc[k], int) and not isinstance(doc[k], bool) and doc[k] >= 0 for k in ints):
        raise ValueError(f"IPC handle fields {', '.join(ints)} must be ints >= 0")
    for k in ("size", "stride"):
        if not isinstance(doc[k], list) or len(doc[k]) > 8 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in doc[k]):
            raise ValueError(f"IPC handle {k} must be a list of <= 8 ints >= 0")
    if len(doc["size"]) != len(doc["stride"]):
        raise ValueError("IPC handle size and stride differ in length")
    if doc["dtype"] not in _DTYPES:
        raise ValueError(f"IPC handle dtype {doc['dtype']!r} is not one of {', '.join(_DTYPES)}")
    dtype = getattr(torch, doc["dtype"])
    if doc["storage"] not in _STORAGE_CLASSES:
        raise ValueError(f"IPC handle storage {doc['storage']!r} is not one of {_STORAGE_CLASSES}")
    if doc["device"] >= MAX_DEVICES or doc["ref_counter_offset"] >= REF_COUNTER_SLOTS:
        raise ValueError("IPC handle device or ref_counter_offset is out of range")
    handle, event = _unb64(doc["handle"], "handle"), _unb64(doc["event"], "event")
    if handle is None or len(handle) != IPC_HANDLE_BYTES or (event is not None and len(event) != IPC_HANDLE_BYTES):
        raise ValueError(f"IPC handle memory and event handles must be {IPC_HANDLE_BYTES} bytes")
    ref_counter = _unb64(doc["ref_counter"], "ref_counter")
    # NOTE: torch names its ref-counter files /torch_<pid>_<n> in /dev/shm; anything else is not one
    if ref_counter is None or not ref_counter.startswith(b"/torch_") or b"/" in ref_counter[1:] \
            or len(ref_counter) > 255:
        raise ValueError("IPC handle ref_counter must name one of torch's ref-counter files")
    if not isinstance(doc["event_sync"], bool):
        raise ValueError("IPC handle event_sync must be true or false")
    storage_cls = torch.storage.TypedStorage if doc["storage"] == "TypedStorage" else torch.UntypedStorage
    return (torch.Tensor, torch.Size(doc["size"]), tuple(doc["stride"]), doc["offset"], storage_cls, dtype,
            doc["device"], handle, doc["storage_bytes"], doc["storage_offset_bytes"], False,
            ref_counter, doc["ref_counter_offset"], event, doc["event_sync"])


def gpu_uuid(device: Any) -> str:
    """The UUID of a CUDA device of this process (stable across processes, unlike its index)."""
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


def import_doc(doc: Any):
    """The CUDA tensor a ``handle_doc`` names, rebuilt in this process (initializes CUDA): a view
    of the exporter's GPU memory, alive while this tensor is (torch's IPC ref-counter)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*ipc_args(doc))


def _address(buf: Any) -> tuple[int, int, bool]:
    """``(address, nbytes, readonly)`` of a buffer, without copying it (read-only ones too)."""
    mv = memoryview(buf)
    arr = np.frombuffer(mv, dtype=np.uint8)
    return int(arr.ctypes.data), arr.nbytes, mv.readonly


def pin_host_buffer(buf: Any) -> bool:
    """Page-lock ``buf`` (an arena mapping, read-only or not) with ``cudaHostRegister`` so that
    copies from it to a GPU run at pinned speed; True if pinned now (idempotent). Call
    ``unpin_host_buffer`` before the mapping is closed.

    Without a GPU: False, touching nothing. A CUDA failure (the locked-memory limit, a device
    without read-only registration) logs a warning and returns False: copies still work, at
    pageable speed.
    NOTE: ``cudaHostRegisterPortable``: pinned for every GPU's context, whichever device the
    process copies to (torch's own ``pin_memory`` passes it too).
    """
    return _set_pinned(buf, True)


def unpin_host_buffer(buf: Any) -> bool:
    """Undo ``pin_host_buffer``; False if ``buf`` was not pinned or there is no GPU."""
    return _set_pinned(buf, False)


def _set_pinned(buf: Any, pin: bool) -> bool:
    if not cuda_available():
        return False
    import torch

    ptr, nbytes, readonly = _address(buf)
    cudart = torch.cuda.cudart()
    torch.cuda.init()
    if pin:
        flags = HOST_REGISTER_PORTABLE | (HOST_REGISTER_READ_ONLY if readonly else 0)
        err = cudart.cudaHostRegister(ptr, nbytes, flags)
    else:
        err = cudart.cudaHostUnregister(ptr)
    code = int(getattr(err, "value", err))
    if code == (_ALREADY_REGISTERED if pin else _NOT_REGISTERED):
        _drain_last_error()
        return pin
    if err != cudart.cudaError.success:
        logger.warning("cudaHost%sregister of %d bytes%s failed: %s", "" if pin else "Un", nbytes,
                       " (read-only)" if readonly else "", cudart.cudaGetErrorString(err))
        _drain_last_error()
        return False
    return True


def _drain_last_error() -> None:
    # NOTE: a failed runtime call stays the thread's "last error" and torch's next kernel-launch
    # check (cudaGetLastError) would raise it from an unrelated op; one tiny kernel consumes it.
    import torch

    try:
        torch.zeros(1, device="cuda")
    except RuntimeError as exc:
        logger.debug("consumed the stale CUDA error: %s", exc)
