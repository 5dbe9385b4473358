"""Content keys: content_hash, namespace/hash validation and the Key dataclass."""

from __future__ import annotations

import dataclasses
import re

import blake3
import pytest
import xxhash

from mmcache_client.keys import HASH_HEX_CHARS, Key, content_hash, validate_hash, validate_namespace

H = content_hash(b"some image bytes")


# -- content_hash ---------------------------------------------------------------------------


# NOTE: from BLAKE3's official test_vectors.json (input: bytes i % 251) and its README ("abc"):
# known answers, not the library checked against itself. 1024 bytes is one full chunk.
BLAKE3_VECTORS = [
    (b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
    (bytes([0]), "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213"),
    (b"abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"),
    (bytes(i % 251 for i in range(1024)), "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7"),
]


@pytest.mark.parametrize("data, want", BLAKE3_VECTORS, ids=["empty", "one-byte", "abc", "1024"])
def test_content_hash_is_blake3_256_known_vectors(data, want):
    assert content_hash(data) == want
    assert content_hash(memoryview(data)) == want


@pytest.mark.parametrize("data", [b"", b"x", b"some image bytes", bytes(range(256)) * 1000, bytes(3 << 20)])
def test_content_hash_is_full_blake3_256_lowercase_hex(data):
    h = content_hash(data)
    assert h == blake3.blake3(data).hexdigest()
    assert len(h) == HASH_HEX_CHARS == 64
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert validate_hash(h) == h


def test_content_hash_accepts_bytes_like():
    data = b"\x00\x01 media bytes \xff" * 37
    want = content_hash(data)
    assert content_hash(bytearray(data)) == want
    assert content_hash(memoryview(data)) == want
    assert content_hash(memoryview(bytearray(data))[:]) == want
    # a slice of a bigger buffer hashes only its own bytes
    assert content_hash(memoryview(b"prefix" + data + b"suffix")[6:-6]) == want


def test_content_hash_distinguishes_content():
    assert content_hash(b"a") != content_hash(b"b")
    assert content_hash(b"a") == content_hash(b"a")


# -- validate_namespace / validate_hash -----------------------------------------------------


@pytest.mark.parametrize("ns", ["a", "qwen2-vl-7b.bf16", "A_b-C.d", "x" * 128, "...", ".a", "a..b", "0"])
def test_valid_namespaces(ns):
    assert validate_namespace(ns) == ns


@pytest.mark.parametrize(
    "ns",
    ["", "a/b", "/", "a b", " a", "a\n", "x" * 129, "..", ".", "ns:1", "é", "a\x00", "a\\b"],
)
def test_invalid_namespaces(ns):
    with pytest.raises(ValueError, match="namespace"):
        validate_namespace(ns)


@pytest.mark.parametrize("bad", [None, 1, b"ns", ["ns"]])
def test_non_str_namespace_and_hash(bad):
    with pytest.raises(ValueError, match="must be a str"):
        validate_namespace(bad)
    with pytest.raises(ValueError, match="must be a str"):
        validate_hash(bad)


@pytest.mark.parametrize(
    "h",
    [
        H.upper(),
        H[:-1] + "A",
        H[:63],
        H + "0",
        "",
        "g" * 64,
        H[:63] + " ",
        " " + H[:63],
        H + "\n",
        "0x" + H[:62],
        H[:32],  # a truncated digest is not a key
        xxhash.xxh3_128_hexdigest(b"x"),  # nor is the old scheme's xxh3-128 key
        xxhash.xxh3_64_hexdigest(b"x"),
    ],
)
def test_invalid_hashes(h):
    with pytest.raises(ValueError, match="must be 64 lowercase hex chars"):
        validate_hash(h)


def test_a_key_of_another_width_is_refused_naming_the_width():
    with pytest.raises(ValueError, match=r"\(32 chars\) must be 64 lowercase hex chars \(the full BLAKE3-256"):
        validate_hash(xxhash.xxh3_128_hexdigest(b"old key"))


# -- Key ------------------------------------------------------------------------------------


def test_key_round_trips():
    k = Key("qwen2-vl.bf16", H)
    assert k.to_string() == f"qwen2-vl.bf16/{H}"
    assert str(k) == k.to_string()
    assert Key.from_string(k.to_string()) == k
    assert Key.from_string(str(k)).namespace == "qwen2-vl.bf16"
    assert Key.from_string(str(k)).hash == H


@pytest.mark.parametrize(
    "text, match",
    [
        (f"ns/{H.upper()}", "64 lowercase hex"),
        (f"ns/{H[:63]}", "64 lowercase hex"),
        (f"ns/{H[:32]}", "64 lowercase hex"),
        (f"ns/{H}0", "64 lowercase hex"),
        (f"ns/{'z' * 64}", "64 lowercase hex"),
        (H, "namespace/hash"),
        ("", "namespace/hash"),
        (f"/{H}", "namespace"),
        (f"a/b/{H}", "namespace"),
        (f"a b/{H}", "namespace"),
        (f"{'n' * 129}/{H}", "namespace"),
        (f"../{H}", "namespace"),
        (f"ns/{H}/", "namespace|hash"),
    ],
)
def test_key_from_string_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        Key.from_string(text)


def test_key_from_string_rejects_non_str():
    with pytest.raises(ValueError, match="must be a str"):
        Key.from_string(b"ns/" + H.encode())  # type: ignore[arg-type]


@pytest.mark.parametrize("ns, h", [("", H), ("a/b", H), ("a b", H), ("x" * 129, H), ("..", H), ("ns", H.upper()), ("ns", H[:63]), ("ns", H[:32]), (None, H), ("ns", None)])
def test_key_constructor_validates(ns, h):
    with pytest.raises(ValueError):
        Key(ns, h)


def test_key_128_char_namespace_ok():
    k = Key("x" * 128, H)
    assert Key.from_string(str(k)) == k


def test_key_is_frozen_and_hashable():
    k = Key("ns", H)
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.namespace = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.hash = content_hash(b"other")  # type: ignore[misc]
    same = Key("ns", H)
    assert k == same and hash(k) == hash(same)
    assert len({k, same, Key("ns2", H), Key("ns", content_hash(b"z"))}) == 3
    assert {k: 1}[same] == 1
    assert Key("ns", H) != Key("ns2", H)
