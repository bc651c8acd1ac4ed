"""Rollouts packed into micro-batches by token budget, and the policy's logits for their completion tokens.

Used by the policy update (`alphaalign.rl.update`), the speed benchmark and the trl parity tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alphaalign.models import prompt_cache
from alphaalign.rollout.base import Rollouts


@dataclass
class MicroBatch:
    rows: list[int]
    input_ids: torch.Tensor  # [b, P + C]: left-padded prompts, then right-padded completions
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor  # [b, C]
    mask: torch.Tensor  # [b, C] float, 1 on completion tokens that count in the loss
    rollout_logp: torch.Tensor  # [b, C] the engine's log-probs
    # the first row of each distinct prompt and each row's index into that list: `completion_logits` then
    # runs each prompt once; None: every row runs its whole sequence
    prompt_firsts: torch.Tensor | None = None
    prompt_index: torch.Tensor | None = None


def micro_batches(
    rollouts: Rollouts,
    budget: int,
    loss_mask_rows: list[bool],
    pad_id: int,
    device,
    share_prompts: bool = True,
) -> list[MicroBatch]:
    """Consecutive rows packed while (rows × longest row) stays within the token budget; with `share_prompts`
    (and no single-token prompt) the rows of one prompt share its forward pass."""
    lengths = [len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)]
    groups, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    groups.append(current)

    out = []
    for rows in groups:
        P = max(len(rollouts.prompt_ids[i]) for i in rows)
        C = max(len(rollouts.completion_ids[i]) for i in rows)
        ids = torch.full((len(rows), P + C), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), P + C), dtype=torch.long)
        logp = torch.zeros((len(rows), C))
        for j, i in enumerate(rows):
            p, c = rollouts.prompt_ids[i], rollouts.completion_ids[i]
            ids[j, P - len(p) : P] = torch.tensor(p)
            ids[j, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[j, P - len(p) : P + len(c)] = 1
            logp[j, : len(c)] = torch.tensor(rollouts.logprobs[i])
        mask = attn[:, P:].float() * torch.tensor([float(loss_mask_rows[i]) for i in rows]).unsqueeze(1)
        positions = (attn.cumsum(1) - 1).clamp(min=0)
        mb = MicroBatch(
            rows,
            ids.to(device),
            attn.to(device),
            positions.to(device),
            ids[:, P:].to(device),
            mask.to(device),
            logp.to(device),
        )
        prompts = [tuple(rollouts.prompt_ids[i]) for i in rows]
        if share_prompts and min(map(len, prompts)) > 1:
            first_row: dict[tuple[int, ...], int] = {}
            for j, prompt in enumerate(prompts):
                first_row.setdefault(prompt, j)
            number = {prompt: k for k, prompt in enumerate(first_row)}
            mb.prompt_firsts = torch.tensor(list(first_row.values()), device=device)
            mb.prompt_index = torch.tensor([number[prompt] for prompt in prompts], device=device)
        out.append(mb)
    return out


def completion_logits(model, mb: MicroBatch) -> torch.Tensor:
    """[b, C, V] logits predicting each completion token.

    With `mb.prompt_index`, each distinct prompt's tokens but the last go through the model once; the rows then
    continue from that prompt's cache, which keeps its autograd graph, so n completions of a prompt cost one
    prompt forward (and backward) instead of n. It takes two model calls whether or not rows repeat a prompt,
    so every rank makes the same calls (ZeRO-3 gathers weights in each).
    """
    C = mb.completion_ids.shape[1]
    if mb.prompt_index is None:
        logits = model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            logits_to_keep=C + 1,
            use_cache=False,
        ).logits
        return logits[:, :-1]
    P, firsts = mb.input_ids.shape[1] - C, mb.prompt_firsts
    cache = prompt_cache(
        model,
        mb.input_ids[firsts, : P - 1],
        mb.attention_mask[firsts, : P - 1],
        mb.position_ids[firsts, : P - 1],
    )
    cache.batch_select_indices(mb.prompt_index)
    return model(
        input_ids=mb.input_ids[:, P - 1 : -1],
        attention_mask=mb.attention_mask[:, :-1],
        position_ids=mb.position_ids[:, P - 1 : -1],
        past_key_values=cache,
        use_cache=True,
    ).logits
