"""Sample completions in the logs: what the policy wrote, what the rewards and verifiers said about it.

Every `logging.samples_every` steps the completions of the first `logging.samples_count` prompts of the
step's batch (all of their `num_generations` completions) are appended to `<output_dir>/samples.jsonl`, one
JSON object per completion, and logged to wandb as a Table named `samples` when wandb is on. The main
process writes them (rank 0 under DeepSpeed); `alphaalign report` shows the latest step's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import Tensor

from alphaalign.config import FormatConfig, Recipe
from alphaalign.outputs import writing
from alphaalign.rewards import parse_alphaalign, refusal_of
from alphaalign.rl.logger import truncate_after
from alphaalign.rl.sampling import Round


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def sample_rows(
    step: int,
    batch: Round,
    names: list[str],
    scalar: Tensor,
    advantages: Tensor,
    group_size: int,
    count: int,
    answer_format: FormatConfig,
) -> list[dict]:
    """One row per completion of the first `count` prompts of `batch` (rows of one prompt are consecutive):
    the prompt, the completion, the total reward and each term's (None: not applicable), the advantage (for
    per-token estimators its mean over the completion's tokens), and the refusal and format verdicts (the
    rule-based ones the rollout/* metrics use)."""
    tags = answer_format.tags
    rows = []
    for i in range(min(count * group_size, len(batch.texts))):
        text = batch.texts[i]
        rows.append(
            {
                "step": step,
                "group": batch.columns["group"][i],
                "label": batch.columns["label"][i],
                "prompt": batch.prompts[i],
                "completion": text,
                "reward": _number(float(scalar[i])),
                "rewards": {
                    n: _number(float(v)) for n, v in zip(names, batch.per_term[i].tolist(), strict=True)
                },
                "advantage": float(advantages[i]),
                "refused": refusal_of(text, *tags),
                "format_valid": parse_alphaalign(text, *tags).format_ok,
                "completion_tokens": len(batch.rollouts.completion_ids[i]),
                "finish_reason": batch.rollouts.finish_reasons[i],
            }
        )
    return rows


def table_columns(names: list[str]) -> list[str]:
    """The wandb Table's columns: a row's keys, with each reward term a column `reward/<term>`."""
    return [
        "step",
        "group",
        "label",
        "prompt",
        "completion",
        "reward",
        *(f"reward/{n}" for n in names),
        "advantage",
        "refused",
        "format_valid",
        "completion_tokens",
        "finish_reason",
    ]


def table_row(row: dict) -> list:
    return [row[k] for k in ("step", "group", "label", "prompt", "completion", "reward")] + [
        *row["rewards"].values(),
        *(row[k] for k in ("advantage", "refused", "format_valid", "completion_tokens", "finish_reason")),
    ]


class SamplesLog:
    def __init__(self, recipe: Recipe, out: Path, wandb_run=None, start_step: int = 0):
        self.every, self.count = recipe.logging.samples_every, recipe.logging.samples_count
        self.group_size, self.format = recipe.rollout.num_generations, recipe.format
        self.path, self.run = out / "samples.jsonl", wandb_run
        truncate_after(
            self.path, start_step, "samples"
        )  # a resumed run rewrites the steps after its checkpoint

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def log(self, step: int, batch: Round, names: list[str], scalar: Tensor, advantages: Tensor) -> None:
        rows = sample_rows(step, batch, names, scalar, advantages, self.group_size, self.count, self.format)
        with writing(self.path, "samples", "the checkpoints are intact"), self.path.open("a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=table_columns(names), data=[table_row(r) for r in rows])
            self.run.log({"samples": table}, step=step)
