"""DAPO's overlong reward shaping (Yu et al., 2025, "soft overlong punishment") as a reward term.

A completion of L tokens, with L_max = `max_length` and L_buf = `buffer_length`:

    0                                  if L ≤ L_max − L_buf
    −penalty_factor · (L − (L_max − L_buf)) / L_buf   if L_max − L_buf < L ≤ L_max
    −penalty_factor                     if L > L_max

`max_length` defaults to the recipe's `rollout.max_new_tokens` (the trainer binds it), so completions that
run into the generation limit get the full penalty. Lengths are token counts, the trainer's
`completion_length` column; `alphaalign score` has none unless its input rows carry a `completion_length`.
"""

from __future__ import annotations

import numbers

from alphaalign.errors import UserError
from alphaalign.rewards.registry import register_reward


def overlong_penalty(length: int, max_length: int, buffer_length: int, penalty_factor: float) -> float:
    """The soft length penalty of one completion of `length` tokens (≤ 0)."""
    exceed = length - (max_length - buffer_length)
    if exceed <= 0:
        return 0.0
    return -penalty_factor * min(exceed / buffer_length, 1.0)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_overlong_args(args: dict, where: str) -> None:
    buffer_length, max_length = args.get("buffer_length"), args.get("max_length")
    if not _positive_int(buffer_length):
        raise UserError(f"{where}.buffer_length: must be a positive number of tokens, got {buffer_length!r}")
    if max_length is not None:
        if not _positive_int(max_length):
            raise UserError(f"{where}.max_length: must be a positive number of tokens, got {max_length!r}")
        if buffer_length > max_length:
            raise UserError(f"{where}.buffer_length: {buffer_length} is more than max_length ({max_length})")
    factor = args.get("penalty_factor", 1.0)
    if not isinstance(factor, numbers.Real) or isinstance(factor, bool) or factor < 0:
        raise UserError(f"{where}.penalty_factor: must be a number ≥ 0, got {factor!r}")


@register_reward("overlong_buffer", check=check_overlong_args)
def overlong_buffer(
    prompts: list[str],
    completions: list[str],
    *,
    buffer_length: int,
    penalty_factor: float = 1.0,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    completion_length: list[int] | None = None,
    **columns,
) -> list[float]:
    """`overlong_penalty` of each completion; `max_length` defaults to `max_new_tokens` (rollout.max_new_tokens)."""
    if completion_length is None:
        raise ValueError(
            "overlong_buffer needs the completions' token counts: the trainer passes them; for `alphaalign "
            "score`, give each row a completion_length"
        )
    limit = max_length if max_length is not None else max_new_tokens
    if limit is None:
        raise ValueError("overlong_buffer: give args.max_length (no rollout.max_new_tokens here)")
    if buffer_length > limit:
        raise ValueError(f"overlong_buffer: buffer_length {buffer_length} is more than max_length {limit}")
    return [overlong_penalty(int(n), limit, buffer_length, penalty_factor) for n in completion_length]
