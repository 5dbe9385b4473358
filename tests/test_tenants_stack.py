"""Tenants through the router end to end: ``mmcache up --tenants FILE`` maps
OpenAI API keys to tenants; the router passes the tenant to the encoders and prefill, so tenant
B's request for an image tenant A already had encoded is a miss in B's scope (encoded again,
never served A's entry), and an entry planted under the plain key by someone else is never read
by a tenant."""

from __future__ import annotations

import base64
import os
import tempfile
import urllib.error

import huggingface_hub.constants
import numpy as np
import openai
import pytest

from encoder_worker.models import ensure_model
from stack_process import StackProcess
from mmcache_client import CacheClient, content_hash
from test_stack import image, messages

ALICE, BOB, ADMIN = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef", "sk-admin-0123456789abcdef"
pytestmark = pytest.mark.slow  # NOTE: a whole stack as child processes


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        model_dir = ensure_model("tiny-llava", tmp_path_factory.mktemp("models"))
    tenants = tmp_path_factory.mktemp("conf") / "tenants.toml"
    tenants.write_text(f'"{ALICE}" = "alice"\n"{BOB}" = {{tenant = "bob", quota = "64MiB"}}\n')
    tenants.chmod(0o600)
    data_dir = tempfile.mkdtemp(prefix="mmc-tn-", dir="/tmp")
    up = StackProcess("--model", model_dir, "--data-dir", data_dir, "--port", "0", "--host-capacity", "256MiB",
                      "--log-level", "warning", "--tenants", str(tenants),
                      env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MMCACHE_API_KEY": ADMIN})
    with up:
        up.socket = os.path.join(data_dir, "mmcache.sock")
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


def chat(up, key: str, uri: str):
    c = openai.OpenAI(base_url=up.url + "/v1", api_key=key, max_retries=0, timeout=120)
    return c.chat.completions.create(model="tiny-llava", messages=messages([uri]), max_tokens=4, temperature=0)


def encoded(up) -> int:
    return up.stats(ADMIN)["totals"]["images_encoded"]


def test_a_tenant_never_gets_an_embedding_another_tenant_computed(stack):
    uri, _ = image(900)
    raw = base64.b64decode(uri.split(",", 1)[1])
    h = content_hash(raw)
    n0 = encoded(stack)
    chat(stack, ALICE, uri)
    assert encoded(stack) == n0 + 1
    chat(stack, BOB, uri)  # the same image: a miss in bob's scope, encoded again
    assert encoded(stack) == n0 + 2
    chat(stack, ALICE, uri)  # alice's own entry: a hit
    assert encoded(stack) == n0 + 2
    ns = stack.stats(ADMIN)["encoders"][0]["stats"]["namespace"]
    with CacheClient(f"unix://{stack.socket}") as local:  # the default tenant sees both, apart
        tiers = local.lookup([f"alice@{ns}/{h}", f"bob@{ns}/{h}", f"{ns}/{h}"])
        assert tiers[f"alice@{ns}/{h}"] is not None and tiers[f"bob@{ns}/{h}"] is not None
        assert tiers[f"{ns}/{h}"] is None


def test_an_entry_planted_outside_a_tenants_scope_is_never_read_by_it(stack):
    """Someone writes a poisoned embedding under the plain key of an image (and under another
    tenant's): alice's request for that image encodes it in her scope instead of reading it."""
    uri, _ = image(901)
    h = content_hash(base64.b64decode(uri.split(",", 1)[1]))
    ns = stack.stats(ADMIN)["encoders"][0]["stats"]["namespace"]
    with CacheClient(f"unix://{stack.socket}") as local:
        poison = np.full((576, 32), 1e4, dtype=np.float32)
        assert local.put(ns, h, poison)
        assert local.put(f"bob@{ns}", h, poison)
    n0 = encoded(stack)
    chat(stack, ALICE, uri)
    assert encoded(stack) == n0 + 1  # encoded for alice: the planted entries were not hers


def test_unknown_api_keys_are_refused_and_stack_stats_are_the_operators(stack):
    with pytest.raises(openai.AuthenticationError):
        chat(stack, "sk-nobody-0123456789abcdef", image(902)[0])
    with pytest.raises(urllib.error.HTTPError) as e:
        stack.stats(ALICE)
    assert e.value.code == 403
    assert stack.stats(ADMIN)["mode"] == "epd"


def test_the_stacks_sidecar_holds_each_tenant_to_the_quota_in_the_routers_file(stack):
    """``mmcache up --tenants FILE`` gives the file to the sidecar too: bob's quota binds the
    entries the encoders write in bob's scope, and bob's key reads the sidecar as bob."""
    chat(stack, BOB, image(903)[0])
    with CacheClient(f"unix://{stack.socket}", token=BOB) as bob:
        mine = bob.stats()
    assert mine["tenant"] == "bob" and mine["quota_bytes"] == 64 << 20
    assert 0 < mine["usage"]["host"]["bytes"] <= 64 << 20
    with CacheClient(f"unix://{stack.socket}", token=ALICE) as alice:
        assert "quota_bytes" not in alice.stats()
