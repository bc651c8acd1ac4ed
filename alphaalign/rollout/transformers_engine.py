"""In-process rollouts with transformers' `generate` on the policy being trained (it shares the weights).

Prompts are left-padded and batched; sampling uses one logits processor of ours that applies temperature,
top-k and top-p, and records log softmax(logits / T) of each sampled token, the same quantity the trainer
computes. Only one step of log-probs is held at a time, so memory does not grow with the vocabulary × length.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from alphaalign.rollout.base import Rollouts, SamplingParams


class _SampleAndRecord(LogitsProcessor):
    def __init__(self, sampling: SamplingParams):
        self.temperature = sampling.temperature
        self.warpers = []
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        self.steps: list[torch.Tensor] = []  # log-prob of the token sampled at each step, [B] per step
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self.steps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        scaled = scores.float() / self.temperature
        self._last = torch.log_softmax(scaled, dim=-1)
        for warper in self.warpers:
            scaled = warper(input_ids, scaled)
        return scaled

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[B, steps] log-probs once generation is over; `last_tokens` are the tokens of the final step."""
        if self._last is not None:
            self.steps.append(self._last.gather(1, last_tokens.unsqueeze(1)).squeeze(1))
        return torch.stack(self.steps, dim=1)


class TransformersEngine:
    def __init__(self, model, tokenizer, generation_batch_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.generation_batch_size = generation_batch_size
        self.version = 0
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, tokenizer.eos_token_id} - {None})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def update_weights(self, version: int) -> float:
        self.version = version  # the engine samples from the trainer's module itself
        return 0.0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollouts:
        out = Rollouts([], [], [], [], self.version)
        per_call = max(1, self.generation_batch_size // n)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), per_call):
                self._generate_chunk(prompts[start : start + per_call], n, sampling, out)
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams, out: Rollouts
    ) -> None:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        recorder = _SampleAndRecord(sampling)
        config = GenerationConfig(
            do_sample=True, max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            num_return_sequences=n,
            temperature=1.0, top_k=0, top_p=1.0, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
        )  # fmt: skip
        sequences = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )  # fmt: skip
        completions = sequences[:, width:].cpu()
        logprobs = recorder.finish(sequences[:, -1]).cpu()
        eos = torch.tensor(self.eos_ids)
        for row in range(completions.shape[0]):
            tokens = completions[row].tolist()
            stops = torch.isin(completions[row], eos).nonzero()
            length = int(stops[0]) + 1 if len(stops) else len(tokens)
            out.prompt_ids.append(list(prompts[row // n]))
            out.completion_ids.append(tokens[:length])
            out.logprobs.append(logprobs[row, :length].tolist())
            out.finish_reasons.append("stop" if len(stops) else "length")
