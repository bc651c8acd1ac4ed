"""Checkpoints: policy (HF format), optimizer, scheduler, RNG states and data position, written atomically.

Layout: `<output_dir>/checkpoints/step-000050/{policy/, trainer_state.pt, state.json}`; a DeepSpeed run has
`deepspeed/` (optimizer shards) and `rng_rank<r>.pt` instead of `trainer_state.pt`. A checkpoint is
written into a hidden temporary folder and renamed into place, so an interrupted write never shadows the
last good one; `state.json` is written last and marks a checkpoint complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alphaalign.errors import UserError
from alphaalign.rl.parallel import ONE_PROCESS


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _complete(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "policy").is_dir()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    found = sorted(p for p in root.glob("step-*") if _complete(p)) if root.is_dir() else []
    return found[-1] if found else None


def resolve_resume(resume_from: str, output_dir: str) -> Path | None:
    """'auto': newest complete checkpoint in output_dir (or none); 'none'; or an explicit checkpoint folder."""
    if resume_from == "none":
        return None
    if resume_from == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not _complete(path):
        raise UserError(f"trainer.resume_from: {resume_from} is not a complete checkpoint folder")
    return path


def save_checkpoint(
    output_dir, step: int, optimization, tokenizer, data_draws: int, keep_last: int, bad_steps: int = 0,
    ranks=ONE_PROCESS,
):  # fmt: skip
    """Write checkpoint `step`: every rank writes its part (`optimization.save`), then rank 0 completes it."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if ranks.is_main:
        for stale in root.glob(".tmp-step-*"):  # left by an interrupted write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    optimization.save(tmp, tokenizer)
    ranks.barrier()
    if ranks.is_main:
        (tmp / "state.json").write_text(
            json.dumps({"step": step, "data_draws": data_draws, "bad_steps": bad_steps})
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step-*") if _complete(p))[:-keep_last]:
            shutil.rmtree(old)
    ranks.barrier()
    return final


def load_checkpoint(path: Path, optimization) -> dict:
    """Restore optimizer, scheduler and RNG states; returns state.json (step, data_draws, bad_steps)."""
    optimization.load(path)
    return json.loads((path / "state.json").read_text())
