"""The GRPO training loop, to be read top to bottom.

Each step: draw `prompts_per_step` labelled prompts → `num_generations` rollouts each → reward stack →
group advantages → policy update (AdamW, gradient clipping, micro-batches by token budget) → weight sync to
the rollout engine → log, and checkpoint every `save_every` steps. With `rollout.async_steps` > 0 the next
steps' rollouts are generated while this step updates. The math lives in `alphaalign.rl.algos`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from alphaalign.config import Recipe
from alphaalign.data import (
    Example,
    PromptStream,
    compile_template,
    encode_prompt,
    load_split,
    recipe_base,
    template_key,
)
from alphaalign.demo.build import build_if_missing
from alphaalign.errors import UserError
from alphaalign.evaluation import safety_summary
from alphaalign.models import load_causal_lm, load_reference, load_tokenizer, pick_device, prompt_cache
from alphaalign.plan import Plan, check_structure
from alphaalign.rewards.stack import RewardStack
from alphaalign.rl import algos
from alphaalign.rl.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from alphaalign.rl.logger import MetricsLogger
from alphaalign.rl.optim import TorchOptimization
from alphaalign.rl.parallel import ONE_PROCESS, launched_world_size
from alphaalign.rollout import make_engine
from alphaalign.rollout.async_rollouts import RolloutQueue
from alphaalign.rollout.base import Rollouts, SamplingParams


def train(recipe: Recipe) -> dict:
    """Run the recipe; returns the final metrics (and the before/after evaluation when data.eval is set)."""
    with contextlib.ExitStack() as resources:  # servers, connections and threads the run starts end with it
        return run(recipe, resources)


def run(recipe: Recipe, resources: contextlib.ExitStack) -> dict:
    tc, ac, rc = recipe.trainer, recipe.algorithm, recipe.rollout
    ranks, deepspeed, ds_config = start_processes(recipe)
    out = prepare_output_dir(tc.output_dir)
    transformers.utils.logging.disable_progress_bar()  # a bar per weight push or checkpoint buries the step bar
    device = ranks.device if deepspeed else pick_device(tc.device)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    if ranks.is_main:
        build_if_missing(recipe)
    ranks.barrier()

    # ---- data, models, rewards, optimizer
    base = recipe_base(recipe)
    train_sources = load_split(recipe.data, "train", base)
    eval_examples = [ex for source in load_split(recipe.data, "eval", base) for ex in source]
    stream = PromptStream(train_sources, [s.weight for s in recipe.data.train], tc.seed)
    rewards = RewardStack(recipe.rewards)
    tags = format_tags(recipe)

    resume = resolve_resume(tc.resume_from, tc.output_dir, quiet=not ranks.is_main)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_causal_lm(recipe.model, device, path=str(resume / "policy") if resume else None)
    updates = tc.max_steps * ac.num_iterations
    if deepspeed:
        from alphaalign.rl.zero import ZeroOptimization

        opt = ZeroOptimization(deepspeed, policy, recipe, updates, ds_config, ranks)
    else:
        opt = TorchOptimization(policy, tc, updates)
    ref = load_reference(recipe.model, opt.module, device) if ac.beta > 0 else None
    engine = make_engine(recipe, opt.module, tokenizer, out, resources, ranks)
    if deepspeed:
        ref, engine = opt.reference(ref), opt.generation_engine(engine)
        torch.manual_seed(tc.seed + ranks.rank)  # every rank samples its own completions
    sampling = SamplingParams(rc.max_new_tokens, rc.temperature, rc.top_p, rc.top_k, rc.min_new_tokens)
    template = compile_template(recipe.data.template, template_key(recipe))

    def encode(example: Example) -> list[int]:
        return encode_prompt(
            tokenizer, example, template, recipe.data.system_prompt, recipe.data.max_prompt_tokens
        )

    step, bad_steps = 0, 0
    if resume:
        state = load_checkpoint(resume, opt)
        step, bad_steps = state["step"], state.get("bad_steps", 0)
        stream.skip_to(state["data_draws"])
        if ranks.is_main:
            print(f"resuming from {resume} (step {step})", flush=True)
    elif ranks.is_main:
        (out / "recipe.resolved.yaml").write_text(recipe_yaml(recipe))
    engine.update_weights(step)  # a server may hold another run's weights

    evaluate = (
        (lambda: run_eval(engine, tokenizer, eval_examples, encode, sampling, tc.eval_samples, tags, ranks))
        if eval_examples
        else None
    )
    if evaluate and not (out / "eval_before.json").exists():
        before = evaluate()
        if ranks.is_main:
            (out / "eval_before.json").write_text(json.dumps(before, indent=2))
            print(
                f"before RL, held-out: harmful refusal {before['harmful_refusal_rate']:.1%}, benign over-refusal "
                f"{before['benign_refusal_rate']:.1%}, format validity {before['format_valid_rate']:.1%}",
                flush=True,
            )

    # ---- the loop
    logger = MetricsLogger(recipe, out, start_step=step) if ranks.is_main else None
    draw = lambda: ranks.shard(stream.take(tc.prompts_per_step))  # noqa: E731 (this rank's slice)
    rollout_queue = RolloutQueue(
        engine, draw, encode, rc.num_generations, sampling, rc.async_steps, resources
    )
    metrics: dict = {}
    while step < tc.max_steps:
        step += 1
        t0 = time.perf_counter()
        examples, rollouts = rollout_queue.next(steps_left=tc.max_steps - step + 1)
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)

        t1 = time.perf_counter()
        group = [ex for ex in examples for _ in range(rc.num_generations)]
        columns = {"label": [ex.label for ex in group]}
        for key in {k for ex in group for k in ex.columns}:
            columns[key] = [ex.columns.get(key) for ex in group]
        first = ranks.rank * len(examples)  # group ids count over the whole batch
        columns["group"] = [first + i for i in range(len(examples)) for _ in range(rc.num_generations)]
        per_term = rewards.score([ex.prompt for ex in group], texts, columns)
        mine = slice(ranks.rank * len(texts), (ranks.rank + 1) * len(texts))  # this rank's rows in the batch
        local_rollouts = rollouts
        rollouts, texts, columns, per_term = gather_batch(ranks, rollouts, texts, columns, per_term)
        scalar = algos.combine_rewards(per_term, rewards.weights, rc.num_generations, ac.reward_aggregation)
        if ac.reward_aggregation == "normalize_then_sum":
            advantages = algos.batch_zscore(scalar)
        else:
            estimator = algos.ADVANTAGE_ESTIMATORS[ac.advantage_estimator]
            advantages = estimator(scalar, rc.num_generations, ac.scale_rewards)

        t2 = time.perf_counter()
        problem = first_nonfinite(
            rewards=per_term[~per_term.isnan()], advantages=advantages
        )  # NaN: not applicable
        update = {}
        if problem is None:
            update = policy_update(
                opt, ref, local_rollouts, advantages[mine], recipe, tokenizer.pad_token_id, ranks
            )
            problem = update.pop("nonfinite", None)
        bad_steps += problem is not None
        t3 = time.perf_counter()
        sync_seconds = engine.update_weights(step)
        t4 = time.perf_counter()

        metrics = {
            "step": step,
            **reward_metrics(per_term, scalar, advantages, rewards.names, rc.num_generations),
            **update,
            "guard/skipped_step": float(problem is not None),
            "guard/skipped_steps_total": bad_steps,
            **rollout_metrics(rollouts),
            **{
                f"rollout/{k}": v
                for k, v in safety_summary(texts, columns["label"], tags).items()
                if not k.startswith("n_")
            },
            "rollout/policy_staleness": step - 1 - rollouts.policy_version,  # versions behind the policy
            # with async rollouts generation overlaps the update: the step only waits for what is left of it
            ("time/generate_s" if rc.async_steps == 0 else "time/rollout_wait_s"): t1 - t0,
            "time/score_s": t2 - t1,
            "time/update_s": t3 - t2,
            "time/weight_sync_s": sync_seconds,
            "time/step_s": t4 - t0,
            "throughput/completion_tokens_per_s": sum(map(len, rollouts.completion_ids)) / (t4 - t0),
        }
        if evaluate and tc.eval_every and step % tc.eval_every == 0:
            metrics.update({f"eval/{k}": v for k, v in evaluate().items()})
        if logger:
            logger.log(metrics)
        if problem is not None:
            check_bad_steps(step, problem, bad_steps, tc.max_bad_steps, out)
        if step % tc.save_every == 0 or step == tc.max_steps:
            draws = stream.draws - rollout_queue.prompts_ahead  # prompts drawn ahead are not consumed yet
            save_checkpoint(out, step, opt, tokenizer, draws, tc.keep_last, bad_steps, ranks)
    if logger:
        logger.close()

    result = {"final": metrics}
    if evaluate:
        after_path = out / "eval_after.json"
        last_step_eval = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
        after = (
            json.loads(after_path.read_text())
            if after_path.exists() and not metrics
            else last_step_eval or evaluate()
        )
        if ranks.is_main:
            after_path.write_text(json.dumps(after, indent=2))
            result.update(before=json.loads((out / "eval_before.json").read_text()), after=after)
    return result


def start_processes(recipe: Recipe):
    """(ranks, deepspeed module, DeepSpeed config): one plain process, or DeepSpeed's process group."""
    world = launched_world_size()
    plan = Plan(procs_per_node=world, gpus=True, layout=f"WORLD_SIZE={world}")  # torchrun's processes
    check_structure(str(recipe._source or "recipe"), recipe, plan)
    if recipe.trainer.deepspeed is None:
        return ONE_PROCESS, None, None
    from alphaalign.rl import zero

    config = zero.read_config(recipe)
    deepspeed = zero.import_deepspeed()
    return zero.init_ranks(deepspeed), deepspeed, config


def gather_batch(ranks, rollouts: Rollouts, texts: list[str], columns: dict, per_term: torch.Tensor):
    """The whole step's rollouts, texts, reward columns and rewards from every rank's slice, in rank order."""
    if ranks.world_size == 1:
        return rollouts, texts, columns, per_term
    parts = ranks.gather((rollouts, texts, columns, per_term))
    merged = Rollouts(*([row for part in parts for row in getattr(part[0], field)]
                        for field in ("prompt_ids", "completion_ids", "logprobs", "finish_reasons")),
                      policy_version=rollouts.policy_version)  # fmt: skip
    keys = {key for part in parts for key in part[2]}
    merged_columns = {
        key: [v for part in parts for v in part[2].get(key, [None] * len(part[1]))] for key in keys
    }
    return (
        merged,
        [t for part in parts for t in part[1]],
        merged_columns,
        torch.cat([part[3] for part in parts]),
    )


# ---------------------------------------------------------------------------------------------------------
# The policy update


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
        mb = MicroBatch(rows, ids.to(device), attn.to(device), positions.to(device), ids[:, P:].to(device),
                        mask.to(device), logp.to(device))  # fmt: skip
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
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                       logits_to_keep=C + 1, use_cache=False).logits  # fmt: skip
        return logits[:, :-1]
    P, firsts = mb.input_ids.shape[1] - C, mb.prompt_firsts
    cache = prompt_cache(model, mb.input_ids[firsts, : P - 1], mb.attention_mask[firsts, : P - 1],
                         mb.position_ids[firsts, : P - 1])  # fmt: skip
    cache.batch_select_indices(mb.prompt_index)
    return model(input_ids=mb.input_ids[:, P - 1 : -1], attention_mask=mb.attention_mask[:, :-1],
                 position_ids=mb.position_ids[:, P - 1 : -1], past_key_values=cache, use_cache=True).logits  # fmt: skip


def micro_batch_loss(policy, mb: MicroBatch, advantages, old_logp, ref_logp, recipe: Recipe, totals: dict):
    """The loss of one micro-batch, scaled so that the micro-batch losses sum to the batch loss.

    `old_logp` None means π_old = π_θ (one update per batch, no rollout correction): ratio 1, gradient intact.
    `totals` holds the batch-wide counts: sequences, tokens, micro_batches. Returns (loss, per-token stats).
    """
    ac, temperature = recipe.algorithm, recipe.rollout.temperature
    logits = completion_logits(policy, mb)
    logp, entropy = algos.token_logprobs_and_entropy(logits, mb.completion_ids, temperature)
    old = logp.detach() if old_logp is None else old_logp
    log_w = algos.importance_log_weights(logp, old, mb.mask, ac.importance_sampling_level)
    surrogate = algos.POLICY_LOSSES[algos.SURROGATE_OF_LOSS_TYPE.get(ac.loss_type, "clip")]
    per_token, low, high = surrogate(
        log_w, advantages, logp, epsilon_low=ac.epsilon,
        epsilon_high=ac.epsilon if ac.epsilon_high is None else ac.epsilon_high,
        temperature_pos=ac.sapo_temperature_pos, temperature_neg=ac.sapo_temperature_neg,
    )  # fmt: skip
    stats = {"clip_low": low.expand_as(mb.mask), "clip_high": high.expand_as(mb.mask), "entropy": entropy}
    correction = recipe.rollout_correction
    if correction != "none":
        is_w = algos.rollout_correction_weights(old, mb.rollout_logp, mb.mask, correction,
                                                ac.rollout_correction_max, ac.rollout_correction_min)  # fmt: skip
        per_token = per_token * is_w
        stats["is_weight"] = is_w.expand_as(mb.mask)
        stats["logp_gap"] = torch.nan_to_num((old - mb.rollout_logp).abs() * mb.mask, nan=0.0)
    if ref_logp is not None:
        kl = algos.KL_ESTIMATORS[ac.kl_estimator](logp, ref_logp)
        stats["kl"] = kl.detach()
        if ac.kl_bias_correction:
            kl = kl * torch.exp(log_w)
        per_token = per_token + ac.beta * kl
    loss = algos.aggregate_loss(
        per_token, mb.mask, ac.loss_type, total_sequences=totals["sequences"], total_tokens=totals["tokens"],
        max_completion_length=recipe.rollout.max_new_tokens, num_micro_batches=totals["micro_batches"],
    )  # fmt: skip
    return loss, stats


def policy_update(
    opt, ref, rollouts: Rollouts, advantages, recipe: Recipe, pad_id, ranks=ONE_PROCESS
) -> dict:
    """One batch's update on this rank's rollouts (`advantages` are theirs); returns batch-wide metrics.

    `opt` is a TorchOptimization or a ZeroOptimization; losses are normalized by counts summed over ranks.
    """
    ac, temperature = recipe.algorithm, recipe.rollout.temperature
    device = next(opt.module.parameters()).device
    keep = [not (ac.mask_truncated_completions and r == "length") for r in rollouts.finish_reasons]
    # Gradient checkpointing makes transformers drop the cache in training. ZeRO-3 gathers weights in every
    # model call, so all ranks share prompts or none does.
    short_prompt = any(len(p) < 2 for p in rollouts.prompt_ids)
    share = (recipe.trainer.share_prompt_forward and not recipe.model.gradient_checkpointing
             and not ranks.sum([float(short_prompt)])[0])  # fmt: skip
    mbs = micro_batches(rollouts, recipe.trainer.micro_batch_tokens, keep, pad_id, device, share)
    sequences, tokens, count = ranks.sum([len(rollouts.completion_ids), float(sum(mb.mask.sum() for mb in mbs)),
                                          len(mbs)])  # fmt: skip
    totals = {"sequences": int(sequences), "tokens": tokens, "micro_batches": int(count)}
    # ZeRO-3 gathers parameters collectively in every forward and backward, so all ranks run as many
    # micro-batches; the extra ones are copies whose loss mask is empty (they add nothing)
    idle = dataclasses.replace(mbs[-1], mask=torch.zeros_like(mbs[-1].mask))
    mbs += [idle] * (ranks.max(len(mbs)) - len(mbs))
    need_old = ac.num_iterations > 1 or recipe.rollout_correction != "none"

    # Frozen per-token log-probs (π_old, π_ref), computed once before the first update.
    def frozen(model, mb):
        with torch.no_grad():
            return algos.token_logprobs(completion_logits(model, mb), mb.completion_ids, temperature)

    old_logps = [frozen(opt.model, mb) if need_old else None for mb in mbs]
    ref_logps = [frozen(ref, mb) if ref is not None else None for mb in mbs]
    checked = [t for t in old_logps + ref_logps if t is not None]
    if recipe.rollout_correction != "none":
        checked += [mb.rollout_logp for mb in mbs]
    problem = first_nonfinite(**{"log-probs": checked})
    if ranks.sum([float(problem is not None)])[0]:  # every rank skips together
        return {"nonfinite": "log-probs"}

    sums = dict.fromkeys(["loss", "kl", "entropy", "clip_low", "clip_high", "is_weight", "logp_gap"], 0.0)
    largest_logp_gap = 0.0
    grad_norms = []
    # a later iteration that fails undoes the steps the earlier ones made: a skipped update changes nothing
    saved = opt.snapshot() if ac.num_iterations > 1 else None
    for iteration in range(ac.num_iterations):
        opt.zero_grad()
        for mb, old, ref_logp in zip(mbs, old_logps, ref_logps, strict=True):
            loss, stats = micro_batch_loss(
                opt.model, mb, advantages[mb.rows].to(device), old, ref_logp, recipe, totals
            )
            opt.backward(loss)
            sums["loss"] += float(loss.detach()) / ac.num_iterations
            for key in ("clip_low", "clip_high"):
                sums[key] += float((stats[key] * mb.mask).sum()) / ac.num_iterations
            if iteration == 0:  # measured on the policy that generated the batch
                sums["entropy"] += float((stats["entropy"] * mb.mask).sum())
                for key in ("kl", "is_weight", "logp_gap"):
                    if key in stats:
                        sums[key] += float((stats[key] * mb.mask).sum())
                if "logp_gap" in stats:
                    largest_logp_gap = max(largest_logp_gap, float(stats["logp_gap"].max()))
        batch_loss = ranks.sum([sums["loss"]])[0]
        grad_norms.append(opt.step(loss_finite=math.isfinite(batch_loss)))
        problem = first_nonfinite(loss=torch.tensor(batch_loss), gradients=torch.tensor(grad_norms[-1]))
        if problem is not None:  # the weights, optimizer and schedule are left as they were
            if saved is not None and iteration > 0:
                opt.restore(saved)
            return {"nonfinite": problem}

    sums = dict(zip(sums, ranks.sum(list(sums.values())), strict=True))
    n = max(totals["tokens"], 1.0)
    out = {
        "loss": sums["loss"],
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": opt.lr,
        "entropy/mean": sums["entropy"] / n,
        "clip/low_fraction": sums["clip_low"] / n,
        "clip/high_fraction": sums["clip_high"] / n,
    }
    if ref is not None:
        out[f"kl/{ac.kl_estimator}_mean"] = sums["kl"] / n
    if recipe.rollout_correction != "none":
        out["rollout_correction/weight_mean"] = sums["is_weight"] / n
        # |trainer's log-prob before the update − engine's log-prob| per completion token: ~1e-5 when the
        # engine sampled with the current weights, larger with stale (async) rollouts
        out["rollout_correction/logp_abs_diff_mean"] = sums["logp_gap"] / n
        out["rollout_correction/logp_abs_diff_max"] = max(ranks.gather(largest_logp_gap))
    return out


# ---------------------------------------------------------------------------------------------------------
# Helpers: numerical guards, metrics, evaluation, output folder


def first_nonfinite(**named) -> str | None:
    """The name of the first argument (a tensor or a list of tensors) holding NaN or ±inf, else None."""
    for name, value in named.items():
        tensors = value if isinstance(value, list) else [value]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return name
    return None


def check_bad_steps(step: int, problem: str, bad_steps: int, max_bad_steps: int, out: Path) -> None:
    """Warn about a skipped step; abort with one line once more than `max_bad_steps` were skipped."""
    print(f"warning: step {step} skipped: non-finite {problem} ({bad_steps} skipped so far)", file=sys.stderr)
    if bad_steps > max_bad_steps:
        raise UserError(
            f"aborting at step {step}: {bad_steps} steps had non-finite values (last: {problem}), more than "
            f"trainer.max_bad_steps={max_bad_steps}; checkpoints in {out / 'checkpoints'} are intact"
        )


def reward_metrics(per_term, scalar, advantages, names, group_size) -> dict:
    out = {"reward/mean": float(torch.nanmean(scalar)), "reward/std": float(algos.nanstd(scalar))}
    for k, name in enumerate(names):
        column = per_term[:, k]
        if (~torch.isnan(column)).any():
            out[f"reward/{name}/mean"] = float(torch.nanmean(column))
            out[f"reward/{name}/std"] = (
                float(algos.nanstd(column)) if (~torch.isnan(column)).sum() > 1 else 0.0
            )
    group_std = algos.nanstd(scalar.view(-1, group_size), dim=1)
    out.update({
        "advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()),
        "advantage/min": float(advantages.min()), "advantage/max": float(advantages.max()),
        "groups/zero_reward_std_fraction": float((torch.nan_to_num(group_std) < 1e-6).float().mean()),
    })  # fmt: skip
    return out


def rollout_metrics(rollouts: Rollouts) -> dict:
    lengths = [len(c) for c in rollouts.completion_ids]
    return {
        "completion/length_mean": sum(lengths) / len(lengths),
        "completion/length_max": max(lengths),
        "completion/truncated_fraction": sum(r == "length" for r in rollouts.finish_reasons) / len(lengths),
    }


def run_eval(engine, tokenizer, examples, encode, sampling, samples, tags, ranks=ONE_PROCESS) -> dict:
    """Refusal and format rates on the held-out prompts; each rank generates for every world_size-th one."""
    mine = examples[ranks.rank :: ranks.world_size]
    rollouts = engine.generate([encode(ex) for ex in mine], samples, sampling)
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    parts = ranks.gather((texts, [ex.label for ex in mine for _ in range(samples)]))
    return safety_summary([t for p in parts for t in p[0]], [label for p in parts for label in p[1]], tags)


def format_tags(recipe: Recipe) -> tuple[str, str]:
    """The reasoning/answer tag names, as configured on the alphaalign_safety reward (defaults otherwise)."""
    for spec in recipe.rewards:
        if spec.name == "alphaalign_safety":
            return spec.args.get("reasoning_tag", "safety_reasoning"), spec.args.get("answer_tag", "answer")
    return "safety_reasoning", "answer"


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"trainer.output_dir: cannot write to {path} ({exc.strerror})") from None
    return out


def recipe_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.public_dump(), sort_keys=False)
