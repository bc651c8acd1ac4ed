"""Per-step metrics: `metrics.jsonl` in the output folder, wandb (offline unless configured), a progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from alphaalign.config import Recipe

BAR_KEYS = {"reward/mean": "reward", "rollout/harmful_refusal_rate": "refuse_harmful",
            "rollout/benign_refusal_rate": "refuse_benign", "time/step_s": "s/step"}  # fmt: skip


class MetricsLogger:
    def __init__(self, recipe: Recipe, out: Path, start_step: int = 0):
        self.path = out / "metrics.jsonl"
        self._truncate_after(start_step)  # a resumed run rewrites the steps after its checkpoint
        self.file = self.path.open("a")
        self.bar = tqdm(total=recipe.trainer.max_steps, initial=start_step, disable=not recipe.trainer.progress_bar,
                        desc="train", dynamic_ncols=True)  # fmt: skip
        self.run = None
        if recipe.logging.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=recipe.logging.wandb_project, name=recipe.logging.run_name, dir=str(out),
                mode=recipe.logging.wandb_mode, config=recipe.public_dump(),
                id=_run_id(out), resume="allow",
            )  # fmt: skip

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        self.path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))

    def log(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        self.bar.set_postfix({short: f"{metrics[k]:.3g}" for k, short in BAR_KEYS.items() if k in metrics})
        self.bar.update(1)

    def close(self) -> None:
        self.file.close()
        self.bar.close()
        if self.run is not None:
            self.run.finish()


def _run_id(out: Path) -> str:
    """A stable wandb run id per output folder, so that a resumed run continues the same wandb run."""
    path = out / "wandb_run_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
