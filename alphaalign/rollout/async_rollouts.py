"""The rollouts of the coming steps, generated ahead on a background thread when `rollout.async_steps` > 0.

With `async_steps: a`, after step k takes its batch the batches of steps k+1..k+a are requested at once;
the engine generates them (HTTP requests to the servers) while the trainer scores and updates step k. A
weight sync waits for in-flight generation, so a batch is sampled by exactly one policy version, at most
`a` versions older than the policy that consumes it. `async_steps: 0` generates inline, step by step.
Dynamic sampling (`algorithm.filter_groups`) takes further batches from the same queue within a step, so
prompts are consumed in the order they were drawn.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from alphaalign.rollout.base import Rollouts, SamplingParams


class RolloutQueue:
    def __init__(
        self,
        engine,
        draw,
        encode,
        n: int,
        sampling: SamplingParams,
        async_steps: int,
        resources: contextlib.ExitStack,
    ):
        """`draw()` returns the next step's examples, `encode(example)` its prompt token ids."""
        self.engine, self.draw, self.encode = engine, draw, encode
        self.n, self.sampling, self.async_steps = n, sampling, async_steps
        self.pending: deque = deque()  # (examples, future) of the steps after the current one
        self.pool = None
        if async_steps:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts")
            resources.callback(self.pool.shutdown, wait=True, cancel_futures=True)

    def next(self, steps_left: int) -> tuple[list, Rollouts]:
        """The current step's examples and rollouts; `steps_left` counts the current step."""
        if self.pool is None:
            examples = self.draw()
            return examples, self.engine.generate(self._prompts(examples), self.n, self.sampling)
        if not self.pending:
            self._submit()
        examples, future = self.pending.popleft()
        while len(self.pending) < min(self.async_steps, steps_left - 1):
            self._submit()
        return examples, future.result()

    @property
    def batches_ahead(self) -> int:
        """Batches drawn for steps not taken yet (a checkpoint records the data position without them; a
        batch's examples are this rank's slice of what was drawn, so the caller knows the batch's size)."""
        return len(self.pending)

    def _submit(self) -> None:
        examples = self.draw()
        future = self.pool.submit(self.engine.generate, self._prompts(examples), self.n, self.sampling)
        self.pending.append((examples, future))

    def _prompts(self, examples) -> list[list[int]]:
        return [self.encode(ex) for ex in examples]
