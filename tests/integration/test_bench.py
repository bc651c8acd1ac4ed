"""`alphaalign bench`: the harness runs every system on a seconds-long workload and its figures add up."""

import importlib.util
import json
import statistics

import pytest
from helpers import jsonl_rows

from alphaalign.cli import main
from alphaalign.errors import UserError
from alphaalign.eval.refusal_detector import evaluate_refusal_detector
from alphaalign.perf.harness import default_systems, format_table, run_bench
from alphaalign.perf.rewards import REFUSAL_SET, one_kb_completions, refusal_accuracy, reward_throughput
from alphaalign.perf.workload import WORKLOADS

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
def test_harness_runs_every_system_and_its_figures_add_up(tmp_path):
    systems = ["trl", "trl_bf16", "alphaalign", "alphaalign_bf16", "floor", "floor_bf16", "floor_plain"]
    systems += ["alphaalign_vllm_async"] if HAS_VLLM else []
    out = tmp_path / "results.json"
    result = run_bench("tiny", "cpu", systems, rounds=1, out=out, cache=tmp_path / "models", rewards=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    w = WORKLOADS["tiny"]
    for name in systems:
        s = result["systems"][name]
        steps = s["runs"][0]["step_seconds"]
        assert len(steps) == w.steps and s["counted_steps"] == w.steps - 1  # the first step is not counted
        median = statistics.median(steps[1:])
        assert s["median_step_s"] == pytest.approx(median, rel=1e-3)
        assert s["completions_per_s"] == pytest.approx(w.prompts * w.generations / median, rel=1e-3)
        assert s["peak_rss_mb"] > 100
    ratios = result["ratios_vs_trl"]
    speed = {name: s["completions_per_s"] for name, s in result["systems"].items()}
    assert result["ratio_vs_trl"] == max(ratios.values()) == ratios[result["ratio_vs_trl_system"]]
    assert result["trl_system"] == max(["trl", "trl_bf16"], key=speed.get)  # against trl's fastest
    assert ratios["alphaalign_bf16"] == pytest.approx(
        speed["alphaalign_bf16"] / speed[result["trl_system"]], rel=1e-3
    )
    for name, floor in [("alphaalign", "floor"), ("alphaalign_bf16", "floor_bf16")]:
        expected = result["systems"][name]["median_step_s"] / result["systems"][floor]["median_step_s"] - 1
        assert result["overheads_vs_floor"][name] == pytest.approx(expected, rel=1e-2, abs=1e-3)
    assert result["overhead_vs_floor"] == result["overheads_vs_floor"]["alphaalign"]
    assert result["versions"]["trl"] == "1.16.0" and result["machine"]["cores"] >= 1
    assert "| alphaalign |" in format_table(result)


def test_reward_benchmark_inputs_and_rates():
    completions, labels = one_kb_completions(6)
    assert {len(c) for c in completions} == {1024} and labels[:2] == ["harmful", "benign"]
    rates = reward_throughput(n=200, repeats=1)["completions_per_cpu_s"]
    assert set(rates) == {"alphaalign_safety", "format_verifier", "refusal_detector"}
    assert all(rate > 0 for rate in rates.values())
    accuracy = refusal_accuracy()
    assert (
        accuracy["n"] == jsonl_rows(REFUSAL_SET)
        and accuracy["f1"] == evaluate_refusal_detector(REFUSAL_SET)["f1"]
    )


def test_rewards_only_writes_the_reward_part_alone(tmp_path, capsys):
    out = tmp_path / "rewards.json"
    assert main(["bench", "--rewards-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "systems" not in result and result["machine"]["cores"] >= 1
    rates = result["reward_throughput"]["completions_per_cpu_s"]
    assert set(rates) == {"alphaalign_safety", "format_verifier", "refusal_detector"}
    assert all(rate > 0 for rate in rates.values())
    assert result["refusal_detector"]["n"] == jsonl_rows(REFUSAL_SET)
    assert result["targets"] == {"reward_per_cpu_s_min": 20_000}
    printed = capsys.readouterr().out
    assert f"alphaalign_safety {rates['alphaalign_safety']:,}" in printed and "| system |" not in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "--rounds: must be at least 1"),
        (["--systems", "nope"], "--systems: unknown nope"),
        (["--rewards-only", "--no-rewards"], "--rewards-only: cannot be combined with --no-rewards"),
        (["--rewards-only", "--systems", "trl"], "--rewards-only: cannot be combined with --systems"),
    ],
)
def test_bad_bench_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(
        ["bench", "--workload", "tiny", "--cache", str(tmp_path), "--out", str(tmp_path / "r.json"), *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_mixed_precision_systems_only_for_float32_workloads(tmp_path):
    assert {"trl_bf16", "alphaalign_bf16", "floor_bf16"} <= set(default_systems("w1"))
    assert not {"trl_bf16", "alphaalign_bf16", "floor_bf16"} & set(default_systems("qwen2.5-1.5b"))
    with pytest.raises(
        UserError, match="--systems: alphaalign_bf16 need float32 weights; workload qwen2.5-1.5b"
    ):
        run_bench("qwen2.5-1.5b", "cuda", ["alphaalign_bf16"], 1, tmp_path / "r.json", tmp_path)
