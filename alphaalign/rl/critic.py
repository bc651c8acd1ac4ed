"""PPO's critic: a value model beside the policy, with its own optimizer, in the trainer's process(es).

The critic is a causal LM's backbone with a one-output head on every token (`models.load_value_model`),
initialised from the policy (`critic.init_from: policy`), a reward model or another folder. Its value of
completion token t is read at the position before t (the state in which the policy chose t), where the policy's
logits for t are read. The trainer computes the values, so every rollout engine (vLLM servers, async included)
works unchanged: once before the update, frozen as GAE's values and value clipping's old values
(`alphaalign.rl.ppo`), then `algorithm.num_iterations` epochs of the clipped value loss on the policy's
micro-batches. Its optimizer is built like the policy's, from the `critic:` section's learning rate and
schedule: `TorchOptimization`, or under `trainer.deepspeed` a second DeepSpeed engine with the same config
(sharded alike). A checkpoint keeps it in `critic/`, laid out as the policy's: `critic/policy/` (the weights,
HF format; LoRA: its adapters and head) and the optimizer state beside them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alphaalign.config import Recipe
from alphaalign.errors import UserError
from alphaalign.models import load_value_model
from alphaalign.parallel import ONE_PROCESS
from alphaalign.rl import algos
from alphaalign.rl.batching import MicroBatch
from alphaalign.rl.optim import TorchOptimization
from alphaalign.rl.update import PreparedBatch, first_nonfinite, rows_of

FOLDER = "critic"  # in a checkpoint


def init_path(recipe: Recipe) -> str:
    """Where a new critic's weights come from: the policy's model, or `critic.init_from`."""
    init = recipe.critic.init_from
    return recipe.model.name_or_path if init == "policy" else init


class Critic:
    """The value model and its optimizer; `resume` is a checkpoint folder to take the weights from."""

    def __init__(
        self,
        recipe: Recipe,
        tokenizer,
        device,
        total_updates: int,
        resume: Path | None = None,
        ranks=ONE_PROCESS,
        deepspeed=None,
        ds_config: dict | None = None,
    ):
        cc, self.tokenizer, self.ranks = recipe.critic, tokenizer, ranks
        base = init_path(recipe)
        if resume is not None and not (resume / FOLDER).is_dir():
            raise UserError(
                f"trainer.resume_from: {resume} has no {FOLDER}/ folder: it was written by a run without a "
                "critic; resume it with that run's recipe, or set trainer.resume_from: none"
            )
        path = str(resume / FOLDER / "policy") if resume is not None else base
        model = load_value_model(recipe.model, device, path, base)
        tc = recipe.trainer.model_copy(
            update={
                "learning_rate": cc.learning_rate,
                "lr_scheduler": cc.lr_scheduler,
                "warmup_steps": cc.warmup_steps,
                "weight_decay": cc.weight_decay,
                "max_grad_norm": cc.max_grad_norm,
            }
        )
        if deepspeed is None:
            self.opt = TorchOptimization(model, tc, total_updates)
        else:
            from alphaalign.rl.zero import ZeroOptimization

            config = {**ds_config, "gradient_clipping": cc.max_grad_norm}
            self.opt = ZeroOptimization(
                deepspeed, model, recipe.model_copy(update={"trainer": tc}), total_updates, config, ranks
            )

    @staticmethod
    def token_values(model, mb: MicroBatch) -> torch.Tensor:
        """[b, C] float32 values of the micro-batch's completion tokens (each read one position earlier)."""
        C = mb.completion_ids.shape[1]
        out = model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            use_cache=False,
        )
        return out.logits[:, -C - 1 : -1, 0].float()

    def values(self, mbs: list[MicroBatch]) -> list[torch.Tensor]:
        """The critic's values before the update, one [b, C] tensor per micro-batch."""
        with torch.no_grad():
            return [self.token_values(self.opt.model, mb) for mb in mbs]

    def update(self, batch: PreparedBatch, old_values: list[torch.Tensor], returns: torch.Tensor, ac) -> dict:
        """`algorithm.num_iterations` epochs of the clipped value loss (global token mean) towards `returns`
        [B, T] of this rank's rows; returns the critic/* metrics, or {"nonfinite": ...} with the critic as it
        was before the update."""
        ranks, iterations = self.ranks, ac.num_iterations
        device = next(self.opt.module.parameters()).device
        saved = self.opt.snapshot() if iterations > 1 else None
        loss_sum, clipped, norms = 0.0, 0.0, []
        for iteration in range(iterations):
            self.opt.zero_grad()
            for mb, old in zip(batch.mbs, old_values, strict=True):
                values = self.token_values(self.opt.model, mb)
                target = rows_of(returns, mb).to(device)
                per_token, clip = algos.value_loss(values, old, target, mb.mask, ac.value_clip)
                loss = algos.aggregate_loss(per_token, mb.mask, "dapo", total_tokens=batch.counts.tokens)
                self.opt.backward(loss)
                loss_sum += float(loss.detach()) / iterations
                clipped += float(clip.sum()) / iterations
            batch_loss = ranks.sum([loss_sum])[0]
            norms.append(self.opt.step(loss_finite=math.isfinite(batch_loss)))
            problem = first_nonfinite(loss=torch.tensor(batch_loss), gradients=torch.tensor(norms[-1]))
            if problem is not None:
                if saved is not None and iteration > 0:
                    self.opt.restore(saved)
                return {"nonfinite": f"critic {problem}"}
        loss_total, clipped_total = ranks.sum([loss_sum, clipped])
        return {
            "critic/value_loss": loss_total,
            "critic/vf_clipfrac": clipped_total / max(batch.counts.tokens, 1.0),
            "critic/grad_norm": sum(norms) / len(norms),
            "critic/lr": self.opt.lr,
        }

    def save(self, folder: Path) -> None:
        (folder / FOLDER).mkdir(exist_ok=True)  # every rank writes into it
        self.opt.save(folder / FOLDER, self.tokenizer)

    def load(self, folder: Path) -> None:
        self.opt.load(folder / FOLDER)


class WithCritic:
    """The policy's optimization and the critic, saved into and loaded from one checkpoint together."""

    def __init__(self, opt, critic: Critic):
        self.opt, self.critic = opt, critic

    def save(self, folder: Path, tokenizer) -> None:
        self.opt.save(folder, tokenizer)
        self.critic.save(folder)

    def load(self, folder: Path) -> None:
        self.opt.load(folder)
        self.critic.load(folder)
