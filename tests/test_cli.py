"""``mmcache`` CLI (serve / put / get / stats) as real processes, and the sidecar's configuration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import safetensors.torch
import torch

from mmcache.cli import main
from mmcache.sidecar.config import ServeConfig, parse_size
from mmcache_client import CacheClient, content_hash
from mmcache_client.format import read_entry
from sidecar import SidecarProcess
from mmcache.tiers.wiring import open_store

NS = "cli-ns"


def h(i) -> str:
    return content_hash(f"cli-test-{i}".encode())


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmcache.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, bytes, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err.decode()


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")  # AF_UNIX paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def serve_args(tmp_path, sock: str, *extra: str) -> list[str]:
    return ["--data-dir", str(tmp_path / "data"), "--socket", sock, "--host-capacity", "16MiB",
            "--disk-capacity", "64MiB", "--max-entry-size", "1MiB", *extra]


# ---------------------------------------------------------------- serve + put/get/stats


def test_serve_put_get_stats(tmp_path, sock_dir):
    sock = os.path.join(sock_dir, "s.sock")
    proc = SidecarProcess(*serve_args(tmp_path, sock)).start()
    try:
        assert os.path.exists(sock)
        t = torch.randn(6, 32).to(torch.bfloat16)
        src = tmp_path / "in.safetensors"
        safetensors.torch.save_file({"embeddings": t}, str(src), metadata={"model": "m"})
        out = tmp_path / "out.safetensors"

        # independent commands run side by side (each pays the interpreter start)
        put = cli("put", proc.url, f"{NS}/{h(1)}", str(src))
        stats = cli("stats", f"unix://{sock}")
        bad = cli("get", proc.url, f"{NS}/not-a-hash")
        rc, stdout, stderr = finish(put)
        assert rc == 0, stderr
        assert json.loads(stdout) == {"key": f"{NS}/{h(1)}", "created": True}
        get = cli("get", f"unix://{sock}", f"{NS}/{h(1)}", "-o", str(out))

        rc, stdout, stderr = finish(stats)
        assert rc == 0, stderr
        doc = json.loads(stdout)
        assert doc["host"]["capacity_bytes"] == 16 << 20 and doc["disk"]["capacity_bytes"] == 64 << 20
        rc, stdout, stderr = finish(bad)
        assert rc == 2 and stdout == b""
        assert "error" in stderr and "not-a-hash" in stderr

        rc, stdout, stderr = finish(get)
        assert rc == 0, stderr
        info = json.loads(stderr.strip().splitlines()[-1])
        assert info["key"] == f"{NS}/{h(1)}" and info["tier"] == "host" and info["nbytes"] == out.stat().st_size
        entry = read_entry(out.read_bytes())
        assert torch.equal(entry.tensor, t)
        assert entry.metadata["model"] == "m" and entry.metadata["hash"] == h(1)

        # in-process for the cheap cases
        assert main(["put", proc.url, f"{NS}/{h(1)}", str(src)]) == 0  # exists: created false
        assert main(["get", proc.url, f"{NS}/{h(2)}", "-o", str(tmp_path / "none")]) == 1
        assert not (tmp_path / "none").exists()
        assert main(["put", proc.url, "bad ns!/" + h(3), str(src)]) == 2
        assert main(["get", proc.url, "no-slash"]) == 2
        assert main(["stats", f"http://127.0.0.1:{proc.port + 0}/"]) == 0
    finally:
        assert proc.stop() == 0
    assert not os.path.exists(sock)


def test_cli_messages(tmp_path, capsys, sock_dir):
    assert main(["get", f"unix://{sock_dir}/nobody.sock", f"{NS}/{h(1)}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmcache get: error:") and "nobody.sock" in err
    assert main(["put", "ftp://x", f"{NS}/{h(1)}", str(tmp_path / "missing.safetensors")]) == 2
    assert "mmcache put: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--host-policy", "nope"])
    assert e.value.code == 2


def test_sigterm_flushes_and_restart_serves_from_disk(tmp_path, sock_dir):
    sock = os.path.join(sock_dir, "s.sock")
    arena = os.path.join(sock_dir, "arena")
    proc = SidecarProcess(*serve_args(tmp_path, sock, "--arena", arena)).start()
    tensors = {i: torch.randn(8, 64) for i in range(20)}
    try:
        assert os.path.exists(arena)
        with CacheClient(f"unix://{sock}") as c:
            for i, t in tensors.items():
                assert c.put(NS, h(i), t) is True  # not durable: acknowledged once in the host tier
    finally:
        rc = proc.stop(signal.SIGTERM)
    assert rc == 0, "".join(proc.output)
    assert not os.path.exists(sock), "the socket is removed on SIGTERM"
    assert not os.path.exists(arena), "the arena is removed on SIGTERM"

    proc2 = SidecarProcess(*serve_args(tmp_path, sock)).start()
    try:
        with CacheClient(proc2.url) as c:
            assert c.stats()["disk"]["entries"] == len(tensors)
            for i, t in tensors.items():
                with c.get(NS, h(i)) as e:
                    assert e.tier == "disk"
                    assert torch.equal(e.tensor, t)
            with c.get(NS, h(0)) as e:
                assert e.tier == "host"  # promoted by the first read
    finally:
        assert proc2.stop(signal.SIGINT) == 0
    assert not os.path.exists(sock)


def test_serve_refuses_a_bad_config(tmp_path, capsys):
    assert main(["serve", "--data-dir", str(tmp_path), "--host-capacity", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmcache serve: error:") and "lots" in err
    toml = tmp_path / "bad.toml"
    toml.write_text('colour = "blue"\n')
    assert main(["serve", "--config", str(toml)]) == 2
    assert "colour" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--socket"])
def test_serve_on_a_socket_it_cannot_make_says_why_and_leaves_no_arena(tmp_path, flag):
    not_a_dir = tmp_path / "f"
    not_a_dir.write_text("a file")
    arena = tmp_path / "arena"
    code, _, err = finish(cli("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--host-capacity", "16MiB",
                              "--arena", str(arena), flag, str(not_a_dir / "x.sock")))
    assert code != 0
    assert f"{not_a_dir / 'x.sock'}: " in err and ("Not a directory" in err or f"{not_a_dir} is not a directory" in err), err
    assert "Traceback" not in err
    assert not arena.exists()  # NOTE: shared memory the sidecar made must go with it


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("text, want", [
    ("4GiB", 4 << 30), ("512MB", 512 * 10**6), ("1024", 1024), ("16MiB", 16 << 20), ("1KiB", 1024),
    ("2kb", 2000), ("1.5GiB", 3 << 29), (" 8 MiB ", 8 << 20), ("100B", 100), ("1TiB", 1 << 40),
    (4096, 4096),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "4XB", "-1", "4 GiB x", "GiB", "1e3", "4G iB", True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "mmcache.toml"
    path.write_text(text)
    return str(path)


def test_config_precedence(tmp_path):
    toml = _toml(tmp_path, """
data_dir = "/from/toml"
port = 1111
host_capacity_bytes = "1GiB"
disk_capacity_bytes = 2147483648
token = "toml-token"
host_policy = "gdsf"
""")
    env = {"MMCACHE_PORT": "2222", "MMCACHE_TOKEN": "env-token", "MMCACHE_HOST_CAPACITY_BYTES": "2GiB",
           "UNRELATED": "x"}
    flags = {"port": 3333, "data_dir": None, "host_capacity_bytes": None, "token": None, "socket": None}

    c = ServeConfig.from_sources({}, env={}, toml_path=toml)
    assert (c.data_dir, c.port, c.host_capacity_bytes, c.disk_capacity_bytes, c.token, c.host_policy) == \
        ("/from/toml", 1111, 1 << 30, 2 << 30, "toml-token", "gdsf")

    c = ServeConfig.from_sources({}, env=env, toml_path=toml)
    assert (c.data_dir, c.port, c.host_capacity_bytes, c.token) == ("/from/toml", 2222, 2 << 30, "env-token")

    c = ServeConfig.from_sources(flags, env=env, toml_path=toml)
    assert (c.data_dir, c.port, c.host_capacity_bytes, c.token) == ("/from/toml", 3333, 2 << 30, "env-token")

    c = ServeConfig.from_sources({"host_capacity_bytes": "16MiB", "token": "flag"}, env=env, toml_path=toml)
    assert c.host_capacity_bytes == 16 << 20 and c.token == "flag" and c.port == 2222

    c = ServeConfig.from_sources({}, env={})
    assert c == ServeConfig()
    assert c.host == "127.0.0.1" and c.max_entry_size_bytes == 256 << 20 and c.token is None


def test_config_uses_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("MMCACHE_PORT", "4321")
    monkeypatch.setenv("MMCACHE_TOKEN", "t")
    c = ServeConfig.from_sources({"port": None})
    assert c.port == 4321 and c.token == "t"


@pytest.mark.parametrize("text", ['colour = "blue"\n', 'max_entry_size = "1MiB"\n', '[server]\nport = 1\n'])
def test_config_unknown_toml_key(tmp_path, text):
    with pytest.raises(ValueError, match="unknown setting"):
        ServeConfig.from_sources({}, env={}, toml_path=_toml(tmp_path, text))


def test_config_hyphenated_toml_keys(tmp_path):
    c = ServeConfig.from_sources({}, env={}, toml_path=_toml(tmp_path, 'host-capacity-bytes = "32MiB"\n'))
    assert c.host_capacity_bytes == 32 << 20


@pytest.mark.parametrize("field, value", [
    ("host_capacity_bytes", "0"), ("host_capacity_bytes", "lots"), ("disk_capacity_bytes", 0),
    ("disk_capacity_bytes", -5), ("max_entry_size_bytes", "0MiB"), ("port", "http"), ("port", 70000),
    ("port", -1), ("socket", "/tmp/" + "s" * 103)
])
def test_config_invalid_values(field, value):
    with pytest.raises(ValueError):
        ServeConfig.from_sources({field: value}, env={})


def test_config_invalid_env_value():
    with pytest.raises(ValueError):
        ServeConfig.from_sources({}, env={"MMCACHE_DISK_CAPACITY_BYTES": "many"})


def test_config_bad_toml(tmp_path):
    with pytest.raises(ValueError):
        ServeConfig.from_sources({}, env={}, toml_path=_toml(tmp_path, "port = = 3\n"))


def test_environment_names_follow_the_flags_and_a_typo_is_reported():
    warned = []
    c = ServeConfig.from_sources({}, env={"MMCACHE_HOST_CAPACITY": "32MiB", "MMCACHE_DISK_QUEUE": "8MiB",
                                          "MMCACHE_HOST_CAPACITY_BYTES_": "1", "MMCACHE_API_KEY": "x",
                                          "MMCACHE_REMOTE_PASSWORD": "y", "PATH": "/bin"}, warn=warned.append)
    assert c.host_capacity_bytes == 32 << 20 and c.disk_queue_bytes == 8 << 20
    assert len(warned) == 1 and "MMCACHE_HOST_CAPACITY_BYTES_ is not a setting" in warned[0]
    assert "MMCACHE_HOST_CAPACITY" in warned[0]  # the known names are listed
    c = ServeConfig.from_sources({}, env={"MMCACHE_HOST_CAPACITY_BYTES": "16MiB"})  # the field's name still works
    assert c.host_capacity_bytes == 16 << 20


def test_known_user_errors_are_one_line_not_a_traceback(tmp_path):
    from mmcache.core.store import StoreConfig
    from mmcache.tiers.wiring import open_store

    holder = open_store(StoreConfig(data_dir=str(tmp_path / "d"), host_capacity_bytes=1 << 20,
                                     arena_path=str(tmp_path / "arena")))
    try:
        code, _, err = finish(cli("serve", "--data-dir", str(tmp_path / "d"), "--port", "0", "--host-capacity", "1MiB"))
    finally:
        holder.close()
    assert code == 2 and "is in use by another mmcache process" in err and "Traceback" not in err
    code, _, err = finish(cli("serve", "--bogus"))
    assert code == 2 and err.startswith("usage: mmcache serve") and "unrecognized arguments: --bogus" in err
