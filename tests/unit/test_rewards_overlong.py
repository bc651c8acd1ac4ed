"""DAPO's soft overlong penalty (`overlong_buffer`): the pure function, its recipe args, and the stack's inputs."""

import pytest

from alphaalign.config import RewardSpec
from alphaalign.errors import UserError
from alphaalign.rewards import check_reward_args, resolve_reward, reward_names
from alphaalign.rewards.overlong import overlong_penalty
from alphaalign.rewards.stack import RewardStack


@pytest.mark.parametrize(
    ("length", "factor", "expected"),
    [  # max_length 16, buffer 4: free up to 12 tokens, then -factor/4 per token, -factor from 16 on
        (0, 1.0, 0.0),
        (12, 1.0, 0.0),
        (13, 1.0, -0.25),
        (14, 1.0, -0.5),
        (15, 1.0, -0.75),
        (16, 1.0, -1.0),
        (20, 1.0, -1.0),
        (14, 0.5, -0.25),
        (16, 0.0, 0.0),
    ],
)
def test_penalty_is_zero_then_linear_down_to_the_factor(length, factor, expected):
    assert overlong_penalty(length, 16, 4, factor) == pytest.approx(expected, abs=1e-12)


def test_a_buffer_as_long_as_the_limit_penalises_from_the_first_token():
    assert [overlong_penalty(n, 8, 8, 2.0) for n in (0, 2, 8)] == [0.0, -0.5, -2.0]


def stack(args, max_new_tokens=16):
    return RewardStack([RewardSpec(name="overlong_buffer", args=args)], max_new_tokens=max_new_tokens)


def score(s, lengths):
    texts = ["x"] * len(lengths)
    columns = {"label": ["benign"] * len(lengths), "completion_length": lengths}
    return s.score(texts, texts, columns)[:, 0].tolist()


def test_the_stack_binds_max_new_tokens_and_passes_the_token_counts():
    assert "overlong_buffer" in reward_names()
    assert score(stack({"buffer_length": 4}), [10, 14, 16]) == [0.0, -0.5, -1.0]
    # an explicit max_length wins over rollout.max_new_tokens
    assert score(stack({"buffer_length": 4, "max_length": 12, "penalty_factor": 2.0}), [8, 9, 12]) == [
        0.0,
        -0.5,
        -2.0,
    ]


def test_without_token_counts_the_term_fails_in_one_line():
    s = stack({"buffer_length": 4})
    with pytest.raises(UserError, match=r"rewards.0 \(overlong_buffer\).*completion_length"):
        s.score(["p"], ["c"], {"label": ["benign"]})
    with pytest.raises(UserError, match="give args.max_length"):
        score(stack({"buffer_length": 4}, max_new_tokens=None), [3])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "needs the argument 'buffer_length'"),
        ({"buffer_length": 0}, "where.buffer_length: must be a positive number of tokens"),
        ({"buffer_length": 2.5}, "where.buffer_length: must be a positive number of tokens"),
        ({"buffer_length": 8, "max_length": 4}, "where.buffer_length: 8 is more than max_length"),
        ({"buffer_length": 4, "max_length": -1}, "where.max_length: must be a positive number"),
        ({"buffer_length": 4, "penalty_factor": -1}, "where.penalty_factor: must be a number ≥ 0"),
    ],
)
def test_bad_args_are_refused_naming_the_key(args, message):
    with pytest.raises((UserError, ValueError), match=message):
        check_reward_args(resolve_reward("overlong_buffer"), args, "where")
