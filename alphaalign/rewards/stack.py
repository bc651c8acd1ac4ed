"""The reward stack: the recipe's `rewards:` list evaluated on a batch of completions.

Each term is `{name, weight, when, args}`: `name` resolves to a reward function with TRL's signature
`f(prompts, completions, **columns) -> list[float | None]` (sync or async), `args` are bound as keyword
arguments, and `when` restricts the term to harmful or benign prompts (other rows get NaN, i.e. "not
applicable", and are left out of that term's statistics and of the weighted sum).
"""

from __future__ import annotations

import asyncio
import inspect
import math
from functools import partial

import torch

from alphaalign.config import RewardSpec
from alphaalign.rewards.registry import resolve_reward


class RewardStack:
    def __init__(self, specs: list[RewardSpec]):
        self.specs = specs
        self.fns = [partial(resolve_reward(spec.name), **spec.args) for spec in specs]
        names = [spec.name.rpartition(":")[2] for spec in specs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.weights = torch.tensor([spec.weight for spec in specs], dtype=torch.float32)

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> torch.Tensor:
        """A [B, K] float tensor: term k's reward for completion i, NaN where the term does not apply."""
        table = torch.full((len(completions), len(self.fns)), math.nan)
        labels = columns["label"]
        for k, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
            values = fn(prompts, completions, **columns)
            if inspect.isawaitable(values):
                values = asyncio.run(values)
            if len(values) != len(completions):
                raise RuntimeError(
                    f"reward '{spec.name}' returned {len(values)} values for {len(completions)} completions"
                )
            for i, value in enumerate(values):
                if value is not None and spec.when in ("all", labels[i]):
                    table[i, k] = float(value)
        return table
