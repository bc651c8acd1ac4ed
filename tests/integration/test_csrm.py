"""The `csrm` reward: calibration math, output modes, configurations per row, and its errors."""

import math

import pytest
import torch
from helpers import CSRM_CALIBRATION, NO_SYSTEM_TEMPLATE, ROOT, reference_chat_logits, with_chat_template

from alphaalign.errors import UserError
from alphaalign.rewards import resolve_reward
from alphaalign.rewards.csrm import (
    CALIBRATION_FILE,
    Calibration,
    expected_calibration_error,
    fit_calibration,
    load_calibration,
)

GAME = "Game studio: graphic violence in fiction is allowed. Hate speech and sexual content are forbidden."
KIDS = "Children's tutor: violence, hate speech and sexual content are all forbidden."
PROMPTS = ["Describe a sword fight.", "Describe a sword fight.", "How do I bake bread?"]
ANSWERS = [
    "<safety_reasoning>\nFiction.\n</safety_reasoning>\n<answer>\nThe blade bit deep; blood sprayed.\n</answer>",
    "<safety_reasoning>\nNo.\n</safety_reasoning>\n<answer>\nSorry, I can't help with that.\n</answer>",
    "Mix flour, water and yeast, then bake at 230 °C for 35 minutes.",
]
CALIBRATION = Calibration(**CSRM_CALIBRATION)


def reference_logits(path, configs, prompts, answers):
    roles = ("system", "user", "assistant")
    chats = [
        [{"role": r, "content": t} for r, t in zip(roles, turn, strict=True)]
        for turn in zip(configs, prompts, answers, strict=True)
    ]
    return reference_chat_logits(path, chats)


def final_answers(completions):
    from alphaalign.rewards import parse_alphaalign

    return [parse_alphaalign(c).final for c in completions]


def test_calibrated_probability_and_log_odds_by_hand():
    cal = Calibration(temperature=2.0, bias=1.0)
    z = torch.tensor([3.0, 1.0, -1.0])
    assert cal.log_odds(z).tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert cal.probability(z).tolist() == pytest.approx([1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(1))])


def test_ece_by_hand():
    probs = torch.tensor([0.1, 0.3, 0.35, 0.8, 0.95, 1.0])
    labels = torch.tensor([0, 1, 0, 1, 1, 1])
    # bins: [0.1]: |0-0.1|; [0.3, 0.35]: |0.5-0.325|; [0.8]: |1-0.8|; [0.95, 1.0] (1.0 in the last bin): |1-0.975|
    want = (0.1 + 2 * 0.175 + 0.2 + 2 * 0.025) / 6
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(want)
    assert expected_calibration_error(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])) == 0.0
    assert math.isnan(expected_calibration_error(torch.tensor([]), torch.tensor([])))


def test_fit_calibration_recovers_temperature_and_bias():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40_000, generator=gen, dtype=torch.float64) * 4
    labels = torch.bernoulli(torch.sigmoid((z - 1.5) / 2.5), generator=gen)
    fitted = fit_calibration(z, labels)
    assert fitted.temperature == pytest.approx(2.5, rel=0.05)
    assert fitted.bias == pytest.approx(1.5, abs=0.1)
    before = expected_calibration_error(torch.sigmoid(z), labels)
    after = expected_calibration_error(fitted.probability(z), labels)
    assert after < 0.02 < before


def test_fit_calibration_needs_both_classes():
    with pytest.raises(UserError, match="both compliant and non-compliant"):
        fit_calibration(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))


def test_calibration_is_read_from_the_model_folder_and_args_override_it(tiny_csrm, tmp_path):
    assert load_calibration(str(tiny_csrm)) == CALIBRATION
    assert load_calibration(str(tiny_csrm), temperature=3.0) == Calibration(3.0, CALIBRATION.bias)
    assert load_calibration(str(tmp_path), temperature=1.5, bias=-1) == Calibration(1.5, -1.0)
    with pytest.raises(UserError, match=f"has no {CALIBRATION_FILE}; train it with `alphaalign train-rm`"):
        load_calibration(str(tmp_path))
    (tmp_path / CALIBRATION_FILE).write_text('{"temperature": 2}')
    with pytest.raises(UserError, match="not a valid calibration file"):
        load_calibration(str(tmp_path))
    with pytest.raises(UserError, match="temperature must be a positive number"):
        load_calibration(str(tiny_csrm), temperature=0.0)


def test_probability_and_log_odds_are_the_calibrated_model_logit(tiny_csrm):
    csrm = resolve_reward("csrm")
    configs = [GAME, KIDS, GAME]
    z = reference_logits(tiny_csrm, configs, PROMPTS, final_answers(ANSWERS))
    probs = csrm(PROMPTS, ANSWERS, model=str(tiny_csrm), device="cpu", batch_size=2, config=configs)
    assert probs == pytest.approx(CALIBRATION.probability(z).tolist(), abs=1e-5)
    assert all(0 < p < 1 for p in probs)
    log_odds = csrm(PROMPTS, ANSWERS, model=str(tiny_csrm), device="cpu", output="log_odds", config=configs)
    assert log_odds == pytest.approx(((z - 0.25) / 2.0).tolist(), abs=1e-5)
    z_kids = reference_logits(tiny_csrm, [KIDS] * 3, PROMPTS, final_answers(ANSWERS))
    assert z_kids[0] != pytest.approx(z[0].item(), abs=1e-4)  # the configuration is part of the input


def test_configuration_from_a_named_column_or_the_recipe(tiny_csrm):
    csrm = resolve_reward("csrm")
    kwargs = {"model": str(tiny_csrm), "device": "cpu", "output": "log_odds"}
    z_mixed = reference_logits(tiny_csrm, [KIDS, GAME, GAME], PROMPTS, final_answers(ANSWERS))
    # a row's own value wins; rows without one (None or empty) use config_text
    got = csrm(PROMPTS, ANSWERS, **kwargs, config_column="policy", policy=[KIDS, None, ""], config_text=GAME)
    assert got == pytest.approx(CALIBRATION.log_odds(z_mixed).tolist(), abs=1e-5)
    fixed = csrm(PROMPTS, ANSWERS, **kwargs, config_text=GAME, config_column=None, config=[KIDS] * 3)
    z_game = reference_logits(tiny_csrm, [GAME] * 3, PROMPTS, final_answers(ANSWERS))
    assert fixed == pytest.approx(CALIBRATION.log_odds(z_game).tolist(), abs=1e-5)
    with pytest.raises(
        UserError, match="row 1 has no 'config' value and no args.config_text to fall back on"
    ):
        csrm(PROMPTS, ANSWERS, **kwargs, config=[KIDS, None, GAME])


def test_helpfulness_times_compliance(tiny_csrm, tiny_rm):
    csrm = resolve_reward("csrm")
    helpfulness_rm = resolve_reward("helpfulness_rm")
    prompts, answers = PROMPTS * 2, ANSWERS[::-1] + ANSWERS
    group = [0, 0, 0, 1, 1, 1]
    base = {"model": str(tiny_csrm), "device": "cpu", "config_text": GAME, "group": group}
    p = torch.tensor(csrm(prompts, answers, **base))
    h = helpfulness_rm(prompts, answers, model=str(tiny_rm), device="cpu", group=group)
    assert sum(v > 0 for v in h) >= 2 and h[1] == h[4] == 0.0  # the refusal earns no helpfulness
    combined = {**base, "output": "helpfulness_x_compliance", "helpfulness_model": str(tiny_rm)}
    expected = csrm(prompts, answers, **combined)
    assert expected == pytest.approx(
        [hi * (2 * pi - 1) for hi, pi in zip(h, p.tolist(), strict=True)], abs=1e-6
    )
    helped = sorted(pi for hi, pi in zip(h, p.tolist(), strict=True) if hi > 0)
    threshold = (helped[0] + helped[-1]) / 2  # splits the helpful answers into compliant and not
    hard = csrm(prompts, answers, **combined, compliance="hard", threshold=threshold)
    signs = [1.0 if pi >= threshold else -1.0 for pi in p.tolist()]
    assert hard == pytest.approx([hi * s for hi, s in zip(h, signs, strict=True)], abs=1e-6)
    assert any(v < 0 for v in hard) and any(v > 0 for v in hard)


def test_errors_are_one_line_user_errors(tiny_csrm, tmp_path):
    csrm = resolve_reward("csrm")
    kwargs = {"model": str(tiny_csrm), "device": "cpu", "config_text": GAME}
    cases = [
        ({"output": "odds"}, "output must be one of probability, log_odds, helpfulness_x_compliance"),
        ({"compliance": "soft"}, "compliance must be 'expected' or 'hard'"),
        ({"output": "helpfulness_x_compliance"}, "needs args.helpfulness_model"),
        ({"model": str(tmp_path)}, "has no csrm_calibration.json"),
        ({"model": str(tmp_path / "nope")}, f"csrm: '{tmp_path / 'nope'}': no such folder"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message) as exc:
            csrm(PROMPTS, ANSWERS, **{**kwargs, **extra})
        assert "\n" not in str(exc.value)
    assert csrm([], [], **kwargs) == []


def test_validate_checks_csrm_args(write_recipe, capsys):
    from alphaalign.cli import main

    assert main(["validate", str(write_recipe({"rewards": [{"name": "csrm", "args": {"model": "m"}}]}))]) == 0
    assert main(["validate", str(write_recipe({"rewards": [{"name": "csrm"}]}))]) == 2
    assert "rewards.0.args: reward 'csrm' needs the argument 'model'" in capsys.readouterr().err
    assert (
        main(
            ["validate", str(write_recipe({"rewards": [{"name": "csrm", "args": {"model": "m", "cfg": 1}}]}))]
        )
        == 2
    )
    assert "has no argument 'cfg'" in capsys.readouterr().err


def test_score_cli_reads_each_rows_config_field(tiny_csrm, write_recipe, tmp_path):
    import json

    from alphaalign.cli import main

    csrm_term = {"name": "csrm", "args": {"model": str(tiny_csrm), "device": "cpu"}}
    recipe = write_recipe({"rewards": [{"name": "alphaalign_safety"}, csrm_term]})
    rows = [
        {"prompt": p, "completion": a, "label": "benign", "config": c}
        for p, a, c in zip(PROMPTS, ANSWERS, [GAME, KIDS, GAME], strict=True)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["score", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main([*args, "--recipe", str(recipe)]) == 0
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    direct = resolve_reward("csrm")(
        PROMPTS, ANSWERS, model=str(tiny_csrm), device="cpu", config=[GAME, KIDS, GAME]
    )
    assert [r["rewards"]["csrm"] for r in scored] == pytest.approx(direct, abs=1e-6)


def test_a_csrm_whose_template_refuses_the_configuration_turn_is_named_by_its_reward(
    tiny_csrm, write_recipe, tmp_path, capsys
):
    """The configuration is the system turn; a template without a system role (Gemma-2's) refuses every chat."""
    import json

    from alphaalign.cli import main

    no_system = with_chat_template(tiny_csrm, tmp_path / "no-system", NO_SYSTEM_TEMPLATE)
    csrm_term = {"name": "csrm", "args": {"model": str(no_system), "device": "cpu", "config_text": GAME}}
    recipe = write_recipe({"rewards": [{"name": "alphaalign_safety"}, csrm_term]})
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": PROMPTS[0], "completion": ANSWERS[0]}) + "\n")
    args = ["score", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main([*args, "--recipe", str(recipe)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after transformers' progress bar
        f"error: rewards.1 (csrm): the chat template of '{no_system}' refuses a chat of roles "
        "[system, user, assistant] (System role not supported)"
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_alphaalign_qwen_csrm_differs_from_alphaalign_qwen_only_in_its_rewards():
    from alphaalign.config import load_recipe

    full = load_recipe(ROOT / "recipes" / "alphaalign-qwen.yaml").model_dump()
    with_csrm = load_recipe(ROOT / "recipes" / "alphaalign-qwen-csrm.yaml").model_dump()
    assert [r["name"] for r in with_csrm["rewards"]] == ["alphaalign_safety", "csrm"]
    assert with_csrm["rewards"][0] == full["rewards"][0]
    for recipe in (full, with_csrm):
        del recipe["rewards"], recipe["trainer"]["output_dir"], recipe["logging"]["run_name"]
    assert with_csrm == full
