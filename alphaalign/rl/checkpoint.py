"""Checkpoints: policy (HF format), optimizer, scheduler, RNG states and data position, written atomically.

Layout: `<output_dir>/checkpoints/step-000050/{policy/, trainer_state.pt, state.json}`. A checkpoint is
written into a hidden temporary folder and renamed into place, so an interrupted write never shadows the
last good one; `state.json` is written last and marks a checkpoint complete.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from alphaalign.errors import UserError


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
    output_dir, step: int, policy, tokenizer, optimizer, scheduler, data_draws: int, keep_last: int,
    bad_steps: int = 0,
):  # fmt: skip
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    for stale in root.glob(".tmp-step-*"):  # left by an interrupted write
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
               tmp / "trainer_state.pt")  # fmt: skip
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "data_draws": data_draws, "bad_steps": bad_steps})
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if _complete(p))[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG states; returns state.json (step, data_draws, bad_steps)."""
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return json.loads((path / "state.json").read_text())
