"""In-process rollouts with transformers' `generate` on the policy being trained (it shares the weights).

Prompts are left-padded and batched. Each prompt's tokens but the last go through the model once and their
cache is repeated for its `n` completions, into buffers with room for the new tokens (`ReservedLayer`).
Sampling happens in one logits processor of ours: temperature, top-k and top-p, then one uniform draw per row
against the cumulative distribution (torch.multinomial is far slower on CPU; docs/design.md); `generate` runs
in greedy mode and takes the one token the processor left. The processor records log softmax(logits / T) of
each sampled token, the same quantity the trainer computes.

`static_cache` (`rollout.static_cache`) trades the shared prompt pass for transformers' fixed-size cache, with
prompts left-padded to a power of two of at least 64 tokens (`static_width`) so that few cache sizes occur,
each compiled once: on CUDA, transformers compiles the decode step and replays it as a CUDA graph, which
removes the per-kernel launch cost of the eager loop (docs/gpu.md, section 3). On CPU it runs eagerly and
is slower than the shared prompt cache (docs/gpu.md, section 3).
"""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from alphaalign.models import prompt_cache
from alphaalign.rollout.base import Rollouts, SamplingParams


def sample_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax(`logits`) by inverse transform sampling: [B, V] -> [B]."""
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    draws = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    # right=True: a token whose probability is 0 (a flat step of the CDF) can never be drawn
    return torch.searchsorted(cdf, draws, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


class ReservedLayer(DynamicLayer):
    """A cache layer whose keys and values sit in buffers with room for `extra` more positions: a decode step
    writes its position in place, where `DynamicLayer` copies the whole cache into a new tensor (`torch.cat`)
    at every step (docs/design.md). Past the room it falls back to `DynamicLayer`'s copying."""

    def __init__(self, layer: DynamicLayer, extra: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True
        batch, heads, length, dim = layer.keys.shape
        self.buffers = (
            layer.keys.new_empty(batch, heads, length + extra, dim),
            layer.values.new_empty(batch, heads, length + extra, dim),
        )
        self.buffers[0][:, :, :length] = layer.keys
        self.buffers[1][:, :, :length] = layer.values
        self.keys, self.values = self.buffers[0][:, :, :length], self.buffers[1][:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.buffers[0].shape[-2]:
            return super().update(key_states, value_states)
        self.buffers[0][:, :, start:end] = key_states
        self.buffers[1][:, :, start:end] = value_states
        self.keys, self.values = self.buffers[0][:, :, :end], self.buffers[1][:, :, :end]
        return self.keys, self.values


def reserve(cache: DynamicCache, extra: int) -> DynamicCache:
    """`cache` with its full-attention layers moved into `ReservedLayer`s with room for `extra` more positions
    (other kinds, such as sliding-window layers, stay as they are)."""
    cache.layers = [
        ReservedLayer(layer, extra) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


class _SampleAndRecord(LogitsProcessor):
    def __init__(self, sampling: SamplingParams):
        self.temperature = sampling.temperature
        self.warpers = []
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        self.steps: list[torch.Tensor] = []  # log-prob of the token sampled at each step, [B] per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scaled = scores.float() / self.temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        for warper in self.warpers:
            scaled = warper(input_ids, scaled)
        tokens = sample_from_logits(scaled).unsqueeze(1)
        self.steps.append(logprobs.gather(1, tokens).squeeze(1))
        # greedy selection then takes exactly the sampled token
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)

    def logprobs(self) -> torch.Tensor:
        """[B, steps] log-probs of the sampled tokens."""
        return torch.stack(self.steps, dim=1)


def static_width(width: int) -> int:
    """The padded prompt width under a static cache: the next power of two, at least 64."""
    return max(64, 1 << (width - 1).bit_length())


class TransformersEngine:
    def __init__(self, model, tokenizer, generation_batch_size: int = 64, static_cache: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.generation_batch_size, self.static_cache = generation_batch_size, static_cache
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
        if self.static_cache:
            width = static_width(width)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        recorder = _SampleAndRecord(sampling)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            # transformers fills every unset field from the model's generation_config.json (Qwen2.5-Instruct's:
            # repetition_penalty 1.05, temperature 0.7, top_k 20, top_p 0.8); neutral values keep the samples
            # from the policy itself (the sampling ones are unused in greedy mode, and not warned about)
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            cache_implementation="static" if self.static_cache else None,
        )
        cache = None  # a single-token prompt has nothing to share: generate computes every row's cache
        if min(map(len, prompts)) > 1 and not self.static_cache:
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            cache = prompt_cache(self.model, input_ids[:, :-1], attention[:, :-1], positions[:, :-1])
            cache.batch_repeat_interleave(n)
            cache = reserve(cache, sampling.max_new_tokens)
        sequences = self.model.generate(
            input_ids=input_ids.repeat_interleave(n, 0),
            attention_mask=attention.repeat_interleave(n, 0),
            past_key_values=cache,
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        completions = sequences[:, width:].cpu()
        logprobs = recorder.logprobs().cpu()
        eos = torch.tensor(self.eos_ids)
        for row in range(completions.shape[0]):
            tokens = completions[row].tolist()
            stops = torch.isin(completions[row], eos).nonzero()
            length = int(stops[0]) + 1 if len(stops) else len(tokens)
            out.prompt_ids.append(list(prompts[row // n]))
            out.completion_ids.append(tokens[:length])
            out.logprobs.append(logprobs[row, :length].tolist())
            out.finish_reasons.append("stop" if len(stops) else "length")
