"""The LLM worker's core on the CPU with tiny-llava: prompt ids, prefill + batched decode against
``LlavaForConditionalGeneration.generate``, the KV hand-off through a sidecar, sampling and stops."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from encoder_worker.encoder import Encoder
from encoder_worker.models import ensure_model
from llm_worker.engine.engine import LLMEngine
from llm_worker.engine.kv import KV_FORMAT, KVCache, kv_entry_fields, kv_key, read_prefill
from mmcache_client.format import plan_entry
from llm_worker.engine.prompt import image_urls, prompt_ids
from llm_worker.engine.sampling import SamplingParams
from llm_worker.engine.sequence import FINISH_LENGTH, FINISH_STOP, DecodeState
from llm_worker.engine.slab import BatchKV, KVAllocationError
from mmcache.sidecar.config import ServeConfig
from mmcache_client import CacheClient
from mmcache_client.format import read_entry
from sidecar import ThreadedSidecar

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def decode_all(engine, states):
    """Every unfinished state generated to its end in shared batched steps (as the decode loop does)."""
    batch = engine.new_batch()
    for state in states:
        if not state.finished:
            batch.add(state)
    while batch:
        batch.step()
    return list(states)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_model("tiny-llava", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def engine(model_dir: str) -> LLMEngine:
    return LLMEngine.load(model_dir)


@pytest.fixture(scope="module")
def encoder(model_dir: str) -> Encoder:
    return Encoder.load(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir: str):
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    sizes = [(300, 400), (336, 336), (500, 240)]
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (*hw, 3), dtype=np.uint8))
            for i, hw in enumerate(sizes)]


@pytest.fixture(scope="module")
def embeddings(encoder: Encoder, images) -> list[torch.Tensor]:
    return [e.embeddings for e in encoder.encode(images)]


def conversation(num_images: int, question: str = "What is shown in this image?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": f"https://example.com/{i}.png"}} for i in range(num_images)]
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": [{"type": "text", "text": question}, *parts]}]


def hf_conversation(messages: list[dict]) -> list[dict]:
    """The same conversation as Hugging Face processors take it ({"type": "image"} parts)."""
    def part(p):
        return {"type": "image"} if p["type"] == "image_url" else p
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]]}
            for m in messages]


def processor_inputs(processor, messages: list[dict], images: list[Image.Image]):
    text = processor.apply_chat_template(hf_conversation(messages), add_generation_prompt=True)
    return processor(text=text, images=images or None, return_tensors="pt")


def run_alone(engine: LLMEngine, ids: list[int], embs: list[torch.Tensor], sampling: SamplingParams,
              request_id: str = "r") -> DecodeState:
    state = engine.start(request_id, engine.prefill(ids, embs, sampling), sampling)
    return decode_all(engine, [state])[0]


# ---------------------------------------------------------------- prompt


@pytest.mark.parametrize("num_images", [1, 2])
def test_prompt_ids_equal_the_processors(engine, processor, images, num_images):
    messages = conversation(num_images)
    ids = engine.prompt_ids(messages, [576] * num_images)
    want = processor_inputs(processor, messages, images[:num_images])["input_ids"][0].tolist()
    assert ids == want
    assert ids.count(engine.image_token_id) == 576 * num_images
    assert image_urls(messages) == [f"https://example.com/{i}.png" for i in range(num_images)]


def test_prompt_rejects_bad_messages(engine):
    with pytest.raises(ValueError, match="token counts"):
        engine.prompt_ids(conversation(2), [576])
    with pytest.raises(ValueError, match="placeholders"):
        engine.prompt_ids([{"role": "user", "content": [{"type": "text", "text": "<image> hi"}]}], [])
    with pytest.raises(ValueError, match="role"):
        prompt_ids(engine.tokenizer, [{"role": "robot", "content": "hi"}], engine.image_token_id, [])
    with pytest.raises(ValueError, match="content\\[0\\]"):
        engine.prompt_ids([{"role": "user", "content": [{"type": "audio"}]}], [])


# ---------------------------------------------------------------- prefill + decode


@pytest.mark.parametrize("num_images", [1, 3])
def test_greedy_matches_generate(model_dir, engine, processor, images, embeddings, num_images):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    messages = conversation(num_images)
    inputs = processor_inputs(processor, messages, images[:num_images])
    want = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY.max_tokens)[0, inputs["input_ids"].shape[1]:]
    ids = engine.prompt_ids(messages, [576] * num_images)
    state = run_alone(engine, ids, embeddings[:num_images], GREEDY)
    assert state.token_ids == want.tolist()
    assert state.finish_reason in (FINISH_LENGTH, FINISH_STOP)
    assert state.text == engine.tokenizer.decode(state.token_ids, skip_special_tokens=True)


def test_batched_decode_equals_each_alone(engine, embeddings):
    prompts = [(engine.prompt_ids(conversation(n, q), [576] * n), embeddings[:n])
               for n, q in [(0, "Hi"), (1, "Describe the picture in detail."), (2, "What color is it?"), (3, "Why?")]]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (9, 14, 5, 11)]
    alone = [run_alone(engine, ids, embs, p).token_ids for (ids, embs), p in zip(prompts, params)]

    states = [engine.start(f"r{i}", engine.prefill(ids, embs, p), p)
              for i, ((ids, embs), p) in enumerate(zip(prompts, params))]
    batch = engine.new_batch()
    for state in states[:2]:  # NOTE: the shortest prompts first: the 3-image one joins later and shifts the rest
        batch.add(state)
    finished = batch.step() + batch.step()
    batch.add(states[3])
    finished += batch.step()
    batch.add(states[2])
    while batch:
        finished += batch.step()
    assert sorted(s.request_id for s in finished) == ["r0", "r1", "r2", "r3"]
    assert [s.token_ids for s in states] == alone
    assert [len(t) for t in alone] == [9, 14, 5, 11]


def test_prefill_and_decode_raise_no_deprecation_warnings(engine, embeddings):
    """The cache goes in under the name this transformers takes (``cache`` from 5.24, where
    ``past_key_values`` warns on every forward), so a worker's log is not one warning per token."""
    ids = engine.prompt_ids(conversation(1), [576])
    sampling = SamplingParams(max_tokens=3, temperature=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = run_alone(engine, ids, embeddings[:1], sampling)
    assert len(state.token_ids) == 3
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


@torch.inference_mode()
def test_batch_kv_layout_survives_joins_growth_and_removal():
    """Storage alone: rows stay left-aligned copies of their KV plus every column written since."""
    g = torch.Generator().manual_seed(0)
    kv = BatchKV(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    want: list[list[torch.Tensor]] = []  # per row, per layer: keys [heads, tokens, head_dim]

    def join(num_tokens: int) -> None:
        prompt = KVCache(torch.randn(2, 1, num_tokens, 2, generator=g), torch.randn(2, 1, num_tokens, 2, generator=g))
        kv.add(prompt, reserve_tokens=1)
        want.append(list(prompt.keys))

    def step() -> None:
        kv.reserve_column()
        cache = kv.cache()
        for layer in range(2):
            new = torch.randn(kv.num_rows, 1, 1, 2, generator=g)
            cache.layers[layer].update(new, torch.zeros_like(new))
            for row in range(kv.num_rows):
                want[row][layer] = torch.cat([want[row][layer], new[row]], dim=1)
        kv.advance()

    def check() -> None:
        mask = kv.attention_mask()
        for row, n in enumerate(kv.lens):
            for layer in range(2):
                assert torch.equal(kv.keys[layer][row, :, kv.length - n:kv.length], want[row][layer])
            if mask is not None:
                assert mask[row].tolist() == [False] * (kv.length - n) + [True] * (n + 1)

    join(3)
    step()
    join(7)  # longer than the batch: the first row shifts right
    check()
    capacity = kv.column_capacity
    for _ in range(4):
        step()
    assert kv.column_capacity > capacity
    join(2)
    step()
    check()
    kv.remove(1)  # the longest row leaves: the last row moves into its place, padding columns go
    want[1] = want.pop()
    assert kv.length == max(kv.lens)
    step()
    check()
    assert kv.attention_mask() is not None and kv.num_rows == 2


@torch.inference_mode()
def test_a_failed_allocation_leaves_the_batch_kv_as_it_was(monkeypatch):
    g = torch.Generator().manual_seed(1)
    kv = BatchKV(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))

    def prompt(num_tokens: int) -> KVCache:
        return KVCache(torch.randn(2, 1, num_tokens, 2, generator=g), torch.randn(2, 1, num_tokens, 2, generator=g))
    first, second = prompt(3), prompt(5)
    kv.add(first, reserve_tokens=4)
    kv.add(second, reserve_tokens=4)
    before = ([k.clone() for k in kv.keys], [v.clone() for v in kv.values], list(kv.lens), kv.length,
              kv.row_capacity, kv.column_capacity)
    allocate = BatchKV._allocate
    large = []

    def short_of_memory(self, shape):
        if shape[2] > 40:
            large.append(shape)
            if len(large) == 3:  # NOTE: the first layer's slabs were made: the second layer's fail
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")
        return allocate(self, shape)
    monkeypatch.setattr(BatchKV, "_allocate", short_of_memory)
    # NOTE: the third row needs more rows, a shift and 100 more positions
    with pytest.raises(KVAllocationError, match=r"no memory for KV slabs of 4 rows x 108 positions \(13824 bytes\)"):
        kv.add(prompt(8), reserve_tokens=100)
    after = (kv.keys, kv.values, kv.lens, kv.length, kv.row_capacity, kv.column_capacity)
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
    assert before[2:] == after[2:]
    kv.add(prompt(8), reserve_tokens=4)  # NOTE: one that fits still joins, and the rows kept their KV
    assert kv.lens == [3, 5, 8]
    for row, p in enumerate((first, second)):
        assert torch.equal(kv.keys[1][row, :, kv.length - p.num_tokens:kv.length], p.keys[1])


def test_a_request_whose_kv_finds_no_memory_fails_alone(engine, embeddings, monkeypatch):
    prompts = [(engine.prompt_ids(conversation(n, q), [576] * n), embeddings[:n]) for n, q in [(1, "Hi"), (0, "Why?")]]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (9, 14)]
    alone = [run_alone(engine, ids, embs, p).token_ids for (ids, embs), p in zip(prompts, params)]
    states = [engine.start(f"r{i}", engine.prefill(ids, embs, p), p)
              for i, ((ids, embs), p) in enumerate(zip(prompts, params))]
    greedy_long = SamplingParams(max_tokens=3000, temperature=0)
    doomed_ids = engine.prompt_ids(conversation(0, "Tell me a long story"), [])
    doomed = engine.start("doomed", engine.prefill(doomed_ids, [], greedy_long), greedy_long)
    allocate = BatchKV._allocate
    monkeypatch.setattr(BatchKV, "_allocate", lambda self, shape: (_ for _ in ()).throw(
        RuntimeError("out of memory (injected)")) if shape[2] > 2500 else allocate(self, shape))
    batch = engine.new_batch()
    batch.add(states[0])
    batch.step()
    with pytest.raises(KVAllocationError, match="out of memory"):
        batch.add(doomed)
    assert doomed.kv is not None and len(batch) == 1  # NOTE: it never joined; its KV is still its own
    batch.add(states[1])
    while batch:
        batch.step()
    assert [s.token_ids for s in states] == alone


def test_max_tokens_must_fit_the_context(engine):
    ids = engine.prompt_ids(conversation(0, "Hi"), [])
    assert engine.max_model_len == 4096
    fits = SamplingParams(max_tokens=4096 - len(ids), temperature=0)
    engine.check_max_tokens(len(ids), fits)
    too_many = SamplingParams(max_tokens=4097 - len(ids), temperature=0)
    with pytest.raises(ValueError, match=f"max_tokens={4097 - len(ids)} exceeds the model's context of 4096 minus "
                                         f"the prompt's {len(ids)} tokens \\(at most {4096 - len(ids)}\\)"):
        engine.start("r", engine.prefill(ids, [], too_many), too_many)


# ---------------------------------------------------------------- KV hand-off


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidecar")
    sock_dir = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")  # AF_UNIX paths are short
    sock = os.path.join(sock_dir, "s.sock")
    config = ServeConfig(data_dir=str(tmp / "data"), port=0, socket=sock, host_capacity_bytes=64 << 20,
                         disk_capacity_bytes=256 << 20, max_entry_size_bytes=32 << 20, arena_path=str(tmp / "arena"))
    sc = ThreadedSidecar(config).start()
    sc.unix_url = f"unix://{sock}"
    yield sc
    sc.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_kv_handoff_through_the_cache_is_zero_copy(model_dir, engine, embeddings, sidecar):
    ids = engine.prompt_ids(conversation(3), [576] * 3)
    prefill = engine.prefill(ids, embeddings, GREEDY)
    in_process = decode_all(engine, [engine.start("local", prefill, GREEDY)])[0]

    key = engine.kv_key("req-42")
    assert key == kv_key(engine.namespace, "req-42") and key.namespace == f"kv.{engine.namespace}"
    assert kv_entry_fields(prefill)["persist"] is False  # NOTE: a hand-off is host-only
    with CacheClient(sidecar.unix_url) as client:
        assert client.put(key.namespace, key.hash, **kv_entry_fields(prefill))

    decoder = LLMEngine.load(model_dir)  # a fresh engine, as on a decode worker
    with CacheClient(sidecar.unix_url) as client, client.get(key.namespace, key.hash) as entry:
        handed = read_prefill(entry)
        base = np.frombuffer(entry.buffer, dtype=np.uint8).ctypes.data
        assert handed.logits is None  # decode never reads them: the hand-off does not carry them
        assert entry.nbytes < prefill.kv.nbytes + 4096
        for t in (handed.kv.keys, handed.kv.values):  # views of the shared arena
            assert base <= t.data_ptr() < base + entry.nbytes
        assert entry.metadata["kv_format"] == KV_FORMAT and entry.metadata["num_tokens"] == str(len(ids))
        assert handed.first_token == prefill.first_token and handed.num_prompt_tokens == len(ids)
        assert torch.equal(handed.kv.keys, prefill.kv.keys) and torch.equal(handed.kv.values, prefill.kv.values)
        state = decoder.start("remote", handed, GREEDY)
        batch = decoder.new_batch()
        batch.add(state)  # copies the KV in: the entry may close after this
    while batch:
        batch.step()
    assert state.token_ids == in_process.token_ids and state.text == in_process.text


def test_kv_entry_round_trips_as_bytes(engine, embeddings):
    ids = engine.prompt_ids(conversation(1), [576])
    prefill = engine.prefill(ids, embeddings[:1], GREEDY)
    key, fields = engine.kv_key("r"), kv_entry_fields(prefill)
    blob = plan_entry(key.namespace, key.hash, {"embeddings": fields["tensor"], **fields["extras"]},
                      fields["metadata"], encode_ms=fields["encode_ms"]).to_bytes()
    handed = read_prefill(read_entry(blob))
    assert torch.equal(handed.kv.keys, prefill.kv.keys) and handed.logits is None
    assert handed.prefill_ms == pytest.approx(prefill.prefill_ms, abs=1e-3)
    assert engine.kv_key("r") != engine.kv_key("s")


def test_kv_from_other_weights_is_refused(engine, embeddings):
    prefill = engine.prefill(engine.prompt_ids(conversation(0), []), [], GREEDY)
    other = type(prefill)("llava.llama.f32.0000000000000000", prefill.first_token, prefill.kv, prefill.logits)
    with pytest.raises(ValueError, match="made by model"):
        engine.start("r", other, GREEDY)
    with pytest.raises(ValueError, match="embedding rows"):
        engine.prefill(engine.prompt_ids(conversation(1), [576]), [], GREEDY)


# ---------------------------------------------------------------- sampling and stopping


def test_max_tokens_and_stop_strings(engine, embeddings):
    ids = engine.prompt_ids(conversation(1), [576])
    long = run_alone(engine, ids, embeddings[:1], SamplingParams(max_tokens=24, temperature=0))
    assert len(long.token_ids) == 24 and long.finish_reason == FINISH_LENGTH

    one = run_alone(engine, ids, embeddings[:1], SamplingParams(max_tokens=1, temperature=0))
    assert one.token_ids == long.token_ids[:1] and one.finish_reason == FINISH_LENGTH

    # NOTE: the tiny model's random weights write odd text; take a printable pair from its middle.
    stop = next(long.text[i:i + 2] for i in range(3, len(long.text) - 1) if long.text[i:i + 2].isprintable())
    cut = run_alone(engine, ids, embeddings[:1], SamplingParams(max_tokens=24, temperature=0, stop=("never!", stop)))
    assert cut.finish_reason == FINISH_STOP
    assert cut.text == long.text[: long.text.find(stop)]
    assert cut.token_ids == long.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 24


def test_eos_and_stop_strings_on_the_output_side(engine):
    tok = engine.tokenizer
    hello, world = tok.encode(" hello", add_special_tokens=False), tok.encode(" world", add_special_tokens=False)
    eos = engine.eos_token_ids[0]

    state = DecodeState("r", SamplingParams(max_tokens=50), tok, [eos], kv=None)
    for t in hello + world + [eos]:
        state.append(t)
    assert state.finish_reason == FINISH_STOP and state.text == " hello world" and state.token_ids[-1] == eos

    state = DecodeState("r", SamplingParams(max_tokens=50, stop=["lo w"]), tok, [eos], kv=None)
    streamed = ""
    for t in hello + world:
        if state.finished:
            break
        state.append(t)
        assert state.readable_text().startswith(streamed)  # never takes back what was streamed
        streamed = state.readable_text()
        assert "lo w" not in streamed
    assert state.finish_reason == FINISH_STOP and state.text == " hel"


def test_seeded_sampling_is_reproducible(engine, embeddings):
    ids = engine.prompt_ids(conversation(1), [576])
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    first = run_alone(engine, ids, embeddings[:1], params).token_ids
    assert run_alone(engine, ids, embeddings[:1], params).token_ids == first
    other_seed = run_alone(engine, ids, embeddings[:1], SamplingParams(16, 0.9, 0.9, seed=8)).token_ids
    assert other_seed != first

    # The same seed in a batch with other requests, and a nucleus so small it is greedy.
    other_ids = engine.prompt_ids(conversation(0, "Hi"), [])
    mates = [SamplingParams(16, 1.3, seed=1), SamplingParams(max_tokens=16, temperature=0.7, top_p=1e-9, seed=3)]
    states = [engine.start(f"r{i}", engine.prefill(i_, e, p), p)
              for i, (i_, e, p) in enumerate([(ids, embeddings[:1], params), (other_ids, [], mates[0]),
                                               (other_ids, [], mates[1])])]
    decode_all(engine, states)
    assert states[0].token_ids == first
    assert states[2].token_ids == run_alone(engine, other_ids, [], SamplingParams(16, temperature=0)).token_ids


def test_sampling_params_are_validated():
    for bad in [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(seed=-1),
                dict(stop=("",))]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)


@pytest.mark.parametrize("layout", ["runs", "adjacent", "split"])
def test_images_scattered_in_place_equal_masked_scatter(layout):
    """Prefill writes each image's view straight into inputs_embeds (one copy each): the same
    rows as masked_scatter of their concatenation, whatever the placeholders look like."""
    from llm_worker.engine.engine import _scatter_images

    torch.manual_seed(0)
    seq, hidden = 24, 8
    mask = torch.zeros(seq, dtype=torch.bool)
    if layout == "runs":
        mask[2:5] = mask[10:14] = True
    elif layout == "adjacent":
        mask[3:10] = True  # two images back to back
    else:
        mask[[1, 2, 7, 8, 9, 20, 21]] = True  # the first image's rows are not one run
    images = [torch.randn(3, hidden, dtype=torch.bfloat16), torch.randn(int(mask.sum()) - 3, hidden)]
    base = torch.randn(seq, hidden)
    expected = base.masked_scatter(mask[:, None], torch.cat([e.to(base.dtype) for e in images]))
    got = base.clone()
    _scatter_images(got, mask, images)
    assert torch.equal(got, expected)
