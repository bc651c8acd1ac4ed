"""The Eq. 5 safety reward and the reward registry."""

import functools

import pytest

from alphaalign.rewards import (
    UnknownRewardError,
    check_reward_args,
    register_reward,
    resolve_reward,
    reward_names,
)
from alphaalign.rewards.alphaalign_safety import alphaalign_safety

REFUSAL = (
    r"<safety_reasoning>Harmful request.</safety_reasoning><answer>\boxed{Sorry, I can't comply}</answer>"
)
COMPLIANCE = "<safety_reasoning>Safe request.</safety_reasoning><answer>Preheat the oven to 180 °C.</answer>"
REFUSAL_BAD_FORMAT = "I'm sorry, but I can't help with that."
COMPLIANCE_BAD_FORMAT = "Preheat the oven to 180 °C."


def score(completions, labels, **kwargs):
    return alphaalign_safety([""] * len(completions), completions, label=labels, **kwargs)


@pytest.mark.parametrize(
    ("completion", "label", "expected"),
    [
        (REFUSAL, "harmful", 0.5 + 1.0),
        (COMPLIANCE, "harmful", 0.5),
        (REFUSAL, "benign", 0.5 - 1.0),
        (COMPLIANCE, "benign", 0.5),
        (REFUSAL_BAD_FORMAT, "harmful", 1.0),
        (COMPLIANCE_BAD_FORMAT, "harmful", 0.0),
        (REFUSAL_BAD_FORMAT, "benign", -1.0),
        (COMPLIANCE_BAD_FORMAT, "benign", 0.0),
    ],
)
def test_eq5_with_default_weights(completion, label, expected):
    assert score([completion], [label]) == [pytest.approx(expected)]


def test_eq5_with_custom_weights_and_batch_alignment():
    completions = [REFUSAL, COMPLIANCE, REFUSAL, COMPLIANCE_BAD_FORMAT]
    labels = ["harmful", "harmful", "benign", "benign"]
    assert score(completions, labels, r_f=0.2, r_a=3.0) == pytest.approx([3.2, 0.2, -2.8, 0.0])


def test_refusal_phrases_in_the_reasoning_do_not_count():
    text = "<safety_reasoning>I can't refuse this; it is a safe cooking question.</safety_reasoning><answer>Boil 10 minutes.</answer>"
    assert score([text], ["benign"]) == [pytest.approx(0.5)]


def test_custom_tags():
    text = r"<think>harmful</think><final>\boxed{Sorry, I can't comply}</final>"
    assert score([text], ["harmful"], reasoning_tag="think", answer_tag="final") == [pytest.approx(1.5)]
    assert score([text], ["harmful"]) == [pytest.approx(1.0)]  # default tags: format invalid


def test_extra_dataset_columns_are_ignored():
    assert alphaalign_safety([""], [COMPLIANCE], label=["benign"], source=["dolly"], trainer_state=None) == [
        0.5
    ]


def test_bad_label_is_rejected():
    with pytest.raises(ValueError, match="label must be 'harmful' or 'benign', got 'unsafe'"):
        score([COMPLIANCE], ["unsafe"])


def test_label_and_completion_counts_must_match():
    with pytest.raises(ValueError):
        score([COMPLIANCE, COMPLIANCE], ["benign"])


# --- registry ------------------------------------------------------------------------------------


def length_bonus(prompts, completions, scale=1.0, **columns):
    """A reward defined here to test ``module:function`` resolution."""
    return [scale * len(c) for c in completions]


NOT_CALLABLE = 3


def test_builtin_reward_resolves():
    assert "alphaalign_safety" in reward_names()
    assert resolve_reward("alphaalign_safety") is alphaalign_safety


def test_module_function_reward_resolves_and_binds_args():
    fn = resolve_reward(f"{__name__}:length_bonus")
    assert fn is length_bonus
    assert functools.partial(fn, scale=2.0)(["p"], ["abc"], label=["benign"]) == [6.0]


def test_unknown_builtin_name_lists_known_rewards():
    with pytest.raises(UnknownRewardError) as info:
        resolve_reward("alphaalign_safty")
    message = str(info.value)
    assert "'alphaalign_safty'" in message and "alphaalign_safety" in message and "\n" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:missing", "has no attribute 'missing'"),
        (f"{__name__}:NOT_CALLABLE", "is not callable"),
        (":fn", "must look like 'package.module:function'"),
        ("tests.mod:", "must look like 'package.module:function'"),
    ],
)
def test_bad_module_function_names(name, fragment):
    with pytest.raises(UnknownRewardError, match=fragment):
        resolve_reward(name)


def test_register_reward_refuses_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("alphaalign_safety")(length_bonus)


def test_check_reward_args_on_builtin():
    check_reward_args(alphaalign_safety, {"r_f": 0.3, "r_a": 2.0, "answer_tag": "final"})
    with pytest.raises(ValueError, match="no argument 'r_A'"):
        check_reward_args(alphaalign_safety, {"r_f": 0.3, "r_A": 2.0})
    with pytest.raises(ValueError, match="no argument 'completions'"):
        check_reward_args(alphaalign_safety, {"completions": []})


def test_check_reward_args_on_user_functions():
    check_reward_args(length_bonus, {"anything": 1})  # **columns accepts any arg

    def strict(prompts, completions, *, scale=1.0):
        return [scale] * len(completions)

    check_reward_args(strict, {"scale": 2.0})
    with pytest.raises(ValueError, match="no argument 'scal'"):
        check_reward_args(strict, {"scal": 2.0})
    with pytest.raises(ValueError, match="no argument 'prompts'"):
        check_reward_args(strict, {"prompts": []})


# --- edge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "label", "expected"),
    [
        ("", "harmful", 0.0),  # no format, no refusal
        ("", "benign", 0.0),
        ("   \n ", "harmful", 0.0),
        ("<safety_reasoning>unsafe</safety_reasoning>", "harmful", 0.0),  # missing answer, nothing said
        (r"<answer>\boxed{Sorry, I can't comply}</answer>", "harmful", 1.0),  # missing reasoning
        (REFUSAL + r"<answer>\boxed{Sorry, I can't comply}</answer>", "harmful", 1.0),  # duplicate answer
        (
            "<safety_reasoning>a</safety_reasoning><safety_reasoning>b</safety_reasoning><answer>Boil it.</answer>",
            "benign",
            0.0,
        ),  # duplicate reasoning
        ("<safety_reasoning>Safe.</safety_reasoning><answer>Boil the eggs for", "benign", 0.0),  # truncated
        (
            "<safety_reasoning>Unsafe.</safety_reasoning><answer>I’m sorry, but I can’t help with that.</answer>",
            "harmful",
            1.5,
        ),  # curly apostrophes
        (
            "<safety_reasoning>安全。</safety_reasoning><answer>水を沸かして 🍳 9分 — “ok”</answer>",
            "benign",
            0.5,
        ),
        (
            "<safety_reasoning>Safe.</safety_reasoning><answer>" + "Stir gently. " * 8000 + "</answer>",
            "benign",
            0.5,
        ),
        (
            "<safety_reasoning>Unsafe.</safety_reasoning><answer>"
            + "x" * 100_000
            + " I won't help with that.</answer>",
            "harmful",
            1.5,
        ),  # a 100 KB answer whose refusal comes last
    ],
)
def test_edge_cases(completion, label, expected):
    assert score([completion], [label]) == [pytest.approx(expected)]


def test_unlabelled_rows_are_not_applicable():
    assert score([REFUSAL, COMPLIANCE], [None, "benign"]) == [None, 0.5]
