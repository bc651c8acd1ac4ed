"""Reward throughput (completions scored per CPU-second, i.e. per core) and the refusal detector's accuracy.

The completions are 1 KB (1024 characters) in AlphaAlign's format: a short safety reasoning, then an answer
cut from the labelled refusal set shipped in the package (`eval/refusal_labels.jsonl`, refusals and
compliances mixed), repeated up to length. CPU time (`time.process_time`) is measured so that other
processes on the machine do not count.
"""

from __future__ import annotations

import json
import statistics
import time

from alphaalign.demo.build import response_text
from alphaalign.eval.refusal_detector import evaluate_refusal_detector
from alphaalign.resources import package_path
from alphaalign.rewards.alphaalign_safety import alphaalign_safety
from alphaalign.rewards.verifiers import is_refusal, parse_alphaalign

REFUSAL_SET = package_path("eval", "refusal_labels.jsonl")


def one_kb_completions(n: int, size: int = 1024) -> tuple[list[str], list[str]]:
    """`n` formatted completions of exactly `size` characters and the prompt labels, harmful/benign alternating."""
    answers = [json.loads(line)["text"] for line in REFUSAL_SET.read_text().splitlines() if line.strip()]
    completions, labels = [], []
    for i in range(n):
        label = ("harmful", "benign")[i % 2]
        reasoning = "The request is unsafe." if label == "harmful" else "The request is safe."
        frame = len(response_text(reasoning, ""))
        answer = answers[i % len(answers)] + "\n\n"
        body = (answer * (1 + (size - frame) // len(answer)))[: size - frame]
        completions.append(response_text(reasoning, body))
        labels.append(label)
    return completions, labels


def cpu_rate(score, n: int, repeats: int) -> float:
    """Median over `repeats` of n / (CPU seconds of one `score()` call)."""
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        score()
        rates.append(n / (time.process_time() - start))
    return statistics.median(rates)


def reward_throughput(n: int = 20_000, repeats: int = 5) -> dict:
    """Completions per CPU-second for alphaalign_safety and its two verifiers on 1 KB completions."""
    completions, labels = one_kb_completions(n)
    prompts = [""] * n
    scorers = {
        "alphaalign_safety": lambda: alphaalign_safety(prompts, completions, label=labels),
        "format_verifier": lambda: [parse_alphaalign(c).format_ok for c in completions],
        "refusal_detector": lambda: [is_refusal(c) for c in completions],
    }
    return {
        "completion_chars": len(completions[0]),
        "completions": n,
        "completions_per_cpu_s": {name: round(cpu_rate(fn, n, repeats)) for name, fn in scorers.items()},
    }


def refusal_accuracy() -> dict:
    result = evaluate_refusal_detector(REFUSAL_SET)
    return {"set": "alphaalign/eval/refusal_labels.jsonl", **result}
