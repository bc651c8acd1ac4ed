"""Normalized helpfulness reward R_h (AlphaAlign, paper Eq. 6–7): `helpfulness_rm` and `remote_rm`.

For a benign prompt x with rollouts o_1..o_n and final answers y_i, a reward model gives raw scores
r_i = RM(x, y_i). Within the prompt's group of rollouts (all n, refusals included):

    r̃_i = (r_i − mean(r)) / std(r)                       (Eq. 6; r̃ = 0 when std = 0 or n = 1)
    R_h,i = max(r̃_i, 0) if y_i is not a refusal, else 0

and the benign reward is R = R_s + R_h (Eq. 7): in a recipe, `alphaalign_safety` plus this term with
`when: benign` (the stack calls a term only with the rows it applies to, so harmful rows are never scored).
std is Bessel-corrected, as the trainer's group std. The RM sees the user's original request (the trainer
passes prompts without the safety template) and the final answer (`AlphaAlignParse.final`: the <answer> block, or the
whole text without tags), rendered with the RM tokenizer's own chat template.

Groups come from the `group` column the trainer passes (the prompt's index within the step); rows may come
in any order. Without that column (e.g. a plain TRL call), rows with the same prompt form a group.

`remote_rm` gets the raw scores from an HTTP reward server instead of a local model; see
`alphaalign.rewards.remote` for the request and reply schema.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable

from alphaalign.rewards.refusal_arg import check_refusal_args, reward_detector, reward_refusals
from alphaalign.rewards.registry import register_reward
from alphaalign.rewards.verifiers import parse_alphaalign


def group_normalized(scores: list[float], refused: list[bool], groups: list[Hashable]) -> list[float]:
    """Eq. 6: z-score each score within its group, clip at 0, and give refusals 0."""
    rows_of: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows_of[g].append(i)
    out = [0.0] * len(scores)
    for rows in rows_of.values():
        values = [scores[i] for i in rows]
        mean = math.fsum(values) / len(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        for i in rows:
            z = (scores[i] - mean) / std if std > 0 else 0.0
            out[i] = 0.0 if refused[i] else max(z, 0.0)
    return out


def _helpfulness(
    prompts, completions, group, reasoning_tag, answer_tag, detector_args, raw_scores
) -> list[float]:
    """Extract answers, score them with ``raw_scores(prompts, answers)``, then normalise per group."""
    answers = [parse_alphaalign(c, reasoning_tag, answer_tag).final for c in completions]
    scores = raw_scores(list(prompts), answers) if completions else []
    if len(scores) != len(completions):
        raise RuntimeError(f"the reward model returned {len(scores)} scores for {len(completions)} answers")
    refused = reward_refusals(
        reward_detector(detector_args, "helpfulness: args"), prompts, answers, "helpfulness: args.refusal"
    )
    return group_normalized(scores, refused, list(group) if group is not None else list(prompts))


@register_reward("helpfulness_rm", check=check_refusal_args)
def helpfulness_rm(
    prompts: list[str],
    completions: list[str],
    *,
    model: str,
    group: list | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    batch_size: int = 8,
    max_length: int = 4096,
    reasoning_tag: str = "safety_reasoning",
    answer_tag: str = "answer",
    refusal: dict | None = None,
    refusal_classifier: str | None = None,
    refusal_label: str | int | None = None,
    refusal_threshold: float | None = None,
    **columns,
) -> list[float]:
    """R_h from a local `AutoModelForSequenceClassification` reward model with one output (HF id or path)."""
    from alphaalign.rewards.rm_scoring import load_classifier, score_conversations

    def raw_scores(user_prompts, answers):
        rm = load_classifier(model, dtype, device, trust_remote_code)
        return score_conversations(rm, user_prompts, answers, batch_size, max_length)

    detector_args = {
        "refusal": refusal,
        "refusal_classifier": refusal_classifier,
        "refusal_label": refusal_label,
        "refusal_threshold": refusal_threshold,
    }
    return _helpfulness(prompts, completions, group, reasoning_tag, answer_tag, detector_args, raw_scores)


@register_reward("remote_rm", check=check_refusal_args)
def remote_rm(
    prompts: list[str],
    completions: list[str],
    *,
    url: str,
    group: list | None = None,
    token_env: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    batch_size: int = 64,
    reasoning_tag: str = "safety_reasoning",
    answer_tag: str = "answer",
    refusal: dict | None = None,
    refusal_classifier: str | None = None,
    refusal_label: str | int | None = None,
    refusal_threshold: float | None = None,
    **columns,
) -> list[float]:
    """R_h with raw scores from the reward server at ``url``; its bearer token is read from ``token_env``."""
    from alphaalign.rewards.remote import RemoteScorer

    scorer = RemoteScorer(url, token_env, timeout, retries, backoff)
    detector_args = {
        "refusal": refusal,
        "refusal_classifier": refusal_classifier,
        "refusal_label": refusal_label,
        "refusal_threshold": refusal_threshold,
    }
    return _helpfulness(
        prompts,
        completions,
        group,
        reasoning_tag,
        answer_tag,
        detector_args,
        lambda p, a: scorer.score_all(p, a, batch_size),
    )
