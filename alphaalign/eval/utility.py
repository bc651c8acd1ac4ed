"""Utility benchmarks (GSM8K, MMLU, …) through lm-evaluation-harness, when it is installed (`pip install lm-eval`)."""

from __future__ import annotations

import json
from pathlib import Path

INSTALL_HINT = (
    "utility: lm-eval is not installed; `pip install lm-eval` to run GSM8K/MMLU on the same checkpoint"
)


def run_utility(model: str, tasks: list[str], out: Path, limit: int | None) -> str:
    """Run lm-eval `tasks` on the checkpoint, write <out>/utility.json; returns one line per task."""
    try:
        import lm_eval
    except ImportError:
        return INSTALL_HINT
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model}", tasks=tasks, limit=limit)
    scores = {task: metrics for task, metrics in results["results"].items()}
    (out / "utility.json").write_text(json.dumps(scores, indent=2, default=str))
    return "\n".join(f"utility {task}: {metrics}" for task, metrics in scores.items())
