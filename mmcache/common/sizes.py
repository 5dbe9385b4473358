"""Sizes as people write them: ``4GiB``, ``512MB``, ``1024``."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """``4GiB`` → 4294967296, ``512MB`` → 512000000, ``1024`` → 1024. Raises ``ValueError``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r} must be a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
