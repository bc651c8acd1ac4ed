"""The GRPO training loop, to be read top to bottom.

Each step: draw `prompts_per_step` labelled prompts → `num_generations` rollouts each → reward stack →
group advantages → policy update (AdamW, gradient clipping, micro-batches by token budget) → weight sync to
the rollout engine → log, and checkpoint every `save_every` steps. PPO (`advantage_estimator: gae`) and the other
per-token estimators compute their advantages with the update instead, the critic's values included
(`alphaalign.rl.ppo`, the critic: `alphaalign.rl.critic`). With `rollout.async_steps` > 0 the next
steps' rollouts are generated while this step updates. The math lives in `alphaalign.rl.algos`, the update
in `alphaalign.rl.update` (micro-batches: `alphaalign.rl.batching`), the step's metrics in `alphaalign.rl.metrics`,
the step's batch (generation, scoring, dynamic sampling) in `alphaalign.rl.sampling`, the logged sample
completions in `alphaalign.rl.samples_log`.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
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
from alphaalign.models import load_causal_lm, load_reference, load_tokenizer, pick_device
from alphaalign.outputs import prepare_output_dir
from alphaalign.parallel import ONE_PROCESS, launched_world_size
from alphaalign.plan import Plan, check_structure
from alphaalign.rewards.stack import RewardStack
from alphaalign.rl import algos
from alphaalign.rl.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from alphaalign.rl.logger import MetricsLogger
from alphaalign.rl.metrics import reward_metrics, rollout_metrics, rollout_verdicts
from alphaalign.rl.optim import TorchOptimization
from alphaalign.rl.ppo import token_level_update
from alphaalign.rl.samples_log import SamplesLog
from alphaalign.rl.sampling import StepSampler
from alphaalign.rl.update import UpdateSettings, first_nonfinite, policy_update
from alphaalign.rollout import make_engine
from alphaalign.rollout.async_rollouts import RolloutQueue
from alphaalign.rollout.base import SamplingParams
from alphaalign.verdicts import safety_summary


def train(recipe: Recipe) -> dict:
    """Run the recipe; returns the final metrics (and the before/after evaluation when data.eval is set)."""
    with contextlib.ExitStack() as resources:  # servers, connections and threads the run starts end with it
        return run(recipe, resources)


def run(recipe: Recipe, resources: contextlib.ExitStack) -> dict:
    tc, ac, rc = recipe.trainer, recipe.algorithm, recipe.rollout
    ranks, deepspeed, ds_config = start_processes(recipe)
    resources.callback(ranks.close)  # registered first, so the group ends after the servers and threads
    out = prepare_output_dir(tc.output_dir, "trainer.output_dir")
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
    rewards = RewardStack(recipe.rewards, recipe.format, rc.max_new_tokens)

    resume = resolve_resume(tc.resume_from, tc.output_dir, quiet=not ranks.is_main)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_causal_lm(recipe.model, device, path=str(resume / "policy") if resume else None)
    updates = tc.max_steps * ac.num_iterations
    if deepspeed:
        from alphaalign.rl.zero import ZeroOptimization

        opt = ZeroOptimization(deepspeed, policy, recipe, updates, ds_config, ranks)
    else:
        opt = TorchOptimization(policy, tc, updates)
    critic = None
    if recipe.critic is not None:  # PPO's value model (advantage_estimator: gae), with its own optimizer
        from alphaalign.rl.critic import Critic, WithCritic

        critic = Critic(recipe, tokenizer, device, updates, resume, ranks, deepspeed, ds_config)
    trained = WithCritic(opt, critic) if critic is not None else opt  # what a checkpoint saves and loads
    ref = load_reference(recipe.model, opt.module, device) if ac.beta > 0 else None
    engine = make_engine(recipe, opt.module, tokenizer, out, resources, ranks, opt.full_state_dict)
    if deepspeed:
        ref, engine = opt.reference(ref), opt.generation_engine(engine)
        torch.manual_seed(tc.seed + ranks.rank)  # every rank samples its own completions
    sampling = SamplingParams(rc.max_new_tokens, rc.temperature, rc.top_p, rc.top_k, rc.min_new_tokens)
    template = compile_template(recipe.data.template, template_key(recipe), recipe.format)

    def encode(example: Example) -> list[int]:
        return encode_prompt(
            tokenizer, example, template, recipe.data.system_prompt, recipe.data.max_prompt_tokens
        )

    step, bad_steps = 0, 0
    if resume:
        state = load_checkpoint(resume, trained)
        step, bad_steps = state["step"], state.get("bad_steps", 0)
        stream.skip_to(state["data_draws"])
        if ranks.is_main:
            print(f"resuming from {resume} (step {step})", flush=True)
    elif ranks.is_main:
        (out / "recipe.resolved.yaml").write_text(recipe_yaml(recipe))
    engine.update_weights(step)  # a server may hold another run's weights

    evaluate = (
        (
            lambda: run_eval(
                engine, tokenizer, eval_examples, encode, sampling, tc.eval_samples, recipe.format, ranks
            )
        )
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
    samples = SamplesLog(recipe, out, logger.run, start_step=step) if logger else None
    draw = lambda: ranks.shard(stream.take(tc.prompts_per_step))  # noqa: E731 (this rank's slice)
    rollout_queue = RolloutQueue(
        engine, draw, encode, rc.num_generations, sampling, rc.async_steps, resources
    )
    sampler = StepSampler(rollout_queue, tokenizer, rewards, ranks, recipe)  # dynamic sampling too
    settings = UpdateSettings.from_recipe(recipe)
    metrics: dict = {}
    while step < tc.max_steps:
        step += 1
        t0 = time.perf_counter()
        batch = sampler.next(steps_left=tc.max_steps - step + 1)  # the whole step's batch, on every rank
        whole = batch.whole
        rollouts, texts, columns, per_term = whole.rollouts, whole.texts, whole.columns, whole.per_term
        t1 = t0 + batch.generate_s
        mine = batch.mine  # this rank's rows in the batch
        local_rollouts = batch.local
        scalar, advantages = algos.advantages(per_term, rewards.weights, rc.num_generations, ac)
        token_level = advantages is None  # PPO's GAE, REINFORCE++ with kl_in_reward: computed with the update
        if token_level:
            advantages = torch.zeros_like(scalar)  # what the metrics show of a step skipped before its update
        per_completion = advantages  # token-level: each completion's mean advantage, for the samples

        t2 = time.perf_counter()
        scored = per_term[~per_term.isnan()]  # NaN: the term does not apply to the row
        problem = first_nonfinite(rewards=scored, advantages=advantages)
        update = {}
        if problem is None and batch.trainable and token_level:
            update, advantages, per_completion = token_level_update(
                opt, ref, critic, local_rollouts, scalar, mine, settings, tokenizer.pad_token_id, ranks
            )
            problem = update.pop("nonfinite", None)
        elif problem is None and batch.trainable:
            update = policy_update(
                opt, ref, local_rollouts, advantages[mine], settings, tokenizer.pad_token_id, ranks
            )
            problem = update.pop("nonfinite", None)
        bad_steps += problem is not None
        t3 = time.perf_counter()
        sync_seconds = engine.update_weights(step)
        t4 = time.perf_counter()

        metrics = {
            "step": step,
            **reward_metrics(per_term, scalar, advantages, rewards.names, rc.num_generations),
            **batch.stats,
            **update,
            "guard/skipped_step": float(problem is not None),
            "guard/skipped_steps_total": bad_steps,
            **rollout_metrics(rollouts),
            **rollout_verdicts(texts, columns["label"], recipe.format),
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
        if samples and samples.due(step):
            samples.log(step, batch.whole, rewards.names, scalar, per_completion)
        if logger:
            logger.log(metrics)
        if problem is not None:
            check_bad_steps(step, problem, bad_steps, tc.max_bad_steps, out)
        if step % tc.save_every == 0 or step == tc.max_steps:
            # prompts drawn ahead are not consumed yet
            draws = stream.draws - rollout_queue.batches_ahead * tc.prompts_per_step
            save_checkpoint(out, step, trained, tokenizer, draws, tc.keep_last, bad_steps, ranks)
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


# ---------------------------------------------------------------------------------------------------------
# Helpers: numerical guards, metrics, evaluation, output folder


def check_bad_steps(step: int, problem: str, bad_steps: int, max_bad_steps: int, out: Path) -> None:
    """Warn about a skipped step; abort with one line once more than `max_bad_steps` were skipped."""
    print(f"warning: step {step} skipped: non-finite {problem} ({bad_steps} skipped so far)", file=sys.stderr)
    if bad_steps > max_bad_steps:
        raise UserError(
            f"aborting at step {step}: {bad_steps} steps had non-finite values (last: {problem}), more than "
            f"trainer.max_bad_steps={max_bad_steps}; checkpoints in {out / 'checkpoints'} are intact"
        )


def run_eval(
    engine, tokenizer, examples, encode, sampling, samples, answer_format, ranks=ONE_PROCESS
) -> dict:
    """Refusal and format rates on the held-out prompts; each rank generates for every world_size-th one."""
    mine = examples[ranks.rank :: ranks.world_size]
    rollouts = engine.generate([encode(ex) for ex in mine], samples, sampling)
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    parts = ranks.gather((texts, [ex.label for ex in mine for _ in range(samples)]))
    return safety_summary(
        [t for p in parts for t in p[0]], [label for p in parts for label in p[1]], answer_format
    )


def recipe_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.public_dump(), sort_keys=False)
