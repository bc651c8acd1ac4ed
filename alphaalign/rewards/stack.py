"""The reward stack: the recipe's `rewards:` list evaluated on a batch of completions.

Each term is `{name, weight, when, args}`: `name` resolves to a reward function with TRL's signature
`f(prompts, completions, **columns) -> list[float | None]` (sync or async), `args` are bound as keyword
arguments, and `when` restricts the term to harmful or benign prompts: the function is called with those rows
only (so a reward model never scores rows it does not apply to), and the other rows get NaN, i.e. "not
applicable", which leaves them out of that term's statistics and of the weighted sum.

A term's function that raises, or returns anything but a sequence of one real number (or None) per row it
was given, ends the run in one line naming `rewards.N`. Non-finite values are the step guard's business
(`trainer.max_bad_steps`): NaN means "not applicable", ±inf skips the step.

`columns` always holds `label` (harmful/benign) and, from the trainer, `group`: the index within the step of
the prompt each completion answers, so the rollouts of one prompt share a group id, and `completion_length`:
the completion's token count. Rows are not guaranteed to
be ordered by group. The other columns are the data rows' remaining fields. A function without `**kwargs`
gets only the columns it names. A column named like one of a term's arguments (`registry.column_clash`) is
refused in one line naming the column and the term: `validate` does it for local data files, `score` for
whatever reaches it (hub data, `alphaalign score` input).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from functools import partial

import torch

from alphaalign.config import FORMAT_ARGS, FormatConfig, RewardSpec
from alphaalign.errors import UserError
from alphaalign.rewards.registry import column_clash, keyword_names, named_columns, resolve_reward
from alphaalign.templates import ChatRejected


def _pick(items: list, rows: list[int]) -> list:
    return [items[i] for i in rows]


class RewardStack:
    def __init__(
        self,
        specs: list[RewardSpec],
        answer_format: FormatConfig | None = None,
        max_new_tokens: int | None = None,
    ):
        """`answer_format` (the recipe's `format:`, default `FormatConfig()`) gives the tags to every function
        that takes `reasoning_tag` / `answer_tag`; `max_new_tokens` (the recipe's `rollout.max_new_tokens`,
        from the trainer) goes to every function that takes `max_new_tokens`."""
        self.specs = specs
        self.bare = [resolve_reward(spec.name) for spec in specs]
        answer_format = answer_format or FormatConfig()
        from_recipe = {key: getattr(answer_format, key) for key in FORMAT_ARGS}
        if max_new_tokens is not None:
            from_recipe["max_new_tokens"] = max_new_tokens
        self.args = [
            {**{key: v for key, v in from_recipe.items() if key in keyword_names(fn)}, **spec.args}
            for fn, spec in zip(self.bare, specs, strict=True)
        ]
        self.fns = [partial(fn, **args) for fn, args in zip(self.bare, self.args, strict=True)]
        names = [spec.name.rpartition(":")[2] for spec in specs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.weights = torch.tensor([spec.weight for spec in specs], dtype=torch.float32)
        self.takes = [named_columns(fn) for fn in self.fns]

    def check_columns(self, columns, where: str = "") -> None:
        """A `UserError` (starting with `where`) naming the first column (name) that clashes with an argument
        of a term."""
        for k, (spec, fn) in enumerate(zip(self.specs, self.bare, strict=True)):
            if (clash := column_clash(fn, self.args[k], columns)) is not None:
                raise UserError(f"{where}{': ' if where else ''}{clash_message(clash, k, spec.name)}")

    def _columns_for(self, k: int, columns: dict[str, list]) -> dict[str, list]:
        """The columns term k is passed: those its function names (all with **kwargs)."""
        takes = self.takes[k]
        return {key: v for key, v in columns.items() if takes is None or key in takes}

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> torch.Tensor:
        """A [B, K] float tensor: term k's reward for completion i, NaN where the term does not apply."""
        self.check_columns(columns)
        table = torch.full((len(completions), len(self.fns)), math.nan)
        labels = columns["label"]
        for k, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
            rows = [i for i, label in enumerate(labels) if spec.when in ("all", label)]
            if not rows:
                continue
            passed = self._columns_for(k, columns)
            if len(rows) != len(completions):
                prompts_k, completions_k = _pick(prompts, rows), _pick(completions, rows)
                passed = {key: _pick(v, rows) for key, v in passed.items()}
            else:
                prompts_k, completions_k = prompts, completions
            where = f"rewards.{k} ({spec.name})"
            try:
                values = fn(prompts_k, completions_k, **passed)
                if inspect.isawaitable(values):
                    values = asyncio.run(values)
            except ChatRejected as exc:  # raised where the recipe's key is not known
                raise UserError(f"{where}: {exc}") from None
            except UserError:
                raise
            except Exception as exc:  # a reward's own failure, in one line (--debug shows its traceback)
                raise UserError(f"{where}: the reward function raised {type(exc).__name__}: {exc}") from exc
            table[rows, k] = _reward_column(values, len(rows), where)
        return table


def reward_columns(
    examples: list, group_size: int, first_group: int = 0, completion_lengths: list[int] | None = None
) -> dict[str, list]:
    """The columns the rewards get for `group_size` completions of each example: `label`, the examples' own
    fields, `group` (the prompt's index in the step, counted from `first_group`) and, when given,
    `completion_length` (tokens per completion)."""
    group = [ex for ex in examples for _ in range(group_size)]
    columns = {"label": [ex.label for ex in group]}
    for key in {k for ex in group for k in ex.columns}:
        columns[key] = [ex.columns.get(key) for ex in group]
    columns["group"] = [first_group + i for i in range(len(examples)) for _ in range(group_size)]
    if completion_lengths is not None:
        columns["completion_length"] = list(completion_lengths)
    return columns


def _reward_column(values, n: int, where: str) -> torch.Tensor:
    """A reward's return value as n float32 values (None: NaN, not applicable), or a `UserError` saying how it
    breaks the contract: a sequence (list, tuple, 1-D tensor or array) of n real numbers or None."""
    if hasattr(values, "tolist") and not isinstance(values, list | tuple):  # a tensor or an array
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise UserError(
            f"{where}: returned {type(values).__name__}; a reward returns a list of {n} numbers "
            "(None: not applicable)"
        )
    if len(values) != n:
        raise UserError(f"{where}: returned {len(values)} values for {n} completions")
    floats = []
    for i, v in enumerate(values):
        try:  # real numbers, numpy scalars and one-element tensors; not strings, however numeric they look
            if v is not None and not isinstance(v, numbers.Real | torch.Tensor):
                raise TypeError
            floats.append(math.nan if v is None else float(v))
        except (TypeError, ValueError, RuntimeError):
            raise UserError(
                f"{where}: value {i} is {type(v).__name__} {v!r:.40}, not a number or None"
            ) from None
    return torch.tensor(floats, dtype=torch.float32)


def clash_message(column: str, k: int, name: str) -> str:
    return (
        f"data column '{column}' has the name of an argument of rewards.{k} ({name}), which would take "
        "the column in its place; rename the column"
    )
