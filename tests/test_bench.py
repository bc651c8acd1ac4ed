"""`alphaalign bench`: the harness runs every system on a seconds-long workload and its figures add up."""

import importlib.util
import json
import statistics

import pytest

from alphaalign.bench.harness import format_table, run_bench
from alphaalign.bench.rewards import REFUSAL_SET, one_kb_completions, refusal_accuracy, reward_throughput
from alphaalign.bench.workload import WORKLOADS
from alphaalign.cli import main
from alphaalign.rewards.refusal_eval import evaluate_refusal_detector

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
def test_harness_runs_every_system_and_its_figures_add_up(tmp_path):
    systems = ["trl", "alphaalign", "floor", "floor_plain"] + (["alphaalign_vllm_async"] if HAS_VLLM else [])
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
    assert result["ratio_vs_trl"] == max(ratios.values()) == ratios[result["ratio_vs_trl_system"]]
    expected = (
        result["systems"]["alphaalign"]["median_step_s"] / result["systems"]["floor"]["median_step_s"] - 1
    )
    assert result["overhead_vs_floor"] == pytest.approx(expected, rel=1e-2, abs=1e-3)
    assert result["versions"]["trl"] == "1.16.0" and result["machine"]["cores"] >= 1
    assert "| alphaalign |" in format_table(result)


def test_reward_benchmark_inputs_and_rates():
    completions, labels = one_kb_completions(6)
    assert {len(c) for c in completions} == {1024} and labels[:2] == ["harmful", "benign"]
    rates = reward_throughput(n=200, repeats=1)["completions_per_cpu_s"]
    assert set(rates) == {"alphaalign_safety", "format_verifier", "refusal_detector"}
    assert all(rate > 0 for rate in rates.values())
    accuracy = refusal_accuracy()
    assert accuracy["n"] == 562 and accuracy["f1"] == evaluate_refusal_detector(REFUSAL_SET)["f1"]


@pytest.mark.parametrize("args, message", [(["--rounds", "0"], "--rounds: must be at least 1"),
                                           (["--systems", "nope"], "--systems: unknown nope")])  # fmt: skip
def test_bad_bench_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(
        ["bench", "--workload", "tiny", "--cache", str(tmp_path), "--out", str(tmp_path / "r.json"), *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
