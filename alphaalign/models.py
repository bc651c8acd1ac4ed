"""Loading the policy, its tokenizer and the frozen reference model (HF ids or local folders)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alphaalign.config import ModelConfig
from alphaalign.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


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
    path = path or cfg.name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load model from {path!r} ({exc})") from None
    model.to(device)
    if trainable:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = not cfg.gradient_checkpointing
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()
    return model
