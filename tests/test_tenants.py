"""Tenants: ``mmcache serve --tenants FILE`` scopes every request to its token's
tenant, so two tenants' ``ns/hash`` are different entries on every route (GET, HEAD, PUT, DELETE,
lookup, batch_get) and over the Unix socket; the default tenant (the sidecar's own token, a local
connection without one) may act for a tenant; stats are per tenant as well as in total.

The sidecar runs as users run it, in its own process (``mmcache serve``)."""

from __future__ import annotations

import http.client
import json
import os
import random

import numpy as np
import pyarrow as pa
import pytest

from mmcache.common.tenants import DEFAULT, Forbidden, Principal, Tenants
from mmcache_client import AsyncCacheClient, AuthError, CacheClient, Forbidden as SDKForbidden, Key, content_hash
from entries import encode_entry
from sidecar import SidecarProcess

NS = "tenants"
ALICE, BOB, ADMIN = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef", "admin-token-0123456789abcdef"


def h(name) -> str:
    return content_hash(str(name).encode())


def emb(value: float, n: int = 8) -> np.ndarray:
    return np.full((n, 16), value, dtype=np.float32)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    path = tmp / "tenants.toml"
    path.write_text(f'"{ALICE}" = "alice"\n"{BOB}" = "bob"\n')
    path.chmod(0o600)
    sock_dir = f"/tmp/mmc-t-{os.getpid()}-{random.randrange(1 << 30)}"
    os.makedirs(sock_dir)
    sock = os.path.join(sock_dir, "s.sock")
    sc = SidecarProcess("--data-dir", str(tmp / "d"), "--host-capacity", "16MiB", "--socket", sock,
                        "--tenants", str(path), "--token", ADMIN).start()
    sc.sock = sock
    yield sc
    sc.stop()
    os.rmdir(sock_dir)


def request(sc, method, path, body=None, token=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp, data


def test_the_same_key_is_two_entries_for_two_tenants_on_every_route(sidecar):
    key = h("shared-image")
    a, b = CacheClient(sidecar.url, token=ALICE), CacheClient(sidecar.url, token=BOB)
    with a, b:
        assert a.put(NS, key, emb(1.0))
        # B cannot see A's entry: GET, HEAD, lookup, batch_get all miss
        assert b.get(NS, key) is None
        assert not b.exists(NS, key)
        assert b.lookup([f"{NS}/{key}"]) == {f"{NS}/{key}": None}
        status, _, data = request(sidecar, "POST", "/v1/batch_get", json.dumps({"keys": [f"{NS}/{key}"]}), BOB)
        assert status == 200 and pa.ipc.open_stream(data).read_all().num_rows == 0
        # B cannot delete it
        assert not b.delete(NS, key)
        # B's put of the same key is B's own entry, and does not overwrite A's
        assert b.put(NS, key, emb(2.0))
        with a.get(NS, key) as ea, b.get(NS, key) as eb:
            assert float(ea.array[0, 0]) == 1.0 and float(eb.array[0, 0]) == 2.0
        # the answers name keys as the tenant wrote them
        assert a.lookup([f"{NS}/{key}"]) == {f"{NS}/{key}": "host"}
        status, _, data = request(sidecar, "POST", "/v1/batch_get", json.dumps({"keys": [f"{NS}/{key}"]}), ALICE)
        table = pa.ipc.open_stream(data).read_all()
        assert table.column("key").to_pylist() == [f"{NS}/{key}"]
        status, _, data = request(sidecar, "PUT", f"/v1/entries/{NS}/{h('x')}",
                                  encode_entry(NS, h("x"), {"embeddings": emb(3.0)}), ALICE)
        assert status == 201 and json.loads(data)["key"] == f"{NS}/{h('x')}"
        # A's delete removes A's only
        assert a.delete(NS, key)
        assert a.get(NS, key) is None
        with b.get(NS, key) as eb:
            assert float(eb.array[0, 0]) == 2.0


def test_a_tenant_cannot_name_another_tenants_keys(sidecar):
    key = h("named")
    with CacheClient(sidecar.url, token=ALICE) as a:
        assert a.put(NS, key, emb(4.0))
    for path, method, body in [
        ("/v1/lookup", "POST", json.dumps({"keys": [f"alice@{NS}/{key}"]})),
        ("/v1/batch_get", "POST", json.dumps({"keys": [f"alice@{NS}/{key}"]})),
    ]:
        status, _, data = request(sidecar, method, path, body, BOB)
        assert status == 403 and "another tenant" in json.loads(data)["error"]
    status, _, data = request(sidecar, "GET", f"/v1/entries/{NS}/{key}", token=BOB,
                              headers={"X-MMCache-Tenant": "alice"})
    assert status == 403
    status, _, _ = request(sidecar, "GET", f"/v1/entries/alice@{NS}/{key}", token=BOB)
    assert status == 400  # '@' is no namespace character
    status, _, _ = request(sidecar, "GET", "/metrics", token=BOB)
    assert status == 403
    with CacheClient(sidecar.url, token=BOB) as b:
        with pytest.raises(SDKForbidden):
            b.lookup([f"alice@{NS}/{key}"])


def test_a_wrong_or_missing_token_is_401(sidecar):
    assert request(sidecar, "GET", f"/v1/entries/{NS}/{h(1)}", token="nobody-0123456789abcdef")[0] == 401
    assert request(sidecar, "GET", f"/v1/entries/{NS}/{h(1)}")[0] == 401
    assert request(sidecar, "GET", "/healthz")[0] == 200
    with CacheClient(sidecar.url, token="nobody-0123456789abcdef") as c, pytest.raises(AuthError):
        c.get(NS, h(1))


def test_the_default_tenant_acts_for_a_tenant(sidecar):
    """The sidecar's own token (an encoder, a prefill worker) reads and writes in a tenant's scope
    with ``tenant@ns/hash`` keys or ``X-MMCache-Tenant``; its own plain keys are a third scope."""
    key = h("acted")
    with CacheClient(sidecar.url, token=ADMIN) as admin, CacheClient(sidecar.url, token=ALICE) as a:
        status, _, _ = request(sidecar, "PUT", f"/v1/entries/{NS}/{key}",
                               encode_entry(NS, key, {"embeddings": emb(5.0)}), ADMIN, {"X-MMCache-Tenant": "alice"})
        assert status == 201
        with a.get(NS, key) as e:
            assert float(e.array[0, 0]) == 5.0
        assert admin.get(NS, key) is None  # the default tenant's own scope
        assert admin.lookup([f"alice@{NS}/{key}"]) == {f"alice@{NS}/{key}": "host"}
        assert admin.lookup([f"bob@{NS}/{key}"]) == {f"bob@{NS}/{key}": None}


def test_the_unix_socket_scopes_by_hello_token(sidecar):
    key = h("local")
    with CacheClient(sidecar.url, token=ALICE) as a:
        assert a.put(NS, key, emb(6.0))
    with CacheClient(f"unix://{sidecar.sock}", token=BOB) as b:
        assert b.get(NS, key) is None and not b.exists(NS, key)
        assert b.put(NS, key, emb(7.0))  # B's own, in place through the arena
        with b.get(NS, key) as e:
            assert float(e.array[0, 0]) == 7.0
        with pytest.raises(SDKForbidden):
            b.lookup([f"alice@{NS}/{key}"])
    with CacheClient(f"unix://{sidecar.sock}", token=ALICE) as a:
        with a.get(NS, key) as e:
            assert float(e.array[0, 0]) == 6.0
    with CacheClient(f"unix://{sidecar.sock}") as local:  # no token: the default tenant
        assert local.get(NS, key) is None
        assert local.lookup([f"alice@{NS}/{key}", f"bob@{NS}/{key}"]) == {
            f"alice@{NS}/{key}": "host", f"bob@{NS}/{key}": "host"}
        with local.get(f"alice@{NS}", key) as e:  # the SDK's tenant@namespace: acting for alice
            assert float(e.array[0, 0]) == 6.0
    with pytest.raises(SDKForbidden):
        CacheClient(f"unix://{sidecar.sock}", token="nobody-0123456789abcdef").exists(NS, key)


async def test_the_async_sdk_over_unix_is_scoped_too(sidecar):
    key = h("async")
    async with AsyncCacheClient(f"unix://{sidecar.sock}", token=ALICE) as a:
        assert await a.put(NS, key, emb(8.0))
    async with AsyncCacheClient(f"unix://{sidecar.sock}", token=BOB) as b:
        assert await b.get(NS, key) is None
    with CacheClient(sidecar.url, token=ALICE) as a, a.get(NS, key) as e:
        assert float(e.array[0, 0]) == 8.0


def test_a_tenants_disk_entry_is_read_in_place_under_its_stored_key(tmp_path):
    """Host cannot take it: the local client reads LMDB in place by the key the store holds
    (``tenant@ns/hash``), not by the plain key it asked for."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({ALICE: "alice"}))
    path.chmod(0o600)
    sock = f"/tmp/mmc-t2-{os.getpid()}-{random.randrange(1 << 30)}.sock"
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), "--host-capacity", "1MiB", "--socket", sock,
                        "--tenants", str(path)).start()
    try:
        big = np.random.default_rng(1).standard_normal((8192, 64), dtype=np.float32)  # 2 MiB: over the arena
        with CacheClient(sc.url, token=ALICE) as w:  # over HTTP: it lands on disk
            assert w.put(NS, h("big"), big)
        with CacheClient(f"unix://{sock}", token=ALICE) as a:
            with a.get(NS, h("big")) as e:
                assert e.tier == "disk" and np.array_equal(e.array, big)
        with CacheClient(f"unix://{sock}") as local:
            assert local.get(NS, h("big")) is None
    finally:
        sc.stop()


def test_stats_are_per_tenant_and_in_total(sidecar):
    with CacheClient(sidecar.url, token=ALICE) as a:
        mine = a.stats()
        assert mine["tenant"] == "alice" and "host" not in mine  # no totals, no other tenant
        assert mine["usage"]["host"]["entries"] >= 1 and mine["requests"]["puts"] >= 1
    with CacheClient(sidecar.url, token=ADMIN) as admin:
        doc = admin.stats()
        assert {"alice", "bob", "(default)"} <= set(doc["tenants"])
        per = sum(t["usage"].get("host", {}).get("entries", 0) for t in doc["tenants"].values())
        assert per == doc["host"]["entries"]  # the tenants add up to the total
    status, _, _ = request(sidecar, "GET", "/metrics", token=ADMIN)
    assert status == 200


# ---------------------------------------------------------------- units

def test_principal_scoping():
    k = Key(NS, h(1))
    assert Principal("a").scope(k) == Key(NS, h(1), "a")
    assert Principal("a").shown(Key(NS, h(1), "a")) == f"{NS}/{h(1)}"
    with pytest.raises(Forbidden):
        Principal("a").scope(Key(NS, h(1), "b"))
    with pytest.raises(Forbidden):
        Principal("a").scope(k, acting_for="b")
    assert DEFAULT.scope(k) == k and DEFAULT.scope(k, "b") == Key(NS, h(1), "b")
    assert DEFAULT.scope(Key(NS, h(1), "c"), "b") == Key(NS, h(1), "c")
    assert Key.from_string(f"a@{NS}/{h(1)}") == Key(NS, h(1), "a")
    with pytest.raises(ValueError):
        Key.from_string(f"a b@{NS}/{h(1)}")


def test_tenants_file_checks(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('"tok-aaaaaaaaaaaaaaaa" = "alice"\n')
    p.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        Tenants.load(str(p))
    p.chmod(0o600)
    t = Tenants.load(str(p), admin_token="admin-aaaaaaaaaaaaaaaa")
    assert t.authenticate("tok-aaaaaaaaaaaaaaaa") == Principal("alice")
    assert t.authenticate("admin-aaaaaaaaaaaaaaaa") == DEFAULT
    assert t.authenticate("nope") is None and t.authenticate(None) is None
    p.write_text('"tok-aaaaaaaaaaaaaaaa" = "not a name"\n')
    with pytest.raises(ValueError):
        Tenants.load(str(p))
    p.write_text('[tokens]\n"tok-aaaaaaaaaaaaaaaa" = "bob"\n')
    assert Tenants.load(str(p)).authenticate("tok-aaaaaaaaaaaaaaaa") == Principal("bob")
    with pytest.raises(ValueError, match="own token"):
        Tenants({"same-aaaaaaaaaaaaaaaa": "alice"}, admin_token="same-aaaaaaaaaaaaaaaa")


def test_a_tenant_lists_its_own_entries_only(sidecar):
    key = h("listed")
    with CacheClient(sidecar.url, token=ALICE) as a, CacheClient(sidecar.url, token=BOB) as b:
        a.put("listing", key, emb(1.0))
        b.put("listing", key, emb(2.0))
        b.put("listing-b", h("b-only"), emb(3.0))
        assert [e["key"] for e in a.iter_entries("listing")] == [f"listing/{key}"]  # written without its tenant
        assert all(e["key"].startswith(("listing", "tenants")) and "@" not in e["key"] for e in a.iter_entries())
        assert {e["key"] for e in b.iter_entries()} >= {f"listing/{key}", f"listing-b/{h('b-only')}"}
        assert not any("b-only" in e["key"] or e["key"].startswith("listing-b") for e in a.iter_entries())
    with CacheClient(f"unix://{sidecar.sock}", token=BOB) as b:
        assert [e["key"] for e in b.iter_entries("listing")] == [f"listing/{key}"]
    with CacheClient(sidecar.url, token=ADMIN) as admin:  # the default tenant sees every tenant's, scoped
        everything = {e["key"] for e in admin.iter_entries()}
        assert {f"alice@listing/{key}", f"bob@listing/{key}"} <= everything
        assert admin.list_entries("listing")["entries"] == []  # no unscoped entry in that namespace
    status, _, data = request(sidecar, "GET", "/v1/entries?namespace=listing", token=ADMIN,
                              headers={"X-MMCache-Tenant": "alice"})
    assert status == 200 and [e["key"] for e in json.loads(data)["entries"]] == [f"alice@listing/{key}"]
    status, _, data = request(sidecar, "GET", "/v1/entries", token=ALICE, headers={"X-MMCache-Tenant": "bob"})
    assert status == 403 and "list" in json.loads(data)["error"]


def test_the_default_tenant_acts_for_a_tenant_on_every_single_key_route_over_http(sidecar):
    """``tenant@ns`` over HTTP: the SDK sends ``/v1/entries/ns/hash`` with ``X-MMCache-Tenant``
    ('@' is no namespace character on a path) on PUT, GET, HEAD and DELETE."""
    key = h("acted-over-http")
    with CacheClient(sidecar.url, token=ADMIN) as admin, CacheClient(sidecar.url, token=ALICE) as a:
        assert admin.put(f"alice@{NS}", key, emb(9.0))
        assert admin.put_blob(f"alice@{NS}", h("blob-over-http"), encode_entry(NS, h("blob-over-http"),
                                                                                {"embeddings": emb(9.5)}))
        assert not admin.put(f"alice@{NS}", key, emb(10.0))  # the first put is kept
        with admin.get(f"alice@{NS}", key) as e:
            assert e.key == f"alice@{NS}/{key}" and float(e.array[0, 0]) == 9.0
        assert admin.exists(f"alice@{NS}", key) and not admin.exists(f"bob@{NS}", key)
        assert admin.get(NS, key) is None and not admin.exists(NS, key)  # the default tenant's own scope
        with a.get(NS, key) as e, a.get(NS, h("blob-over-http")) as b:  # alice sees it with her own token
            assert float(e.array[0, 0]) == 9.0 and float(b.array[0, 0]) == 9.5
        assert admin.delete(f"alice@{NS}", key) and not admin.delete(f"alice@{NS}", key)
        assert a.get(NS, key) is None and not a.exists(NS, key)
    with CacheClient(sidecar.url, token=ALICE) as a, pytest.raises(SDKForbidden):
        a.get(f"bob@{NS}", key)  # a tenant may not act for another


async def test_the_async_sdk_acts_for_a_tenant_over_http(sidecar):
    key = h("acted-async")
    async with AsyncCacheClient(sidecar.url, token=ADMIN) as admin:
        assert await admin.put(f"alice@{NS}", key, emb(11.0))
        async with await admin.get(f"alice@{NS}", key) as e:
            assert float(e.array[0, 0]) == 11.0
        assert await admin.exists(f"alice@{NS}", key)
        with CacheClient(sidecar.url, token=ALICE) as a, a.get(NS, key) as mine:
            assert float(mine.array[0, 0]) == 11.0
        assert await admin.delete(f"alice@{NS}", key)
        assert not await admin.exists(f"alice@{NS}", key)
