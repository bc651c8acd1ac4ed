"""Reward registry: built-in rewards by name, or any ``"package.module:function"``.

A reward follows TRL's reward-function signature,
``fn(prompts, completions, **columns) -> list[float | None]``: ``columns`` are the dataset columns
plus ``label`` (harmful/benign) and, from the trainer, ``group`` (the prompt's index within the step: the
rollouts of one prompt share it; rows are not necessarily ordered by group) and ``completion_length`` (the
completion's token count), aligned with ``completions``;
``None`` means "not applicable". A recipe's ``args`` are bound with ``functools.partial`` by the caller.
A function without ``**kwargs`` is passed only the columns it names (``f(prompts, completions, label)``).

Columns and arguments share the keyword namespace, so a column may not take an argument's name: `prompts`
and `completions`, a recipe arg of the term, or any named parameter of a built-in reward other than the
trainer's columns (built-ins read data columns through ``**columns`` only). `column_clash` finds one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

RewardFn = Callable[..., list[float | None]]

_REWARDS: dict[str, RewardFn] = {}
_CHECKS: dict[RewardFn, Callable[[dict, str], None]] = {}  # a reward's own check of its args' values
_POSITIONAL = ("prompts", "completions")
COLUMNS_FROM_TRAINER = ("label", "group", "completion_length")


class UnknownRewardError(ValueError):
    """A reward name that is neither registered nor an importable ``module:function``."""


def register_reward(
    name: str, check: Callable[[dict, str], None] | None = None
) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; a registered reward must name all its recipe args.
    ``check(args, where)`` validates the values of its args (raising a `UserError` that starts with ``where``)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if _REWARDS.get(name, fn) is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name] = fn
        if check is not None:
            _CHECKS[fn] = check
        return fn

    return decorator


def reward_names() -> list[str]:
    """Names of the registered rewards, sorted."""
    return sorted(_REWARDS)


def resolve_reward(name: str) -> RewardFn:
    """Return the registered reward ``name``, or import ``"package.module:function"``."""
    if ":" not in name:
        if name in _REWARDS:
            return _REWARDS[name]
        known = ", ".join(reward_names()) or "none"
        raise UnknownRewardError(
            f"unknown reward {name!r}; built-in rewards: {known}; or give 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UnknownRewardError(f"reward {name!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownRewardError(f"reward {name!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise UnknownRewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UnknownRewardError(f"reward {name!r}: {module_name}.{attr} is not callable")
    return fn


def _keyword_names(params) -> list[str]:
    """The parameters other than prompts and completions that can be passed by keyword."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in params.items() if p.kind in keyword and n not in _POSITIONAL]


def named_columns(fn: RewardFn) -> set[str] | None:
    """The column names ``fn`` takes as keywords; None when it takes ``**kwargs`` (every column)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(_keyword_names(params))


def keyword_names(fn: RewardFn) -> set[str]:
    """The arguments ``fn`` names that a keyword can set (``**kwargs`` not counted)."""
    return set(_keyword_names(inspect.signature(fn).parameters))


def column_clash(fn: RewardFn, args: dict, columns) -> str | None:
    """The first of ``columns`` (names) that would be passed to ``fn`` in place of one of its arguments
    (crashing the call, or silently replacing the recipe's value or the default), or None."""
    taken = set(_POSITIONAL) | set(args)
    if fn in _REWARDS.values():
        taken |= set(_keyword_names(inspect.signature(fn).parameters)) - set(COLUMNS_FROM_TRAINER)
    return next((c for c in sorted(columns) if c in taken), None)


def _takes_two_positionals(params) -> bool:
    kinds = [p.kind for p in params.values()]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(k in positional for k in kinds) >= 2


def check_reward_args(fn: RewardFn, args: dict, where: str = "args") -> None:
    """Raise ValueError naming the first key of ``args`` that ``fn`` does not accept, or, for a registered
    reward, the first required argument that is missing.

    ``fn`` must take ``prompts`` and ``completions`` positionally; they are never recipe args. A function
    taking ``**kwargs`` accepts anything, except a registered reward: built-ins take ``**columns`` only to absorb TRL's dataset
    columns, so their recipe args are checked against their named parameters; their required keyword
    arguments other than the trainer's columns (``label``, ``group``) must be given, and a check registered
    with the reward validates their values (``where``, e.g. "recipe.yaml: rewards.0.args", starts its error).
    """
    params = inspect.signature(fn).parameters
    name = getattr(fn, "__name__", repr(fn))
    if not _takes_two_positionals(params):
        raise ValueError(f"reward {name!r} must take prompts and completions as its first two arguments")
    registered = fn in _REWARDS.values()
    if not registered and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    named = _keyword_names(params)
    for key in args:
        if key not in named:
            raise ValueError(
                f"reward {name!r} has no argument {key!r}; it accepts: {', '.join(named) or 'none'}"
            )
    if registered:
        for key, p in params.items():
            required = p.kind is p.KEYWORD_ONLY and p.default is p.empty
            if required and key not in COLUMNS_FROM_TRAINER and key not in args:
                raise ValueError(f"reward {name!r} needs the argument {key!r}")
        if fn in _CHECKS:
            _CHECKS[fn](args, where)
