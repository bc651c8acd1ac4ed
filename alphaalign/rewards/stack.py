"""The reward stack: the recipe's `rewards:` list evaluated on a batch of completions.

Each term is `{name, weight, when, args}`: `name` resolves to a reward function with TRL's signature
`f(prompts, completions, **columns) -> list[float | None]` (sync or async), `args` are bound as keyword
arguments, and `when` restricts the term to harmful or benign prompts: the function is called with those rows
only (so a reward model never scores rows it does not apply to), and the other rows get NaN, i.e. "not
applicable", which leaves them out of that term's statistics and of the weighted sum.

`columns` always holds `label` (harmful/benign) and, from the trainer, `group`: the index within the step of
the prompt each completion answers, so the rollouts of one prompt share a group id. Rows are not guaranteed to
be ordered by group. The other columns are the data rows' remaining fields. A function without `**kwargs`
gets only the columns it names, and a column with the name of one of the term's `args` is not passed (the
recipe's value wins).
"""

from __future__ import annotations

import asyncio
import inspect
import math
from functools import partial

import torch

from alphaalign.config import RewardSpec
from alphaalign.rewards.registry import named_columns, resolve_reward


def _pick(items: list, rows: list[int]) -> list:
    return [items[i] for i in rows]


class RewardStack:
    def __init__(self, specs: list[RewardSpec]):
        self.specs = specs
        self.fns = [partial(resolve_reward(spec.name), **spec.args) for spec in specs]
        names = [spec.name.rpartition(":")[2] for spec in specs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.weights = torch.tensor([spec.weight for spec in specs], dtype=torch.float32)
        self.takes = [named_columns(fn) for fn in self.fns]

    def _columns_for(self, k: int, columns: dict[str, list]) -> dict[str, list]:
        """The columns term k is passed: those its function names (all with **kwargs), minus its recipe args."""
        takes, args = self.takes[k], self.specs[k].args
        return {key: v for key, v in columns.items() if key not in args and (takes is None or key in takes)}

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> torch.Tensor:
        """A [B, K] float tensor: term k's reward for completion i, NaN where the term does not apply."""
        table = torch.full((len(completions), len(self.fns)), math.nan)
        labels = columns["label"]
        for k, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
            rows = [i for i, label in enumerate(labels) if spec.when in ("all", label)]
            if not rows:
                continue
            passed = self._columns_for(k, columns)
            if len(rows) == len(completions):
                values = fn(prompts, completions, **passed)
            else:
                values = fn(_pick(prompts, rows), _pick(completions, rows),
                            **{key: _pick(v, rows) for key, v in passed.items()})  # fmt: skip
            if inspect.isawaitable(values):
                values = asyncio.run(values)
            if len(values) != len(rows):
                raise RuntimeError(
                    f"reward '{spec.name}' returned {len(values)} values for {len(rows)} completions"
                )
            column = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
            table[rows, k] = column
        return table
