"""Recipes: schema defaults, extends, dotted overrides, and one-line errors naming the file and key."""

import re
from pathlib import Path

import pytest
from helpers import ROOT

from alphaalign.config import Recipe, load_recipe
from alphaalign.errors import UserError
from alphaalign.rm.recipe import RewardModelRecipe


def test_defaults_come_from_the_schema(write_recipe):
    recipe = load_recipe(write_recipe())
    assert recipe.algorithm.loss_type == "dapo"
    assert recipe.algorithm.scale_rewards == "group"
    assert recipe.rollout.num_generations == 8
    assert recipe.rewards[0].when == "all" and recipe.rewards[0].weight == 1.0
    assert recipe.rollout_correction == "none"  # in-process engine: no mismatch to correct


def test_overrides_are_parsed_as_yaml(write_recipe):
    recipe = load_recipe(
        write_recipe(),
        [
            "trainer.learning_rate=1e-6",
            "algorithm.epsilon_high=0.28",
            "data.template=none",
            "rewards=[{name: alphaalign_safety, weight: 2, when: harmful}]",
            "data.train=[{path: x.jsonl}]",
        ],
    )
    assert recipe.trainer.learning_rate == 1e-6
    assert recipe.algorithm.epsilon_high == 0.28
    assert recipe.data.template == "none"
    assert recipe.rewards[0].weight == 2 and recipe.rewards[0].when == "harmful"
    assert recipe.data.train[0].path == "x.jsonl"


def test_override_list_item_by_index(write_recipe):
    recipe = load_recipe(write_recipe(), ["rewards.0.weight=0.5", "rewards.0.args={r_a: 2.0}"])
    assert recipe.rewards[0].weight == 0.5 and recipe.rewards[0].args == {"r_a": 2.0}
    with pytest.raises(UserError, match=r"override 'rewards.3.weight=1': rewards.3: no such list item"):
        load_recipe(write_recipe(), ["rewards.3.weight=1"])


def test_extends_merges_sections_and_child_wins(write_recipe, tmp_path):
    write_recipe({"trainer": {"max_steps": 7, "seed": 3}}, name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrainer:\n  max_steps: 9\n")
    recipe = load_recipe(child)
    assert recipe.trainer.max_steps == 9 and recipe.trainer.seed == 3


def test_unknown_key_names_dotted_key_and_file(write_recipe):
    path = write_recipe({"trainer": {"learning_rat": 1e-6}})
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: trainer.learning_rat: unknown key"


def test_error_in_parent_file_names_the_parent(write_recipe, tmp_path):
    parent = write_recipe({"rollout": {"temperature": -1}}, name="parent.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\n")
    with pytest.raises(UserError, match=rf"^{parent}: rollout.temperature: Input should be greater than 0"):
        load_recipe(child)


def test_unknown_key_in_override_names_the_override(write_recipe):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(), ["algorithm.betaa=0.1"])
    assert str(err.value) == "override 'algorithm.betaa=0.1': algorithm.betaa: unknown key"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "algorithm.loss_type=ppo",
            "algorithm.loss_type: 'ppo' is not registered in alphaalign/rl/algos.py; "
            "choose one of grpo, bnpo, dr_grpo, dapo, cispo, sapo",
        ),
        ("trainer.learning_rate=fast", "trainer.learning_rate: Input should be a valid number"),
        ("rollout.num_generations=1", "rollout.num_generations: Input should be greater than or equal to 2"),
        ("rewards.0.when=sometimes", "rewards.0.when: Input should be 'harmful', 'benign' or 'all'"),
        ("rollout.engine=magic", "rollout.engine: Input should be 'transformers'"),
        ("data.train=[]", "data.train: List should have at least 1 item"),
        ("rollout.async_steps=1", "rollout.async_steps: needs engine: vllm_server"),
        ("rollout.servers=[localhost:8000]", "rollout.servers: 'localhost:8000' is not an http"),
        ("rollout.weight_sync=rsync", "rollout.weight_sync: Input should be 'checkpoint', 'lora' or 'nccl'"),
        ("rollout.timeout=0", "rollout.timeout: Input should be greater than 0"),
        ("rollout.min_new_tokens=300", "rollout.min_new_tokens: 300 is more than max_new_tokens \\(256\\)"),
        ("model.autocast=float16", "model.autocast: Input should be 'bfloat16'"),
        (["model.dtype=bfloat16", "model.autocast=bfloat16"], "model.autocast: needs model.dtype float32"),
        (
            ["model.autocast=bfloat16", "rollout.static_cache=true"],
            "rollout.static_cache: not supported with model",
        ),
        (
            "rollout.weight_sync_keep=1",
            "rollout.weight_sync_keep: Input should be greater than or equal to 2",
        ),
        ("algorithm.filter_groups=std", "algorithm.filter_groups: Input should be 'none' or 'zero_std'"),
        (
            "algorithm.max_resample_rounds=-1",
            "algorithm.max_resample_rounds: Input should be greater than or",
        ),
        ("logging.samples_every=-1", "logging.samples_every: Input should be greater than or equal to 0"),
        ("logging.samples_count=0", "logging.samples_count: Input should be greater than 0"),
    ],
)
def test_bad_values_name_the_key(write_recipe, override, message):
    with pytest.raises(UserError, match=message) as err:
        load_recipe(write_recipe(), override if isinstance(override, list) else [override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["advantage_estimator", "kl_estimator", "loss_type"])
def test_algorithm_names_come_from_the_registries(write_recipe, key, monkeypatch):
    from alphaalign.rl.algos import RECIPE_REGISTRIES

    registry = RECIPE_REGISTRIES[f"algorithm.{key}"]
    assert len(registry) >= 3
    for name in registry:  # every registered name is a valid setting
        assert getattr(load_recipe(write_recipe(), [f"algorithm.{key}={name}"]).algorithm, key) == name
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(), [f"algorithm.{key}=nope"])
    assert str(err.value) == (
        f"override 'algorithm.{key}=nope': algorithm.{key}: 'nope' is not registered in alphaalign/rl/algos.py; "
        f"choose one of {', '.join(registry)}"
    )
    monkeypatch.setitem(registry, "nope", registry[next(iter(registry))])  # registering makes it valid
    assert getattr(load_recipe(write_recipe(), [f"algorithm.{key}=nope"]).algorithm, key) == "nope"


@pytest.mark.parametrize("override", ["algorithm.advantage_estimator=rloo", "algorithm.scale_rewards=none"])
def test_normalize_then_sum_refuses_the_keys_it_would_ignore(write_recipe, override):
    key = override.split("=")[0]
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(), ["algorithm.reward_aggregation=normalize_then_sum", override])
    assert str(err.value).startswith(f"override '{override}': {key}: ")
    assert "has no effect with reward_aggregation: normalize_then_sum" in str(err.value)
    assert load_recipe(write_recipe(), [override]).algorithm.reward_aggregation == "sum_then_normalize"


def test_format_section_is_the_one_home_of_the_tags(write_recipe):
    recipe = load_recipe(write_recipe())
    assert recipe.format.tags == ("safety_reasoning", "answer")
    assert recipe.format.canned_refusal == "\\boxed{Sorry, I can't comply}"
    custom = load_recipe(write_recipe({"format": {"reasoning_tag": "think", "answer_tag": "final"}}))
    assert custom.format.tags == ("think", "final")
    for override, message in [
        (
            "format.answer_tag=safety_reasoning",
            "format.answer_tag: 'safety_reasoning' is also the reasoning_tag",
        ),
        ("format.reasoning_tag='<think>'", "format.reasoning_tag: '<think>' is not a tag name"),
        ("format.canned_refusal=' '", "format.canned_refusal: must not be empty"),
    ]:
        with pytest.raises(UserError, match=f"^override '{re.escape(override)}': {re.escape(message)}"):
            load_recipe(write_recipe(), [override])
    rewards = [{"name": "alphaalign_safety"}, {"name": "csrm", "args": {"model": "m", "answer_tag": "final"}}]
    with pytest.raises(UserError) as err:  # a reward's own tag arg would disagree with the prompt
        load_recipe(write_recipe({"rewards": rewards}))
    assert str(err.value).endswith(
        "rewards.1.args.answer_tag: the tags are set once for every term and the prompt, in the recipe's "
        "format: section (format.answer_tag)"
    )


def test_server_engine_keys(write_recipe):
    recipe = load_recipe(
        write_recipe(),
        [
            "rollout.engine=vllm_server",
            "rollout.async_steps=2",
            "rollout.servers=[http://a:8000/, http://b:8000]",
        ],
    )
    assert recipe.rollout.servers == ["http://a:8000", "http://b:8000"]
    assert recipe.rollout.weight_sync == "checkpoint" and recipe.rollout.async_steps == 2
    assert recipe.rollout_correction == "sequence_mask"  # 'auto': the server's log-probs are corrected for


def test_data_source_needs_exactly_one_location(write_recipe):
    with pytest.raises(UserError, match=r"data.train.0: give exactly one of 'path' or 'hf_id'"):
        load_recipe(write_recipe({"data": {"train": [{"path": "a.jsonl", "hf_id": "x/y"}]}}))


def test_missing_required_section(write_recipe):
    path = write_recipe({"model": None})
    with pytest.raises(UserError, match="model: Input should be a valid dictionary"):
        load_recipe(path)
    path = write_recipe(base=False)
    with pytest.raises(UserError, match="model: required key is missing"):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed\n", r"line \d+: YAML syntax error"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("extends: recipe.yaml\n", "'extends' forms a cycle"),
    ],
)
def test_file_level_errors(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_shipped_recipe_is_named_without_a_folder(tmp_path, monkeypatch):
    """From any folder, `demo` (or `demo.yaml`, `rm/csrm-demo`) is the recipe shipped in the package, its data
    paths relative to the shipped file; a file of that name in the working folder wins."""
    from alphaalign.data import check_data
    from alphaalign.resources import package_path

    monkeypatch.chdir(tmp_path)
    for name in ("demo", "demo.yaml"):
        recipe = load_recipe(name)
        assert recipe._source == package_path("recipes", "demo.yaml").resolve()
        check_data(recipe)
    assert load_recipe("demo_zero3").trainer.deepspeed == "zero3"  # its `extends: demo.yaml` is found too
    assert load_recipe("rm/csrm-demo", schema=RewardModelRecipe)._source.name == "csrm-demo.yaml"
    (tmp_path / "demo").write_text(Path(load_recipe("demo")._source).read_text().replace("policy-v7", "mine"))
    assert load_recipe("demo").model.name_or_path.endswith("mine")
    with pytest.raises(
        UserError, match=r"^nope: recipe file not found \(or name a shipped recipe: .*\bdemo\b"
    ):
        load_recipe("nope")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="YAML syntax error"):
        load_recipe(path)


def test_shipped_recipes_are_valid():
    for name in ("demo", "alphaalign-qwen", "alphaalign-zero"):
        assert isinstance(load_recipe(ROOT / "recipes" / f"{name}.yaml"), Recipe)


def test_alphaalign_zero_differs_from_alphaalign_qwen3b_in_its_rewards_and_base_model():
    full = load_recipe(ROOT / "recipes" / "alphaalign-qwen3b.yaml").model_dump()
    zero = load_recipe(ROOT / "recipes" / "alphaalign-zero.yaml").model_dump()
    assert [r["name"] for r in full["rewards"]] == ["alphaalign_safety", "helpfulness_rm"]
    assert zero["rewards"] == full["rewards"][:1]
    assert (full["model"]["name_or_path"], zero["model"]["name_or_path"]) == (
        "Qwen/Qwen2.5-3B-Instruct",
        "Qwen/Qwen2.5-3B",
    )
    for recipe in (full, zero):
        del recipe["rewards"], recipe["trainer"]["output_dir"], recipe["logging"]["run_name"]
        del recipe["model"]["name_or_path"]
    assert zero == full


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["model.dtype=bfloat16"], "weight larger than 5.1e-04"),  # 2^9 × lr 1e-6
        (["model.dtype=float16", "trainer.learning_rate=1e-5"], "weight larger than 4.1e-02"),
        (["model.dtype=bfloat16", "trainer.deepspeed=zero2"], None),  # float32 master weights
        (["model.dtype=bfloat16", "model.lora={r: 8}"], None),  # the adapters train in float32
        (["model.autocast=bfloat16"], None),
    ],
)
def test_validate_warns_when_updates_round_away_on_low_precision_weights(
    write_recipe, capsys, overrides, warned
):
    from alphaalign.cli import main

    path = write_recipe()
    assert main(["validate", str(path), "trainer.learning_rate=1e-6", *overrides]) == 0
    err = capsys.readouterr().err
    if warned is None:
        assert "warning" not in err
    else:
        assert err.count("\n") == 1 and err.startswith(f"warning: {path}: model.dtype: ") and warned in err
