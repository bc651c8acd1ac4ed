"""AlphaAlign verifiable safety reward R_s (paper Eq. 5).

For a rollout o = (s, y) with format verifier V_f(o) ∈ {0, 1} and refusal verifier V_r(y) ∈ {0, 1}:

    harmful prompt:  R_s = r_f · V_f(o) + r_a · V_r(y)
    benign prompt:   R_s = r_f · V_f(o) − r_a · V_r(y)

Harmful compliance is not penalised (it only misses +r_a); benign refusal costs r_a.

The paper does not give r_f or r_a. Defaults: r_a = 1.0 sets the unit, and r_f = 0.5 < r_a, so the
right refuse/comply decision always outweighs the format bonus (harmful: unformatted refusal 1.0 >
formatted compliance 0.5; benign: unformatted compliance 0 > formatted refusal −0.5), while format
still earns a clear signal. Both are recipe args.
"""

from __future__ import annotations

from alphaalign.rewards.registry import register_reward
from alphaalign.rewards.verifiers import parse_alphaalign, refusal_of

_REFUSAL_SIGN = {"harmful": 1.0, "benign": -1.0}


@register_reward("alphaalign_safety")
def alphaalign_safety(
    prompts: list[str],
    completions: list[str],
    *,
    label: list[str],
    r_f: float = 0.5,
    r_a: float = 1.0,
    reasoning_tag: str = "safety_reasoning",
    answer_tag: str = "answer",
    **columns,
) -> list[float]:
    """R_s per completion; ``label[i]`` is "harmful" or "benign"."""
    rewards = []
    for completion, prompt_label in zip(completions, label, strict=True):
        if prompt_label not in _REFUSAL_SIGN:
            raise ValueError(f"alphaalign_safety: label must be 'harmful' or 'benign', got {prompt_label!r}")
        v_f = parse_alphaalign(completion, reasoning_tag, answer_tag).format_ok
        v_r = refusal_of(completion, reasoning_tag, answer_tag)
        rewards.append(r_f * v_f + _REFUSAL_SIGN[prompt_label] * r_a * v_r)
    return rewards
