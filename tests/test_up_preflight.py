"""``mmcache up`` checks what would make every worker fail before it starts any (the attack as a
new user met it: a busy port or a wrong model path found after spawning every worker, 69 s and
59 s, the model error printed five times), and its data dir is private from birth (the first start
warned that the data dir it had just created "was mode 755")."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import time

from mmcache.common.security import make_private_dir
from mmcache.stack.up import BUILTIN_MODEL_NAMES


def _up(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mmcache.cli", "up", "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - t0


def test_a_busy_port_is_named_in_one_line_before_any_worker_starts(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        done, took = _up(tmp_path, "--port", str(port))
    finally:
        holder.close()
    assert done.returncode != 0 and took < 20, (took, done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"--port {port}" in errors[0] and "not free" in errors[0], done.stderr[-2000:]
    assert "sidecar" not in done.stderr and not (tmp_path / "data" / "lmdb").exists()


def test_a_missing_model_is_named_once_within_seconds(tmp_path):
    done, took = _up(tmp_path, "--model", str(tmp_path / "no-such-model"), "--port", "0")
    assert done.returncode != 0 and took < 20, (took, done.stderr[-2000:])
    assert done.stderr.count("no-such-model") == 1 and "neither an existing folder nor a built-in model" in done.stderr
    assert "tiny-llava" in done.stderr  # the built-in names are listed


def test_the_builtin_names_are_the_workers(tmp_path):
    from encoder_worker.models import BUILTIN_MODELS

    assert list(BUILTIN_MODEL_NAMES) == sorted(BUILTIN_MODELS)


def test_a_data_dir_made_here_is_private_from_birth_and_not_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mmcache.common.security")
    fresh = tmp_path / "a" / "b"
    make_private_dir(str(fresh))
    make_private_dir(str(fresh))  # as the sidecar does again after mmcache up made it
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700 and "was mode" not in caplog.text
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    make_private_dir(str(loose))  # the user's own open folder: tightened, and said so
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700 and "was mode 755" in caplog.text
