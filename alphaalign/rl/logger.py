"""Per-step metrics: `metrics.jsonl` in the output folder, wandb (offline unless configured), a progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from alphaalign import parsing
from alphaalign.config import Recipe
from alphaalign.errors import UserError
from alphaalign.masking import masked_argv
from alphaalign.outputs import writing

BAR_KEYS = {
    "reward/mean": "reward",
    "rollout/harmful_refusal_rate": "refuse_harmful",
    "rollout/benign_refusal_rate": "refuse_benign",
    "time/step_s": "s/step",
}


class MetricsLogger:
    def __init__(self, recipe: Recipe, out: Path, start_step: int = 0):
        self.path = out / "metrics.jsonl"
        self._truncate_after(start_step)  # a resumed run rewrites the steps after its checkpoint
        self.file = self.path.open("a")
        self.bar = tqdm(
            total=recipe.trainer.max_steps,
            initial=start_step,
            disable=not recipe.trainer.progress_bar,
            desc="train",
            dynamic_ncols=True,
        )
        self.run = None
        if recipe.logging.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            with masked_argv():  # wandb records (and uploads) the command line, overrides included
                self.run = wandb.init(
                    project=recipe.logging.wandb_project,
                    name=recipe.logging.run_name,
                    dir=str(out),
                    mode=recipe.logging.wandb_mode,
                    config=recipe.public_dump(),
                    id=_run_id(out),
                    resume="allow",
                )

    def _truncate_after(self, step: int) -> None:
        truncate_after(self.path, step, "metrics")

    def log(self, metrics: dict) -> None:
        with writing(self.path, "metrics", "the checkpoints are intact"):
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


def truncate_after(path: Path, step: int, what: str) -> None:
    """Keep the rows of a per-step JSONL file (`what`: metrics, samples) up to `step`: a resumed run rewrites
    the steps after its checkpoint."""
    if not path.exists():
        return
    rows = read_metrics(path, what)
    with writing(path, what):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step))


def read_metrics(path: Path, what: str = "metrics") -> list[dict]:
    """The rows of a metrics.jsonl file (or another per-step JSONL file, `what` naming its rows). A torn last
    line (the run was killed or the disk filled while it was written) is dropped with a warning on stderr; any
    other line that is not a JSON object with a `step` is a UserError naming the line."""
    lines = parsing.json_lines(path.read_text(errors="replace"))
    rows = []
    for i, (lineno, line) in enumerate(lines):
        try:
            row = parsing.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"not a {what} row")
        except ValueError as exc:
            if i == len(lines) - 1 and isinstance(exc, json.JSONDecodeError):
                print(
                    f"warning: {path}:{lineno}: dropped a torn last line (an interrupted write)",
                    file=sys.stderr,
                )
                break
            raise UserError(f"{path}:{lineno}: not a {what} row ({exc})") from None
        rows.append(row)
    return rows


def _run_id(out: Path) -> str:
    """A stable wandb run id per output folder, so that a resumed run continues the same wandb run."""
    path = out / "wandb_run_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
