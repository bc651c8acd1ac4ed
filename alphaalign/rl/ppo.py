"""The per-token update path (`algos.token_level`): PPO with a critic (`advantage_estimator: gae`) and
REINFORCE++ with the KL in the reward (`reinforce_pp` + `kl_in_reward`).

Before the update, on this rank's micro-batches: the frozen log-probs (`prepare_batch`), the critic's values and
the per-token KL; these are gathered from every rank, so the advantages are computed, and whitened, over the
whole batch exactly as in one process (`algos.token_advantages`). Then the policy update on this rank's rows
(`policy_update`, the advantages per token), and the critic's update towards the returns. A policy update that
is skipped (non-finite) skips the critic's as well; a critic update that is skipped leaves the critic as it was,
after the policy has stepped.
"""

from __future__ import annotations

import torch

from alphaalign.parallel import ONE_PROCESS
from alphaalign.rl import algos
from alphaalign.rl.update import PreparedBatch, UpdateSettings, first_nonfinite, policy_update, prepare_batch
from alphaalign.rollout.base import Rollouts


def per_row(batch: PreparedBatch, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's rows of per-micro-batch [b, C] tensors, each cut to its completion's length, on the CPU."""
    rows: dict[int, torch.Tensor] = {}
    for mb, tensor in zip(batch.mbs[: batch.real], tensors, strict=False):
        C = mb.completion_ids.shape[1]
        lengths = mb.attention_mask[:, -C:].sum(-1).tolist() if C else [0] * len(mb.rows)
        for j, i in enumerate(mb.rows):
            rows[i] = tensor[j, : int(lengths[j])].detach().float().cpu()
    return [rows[i] for i in sorted(rows)]


def whole_batch(ranks, rows: list[torch.Tensor]) -> torch.Tensor:
    """[B, T] zero-padded rows of every rank, in rank order (the order of the gathered batch)."""
    everyone = [row for part in ranks.gather(rows) for row in part]
    return torch.nn.utils.rnn.pad_sequence(everyone, batch_first=True)


def token_level_update(
    opt,
    ref,
    critic,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    mine: slice,
    settings: UpdateSettings,
    pad_id,
    ranks=ONE_PROCESS,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One step's update of the policy (and the critic, when there is one) on this rank's `rollouts`.

    `rewards` [B] are the whole batch's scalar rewards and `mine` this rank's rows in it. Returns the
    batch-wide metrics ({"nonfinite": ...} when the step was skipped), the advantages of every completion
    token of the batch (for the advantage/* metrics) and each completion's mean advantage [B] (for the samples).
    """
    ac = settings.algorithm
    batch = prepare_batch(opt, ref, rollouts, settings, pad_id, ranks)
    if batch is None:
        return {"nonfinite": "log-probs"}, torch.zeros_like(rewards), torch.zeros_like(rewards)
    mask = whole_batch(ranks, per_row(batch, [mb.mask for mb in batch.mbs]))
    old_values = values = kl = None
    if critic is not None:
        old_values = critic.values(batch.mbs)
        values = whole_batch(ranks, per_row(batch, old_values))
    if ac.kl_in_reward:
        estimate = algos.KL_ESTIMATORS[ac.kl_estimator]
        kl = whole_batch(
            ranks,
            per_row(
                batch,
                [
                    estimate(old, ref_logp)
                    for old, ref_logp in zip(batch.old_logps, batch.ref_logps, strict=True)
                ],
            ),
        )
    if values is not None and first_nonfinite(values=values) is not None:  # the same on every rank
        return {"nonfinite": "critic values"}, torch.zeros_like(rewards), torch.zeros_like(rewards)
    advantages, returns = algos.token_advantages(rewards.float(), mask, ac, values, kl)
    tokens = advantages[mask.bool()]
    per_completion = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    update = policy_update(opt, ref, rollouts, advantages[mine], settings, pad_id, ranks, batch)
    if "nonfinite" in update:
        return update, tokens, per_completion
    if kl is not None:
        update[f"kl/{ac.kl_estimator}_mean"] = float(algos.masked_mean(kl, mask))
    if critic is not None:
        update["critic/explained_variance"] = algos.explained_variance(values, returns, mask)
        update["critic/values_mean"] = float(algos.masked_mean(values, mask))
        update["critic/returns_mean"] = float(algos.masked_mean(returns, mask))
        update.update(critic.update(batch, old_values, returns[mine], ac))
    return update, tokens, per_completion
