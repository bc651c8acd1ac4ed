"""The policy update through DeepSpeed ZeRO-2/3 (`trainer.deepspeed`), one process per device under torchrun.

`trainer.deepspeed` names a config shipped in rl/deepspeed_configs/ (`zero2`, `zero3`, `zero2_offload`,
`zero3_offload`) or gives the path of a DeepSpeed JSON config. The keys the recipe decides are filled in by the trainer and
must be absent or "auto" in the file: micro-batch size and accumulation (the trainer packs micro-batches by
`trainer.micro_batch_tokens` and steps once per batch), gradient clipping (`trainer.max_grad_norm`), bf16/fp16
(`model.dtype`); the optimizer and schedule come from the trainer section, so the file has none. ZeRO-3
bucket sizes left "auto" are derived from the hidden size, as transformers does.

Each rank's loss is normalized by batch-wide counts and multiplied by the world size: DeepSpeed averages the
ranks' gradients, so the update is the single-process update on the whole batch. Under ZeRO-3 the policy's
parameters are gathered whole for in-process generation, the KL reference is a ZeRO-3 inference engine
(sharded too), and checkpoints consolidate the weights on rank 0.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from alphaalign import parsing
from alphaalign.config import Recipe
from alphaalign.data import recipe_base
from alphaalign.errors import UserError
from alphaalign.parallel import Ranks, single_process_rendezvous
from alphaalign.resources import package_path
from alphaalign.rl.optim import (
    Optimization,
    Snapshot,
    adamw,
    load_state,
    lr_lambda,
    restore_snapshot,
    rng_state,
    set_rng_state,
    take_snapshot,
)

CONFIG_DIR = package_path("rl", "deepspeed_configs")
CHECKPOINT_TAG = "deepspeed"  # the folder in a checkpoint that holds DeepSpeed's optimizer shards


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "trainer.deepspeed needs DeepSpeed: pip install alphaalign[deepspeed] (DS_BUILD_OPS=0 on CPU)"
        ) from None
    return deepspeed


# ---------------------------------------------------------------------------------------------------------
# Config files


def config_path(recipe: Recipe) -> Path:
    """The file `trainer.deepspeed` refers to: a shipped config's name or a path (relative to the recipe)."""
    value = recipe.trainer.deepspeed
    where = f"{recipe._source or 'recipe'}: trainer.deepspeed"
    if "/" not in value and not value.endswith(".json"):
        named = CONFIG_DIR / f"{value}.json"
        if not named.is_file():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json"))) or "none found"
            raise UserError(f"{where}: no config named {value!r} (shipped: {names}; or give a .json path)")
        return named
    path = recipe_base(recipe) / Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"{where}: file not found: {value}")
    return path


# key -> value the recipe decides; the file may leave it out or write "auto"
def recipe_keys(recipe: Recipe) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # the trainer calls step() once after its micro-batches
        "gradient_clipping": recipe.trainer.max_grad_norm,
        "bf16.enabled": recipe.model.dtype == "bfloat16",
        "fp16.enabled": recipe.model.dtype == "float16",
    }


def read_config(recipe: Recipe) -> dict:
    """The DeepSpeed config for this recipe, checked, with the recipe's keys filled in."""
    path = config_path(recipe)
    try:
        config = parsing.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: the top level must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(
                f"{path}: {key}: remove it; AdamW and its schedule come from the recipe's trainer section"
            )
    zero = config.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (2, 3):
        raise UserError(f"{path}: zero_optimization.stage: must be 2 or 3 (got {stage!r})")
    if stage == 3 and recipe.rollout.static_cache and recipe.rollout.engine == "transformers":
        raise UserError(
            f"{recipe._source or 'recipe'}: rollout.static_cache: not supported with ZeRO-3 ({path.name}): its "
            "gathered weights move between steps, and a CUDA graph replays the addresses it was recorded with"
        )
    for dotted, value in recipe_keys(recipe).items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if node.get(leaf, "auto") not in ("auto", value):
            raise UserError(f'{path}: {dotted}: set by the recipe ({value!r}); remove it or write "auto"')
        node[leaf] = value
    sized = [key for key in HIDDEN_SIZED if zero.get(key) == "auto"]
    left = [k for k, v in zero.items() if v == "auto" and k not in sized] + [
        k for k, v in config.items() if v == "auto"
    ]
    if left:
        raise UserError(f'{path}: {left[0]}: "auto" is not supported for this key; give a value')
    return config


# ZeRO keys whose "auto" is derived from the model's hidden size h (transformers' rule)
HIDDEN_SIZED = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def fill_hidden_size(config: dict, hidden: int) -> dict:
    zero = config["zero_optimization"]
    for key, size in HIDDEN_SIZED.items():
        if zero.get(key) == "auto":
            zero[key] = size(hidden)
    return config


# ---------------------------------------------------------------------------------------------------------
# Processes, the engine, generation and the reference model


def init_ranks(deepspeed) -> Ranks:
    """Join the process group torchrun set up (or a one-process group); on GPUs, one device per rank."""
    single_process_rendezvous()
    deepspeed.init_distributed(verbose=False)
    ranks = Ranks()
    if ranks.device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        ranks.device = torch.device("cuda", local)
    return ranks


class ZeroOptimization(Optimization):
    """The policy wrapped in a DeepSpeed engine with AdamW and the recipe's schedule (see optim.py)."""

    def __init__(self, deepspeed, policy, recipe: Recipe, total_updates: int, config: dict, ranks: Ranks):
        self.deepspeed, self.ranks = deepspeed, ranks
        self.config = fill_hidden_size(copy.deepcopy(config), policy.config.hidden_size)
        zero = self.config["zero_optimization"]
        self.stage = zero["stage"]
        cpu_adam = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
        # DeepSpeed re-points this optimizer at its fp32 master partitions and keeps the object
        self.optimizer = adamw(policy.parameters(), recipe.trainer, cpu_adam)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(recipe.trainer, total_updates)
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=policy, optimizer=self.optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.model, self.module = self.engine, self.engine.module

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears the gradients when it steps

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.ranks.world_size)  # DeepSpeed averages gradients over the ranks

    def step(self, loss_finite: bool) -> float:
        """Reduce, clip and apply the gradients; DeepSpeed discards the step when their norm is not finite.
        A non-finite loss with finite gradients would be applied: every rank steps (the reduction is
        collective) and then undoes it."""
        saved = None if loss_finite else self.snapshot()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if saved is not None:
            self.restore(saved)
            return float("inf")
        return float(norm) if self.engine.was_step_applied() else float("inf")

    def local_weights(self) -> list[torch.Tensor]:
        """The trainable weights as this rank holds them: DeepSpeed's fp32 master partitions (ZeRO-3 takes
        them out of the optimizer's param groups between steps), the module's weights (whole under ZeRO-2;
        under ZeRO-3 this rank's partition, `ds_tensor`, and the small parameters every rank keeps whole,
        `ds_persist`)."""
        zero = self.engine.optimizer
        held = [
            *getattr(zero, "single_partition_of_fp32_groups", []),
            *getattr(zero, "fp32_partitioned_groups_flat", []),
        ]
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            if hasattr(p, "ds_tensor"):
                held += [p.ds_tensor, p] if getattr(p, "ds_persist", False) else [p.ds_tensor]
            else:
                held.append(p)
        return held

    def snapshot(self) -> Snapshot:
        return take_snapshot(self.local_weights(), self.optimizer, self.scheduler)

    def restore(self, saved: Snapshot) -> None:
        restore_snapshot(saved, self.optimizer, self.scheduler)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def reference(self, ref):
        """The frozen KL reference: sharded by a ZeRO-3 inference engine under ZeRO-3, whole otherwise."""
        if self.stage != 3 or not isinstance(ref, torch.nn.Module):
            return ref  # ZeRO-2: a full copy per rank; LoRA: the policy with its adapters off
        config = copy.deepcopy(self.config)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = self.deepspeed.initialize(model=ref, config=config)
        engine.eval()
        return engine

    def generation_engine(self, engine):
        """The in-process engine gathers ZeRO-3 weights to generate (a server engine's weight pushes are
        collective through `make_engine`'s `whole_weights`, this object's `full_state_dict`)."""
        from alphaalign.rollout.transformers_engine import TransformersEngine

        if self.stage == 3 and isinstance(engine, TransformersEngine):
            return GatheredGeneration(engine, self.engine, self.deepspeed)
        return engine

    def full_state_dict(self) -> dict | None:
        """The whole weights on rank 0 under ZeRO-3 (a collective: every rank sends its shards; LoRA: the
        adapters only); None under ZeRO-2, where every rank's module is whole."""
        if self.stage != 3:
            return None
        lora = hasattr(self.module, "peft_config")
        return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)

    # ---- checkpoints: HF-format policy from rank 0, optimizer shards and RNG states from every rank

    def save(self, folder: Path, tokenizer) -> None:
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)
        torch.save(rng_state(), folder / f"rng_rank{self.ranks.rank}.pt")
        state = self.full_state_dict()
        if self.ranks.is_main:
            self.module.save_pretrained(folder / "policy", state_dict=state)
            tokenizer.save_pretrained(folder / "policy")

    def load(self, folder: Path) -> None:
        rng = folder / f"rng_rank{self.ranks.rank}.pt"
        if not (folder / CHECKPOINT_TAG).is_dir() and (folder / "trainer_state.pt").is_file():
            raise UserError(
                f"trainer.resume_from: {folder} was written without DeepSpeed; unset trainer.deepspeed to resume it"
            )
        if not (folder / CHECKPOINT_TAG).is_dir() or not rng.is_file():
            raise UserError(
                f"trainer.resume_from: {folder} was not written by a DeepSpeed run with "
                f"{self.ranks.world_size} process(es); resume it the way it was trained"
            )
        check_deepspeed_files(folder / CHECKPOINT_TAG)
        self.engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        set_rng_state(load_state(rng))


def check_deepspeed_files(folder: Path) -> None:
    """DeepSpeed unpickles its checkpoint files with the full unpickler, which runs whatever a file names.
    Each file is read first with the weights-only one (memory-mapped: no copy of the shards), which allows
    tensors, plain values and the few DeepSpeed classes a checkpoint holds: a file naming anything else is
    refused in one line before DeepSpeed opens it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        for path in sorted(folder.glob("*.pt")):
            load_state(path, mmap=True)


class GatheredGeneration:
    """The in-process engine on a ZeRO-3 policy: each generate call gathers the whole parameters on every
    rank and lifts ZeRO-3's per-module hooks, so that ranks generate independently (different lengths)."""

    def __init__(self, engine, ds_engine, deepspeed):
        self.engine, self.ds_engine, self.deepspeed = engine, ds_engine, deepspeed

    def update_weights(self, version: int) -> float:
        return self.engine.update_weights(version)

    def generate(self, prompts, n, sampling):
        from trl.models.utils import add_hooks, remove_hooks

        with self.deepspeed.zero.GatheredParameters(list(self.ds_engine.module.parameters())):
            remove_hooks(self.ds_engine)
            try:
                return self.engine.generate(prompts, n, sampling)
            finally:
                add_hooks(self.ds_engine)
