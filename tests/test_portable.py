"""``mmcache export`` / ``mmcache import``: a sidecar's entries to a folder of
safetensors shards + a Parquet manifest, and back into a fresh sidecar bit for bit; a shard that
fails any check is refused whole and named, the others imported. Real sidecars (threaded, with a
Unix socket), tiny entries, several shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from mmcache.ops.export_format import MANIFEST, MANIFEST_KEY, SHARD_FORMAT, manifest_schema
from mmcache.ops import portable
from mmcache.ops.portable import export_entries, import_export
from mmcache.common.progress import Progress
from mmcache_client import CacheClient, CacheFull, CacheUnavailable, content_hash
from mmcache_client.format import read_entry
from sidecar import unix_sidecar

SHARD_SIZE = 4096
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def h(i) -> str:
    return content_hash(f"portable-{i}".encode())


def fill(client: CacheClient, n: int = 24, namespaces=("ns-a", "ns-b")) -> None:
    """Entries of every dtype, some with ``image_grid_thw`` and metadata of their own, one larger
    than a shard."""
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        rows = 64 if i == 5 else 3 + i % 7
        emb = torch.randn(rows, 32, generator=gen).to(DTYPES[i % 3])
        extras = {"image_grid_thw": torch.tensor([[1, 2 * (i + 1), 4]])} if i % 4 == 1 else None
        client.put(namespaces[i % len(namespaces)], h(i), emb, metadata={"model": f"tiny-{i % 2}"},
                   extras=extras, encode_ms=1.5 * i)


def blobs(url: str, namespace: str | None = None) -> dict[str, bytes]:
    """Every entry a client sees, as its whole safetensors bytes."""
    with CacheClient(url) as c:
        keys = [e["key"] for e in c.iter_entries(namespace)]
        with c.get_many(keys) as entries:
            return {k: bytes(e.buffer) for k, e in zip(keys, entries)}


def quiet(what: str) -> Progress:
    return Progress(what, stream=io.StringIO(), bar=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    with unix_sidecar(str(tmp_path_factory.mktemp("source"))) as sc:
        with CacheClient(sc.unix_url) as c:
            fill(c)
        sc.blobs = blobs(sc.url)
        yield sc


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exports") / "all")
    with CacheClient(source.url) as c:
        summary = export_entries(c, out, shard_size_bytes=SHARD_SIZE)
    return out, summary


@pytest.fixture
def target(tmp_path):
    with unix_sidecar(str(tmp_path / "target")) as sc:
        yield sc


def shards_of(out: str) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))


def test_export_then_import_gives_back_every_entry_bit_for_bit_and_again_skips_all(source, target, tmp_path):
    # exported over the Unix socket (zero-copy views) here, over HTTP in the module's export
    out = str(tmp_path / "export")
    with CacheClient(source.unix_url) as c:
        summary = export_entries(c, out, shard_size_bytes=SHARD_SIZE)
    assert summary["entries"] == len(source.blobs) == 24 and summary["gone"] == 0
    assert summary["shards"] == len(shards_of(out)) > 3
    with CacheClient(target.unix_url) as c:
        first = import_export(out, c, progress=quiet("import"))
        again = import_export(out, c)
    assert (first["imported"], first["skipped"], first["refused"]) == (24, 0, 0)
    assert (again["imported"], again["skipped"], again["refused"]) == (0, 24, 0)
    assert blobs(target.url) == source.blobs


def test_import_over_http_of_an_http_export(source, exported, target):
    out, summary = exported
    with CacheClient(target.url) as c:
        result = import_export(out, c, durable=True)
    assert result["imported"] == summary["entries"] == 24 and result["bytes"] == summary["bytes"]
    got = blobs(target.url)
    assert got == source.blobs
    with CacheClient(target.url) as c, c.get("ns-b", h(1)) as e:  # an extra and metadata of its own survive
        assert e.metadata["model"] == "tiny-1" and e.metadata["encode_ms"] == 1.5
        assert e.get_array("image_grid_thw").tolist() == [[1, 4, 4]]


def test_an_export_is_plain_safetensors_and_parquet(source, exported):
    out, summary = exported
    table = pq.read_table(os.path.join(out, MANIFEST))
    assert table.column_names == ["key", "namespace", "hash", "tenant", "num_tokens", "dtype", "shape", "checksum",
                                  "encode_ms", "created_at", "nbytes", "shard", "tensors", "metadata"]
    info = json.loads(pq.read_metadata(os.path.join(out, MANIFEST)).metadata[MANIFEST_KEY])
    assert info["format"] == "mmcache-export/1" and info["entries"] == 24 and info["source"] == source.url
    assert [s["name"] for s in info["shards"]] == shards_of(out)
    assert sorted(os.listdir(out)) == [MANIFEST, *shards_of(out)]  # no temp file left
    assert any(s["bytes"] > SHARD_SIZE and s["entries"] == 1 for s in info["shards"])  # the 8 KiB entry
    rows = table.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(source.blobs)
    for shard in info["shards"]:
        path = os.path.join(out, shard["name"])
        data = open(path, "rb").read()
        assert (len(data), blake3.blake3(data).hexdigest()) == (shard["bytes"], shard["blake3"])
        mine = [r for r in rows if r["shard"] == shard["name"]]
        assert len(mine) == shard["entries"]
        assert len(data) <= SHARD_SIZE or len(mine) == 1  # an entry larger than a shard has one of its own
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": SHARD_FORMAT}
        tensors = load_file(path)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        for r in mine:
            with CacheClient(source.url) as c, c.get(r["namespace"], r["hash"]) as e:
                for name in e.names:
                    assert torch.equal(tensors[f"{r['key']}/{name}"], e.get_tensor(name))
                assert r["tensors"] == [f"{r['key']}/{n}" for n in e.names]
                assert json.loads(r["metadata"]) == read_entry(bytes(e.buffer)).metadata
                assert (r["encode_ms"], r["created_at"]) == (e.metadata["encode_ms"], e.metadata["created_at"])
                assert (r["dtype"], r["shape"], r["num_tokens"]) == (
                    {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[e.tensor.dtype],
                    list(e.tensor.shape), e.tensor.shape[0])
            start, end = header[f"{r['key']}/embeddings"]["data_offsets"]
            assert (8 + header_len + start) % 8 == 0  # numpy.frombuffer can view it in place
            last = header[r["tensors"][-1]]["data_offsets"][1]
            assert xxhash.xxh3_64_hexdigest(data[8 + header_len + start : 8 + header_len + last]) == r["checksum"]
            assert last - start == r["nbytes"]
            view = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=8 + header_len + start)
            assert view.tobytes() == tensors[f"{r['key']}/embeddings"].view(torch.uint8).flatten().numpy().tobytes()
    assert sum(r["nbytes"] for r in rows) == summary["bytes"]


def test_a_namespace_alone(source, exported, target, tmp_path):
    out = str(tmp_path / "ns-b")
    with CacheClient(source.url) as c:
        summary = export_entries(c, out, namespace="ns-b", shard_size_bytes=SHARD_SIZE)
    assert summary["entries"] == 12
    assert set(pq.read_table(os.path.join(out, MANIFEST)).column("namespace").to_pylist()) == {"ns-b"}
    with CacheClient(target.unix_url) as c:
        result = import_export(exported[0], c, namespace="ns-a")
        assert result["imported"] == 12 and result["skipped"] == 0
        assert blobs(target.url) == {k: v for k, v in source.blobs.items() if k.startswith("ns-a/")}
        with pytest.raises(ValueError, match="namespace"):
            import_export(exported[0], c, namespace="bad/ns")


def rewrite_shard_table(out: str, shard: str) -> None:
    """Make the manifest agree with ``shard`` as it now is (size, BLAKE3): a tamperer who knows
    the format, so that the checks behind the shard table have to catch it."""
    path = os.path.join(out, MANIFEST)
    table = pq.read_table(path)
    info = json.loads(pq.read_metadata(path).metadata[MANIFEST_KEY])
    data = open(os.path.join(out, shard), "rb").read()
    for rec in info["shards"]:
        if rec["name"] == shard:
            rec["bytes"], rec["blake3"] = len(data), blake3.blake3(data).hexdigest()
    with pq.ParquetWriter(path, table.schema) as w:
        w.write_table(table)
        w.add_key_value_metadata({MANIFEST_KEY.decode(): json.dumps(info)})


def tamper(out: str, shard: str, how: str) -> None:
    """``data``: flip the last byte of the shard (its last entry's); ``header``: give an entry's
    embeddings another dtype of the same size, so that the header still tiles the data;
    ``length``: a header length past the file; ``missing``: no shard at all. ``+manifest``: the
    shard table made to agree with the shard as it now is."""
    path = os.path.join(out, shard)
    if how == "missing":
        os.unlink(path)
        return
    data = bytearray(open(path, "rb").read())
    header_len = int.from_bytes(data[:8], "little")
    if how.startswith("length"):
        data[:8] = (1 << 40).to_bytes(8, "little")
    elif how.startswith("data"):
        data[-1] ^= 0x01
    else:
        header = json.loads(data[8 : 8 + header_len])
        rec = next(rec for name, rec in header.items() if name.endswith("/embeddings"))
        rec["dtype"] = {"F16": "BF16", "BF16": "F16", "F32": "I32"}[rec["dtype"]]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        data[: 8 + header_len] = len(text).to_bytes(8, "little") + text
    open(path, "wb").write(bytes(data))
    if how.endswith("+manifest"):
        rewrite_shard_table(out, shard)


@pytest.mark.parametrize("how, why", [
    ("data", "BLAKE3"), ("header", "BLAKE3"),
    ("data+manifest", "checksum"), ("header+manifest", "in the shard, the manifest says"),
    ("length+manifest", "header: length 1099511627776"), ("missing", "No such file")])
def test_a_tampered_shard_is_refused_whole_and_named_and_the_others_imported(source, exported, target, tmp_path,
                                                                              how, why):
    out = str(tmp_path / "copy")
    shutil.copytree(exported[0], out)
    victim = shards_of(out)[1]
    tamper(out, victim, how)
    rows = pq.read_table(os.path.join(out, MANIFEST)).to_pylist()
    lost = {r["key"] for r in rows if r["shard"] == victim}
    assert lost
    progress = quiet("import")
    with CacheClient(target.unix_url) as c:
        result = import_export(out, c, progress=progress)
    assert result["refused_shards"] == [victim] and result["refused"] == len(lost)
    assert result["imported"] == len(rows) - len(lost)
    said = progress.stream.getvalue()
    assert os.path.join(out, victim) in said and "refused" in said and why in said, said
    got = blobs(target.url)
    assert not lost & set(got)  # nothing of the refused shard
    assert got == {k: v for k, v in source.blobs.items() if k not in lost}


def test_a_missing_garbled_or_foreign_manifest_is_a_clear_error(exported, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(exported[0], out)
    manifest = os.path.join(out, MANIFEST)
    with CacheClient("http://127.0.0.1:9") as c:  # never reached: the manifest is read first
        os.rename(manifest, manifest + ".away")
        with pytest.raises(ValueError, match=f"{manifest}: missing"):
            import_export(out, c)
        with open(manifest, "wb") as f:
            f.write(os.urandom(4096))
        with pytest.raises(ValueError, match=f"{manifest}: not a readable Parquet"):
            import_export(out, c)
        pq.write_table(pq.read_table(manifest + ".away"), manifest)  # rows, but no mmcache.export metadata
        with pytest.raises(ValueError, match="not an mmcache export"):
            import_export(out, c)
        os.replace(manifest + ".away", manifest)
        info = json.loads(pq.read_metadata(manifest).metadata[MANIFEST_KEY])
        table = pq.read_table(manifest)
        with pq.ParquetWriter(manifest, table.schema) as w:
            w.write_table(table)
            w.add_key_value_metadata({MANIFEST_KEY.decode(): json.dumps({**info, "format": "mmcache-export/9"})})
        with pytest.raises(ValueError, match="'mmcache-export/9'"):
            import_export(out, c)
        with pytest.raises(ValueError, match="no such folder"):
            import_export(str(tmp_path / "nowhere"), c)


def test_export_goes_into_a_new_or_empty_folder_only(source, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    with CacheClient(source.url) as c:
        with pytest.raises(ValueError, match=f"{busy} is not empty"):
            export_entries(c, str(busy))
        with pytest.raises(ValueError, match="not a folder"):
            export_entries(c, str(busy / "notes.txt"))
        assert export_entries(c, str(empty), namespace="ns-a")["entries"] == 12
    assert os.listdir(busy) == ["notes.txt"]


def test_an_entry_deleted_between_listing_and_fetch_is_counted_gone(tmp_path):
    class DeletesAfterListing(CacheClient):
        def iter_entries(self, namespace=None, *, page=1000):
            listed = list(super().iter_entries(namespace, page=page))
            assert self.delete("ns-a", h(0))
            yield from listed

    with unix_sidecar(str(tmp_path / "s")) as sc:
        with CacheClient(sc.unix_url) as c:
            fill(c, n=4, namespaces=("ns-a",))
        for url in (sc.unix_url, sc.url):
            with DeletesAfterListing(url) as c:
                summary = export_entries(c, str(tmp_path / url[:4]))
                c.put("ns-a", h(0), np.ones((2, 4), dtype=np.float32))  # back for the next round
            assert (summary["entries"], summary["gone"]) == (3, 1)
            keys = pq.read_table(os.path.join(tmp_path / url[:4], MANIFEST)).column("key").to_pylist()
            assert f"ns-a/{h(0)}" not in keys and len(keys) == 3


def test_a_full_cache_is_waited_out_not_a_failure(exported, target):
    class FullOnce(CacheClient):
        refusals = 0

        def put_blob(self, *args, **kw):
            if FullOnce.refusals < 2:
                FullOnce.refusals += 1
                raise CacheFull("everything is leased", retry_after_s=0.01)
            return super().put_blob(*args, **kw)

    with FullOnce(target.url) as c:
        result = import_export(exported[0], c)
    assert FullOnce.refusals == 2 and result["imported"] == 24 and result["failed"] == 0


def test_an_entry_too_large_for_the_target_fails_alone(exported, tmp_path):
    with unix_sidecar(str(tmp_path / "small"), max_entry_size_bytes=4096) as small, CacheClient(small.url) as c:
        progress = quiet("import")
        result = import_export(exported[0], c, progress=progress)
    assert (result["imported"], result["failed"], result["refused"]) == (23, 1, 0)
    assert f"ns-b/{h(5)}: not imported" in progress.stream.getvalue()  # the 8 KiB one


def test_a_failed_export_leaves_the_folder_as_it_found_it(source, tmp_path, monkeypatch):
    written: list[list[str]] = []

    class FailsLater(CacheClient):
        def get_many(self, keys, **kw):
            if len(written) == 3:
                written.append(sorted(os.listdir(self.out)))
                raise CacheUnavailable("the sidecar went away")
            written.append([])
            return super().get_many(keys, **kw)

    monkeypatch.setattr(portable, "FETCH_BATCH_KEYS", 4)  # several batches, shards closed before it fails
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "new"):
        written.clear()
        with FailsLater(source.url) as c, pytest.raises(CacheUnavailable):
            c.out = out
            export_entries(c, str(out), shard_size_bytes=1024)
        assert "shard-00001.safetensors" in written[-1] and "manifest.parquet.tmp" in written[-1]
        assert not os.path.exists(out) if out.name == "new" else os.listdir(out) == []


def test_importing_the_module_loads_no_pyarrow_or_safetensors():
    code = "import sys, mmcache.ops.portable; print(sorted(m for m in ('pyarrow', 'safetensors') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


ADMIN, ALICE, BOB = "admin-token-0123456789abcdef", "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


def test_tenants_export_and_import_as_the_caller_may(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'"{ALICE}" = "alice"\n"{BOB}" = "bob"\n')
    tenants.chmod(0o600)
    settings = {"tenants": str(tenants), "token": ADMIN}
    with unix_sidecar(str(tmp_path / "a"), **settings) as a, unix_sidecar(str(tmp_path / "b"), **settings) as b:
        with CacheClient(a.url, token=ALICE) as alice, CacheClient(a.url, token=ADMIN) as admin:
            alice.put("tn", h("t1"), np.full((3, 8), 1.0, dtype=np.float32))
            alice.put("tn", h("t2"), np.full((3, 8), 2.0, dtype=np.float32))
            admin.put("tn", h("t3"), np.full((3, 8), 3.0, dtype=np.float32))
            everything = export_entries(admin, str(tmp_path / "all"))  # the default tenant: every tenant's, scoped
            alices = export_entries(alice, str(tmp_path / "alice"))  # a tenant: its own, written plain
            only = export_entries(admin, str(tmp_path / "only"), namespace="alice@tn")
        assert (everything["entries"], alices["entries"], only["entries"]) == (3, 2, 2)
        rows = pq.read_table(str(tmp_path / "all" / MANIFEST)).to_pylist()
        assert sorted((r["tenant"] or "", r["namespace"]) for r in rows) == [
            ("", "tn"), ("alice", "tn"), ("alice", "tn")]
        assert {r["key"] for r in pq.read_table(str(tmp_path / "alice" / MANIFEST)).to_pylist()} == {
            f"tn/{h('t1')}", f"tn/{h('t2')}"}
        with CacheClient(b.unix_url) as local:  # the default tenant puts each back in its tenant's scope
            assert import_export(str(tmp_path / "all"), local, namespace="alice@tn")["imported"] == 2
            assert import_export(str(tmp_path / "all"), local)["imported"] == 1
        with CacheClient(b.url, token=BOB) as bob:  # a tenant's export goes into whoever imports it
            assert import_export(str(tmp_path / "alice"), bob)["imported"] == 2
        for src_token, dst_token, key in ((ALICE, ALICE, h("t1")), (ALICE, BOB, h("t2")), (ADMIN, ADMIN, h("t3"))):
            with CacheClient(a.url, token=src_token) as src, CacheClient(b.url, token=dst_token) as dst, \
                    src.get("tn", key) as x, dst.get("tn", key) as y:
                assert bytes(x.buffer) == bytes(y.buffer)
        with CacheClient(b.url, token=ALICE) as alice_b:
            assert {e["key"] for e in alice_b.iter_entries()} == {f"tn/{h('t1')}", f"tn/{h('t2')}"}


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmcache.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_the_cli_end_to_end(source, target, tmp_path):
    out = str(tmp_path / "cli-export")
    done = run_cli("export", source.url, out, "--shard-size", "4KiB")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["entries"], summary["out"]) == (24, out) and summary["shards"] == len(shards_of(out))
    assert "export: 24 entries" in done.stderr  # plain progress lines where standard error is no terminal
    done = run_cli("import", out, target.unix_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == 24
    assert "import: 24/24 entries (100%)" in done.stderr and "imported 24, skipped 0, refused 0" in done.stderr
    assert blobs(target.url) == source.blobs
    victim = shards_of(out)[0]
    tamper(out, victim, "data")
    done = run_cli("import", out, target.url, "--quiet")
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["refused_shards"] == [victim] and answer["imported"] == 0 and answer["skipped"] > 0
    assert os.path.join(out, victim) in done.stderr and f"refused 1 shard(s), nothing of them imported: {victim}" \
        in done.stderr
    done = run_cli("export", source.url, out)
    assert done.returncode == 2 and f"mmcache export: error: {out} is not empty" in done.stderr


# ------------------------------------------------------------------------------------ hostile input and edges

def rewrite_manifest(out: str, rows=None, info=None) -> tuple[list[dict], dict]:
    """Read the manifest's rows and info; write back ``rows`` / ``info`` where given."""
    path = os.path.join(out, MANIFEST)
    table = pq.read_table(path)
    old_rows, old_info = table.to_pylist(), json.loads(pq.read_metadata(path).metadata[MANIFEST_KEY])
    if rows is not None or info is not None:
        new = pa.Table.from_pylist(old_rows if rows is None else rows, schema=manifest_schema())
        with pq.ParquetWriter(path, new.schema) as w:
            w.write_table(new)
            w.add_key_value_metadata({MANIFEST_KEY.decode(): json.dumps(old_info if info is None else info)})
    return old_rows, old_info


def copy_of(exported, tmp_path, name: str = "copy") -> str:
    out = str(tmp_path / name)
    shutil.copytree(exported[0], out)
    return out


def test_tenants_export_and_import_over_http_and_a_tenant_importing_others_rows(tmp_path):
    """An admin export of several tenants imports over HTTP (each key through ``X-MMCache-Tenant``);
    a tenant's token importing it fails the other tenants' rows one by one, named, and goes on."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'"{ALICE}" = "alice"\n"{BOB}" = "bob"\n')
    tenants.chmod(0o600)
    settings = {"tenants": str(tenants), "token": ADMIN}
    with unix_sidecar(str(tmp_path / "a"), **settings) as a, unix_sidecar(str(tmp_path / "b"), **settings) as b, \
            unix_sidecar(str(tmp_path / "c"), **settings) as c:
        with CacheClient(a.url, token=ALICE) as alice, CacheClient(a.url, token=BOB) as bob, \
                CacheClient(a.url, token=ADMIN) as admin:
            alice.put("tn", h("t1"), np.full((3, 8), 1.0, dtype=np.float32))
            bob.put("tn", h("t2"), np.full((3, 8), 2.0, dtype=np.float32))
            admin.put("tn", h("t3"), np.full((3, 8), 3.0, dtype=np.float32))
            assert export_entries(admin, str(tmp_path / "all"))["entries"] == 3
        with CacheClient(b.url, token=ADMIN) as admin_b:
            result = import_export(str(tmp_path / "all"), admin_b)
            assert (result["imported"], result["failed"], result["refused"]) == (3, 0, 0)
            assert import_export(str(tmp_path / "all"), admin_b)["skipped"] == 3
        for token, key in ((ALICE, h("t1")), (BOB, h("t2")), (ADMIN, h("t3"))):
            with CacheClient(a.url, token=token) as src, CacheClient(b.url, token=token) as dst, \
                    src.get("tn", key) as x, dst.get("tn", key) as y:
                assert bytes(x.buffer) == bytes(y.buffer)
        done = run_cli("import", str(tmp_path / "all"), c.url, env={"MMCACHE_TOKEN": ALICE})
        assert done.returncode == 1, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["imported"], answer["failed"], answer["refused"]) == (1, 2, 0)  # the default's row: hers now
        for who, key in (("alice", h("t1")), ("bob", h("t2"))):
            assert f"{who}@tn/{key}: not imported" in done.stderr and "another tenant" in done.stderr
        assert "2 entries not imported" in done.stderr and "Traceback" not in done.stderr
        with CacheClient(c.url, token=ALICE) as alice_c:
            assert [e["key"] for e in alice_c.iter_entries()] == [f"tn/{h('t3')}"]


def test_a_tenant_naming_a_tenants_namespace_is_told_why(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'"{ALICE}" = "alice"\n"{BOB}" = "bob"\n')
    tenants.chmod(0o600)
    with unix_sidecar(str(tmp_path / "a"), tenants=str(tenants), token=ADMIN) as a:
        with CacheClient(a.url, token=BOB) as bob:
            bob.put("ns1", h("b1"), np.full((3, 8), 1.0, dtype=np.float32))
        for url in (a.url, a.unix_url):
            with CacheClient(url, token=ALICE) as alice:
                with pytest.raises(ValueError, match="tenant 'alice''s, which may not name a tenant's namespace"):
                    export_entries(alice, str(tmp_path / "x"), namespace="bob@ns1")
                assert not os.path.exists(tmp_path / "x")
        done = run_cli("export", a.url, str(tmp_path / "x"), "--namespace", "bob@ns1", env={"MMCACHE_TOKEN": ALICE})
        assert done.returncode == 2 and "may not name a tenant's namespace" in done.stderr
        with CacheClient(a.url, token=ADMIN) as admin:  # the sidecar's own token may
            assert export_entries(admin, str(tmp_path / "y"), namespace="bob@ns1")["entries"] == 1


def test_a_row_with_no_shard_refuses_the_manifest_naming_the_row(exported, target, tmp_path):
    out = copy_of(exported, tmp_path)
    rows, _ = rewrite_manifest(out)
    rows[3]["shard"] = None
    rewrite_manifest(out, rows)
    with CacheClient(target.unix_url) as c:
        with pytest.raises(ValueError, match=r"row 3 \(key '.*'\): shard 'None' is not a shard file name"):
            import_export(out, c)
        assert list(c.iter_entries()) == []  # surveyed before anything is imported
    done = run_cli("import", out, target.unix_url)
    assert done.returncode == 2 and "shard 'None' is not a shard file name" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_fifo_as_a_shard_or_as_the_manifest_is_refused_not_waited_on(exported, target, tmp_path):
    out = copy_of(exported, tmp_path)
    victim = shards_of(out)[1]
    lost = {r["key"] for r in rewrite_manifest(out)[0] if r["shard"] == victim}
    os.unlink(os.path.join(out, victim))
    os.mkfifo(os.path.join(out, victim))
    done = run_cli("import", out, target.unix_url, timeout=60)
    assert done.returncode == 1, done.stderr
    answer = json.loads(done.stdout)
    assert answer["refused_shards"] == [victim] and answer["imported"] == 24 - len(lost)
    assert f"{os.path.join(out, victim)}: refused: not a regular file (a FIFO)" in done.stderr
    os.unlink(os.path.join(out, MANIFEST))
    os.mkfifo(os.path.join(out, MANIFEST))
    done = run_cli("import", out, target.unix_url, timeout=60)
    assert done.returncode == 2
    assert f"{os.path.join(out, MANIFEST)}: refused: not a regular file (a FIFO)" in done.stderr


def test_a_shard_or_manifest_symlinked_outside_the_export_is_refused_and_its_target_never_named(
        exported, target, tmp_path):
    """The attack: a shard symlinked to a file outside the export folder was followed, and the
    refusal revealed the outside file's size. A link is refused before its target is looked at."""
    out = copy_of(exported, tmp_path)
    victim = shards_of(out)[0]
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x" * 12345)
    os.unlink(os.path.join(out, victim))
    os.symlink(outside, os.path.join(out, victim))
    done = run_cli("import", out, target.unix_url, timeout=60)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["refused_shards"] == [victim]
    assert f"{os.path.join(out, victim)}: refused: a symbolic link (not followed" in done.stderr
    assert "12345" not in done.stderr and "secret" not in done.stderr
    os.replace(os.path.join(out, MANIFEST), tmp_path / "manifest-elsewhere")
    os.symlink(tmp_path / "manifest-elsewhere", os.path.join(out, MANIFEST))
    done = run_cli("import", out, target.unix_url, timeout=60)
    assert done.returncode == 2 and "a symbolic link (not followed" in done.stderr
    assert "manifest-elsewhere" not in done.stderr


def test_a_key_in_two_shards_refuses_the_later_shard(source, exported, target, tmp_path):
    """Two valid shards holding the same key with different content: the later one is refused,
    naming the key; the first one's entry goes in."""
    out = copy_of(exported, tmp_path)
    key = f"ns-a/{h(0)}"
    with unix_sidecar(str(tmp_path / "other")) as other:
        with CacheClient(other.unix_url) as c:
            c.put("ns-a", h(0), np.full((5, 8), 7.0, dtype=np.float32))
            c.put("ns-a", h("only-here"), np.full((5, 8), 8.0, dtype=np.float32))
            export_entries(c, str(tmp_path / "other-export"))
    extra_rows, extra_info = rewrite_manifest(str(tmp_path / "other-export"))
    rows, info = rewrite_manifest(out)
    earlier = next(r["shard"] for r in rows if r["key"] == key)
    late = "shard-00099.safetensors"
    shutil.copy(tmp_path / "other-export" / extra_info["shards"][0]["name"], os.path.join(out, late))
    info["shards"].append({**extra_info["shards"][0], "name": late})
    info["entries"] += len(extra_rows)
    rows += [{**r, "shard": late, "tensors": list(r["tensors"])} for r in extra_rows]
    rewrite_manifest(out, rows, info)
    progress = quiet("import")
    with CacheClient(target.unix_url) as c:
        result = import_export(out, c, progress=progress)
    assert result["refused_shards"] == [late] and result["refused"] == 2 and result["imported"] == 24
    assert f"{os.path.join(out, late)}: refused: entry {key!r} is in {earlier} already" in progress.stream.getvalue()
    assert blobs(target.url) == source.blobs  # the first shard's content, nothing of the later one


def test_the_manifests_counts_are_checked(exported, target, tmp_path):
    out = copy_of(exported, tmp_path)
    rows, info = rewrite_manifest(out)
    victim = shards_of(out)[2]
    lost = [r for r in rows if r["shard"] == victim]
    rewrite_manifest(out, [r for r in rows if r["shard"] != victim])  # its rows removed, the rest as it was
    progress = quiet("import")
    with CacheClient(target.unix_url) as c:
        result = import_export(out, c, progress=progress)
    assert result["refused_shards"] == [victim] and result["refused"] == len(lost)
    assert result["imported"] == 24 - len(lost)
    said = progress.stream.getvalue()
    assert f"{os.path.join(out, victim)}: refused: the shard table says {len(lost)} entries, the manifest has no rows" \
        in said
    assert result["problems"] == [f"{os.path.join(out, MANIFEST)}: says 24 entries but has {24 - len(lost)} rows "
                                  "(rows added or removed since the export)"]
    done = run_cli("import", out, target.unix_url)
    assert done.returncode == 1 and "says 24 entries but has" in done.stderr
    rewrite_manifest(out, rows, {**info, "entries": 23})  # the rows back; the count alone lies
    with CacheClient(target.unix_url) as c:
        result = import_export(out, c)
    assert result["problems"] and result["refused_shards"] == [] and result["imported"] == len(lost)


def test_a_shard_with_more_rows_than_its_table_says_is_never_held(exported, target, tmp_path):
    """A crafted manifest with many rows for one shard: counted as they stream, never held."""
    import tracemalloc

    from mmcache.ops.export_reader import open_manifest

    out = copy_of(exported, tmp_path)
    rows, info = rewrite_manifest(out)
    first = shards_of(out)[0]
    many = 200_000
    table = pa.Table.from_pylist([dict(rows[0], shard=first)], schema=manifest_schema()).take([0] * many)
    path = os.path.join(out, MANIFEST)
    with pq.ParquetWriter(path, table.schema) as w:
        w.write_table(table)
        w.add_key_value_metadata({MANIFEST_KEY.decode(): json.dumps({**info, "entries": many})})
    with open_manifest(out) as manifest:
        tracemalloc.start()
        try:
            got = [(name, rows_, n, why) for name, rows_, n, why in manifest.rows_by_shard()]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(got) == 1 and got[0][0] == first and got[0][1] is None and got[0][2] == many
    assert "more rows for it than the shard table's" in got[0][3]
    assert peak < 64 << 20, peak  # held, 200k rows would take several hundred MiB
    with CacheClient(target.unix_url) as c:
        result = import_export(out, c)
    assert result["refused_shards"][-1] == first and sorted(result["refused_shards"]) == shards_of(out)  # others: no rows
    assert result["refused"] == many + sum(s["entries"] for s in info["shards"][1:]) and result["imported"] == 0


def test_refusal_messages_say_it_once(exported, target, tmp_path):
    out = copy_of(exported, tmp_path)
    rows, _ = rewrite_manifest(out)
    last = len(rows) - 1
    victims = [rows[0]["shard"], rows[last]["shard"]]
    assert victims[0] != victims[1]
    rows[0]["key"] = f"ns-a/{h('elsewhere')}"  # not its namespace and hash
    rows[last]["namespace"] = None
    rewrite_manifest(out, rows)
    progress = quiet("import")
    with CacheClient(target.unix_url) as c:
        assert import_export(out, c, progress=progress)["refused_shards"] == victims
    for victim, why in zip(victims, ("the key does not match its namespace", "bad key: namespace must be a str")):
        said = [line for line in progress.stream.getvalue().splitlines() if victim in line]
        assert len(said) == 1 and said[0].count("refused") == 1 and said[0].count(victim) == 1, said
        assert why in said[0]


def test_export_files_are_private_whatever_the_folder(source, tmp_path):
    old = os.umask(0o022)
    try:
        existing = tmp_path / "existing"
        existing.mkdir()
        existing.chmod(0o755)
        with CacheClient(source.url) as c:
            export_entries(c, str(existing), namespace="ns-a", shard_size_bytes=SHARD_SIZE)
            export_entries(c, str(tmp_path / "new"), namespace="ns-a", shard_size_bytes=SHARD_SIZE)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o755  # the caller's folder: left as it was
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    for folder in (existing, tmp_path / "new"):
        names = os.listdir(folder)
        assert MANIFEST in names and len(names) > 2
        assert {name: stat.S_IMODE(os.stat(folder / name).st_mode) for name in names} == dict.fromkeys(names, 0o600)


class DamagesOnTheWire(CacheClient):
    """Flips a byte of one entry's tensor data in every ``batch_get`` answer that carries it."""

    pattern = np.full((4, 8), 12345.678, dtype=np.float32).tobytes()

    def _request(self, method, path, body=None, headers=None, ok=(200,)):
        status, hdrs, data = super()._request(method, path, body, headers, ok)
        at = bytes(data).find(self.pattern) if path == "/v1/batch_get" else -1
        if at >= 0:
            data = bytearray(data)
            data[at + 5] ^= 0x40
        return status, hdrs, data


def test_a_corrupt_entry_is_left_out_counted_and_named(tmp_path, monkeypatch, capsys):
    from mmcache import cli

    with unix_sidecar(str(tmp_path / "s")) as sc:
        with CacheClient(sc.unix_url) as c:
            fill(c, n=6, namespaces=("ns-a",))
            c.put("ns-a", h("damaged"), np.full((4, 8), 12345.678, dtype=np.float32))
        with DamagesOnTheWire(sc.url) as c:
            progress = quiet("export")
            summary = export_entries(c, str(tmp_path / "out"), progress=progress)
        assert (summary["entries"], summary["corrupt"], summary["gone"]) == (6, 1, 0)
        assert f"ns-a/{h('damaged')}: not exported: corrupt:" in progress.stream.getvalue()
        keys = pq.read_table(str(tmp_path / "out" / MANIFEST)).column("key").to_pylist()
        assert len(keys) == 6 and f"ns-a/{h('damaged')}" not in keys
        monkeypatch.setattr(portable, "_client", lambda args: DamagesOnTheWire(args.url))
        assert cli.main(["export", sc.url, str(tmp_path / "cli"), "--quiet"]) == 1
        captured = capsys.readouterr()
        assert json.loads(captured.out)["corrupt"] == 1
        assert "left out 1 corrupt entry" in captured.err and f"ns-a/{h('damaged')}: not exported" in captured.err
        with CacheClient(sc.unix_url) as c:  # what was exported imports whole
            c.delete("ns-a", h(0))
            assert import_export(str(tmp_path / "cli"), c)["imported"] == 1


@pytest.mark.parametrize("transport", ["http", "unix"])
def test_an_export_promotes_nothing_into_host(tmp_path, transport, monkeypatch):
    """A scan of every entry leaves host's keys as they were: disk entries are read in place
    (HTTP: ``batch_get`` with ``promote: false``; the socket: the ``scan`` lease). Small fetch
    batches: with all 40 leased at once a promotion would find no room anyway."""
    monkeypatch.setattr(portable, "FETCH_BATCH_KEYS", 4)
    with unix_sidecar(str(tmp_path / "s"), host_capacity_bytes=1 << 20) as sc:
        with CacheClient(sc.url if transport == "http" else sc.unix_url) as c:
            for i in range(40):
                c.put("ns", h(i), np.full((64, 256), i, dtype=np.float32), durable=True)
            keys = [e["key"] for e in c.iter_entries()]
            before = c.lookup(keys)
            promotions = c.stats()["host"]["promotions"]
            assert 0 < list(before.values()).count("host") < 40 and "disk" in before.values()
            assert export_entries(c, str(tmp_path / "out"))["entries"] == 40
            assert c.lookup(keys) == before and c.stats()["host"]["promotions"] == promotions
