"""Reliability, round 2 (issue 22, classes 1-5): skipped steps that change nothing, sandboxed templates and
safe checkpoint loading, secrets masked by what they are, wall-clock deadlines and bounded recipes, finite
numbers everywhere."""

import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from alphaalign import config
from alphaalign.cli import main
from alphaalign.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ---- 5. non-finite numbers: every float of every schema, every float flag


def _float_paths(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, annotation) of every float leaf of a schema, list items addressed as item 0."""
    found = []
    for name, field in model.model_fields.items():
        found += _paths_of(field.annotation, f"{prefix}{name}")
    return found


def _paths_of(annotation, path: str) -> list[tuple[str, object]]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float:
        return [(path, float)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _float_paths(annotation, path + ".")
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args if arg is not type(None) for found in _paths_of(arg, path)]
    if origin is list:
        return _paths_of(args[0], path + ".0")
    if origin is tuple and float in args:
        return [(path, tuple)]
    return []


def test_the_walker_finds_the_floats_the_issue_names():
    paths = {p for p, _ in _float_paths(config.Recipe)}
    assert {"trainer.learning_rate", "rollout.temperature", "rewards.0.weight", "algorithm.beta",
            "algorithm.epsilon", "algorithm.epsilon_high", "trainer.adam_betas", "data.train.0.weight",
            "model.lora.alpha"} <= paths  # fmt: skip
    assert {"training.learning_rate", "augmentation.alpha"} <= {
        p for p, _ in _float_paths(config.RewardModelRecipe)
    }


RECIPE_BASE = [
    "model.name_or_path=m",
    "data.train=[{path: a.jsonl}]",
    "data.eval=[{path: b.jsonl}]",
    "rewards=[{name: alphaalign_safety}]",
]
RM_BASE = ["model.name_or_path=m", "data.pairs=[p.jsonl]"]


@pytest.mark.parametrize("schema, base", [(config.Recipe, RECIPE_BASE), (config.RewardModelRecipe, RM_BASE)])
@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan"])
def test_every_float_of_every_schema_refuses_non_finite_values(schema, base, bad):
    load = lambda *extra: config.load_recipe(None, [*base, *extra], schema=schema)  # noqa: E731
    load()  # the base is valid
    for path, kind in _float_paths(schema):
        value = f"[{bad}, 0.9]" if kind is tuple else bad
        with pytest.raises(UserError) as err:
            load(f"{path}={value}")
        assert f"{path}" in str(err.value) and "finite" in str(err.value), (path, str(err.value))


def test_non_finite_numbers_inside_reward_args_are_refused_with_their_key():
    with pytest.raises(UserError, match=r"rewards\.0\.args: inner\.1\.cap: must be a finite number"):
        config.load_recipe(
            None, [*RECIPE_BASE[:3], "rewards=[{name: x:y, args: {inner: [1.0, {cap: .nan}]}}]"]
        )


FLOAT_FLAGS = [
    ["eval", "--out", "o", "--model", "m", "--temperature"],
    ["eval", "--out", "o", "--model", "m", "--refusal-threshold"],
    ["eval-rm", "f.jsonl", "--model", "m", "--threshold"],
    ["eval-rm", "f.jsonl", "--model", "m", "--temperature"],
    ["eval-rm", "f.jsonl", "--model", "m", "--bias"],
]


def test_the_float_flag_list_is_complete():
    """Every float flag the parser has is in FLOAT_FLAGS (a new flag must be added to the test above)."""
    from alphaalign.cli import build_parser, finite_float

    def float_flags(parser):
        for action in parser._actions:
            if action.type is float:
                yield action.option_strings[0]
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    yield from float_flags(action.choices[sub])

    assert not list(float_flags(build_parser())), "a float flag without the finite_float type"
    flags = {a.option_strings[0] for p in build_parser()._subparsers._group_actions[0].choices.values()
             for a in p._actions if a.type is finite_float}  # fmt: skip
    assert flags == {argv[-1] for argv in FLOAT_FLAGS}


@pytest.mark.parametrize("argv", FLOAT_FLAGS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values(argv, bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:-1], f"{argv[-1]}={bad}"])  # '--flag=-inf': argparse takes '-inf' for an option
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-1]}: must be a finite number" in err
