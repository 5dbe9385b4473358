"""The simulator against cases computed by hand: one request through every stage, saturated
single stages at their service rate, the aggregated worker's one queue, shared devices, the
cache (hits, single flight, eviction), goodput, profiles that are not, and role switching."""

from __future__ import annotations

import json
import math

import pytest

from llm_worker.elastic.policy import ElasticPolicy
from llm_worker.planner.planner import goodput
from llm_worker.planner.simulator import Allocation, SimConfig, SimRequest, apportion, requests_of, simulate
from llm_worker.planner.stage_costs import ProfileError, StageCosts, interp
from llm_worker.planner.workload import concatenate, load_phases
from synthetic_profile import costs, profile_doc

SIZE = (336, 336)
NO_WAIT = SimConfig(encoder_wait_s=0.0)


def req(t: float = 0.0, images: tuple[int, ...] = (), words: int = 10, out: int = 5, phase: int = 0) -> SimRequest:
    return SimRequest(t, images, tuple(SIZE for _ in images), words, out, phase)


def test_one_request_costs_the_sum_of_its_stages():
    # hop 1 ms, put 2 ms, get 3 ms, read 4 ms: every hop and transfer where the stack has it
    c = costs(encode_ms=100, prefill_ms=50, step_ms=10, hop_ms=1, put_ms=2, get_ms=3, read_ms=4)
    r = simulate(c, Allocation(), [req(images=(7,), out=5)], SimConfig(encoder_wait_s=0.005)).requests[0]
    # lookup hop + encoder hop + batch wait + encode + put | prefill hop + read + prefill + KV put
    ttft = .001 + .001 + .005 + .100 + .002 + .001 + .004 + .050 + .002
    assert r.ttft_s == pytest.approx(ttft)
    # decode hop + KV get + 4 steps (the first token was the prefill's)
    assert r.e2e_s == pytest.approx(ttft + .001 + .003 + 4 * .010)
    assert r.tpot_s == pytest.approx((.001 + .003 + .040) / 4)
    assert r.prompt_tokens == 10 + 576 and r.hits == 0


def test_decoding_an_image_comes_before_its_encode_and_shares_the_device():
    c = costs(encode_ms=100, prefill_ms=50, step_ms=10, media_ms=20)
    epd = simulate(c, Allocation(), [req(images=(1, 2), out=1)], NO_WAIT).requests[0]
    assert epd.ttft_s == pytest.approx(.040 + .200 + .050)  # both decoded, then a batch of two
    agg = simulate(c, Allocation(decode=1, aggregated=True), [req(images=(1, 2), out=1)], NO_WAIT).requests[0]
    assert agg.ttft_s == pytest.approx(.040 + .200 + .050)
    # a cached image is not decoded again by the encoder (the router found it)
    again = simulate(c, Allocation(), [req(0, (1,), out=1), req(5, (1,), out=1)], NO_WAIT).requests[1]
    assert again.ttft_s == pytest.approx(.050)


def test_text_only_skips_the_encoders_and_aggregated_runs_in_one_worker():
    c = costs(encode_ms=100, prefill_ms=50, step_ms=10, hop_ms=1)
    text = simulate(c, Allocation(), [req(out=3)], NO_WAIT).requests[0]
    assert text.ttft_s == pytest.approx(.001 + .050) and text.e2e_s == pytest.approx(.051 + .001 + .020)
    agg = simulate(c, Allocation(decode=1, aggregated=True), [req(images=(1, 2), out=3)], NO_WAIT).requests[0]
    assert agg.ttft_s == pytest.approx(.001 + .200 + .050) and agg.e2e_s == pytest.approx(.251 + .020)


def test_a_saturated_encoder_serves_at_its_rate():
    c = costs(encode_ms=1000, prefill_ms=0.001, step_ms=0.001)
    n = 20
    result = simulate(c, Allocation(encoder_batch=1), [req(images=(i,), out=1) for i in range(n)], NO_WAIT)
    ttfts = sorted(r.ttft_s for r in result.requests)
    assert ttfts == pytest.approx([k + 0.000001 * k + 0.000001 for k in range(1, n + 1)], rel=1e-3)
    assert result.summary()["throughput_rps"] == pytest.approx(1.0, rel=1e-3)
    assert result.busy["encode"] == pytest.approx(1.0, rel=1e-3) and result.busy["prefill"] < 0.01
    # two encoders: twice the rate (each image owned by one of them)
    two = simulate(c, Allocation(encoders=2, encoder_batch=1), [req(images=(i,), out=1) for i in range(n)], NO_WAIT)
    assert max(r.ttft_s for r in two.requests) < 0.75 * n


def test_a_saturated_decode_worker_serves_at_its_rate():
    c = costs(prefill_ms=0.001, step_ms=100)
    n, out = 10, 11
    result = simulate(c, Allocation(decode_batch=1), [req(out=out) for _ in range(n)], NO_WAIT)
    ends = sorted(r.e2e_s for r in result.requests)
    # one request at a time: each takes (out - 1) steps of 0.1 s after the first token
    assert ends[-1] == pytest.approx(n * (out - 1) * 0.1, rel=1e-3)
    assert result.summary()["throughput_rps"] == pytest.approx(1 / ((out - 1) * 0.1), rel=1e-2)
    batched = simulate(c, Allocation(decode_batch=64), [req(out=out) for _ in range(n)], NO_WAIT)
    # the first request's first step starts alone; the other nine join at its end
    assert max(r.e2e_s for r in batched.requests) == pytest.approx(out * 0.1, rel=1e-3)


def test_the_aggregated_worker_runs_a_prefill_between_two_steps():
    c = costs(prefill_ms=100, step_ms=30)
    a, b = simulate(c, Allocation(decode=1, aggregated=True), [req(0.0, out=10), req(0.110, out=2)], NO_WAIT).requests
    # A: prefill 0-0.1, steps 0.1-0.13, ...; B arrives at 0.11 during A's first step: its
    # prefill runs 0.13-0.23, A's second step waits for it.
    assert b.ttft_s == pytest.approx(0.23 - 0.11)
    assert a.e2e_s == pytest.approx(0.1 + 9 * 0.03 + 0.1)


def test_workers_that_share_a_device_share_its_speed():
    c = costs(prefill_ms=1000, step_ms=0.001)
    two = [req(out=1), req(out=1)]
    apart = simulate(c, Allocation(prefill=2), two, NO_WAIT)
    assert [r.ttft_s for r in apart.requests] == pytest.approx([1.0, 1.0])
    shared = simulate(c, Allocation(prefill=2, devices=1, placement="EPD"), two, NO_WAIT)
    assert [r.ttft_s for r in shared.requests] == pytest.approx([2.0, 2.0])
    # a device that runs two forwards at full speed (a CPU with cores to spare)
    roomy = simulate(c, Allocation(prefill=2, devices=1, placement="EPD", device_capacity=2), two, NO_WAIT)
    assert [r.ttft_s for r in roomy.requests] == pytest.approx([1.0, 1.0])


def test_placement_puts_each_stage_group_on_its_devices():
    a = Allocation(encoders=2, prefill=1, decode=1, devices=2, placement="EP|D")
    assert a.device_of() == [("encode", 0), ("encode", 0), ("prefill", 0), ("decode", 1)]
    assert Allocation(encoders=2, prefill=2, decode=2).device_of()[-1] == ("decode", 5)
    # every group keeps a device however the workers fall
    for total, weights in ((3, [1, 1, 5]), (3, [1, 1, 1]), (4, [1, 7]), (5, [2, 2, 9])):
        share = apportion(total, weights)
        assert sum(share) == total and min(share) >= 1, (total, weights, share)
    with pytest.raises(ValueError, match="needs at least 3 devices"):
        Allocation(devices=2, encoders=2, placement="E|P|D").device_of()
    with pytest.raises(ValueError, match="placement"):
        Allocation(placement="EP")


def test_cache_hits_single_flight_and_eviction():
    c = costs(encode_ms=1000, prefill_ms=1, step_ms=1)
    # the same image twice at once: one encode, the second request joins it
    together = simulate(c, Allocation(), [req(0, (5,), out=1), req(0, (5,), out=1)], NO_WAIT)
    assert [r.hits for r in together.requests] == [0, 1]
    assert [r.ttft_s for r in together.requests] == pytest.approx([1.001, 1.002])  # one prefill worker
    later = simulate(c, Allocation(), [req(0, (5,), out=1), req(5, (5,), out=1)], NO_WAIT)
    assert later.requests[1].hits == 1 and later.requests[1].ttft_s == pytest.approx(0.001)
    assert later.summary()["hit_ratio"] == 0.5
    # room for one image's embeddings (576 tokens x 100 bytes): A, B, A misses three times
    small = SimConfig(encoder_wait_s=0, cache_capacity_bytes=576 * 100)
    evicted = simulate(c, Allocation(), [req(0, (1,), out=1), req(5, (2,), out=1), req(10, (1,), out=1)], small)
    assert [r.hits for r in evicted.requests] == [0, 0, 0]


def test_a_prompt_past_the_context_fails_and_a_long_output_is_cut():
    c = costs(image_tokens=576, max_model_len=600)
    too_long, cut = simulate(c, Allocation(), [req(0, (1,), words=30), req(0, (), words=10, out=1000)],
                             NO_WAIT).requests
    assert too_long.error and "context" in too_long.error and too_long.e2e_s is None
    assert cut.output_tokens == 590 and cut.e2e_s is not None


def test_goodput_of_a_saturated_stage_is_its_service_rate():
    c = costs(encode_ms=500, prefill_ms=0.001, step_ms=0.001)
    requests = [req(i * 0.1, (i,), out=1) for i in range(200)]
    config = SimConfig(encoder_wait_s=0, ttft_slo_s=5.0, tpot_slo_s=1.0)
    g = goodput(c, Allocation(encoder_batch=1), requests, config)
    # 2 images/s: past it the queue grows without bound and TTFTs pass 5 s within the run
    assert 1.6 <= g <= 2.2
    assert goodput(c, Allocation(encoders=2, encoder_batch=1), requests, config) > 1.5 * g


def test_interpolation_and_profile_checks():
    assert interp([1, 3], [10, 30], 2) == 20
    assert interp([1, 3], [10, 30], 0) == 10  # flat before the first point
    assert interp([1, 3], [10, 30], 5) == 50  # the last slope after the last
    assert interp([1, 3], [30, 10], 9) == 10  # never downwards
    doc = profile_doc()
    StageCosts.from_doc(doc)
    bad = json.loads(json.dumps(doc))
    bad["prefill"]["tokens"] = [5, 1]
    with pytest.raises(ProfileError, match="prefill.tokens must be strictly ascending"):
        StageCosts.from_doc(bad)
    bad = json.loads(json.dumps(doc))
    del bad["decode"]
    with pytest.raises(ProfileError, match='"decode" missing'):
        StageCosts.from_doc(bad)
    bad = json.loads(json.dumps(doc))
    bad["encode"]["ms"] = [[1.0]]
    with pytest.raises(ProfileError, match="encode.ms must be 2 rows"):
        StageCosts.from_doc(bad)
    with pytest.raises(ProfileError, match="not a profile"):
        StageCosts.from_doc({"format": "other"})


def test_profile_files_load_with_a_named_error(tmp_path):
    with pytest.raises(ProfileError, match="nope.json"):
        StageCosts.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ProfileError, match="not JSON"):
        StageCosts.load(tmp_path / "bad.json")


# -- role switching (the rule itself: tests/test_elastic.py) -------------------------------------


def test_role_switching_follows_a_shift_from_images_to_text():
    # encoders are busy in phase 0 and idle in phase 1, where prefill is the bottleneck
    c = costs(encode_ms=150, prefill_ms=120, step_ms=2)
    phases = load_phases("image-heavy,rate=3,requests=120,output_mean=8,output_max=16"
                         "+text-heavy,rate=12,requests=240,output_mean=8,output_max=16")
    w = concatenate(phases)
    requests = requests_of(w, c, [0] * 120 + [1] * 240)
    alloc = Allocation(encoders=3, prefill=1, decode=1)
    config = SimConfig(ttft_slo_s=1.0, tpot_slo_s=0.1)
    static = simulate(c, alloc, requests, config)
    elastic = simulate(c, alloc, requests, SimConfig(ttft_slo_s=1.0, tpot_slo_s=0.1,
                                                     elastic=ElasticPolicy(high_s=0.3, cooldown_s=2)))
    moves = [(s["from"], s["to"]) for s in elastic.switches]
    assert ("encode", "prefill") in moves and all("done_s" in s for s in elastic.switches)
    assert all(r.e2e_s is not None for r in elastic.requests)  # nothing lost by a switch
    text_static = static.summary(1.0, 0.1, phase=1)["slo_attainment"]
    text_elastic = elastic.summary(1.0, 0.1, phase=1)["slo_attainment"]
    assert text_elastic > text_static + 0.2
    assert not math.isnan(elastic.summary(1.0, 0.1, phase=0)["ttft_median_s"])
