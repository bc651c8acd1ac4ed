"""The policy update: one batch's micro-batch losses, backward passes and optimizer steps, and its metrics.

The math is `alphaalign.rl.algos`; the batching `alphaalign.rl.batching`. The update reads the recipe's
`algorithm:` section and the few other settings in `UpdateSettings`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from alphaalign.config import AlgorithmConfig, Recipe
from alphaalign.parallel import ONE_PROCESS
from alphaalign.rl import algos
from alphaalign.rl.batching import MicroBatch, completion_logits, micro_batches
from alphaalign.rollout.base import Rollouts


def resolved_algorithm(recipe: Recipe) -> AlgorithmConfig:
    """The recipe's algorithm section with `rollout_correction: auto` resolved for its engine."""
    return recipe.algorithm.model_copy(update={"rollout_correction": recipe.rollout_correction})


@dataclass(frozen=True)
class UpdateSettings:
    """What the update reads from a recipe: the algorithm, and the few numbers from the other sections."""

    algorithm: AlgorithmConfig  # rollout_correction resolved
    temperature: float  # the sampling temperature the log-probs are scaled by
    max_completion_length: int  # dr_grpo's constant normaliser
    micro_batch_tokens: int
    share_prompt_forward: bool

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> UpdateSettings:
        # gradient checkpointing makes transformers drop the prompt cache in training
        share = recipe.trainer.share_prompt_forward and not recipe.model.gradient_checkpointing
        return cls(
            resolved_algorithm(recipe),
            recipe.rollout.temperature,
            recipe.rollout.max_new_tokens,
            recipe.trainer.micro_batch_tokens,
            share,
        )


@dataclass(frozen=True)
class BatchCounts:
    """The batch-wide counts (summed over ranks) that the loss normalisers divide by."""

    sequences: int
    tokens: float
    micro_batches: int


@dataclass
class UpdateSums:
    """The running sums of one update over micro-batches (this rank's): the loss, and the masked per-token
    statistics that become the update's metrics once divided by the batch's token count."""

    loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    is_weight: float = 0.0
    logp_gap: float = 0.0
    largest_logp_gap: float = 0.0  # a maximum, not summed over ranks

    def add(self, loss, stats: dict, mask, iterations: int, first_iteration: bool) -> None:
        self.loss += float(loss.detach()) / iterations
        self.clip_low += float((stats["clip_low"] * mask).sum()) / iterations
        self.clip_high += float((stats["clip_high"] * mask).sum()) / iterations
        if first_iteration:  # measured on the policy that generated the batch
            self.entropy += float((stats["entropy"] * mask).sum())
            for key in ("kl", "is_weight", "logp_gap"):
                if key in stats:
                    setattr(self, key, getattr(self, key) + float((stats[key] * mask).sum()))
            if "logp_gap" in stats:
                self.largest_logp_gap = max(self.largest_logp_gap, float(stats["logp_gap"].max()))

    def summed(self, ranks) -> UpdateSums:
        """The sums over every rank (the maximum stays this rank's)."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "largest_logp_gap"]
        summed = ranks.sum([getattr(self, name) for name in names])
        return dataclasses.replace(self, **dict(zip(names, summed, strict=True)))


def first_nonfinite(**named) -> str | None:
    """The name of the first argument (a tensor or a list of tensors) holding NaN or ±inf, else None."""
    for name, value in named.items():
        tensors = value if isinstance(value, list) else [value]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return name
    return None


def rows_of(values, mb: MicroBatch):
    """The micro-batch's rows of a per-sequence [B] or per-token [B, T] tensor (cut to its C tokens)."""
    rows = values[mb.rows]
    return rows[:, : mb.completion_ids.shape[1]] if rows.dim() == 2 else rows


def micro_batch_loss(
    policy,
    mb: MicroBatch,
    advantages,
    old_logp,
    ref_logp,
    ac: AlgorithmConfig,
    temperature: float,
    max_completion_length: int,
    counts: BatchCounts,
):
    """The loss of one micro-batch, scaled so that the micro-batch losses sum to the batch loss.

    `old_logp` None means π_old = π_θ (one update per batch, no rollout correction): ratio 1, gradient intact.
    `ac.rollout_correction` is the resolved mode (`resolved_algorithm`). Returns (loss, per-token stats).
    """
    logits = completion_logits(policy, mb)
    logp, entropy = algos.token_logprobs_and_entropy(logits, mb.completion_ids, temperature)
    old = logp.detach() if old_logp is None else old_logp
    log_w = algos.importance_log_weights(logp, old, mb.mask, ac.importance_sampling_level)
    surrogate = algos.POLICY_LOSSES[algos.LOSS_TYPES[ac.loss_type][0]]
    per_token, low, high = surrogate(
        log_w,
        advantages,
        logp,
        epsilon_low=ac.epsilon,
        epsilon_high=ac.epsilon if ac.epsilon_high is None else ac.epsilon_high,
        temperature_pos=ac.sapo_temperature_pos,
        temperature_neg=ac.sapo_temperature_neg,
    )
    stats = {"clip_low": low.expand_as(mb.mask), "clip_high": high.expand_as(mb.mask), "entropy": entropy}
    correction = ac.rollout_correction
    if correction != "none":
        is_w = algos.rollout_correction_weights(
            old, mb.rollout_logp, mb.mask, correction, ac.rollout_correction_max, ac.rollout_correction_min
        )
        per_token = per_token * is_w
        stats["is_weight"] = is_w.expand_as(mb.mask)
        stats["logp_gap"] = torch.nan_to_num((old - mb.rollout_logp).abs() * mb.mask, nan=0.0)
    if ref_logp is not None:
        kl = algos.KL_ESTIMATORS[ac.kl_estimator](logp, ref_logp)
        stats["kl"] = kl.detach()
        if ac.kl_bias_correction:
            kl = kl * torch.exp(log_w)
        per_token = per_token + ac.beta * kl
    loss = algos.aggregate_loss(
        per_token,
        mb.mask,
        ac.loss_type,
        total_sequences=counts.sequences,
        total_tokens=counts.tokens,
        max_completion_length=max_completion_length,
        num_micro_batches=counts.micro_batches,
    )
    return loss, stats


@dataclass
class PreparedBatch:
    """This rank's rollouts as micro-batches, with the frozen per-token log-probs the update reads."""

    mbs: list[MicroBatch]  # padded with idle copies (empty loss mask) to the most micro-batches any rank has
    real: int  # how many of `mbs` hold this rank's rows (the first ones)
    counts: BatchCounts
    old_logps: list  # π_old per micro-batch, or Nones when π_old = π_θ
    ref_logps: list  # π_ref per micro-batch, or Nones without a reference


def prepare_batch(opt, ref, rollouts: Rollouts, settings: UpdateSettings, pad_id, ranks=ONE_PROCESS):
    """The micro-batches of this rank's rollouts and their frozen log-probs (π_old, π_ref), computed once before
    the first update; None when a log-prob is not finite on any rank (every rank then skips together)."""
    ac, temperature = settings.algorithm, settings.temperature
    device = next(opt.module.parameters()).device
    keep = [not (ac.mask_truncated_completions and r == "length") for r in rollouts.finish_reasons]
    # ZeRO-3 gathers weights in every model call, so all ranks share prompts or none does
    short_prompt = any(len(p) < 2 for p in rollouts.prompt_ids)
    share = settings.share_prompt_forward and not ranks.sum([float(short_prompt)])[0]
    mbs = micro_batches(rollouts, settings.micro_batch_tokens, keep, pad_id, device, share)
    sequences, tokens, count = ranks.sum(
        [len(rollouts.completion_ids), float(sum(mb.mask.sum() for mb in mbs)), len(mbs)]
    )
    counts = BatchCounts(int(sequences), tokens, int(count))
    real = len(mbs)
    # ZeRO-3 gathers parameters collectively in every forward and backward, so all ranks run as many
    # micro-batches; the extra ones are copies whose loss mask is empty (they add nothing)
    idle = dataclasses.replace(mbs[-1], mask=torch.zeros_like(mbs[-1].mask))
    mbs += [idle] * (ranks.max(len(mbs)) - len(mbs))
    # the per-token KL in the rewards is measured on the policy that generated the batch
    need_old = ac.num_iterations > 1 or ac.rollout_correction != "none" or ac.kl_in_reward

    def frozen(model, mb):
        with torch.no_grad():
            return algos.token_logprobs(completion_logits(model, mb), mb.completion_ids, temperature)

    old_logps = [frozen(opt.model, mb) if need_old else None for mb in mbs]
    ref_logps = [frozen(ref, mb) if ref is not None else None for mb in mbs]
    checked = [t for t in old_logps + ref_logps if t is not None]
    if ac.rollout_correction != "none":
        checked += [mb.rollout_logp for mb in mbs]
    problem = first_nonfinite(**{"log-probs": checked})
    if ranks.sum([float(problem is not None)])[0]:
        return None
    return PreparedBatch(mbs, real, counts, old_logps, ref_logps)


def policy_update(
    opt,
    ref,
    rollouts: Rollouts,
    advantages,
    settings: UpdateSettings,
    pad_id,
    ranks=ONE_PROCESS,
    batch: PreparedBatch | None = None,
) -> dict:
    """One batch's update on this rank's rollouts (`advantages` are theirs: [B], or per token [B, T]); returns
    batch-wide metrics. `batch` is `prepare_batch`'s, when the caller needed its log-probs first.

    `opt` is a TorchOptimization or a ZeroOptimization; losses are normalized by counts summed over ranks.
    """
    ac, temperature = settings.algorithm, settings.temperature
    device = next(opt.module.parameters()).device
    batch = batch or prepare_batch(opt, ref, rollouts, settings, pad_id, ranks)
    if batch is None:
        return {"nonfinite": "log-probs"}
    mbs, counts, old_logps = batch.mbs, batch.counts, batch.old_logps
    # with kl_in_reward the KL is already in the advantages, not a loss term
    ref_logps = [None] * len(mbs) if ac.kl_in_reward else batch.ref_logps

    sums = UpdateSums()
    grad_norms = []
    # a later iteration that fails undoes the steps the earlier ones made: a skipped update changes nothing
    saved = opt.snapshot() if ac.num_iterations > 1 else None
    for iteration in range(ac.num_iterations):
        opt.zero_grad()
        for mb, old, ref_logp in zip(mbs, old_logps, ref_logps, strict=True):
            loss, stats = micro_batch_loss(
                opt.model,
                mb,
                rows_of(advantages, mb).to(device),
                old,
                ref_logp,
                ac,
                temperature,
                settings.max_completion_length,
                counts,
            )
            opt.backward(loss)
            sums.add(loss, stats, mb.mask, ac.num_iterations, first_iteration=iteration == 0)
        batch_loss = ranks.sum([sums.loss])[0]
        grad_norms.append(opt.step(loss_finite=math.isfinite(batch_loss)))
        problem = first_nonfinite(loss=torch.tensor(batch_loss), gradients=torch.tensor(grad_norms[-1]))
        if problem is not None:  # the weights, optimizer and schedule are left as they were
            if saved is not None and iteration > 0:
                opt.restore(saved)
            return {"nonfinite": problem}

    totals = sums.summed(ranks)
    n = max(counts.tokens, 1.0)
    out = {
        "loss": totals.loss,
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": opt.lr,
        "entropy/mean": totals.entropy / n,
        "clip/low_fraction": totals.clip_low / n,
        "clip/high_fraction": totals.clip_high / n,
    }
    if ref is not None and not ac.kl_in_reward:
        out[f"kl/{ac.kl_estimator}_mean"] = totals.kl / n
    if ac.rollout_correction != "none":
        out["rollout_correction/weight_mean"] = totals.is_weight / n
        # |trainer's log-prob before the update − engine's log-prob| per completion token: ~1e-5 when the
        # engine sampled with the current weights, larger with stale (async) rollouts
        out["rollout_correction/logp_abs_diff_mean"] = totals.logp_gap / n
        out["rollout_correction/logp_abs_diff_max"] = max(ranks.gather(sums.largest_logp_gap))
    return out
