"""Fuzz target: the key parser (``Key.from_string``), run on every key a client names (HTTP paths,
JSON bodies, Unix frames, manifests).

Bad input may raise ``ValueError`` only. A key that parses must survive its own round trip, keep
its parts within their documented alphabets and lengths, and be scoped by a tenant without
losing its plain part."""

from __future__ import annotations

import atheris

from harness import instrumented, main

with instrumented():
    from mmcache_client.keys import Key, validate_tenant


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300)) if fdp.ConsumeBool() \
        else data.decode("utf-8", "replace")
    try:
        key = Key.from_string(text)
    except ValueError:
        return
    assert key.to_string() == text, (key, text)
    assert Key.from_string(key.to_string()) == key
    assert "/" not in key.hash and "@" not in key.namespace and "\n" not in text
    assert key.plain == f"{key.namespace}/{key.hash}"
    tenant = fdp.ConsumeUnicodeNoSurrogates(20)
    try:
        validate_tenant(tenant)
    except ValueError:
        return
    scoped = key.scoped(tenant)
    assert scoped.plain == key.plain and Key.from_string(scoped.to_string()) == scoped


if __name__ == "__main__":
    main(test_one_input)
