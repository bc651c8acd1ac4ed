"""RL math (GRPO, RLOO, REINFORCE++, PPO with GAE): small pure functions on tensors, registered by name.

Shapes: B completions, T completion tokens (right-padded), `mask` is 1 on real completion tokens.
Registries: ADVANTAGE_ESTIMATORS take one scalar reward per completion, `(rewards [B], group_size,
scale_rewards) -> advantages [B]` (what the trainer calls); TOKEN_ADVANTAGE_ESTIMATORS take per-token rewards
(`kl_in_reward`) first, then what each needs (GAE: the critic's values; both: `mask` [B, T]), and return
`(advantages, returns)`, both [B, T] (the trainer calls them through `token_advantages` when `token_level`);
POLICY_LOSSES give the per-token policy loss of each surrogate; LOSS_AGGREGATIONS reduce it to one number;
LOSS_TYPES pair a surrogate with a normaliser (what `algorithm.loss_type` names); KL_ESTIMATORS the
per-token KL. The recipe keys that name an entry are validated against these tables (`RECIPE_REGISTRIES`),
so registering a function is all it takes to make its name a valid setting.
Conventions follow trl 1.16's GRPOTrainer (the parity reference, see tests/integration/test_trl_parity.py):
Bessel-corrected NaN-aware std with ε = 1e-4 added to σ, temperature-scaled log-probs, k3 KL added after
the importance weights, and the loss normalisers listed in `aggregate_loss`.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {}
TOKEN_ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., Tensor]] = {}
LOSS_TYPES: dict[str, tuple[str, str]] = {}  # loss_type -> (POLICY_LOSSES name, LOSS_AGGREGATIONS name)
STD_EPS = 1e-4
WHITEN_EPS = 1e-8  # added to the variance by verl's and OpenRLHF's whitening


def register(table: dict, name: str):
    def wrap(fn):
        table[name] = fn
        return fn

    return wrap


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaNs; NaN where fewer than two values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))
    if keepdim:
        return std
    return std.reshape(()) if dim is None else std.squeeze(dim)


# ---------------------------------------------------------------------------------------------------------
# Rewards -> advantages


def combine_rewards(per_term: Tensor, weights: Tensor, group_size: int, aggregation: str) -> Tensor:
    """Weighted scalar reward per completion from a [B, K] matrix of reward terms (NaN = not applicable).

    `sum_then_normalize`: r = Σ_k w_k r_k. `normalize_then_sum`: each term is z-scored within its group first
    (σ + 1e-4). A row where every term is NaN stays NaN (unscorable).
    """
    unscorable = torch.isnan(per_term).all(dim=1)
    if aggregation == "normalize_then_sum":
        grouped = per_term.view(-1, group_size, per_term.shape[1])
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        per_term = ((grouped - mean) / (nanstd(grouped, dim=1, keepdim=True) + STD_EPS)).view_as(per_term)
    elif aggregation != "sum_then_normalize":
        raise ValueError(f"unknown reward aggregation {aggregation!r}")
    rewards = (per_term * weights.unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(unscorable, math.nan)


def _scale(centered: Tensor, rewards: Tensor, group_size: int, scale_rewards: str) -> Tensor:
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    elif scale_rewards == "batch":
        std = nanstd(rewards)
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    return centered / (std + STD_EPS)


@register(ADVANTAGE_ESTIMATORS, "grpo")
def grpo_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """Â_i = (r_i − mean_g) / (σ + 1e-4); σ is the group's (`group`), the batch's (`batch`) or 1 (`none`).

    NaN rewards are left out of the statistics and get advantage 0.
    """
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    return torch.nan_to_num(_scale(rewards - mean, rewards, group_size, scale_rewards), nan=0.0)


@register(ADVANTAGE_ESTIMATORS, "rloo")
def rloo_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "none") -> Tensor:
    """Leave-one-out baseline: Â_i = r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean_g), then optional scaling."""
    grouped = rewards.view(-1, group_size)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    centered = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) * count / (count - 1).clamp(min=1)
    return torch.nan_to_num(_scale(centered.view(-1), rewards, group_size, scale_rewards), nan=0.0)


def batch_zscore(rewards: Tensor) -> Tensor:
    """(r − mean) / (σ + 1e-4) over the whole batch: the advantage for `normalize_then_sum` (TRL's GDPO)."""
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (nanstd(rewards) + STD_EPS), nan=0.0)


@register(ADVANTAGE_ESTIMATORS, "reinforce_pp")
def reinforce_pp_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "batch") -> Tensor:
    """REINFORCE++ at sequence level: the rewards whitened over the whole batch, no per-prompt baseline.

    The sequence-level form of `reinforce_pp_token_advantages` for the scalar-reward calling convention: the
    KL stays a loss term, and the statistics count each completion once where OpenRLHF/verl count each token.
    `scale_rewards` is not used (the batch whitening is the method).
    """
    return batch_zscore(rewards)


@register(ADVANTAGE_ESTIMATORS, "reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "batch"
) -> Tensor:
    """REINFORCE++-baseline at sequence level: r minus its group's mean, then whitened over the batch.

    OpenRLHF's `reinforce_baseline` subtracts the group mean from the scalar reward before the KL is folded in
    and the returns are whitened; the token-level form is
    `reinforce_pp_token_advantages(kl_in_reward(grpo_advantages(r, G, "none"), kl, mask, beta), mask)`.
    `scale_rewards` is not used. NaN rewards get advantage 0.
    """
    centered = grpo_advantages(rewards, group_size, "none").masked_fill(torch.isnan(rewards), math.nan)
    return batch_zscore(centered)


def advantages(per_term: Tensor, weights: Tensor, group_size: int, algorithm) -> tuple[Tensor, Tensor | None]:
    """(scalar reward [B], advantages [B]) of a [B, K] matrix of reward terms, as the recipe's `algorithm:`
    section (`reward_aggregation`, `advantage_estimator`, `scale_rewards`) says. The advantages are None for a
    per-token estimator (`token_level`): `token_advantages` turns the scalar rewards into them."""
    scalar = combine_rewards(per_term, weights, group_size, algorithm.reward_aggregation)
    if token_level(algorithm):
        return scalar, None
    if algorithm.reward_aggregation == "normalize_then_sum":  # TRL's GDPO: the batch z-score is the advantage
        return scalar, batch_zscore(scalar)
    estimator = ADVANTAGE_ESTIMATORS[algorithm.advantage_estimator]
    return scalar, estimator(scalar, group_size, algorithm.scale_rewards)


# ---------------------------------------------------------------------------------------------------------
# Per-token rewards -> advantages and returns (PPO with a critic, REINFORCE++)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − mean) / sqrt(var + 1e-8) with the mean and Bessel-corrected variance over the masked entries
    (verl's `masked_whiten`); entries outside the mask are 0. `shift_mean=False` adds the mean back."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    return (out if shift_mean else out + mean) * mask


def last_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B, T] zeros with each scalar reward on its completion's last real token; NaN (unscorable) counts as 0."""
    lengths = mask.sum(-1).long()
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    value = torch.nan_to_num(rewards, nan=0.0) * (lengths > 0)  # an empty completion has no token to hold it
    return out.scatter_(1, (lengths - 1).clamp(min=0).unsqueeze(1), value.unsqueeze(1))


def kl_in_reward(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards of classic RLHF PPO: −β·KL on every completion token plus the scalar reward [B] on the
    last one. `kl` [B, T] is a per-token estimate (k1 = log π_θ − log π_ref, as OpenRLHF and verl); no gradient
    flows through it here."""
    mask = mask.to(kl.dtype)
    return last_token_rewards(rewards.to(kl.dtype), mask) - beta * kl.detach() * mask


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{k≥0} γ^k r_{t+k} within each completion; 0 outside the mask."""
    mask = mask.to(token_rewards.dtype)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


@register(TOKEN_ADVANTAGE_ESTIMATORS, "gae")
def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over right-padded completions.

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the last completion token (the episode ends there);
    Â_t = δ_t + γλ·Â_{t+1}; returns R_t = Â_t + V_t (the critic's target). Values and rewards outside the mask
    are ignored; both outputs are 0 there. verl's `compute_gae_advantage_return` runs the same recursion and
    returns `masked_whiten` of these advantages with the same returns.
    """
    mask = mask.to(token_rewards.dtype)
    values = values.to(token_rewards.dtype) * mask
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])
    running = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        next_value = values[:, t]  # 0 on padding, so the last real token bootstraps from 0
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


@register(TOKEN_ADVANTAGE_ESTIMATORS, "reinforce_pp")
def reinforce_pp_token_advantages(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (OpenRLHF's `reinforce`, verl's `reinforce_plus_plus`): discounted returns of the per-token
    rewards (KL folded in by `kl_in_reward`), whitened over every completion token of the batch.

    Returns (advantages, returns). For the baseline variant pass group-centered scalar rewards to
    `kl_in_reward` (see `reinforce_pp_baseline_advantages`).
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask), returns


def token_level(algorithm) -> bool:
    """Whether the recipe's `algorithm:` section takes the per-token path: GAE (it needs a critic's values),
    or a TOKEN_ADVANTAGE_ESTIMATORS entry with `kl_in_reward` (REINFORCE++ as OpenRLHF and verl run it)."""
    name = algorithm.advantage_estimator
    return name not in ADVANTAGE_ESTIMATORS or (algorithm.kl_in_reward and name in TOKEN_ADVANTAGE_ESTIMATORS)


def token_advantages(
    rewards: Tensor, mask: Tensor, algorithm, values: Tensor | None = None, kl: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(advantages, returns) [B, T] of scalar rewards [B] placed on each completion's last token, as the
    `algorithm:` section says: −β·`kl` [B, T] on every token when `kl_in_reward`, then GAE on the critic's
    `values` [B, T] (advantages whitened over the batch's tokens, as verl) or REINFORCE++'s whitened returns."""
    if algorithm.kl_in_reward:
        token_rewards = kl_in_reward(rewards, kl, mask, algorithm.beta)
    else:
        token_rewards = last_token_rewards(rewards, mask.to(torch.float32))
    name = algorithm.advantage_estimator
    if name == "gae":
        adv, returns = gae_advantages(token_rewards, values, mask, algorithm.gamma, algorithm.lam)
        return masked_whiten(adv, mask), returns
    return TOKEN_ADVANTAGE_ESTIMATORS[name](token_rewards, mask, algorithm.gamma)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var(R − V) / (Var(R) + 1e-8) over the masked tokens (verl's `explained_var`): 1 for a perfect
    critic, 0 for one that predicts the mean, negative for worse."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # noqa: E731
    return 1.0 - float(var(returns - values)) / (float(var(returns)) + WHITEN_EPS)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = None
) -> tuple[Tensor, Tensor]:
    """PPO value loss per token: ½·max((V − R)², (clip(V, V_old ± c) − R)²); c None: ½·(V − R)².

    The ½ and the max of clipped and unclipped errors are verl's `compute_value_loss` and OpenRLHF's
    `ValueLoss`. Returns the per-token loss (0 outside the mask; reduce it with `aggregate_loss`) and the
    tokens where the clipped error was the larger (verl's `vf_clipfrac`, less the ties inside the clip range
    that float rounding would break either way).
    """
    mask = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped * mask, torch.zeros_like(mask, dtype=torch.bool)
    moved = values - old_values
    clipped = (old_values + moved.clamp(-clip, clip) - returns) ** 2
    # inside the clip range the two errors are equal but for rounding: only a clip that acts counts
    acted = (clipped > unclipped) & (moved.abs() > clip)
    return 0.5 * torch.max(unclipped, clipped) * mask, acted & mask.bool()


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[target] in fp32; logits [B, T, V] are aligned with targets [B, T]."""
    logits = _scaled(logits, temperature)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _LogprobsAndEntropy(torch.autograd.Function):
    """log softmax(x)[target] and the entropy of softmax(x), from one tensor of exponentials that the backward
    pass then turns into the gradient in place: d logp / dx = onehot(target) − softmax(x). Autograd's graph of the
    same expression allocates and sweeps several more tensors of the logits' size."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        peak = logits.amax(-1, keepdim=True)
        exps = (logits - peak).exp_()
        total = exps.sum(-1, keepdim=True)
        lse = peak + total.log()
        logp = (logits.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1)
        entropy = lse.squeeze(-1) - torch.linalg.vecdot(exps, logits) / total.squeeze(-1)
        ctx.save_for_backward(exps, total, targets)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None]:
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "token_logprobs_and_entropy: its backward pass reuses its buffer and runs once"
            )
        ctx.consumed = True
        exps, total, targets = ctx.saved_tensors
        grad = exps.mul_(-grad_logp.unsqueeze(-1) / total)
        return grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1)), None


def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` (with its gradient) and the entropy in nats of softmax(logits / T) per position (without),
    from one pass of exponentials: H = logsumexp(x) − Σ softmax(x)·x."""
    return _LogprobsAndEntropy.apply(_scaled(logits, temperature), targets)


# ---------------------------------------------------------------------------------------------------------
# Policy loss, KL, aggregation


def importance_log_weights(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log(π_θ/π_old) per token [B, T], or its masked sequence mean [B, 1] (GSPO, `sequence`)."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"unknown importance_sampling_level {level!r}")


def clipped_surrogate(
    log_weights: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped objective as a loss: −min(w·Â, clip(w, 1−ε_low, 1+ε_high)·Â).

    Returns the per-token loss and two masks of tokens whose gradient the clip removed:
    low (w < 1−ε_low with Â < 0) and high (w > 1+ε_high with Â > 0).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_weights)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, low, high


@register(POLICY_LOSSES, "clip")
def _clip_loss(log_weights, advantages, logp, *, epsilon_low, epsilon_high=None, **_):
    return clipped_surrogate(log_weights, advantages, epsilon_low, epsilon_high)


@register(POLICY_LOSSES, "cispo")
def cispo_loss(
    log_weights: Tensor, advantages: Tensor, logp: Tensor, *, epsilon_high: float, **_
) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1; trl's `cispo`): −sg(min(w, ε_max))·Â·log π_θ. The importance weight is capped and
    detached, so every token keeps its gradient; `epsilon_high` is the cap ε_max itself (ScaleRL: 5.0).

    Returns the loss, an empty low mask and the tokens whose weight was capped with Â > 0 (trl's
    `cispo_clip_ratio`).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_weights)
    loss = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
    high = (ratio > epsilon_high) & (adv > 0)
    return loss, torch.zeros_like(high), high


@register(POLICY_LOSSES, "sapo")
def sapo_loss(
    log_weights: Tensor,
    advantages: Tensor,
    logp: Tensor | None = None,
    *,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """SAPO (trl's `sapo`): −(4/τ)·σ(τ·(w − 1))·Â, a smooth gate in place of the hard clip; τ is
    `temperature_pos` where Â > 0, else `temperature_neg`. Nothing is clipped: both masks are empty."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)
    loss = -torch.sigmoid(tau * (torch.exp(log_weights) - 1)) * 4 / tau * adv
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return loss, none, none


# The surrogate and the normaliser behind each `algorithm.loss_type` (trl couples them the same way).
LOSS_TYPES.update(
    grpo=("clip", "grpo"),
    bnpo=("clip", "bnpo"),
    dr_grpo=("clip", "dr_grpo"),
    dapo=("clip", "dapo"),
    cispo=("cispo", "dapo"),
    sapo=("sapo", "grpo"),
)


@register(KL_ESTIMATORS, "k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log π_θ − log π_ref (unbiased, high variance, can be negative)."""
    return logp - ref_logp


@register(KL_ESTIMATORS, "k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """½ (log π_θ − log π_ref)²."""
    return 0.5 * (logp - ref_logp) ** 2


@register(KL_ESTIMATORS, "k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 (Schulman's low-variance estimator; TRL's)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    total_sequences: int | None = None,
    total_tokens: float | None = None,
    max_completion_length: int | None = None,
    num_micro_batches: int = 1,
) -> Tensor:
    """Reduce a per-token loss of one micro-batch so that summing over micro-batches gives the batch loss.

    `total_sequences` / `total_tokens` are the counts over the whole batch (default: this micro-batch).
      grpo     Σ_i (Σ_t L·M / Σ_t M) / total_sequences           (sequence mean, then mean over sequences)
      bnpo     (Σ L·M / Σ M) / num_micro_batches                  (token mean within each micro-batch, as TRL)
      dr_grpo  Σ L·M / (total_sequences · max_completion_length)
      dapo     Σ L·M / total_tokens                               (global token mean)
    `cispo` aggregates as dapo and `sapo` as grpo (`LOSS_TYPES`), as in trl.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    mask = mask.to(per_token_loss.dtype)
    n_seq = total_sequences if total_sequences is not None else per_token_loss.shape[0]
    return LOSS_AGGREGATIONS[LOSS_TYPES[loss_type][1]](
        per_token_loss * mask,
        mask,
        n_seq=n_seq,
        total_tokens=total_tokens,
        max_completion_length=max_completion_length,
        num_micro_batches=num_micro_batches,
    )


@register(LOSS_AGGREGATIONS, "grpo")
def _sequence_mean(masked: Tensor, mask: Tensor, *, n_seq: int, **_) -> Tensor:
    return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq


@register(LOSS_AGGREGATIONS, "bnpo")
def _micro_batch_token_mean(masked: Tensor, mask: Tensor, *, num_micro_batches: int, **_) -> Tensor:
    return masked.sum() / mask.sum().clamp(min=1.0) / num_micro_batches


@register(LOSS_AGGREGATIONS, "dr_grpo")
def _constant_length(masked: Tensor, mask: Tensor, *, n_seq: int, max_completion_length, **_) -> Tensor:
    if max_completion_length is None:
        raise ValueError("dr_grpo needs max_completion_length")
    return masked.sum() / (n_seq * max_completion_length)


@register(LOSS_AGGREGATIONS, "dapo")
def _global_token_mean(masked: Tensor, mask: Tensor, *, total_tokens, **_) -> Tensor:
    n_tok = total_tokens if total_tokens is not None else mask.sum()
    return masked.sum() / max(float(n_tok), 1.0)


# The registry behind each recipe key that names one of the functions above.
RECIPE_REGISTRIES: dict[str, Mapping] = {
    # one name per estimator; `token_level` says which table a name is served from
    "algorithm.advantage_estimator": ChainMap(TOKEN_ADVANTAGE_ESTIMATORS, ADVANTAGE_ESTIMATORS),
    "algorithm.kl_estimator": KL_ESTIMATORS,
    "algorithm.loss_type": LOSS_TYPES,
}


# ---------------------------------------------------------------------------------------------------------
# Rollout-engine mismatch correction


def rollout_correction_weights(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    mode: str,
    cap_max: float = 3.0,
    cap_min: float | None = None,
) -> Tensor:
    """Importance weights π_old / π_rollout for tokens sampled by the rollout engine.

    `token_*` gives [B, T] per-token ratios, `sequence_*` one ratio per sequence [B, 1] (product over tokens).
    `*_truncate` clamps to [cap_min, cap_max]; `*_mask` sets ratios outside that range to 0.
    Tokens whose engine log-prob is missing (NaN) get ratio 1.
    """
    diff = torch.nan_to_num((old_logp - rollout_logp) * mask, nan=0.0)
    level, _, action = mode.partition("_")
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True)
    elif level != "token":
        raise ValueError(f"unknown rollout correction mode {mode!r}")
    ratio = torch.exp(diff)
    if action == "truncate":
        return torch.clamp(ratio, min=cap_min, max=cap_max)
    if action == "mask":
        low = -math.inf if cap_min is None else cap_min
        return ratio.masked_fill((ratio < low) | (ratio > cap_max), 0.0)
    raise ValueError(f"unknown rollout correction mode {mode!r}")
