"""Security defaults (docs/architecture.md "Keys and entries", docs/operating.md "Security"): keys of another width refused by
every route, bearer schemes in any case, secrets from files and the environment rather than
argv, no sidecar beyond loopback without a token, a private data dir, the router's API key,
and ``mmcache up --host`` exposing the router alone (its launch plan, then a real stack)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import stat
import subprocess
import sys
import tempfile

import lmdb
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from llm_worker.router.router import RouterConfig
from llm_worker.router.app import create_app as create_router_app
from mmcache.sidecar.config import ServeConfig
from mmcache.common.security import bearer_matches, is_loopback, make_private_dir, resolve_secret
from mmcache.stack.up import LOOPBACK, Stack, StackConfig
from stack_process import StackProcess
from mmcache.stack.supervisor import Child
from mmcache_client import content_hash
from sidecar import SidecarProcess, ThreadedSidecar

NS = "sec-ns"
TOKEN = "t0ken-for-the-sidecar"
API_KEY = "sk-router-key"
OLD_KEY = "0123456789abcdef0123456789abcdef"  # the xxh3-128 width


def request(port: int, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def put_body() -> bytes:
    import safetensors.torch
    import torch

    return safetensors.torch.save({"embeddings": torch.ones(2, 4)})


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize("header, ok", [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"BEARER {TOKEN}", True), (f"BeArEr  {TOKEN} ", True),
    (f"Bearer {TOKEN}x", False), (f"Basic {TOKEN}", False), (TOKEN, False), ("Bearer", False), ("", False),
    (None, False),
])
def test_bearer_matches_the_scheme_in_any_case(header, ok):
    assert bearer_matches(header, TOKEN) is ok


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.1", False), ("192.168.1.2", False),
    ("no-such-host.invalid", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_resolve_secret_from_argv_file_or_env(tmp_path):
    path = tmp_path / "tok"
    path.write_text("from-file\n")
    path.chmod(0o600)
    env = {"MMCACHE_TOKEN": "from-env"}
    assert resolve_secret(None, str(path), "MMCACHE_TOKEN", "token", env) == "from-file"
    assert resolve_secret("from-argv", None, "MMCACHE_TOKEN", "token", env) == "from-argv"
    assert resolve_secret(None, None, "MMCACHE_TOKEN", "token", env) == "from-env"
    assert resolve_secret(None, None, "MMCACHE_TOKEN", "token", {}) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_secret("a", str(path), "MMCACHE_TOKEN", "token", env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_secret(None, str(tmp_path / "empty"), "MMCACHE_TOKEN", "token", env)


def test_make_private_dir_tightens_an_existing_dir_and_its_lmdb_files(tmp_path):
    data = tmp_path / "data"
    old = os.umask(0o022)
    try:
        (data / "lmdb").mkdir(parents=True)
        env = lmdb.open(str(data / "lmdb"), subdir=True, map_size=1 << 20)
        env.close()
    finally:
        os.umask(old)
    data.chmod(0o755)
    assert stat.S_IMODE((data / "lmdb" / "data.mdb").stat().st_mode) == 0o644
    make_private_dir(str(data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "lmdb").stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((data / "lmdb" / name).stat().st_mode) == 0o600
    make_private_dir(str(tmp_path / "fresh"))
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700


def test_serve_config_refuses_beyond_loopback_without_a_token(tmp_path):
    with pytest.raises(ValueError, match="without a token"):
        ServeConfig(data_dir=str(tmp_path), host="0.0.0.0")
    assert ServeConfig(data_dir=str(tmp_path), host="0.0.0.0", token=TOKEN).token == TOKEN
    assert ServeConfig(data_dir=str(tmp_path), host="::1").token is None


def test_the_namespace_digest_covers_the_key_scheme(monkeypatch):
    from encoder_worker import namespace

    args = ({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}, "w", {}, "float32")
    now = namespace.compute_namespace(*args)
    assert "v2" in namespace.NAMESPACE_FORMAT
    monkeypatch.setattr(namespace, "NAMESPACE_FORMAT", "mmcache-namespace-v1")
    assert namespace.compute_namespace(*args) != now


def test_an_entry_of_the_old_key_scheme_on_disk_is_dropped_at_start(tmp_path):
    import safetensors.torch
    import torch

    lmdb_dir = tmp_path / "data" / "lmdb"
    lmdb_dir.mkdir(parents=True)
    meta = {"format": "mmcache/1", "namespace": NS, "hash": OLD_KEY, "checksum": "0" * 16, "created_at": "1",
            "encode_ms": "1"}
    env = lmdb.open(str(lmdb_dir), subdir=True, map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(f"{NS}/{OLD_KEY}".encode(), safetensors.torch.save({"embeddings": torch.ones(2, 4)}, meta))
    env.close()
    sc = ThreadedSidecar(ServeConfig(data_dir=str(tmp_path / "data"), port=0, arena_path=str(tmp_path / "arena"),
                                     host_capacity_bytes=4 << 20, disk_capacity_bytes=16 << 20)).start()
    try:
        assert sc.store.stats()["disk"]["entries"] == 0
        sc.store.flush()
    finally:
        sc.stop()
    env = lmdb.open(str(lmdb_dir), subdir=True, readonly=True)
    with env.begin() as txn:
        assert txn.get(f"{NS}/{OLD_KEY}".encode()) is None
    env.close()


# ---------------------------------------------------------------- sidecar routes


@pytest.fixture(params=[None, TOKEN], ids=["no-token", "token"])
def sidecar(request, tmp_path):
    config = ServeConfig(data_dir=str(tmp_path / "data"), port=0, arena_path=str(tmp_path / "arena"),
                         host_capacity_bytes=4 << 20, disk_capacity_bytes=16 << 20, token=request.param)
    sc = ThreadedSidecar(config).start()
    yield sc
    sc.stop()


def test_a_32_char_key_is_refused_by_every_route_with_400(sidecar):
    # NOTE: with a token too: the key is checked once the request is let in (lower-case scheme).
    auth = {"Authorization": f"bearer {TOKEN}"} if sidecar.config.token else {}
    keys = json.dumps({"keys": [f"{NS}/{OLD_KEY}"]})
    routes = [("PUT", f"/v1/entries/{NS}/{OLD_KEY}", put_body()), ("GET", f"/v1/entries/{NS}/{OLD_KEY}", None),
              ("HEAD", f"/v1/entries/{NS}/{OLD_KEY}", None), ("DELETE", f"/v1/entries/{NS}/{OLD_KEY}", None),
              ("POST", "/v1/lookup", keys), ("POST", "/v1/batch_get", keys)]
    for method, path, body in routes:
        status, got = request(sidecar.port, method, path, body, auth)
        assert status == 400, (method, path, status, got)
        if method != "HEAD":
            assert "(32 chars) must be 64 lowercase hex chars" in json.loads(got)["error"], (method, got)
    assert sidecar.store.stats()["host"]["entries"] == 0
    good = content_hash(b"an image")
    assert request(sidecar.port, "PUT", f"/v1/entries/{NS}/{good}", put_body(), auth)[0] == 201


@pytest.mark.parametrize("sidecar", [TOKEN], indirect=True, ids=["token"])
def test_bearer_scheme_in_any_case_is_accepted(sidecar):
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert request(sidecar.port, "GET", "/v1/stats", headers={"Authorization": f"{scheme} {TOKEN}"})[0] == 200
    for header in (f"Basic {TOKEN}", f"bearer {TOKEN}x", TOKEN):
        assert request(sidecar.port, "GET", "/v1/stats", headers={"Authorization": header})[0] == 401


# ---------------------------------------------------------------- mmcache serve, a real process


def test_serve_beyond_loopback_without_a_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MMCACHE_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "mmcache.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                           "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc
    assert "refusing to serve on host='0.0.0.0' (beyond loopback) without a token" in proc.stderr
    assert "MMCACHE_TOKEN or --token-file" in proc.stderr and "ready" not in proc.stdout
    assert not (tmp_path / "data").exists()


def test_serve_with_a_token_file_makes_the_data_dir_private(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # NOTE: as an older sidecar left it: group and others could list and read it
    sock_dir = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")
    sc = SidecarProcess("--host", "0.0.0.0", "--token-file", str(token_file), "--data-dir", str(data),
                        "--socket", os.path.join(sock_dir, "s.sock"), "--host-capacity", "8MiB",
                        "--arena", str(tmp_path / "arena"), env={"MMCACHE_TOKEN": ""}).start()
    try:
        with open(f"/proc/{sc.proc.pid}/cmdline", "rb") as f:
            assert TOKEN.encode() not in f.read()
        assert request(sc.port, "GET", "/v1/stats")[0] == 401
        assert request(sc.port, "GET", "/v1/stats", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
        assert request(sc.port, "GET", "/healthz")[0] == 200
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "lmdb").stat().st_mode) == 0o700
        for name in ("data.mdb", "lock.mdb"):
            assert stat.S_IMODE((data / "lmdb" / name).stat().st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.join(sock_dir, "s.sock")).st_mode) == 0o600
    finally:
        assert sc.stop() == 0
    assert any("was mode 755" in line for line in sc.output), sc.output


# ---------------------------------------------------------------- the router's API key


async def test_router_requires_its_api_key_as_openai_does():
    config = RouterConfig(generate=("http://127.0.0.1:9",), api_key=API_KEY)
    async with TestClient(TestServer(create_router_app(config, object(), 0))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            resp = await client.get("/v1/models", headers=headers)
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            error = (await resp.json())["error"]
            assert error["type"] == "authentication_error" and "API key" in error["message"]
        resp = await client.post("/v1/chat/completions", json={"model": "x", "messages": []})
        assert resp.status == 401
        for scheme in ("Bearer", "bearer"):
            resp = await client.get("/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
            assert resp.status == 200, await resp.text()
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/v1/stats")).status == 401


# ---------------------------------------------------------------- mmcache up


def test_up_launch_plan_exposes_the_router_alone_and_keeps_tokens_out_of_argv(tmp_path, monkeypatch):
    def fake_spawn(child, events):  # NOTE: the plan only: no process is started
        child.url = f"http://{LOOPBACK}:1"
    monkeypatch.setattr(Child, "spawn", fake_spawn)
    monkeypatch.setattr(Stack, "_wait_ready", lambda self, children, deadline: None)
    monkeypatch.setenv("MMCACHE_API_KEY", "inherited-key")
    stack = Stack(StackConfig(data_dir=str(tmp_path), host="0.0.0.0", cache_token=TOKEN, api_key=API_KEY,
                              encoders=2))
    stack.start()
    roles = [c.role for c in stack.children]
    assert roles == ["cache", "encoder", "encoder", "prefill", "decode", "router"]
    for child in stack.children:
        host = child.argv[child.argv.index("--host") + 1]
        assert host == ("0.0.0.0" if child.role == "router" else LOOPBACK), child.argv
        assert not any(TOKEN in a or API_KEY in a for a in child.argv), child.argv
        assert child.env["MMCACHE_TOKEN"] == TOKEN
        assert child.env.get("MMCACHE_API_KEY") == (API_KEY if child.role == "router" else None)
    assert TOKEN not in repr(stack.config) and API_KEY not in repr(stack.config)


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of each TCP socket process ``pid`` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # NOTE: the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += map(int, f.read().split())
    return out


@pytest.mark.slow
def test_up_on_all_addresses_only_the_router_listens_beyond_loopback(model_dir, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "api-key").write_text(API_KEY + "\n")
    data_dir = tempfile.mkdtemp(prefix="mmc-up-", dir="/tmp")  # NOTE: short, for the AF_UNIX socket
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MMCACHE_TOKEN": "", "MMCACHE_API_KEY": ""}
    with StackProcess("--model", model_dir, "--data-dir", data_dir, "--host", "0.0.0.0", "--port", "0",
                      "--encoders", "1", "--host-capacity", "64MiB", "--token-file", str(tmp_path / "token"),
                      "--api-key-file", str(tmp_path / "api-key"), env=env) as up:
        pids = _children(up.proc.pid)
        names = {}
        for pid in [up.proc.pid, *pids]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
            assert TOKEN.encode() not in argv and API_KEY.encode() not in argv, argv
            names[pid] = argv.split(b"\0")
        by_role = {}
        for pid in pids:
            argv = names[pid]
            role = "router" if b"router" in argv else "sidecar" if b"mmcache.cli" in argv else "worker"
            by_role.setdefault(role, []).append(pid)
        assert len(by_role["router"]) == 1 and len(by_role["sidecar"]) == 1 and len(by_role["worker"]) == 3
        for role, role_pids in by_role.items():
            for pid in role_pids:
                sockets = _listening(pid)
                assert sockets, (role, pid)
                beyond = {a for a, _ in sockets if not ipaddress.ip_address(a).is_loopback}
                assert beyond == ({"0.0.0.0"} if role == "router" else set()), (role, sockets)
        with open(f"/proc/{by_role['router'][0]}/environ", "rb") as f:
            assert f"MMCACHE_API_KEY={API_KEY}".encode() in f.read().split(b"\0")
        # the sidecar's HTTP port (loopback) wants the token, in any scheme case
        (sidecar_port,) = {p for _, p in _listening(by_role["sidecar"][0])}
        assert request(sidecar_port, "GET", "/v1/stats")[0] == 401
        assert request(sidecar_port, "GET", "/v1/stats", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
        # the router wants its API key, as OpenAI's API does
        assert [m.id for m in openai.OpenAI(base_url=up.url + "/v1", api_key=API_KEY).models.list()]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=up.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])
