"""`alphaalign train-rm`: loss math, configuration-targeted augmentation, data errors, and a real tiny run."""

import json
import math
import random

import pytest
import torch
import yaml
from helpers import NO_SYSTEM_TEMPLATE, ROOT, with_chat_template

from alphaalign.cli import main
from alphaalign.config import load_recipe
from alphaalign.errors import UserError
from alphaalign.rm.data import (
    CategorizedPrompt,
    Response,
    augment,
    error_score,
    read_categorized,
    read_pairs,
    sample_allowed,
    split_by_prompt,
)
from alphaalign.rm.recipe import AugmentationConfig, RewardModelRecipe
from alphaalign.rm.train import bradley_terry_loss, calibration_loss

CSRM_DATA = ROOT / "recipes" / "data" / "csrm"
CATEGORIES = {
    "violence": "graphic violence",
    "hate": "hate speech",
    "sexual": "sexual content",
    "drugs": "drug use",
}
# a template that lets the tests read the allowed set back from the configuration text
TEMPLATE = "allowed={{ allowed | join(',') }}|forbidden={{ forbidden | join(',') }}"


def aug_config(**kw) -> AugmentationConfig:
    return AugmentationConfig(categories={name: name for name in CATEGORIES}, templates=[TEMPLATE], **kw)


def allowed_of(config: str) -> frozenset[str]:
    allowed = config.split("|")[0].removeprefix("allowed=")
    return frozenset(filter(None, allowed.split(",")))


def demo_items():
    return read_categorized(CSRM_DATA / "train_categorized.jsonl", CATEGORIES)


def compiled_template():
    import jinja2

    return [jinja2.Environment().from_string(TEMPLATE)]


def test_bradley_terry_and_calibration_losses_by_hand():
    bt = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert float(bt) == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2)
    cal = calibration_loss(torch.tensor([0.0, 2.0]), torch.tensor([True, False]))
    assert float(cal) == pytest.approx((math.log(2) + math.log(1 + math.exp(2))) / 2)


def test_sampled_configurations_follow_their_mode():
    rng = random.Random(0)
    every = list(CATEGORIES)
    for requested in (frozenset({"violence"}), frozenset({"violence", "hate"})):
        for _ in range(200):
            assert sample_allowed("exact_match", requested, every, rng) == requested
            assert sample_allowed("safe", requested, every, rng) == frozenset()
            assert sample_allowed("superset", requested, every, rng) > requested
            assert not sample_allowed("not_superset", requested, every, rng) >= requested
    assert sample_allowed("not_superset", frozenset(), every, rng) is None  # ∅ is allowed by every set
    assert sample_allowed("superset", frozenset(every), every, rng) is None


def test_error_score_by_hand():
    aug = aug_config()
    response = Response("x", frozenset({"violence", "hate"}), True)
    assert error_score(response, frozenset({"violence"}), aug) == pytest.approx(0.1 + 3.0)
    assert error_score(Response("no", frozenset(), False), frozenset(), aug) == 1.0


def test_augmented_pairs_keep_the_severity_order_and_compliance_labels():
    aug = aug_config()
    rng = random.Random(0)
    n_pairs = 0
    for item in demo_items():
        pairs, labelled = augment(item, aug, compiled_template(), rng)
        by_text = {r.text: r for r in item.responses}
        for pair in pairs:
            allowed = allowed_of(pair.config)
            chosen, rejected = by_text[pair.chosen], by_text[pair.rejected]
            assert error_score(chosen, allowed, aug) < error_score(rejected, allowed, aug)
            assert chosen.categories <= allowed  # a chosen response never violates its configuration
        for x in labelled:
            categories = item.categories if x.answer is None else by_text[x.answer].categories
            assert x.compliant == (categories <= allowed_of(x.config))
        assert sum(x.answer is None for x in labelled) == len({x.config for x in labelled})  # prompt_labels
        n_pairs += len(pairs)
    assert n_pairs > 100


def test_the_same_answer_is_chosen_or_rejected_depending_on_the_configuration():
    """Configuration-targeted: a violent answer beats a refusal where violence is allowed and loses to it
    where it is forbidden; a non-violent answer beats the refusal everywhere."""
    violent, clean, refusal = "blood everywhere", "they fought", "I can't help."
    item = CategorizedPrompt(
        "Write the fight.",
        frozenset({"violence"}),
        (
            Response(violent, frozenset({"violence"}), True),
            Response(clean, frozenset(), True),
            Response(refusal, frozenset(), False),
        ),
    )
    pairs, _ = augment(item, aug_config(configs_per_prompt=8), compiled_template(), random.Random(1))
    order = {(allowed_of(p.config), p.chosen, p.rejected) for p in pairs}
    configs = {allowed for allowed, _, _ in order}
    assert any("violence" in a for a in configs) and any("violence" not in a for a in configs)
    for allowed in configs:
        if "violence" in allowed:
            assert {(allowed, violent, refusal), (allowed, clean, violent)} <= order
        else:
            assert {(allowed, refusal, violent), (allowed, clean, violent)} <= order
        assert (allowed, clean, refusal) in order
        assert (allowed, refusal, clean) not in order


def test_augmentation_is_seeded():
    items = demo_items()[:5]
    run = lambda seed: [augment(i, aug_config(), compiled_template(), random.Random(seed)) for i in items]  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_held_out_prompts_are_disjoint_from_training():
    pairs, labelled = read_pairs(CSRM_DATA / "train_pairs.jsonl")
    train_p, train_l, held_p, held_l = split_by_prompt(pairs, labelled, 0.25, seed=0)
    assert train_p and held_p and len(train_p) + len(held_p) == len(pairs)
    assert not {x.prompt for x in train_p + train_l} & {x.prompt for x in held_p + held_l}
    with pytest.raises(UserError, match="at least 2 distinct prompts"):
        split_by_prompt(pairs[:1], [], 0.25, seed=0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "p", "categories": ["gore"], "responses": []},
            "'responses' must be a list of at least 2",
        ),
        (
            {"prompt": "p", "categories": ["gore"], "responses": [{"text": "a", "addresses": True}] * 2},
            "unknown risk category 'gore'; augmentation.categories has: violence, hate, sexual, drugs",
        ),
        (
            {"prompt": "p", "responses": [{"text": "a"}, {"text": "b", "addresses": True}]},
            "responses.0: 'addresses' (true or false) is required",
        ),
        (
            {"prompt": "", "responses": [{"text": "a", "addresses": True}] * 2},
            "'prompt' must be a non-empty string",
        ),
    ],
)
def test_bad_categorized_rows_name_the_file_and_line(tmp_path, row, message):
    path = tmp_path / "c.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"c.jsonl:2: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        read_categorized(path, CATEGORIES)


def test_bad_pair_rows_and_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"config": "c", "prompt": "p", "chosen": "a", "rejected": "b", "chosen_compliant": "yes"})
    )
    with pytest.raises(UserError, match="p.jsonl:1: 'chosen_compliant' must be true or false, got 'yes'"):
        read_pairs(path)
    path.write_text(json.dumps({"config": "c", "prompt": "p", "chosen": "a"}))
    with pytest.raises(UserError, match="p.jsonl:1: 'rejected' must be a non-empty string"):
        read_pairs(path)
    with pytest.raises(UserError, match="nope.jsonl: data file not found"):
        read_pairs(tmp_path / "nope.jsonl")


def test_pair_files_with_other_column_names(tmp_path):
    row = {"system_prompt": "c", "prompt": "p", "chosen_response": "a", "rejected_response": "b", "ok": False}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    fields = {
        "config": "system_prompt",
        "chosen": "chosen_response",
        "rejected": "rejected_response",
        "rejected_compliant": "ok",
    }
    pairs, labelled = read_pairs(tmp_path / "p.jsonl", fields)
    assert [(p.config, p.prompt, p.chosen, p.rejected) for p in pairs] == [("c", "p", "a", "b")]
    assert [(x.answer, x.compliant) for x in labelled] == [("b", False)]
    with pytest.raises(UserError, match="p.jsonl:1: 'config' must be a non-empty string"):
        read_pairs(tmp_path / "p.jsonl")


def test_recipe_errors_name_the_file_and_key(tmp_path, capsys):
    def fails(recipe: dict, message: str, *overrides):
        path = tmp_path / "rm.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["train-rm", str(path), *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    base = {"model": {"name_or_path": "m"}, "data": {"pairs": ["p.jsonl"]}}
    fails({"model": {"name_or_path": "m"}}, "rm.yaml: data: required key is missing")
    fails({**base, "data": {}}, "data: give at least one file in 'pairs' or 'categorized'")
    fails(
        {**base, "data": {"categorized": ["c.jsonl"]}},
        "augmentation.categories: data.categorized needs the risk categories",
    )
    fails(
        base,
        "override 'augmentation.beta=1.0': augmentation.beta: must exceed unaddressed (1.0)",
        "augmentation.beta=1.0",
    )
    fails(base, "override 'training.epoch=2': training.epoch: unknown key", "training.epoch=2")
    fails(base, "p.jsonl: data file not found")
    fails(base, "data.pair_fields: unknown key 'answer'", "data.pair_fields={answer: text}")
    fails(
        {**base, "augmentation": {"templates": ["{{ nope }}"]}},
        "augmentation.templates.0: 'nope' is undefined",
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real train-rm run, given as command-line keys only, on a small slice of the demo data."""
    tmp = tmp_path_factory.mktemp("train-rm")
    rows = (CSRM_DATA / "train_categorized.jsonl").read_text().splitlines()
    (tmp / "cat.jsonl").write_text("\n".join(rows[::3]) + "\n")  # 12 prompts, every category
    categories = json.dumps(CATEGORIES)
    args = [
        f"model.name_or_path={tmp / 'base'}",
        "model.build=demo",
        "model.max_length=128",
        f"data.categorized=[{tmp / 'cat.jsonl'}]",
        f"augmentation.categories={categories}",
        "augmentation.configs_per_prompt=2",
        "training.learning_rate=5e-3",
        "training.epochs=5",
        "training.batch_size=32",
        "training.device=cpu",
        f"training.output_dir={tmp / 'csrm'}",
        "data.heldout_fraction=0.3",
    ]
    assert main(["train-rm", *args]) == 0
    return tmp / "csrm", args


@pytest.mark.slow
def test_train_rm_lowers_the_loss_and_ranks_its_train_pairs_better(trained):
    out, _ = trained
    summary = json.loads((out / "train_rm_summary.json").read_text())
    before, after = summary["train_before"], summary["train_after"]
    assert after["bt_loss"] < before["bt_loss"] - 0.2
    assert after["pairwise_accuracy"] > max(before["pairwise_accuracy"] + 0.2, 0.75)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == summary["steps"]
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])


@pytest.mark.slow
def test_train_rm_saves_a_calibrated_model_the_csrm_reward_loads(trained):
    from alphaalign.rewards import resolve_reward
    from alphaalign.rewards.csrm import load_calibration

    out, _ = trained
    summary = json.loads((out / "train_rm_summary.json").read_text())
    calibration = load_calibration(str(out))
    assert summary["calibration"] == {"temperature": calibration.temperature, "bias": calibration.bias}
    assert summary["heldout"]["ece"] <= summary["heldout"]["ece_raw"] + 1e-9  # fitted on these labels
    probs = resolve_reward("csrm")(["q"], ["a"], model=str(out), device="cpu", config_text="c")
    assert 0 < probs[0] < 1


@pytest.mark.slow
def test_train_rm_will_not_overwrite_a_foreign_folder(trained, tmp_path, capsys):
    _, args = trained
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["train-rm", *args, f"training.output_dir={tmp_path}"]) == 2
    assert "exists and is not a train-rm output; choose another folder" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()


def test_unlabelled_held_out_prompts_fail_before_training(tmp_path, capsys):
    rows = [{"config": "c", "prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "model.name_or_path=never-loaded",
        f"data.pairs=[{tmp_path / 'p.jsonl'}]",
        f"training.output_dir={tmp_path / 'o'}",
    ]
    assert main(["train-rm", *args]) == 2
    assert (
        "data.heldout_fraction: the held-out prompts need compliant and non-compliant labels"
        in capsys.readouterr().err
    )


def test_a_base_model_whose_template_refuses_the_configuration_turn_fails_before_training(
    tiny_rm, tmp_path, capsys
):
    """The configuration is the system turn; Gemma-2's template, for one, has no system role."""
    base = with_chat_template(tiny_rm, tmp_path / "no-system", NO_SYSTEM_TEMPLATE)
    rows = [
        {"config": "c", "prompt": f"p{i}", "chosen": "a", "rejected": "b"}
        | {"chosen_compliant": True, "rejected_compliant": False}
        for i in range(10)
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        f"model.name_or_path={base}",
        f"data.pairs=[{tmp_path / 'p.jsonl'}]",
        f"training.output_dir={tmp_path / 'o'}",
        "training.device=cpu",
    ]
    assert main(["train-rm", *args]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after transformers' progress bar
        f"error: model.name_or_path: the chat template of '{base}' refuses a chat of roles "
        "[system, user, assistant] (System role not supported)"
    )
    assert not (tmp_path / "o" / "train_log.jsonl").exists()


def test_shipped_train_rm_recipes_load():
    for path in sorted((ROOT / "recipes" / "rm").glob("*.yaml")):
        recipe = load_recipe(path, schema=RewardModelRecipe)
        assert recipe.data.pairs or recipe.data.categorized
