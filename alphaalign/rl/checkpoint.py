"""Checkpoints: policy (HF format), optimizer, scheduler, RNG states and data position, written atomically.

Layout: `<output_dir>/checkpoints/step-000050/{policy/, trainer_state.pt, state.json}`; a DeepSpeed run has
`deepspeed/` (optimizer shards) and `rng_rank<r>.pt` instead of `trainer_state.pt`. A checkpoint is
written into a hidden temporary folder and renamed into place, so an interrupted write never shadows the
last good one. `manifest.json`, written last, lists every file with its size: resume verifies them and
falls back to the newest checkpoint that is whole, saying which and why (a disk that lost or truncated
files after the rename). Older checkpoints are pruned only once the new one is complete; a write that fails
(a full disk) ends in one line naming the path, and the checkpoints before it are left as they were.
Checkpoints written before manifests existed are checked for a readable `state.json` only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from alphaalign import parsing
from alphaalign.errors import UserError
from alphaalign.outputs import write_failure
from alphaalign.parallel import ONE_PROCESS

MANIFEST = "manifest.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (a missing, truncated or unreadable file), or None."""
    try:
        state = parsing.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json (an interrupted write)"
    except (OSError, ValueError):
        return "state.json is damaged"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json is damaged"
    if not (path / "policy").is_dir():
        return "no policy/ folder"
    if not (path / MANIFEST).is_file():
        return None  # written before manifests: nothing more to verify
    try:
        files = parsing.loads((path / MANIFEST).read_text())["files"]
        sizes = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is damaged"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was written"
    return None


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(output_dir: str | Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint that verifies. Newer damaged ones are passed over with one warning line on
    stderr saying which and why; when every checkpoint is damaged, a UserError says so (starting over would
    rewrite the run's metrics)."""
    found = _checkpoints(checkpoint_root(output_dir))
    damaged = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged and not quiet:
                print(
                    f"warning: using {path}, the newest complete checkpoint; passed over: {'; '.join(damaged)}",
                    file=sys.stderr,
                    flush=True,
                )
            return path
        damaged.append(f"{path.name} ({problem})")
    if damaged:
        raise UserError(
            f"{checkpoint_root(output_dir)}: no complete checkpoint: {'; '.join(damaged)}; move them away, or "
            "set trainer.resume_from: none to start over"
        )
    return None


def resolve_resume(resume_from: str, output_dir: str, quiet: bool = False) -> Path | None:
    """'auto': newest complete checkpoint in output_dir (or none); 'none'; or an explicit checkpoint folder."""
    if resume_from == "none":
        return None
    if resume_from == "auto":
        return latest_checkpoint(output_dir, quiet)
    path = Path(resume_from)
    problem = checkpoint_problem(path) if path.is_dir() else "no such folder"
    if problem is not None:
        raise UserError(f"trainer.resume_from: {resume_from} is not a complete checkpoint folder: {problem}")
    return path


def write_manifest(folder: Path) -> None:
    """List every file of `folder` with its size; written last, it marks the checkpoint complete."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=0))


def save_checkpoint(
    output_dir,
    step: int,
    optimization,
    tokenizer,
    data_draws: int,
    keep_last: int,
    bad_steps: int = 0,
    ranks=ONE_PROCESS,
):
    """Write checkpoint `step`: every rank writes its part (`optimization.save`), then rank 0 completes it."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    try:
        if ranks.is_main:
            for stale in root.glob(".tmp-step-*"):  # left by an interrupted write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        ranks.barrier()
        optimization.save(tmp, tokenizer)
        ranks.barrier()
        if ranks.is_main:
            state = {"step": step, "data_draws": data_draws, "bad_steps": bad_steps}
            (tmp / "state.json").write_text(json.dumps(state))
            write_manifest(tmp)
    except Exception as exc:
        reason = write_failure(exc, tmp)  # before the part-written checkpoint frees its space
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        raise UserError(
            f"cannot write checkpoint {final}: {reason}; the checkpoints before step {step} are intact"
        ) from exc
    if ranks.is_main:
        shutil.rmtree(final, ignore_errors=True)  # a damaged one of an earlier try at this step
        tmp.rename(final)
        complete = [p for p in _checkpoints(root) if checkpoint_problem(p) is None]
        for old in complete[:-keep_last]:
            shutil.rmtree(old)
    ranks.barrier()
    return final


def load_checkpoint(path: Path, optimization) -> dict:
    """Restore optimizer, scheduler and RNG states; returns state.json (step, data_draws, bad_steps)."""
    optimization.load(path)
    return parsing.loads((path / "state.json").read_text())
