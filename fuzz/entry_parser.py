"""Fuzz target: the entry (safetensors) parser, ``parse_entry`` / ``read_entry``, which every tier
runs on bytes from disk, the network or a local writer.

Bad input may raise ``EntryFormatError`` only. An entry that parses must describe only bytes
inside the buffer: every tensor's span within the data section, its length what its dtype and
shape say, and a view of it readable without error."""

from __future__ import annotations

import math

from harness import instrumented, main

with instrumented():
    from mmcache_client.entry_reader import EntryView, parse_entry, verify_checksum
    from mmcache_client.entry_spec import DTYPES
    from mmcache_client.format import EntryFormatError


def test_one_input(data: bytes) -> None:
    for strict in (True, False):
        try:
            parsed = parse_entry(data, strict=strict)
        except EntryFormatError:
            continue
        assert parsed.total_bytes == len(data), (parsed.total_bytes, len(data))
        assert 8 <= parsed.data_start <= len(data)
        for name, t in parsed.tensors.items():
            assert parsed.data_start <= t.start <= t.end <= len(data), (name, t)
            assert all(isinstance(d, int) and d >= 0 for d in t.shape), t.shape
            assert t.end - t.start == math.prod(t.shape) * DTYPES[t.dtype].itemsize, t
            view = EntryView(data, parsed).get_array(name)
            assert view.nbytes == t.end - t.start
        if strict:
            assert isinstance(parsed.metadata, dict) and all(isinstance(v, str) for v in parsed.metadata.values())
            try:
                verify_checksum(data, parsed)
            except EntryFormatError:
                pass


if __name__ == "__main__":
    main(test_one_input)
