"""GRPO vs PPO vs RLOO vs REINFORCE++ on the CPU demo: the same recipe, data and seed, one run each.

    python bench/compare_estimators.py --out outputs/compare            # all four, one after the other
    python bench/compare_estimators.py --only ppo rloo                  # a subset

Each run is `alphaalign train` of the demo recipe with the estimator's overrides (`RUNS`), evaluated every
10 steps on the held-out prompts. Per run it reports the held-out harmful refusal and benign over-refusal
after RL, the first step whose evaluation reached 90% harmful refusal, the median step time and the peak
resident set size of the training process and any process it started. Writes `<out>/<name>/` (the runs)
and `<out>/compare.json`, and prints a Markdown table (docs/design.md keeps the committed one). Step times are only comparable between
runs on the same otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
# name -> (recipe, overrides); everything else is the demo recipe as shipped
RUNS: dict[str, tuple[str, list[str]]] = {
    "GRPO": ("demo.yaml", []),
    "PPO (critic, GAE)": ("demo-ppo.yaml", []),
    "RLOO": ("demo.yaml", ["algorithm.advantage_estimator=rloo"]),
    "REINFORCE++ (KL in the reward)": (
        "demo.yaml",
        ["algorithm.advantage_estimator=reinforce_pp", "algorithm.kl_in_reward=true"],
    ),
}
TARGET = 0.9  # the held-out harmful refusal rate that counts as learned


def peak_rss_mib(run: subprocess.Popen, interval: float = 0.5) -> float:
    """The largest resident set size of the run's process tree while it runs, sampled every `interval` s."""
    process, peak = psutil.Process(run.pid), 0
    while run.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(interval)
    return peak / 2**20


def one_run(name: str, recipe: str, overrides: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "alphaalign.cli",
        "train",
        str(ROOT / "recipes" / recipe),
        *overrides,
        f"trainer.output_dir={out}",
        "trainer.progress_bar=false",
    ]
    print(f"== {name}: {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    with (out / "train.log").open("w") as log:
        run = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak = peak_rss_mib(run)
    if run.returncode != 0:
        sys.exit(f"{name}: training failed with exit code {run.returncode}; see {out / 'train.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/harmful_refusal_rate"]) for r in rows if "eval/harmful_refusal_rate" in r]
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    return {
        "name": name,
        "recipe": recipe,
        "overrides": overrides,
        "harmful_refusal_before": before["harmful_refusal_rate"],
        "harmful_refusal_after": after["harmful_refusal_rate"],
        "over_refusal_before": before["benign_refusal_rate"],
        "over_refusal_after": after["benign_refusal_rate"],
        "format_valid_after": after["format_valid_rate"],
        "steps_to_target": next((step for step, rate in evals if rate >= TARGET), None),
        "median_step_s": statistics.median(r["time/step_s"] for r in rows),
        "peak_rss_mib": peak,
        "wall_s": time.monotonic() - started,
        "steps": len(rows),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| estimator | harmful refusal (held-out) | over-refusal (held-out) | format valid | steps to 90% "
        "harmful refusal | median s/step | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        reached = r["steps_to_target"] if r["steps_to_target"] is not None else f"not in {r['steps']}"
        lines.append(
            f"| {r['name']} | {r['harmful_refusal_before']:.1%} → {r['harmful_refusal_after']:.1%} "
            f"| {r['over_refusal_before']:.1%} → {r['over_refusal_after']:.1%} | {r['format_valid_after']:.1%} "
            f"| {reached} | {r['median_step_s']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--only", nargs="*", choices=[n.split()[0] for n in RUNS], help="run these only")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    results = []
    for name, (recipe, overrides) in RUNS.items():
        if args.only and name.split()[0] not in args.only:
            continue
        folder = out / name.split()[0].lower().replace("+", "p")
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run, not a resumed one
        results.append(one_run(name, recipe, overrides, folder))
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
