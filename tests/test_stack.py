"""The whole stack as a user runs it: ``mmcache up`` (EPD, two encoders) and ``mmcache up
--aggregated``, driven through the official ``openai`` client: chat with one and three images,
streaming and not; greedy EPD == aggregated == ``generate``; cache hits; images routed by hash over the
encoders; an encoder killed mid-run; clean shutdown."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import signal

import numpy as np
import openai
import pytest
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from stack_process import StackProcess, up_for_tests

pytestmark = pytest.mark.slow  # NOTE: whole stacks as child processes: minutes in all

MAX_TOKENS = 10


def _up(model_dir: str, *flags: str) -> StackProcess:
    return up_for_tests(model_dir, *flags)


@pytest.fixture(scope="module")
def epd(model_dir):
    with _up(model_dir, "--encoders", "2") as up:
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


@pytest.fixture(scope="module")
def aggregated(model_dir):
    with _up(model_dir, "--aggregated") as up:
        yield up
    assert up.proc.returncode == 0, "\n".join(up.output[-30:])


def client(up: StackProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def image(seed: int, size=(240, 320)) -> tuple[str, Image.Image]:
    """(data: URI of a PNG, the decoded image)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return ("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def messages(uris: list[str], question: str = "Describe the images.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                          *({"type": "image_url", "image_url": {"url": u}} for u in uris)]}]


def chat(up: StackProcess, uris: list[str], **kwargs):
    return client(up).chat.completions.create(model="tiny-llava", messages=messages(uris), max_tokens=MAX_TOKENS,
                                              temperature=0, **kwargs)


def token_ids(completion) -> list[int]:
    return completion.choices[0].to_dict()["token_ids"]


def test_port_0_binds_a_free_port_and_reports_it(epd, aggregated):
    ports = {int(up.url.rsplit(":", 1)[1]) for up in (epd, aggregated)}
    assert len(ports) == 2 and 0 not in ports
    assert any(line.startswith(f"mmcache up: {epd.url}/v1 ") for line in epd.output)


def test_models(epd, aggregated):
    for up in (epd, aggregated):
        assert [m.id for m in client(up).models.list().data] == ["tiny-llava"]


@pytest.mark.parametrize("num_images", [1, 3])
def test_chat_streaming_and_not(epd, num_images):
    uris = [image(100 + num_images * 10 + i)[0] for i in range(num_images)]
    full = chat(epd, uris)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.message.content, str)
    assert full.usage.completion_tokens <= MAX_TOKENS
    assert full.usage.prompt_tokens > 576 * num_images
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(chat(epd, uris, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content and finish == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def _generate_reference(model_dir: str, uris_and_images: list[tuple[str, Image.Image]]) -> list[int]:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    hf = [{"role": "user", "content": [{"type": "text", "text": "Describe the images."},
                                       *({"type": "image"} for _ in uris_and_images)]}]
    text = processor.apply_chat_template(hf, add_generation_prompt=True)
    inputs = processor(text=text, images=[im for _, im in uris_and_images], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("num_images", [1, 3])
def test_greedy_epd_equals_aggregated_equals_generate(epd, aggregated, model_dir, num_images):
    pairs = [image(200 + num_images * 10 + i) for i in range(num_images)]
    uris = [u for u, _ in pairs]
    extra = {"extra_body": {"return_token_ids": True}}
    disagg, agg = chat(epd, uris, **extra), chat(aggregated, uris, **extra)
    want = _generate_reference(model_dir, pairs)
    assert token_ids(disagg) == token_ids(agg) == want
    assert disagg.choices[0].message.content == agg.choices[0].message.content
    assert disagg.usage.model_dump() == agg.usage.model_dump()
    streamed = [i for c in chat(epd, uris, stream=True, **extra) if c.choices
                for i in c.choices[0].to_dict().get("token_ids", [])]
    assert streamed == want


def test_a_video_is_its_frames_as_images(epd, aggregated, model_dir):
    """LLaVA has no video tokens: a video's sampled frames are images, each encoded (and cached)
    once, in the prompt where the video was; EPD == aggregated == generate on those frames."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from clips import data_uri, feed, make_clip

    source = feed(8, size=(48, 64), seed=11)  # NOTE: 2 s at 4 fps; sampled at 2 fps: 4 frames
    still, still_image = image(600)
    parts = [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": still}},
             {"type": "video_url", "video_url": {"url": data_uri(make_clip(source))}}]
    extra = {"extra_body": {"return_token_ids": True, "mm_processor_kwargs": {"fps": 2, "max_frames": 8}}}
    before = epd.stats()["totals"]
    answers = [client(up).chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": parts}],
                                                  max_tokens=MAX_TOKENS, temperature=0, **extra)
               for up in (epd, aggregated)]
    after = epd.stats()["totals"]
    assert after["frames_encoded"] - before["frames_encoded"] == 4 and after["videos"] == before["videos"] + 1
    assert answers[0].usage.prompt_tokens > 5 * 576
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    hf = [{"role": "user", "content": [{"type": "text", "text": "Describe."}, *({"type": "image"},) * 5]}]
    frames = [Image.fromarray(f) for f in source[0:8:2]]
    inputs = processor(text=processor.apply_chat_template(hf, add_generation_prompt=True),
                       images=[still_image, *frames], return_tensors="pt")
    want = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)[0, inputs["input_ids"].shape[1]:]
    assert token_ids(answers[0]) == token_ids(answers[1]) == want.tolist()


def test_a_second_request_for_the_same_image_encodes_nothing(epd):
    uri = image(300)[0]
    chat(epd, [uri])
    before = epd.stats()["totals"]
    chat(epd, [uri])
    after = epd.stats()["totals"]
    assert after["images_encoded"] == before["images_encoded"]
    # NOTE: the router itself finds a cached data: image (it never reaches an encoder)
    assert after["router_cache_hits"] == before["router_cache_hits"] + 1
    assert after["images"] == before["images"] + 1
    assert epd.stats()["cache"]["stats"]["host"]["hits"] > 0


def test_a_request_whose_images_are_all_cached_reaches_no_encoder(epd):
    """The router hashes data: URIs and looks them up itself: a request whose images
    are all cached goes straight to prefill; one with a new image sends only that to an encoder."""
    a, b, c = image(350)[0], image(351)[0], image(352)[0]
    extra = {"extra_body": {"return_token_ids": True}}
    first = chat(epd, [a, b], **extra)
    requests = lambda: sum(e["stats"]["requests"] for e in epd.stats()["encoders"])  # noqa: E731
    images = lambda: sum(e["stats"]["images"] for e in epd.stats()["encoders"])  # noqa: E731
    r0, i0 = requests(), images()
    again = chat(epd, [a, b], **extra)
    assert requests() == r0 and images() == i0  # no encoder saw it
    assert token_ids(again) == token_ids(first)  # and the answer is the same
    chat(epd, [a, c, b])
    assert requests() == r0 + 1 and images() == i0 + 1  # only the new image went to an encoder
    assert epd.stats()["router"]["router_cache_hits"] >= 4


def test_each_new_image_goes_to_the_encoder_owning_its_hash(epd):
    """Misses are routed by key (rendezvous hashing over the encoders' URLs): each encoder
    encodes exactly the images whose content hash it owns."""
    from llm_worker.router.backends import Pool
    from mmcache_client import content_hash

    def per_encoder() -> dict[str, int]:
        return {e["url"]: e["stats"]["encoded"] for e in epd.stats()["encoders"]}
    before = per_encoder()
    pool = Pool("encode", list(before), 60)
    uris = [image(400 + i)[0] for i in range(3)]
    expected = dict.fromkeys(before, 0)
    for u in uris:
        expected[pool.owner(content_hash(base64.b64decode(u.split(",", 1)[1]))).url] += 1
    chat(epd, uris)
    delta = {url: n - before[url] for url, n in per_encoder().items()}
    assert delta == expected


def test_stats_gather_the_stack(epd):
    stats = epd.stats()
    assert stats["mode"] == "epd" and stats["cache"]["healthy"]
    assert len(stats["encoders"]) == 2 and len(stats["prefill"]) == 1 and len(stats["decode"]) == 1
    for worker in stats["encoders"] + stats["prefill"] + stats["decode"]:
        assert worker["healthy"] and worker["url"].startswith("http://127.0.0.1:") and worker["stats"]["pid"] > 0
    assert stats["router"]["requests"] >= 1 and stats["decode"][0]["stats"]["completion_tokens"] > 0


def test_bad_input_names_its_stage_and_the_stack_keeps_serving(epd):
    with pytest.raises(openai.BadRequestError) as err:
        chat(epd, [image(500)[0], "data:image/png;base64,bm90IGFuIGltYWdl"])
    assert err.value.status_code == 400 and "encode: image 1:" in err.value.message
    assert err.value.body["stage"] == "encode"
    with pytest.raises(openai.NotFoundError):
        client(epd).chat.completions.create(model="gpt-4o", messages=messages([]))
    with pytest.raises(openai.BadRequestError, match="n"):
        client(epd).chat.completions.create(model="tiny-llava", messages=messages([]), n=2)
    assert chat(epd, [image(501)[0]]).choices[0].finish_reason in ("length", "stop")


def test_aggregated_stats_and_errors(aggregated):
    stats = aggregated.stats()
    assert stats["mode"] == "aggregated" and len(stats["generate"]) == 1 and stats["generate"][0]["healthy"]
    with pytest.raises(openai.BadRequestError) as err:
        chat(aggregated, ["data:image/png;base64,bm90IGFuIGltYWdl"])
    assert err.value.body["stage"] == "generate" and "image 0" in err.value.message


def test_an_encoder_killed_mid_run(model_dir):
    """Requests in flight when an encoder dies are retried on the other one (or fail naming the
    encode stage); the stack keeps serving, logs the death and restarts the encoder (see
    ``test_supervise.py``)."""
    with _up(model_dir, "--encoders", "2") as up:
        victim = up.stats()["encoders"][0]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, up, [image(600 + 3 * i + j)[0] for j in range(3)]) for i in range(6)]
            os.kill(victim["stats"]["pid"], signal.SIGKILL)
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result().choices[0].finish_reason)
                except openai.APIError as e:
                    assert "encode" in str(e), e
                    outcomes.append("error")
        assert outcomes.count("error") < len(outcomes)
        for i in range(3):  # later requests all succeed: the dead encoder is passed over
            assert chat(up, [image(700 + 3 * i + j)[0] for j in range(3)]).choices[0].finish_reason != "error"
        stats = up.stats()
        dead = next(e for e in stats["encoders"] if e["url"] == victim["url"])
        assert dead["failures"] >= 1 and stats["router"]["retries"] >= 1
        assert up.proc.poll() is None
        assert any(f"encoder-0 ({victim['url']}) killed by SIGKILL" in line for line in up.output)
    assert up.proc.returncode == 0


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_up_stops_everything(model_dir, how):
    up = _up(model_dir, "--encoders", "1").start()
    pids = [w["stats"]["pid"] for role in ("encoders", "prefill", "decode") for w in up.stats()[role]]
    socket_path = up.stats()["cache"]["url"].removeprefix("unix://")
    if how == "SIGTERM":
        assert up.stop() == 0
    else:  # NOTE: the terminal signals the whole foreground process group
        assert up.stop(sig=signal.SIGINT, group=True) == 0
        assert not any("Traceback" in line for line in up.output), "\n".join(up.output[-30:])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not os.path.exists(socket_path)


def test_up_fails_clearly_when_a_worker_cannot_start(tmp_path):
    up = _up(str(tmp_path / "no-such-model"), "--encoders", "1")
    with pytest.raises(RuntimeError, match="exited with 1") as err:
        up.start()
    assert "no-such-model" in str(err.value)


def _niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def _autogroup_nice(pid: int) -> int | None:
    """The nice value of the process's autogroup (``/autogroup-42 nice 7``); None without autogroups."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])
    except OSError:
        return None


def test_stage_priorities_and_the_callers_environment(model_dir):
    """``--nice ROLE=N`` runs that stage's processes at that CPU priority; the stack adds no
    OpenMP tuning of its own (that belongs to benchmark profiles): the workers get the caller's."""
    with _up(model_dir, "--encoders", "1", "--nice", "decode=7", "--nice", "encoder=3", "--encoder-batch", "1",
             "--encoder-schedule", "sjf") as up:
        stats = up.stats()
        pids = {role: stats[role][0]["stats"]["pid"] for role in ("encoders", "prefill", "decode")}
        with open(f"/proc/{pids['encoders']}/cmdline", "rb") as f:
            assert b"\0--max-batch\x001\0" in f.read()  # --encoder-batch reaches the encoders
        assert stats["encoders"][0]["stats"]["schedule"] == "sjf"  # and --encoder-schedule
        assert {role: _niceness(pid) - os.nice(0) for role, pid in pids.items()} == \
            {"encoders": 3, "prefill": 0, "decode": 7}
        if _autogroup_nice(pids["decode"]) is not None:  # NOTE: a session each: the nice value must reach the group
            assert {role: _autogroup_nice(pid) for role, pid in pids.items()} == \
                {role: max(0, _niceness(pid)) for role, pid in pids.items()}
        assert all(_environ(pid).get("GOMP_SPINCOUNT") == os.environ.get("GOMP_SPINCOUNT") for pid in pids.values())
        assert chat(up, [image(900)[0]]).choices[0].finish_reason in ("stop", "length")
    with _up(model_dir, "--aggregated") as up:
        pid = up.stats()["generate"][0]["stats"]["pid"]
        assert _environ(pid).get("GOMP_SPINCOUNT") == os.environ.get("GOMP_SPINCOUNT") and _niceness(pid) == os.nice(0)


@pytest.mark.parametrize("flags, message", [(["--encoder-batch", "0"], "--encoder-batch must be >= 1"),
                                            (["--aggregated", "--encoder-schedule", "sjf"],
                                             "--encoder-schedule and --encoder-batch are for the EPD stack"),
                                            # NOTE: a worker's flag is the worker's to check: it refuses to start
                                            (["--encoder-schedule", "lifo"], "invalid choice: 'lifo'")])
def test_bad_stack_shapes_are_clear_errors(tmp_path, flags, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mmcache.cli", "up", "--data-dir", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("flag, message", [("decode=20", "niceness must be 0..19"), ("gpu=1", "unknown role"),
                                           ("decode", "is not ROLE=N")])
def test_bad_nice_is_a_clear_error(tmp_path, flag, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mmcache.cli", "up", "--data-dir", str(tmp_path), "--nice", flag],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
