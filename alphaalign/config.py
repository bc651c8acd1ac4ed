"""Recipes: one YAML file is the whole experiment.

`load_recipe(path, overrides)` reads the YAML (following `extends:` chains), applies dotted command-line
overrides whose values are parsed as YAML, and validates the result against the typed schema below, which
is the single source of defaults. Every error is one line naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from alphaalign.errors import UserError
from alphaalign.judges.spec import JudgeSpec, RulesJudge, error_text
from alphaalign.masking import is_secret_key, mask_override, mask_tree
from alphaalign.parsing import safe_load_bounded
from alphaalign.resources import recipe_file, shipped_recipes


class _Section(BaseModel):
    # every float of every section is finite: .inf/.nan in a learning rate or temperature is a typo, never a
    # setting (reward args, free-form, are checked by RewardSpec)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraSection(_Section):
    """PEFT LoRA adapters on the policy; only the adapters train and checkpoints hold only them."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module names, or every linear layer

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, modules: list[str] | str) -> list[str] | str:
        if isinstance(modules, list) and not modules:
            raise ValueError("name at least one module (e.g. q_proj) or use 'all-linear'")
        return modules


class ModelConfig(_Section):
    name_or_path: str
    ref_name_or_path: str | None = None  # frozen reference for the KL term; defaults to the initial policy
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Mixed precision: the model's forward passes (generation, reference, policy) run under torch.autocast in
    # this dtype, while weights, gradients, optimizer state and the log-prob math stay float32 (TRL's bf16=True,
    # accelerate's mixed_precision='bf16'). Needs dtype float32. Faster where matmuls have bf16 units
    # (figures: docs/design.md, "Mixed precision"). The vllm_server engine samples in `dtype`.
    autocast: Literal["bfloat16"] | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    build: Literal["demo"] | None = None  # build the model at name_or_path if it is missing (offline demo)
    # null: full fine-tuning. With LoRA and no ref_name_or_path, the KL reference is the policy with its
    # adapters disabled (no second copy of the model).
    lora: LoraSection | None = None

    @field_validator("autocast")
    @classmethod
    def _autocast_over_float32(cls, autocast: str | None, info: ValidationInfo) -> str | None:
        if autocast is not None and info.data.get("dtype", "float32") != "float32":
            raise ValueError(f"needs model.dtype float32 (the weights are already {info.data['dtype']})")
        return autocast


class DataSource(_Section):
    path: str | None = None
    hf_id: str | None = None
    hf_config: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    label_field: str = "label"
    label: Literal["harmful", "benign"] | None = None  # one label for every row; label_field is then unused
    weight: float = Field(1.0, gt=0)
    max_rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_location(self) -> DataSource:
        if (self.path is None) == (self.hf_id is None):
            raise ValueError("give exactly one of 'path' or 'hf_id'")
        return self


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = []
    template: str = "alphaalign"  # 'alphaalign', 'none', or a Jinja string using {{ prompt }}
    system_prompt: str | None = None
    max_prompt_tokens: int = Field(512, gt=0)


class RolloutConfig(_Section):
    engine: Literal["transformers", "vllm_server"] = "transformers"
    num_generations: int = Field(8, ge=2)
    max_new_tokens: int = Field(256, gt=0)
    # End-of-sequence cannot be sampled before this many tokens (benchmarks use fixed-length rollouts); the
    # engine's log-probs are then those of that constrained distribution
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    generation_batch_size: int = Field(64, gt=0)  # sequences per generate() call (transformers engine)
    # transformers engine on a GPU: a fixed-size KV cache, whose decode step transformers compiles once per
    # prompt-width bucket and replays as a CUDA graph, so the decode loop stops paying a launch per kernel.
    # Slower on CPU, where it runs eagerly; not with ZeRO-3, which re-gathers the weights every step. Figures:
    # docs/gpu.md, section 3.
    static_cache: bool = False
    # vllm_server engine: base URLs of servers started with `alphaalign serve RECIPE`; prompts are split
    # across them. Empty: the trainer starts one local server itself and stops it at the end.
    servers: list[str] = []
    timeout: float = Field(600.0, gt=0)  # seconds one server request may take, retries included
    retries: int = Field(3, ge=0)  # extra attempts after a failed request, with exponential backoff
    server_start_timeout: float = Field(600.0, gt=0)  # seconds a self-started server may take to come up
    weight_sync: Literal["checkpoint", "lora", "nccl"] = "checkpoint"
    weight_sync_dir: str | None = None  # where checkpoint/lora versions go; default <output_dir>/weight_sync
    # versions kept on disk (the server may still read the previous one)
    weight_sync_keep: int = Field(2, ge=2)
    # Rollouts for step k+1..k+async_steps are generated while step k updates the policy, so a batch may be
    # sampled by a policy up to async_steps versions old (0 = synchronous).
    async_steps: int = Field(0, ge=0)

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        for url in servers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s):// URL")
        return [url.rstrip("/") for url in servers]

    @field_validator("min_new_tokens")
    @classmethod
    def _min_within_max(cls, min_new_tokens: int, info: ValidationInfo) -> int:
        if min_new_tokens > info.data.get("max_new_tokens", min_new_tokens):
            raise ValueError(f"{min_new_tokens} is more than max_new_tokens ({info.data['max_new_tokens']})")
        return min_new_tokens

    @field_validator("async_steps")
    @classmethod
    def _async_needs_a_server(cls, async_steps: int, info: ValidationInfo) -> int:
        if async_steps > 0 and info.data.get("engine") == "transformers":
            raise ValueError("needs engine: vllm_server (the in-process engine shares the policy's weights)")
        return async_steps


class AlgorithmConfig(_Section):
    # names from alphaalign/rl/algos.py's registries (RECIPE_REGISTRIES), checked by _registered below
    advantage_estimator: str = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    loss_type: str = "dapo"
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)  # with cispo: the cap on the importance weight (e.g. 5.0)
    sapo_temperature_pos: float = Field(1.0, gt=0)  # sapo's gate temperature where the advantage is > 0
    sapo_temperature_neg: float = Field(1.05, gt=0)  # ... and where it is ≤ 0
    importance_sampling_level: Literal["token", "sequence"] = "token"
    beta: float = Field(0.0, ge=0)
    kl_estimator: str = "k3"
    kl_bias_correction: bool = True  # KL term × the importance ratio (trl 1.16's use_bias_correction_kl)
    num_iterations: int = Field(1, ge=1)
    # Correction for the gap between the rollout engine's log-probs and the trainer's (TRL's
    # vllm_importance_sampling_*). 'auto' turns it on (sequence_mask) for engines other than in-process transformers.
    rollout_correction: Literal[
        "auto", "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = "auto"
    rollout_correction_max: float = Field(3.0, gt=0)
    rollout_correction_min: float | None = Field(None, ge=0)
    mask_truncated_completions: bool = False
    # Dynamic sampling (DAPO): 'zero_std' drops the groups whose scalar rewards are all equal (every advantage
    # zero) and draws more batches of prompts until prompts_per_step groups are kept, at most
    # max_resample_rounds extra draws per step (alphaalign/rl/sampling.py, docs/design.md)
    filter_groups: Literal["none", "zero_std"] = "none"
    max_resample_rounds: int = Field(3, ge=0)
    # PPO with a critic (`advantage_estimator: gae`) and token-level REINFORCE++: the scalar reward goes on
    # each completion's last token. kl_in_reward folds −β·KL (`kl_estimator`, per token) into those rewards
    # (classic RLHF PPO) instead of adding β·KL to the loss. Defaults are verl's.
    kl_in_reward: bool = False
    gamma: float = Field(1.0, ge=0, le=1)  # discount of the per-token rewards
    lam: float = Field(1.0, ge=0, le=1)  # GAE's λ
    value_clip: float | None = Field(0.5, gt=0)  # the critic's values move at most this far from the old ones

    @field_validator("advantage_estimator", "kl_estimator", "loss_type")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        from alphaalign.rl.algos import RECIPE_REGISTRIES  # torch loads only once a recipe is validated

        names = RECIPE_REGISTRIES[f"algorithm.{info.field_name}"]
        if name not in names:
            raise ValueError(
                f"{name!r} is not registered in alphaalign/rl/algos.py; choose one of {', '.join(names)}"
            )
        return name


class CriticConfig(_Section):
    """The value model of PPO (`algorithm.advantage_estimator: gae`): a causal-LM backbone with a one-output
    per-token head (transformers' token classifier), trained by its own AdamW (alphaalign/rl/critic.py)."""

    # 'policy' (model.name_or_path, a new head), or a folder: a causal LM (a new head), a one-output reward
    # model (its score head kept), or an earlier run's critic (a checkpoint's critic/policy folder)
    init_from: str = "policy"
    learning_rate: float = Field(1e-5, gt=0)  # verl's critic default
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)

    @field_validator("init_from")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give 'policy' or the folder of a model")
        return value


class TrainerConfig(_Section):
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)
    prompts_per_step: int = Field(16, gt=0)
    max_steps: int = Field(200, gt=0)
    micro_batch_tokens: int = Field(16384, gt=0)  # token budget (prompt + completion) per forward/backward
    # Completions of one prompt in a micro-batch share one forward pass of the prompt (its cache is reused,
    # gradients flow through it); off: every row runs its whole sequence. Ignored with gradient checkpointing.
    share_prompt_forward: bool = True
    seed: int = 0
    output_dir: str = "outputs/run"
    save_every: int = Field(50, gt=0)
    keep_last: int = Field(2, ge=1)
    # 'auto' (newest checkpoint in output_dir, if any), 'none', or a checkpoint path
    resume_from: str = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_samples: int = Field(1, ge=1)  # samples per eval prompt for the before/after evaluation
    # Evaluate on data.eval every this many steps and log eval/* rates into metrics.jsonl (0 = only before/after).
    eval_every: int = Field(0, ge=0)
    # Steps whose rewards, advantages, log-probs, loss or gradients are not finite are skipped; the run
    # aborts once more than this many have been skipped.
    max_bad_steps: int = Field(3, ge=0)
    progress_bar: bool = True
    # DeepSpeed ZeRO for the policy update, one process per device (torchrun): a config shipped in
    # alphaalign/rl/deepspeed_configs/ (zero2, zero3, zero2_offload, zero3_offload) or a JSON path relative
    # to the recipe.
    deepspeed: str | None = None

    @field_validator("deepspeed")
    @classmethod
    def _config_given(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give a config name (zero2, zero3, ...) or a .json path, or null")
        return value


class RewardSpec(_Section):
    name: str
    weight: float = 1.0
    when: Literal["harmful", "benign", "all"] = "all"
    args: dict[str, Any] = {}

    @field_validator("args")
    @classmethod
    def _finite_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        bad = nonfinite_path(args)
        if bad is not None:
            raise ValueError(f"{bad}: must be a finite number, not .inf or .nan")
        return args


def nonfinite_path(node: Any, prefix: str = "") -> str | None:
    """The dotted path of the first NaN or ±inf float inside nested dicts and lists, else None."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, float) and not math.isfinite(value):
            return path
        found = nonfinite_path(value, path + ".")
        if found is not None:
            return found
    return None


class FormatConfig(_Section):
    """The answer format, in one place: the prompt template asks for it, and the rewards, `score`, `eval` and
    the trainer's metrics parse it: `<reasoning_tag>…</reasoning_tag><answer_tag>…</answer_tag>`, the answer to
    an unsafe request being exactly `canned_refusal`."""

    reasoning_tag: str = "safety_reasoning"
    answer_tag: str = "answer"
    canned_refusal: str = "\\boxed{Sorry, I can't comply}"

    @field_validator("reasoning_tag", "answer_tag")
    @classmethod
    def _tag_name(cls, tag: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
            raise ValueError(f"{tag!r} is not a tag name (letters, digits, _ . -; e.g. safety_reasoning)")
        return tag

    @field_validator("answer_tag")
    @classmethod
    def _tags_differ(cls, tag: str, info: ValidationInfo) -> str:
        if tag == info.data.get("reasoning_tag"):
            raise ValueError(f"{tag!r} is also the reasoning_tag; the two tags must differ")
        return tag

    @field_validator("canned_refusal")
    @classmethod
    def _said(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty")
        return text

    @property
    def tags(self) -> tuple[str, str]:
        return self.reasoning_tag, self.answer_tag


# reward args that the recipe's `format:` section now sets for every term
FORMAT_ARGS = ("reasoning_tag", "answer_tag")


class LoggingConfig(_Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "alphaalign"
    run_name: str | None = None
    # every this many steps, the completions of samples_count of the step's prompts (rewards per term,
    # verdicts, advantages) go to <output_dir>/samples.jsonl and a wandb Table (0 = never)
    samples_every: int = Field(10, ge=0)
    samples_count: int = Field(4, gt=0)


class LaunchConfig(_Section):
    """The GPU node a recipe is written for. `alphaalign validate` checks this plan (memory included, against
    `--gpu-memory`); `make train` and `alphaalign launch local` without --gpus split the machine's GPUs in the
    same proportion (alphaalign/plan.py, docs/launch.md)."""

    gpus: int = Field(gt=0)  # GPUs of the one node the recipe expects
    vllm_gpus: int = Field(0, ge=0)  # of those, the ones that run a vLLM server each; the others train

    @field_validator("vllm_gpus")
    @classmethod
    def _some_left_to_train(cls, vllm_gpus: int, info: ValidationInfo) -> int:
        gpus = info.data.get("gpus")
        if gpus is not None and vllm_gpus >= gpus:
            raise ValueError(f"{vllm_gpus} leaves none of the node's {gpus} GPUs to the trainer")
        return vllm_gpus


class Recipe(_Section):
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()
    rewards: list[RewardSpec] = Field(min_length=1)
    format: FormatConfig = FormatConfig()  # the answer format the template asks for and everything parses
    logging: LoggingConfig = LoggingConfig()
    judge: JudgeSpec = RulesJudge()  # who judges `alphaalign eval`/`score` verdicts (docs/evaluation.md)
    launch: LaunchConfig | None = None  # null: one trainer process, wherever it runs
    # the value model; filled in with its defaults when algorithm.advantage_estimator is gae
    critic: CriticConfig | None = None
    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _critic_with_gae(self) -> Recipe:
        ac = self.algorithm
        gae = ac.advantage_estimator == "gae"
        if gae and self.critic is None:
            if "critic" in self.model_fields_set:
                raise ValueError(
                    "critic: algorithm.advantage_estimator gae needs a critic (the value model); "
                    "remove 'critic: null' to get the default one"
                )
            self.critic = CriticConfig()
        if not gae and self.critic is not None:
            raise ValueError(
                f"critic: only algorithm.advantage_estimator gae uses a critic (got "
                f"{ac.advantage_estimator!r}); remove the critic section or use gae"
            )
        for key in ("lam", "value_clip"):  # against the default: a resolved recipe writes every key
            if not gae and getattr(ac, key) != AlgorithmConfig.model_fields[key].default:
                raise ValueError(
                    f"algorithm.{key}: only advantage_estimator gae uses it (got {ac.advantage_estimator!r})"
                )
        from alphaalign.rl.algos import TOKEN_ADVANTAGE_ESTIMATORS, token_level

        if ac.kl_in_reward and ac.advantage_estimator not in TOKEN_ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"algorithm.kl_in_reward: needs a per-token advantage estimator "
                f"({', '.join(TOKEN_ADVANTAGE_ESTIMATORS)}); got {ac.advantage_estimator!r}"
            )
        if not token_level(ac) and ac.gamma != AlgorithmConfig.model_fields["gamma"].default:
            raise ValueError(
                "algorithm.gamma: discounts per-token rewards: needs advantage_estimator gae, or "
                "reinforce_pp with kl_in_reward: true"
            )
        if token_level(ac) and ac.scale_rewards != AlgorithmConfig.model_fields["scale_rewards"].default:
            raise ValueError(
                f"algorithm.scale_rewards: {ac.scale_rewards!r} has no effect with per-token advantages "
                f"({ac.advantage_estimator!r}: whitened over the batch); remove it"
            )
        if ac.kl_in_reward and ac.beta == 0:
            raise ValueError(
                "algorithm.kl_in_reward: folds β·KL into the rewards and algorithm.beta is 0; set beta"
            )
        return self

    @model_validator(mode="after")
    def _tags_set_once(self) -> Recipe:
        for k, spec in enumerate(self.rewards):
            for key in FORMAT_ARGS:
                if key in spec.args:
                    raise ValueError(
                        f"rewards.{k}.args.{key}: the tags are set once for every term and the prompt, "
                        f"in the recipe's format: section (format.{key})"
                    )
        return self

    @model_validator(mode="after")
    def _aggregation_owns_the_advantage(self) -> Recipe:
        # normalize_then_sum z-scores the summed reward over the batch itself (TRL's GDPO): an estimator or a
        # scaling chosen beside it would be silently ignored
        ac = self.algorithm
        if ac.reward_aggregation == "normalize_then_sum":
            for key, default in (("advantage_estimator", "grpo"), ("scale_rewards", "group")):
                if getattr(ac, key) != default:
                    raise ValueError(
                        f"algorithm.{key}: {getattr(ac, key)!r} has no effect with reward_aggregation: "
                        f"normalize_then_sum (it z-scores the summed reward over the batch); leave it at {default!r}"
                    )
        return self

    @model_validator(mode="after")
    def _one_sequence_fits_a_micro_batch(self) -> Recipe:
        longest = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.trainer.micro_batch_tokens < longest:
            raise ValueError(
                f"trainer.micro_batch_tokens: {self.trainer.micro_batch_tokens} is smaller than one sequence "
                f"(data.max_prompt_tokens + rollout.max_new_tokens = {longest})"
            )
        return self

    @model_validator(mode="after")
    def _static_cache_without_autocast(self) -> Recipe:
        if self.rollout.static_cache and self.model.autocast is not None:
            raise ValueError(
                "rollout.static_cache: not supported with model.autocast (transformers' fixed-size cache holds keys "
                "and values in one dtype; under autocast the keys come out float32 and the values bf16)"
            )
        return self

    @model_validator(mode="after")
    def _deepspeed_syncs_through_files(self) -> Recipe:
        rc = self.rollout
        if self.trainer.deepspeed is not None and rc.engine == "vllm_server" and rc.weight_sync == "nccl":
            raise ValueError(
                "rollout.weight_sync: 'nccl' is not supported with trainer.deepspeed (streaming sharded "
                "weights is not implemented); use 'checkpoint' or 'lora'"
            )
        return self

    @model_validator(mode="after")
    def _weight_sync_fits_the_model(self) -> Recipe:
        rc = self.rollout
        if rc.engine != "vllm_server":
            return self
        if rc.weight_sync == "lora" and self.model.lora is None:
            raise ValueError(
                "rollout.weight_sync: 'lora' pushes LoRA adapters, and this recipe has no model.lora; use "
                "'checkpoint' (or 'nccl' on GPUs)"
            )
        if rc.weight_sync == "nccl" and self.model.lora is not None:
            raise ValueError(
                "rollout.weight_sync: 'nccl' streams whole weights by name and cannot push LoRA adapters "
                "(model.lora is set); use 'lora'"
            )
        return self

    @model_validator(mode="after")
    def _servers_need_the_server_engine(self) -> Recipe:
        if self.launch is not None and self.launch.vllm_gpus and self.rollout.engine != "vllm_server":
            raise ValueError(
                f"launch.vllm_gpus: {self.launch.vllm_gpus} GPUs for vLLM servers need rollout.engine: "
                f"vllm_server (got {self.rollout.engine!r})"
            )
        return self

    def public_dump(self) -> dict:
        """The recipe as plain data with its secrets masked (`alphaalign.masking`); it validates as a recipe."""
        return mask_tree(self.model_dump(mode="json"))

    def warnings(self) -> list[str]:
        """Settings that run but likely do not do what was meant; `validate` and `train` print them."""
        found = []
        significant_bits = {"bfloat16": 8, "float16": 11}.get(self.model.dtype)
        if significant_bits and self.model.lora is None and self.trainer.deepspeed is None:
            lr = self.trainer.learning_rate
            found.append(
                f"model.dtype: {self.model.dtype} weights updated in place (no model.lora, no trainer.deepspeed): "
                f"an AdamW step of about lr={lr:g} rounds away on every weight larger than {2 ** (significant_bits + 1) * lr:.1e}; "
                "use dtype float32 with model.autocast: bfloat16, trainer.deepspeed (float32 master weights) or model.lora"
            )
        return found

    @property
    def rollout_correction(self) -> str:
        """The effective rollout log-prob correction mode ('auto' resolved)."""
        mode = self.algorithm.rollout_correction
        if mode == "auto":
            return "none" if self.rollout.engine == "transformers" else "sequence_mask"
        return mode


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML, extends, overrides, and errors that name the file and the dotted key.


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe ({exc.__class__.__name__})") from None
    try:
        data = safe_load_bounded(text)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict, origins: dict, source: str, prefix: tuple = ()) -> dict:
    """Deep-merge `update` into a copy of `base`; mappings merge, everything else replaces.

    `origins` maps each key path to the file or override that last set it.
    """
    out = dict(base)
    for key, value in update.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, source, path)
        else:
            out[key] = value
            for p in [p for p in origins if p[: len(path)] == path]:
                del origins[p]
        origins[path] = source
    return out


def _load_with_extends(path: Path, origins: dict, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise UserError(f"{path}: 'extends' forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    base: dict = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise UserError(f"{path}: extends: must be a file name")
        base = _load_with_extends(path.parent / parent, origins, (*chain, path))
    return _merge(base, data, origins, str(_display(path)))


def _display(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def apply_override(data: dict, override: str, origins: dict) -> dict:
    """Apply one `dotted.key=yaml_value` override; list items are addressed by index (`rewards.0.weight=2`)."""
    key, sep, raw = override.partition("=")
    shown = mask_override(override)  # errors and origins echo the override: never its secrets
    if not sep or not key:
        raise UserError(f"override '{shown}': expected key=value")
    try:
        value = safe_load_bounded(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override '{shown}': the value is not valid YAML") from None
    except ValueError as exc:
        raise UserError(f"override '{key}': the value {exc}") from None
    parts = key.split(".")
    data = copy.deepcopy(data)
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override '{shown}': {where}: no such list item")
            part = int(part)
        elif not isinstance(node, dict):
            raise UserError(f"override '{shown}': {'.'.join(parts[:depth])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]
    path = tuple(parts)
    for p in [p for p in origins if p[: len(path)] == path]:
        del origins[p]
    origins[path] = f"override '{shown}'"
    return data


def _format_error(err: dict, origins: dict, default_source: str) -> str:
    loc = tuple(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    judge = loc[:1] == ("judge",)
    if judge:  # a judge option's error, its union tag left out of the key
        key, msg = error_text({**err, "loc": err["loc"][1:]})
        loc = ("judge", *key.split(".")) if key else ("judge",)
    if not loc and err["type"] == "value_error":  # a check across sections names its key first
        key, _, msg = msg.partition(": ")
        loc = tuple(key.split("."))
    source = default_source
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            source = origins[loc[:n]]
            break
    dotted = ".".join(loc) or "(top level)"
    if judge:
        return f"{source}: {dotted}: {msg}"
    if err["type"] == "extra_forbidden":
        return f"{source}: {dotted}: unknown key"
    if err["type"] == "missing":
        return f"{source}: {dotted}: required key is missing"
    secret = bool(loc) and is_secret_key(loc[-1])
    if err["type"] != "value_error" and not isinstance(err.get("input"), dict | list) and not secret:
        msg += f" (got {err.get('input')!r})"
    return f"{source}: {dotted}: {msg}"


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema=Recipe):
    """Read, merge and validate a recipe against ``schema`` (a `Recipe` by default); raise `UserError` with one
    line on any mistake. Without a path, the overrides alone are the recipe."""
    origins: dict[tuple, str] = {}
    if path is not None:
        given, path = path, recipe_file(path)
        if not path.exists():
            names = ", ".join(shipped_recipes())
            raise UserError(f"{given}: recipe file not found (or name a shipped recipe: {names})")
    data = _load_with_extends(path, origins) if path is not None else {}
    for override in overrides:
        data = apply_override(data, override, origins)
    source = str(_display(path.resolve())) if path is not None else "command line"
    try:
        recipe = schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(exc.errors()[0], origins, source)) from None
    recipe._source = path.resolve() if path is not None else None
    return recipe
