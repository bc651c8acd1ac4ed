"""Loading the policy, its tokenizer and the frozen reference model (HF ids or local folders).

With `model.lora` the policy is a PEFT model: the base weights are frozen, only the adapters train, and a
checkpoint's `policy/` folder holds just the adapters (`adapter_config.json` names the base model).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DynamicCache,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging as transformers_logging

from alphaalign.config import LoraSection, ModelConfig
from alphaalign.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def no_such_folder(name_or_path: str) -> bool:
    """A model named by a path (./m, /m, ~/m) with no folder there; a hub id never starts so."""
    return name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().is_dir()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


GROUPED_SDPA = "alphaalign_grouped_sdpa"


def grouped_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' `sdpa` attention, except that grouped key/value heads go to torch as they are
    (`enable_gqa`) when there is a mask as well. transformers copies them out to one per query head then,
    because CUDA's kernels would fall back to the math kernel; on CPU the copy is most of a decode attention
    call's cost (docs/design.md). Same result."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    precision = contextlib.nullcontext()
    if query.requires_grad and torch.is_autocast_enabled(query.device.type):
        # under model.autocast, attention that will be differentiated runs in float32: torch's CPU attention
        # is faster in bf16 forward only, and its bf16 backward is slower (docs/design.md, "Mixed precision")
        precision = torch.autocast(query.device.type, enabled=False)
        query, key, value = query.float(), key.float(), value.float()
    with precision:
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal and attention_mask is None and query.shape[2] > 1,
            enable_gqa=key.shape[1] != query.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def prompt_cache(model, input_ids, attention_mask, position_ids) -> DynamicCache:
    """The cache of one forward pass over left-padded prompt tokens (the prompts' shared part), for the
    completions that continue from it; gradients flow through it when the pass records them."""
    cache = DynamicCache()
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path or cfg.name_or_path, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise UserError(
            f"model.name_or_path: cannot load tokenizer from {cfg.name_or_path!r} ({exc})"
        ) from None
    if tokenizer.chat_template is None:
        raise UserError(f"model.name_or_path: the tokenizer of {cfg.name_or_path!r} has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, device: torch.device, path: str | None = None, trainable: bool = True):
    """The policy (`trainable`, with LoRA adapters when `model.lora` is set) or a frozen model.

    `path` overrides `model.name_or_path`; a folder holding only LoRA adapters (a LoRA run's checkpoint)
    is loaded onto the base model `model.name_or_path`.
    """
    return _load(AutoModelForCausalLM, cfg, device, path or cfg.name_or_path, cfg.name_or_path, trainable)


def load_value_model(cfg: ModelConfig, device: torch.device, path: str, base: str):
    """PPO's critic: the causal-LM backbone at `path` with a one-output head on every token (transformers'
    token classifier: `score`), trained like the policy (`model.`'s dtype, autocast, gradient checkpointing).

    `path` is a causal LM (the head starts random, small), a one-output reward model (its score head is kept)
    or a critic saved by a run. With `model.lora` the critic trains LoRA adapters of its own and its head on
    the frozen `base`; `path` may then hold just those (a LoRA run's checkpoint).
    """
    quiet = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    try:
        return _load(
            AutoModelForTokenClassification,
            cfg,
            device,
            path,
            base,
            True,
            "TOKEN_CLS",
            "critic.init_from",
            {"num_labels": 1, "classifier_dropout": 0.0},
        )
    finally:
        transformers_logging.set_verbosity(quiet)


def _load(
    auto_class,
    cfg: ModelConfig,
    device,
    path: str,
    lora_base: str,
    trainable: bool,
    task_type: str = "CAUSAL_LM",
    key: str = "model.name_or_path",
    config_updates: dict | None = None,
):
    adapters = trainable and cfg.lora is not None and (Path(path) / "adapter_config.json").is_file()
    base = lora_base if adapters else path
    options = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    try:
        if config_updates:
            options["config"] = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
            for name, value in config_updates.items():
                setattr(options["config"], name, value)
        model = auto_class.from_pretrained(base, **options)
    except OSError as exc:
        raise UserError(f"{key}: cannot load model from {base!r} ({exc})") from None
    model.to(device)
    if device.type == "cpu" and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
    if cfg.autocast is not None:
        run_under_autocast(model, DTYPES[cfg.autocast])
    if not trainable:
        model.requires_grad_(False)
        model.eval()
        return model
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) as well
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = not cfg.gradient_checkpointing
    if cfg.lora is not None:
        model = with_lora(model, cfg.lora, path if adapters else None, task_type)
    model.train()
    return model


def run_under_autocast(model, dtype: torch.dtype) -> None:
    """Mixed precision (`model.autocast`): the model's forward runs under `torch.autocast(dtype)` and hands back
    float32 outputs, the way accelerate prepares a model for TRL's bf16=True; weights and gradients stay in the
    model's own dtype. `generate` runs in one autocast region too, so that each weight is cast once per call
    rather than once per new token."""
    from accelerate.utils import convert_outputs_to_fp32

    device_type = next(model.parameters()).device.type
    # one autocast object per method: an object entered again inside itself restores the wrong state on exit
    model.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=dtype)(model.forward))
    if hasattr(model, "generate"):  # a critic does not generate
        model.generate = torch.autocast(device_type, dtype=dtype)(model.generate)


def with_lora(model, lora: LoraSection, adapter_path: str | None = None, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in trainable PEFT LoRA adapters: fresh ones, or those saved at `adapter_path`. A
    TOKEN_CLS model (the critic) trains its head as well (PEFT's modules_to_save)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path is not None:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


class AdapterDisabled:
    """The LoRA policy with its adapters switched off, i.e. the frozen base model: the KL reference
    without a second copy of the weights. Called like a model, under `torch.no_grad`."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **inputs):
        with self.policy.disable_adapter():
            return self.policy(**inputs)


def load_reference(cfg: ModelConfig, policy, device: torch.device):
    """The frozen KL reference: `ref_name_or_path`, else the LoRA policy's base, else the initial policy."""
    if cfg.lora is not None and cfg.ref_name_or_path is None:
        return AdapterDisabled(policy)
    return load_causal_lm(cfg, device, path=cfg.ref_name_or_path, trainable=False)
