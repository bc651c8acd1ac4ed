"""AlphaAlign verifiable safety reward R_s (paper Eq. 5).

For a rollout o = (s, y) with format verifier V_f(o) ∈ {0, 1} and refusal verifier V_r(y) ∈ {0, 1}:

    harmful prompt:  R_s = r_f · V_f(o) + r_a · V_r(y)
    benign prompt:   R_s = r_f · V_f(o) − r_a · V_r(y)

Harmful compliance is not penalised (it only misses +r_a); benign refusal costs r_a.

The paper does not give r_f or r_a. Defaults: r_a = 1.0 sets the unit, and r_f = 0.5 < r_a, so the
right refuse/comply decision always outweighs the format bonus (harmful: unformatted refusal 1.0 >
formatted compliance 0.5; benign: unformatted compliance 0 > formatted refusal −0.5), while format
still earns a clear signal. Both are recipe args.

V_r is the rule-based detector by default. ``refusal: {detector: classifier, model: ID_OR_PATH, label, threshold}``
has a sequence-classification model judge the final answer instead (a refusal when the probability of
``label``, a label name from the model's config or an output index, is at least ``threshold``; the older
``refusal_classifier``/``refusal_label``/``refusal_threshold`` args say the same), and ``{detector: llm, ...}``
an LLM judge with a rubric (`alphaalign.rewards.refusal_arg`). A row without a label (e.g. in
`alphaalign score`) gets None: Eq. 5 needs to know whether the prompt was harmful.
"""

from __future__ import annotations

from alphaalign.rewards.refusal_arg import check_refusal_args, reward_detector, reward_refusals
from alphaalign.rewards.registry import register_reward
from alphaalign.rewards.verifiers import is_refusal, parse_alphaalign

_REFUSAL_SIGN = {"harmful": 1.0, "benign": -1.0}


def detect_refusals(
    answers: list[str], classifier: str | None = None, label: str | int = "refusal", threshold: float = 0.5
) -> list[bool]:
    """V_r for each final answer: the rules, or ``classifier`` when given."""
    if classifier is None:
        return [is_refusal(a) for a in answers]
    from alphaalign.rewards.rm_scoring import label_probabilities, load_classifier

    probabilities = label_probabilities(load_classifier(classifier), answers, label)
    return [p >= threshold for p in probabilities]


@register_reward("alphaalign_safety", check=check_refusal_args)
def alphaalign_safety(
    prompts: list[str],
    completions: list[str],
    *,
    label: list[str | None],
    r_f: float = 0.5,
    r_a: float = 1.0,
    reasoning_tag: str = "safety_reasoning",
    answer_tag: str = "answer",
    refusal: dict | None = None,
    refusal_classifier: str | None = None,
    refusal_label: str | int | None = None,
    refusal_threshold: float | None = None,
    **columns,
) -> list[float | None]:
    """R_s per completion; ``label[i]`` is "harmful", "benign" or None (not applicable)."""
    if len(label) != len(completions):
        raise ValueError(f"alphaalign_safety: {len(label)} labels for {len(completions)} completions")
    for prompt_label in label:
        if prompt_label is not None and prompt_label not in _REFUSAL_SIGN:
            raise ValueError(f"alphaalign_safety: label must be 'harmful' or 'benign', got {prompt_label!r}")
    parses = [parse_alphaalign(c, reasoning_tag, answer_tag) for c in completions]
    args = {
        "refusal": refusal,
        "refusal_classifier": refusal_classifier,
        "refusal_label": refusal_label,
        "refusal_threshold": refusal_threshold,
    }
    detector = reward_detector(args, "alphaalign_safety: args")
    refused = reward_refusals(detector, prompts, [p.final for p in parses], "alphaalign_safety: args.refusal")
    return [
        None if prompt_label is None else r_f * p.format_ok + _REFUSAL_SIGN[prompt_label] * r_a * v_r
        for p, prompt_label, v_r in zip(parses, label, refused, strict=True)
    ]
