"""The per-step metrics the trainer logs, from a step's rewards, advantages and rollouts (pure functions)."""

from __future__ import annotations

import torch

from alphaalign.config import FormatConfig
from alphaalign.rl import algos
from alphaalign.rollout.base import Rollouts
from alphaalign.verdicts import safety_summary


def reward_metrics(per_term, scalar, advantages, names, group_size) -> dict:
    out = {"reward/mean": float(torch.nanmean(scalar)), "reward/std": float(algos.nanstd(scalar))}
    for k, name in enumerate(names):
        column = per_term[:, k]
        if (~torch.isnan(column)).any():
            out[f"reward/{name}/mean"] = float(torch.nanmean(column))
            out[f"reward/{name}/std"] = (
                float(algos.nanstd(column)) if (~torch.isnan(column)).sum() > 1 else 0.0
            )
    group_std = algos.nanstd(scalar.view(-1, group_size), dim=1)
    out.update(
        {
            "advantage/mean": float(advantages.mean()),
            "advantage/std": float(advantages.std()),
            "advantage/min": float(advantages.min()),
            "advantage/max": float(advantages.max()),
            "groups/zero_reward_std_fraction": float((torch.nan_to_num(group_std) < 1e-6).float().mean()),
        }
    )
    return out


def rollout_metrics(rollouts: Rollouts) -> dict:
    lengths = [len(c) for c in rollouts.completion_ids]
    return {
        "completion/length_mean": sum(lengths) / len(lengths),
        "completion/length_max": max(lengths),
        "completion/truncated_fraction": sum(r == "length" for r in rollouts.finish_reasons) / len(lengths),
    }


def rollout_verdicts(texts: list[str], labels: list[str], answer_format: FormatConfig) -> dict:
    """rollout/* refusal and format rates of the step's completions (the counts left out)."""
    summary = safety_summary(texts, labels, answer_format)
    return {f"rollout/{k}": v for k, v in summary.items() if not k.startswith("n_")}
