"""`alphaalign validate` and the check every recipe command runs first: the recipe, its local data files,
its reward names and arguments, its output folder and DeepSpeed config, without loading a model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alphaalign.errors import UserError
from alphaalign.outputs import check_output


def validate(recipe_path: str, overrides: list[str]):
    """Check the recipe, its local data files and its reward names and arguments without loading a model."""
    from alphaalign.config import load_recipe
    from alphaalign.data import check_data

    recipe = load_recipe(recipe_path, overrides)
    columns = check_data(recipe)
    check_rewards(recipe_path, recipe)
    check_detectors_for_training(recipe_path, recipe)
    check_column_clashes(recipe_path, recipe, columns)
    check_output(recipe.trainer.output_dir, f"{recipe_path}: trainer.output_dir", folder=True)
    if recipe.trainer.deepspeed is not None:
        from alphaalign.rl.zero import read_config

        read_config(recipe)
    model_path = recipe.model.name_or_path
    looks_local = model_path.startswith((".", "/", "~")) or Path(model_path).exists()
    if looks_local and recipe.model.build is None and not Path(model_path).expanduser().exists():
        raise UserError(f"{recipe_path}: model.name_or_path: no such folder: {model_path}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun the first process says it
        for warning in recipe.warnings():
            print(f"warning: {recipe_path}: {warning}", file=sys.stderr)
    return recipe


def check_rewards(recipe_path: str, recipe) -> None:
    """Every reward name resolves and its args fit the function (nothing is loaded)."""
    from alphaalign.rewards import UnknownRewardError, check_reward_args, resolve_reward

    for i, spec in enumerate(recipe.rewards):
        try:
            check_reward_args(resolve_reward(spec.name), spec.args, f"{recipe_path}: rewards.{i}.args")
        except UnknownRewardError as exc:
            raise UserError(f"{recipe_path}: rewards.{i}.name: {exc}") from None
        except ValueError as exc:
            raise UserError(f"{recipe_path}: rewards.{i}.args: {exc}") from None


def check_detectors_for_training(recipe_path: str, recipe) -> None:
    """A reward's llm detector names the url of a judge server. Without one it would start a vLLM server in every
    trainer process, each on the GPU its trainer holds, which vLLM wants nine tenths of. (`score` and `eval`,
    with no policy to train, may start one.)"""
    from alphaalign.judges import LLMJudge
    from alphaalign.rewards import resolve_reward
    from alphaalign.rewards.refusal_arg import reward_detector
    from alphaalign.rewards.registry import keyword_names

    for i, spec in enumerate(recipe.rewards):
        where = f"{recipe_path}: rewards.{i}.args"
        if "refusal" not in keyword_names(resolve_reward(spec.name)):
            continue
        detector = reward_detector(spec.args, where)
        if isinstance(detector, LLMJudge) and detector.url is None:
            raise UserError(
                f"{where}.refusal.url: required in training: start the judge's server apart from the trainer, on "
                f"a GPU of its own (e.g. `vllm serve {detector.model} --port 8001`), and give its url "
                "(http://host:8001/v1)"
            )


def check_column_clashes(recipe_path: str, recipe, columns: dict) -> None:
    """No training data column takes the name of a reward's argument (the rewards get both as keywords)."""
    from alphaalign.rewards.registry import column_clash
    from alphaalign.rewards.stack import RewardStack, clash_message

    stack = RewardStack(recipe.rewards, recipe.format)  # the args as bound, the format's tags included
    for key, (path, names) in columns.items():
        if not key.startswith("data.train."):  # held-out prompts are not scored by the rewards
            continue
        for k, spec in enumerate(recipe.rewards):
            if (clash := column_clash(stack.bare[k], stack.args[k], names)) is not None:
                raise UserError(f"{recipe_path}: {key}: {path}: {clash_message(clash, k, spec.name)}")


def run(args) -> int:
    """`alphaalign validate`: the checks above and the plan (processes, memory per GPU)."""
    from alphaalign.plan import check_plan, plan_line, recipe_plan

    recipe = validate(args.recipe, args.overrides)
    plan = recipe_plan(recipe, args.gpus, args.gpu_memory)
    estimate = check_plan(args.recipe, recipe, plan)
    print(
        f"{args.recipe}: ok ({len(recipe.data.train)} train source(s), {len(recipe.rewards)} reward term(s))"
    )
    print(plan_line(plan, estimate))
    return 0
