"""The step's batch: draw prompts, generate, score and gather; with DAPO's dynamic sampling.

A round takes the next batch of `prompts_per_step` prompts from the rollout queue (each rank its slice; with
async rollouts, the batch generated ahead), scores this rank's completions and gathers the whole round on
every rank. With `algorithm.filter_groups: zero_std` the groups whose scalar rewards (the weighted sum of
the reward terms) are all equal are dropped, since all their advantages are zero, and more rounds are drawn,
at most `algorithm.max_resample_rounds`, until `prompts_per_step` groups are kept. Surplus groups of the
last round are left unused; they were drawn, so the data stream's draw count (what a checkpoint records)
includes them and resume stays exact. The decision is taken on the gathered rounds, the same on every rank,
and the kept groups are split evenly over the ranks (a count that does not split is trimmed to one that
does), so every rank runs its share of the update. When nothing is kept, the step reports the last round
and makes no update.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from alphaalign.rewards.stack import reward_columns
from alphaalign.rl import algos
from alphaalign.rollout.base import Rollouts

ROLLOUT_FIELDS = ("prompt_ids", "completion_ids", "logprobs", "finish_reasons")


@dataclass
class Round:
    """Completions with what the rewards said about them; rows of one prompt are consecutive."""

    prompts: list[str]  # the request each completion answers (untemplated)
    rollouts: Rollouts
    texts: list[str]
    columns: dict[str, list]  # the reward columns (label, group, completion_length, data fields)
    per_term: Tensor  # [B, K] reward of each term, NaN where it does not apply

    def rows(self, rows: list[int]) -> Round:
        picked = Rollouts(
            *([getattr(self.rollouts, f)[i] for i in rows] for f in ROLLOUT_FIELDS),
            policy_version=self.rollouts.policy_version,
        )
        return Round(
            [self.prompts[i] for i in rows],
            picked,
            [self.texts[i] for i in rows],
            {k: [v[i] for i in rows] for k, v in self.columns.items()},
            self.per_term[rows],
        )


def concat(parts: list[Round]) -> Round:
    """The rows of `parts`, in order; the policy version is the oldest one."""
    rollouts = Rollouts(
        *([row for p in parts for row in getattr(p.rollouts, f)] for f in ROLLOUT_FIELDS),
        policy_version=min(p.rollouts.policy_version for p in parts),
    )
    keys = {k for p in parts for k in p.columns}
    columns = {k: [v for p in parts for v in p.columns.get(k, [None] * len(p.texts))] for k in keys}
    return Round(
        [t for p in parts for t in p.prompts],
        rollouts,
        [t for p in parts for t in p.texts],
        columns,
        torch.cat([p.per_term for p in parts]),
    )


def gather_round(ranks, part: Round) -> Round:
    """The whole round from every rank's slice, in rank order (the slice itself in a single process)."""
    if ranks.world_size == 1:
        return part
    return concat(ranks.gather(part))


def all_equal_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[groups] bool: True where a group's rewards are all equal, NaN (not scorable) left out; a group with
    fewer than two scored completions counts as all equal. Every advantage of such a group is zero."""
    grouped = rewards.view(-1, group_size)
    scored = ~torch.isnan(grouped)
    high = torch.where(scored, grouped, -torch.inf).amax(dim=1)
    low = torch.where(scored, grouped, torch.inf).amin(dim=1)
    return (scored.sum(dim=1) < 2) | (high == low)


@dataclass
class StepBatch:
    whole: Round  # the step's batch, every rank's rows
    local: Rollouts  # this rank's rows of it, which it updates on
    mine: slice  # where they are in `whole`
    trainable: bool  # False: dynamic sampling kept nothing, no update this step
    stats: dict  # filter/* metrics
    generate_s: float  # waiting for rollouts
    score_s: float  # decoding, scoring and gathering


class StepSampler:
    def __init__(self, queue, tokenizer, rewards, ranks, recipe):
        """`queue` a RolloutQueue, `rewards` the RewardStack, `ranks` the run's processes."""
        self.queue, self.tokenizer, self.rewards, self.ranks = queue, tokenizer, rewards, ranks
        self.group_size, self.prompts = recipe.rollout.num_generations, recipe.trainer.prompts_per_step
        self.filter, self.max_rounds = recipe.algorithm.filter_groups, recipe.algorithm.max_resample_rounds
        self.warned = False

    def _round(self, steps_left: int) -> tuple[Round, Rollouts, float, float]:
        t0 = time.perf_counter()
        examples, rollouts = self.queue.next(steps_left=steps_left)
        t1 = time.perf_counter()
        n, rank = self.group_size, self.ranks.rank
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        columns = reward_columns(
            examples,
            n,
            first_group=rank * len(examples),
            completion_lengths=[len(c) for c in rollouts.completion_ids],
        )
        prompts = [ex.prompt for ex in examples for _ in range(n)]
        part = Round(prompts, rollouts, texts, columns, self.rewards.score(prompts, texts, columns))
        whole = gather_round(self.ranks, part)
        return whole, rollouts, t1 - t0, time.perf_counter() - t1

    def next(self, steps_left: int) -> StepBatch:
        """The batch of the current step (`steps_left` counts it)."""
        whole, local, generate_s, score_s = self._round(steps_left)
        n, rank, world = self.group_size, self.ranks.rank, self.ranks.world_size
        if self.filter == "none":
            return StepBatch(
                whole,
                local,
                slice(rank * len(local.completion_ids), (rank + 1) * len(local.completion_ids)),
                True,
                {},
                generate_s,
                score_s,
            )
        kept: list[Round] = []
        n_kept = dropped = rounds = 0
        drawn: list[Tensor] = []
        while True:
            scalar = algos.combine_rewards(whole.per_term, self.rewards.weights, n, "sum_then_normalize")
            drawn.append(scalar)
            flat = all_equal_groups(scalar, n).tolist()
            useful = [g for g, f in enumerate(flat) if not f]
            dropped += len(flat) - len(useful)
            taken = useful[: self.prompts - n_kept]
            kept.append(whole.rows([g * n + j for g in taken for j in range(n)]))
            n_kept += len(taken)
            if n_kept >= self.prompts or rounds == self.max_rounds:
                break
            rounds += 1
            whole, local, g_s, s_s = self._round(steps_left)
            generate_s, score_s = generate_s + g_s, score_s + s_s
        usable = n_kept - n_kept % world  # every rank gets as many groups
        stats = {
            "filter/groups_kept": usable,
            "filter/groups_dropped": dropped,
            "filter/resample_rounds": rounds,
            "filter/reward_mean_drawn": float(torch.nanmean(torch.cat(drawn))),
        }
        if usable < self.prompts and self.ranks.is_main and not self.warned:
            self.warned = True
            print(
                f"warning: dynamic sampling kept {usable} of {self.prompts} groups after "
                f"{rounds} extra rounds (algorithm.max_resample_rounds); the step trains on those "
                "(filter/groups_kept in metrics.jsonl counts it every step; not repeated)",
                file=sys.stderr,
            )
        if usable == 0:  # the last round, reported but not trained on
            per_rank = len(local.completion_ids)
            return StepBatch(
                whole, local, slice(rank * per_rank, (rank + 1) * per_rank), False, stats, generate_s, score_s
            )
        batch = concat(kept).rows(list(range(usable * n)))
        batch.columns["group"] = [g for g in range(usable) for _ in range(n)]
        per_rank = usable // world * n
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        local = batch.rows(list(range(mine.start, mine.stop))).rollouts
        return StepBatch(batch, local, mine, True, stats, generate_s, score_s)
