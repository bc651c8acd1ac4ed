"""Run under torchrun by test_deepspeed.py beside it: the trainer's policy update through DeepSpeed on fixed data.

argv: BATCH.pt OUT_DIR CASE... where CASE is `<deepspeed config>[+lora][+checkpointing][+overflow][+ppo]` (LoRA
adapters, gradient checkpointing; `ppo`: PPO with a critic, the batch's advantages taken as its scalar rewards,
the critic a second DeepSpeed engine, saved in OUT_DIR/<case>/critic; `overflow`: two iterations per update, and before the second update the
learning rate is raised until the first iteration's weights overflow, with a checkpoint in OUT_DIR/<case>/before
just before it). BATCH.pt holds a recipe path,
rollouts and advantages (written by the test). For each case, every rank updates the policy twice on its
slice of the batch; rank 0 writes the two steps' metrics to OUT_DIR/<case>/metrics.json and the checkpoint
writer puts the updated policy in OUT_DIR/<case>/policy (consolidated from the ZeRO-3 shards).
"""

import json
import sys
from pathlib import Path

import torch

from alphaalign.config import load_recipe
from alphaalign.models import load_causal_lm, load_reference, load_tokenizer
from alphaalign.rl.critic import Critic, WithCritic
from alphaalign.rl.ppo import token_level_update
from alphaalign.rl.trainer import start_processes
from alphaalign.rl.update import UpdateSettings, policy_update
from alphaalign.rl.zero import ZeroOptimization
from alphaalign.rollout.base import Rollouts

# PPO with a critic, two epochs per batch (the second one clipped, the critic's values too)
PPO_OVERRIDES = [
    "algorithm.advantage_estimator=gae",
    "algorithm.num_iterations=2",
    "critic.learning_rate=1e-3",
]


def rows(rollouts: Rollouts, part: slice) -> Rollouts:
    return Rollouts(
        rollouts.prompt_ids[part],
        rollouts.completion_ids[part],
        rollouts.logprobs[part],
        rollouts.finish_reasons[part],
        rollouts.policy_version,
    )


def main(batch_path: str, out_dir: str, *cases: str) -> None:
    batch = torch.load(batch_path, weights_only=False)
    for case in cases:
        config, *options = case.split("+")
        overrides = [f"trainer.deepspeed={config}"]
        if "lora" in options:
            overrides.append(f"model.lora={json.dumps(batch['lora'])}")
        if "checkpointing" in options:
            overrides.append("model.gradient_checkpointing=true")
        if "overflow" in options:
            overrides.append("algorithm.num_iterations=2")
        if "ppo" in options:
            overrides += PPO_OVERRIDES
        recipe = load_recipe(batch["recipe"], overrides)
        ranks, deepspeed, ds_config = start_processes(recipe)
        torch.manual_seed(0)  # the same LoRA initialization as the single-process run
        policy = load_causal_lm(recipe.model, ranks.device)
        tokenizer = load_tokenizer(recipe.model)
        opt = ZeroOptimization(deepspeed, policy, recipe, 10, ds_config, ranks)
        ref = opt.reference(load_reference(recipe.model, opt.module, ranks.device))
        critic = None
        if "ppo" in options:
            torch.manual_seed(1)  # the same new value head as the single-process run
            critic = Critic(recipe, tokenizer, ranks.device, 10, None, ranks, deepspeed, ds_config)
        n = len(batch["rollouts"].completion_ids) // ranks.world_size
        mine = slice(ranks.rank * n, (ranks.rank + 1) * n)
        local = rows(batch["rollouts"], mine)
        out = Path(out_dir) / case
        if ranks.is_main:
            out.mkdir(parents=True)
        steps = []
        for step in range(2):
            if step == 1 and "overflow" in options:
                opt.scheduler.base_lrs = [1e30 for _ in opt.scheduler.base_lrs]
                for group in opt.optimizer.param_groups:
                    group["lr"] = 1e30
                if ranks.is_main:
                    (out / "before").mkdir()
                ranks.barrier()
                opt.save(out / "before", tokenizer)
                ranks.barrier()
            settings = UpdateSettings.from_recipe(recipe)
            if critic is not None:
                metrics, *_ = token_level_update(
                    opt,
                    ref,
                    critic,
                    local,
                    batch["advantages"],
                    mine,
                    settings,
                    tokenizer.pad_token_id,
                    ranks,
                )
                steps.append(metrics)
            else:
                steps.append(
                    policy_update(
                        opt, ref, local, batch["advantages"][mine], settings, tokenizer.pad_token_id, ranks
                    )
                )
        if ranks.is_main:
            (out / "metrics.json").write_text(json.dumps(steps))
        ranks.barrier()
        (WithCritic(opt, critic) if critic is not None else opt).save(out, tokenizer)
        ranks.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
