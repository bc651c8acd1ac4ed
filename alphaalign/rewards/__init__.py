"""Reward functions and the verifiers they are built on; importing registers the built-ins."""

from alphaalign.rewards import alphaalign_safety as _alphaalign_safety  # noqa: F401  (registers)
from alphaalign.rewards import csrm as _csrm  # noqa: F401  (registers)
from alphaalign.rewards import helpfulness as _helpfulness  # noqa: F401  (registers)
from alphaalign.rewards import overlong as _overlong  # noqa: F401  (registers)
from alphaalign.rewards.registry import (
    UnknownRewardError,
    check_reward_args,
    register_reward,
    resolve_reward,
    reward_names,
)
from alphaalign.rewards.verifiers import is_refusal, parse_alphaalign, refusal_of

__all__ = [
    "UnknownRewardError",
    "check_reward_args",
    "is_refusal",
    "parse_alphaalign",
    "refusal_of",
    "register_reward",
    "resolve_reward",
    "reward_names",
]
