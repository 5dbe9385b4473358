"""Fuzz target: the tenants file (``--tenants FILE``: tokens → tenants and quotas), TOML or JSON.

Bad input may raise ``ValueError`` only, naming the file. A file that loads must give every token
it names the tenant it names, and every quota must be a positive number of bytes."""

from __future__ import annotations

from harness import instrumented, main

with instrumented():
    from mmcache.common.tenants import Tenants


def test_one_input(data: bytes) -> None:
    path = "tenants.json" if data[:1] == b"{" else "tenants.toml"
    try:
        tenants = Tenants.parse(data, path, admin_token="admin-token-for-the-fuzzer")
    except ValueError as e:
        assert path in str(e) or "tenant" in str(e) or "token" in str(e), str(e)
        return
    assert tenants.names and all(isinstance(n, str) for n in tenants.names)
    assert all(isinstance(q, int) and q > 0 for q in tenants.quotas.values())
    assert set(tenants.quotas) <= set(tenants.names)
    assert tenants.authenticate("admin-token-for-the-fuzzer").trusted
    assert tenants.authenticate("no-such-token-anywhere-0123456789") is None or \
        tenants.authenticate("no-such-token-anywhere-0123456789").tenant in tenants.names


if __name__ == "__main__":
    main(test_one_input)
