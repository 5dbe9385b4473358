"""``mmcache plan``: its choice moves the way the workload does (more images: more encoders;
longer outputs: more decode), and the command prints a ranking and flags ``mmcache up`` takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_worker.planner.planner import plan, splits
from llm_worker.planner.simulator import SimConfig, requests_of
from llm_worker.planner.workload import generate, parse_spec
from synthetic_profile import costs, profile_doc

ROOT = Path(__file__).resolve().parents[1]
ESTIMATED = ROOT / "benchmarks/profiles/llava-1.5-7b-a100-estimated.json"


def best_epd(c, workload: str, workers: int, ttft: float, tpot: float):
    requests = requests_of(generate(parse_spec(workload)), c)
    ranking = plan(c, requests, workers, SimConfig(ttft_slo_s=ttft, tpot_slo_s=tpot), refine=0)
    return next(r.allocation for r in ranking if not r.allocation.aggregated)


def test_splits_cover_every_allocation():
    assert splits(3) == [(1, 1, 1)]
    assert len(splits(6)) == 10 and all(sum(s) == 6 and min(s) >= 1 for s in splits(6))


def test_more_images_take_more_encoders():
    c = costs(encode_ms=200, prefill_ms=30, step_ms=5, step_ms_at_64=20, hop_ms=0.5)
    text = best_epd(c, "text-heavy,rate=6,requests=120,output_mean=16,output_max=32", 6, 1.0, 0.1)
    images = best_epd(c, "image-heavy,rate=6,requests=120,output_mean=16,output_max=32", 6, 1.0, 0.1)
    assert images.encoders > text.encoders, (text, images)
    assert images.encoders >= 3


def test_longer_outputs_take_more_decode():
    # a decode step that grows with the batch: one decode worker saturates on long outputs
    c = costs(encode_ms=20, prefill_ms=20, step_ms=10, step_ms_at_64=160, hop_ms=0.5)
    short = best_epd(c, "default,rate=8,requests=150,images_max=2,images_mean=1.2,output_mean=8,output_max=16",
                     6, 1.0, 0.05)
    long = best_epd(c, "long-output,rate=8,requests=100", 6, 1.0, 0.05)
    assert long.decode > short.decode, (short, long)
    assert long.decode >= 3


def test_bad_plans_are_refused():
    c = costs()
    requests = requests_of(generate(parse_spec("rate=2,requests=10")), c)
    with pytest.raises(ValueError, match="at least 3 workers"):
        plan(c, requests, 2, SimConfig())
    with pytest.raises(ValueError, match="attainment"):
        plan(c, requests, 3, SimConfig(), attainment=1.5)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmcache.cli", "plan", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_the_command_prints_a_ranking_and_the_winners_flags(tmp_path, monkeypatch):
    out = tmp_path / "plan.json"
    r = run_plan("--profile", str(ESTIMATED), "--workload", "image-heavy,rate=10,requests=60", "--workers", "4",
                 "--slo-ttft", "0.5", "--slo-tpot", "0.05", "--json", str(out), "--top", "5")
    assert r.returncode == 0, r.stderr
    assert "estimated from published figures" in r.stdout  # every figure says what it stands on
    assert "| 1 |" in r.stdout and "goodput" in r.stdout
    winner = next(line for line in r.stdout.splitlines() if line.startswith("winner: mmcache up "))
    flags = winner.removeprefix("winner: mmcache up ").split()
    doc = json.loads(out.read_text())
    assert doc["ranking"][0]["up_flags"] == flags
    assert "its workers busy, by role: " in r.stdout
    assert all(0 <= share <= 1 for row in doc["ranking"] for share in row["busy"].values())
    assert len(doc["ranking"]) >= len(splits(4)) + 1
    # the flags are mmcache up's own: they parse into the stack it would start
    alloc = doc["ranking"][0]
    config = up_config(monkeypatch, flags)
    if alloc["alloc_aggregated"]:
        assert config.aggregated and config.decode == alloc["alloc_decode"]
    else:
        assert (config.encoders, config.prefill, config.decode, config.encoder_batch, config.max_batch) == \
            (alloc["alloc_encoders"], alloc["alloc_prefill"], alloc["alloc_decode"], alloc["alloc_encoder_batch"],
             alloc["alloc_decode_batch"])


def up_config(monkeypatch, flags: list[str]):
    import mmcache.cli
    import mmcache.stack.up

    seen = []
    monkeypatch.setattr(mmcache.stack.up, "run", lambda config: seen.append(config) or 0)
    assert mmcache.cli.main(["up", *flags]) == 0
    return seen[0]


def test_phases_get_role_switching_predicted():
    r = run_plan("--profile", str(ESTIMATED), "--workload",
                 "image-heavy,rate=12,requests=80+text-heavy,rate=30,requests=120", "--workers", "3",
                 "--slo-ttft", "0.5", "--slo-tpot", "0.05")
    assert r.returncode == 0, r.stderr
    assert "phase 0: SLO met" in r.stdout and "phase 1: SLO met" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--profile", "/nonexistent/p.json", "--workload", "rate=2", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1"], "/nonexistent/p.json"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2,bogus=1", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1"], "unknown field 'bogus'"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2", "--workers", "3", "--slo-ttft", "1"], "--slo-tpot"),
    (["--profile", str(ESTIMATED), "--workload", "rate=inf", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1"], "finite rate"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2", "--workers", "2", "--slo-ttft", "1",
      "--slo-tpot", "1"], "at least 3 workers"),
    (["--workers", "3"], "need --workload"),
    (["--workers", "0"], "need --workload"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2", "--workers", "3", "--slo-ttft", "nan",
      "--slo-tpot", "1"], "finite"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2,prompt_words=inf", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1"], "prompt_words_mean=inf"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2,requests=2.5", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1"], "num_requests"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2+", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1"], "empty phase"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2", "--workers", "99", "--slo-ttft", "1",
      "--slo-tpot", "1"], "at most 32"),
    (["--profile", str(ESTIMATED), "--workload", "rate=2", "--workers", "3", "--slo-ttft", "1",
      "--slo-tpot", "1", "--json", "/nonexistent-dir/plan.json"], "/nonexistent-dir/plan.json"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    r = run_plan(*args)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr


def test_a_profile_that_is_not_one_is_named(tmp_path):
    doc = profile_doc()
    del doc["kv_get"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(doc))
    r = run_plan("--profile", str(bad), "--workload", "rate=2", "--workers", "3", "--slo-ttft", "1", "--slo-tpot", "1")
    assert r.returncode == 2 and f"profile {bad}" in r.stderr and '"kv_get" missing' in r.stderr


@pytest.mark.slow
def test_measure_this_machine_then_plan_with_it(tmp_path_factory):
    from encoder_worker.models import ensure_model

    data_dir = str(tmp_path_factory.mktemp("models"))
    ensure_model("tiny-llava", data_dir)
    profile = tmp_path_factory.mktemp("plan") / "profile.json"
    r = run_plan("--profile", str(profile), "--quick", "--model", "tiny-llava", "--data-dir", data_dir)
    assert r.returncode == 0, r.stderr
    assert "profile: encode batch" in r.stderr  # progress a person can follow
    from llm_worker.planner.stage_costs import StageCosts

    measured = StageCosts.load(profile)
    assert measured.measured and measured.doc["device"] == "cpu"
    r = run_plan("--profile", str(profile), "--workload", "default,rate=4,requests=40,images_max=4", "--workers", "3",
                 "--slo-ttft", "1", "--slo-tpot", "0.1")
    assert r.returncode == 0, r.stderr
    assert "(measured: " in r.stdout and "1 shared device(s)" in r.stdout


def test_fewer_devices_than_workers_share_them():
    requests = requests_of(generate(parse_spec("rate=4,requests=20,images_max=3")), costs())
    for workers, devices in ((7, 3), (6, 3), (9, 4), (4, 1)):
        ranking = plan(costs(), requests, workers, SimConfig(ttft_slo_s=1, tpot_slo_s=0.1), devices=devices, refine=0)
        for c in ranking:
            places = c.allocation.device_of()
            assert {d for _, d in places} <= set(range(devices)) and len(places) == workers


def test_profile_alone_measures_with_the_flags_passed_on(monkeypatch, tmp_path):
    """``mmcache plan --profile P`` alone runs the profiler, with --quick and --quiet passed on."""
    from llm_worker.planner import planner, profile_cli

    seen = []
    monkeypatch.setattr(profile_cli, "main", lambda argv: seen.append(argv) or 0)
    assert planner.main(["--profile", str(tmp_path / "p.json"), "--quick", "--quiet"]) == 0
    assert seen and {"--quick", "--quiet"} <= set(seen[0]) and str(tmp_path / "p.json") in seen[0]
