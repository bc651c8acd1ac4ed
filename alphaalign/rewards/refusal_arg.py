"""The rewards' V_r choice: ``refusal: {detector: rules|classifier|llm, ...}`` (the judge options of
`alphaalign.judges.spec`, selected by ``detector``), or the older ``refusal_classifier`` /
``refusal_label`` / ``refusal_threshold`` args, which mean ``{detector: classifier, model, label, threshold}``.

An LLM detector asks its endpoint for every answer it has not judged before (replies are cached on disk):
slow and costly per rollout, see docs/rewards.md. A reply it cannot parse is judged by the rules instead, and
the count is printed, so no rollout's reward rests on a guessed class.
"""

from __future__ import annotations

import sys

from alphaalign.errors import UserError

LEGACY = ("refusal_classifier", "refusal_label", "refusal_threshold")


def reward_detector(args: dict, where: str):
    """The detector spec from a reward's args; ``where`` (e.g. "recipe.yaml: rewards.0.args") prefixes errors."""
    from alphaalign.judges.spec import RulesJudge, parse_judge

    refusal = args.get("refusal")
    legacy = {key: args[key] for key in LEGACY if args.get(key) is not None}
    if refusal is not None:
        if legacy:
            raise UserError(
                f"{where}.{next(iter(legacy))}: give either 'refusal' or the older refusal_* args, not both"
            )
        if not isinstance(refusal, dict):
            raise UserError(f"{where}.refusal: expected a mapping like {{detector: rules}}, got {refusal!r}")
        return parse_judge(refusal, f"{where}.refusal", tag_key="detector")
    if "refusal_classifier" not in legacy:
        if legacy:
            raise UserError(f"{where}.{next(iter(legacy))}: needs refusal_classifier")
        return RulesJudge()
    data = {
        "type": "classifier",
        "model": legacy["refusal_classifier"],
        **{k.removeprefix("refusal_"): v for k, v in legacy.items() if k != "refusal_classifier"},
    }
    try:
        return parse_judge(data, where)
    except UserError as exc:  # name the arg as the recipe spells it
        raise UserError(str(exc).replace(f"{where}.", f"{where}.refusal_", 1)) from None


def check_refusal_args(args: dict, where: str) -> None:
    """For `alphaalign validate`: the detector spec parses and an API key it names is set (nothing is loaded or
    contacted)."""
    from alphaalign.judges import check_environment

    check_environment(reward_detector(args, where), f"{where}.refusal")


def reward_refusals(spec, prompts: list[str], answers: list[str], where: str) -> list[bool]:
    """V_r of each final answer with the chosen detector."""
    from alphaalign.judges import LLMJudge
    from alphaalign.rewards.alphaalign_safety import detect_refusals

    if not isinstance(spec, LLMJudge):
        if spec.type == "classifier":
            return detect_refusals(answers, spec.model, spec.label, spec.threshold)
        return detect_refusals(answers)
    from alphaalign.judges import shared_judge

    judgements = shared_judge(spec, where).judge(list(prompts), answers)
    missing = [i for i, j in enumerate(judgements) if j.refused is None]
    fallback = detect_refusals([answers[i] for i in missing]) if missing else []
    if missing:
        print(
            f"warning: {where}: the llm detector's reply to {len(missing)} of {len(answers)} answers could not be "
            "parsed; those were judged by the rules",
            file=sys.stderr,
        )
    by_rules = dict(zip(missing, fallback, strict=True))
    return [by_rules[i] if j.refused is None else j.refused for i, j in enumerate(judgements)]
