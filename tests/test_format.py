"""The entry format: round trips, safetensors interop, zero-copy views, hostile blobs, writer errors."""

from __future__ import annotations

import gc
import json
import mmap
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mmcache_client import entry_reader as F
from mmcache_client.format import (
    DATA_ALIGNMENT,
    DTYPES,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    REQUIRED_METADATA,
    BadHeader,
    ChecksumMismatch,
    EntryFormatError,
    EntryView,
    MissingMetadata,
    TruncatedEntry,
    UnsupportedDtype,
    checksum,
    parse_entry,
    plan_entry,
    read_entry,
    relayout,
    verify_checksum,
)
from mmcache_client.keys import content_hash
from entries import encode_entry

NS = "qwen2-vl-7b.bf16"
H = content_hash(b"an image")
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
GRID = [[1, 4, 6]]


# -- helpers --------------------------------------------------------------------------------


def split(blob) -> tuple[dict, bytes]:
    """(header JSON as a dict, data section bytes) of a blob."""
    (n,) = struct.unpack_from("<Q", blob, 0)
    return json.loads(bytes(blob[8 : 8 + n])), bytes(blob[8 + n :])


def assemble(header, data: bytes = b"", *, fix_checksum: bool = True) -> bytes:
    """A blob from a header (dict, str or bytes) and a data section; no alignment padding."""
    if isinstance(header, dict):
        if fix_checksum and isinstance(header.get("__metadata__"), dict):
            header = {**header, "__metadata__": {**header["__metadata__"], "checksum": checksum(data)}}
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def base() -> tuple[dict, bytes]:
    """A valid header (F32 embeddings [3, 4] then I64 image_grid_thw [1, 3]) and its data."""
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    blob = encode_entry(NS, H, {"embeddings": emb, "image_grid_thw": np.array(GRID, np.int64)})
    return split(blob)


def torch_embeddings(dtype: str, n: int = 5, hidden: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g).to(TORCH_DTYPES[dtype])


def numpy_source(t: torch.Tensor) -> tuple[np.ndarray, dict]:
    """(numpy array, dtypes override) holding the same bits as ``t``."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), {"embeddings": "BF16"}
    return t.numpy(), {}


def addr(buf) -> int:
    return np.frombuffer(buf, np.uint8).ctypes.data


# -- exception hierarchy --------------------------------------------------------------------


def test_exception_hierarchy():
    assert issubclass(EntryFormatError, ValueError)
    for exc in (TruncatedEntry, BadHeader, UnsupportedDtype, MissingMetadata, ChecksumMismatch):
        assert issubclass(exc, EntryFormatError)


def test_base_helper_is_valid():
    header, data = base()
    v = read_entry(assemble(header, data))
    assert v.names == ["embeddings", "image_grid_thw"]


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_round_trip(dtype, source):
    t = torch_embeddings(dtype)
    if source == "torch":
        tensors, dtypes = {"embeddings": t, "image_grid_thw": torch.tensor(GRID)}, None
    else:
        arr, dtypes = numpy_source(t)
        tensors = {"embeddings": arr, "image_grid_thw": np.array(GRID, np.int64)}
    meta = {"model": "Qwen/Qwen2-VL-7B", "note": "héllo ✓"}
    blob = encode_entry(NS, H, tensors, meta, encode_ms=12.5, dtypes=dtypes)
    v = read_entry(blob)
    assert isinstance(v, EntryView)
    assert v.nbytes == len(blob)
    assert v.names == ["embeddings", "image_grid_thw"]
    md = v.metadata
    assert md["format"] == FORMAT_VERSION and md["namespace"] == NS and md["hash"] == H
    assert md["model"] == "Qwen/Qwen2-VL-7B" and md["note"] == "héllo ✓"
    assert md["encode_ms"] == "12.500" and float(md["created_at"]) > 0
    assert set(REQUIRED_METADATA) <= set(md)
    assert md["checksum"] == checksum(blob[v.parsed.data_start :])
    assert len(md["checksum"]) == 16
    info = v.parsed.tensors["embeddings"]
    assert (info.dtype, info.shape) == (dtype, (5, 8))

    got = v.tensor
    assert got.dtype == TORCH_DTYPES[dtype] and got.shape == (5, 8)
    assert torch.equal(got, t)
    arr = v.array
    if dtype == "BF16":  # raw bits
        assert arr.dtype == np.uint16
        assert np.array_equal(arr, t.view(torch.int16).numpy().view(np.uint16))
    else:
        assert np.array_equal(arr, t.numpy())
    assert v.get_array("image_grid_thw").tolist() == GRID
    assert v.get_array("image_grid_thw").dtype == np.int64
    assert torch.equal(v.get_tensor("image_grid_thw"), torch.tensor(GRID))

    # the safetensors library reads our blobs and agrees
    loaded = safetensors.torch.load(blob)
    assert set(loaded) == {"embeddings", "image_grid_thw"}
    assert torch.equal(loaded["embeddings"], t)
    assert torch.equal(loaded["image_grid_thw"], torch.tensor(GRID))


def test_safetensors_sees_our_metadata(tmp_path):
    blob = encode_entry(NS, H, {"embeddings": torch_embeddings("BF16")}, {"model": "m"})
    path = tmp_path / "e.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == read_entry(blob).metadata
        assert torch.equal(f.get_tensor("embeddings"), torch_embeddings("BF16"))


def test_write_into_arena_slice_and_returned_checksum():
    t = torch_embeddings("F16", n=7, hidden=16)
    plan = plan_entry(NS, H, {"embeddings": t, "image_grid_thw": torch.tensor(GRID)})
    arena = bytearray(4096 + plan.total_bytes + 64)
    dest = memoryview(arena)[4096 : 4096 + plan.total_bytes]
    digest = plan.write_into(dest)
    v = read_entry(dest)
    assert v.metadata["checksum"] == digest
    assert torch.equal(v.tensor, t)
    assert bytes(dest) == plan.to_bytes()  # same plan, same bytes
    assert addr(arena) + 4096 + v.parsed.data_start == v.tensor.data_ptr()


def test_non_contiguous_and_big_endian_sources():
    base_t = torch.randn(8, 6)
    tt = base_t.t()  # non-contiguous torch view [6, 8]
    na = np.arange(48, dtype=np.float32).reshape(6, 8)[:, ::-1]  # non-contiguous numpy
    be = np.arange(24, dtype=">f4").reshape(4, 6)  # big-endian numpy
    assert torch.equal(read_entry(encode_entry(NS, H, {"embeddings": tt})).tensor, tt)
    assert np.array_equal(read_entry(encode_entry(NS, H, {"embeddings": na})).array, na)
    v = read_entry(encode_entry(NS, H, {"embeddings": be}))
    assert v.parsed.tensors["embeddings"].dtype == "F32"
    assert np.array_equal(v.array, be) and v.array.dtype == np.dtype("<f4")


def test_odd_hidden_size_unaligned_extra_still_correct():
    t = torch_embeddings("F16", n=3, hidden=3)  # 18 bytes: the I64 extra sits at an odd offset
    v = read_entry(encode_entry(NS, H, {"embeddings": t, "image_grid_thw": torch.tensor(GRID)}))
    assert torch.equal(v.tensor, t)
    assert torch.equal(v.get_tensor("image_grid_thw"), torch.tensor(GRID))
    assert v.get_array("image_grid_thw").tolist() == GRID


def test_extras_ordered_widest_first_and_aligned():
    tensors = {
        "embeddings": torch_embeddings("BF16", n=4, hidden=4),
        "a_u8": np.array([1, 2, 3], np.uint8),
        "b_i32": np.array([7], np.int32),
        "c_i64": np.array(GRID, np.int64),
        "d_bool": np.array([True, False]),
        "e_f64": np.array([0.5], np.float64),
    }
    v = read_entry(encode_entry(NS, H, tensors))
    infos = sorted(v.parsed.tensors.values(), key=lambda i: i.start)
    assert infos[0].name == "embeddings"
    for info in infos:
        assert info.start % DTYPES[info.dtype].itemsize == 0
    for name, src in tensors.items():
        if name == "embeddings":
            assert torch.equal(v.tensor, src)
        else:
            assert np.array_equal(v.get_array(name), src)
            assert torch.equal(v.get_tensor(name), torch.from_numpy(src))


def test_zero_width_embeddings_and_empty_extra():
    v = read_entry(encode_entry(NS, H, {"embeddings": np.zeros((2, 0), np.float32), "none": np.zeros((0,), np.int64)}))
    assert v.array.shape == (2, 0) and v.tensor.shape == (2, 0)
    assert v.get_array("none").shape == (0,) and v.get_tensor("none").shape == (0,)


def test_checksum_covers_whole_data_section():
    blob = encode_entry(NS, H, {"embeddings": torch_embeddings("F32"), "image_grid_thw": torch.tensor(GRID)})
    v = read_entry(blob)
    assert v.metadata["checksum"] == F.checksum(blob[v.parsed.data_start :])
    verify_checksum(blob, v.parsed)


# -- relayout -------------------------------------------------------------------------------


def test_safetensors_blob_without_metadata_relayouts():
    t = torch_embeddings("BF16", n=3, hidden=10)
    grid = torch.tensor(GRID)
    client = safetensors.torch.save({"image_grid_thw": grid, "embeddings": t})
    with pytest.raises(MissingMetadata):
        read_entry(client)
    assert parse_entry(client, strict=False).metadata == {}
    plan = relayout(client, NS, H, {"model": "m"})
    out = plan.to_bytes()
    v = read_entry(out)
    assert v.metadata["namespace"] == NS and v.metadata["hash"] == H and v.metadata["model"] == "m"
    assert v.parsed.data_start % DATA_ALIGNMENT == 0
    assert torch.equal(v.tensor, t) and torch.equal(v.get_tensor("image_grid_thw"), grid)
    # the data section (and so its checksum) is unchanged by relayout
    _, client_data = split(client)
    assert out[v.parsed.data_start :] == client_data
    assert v.metadata["checksum"] == checksum(client_data)


def test_relayout_with_client_checksum_and_partial_metadata():
    t = torch_embeddings("F32")
    _, data = split(safetensors.torch.save({"embeddings": t}))
    client = safetensors.torch.save({"embeddings": t}, metadata={"checksum": checksum(data), "namespace": NS, "encode_ms": "3.5"})
    v = read_entry(relayout(client, NS, H).to_bytes())
    assert v.metadata["encode_ms"] == "3.5" and torch.equal(v.tensor, t)


def test_relayout_of_own_blob_is_stable():
    blob = encode_entry(NS, H, {"embeddings": torch_embeddings("F16"), "image_grid_thw": torch.tensor(GRID)}, {"m": "x"})
    out = relayout(blob, NS, H).to_bytes()
    a, b = read_entry(blob), read_entry(out)
    assert a.metadata == b.metadata | {"created_at": a.metadata["created_at"]}
    assert blob[a.parsed.data_start :] == out[b.parsed.data_start :]


@pytest.mark.parametrize(
    "meta, exc",
    [
        ({"namespace": "other-ns"}, BadHeader),
        ({"hash": content_hash(b"other")}, BadHeader),
        ({"format": "mmcache/0"}, BadHeader),
        ({"encode_ms": "fast"}, BadHeader),
        ({"created_at": "yesterday"}, BadHeader),
        ({"checksum": "0" * 16}, ChecksumMismatch),
        ({"checksum": "not-a-checksum"}, ChecksumMismatch),
        ({"n": 1}, BadHeader),  # metadata values must be strings
    ],
)
def test_relayout_rejects(meta, exc):
    header, data = base()
    header["__metadata__"] = meta
    blob = assemble(header, data, fix_checksum=False)
    with pytest.raises(exc):
        relayout(blob, NS, H)


def test_relayout_rejects_structural_errors():
    with pytest.raises(TruncatedEntry):
        relayout(safetensors.torch.save({"embeddings": torch_embeddings("F32")})[:-1], NS, H)
    with pytest.raises(BadHeader):
        relayout(safetensors.torch.save({"x": torch_embeddings("F32")}), NS, H)


def test_relayout_never_yields_an_unreadable_header():
    # Non-ASCII metadata grows ~3x when re-serialised with \\u escapes; past 1 MiB the reader
    # would reject the stored entry, so relayout must refuse it up front.
    client = safetensors.torch.save({"embeddings": torch_embeddings("F32")}, metadata={"note": "é" * 400_000})
    parse_entry(client, strict=False)  # the client's own header is within limits
    with pytest.raises(BadHeader):
        relayout(client, NS, H)


# -- zero-copy ------------------------------------------------------------------------------


def _check_shares(buf, v: EntryView) -> None:
    base_addr, size = addr(buf), len(memoryview(buf).cast("B"))
    for name in v.names:
        info = v.parsed.tensors[name]
        arr = v.get_array(name)
        assert np.shares_memory(arr, np.frombuffer(buf, np.uint8))
        assert arr.ctypes.data == base_addr + info.start
        t = v.get_tensor(name)
        assert base_addr <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= base_addr + size
        assert t.data_ptr() == base_addr + info.start
    assert v.parsed.data_start % DATA_ALIGNMENT == 0
    assert (v.array.ctypes.data - base_addr) % DATA_ALIGNMENT == 0


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "memoryview-slice"])
def test_views_share_memory(kind):
    blob = encode_entry(NS, H, {"embeddings": torch_embeddings("BF16"), "image_grid_thw": torch.tensor(GRID)})
    if kind == "bytes":
        buf = blob
    elif kind == "bytearray":
        buf = bytearray(blob)
    elif kind == "memoryview":
        buf = memoryview(blob)
    else:
        arena = bytearray(256 + len(blob))
        arena[256:] = blob
        buf = memoryview(arena)[256:]
    v = read_entry(buf)
    _check_shares(buf, v)
    assert torch.equal(v.tensor, torch_embeddings("BF16"))


@pytest.mark.parametrize("access", [mmap.ACCESS_READ, mmap.ACCESS_WRITE])
def test_views_share_memory_with_mmap(tmp_path, access):
    t = torch_embeddings("F32")
    blob = encode_entry(NS, H, {"embeddings": t, "image_grid_thw": torch.tensor(GRID)})
    path = tmp_path / "entry"
    path.write_bytes(blob)
    with open(path, "r+b") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=access)
        try:
            v = read_entry(mm)
            _check_shares(mm, v)
            arr, ten = v.array, v.tensor
            assert torch.equal(ten, t)
            if access == mmap.ACCESS_WRITE:
                start = v.parsed.tensors["embeddings"].start
                mm[start : start + 4] = struct.pack("<f", 42.0)
                assert arr[0, 0] == 42.0 and ten[0, 0].item() == 42.0
            else:
                assert not arr.flags.writeable
            del v, arr, ten
            gc.collect()
        finally:
            mm.close()


def test_writes_to_bytearray_visible_through_views():
    buf = bytearray(encode_entry(NS, H, {"embeddings": torch_embeddings("F32")}))
    v = read_entry(buf)
    arr, ten = v.array, v.tensor
    start = v.parsed.tensors["embeddings"].start
    buf[start : start + 4] = struct.pack("<f", 42.0)
    buf[start + 4 : start + 8] = struct.pack("<f", -1.5)
    assert arr[0, 0] == 42.0 and arr[0, 1] == -1.5
    assert ten[0, 0].item() == 42.0 and ten[0, 1].item() == -1.5
    with pytest.raises(ChecksumMismatch):
        read_entry(buf)


@pytest.mark.parametrize("meta_len", list(range(0, 140, 7)))
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_data_start_aligned_for_any_header_length(meta_len, dtype):
    blob = encode_entry(NS, H, {"embeddings": torch_embeddings(dtype, n=2, hidden=3)}, {"pad": "x" * meta_len})
    v = read_entry(blob)
    assert v.parsed.data_start % DATA_ALIGNMENT == 0
    (n,) = struct.unpack_from("<Q", blob)
    assert blob[8 + n - 1 : 8 + n] in (b"}", b" ")  # padded with spaces after the JSON


def test_view_tensor_without_torch(monkeypatch):
    v = read_entry(encode_entry(NS, H, {"embeddings": torch_embeddings("F32")}))
    monkeypatch.setattr(F, "_torch", lambda: None)
    with pytest.raises(RuntimeError, match="torch"):
        v.tensor
    assert v.array.shape == (5, 8)


# -- malformed blobs ------------------------------------------------------------------------


@pytest.mark.parametrize("blob", [b"", b"\x00", b"\x05" * 7])
def test_shorter_than_length_prefix(blob):
    with pytest.raises(TruncatedEntry):
        read_entry(blob)


@pytest.mark.parametrize("n", [MAX_HEADER_BYTES + 1, 1 << 40, (1 << 64) - 1])
def test_absurd_header_length(n):
    with pytest.raises(BadHeader, match="limit"):
        read_entry(struct.pack("<Q", n) + b"{}" * 10)


def test_header_length_past_end():
    with pytest.raises(TruncatedEntry):
        read_entry(struct.pack("<Q", 100) + b"{}")
    header, data = base()
    blob = assemble(header, data)
    with pytest.raises(TruncatedEntry):
        read_entry(blob[:20])


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"{not json",
        b'{"a": 1',
        b"\xff\xfe\x00",
        b"\xef\xbb\xbf{}",  # UTF-8 BOM
        json.dumps({"embeddings": {}}).encode("utf-16-le"),  # safetensors headers are UTF-8 only
        json.dumps({"embeddings": {}}).encode("utf-32"),
        b'{"a": ' + b"1" * 5000 + b"}",  # int literal past Python's digit limit
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        b'{"a": 1} x',
    ],
)
def test_non_json_header(text):
    with pytest.raises(BadHeader):
        read_entry(assemble(text))


@pytest.mark.parametrize("text", [b"[]", b"null", b"1", b'"embeddings"', b"true"])
def test_header_not_an_object(text):
    with pytest.raises(BadHeader, match="object"):
        read_entry(assemble(text))


def test_duplicate_keys():
    header, data = base()
    text = json.dumps(header)
    emb = json.dumps({"embeddings": header["embeddings"]})[1:-1]
    for dup in (
        text[:-1] + "," + emb + "}",  # duplicate tensor
        text.replace('"format":', '"format": "mmcache/1", "format":', 1),  # duplicate metadata field
        text.replace('"dtype": "F32"', '"dtype": "F32", "dtype": "F32"', 1),  # inside a record
    ):
        assert dup != text
        with pytest.raises(BadHeader, match="duplicate"):
            read_entry(assemble(dup, data))


def mutated(fn):
    header, data = base()
    new = fn(header, data)
    if isinstance(new, bytes):
        data = new
    return assemble(header, data)


@pytest.mark.parametrize(
    "fn",
    [
        lambda h, d: h["embeddings"].update(extra=1),
        lambda h, d: h["embeddings"].pop("shape"),
        lambda h, d: h["embeddings"].pop("dtype"),
        lambda h, d: h["image_grid_thw"].pop("data_offsets"),
        lambda h, d: h.update(embeddings=[1, 2]),
        lambda h, d: h.update(embeddings=None),
        lambda h, d: h.update(embeddings="F32"),
    ],
    ids=["extra-field", "no-shape", "no-dtype", "no-offsets", "list-record", "null-record", "str-record"],
)
def test_bad_tensor_record(fn):
    with pytest.raises(BadHeader, match="record"):
        read_entry(mutated(fn))


@pytest.mark.parametrize("dtype", ["F8", "bf16", "f32", "", "U16", "C64", 16, None, ["F32"]])
@pytest.mark.parametrize("name", ["embeddings", "image_grid_thw"])
def test_unknown_dtype(name, dtype):
    with pytest.raises(UnsupportedDtype):
        read_entry(mutated(lambda h, d: h[name].update(dtype=dtype)))


@pytest.mark.parametrize(
    "shape",
    [[-1, 4], [3, -4], [3.0, 4], ["3", 4], [True, 4], [3, None], "3x4", None, {"0": 3}, [1] * 9, [3, 4.5]],
)
def test_bad_shape(shape):
    with pytest.raises(BadHeader, match="shape"):
        read_entry(mutated(lambda h, d: h["embeddings"].update(shape=shape)))


@pytest.mark.parametrize(
    "offsets",
    [[0], [0, 48, 96], [-8, 40], [48, 0], [0.0, 48], ["0", 48], [0, True], None, "0-48", [0, 2**70]],
)
def test_bad_data_offsets_form(offsets):
    with pytest.raises(BadHeader, match="data_offsets"):
        read_entry(mutated(lambda h, d: h["embeddings"].update(data_offsets=offsets)))


@pytest.mark.parametrize("offsets", [[0, 44], [0, 52], [4, 48]])
def test_data_offsets_not_matching_shape(offsets):
    with pytest.raises(BadHeader, match="shape needs"):
        read_entry(mutated(lambda h, d: h["embeddings"].update(data_offsets=offsets)))


def test_offsets_overlap():
    def fn(h, d):
        h["image_grid_thw"]["data_offsets"] = [40, 64]
        return d[:64]

    with pytest.raises(BadHeader, match="starts at"):
        read_entry(mutated(fn))


def test_offsets_gap():
    def fn(h, d):
        h["image_grid_thw"]["data_offsets"] = [56, 80]
        return d[:48] + b"\x00" * 8 + d[48:]

    with pytest.raises(BadHeader, match="starts at"):
        read_entry(mutated(fn))


def test_offsets_not_starting_at_zero():
    def fn(h, d):
        h["embeddings"]["data_offsets"] = [8, 56]
        h["image_grid_thw"]["data_offsets"] = [56, 80]
        return b"\x00" * 8 + d

    with pytest.raises(BadHeader, match="starts at"):
        read_entry(mutated(fn))


def test_trailing_bytes():
    with pytest.raises(BadHeader, match="trailing"):
        read_entry(mutated(lambda h, d: d + b"\x00"))
    blob = encode_entry(NS, H, {"embeddings": torch_embeddings("F32")})
    with pytest.raises(BadHeader, match="trailing"):
        read_entry(blob + b"\x00" * 64)


@pytest.mark.parametrize("cut", [1, 8, 24, 71, 72])
def test_data_truncated(cut):
    header, data = base()
    blob = assemble(header, data)
    with pytest.raises(TruncatedEntry, match="tensor data"):
        read_entry(blob[:-cut])


@pytest.mark.parametrize("field", REQUIRED_METADATA)
def test_missing_metadata_field(field):
    header, data = base()
    del header["__metadata__"][field]
    blob = assemble(header, data, fix_checksum=False)
    with pytest.raises(MissingMetadata, match=field):
        read_entry(blob)
    # non-strict parsing (a client's PUT body) accepts it
    assert parse_entry(blob, strict=False).metadata == header["__metadata__"]


@pytest.mark.parametrize("meta", [None, {}])
def test_no_metadata(meta):
    header, data = base()
    header["__metadata__"] = meta
    with pytest.raises(MissingMetadata):
        read_entry(assemble(header, data))
    del header["__metadata__"]
    with pytest.raises(MissingMetadata):
        read_entry(assemble(header, data))


@pytest.mark.parametrize("meta", [[], "x", 1, {"format": 1}, {"a": None}, {"a": ["b"]}])
def test_metadata_not_str_to_str(meta):
    header, data = base()
    header["__metadata__"] = meta if not isinstance(meta, dict) else {**header["__metadata__"], **meta}
    for strict in (True, False):
        with pytest.raises(BadHeader, match="__metadata__"):
            parse_entry(assemble(header, data, fix_checksum=False), strict=strict)


@pytest.mark.parametrize(
    "field, value",
    [
        ("namespace", ""),
        ("namespace", "a/b"),
        ("namespace", ".."),
        ("namespace", "x" * 129),
        ("hash", H.upper()),
        ("hash", H[:31]),
        ("hash", ""),
        ("checksum", "ABCDEF0123456789"),
        ("checksum", "0123"),
        ("encode_ms", "fast"),
        ("created_at", ""),
    ],
)
def test_malformed_metadata(field, value):
    header, data = base()
    header["__metadata__"][field] = value
    with pytest.raises(MissingMetadata, match="malformed|checksum"):
        read_entry(assemble(header, data, fix_checksum=field != "checksum"))


@pytest.mark.parametrize("version", ["mmcache/2", "mmcache/0", "", "MMCACHE/1"])
def test_wrong_format_version(version):
    header, data = base()
    header["__metadata__"]["format"] = version
    with pytest.raises(BadHeader, match="format"):
        read_entry(assemble(header, data))


def test_no_embeddings_tensor():
    def fn(h, d):
        h["emb"] = h.pop("embeddings")

    with pytest.raises(BadHeader, match="embeddings"):
        read_entry(mutated(fn))


@pytest.mark.parametrize(
    "dtype, shape",
    [("F32", [12]), ("F32", [3, 2, 2]), ("F32", [1, 3, 4]), ("I32", [3, 4]), ("U8", [6, 8]), ("F64", [3, 2]), ("BOOL", [6, 8])],
)
def test_bad_embeddings_rank_or_dtype(dtype, shape):
    with pytest.raises(BadHeader, match="embeddings must be 2-D"):
        read_entry(mutated(lambda h, d: h["embeddings"].update(dtype=dtype, shape=shape)))


def test_too_many_tensors():
    header, data = base()
    for i in range(MAX_TENSORS):
        header[f"t{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [72, 72]}
    with pytest.raises(BadHeader, match="limit"):
        read_entry(assemble(header, data))


@pytest.mark.parametrize("where", [0, 5, -1])
def test_checksum_mismatch(where):
    blob = bytearray(encode_entry(NS, H, {"embeddings": torch_embeddings("BF16"), "image_grid_thw": torch.tensor(GRID)}))
    parsed = parse_entry(blob)
    pos = parsed.data_start + where if where >= 0 else len(blob) + where
    blob[pos] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        read_entry(blob)
    with pytest.raises(ChecksumMismatch):
        verify_checksum(blob, parsed)
    read_entry(blob, verify=False)  # structure is still fine


# -- plan_entry / write_into errors ---------------------------------------------------------


EMB = np.ones((2, 4), np.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tensors={}), ValueError, "embeddings"),
        (dict(tensors={"emb": EMB}), ValueError, "embeddings"),
        (dict(tensors={"embeddings": np.ones((0, 4), np.float32)}), ValueError, "num_tokens"),
        (dict(tensors={"embeddings": torch.ones(0, 4)}), ValueError, "num_tokens"),
        (dict(tensors={"embeddings": np.ones(4, np.float32)}), ValueError, "2-D"),
        (dict(tensors={"embeddings": np.ones((1, 2, 2), np.float32)}), ValueError, "2-D"),
        (dict(tensors={"embeddings": np.ones((2, 4), np.int32)}), ValueError, "2-D"),
        (dict(tensors={"embeddings": np.ones((2, 4), np.float64)}), ValueError, "2-D"),
        (dict(tensors={"embeddings": np.ones((2, 4), np.uint16)}), UnsupportedDtype, "uint16"),
        (dict(tensors={"embeddings": torch.ones(2, 4, dtype=torch.complex64)}), UnsupportedDtype, "complex"),
        (dict(tensors={"embeddings": EMB}, dtypes={"embeddings": "BF16"}), ValueError, "cast"),
        (dict(tensors={"embeddings": EMB}, dtypes={"embeddings": "F8"}), UnsupportedDtype, "F8"),
        (dict(tensors={"embeddings": [[1.0]]}), TypeError, "list"),
        (dict(metadata={"a": 1}), ValueError, "str"),
        (dict(metadata={"a": None}), ValueError, "str"),
        (dict(metadata={1: "a"}), ValueError, "str"),
        (dict(metadata={"namespace": "other"}), ValueError, "contradicts"),
        (dict(metadata={"hash": content_hash(b"other")}), ValueError, "contradicts"),
        # the writer never produces a blob its own reader rejects
        (dict(metadata={"format": "mmcache/2"}), ValueError, "format"),
        (dict(metadata={"created_at": "yesterday"}), ValueError, "created_at|malformed"),
        (dict(metadata={"encode_ms": "fast"}), ValueError, "encode_ms|malformed"),
        (dict(tensors={"embeddings": EMB, "__metadata__": np.zeros(2, np.int64)}), ValueError, "__metadata__"),
        (dict(metadata={"big": "x" * (MAX_HEADER_BYTES + 1)}), ValueError, "limit"),
        (dict(tensors={"embeddings": EMB, **{f"t{i}": np.zeros(1, np.uint8) for i in range(MAX_TENSORS)}}), ValueError, "limit"),
        (dict(namespace="a/b"), ValueError, "namespace"),
        (dict(hash_hex=H.upper()), ValueError, "hash"),
    ],
)
def test_plan_entry_errors(kwargs, exc, match):
    args = dict(namespace=NS, hash_hex=H, tensors={"embeddings": EMB}) | kwargs
    with pytest.raises(exc, match=match):
        plan_entry(args.pop("namespace"), args.pop("hash_hex"), args.pop("tensors"), **args)


def test_plan_entry_metadata_overrides():
    # matching namespace/hash are fine; a supplied checksum is ignored (the real one is written)
    v = read_entry(encode_entry(NS, H, {"embeddings": EMB}, {"namespace": NS, "hash": H, "checksum": "0" * 16, "created_at": "5", "encode_ms": "7"}))
    assert v.metadata["created_at"] == "5" and v.metadata["encode_ms"] == "7"
    assert v.metadata["checksum"] == checksum(v.buffer[v.parsed.data_start :])


@pytest.mark.parametrize("delta", [-1, 1, -64])
def test_write_into_wrong_size(delta):
    plan = plan_entry(NS, H, {"embeddings": EMB})
    with pytest.raises(ValueError, match="destination"):
        plan.write_into(bytearray(plan.total_bytes + delta))


# -- property tests -------------------------------------------------------------------------


def _check_view(buf, v: EntryView) -> None:
    """What a successful read guarantees: every tensor lies inside the buffer and views work."""
    total = len(memoryview(buf).cast("B"))
    assert v.parsed.total_bytes == total
    assert 8 < v.parsed.data_start <= total
    assert set(REQUIRED_METADATA) <= set(v.metadata)
    emb = v.parsed.tensors["embeddings"]
    assert len(emb.shape) == 2 and emb.dtype in ("BF16", "F16", "F32")
    covered = 0
    for name, info in v.parsed.tensors.items():
        assert v.parsed.data_start <= info.start <= info.end <= total
        covered += info.end - info.start
        arr = v.get_array(name)
        assert arr.nbytes == info.end - info.start
        assert tuple(arr.shape) == info.shape
        t = v.get_tensor(name)
        assert tuple(t.shape) == info.shape
    assert covered == total - v.parsed.data_start


def _read_or_reject(buf, verify: bool):
    try:
        v = read_entry(buf, verify=verify)
    except EntryFormatError:
        return None
    _check_view(buf, v)
    return v


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_random_bytes(blob, verify):
    _read_or_reject(blob, verify)


@FUZZ
@given(st.binary(max_size=600), st.integers(-8, 8), st.booleans())
def test_fuzz_random_bytes_with_plausible_length(rest, delta, verify):
    n = max(0, len(rest) + delta if delta < 0 else delta * 16)
    _read_or_reject(struct.pack("<Q", n) + rest, verify)


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3))


@st.composite
def structured_blobs(draw):
    """Mostly-plausible headers with small perturbations: exercises the validator's deep paths."""
    names = ["embeddings"] + draw(st.lists(st.sampled_from(["grid", "a", "b", "__x"]), unique=True, max_size=3))
    header: dict = {}
    off = 0
    for name in names:
        dtype = draw(st.sampled_from(["F32", "F16", "BF16"]) if name == "embeddings" else st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), min_size=2 if name == "embeddings" else 0, max_size=2 if name == "embeddings" else 3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        rec = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
        kind = draw(st.sampled_from(["ok"] * 6 + ["dtype", "shape", "offsets", "extra", "junk"]))
        if kind == "dtype":
            rec["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPES) + ["F8", "bf16"]), _JUNK))
        elif kind == "shape":
            rec["shape"] = draw(st.lists(st.one_of(st.integers(-2, 6), _JUNK), max_size=4))
        elif kind == "offsets":
            rec["data_offsets"] = draw(st.lists(st.one_of(st.integers(-4, 120), _JUNK), max_size=3))
        elif kind == "extra":
            rec["x"] = 1
        elif kind == "junk":
            rec = draw(_JUNK)
        header[name] = rec
    data = draw(st.binary(min_size=off, max_size=off)) + draw(st.binary(max_size=draw(st.sampled_from([0, 0, 0, 8]))))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    meta = {"format": FORMAT_VERSION, "namespace": NS, "hash": H, "checksum": checksum(data), "created_at": "1", "encode_ms": "0"}
    for k in draw(st.lists(st.sampled_from(sorted(meta)), unique=True, max_size=2)):
        choice = draw(st.sampled_from(["drop", "junk"]))
        if choice == "drop":
            del meta[k]
        else:
            meta[k] = draw(_JUNK)
    header["__metadata__"] = meta
    items = list(header.items())
    order = draw(st.permutations(range(len(items))))
    text = json.dumps(dict(items[i] for i in order)) + " " * draw(st.integers(0, 70))
    return assemble(text, data)


@FUZZ
@given(structured_blobs(), st.booleans())
def test_fuzz_structured_headers(blob, verify):
    _read_or_reject(blob, verify)


def _valid_blobs() -> list[bytes]:
    out = []
    for i, (dtype, n, hidden) in enumerate([("BF16", 3, 8), ("F16", 2, 3), ("F32", 4, 5)]):
        out.append(encode_entry(NS, H, {"embeddings": torch_embeddings(dtype, n, hidden, seed=i), "image_grid_thw": torch.tensor(GRID)}, {"m": "v" * i}))
    return out


VALID = _valid_blobs()


@st.composite
def mutations(draw):
    idx = draw(st.integers(0, len(VALID) - 1))
    blob = bytearray(VALID[idx])
    data_start = parse_entry(blob).data_start
    json_end = bytes(blob[:data_start]).rindex(b"}") + 1
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        op = draw(st.sampled_from(["flip", "flip_header", "truncate", "splice_header", "append", "length", "padding"]))
        if not blob:
            break
        if op == "padding" and json_end < min(data_start, len(blob)):  # JSON whitespace: harmless
            pos = draw(st.integers(json_end, min(data_start, len(blob)) - 1))
            blob[pos] = draw(st.sampled_from(b" \t\r\n" + b"x\x00"))
        elif op == "flip":
            pos = draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= draw(st.integers(1, 255))
        elif op == "flip_header":
            pos = draw(st.integers(0, min(data_start, len(blob)) - 1))
            blob[pos] = draw(st.sampled_from([0x20, 0x09, 0x0A, 0x22, 0x7D, 0x5D, 0x30, 0x39, 0x00, 0xFF]))
        elif op == "truncate":
            del blob[draw(st.integers(0, len(blob) - 1)) :]
        elif op == "splice_header":
            end = min(data_start, len(blob))
            a = draw(st.integers(0, max(0, end - 1)))
            b = draw(st.integers(a, end))
            blob[a:b] = draw(st.binary(min_size=0, max_size=b - a + 4))
        elif op == "append":
            blob += draw(st.binary(min_size=1, max_size=80))
        elif op == "length" and len(blob) >= 8:
            (n,) = struct.unpack_from("<Q", blob)
            struct.pack_into("<Q", blob, 0, max(0, n + draw(st.integers(-70, 70))))
    return idx, bytes(blob)


@FUZZ
@given(mutations())
def test_fuzz_mutated_valid_blobs(case):
    idx, blob = case
    assume(blob != VALID[idx])
    v = _read_or_reject(blob, verify=True)
    if v is None:
        return
    # A harmless mutation (e.g. whitespace in the padding, or a metadata value: the checksum
    # covers the data section only). The data must be exactly the original's.
    orig = read_entry(VALID[idx])
    assert v.parsed.data_start == orig.parsed.data_start
    assert bytes(blob[v.parsed.data_start :]) == VALID[idx][orig.parsed.data_start :]
    assert v.parsed.tensors["embeddings"] == orig.parsed.tensors["embeddings"]
    assert torch.equal(v.tensor, orig.tensor)
    got_ranges = sorted((i.start, i.end) for i in v.parsed.tensors.values())
    assert got_ranges == sorted((i.start, i.end) for i in orig.parsed.tensors.values())


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(["BF16", "F16", "F32"]),
    n=st.integers(1, 6),
    hidden=st.integers(0, 9),
    meta=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in REQUIRED_METADATA), st.text(max_size=20), max_size=4),
    grid=st.booleans(),
)
def test_property_round_trip(dtype, n, hidden, meta, grid):
    t = torch.arange(n * hidden, dtype=torch.float32).reshape(n, hidden).to(TORCH_DTYPES[dtype])
    tensors = {"embeddings": t} | ({"image_grid_thw": torch.tensor(GRID)} if grid else {})
    blob = encode_entry(NS, H, tensors, meta)
    v = read_entry(blob)
    assert v.parsed.data_start % DATA_ALIGNMENT == 0
    assert torch.equal(v.tensor, t)
    assert {k: v.metadata[k] for k in meta} == meta
    loaded = safetensors.torch.load(blob)
    assert torch.equal(loaded["embeddings"], t)
    again = read_entry(relayout(blob, NS, H).to_bytes())
    assert torch.equal(again.tensor, t)
    assert {k: again.metadata[k] for k in meta} == meta
