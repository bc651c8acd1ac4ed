"""The rollout-engine interface: token-id prompts in, sampled completions with their log-probs out.

Engines: `transformers` (in-process `generate`) and `vllm_server` (vLLM's OpenAI-compatible servers with
weight sync). An engine owns no training state; the trainer tells it when the policy's weights changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0  # end-of-sequence is not sampled before this many tokens


@dataclass
class Rollouts:
    """`n` completions per prompt, grouped: completion j of prompt i is at index i*n + j."""

    prompt_ids: list[list[int]]  # one entry per completion (the prompt repeated n times)
    completion_ids: list[
        list[int]
    ]  # generated tokens, including the end-of-sequence token if one was produced
    logprobs: list[list[float]]  # the engine's log-prob of each completion token, after temperature scaling
    finish_reasons: list[str]  # 'stop' (end-of-sequence produced) or 'length' (max_new_tokens reached)
    policy_version: int  # the weights version that sampled these completions


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollouts: ...

    def update_weights(self, version: int) -> float:
        """Make the engine sample from the trainer's current policy, stamped `version`; returns the seconds
        spent moving weights (0 for the in-process engine, which shares them)."""
