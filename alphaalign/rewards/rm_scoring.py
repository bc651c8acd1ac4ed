"""Sequence-classification models as reward models and classifiers (HF ids or local folders).

`load_classifier` loads any `AutoModelForSequenceClassification` once per (path, dtype, device,
trust_remote_code) and keeps it, so a reward term called every step does not reload it. `score_chats` scores
chats (any roles and turns, e.g. a CSRM's configuration as the system turn) rendered with the model
tokenizer's own chat template, `score_conversations` (user prompt, assistant answer) pairs;
`label_probabilities` classifies plain texts. Both run in batches (sorted by length to limit padding), with
right truncation at `max_length` tokens, under `torch.no_grad`.

dtype "auto" means bfloat16 on a GPU and float32 on the CPU; device "auto" means CUDA when available.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from alphaalign.errors import UserError
from alphaalign.models import DTYPES, no_such_folder
from alphaalign.templates import render_chats


@dataclass(frozen=True)
class Classifier:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_classifier(
    name_or_path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> Classifier:
    """The model and tokenizer at ``name_or_path``, loaded once per process for each set of arguments."""
    dev = resolve_device(device)
    return _load(name_or_path, resolve_dtype(dtype, dev), dev, trust_remote_code)


@lru_cache(maxsize=4)
def _load(name_or_path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> Classifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if no_such_folder(name_or_path):  # else transformers reads it as a malformed hub id
        raise UserError(f"cannot load sequence-classification model {name_or_path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(
            f"cannot load sequence-classification model {name_or_path!r} ({first_line})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model.to(device).eval().requires_grad_(False)
    return Classifier(model, tokenizer, device, name_or_path)


def _logits(clf: Classifier, texts: list[str], batch_size: int, max_length: int, special_tokens: bool):
    """[N, num_labels] float32 logits, in the order of ``texts``."""
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out = torch.empty((len(texts), clf.model.config.num_labels), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            enc = clf.tokenizer(
                [texts[i] for i in rows],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=special_tokens,
            )
            logits = clf.model(**{k: v.to(clf.device) for k, v in enc.items()}).logits
            out[rows] = logits.float().cpu()
    return out


def render_classifier_chats(clf: Classifier, chats: list[list[dict]]) -> list[str]:
    """Each chat (a list of {role, content} messages) in the model tokenizer's own chat template."""
    if clf.tokenizer.chat_template is None:
        raise UserError(f"reward model {clf.name!r}: its tokenizer has no chat template")
    return render_chats(clf.tokenizer, chats, tokenize=False)


def render_conversations(clf: Classifier, prompts: list[str], answers: list[str]) -> list[str]:
    """Each (prompt, answer) as a user/assistant chat in the model tokenizer's own template."""
    return render_classifier_chats(clf, [user_assistant(p, a) for p, a in zip(prompts, answers, strict=True)])


def user_assistant(prompt: str, answer: str | None, system: str | None = None) -> list[dict]:
    """The chat [system?, user, assistant?]: no system turn when ``system`` is None, no reply when
    ``answer`` is None."""
    chat = [{"role": "system", "content": system}] if system is not None else []
    chat.append({"role": "user", "content": prompt})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def score_chats(
    clf: Classifier, chats: list[list[dict]], batch_size: int = 8, max_length: int = 4096
) -> list[float]:
    """The reward model's scalar score (its one logit) for each chat."""
    if clf.model.config.num_labels != 1:
        raise UserError(
            f"reward model {clf.name!r} has {clf.model.config.num_labels} outputs; a reward model needs 1"
        )
    # the chat template already writes any BOS token
    texts = render_classifier_chats(clf, chats)
    return _logits(clf, texts, batch_size, max_length, special_tokens=False)[:, 0].tolist()


def score_conversations(
    clf: Classifier, prompts: list[str], answers: list[str], batch_size: int = 8, max_length: int = 4096
) -> list[float]:
    """The reward model's scalar score for each (user prompt, assistant answer) conversation."""
    chats = [user_assistant(p, a) for p, a in zip(prompts, answers, strict=True)]
    return score_chats(clf, chats, batch_size, max_length)


def label_index(clf: Classifier, label: str | int) -> int:
    """The output index of ``label``: a name from the model's id2label, or an index."""
    names = {str(name).lower(): int(i) for i, name in clf.model.config.id2label.items()}
    if isinstance(label, int) or str(label).isdigit():
        index = int(label)
        if not 0 <= index < clf.model.config.num_labels:
            raise UserError(f"classifier {clf.name!r} has no output {index}")
        return index
    if str(label).lower() not in names:
        raise UserError(f"classifier {clf.name!r} has no label {label!r}; its labels: {', '.join(names)}")
    return names[str(label).lower()]


def label_probabilities(
    clf: Classifier, texts: list[str], label: str | int, batch_size: int = 16, max_length: int = 512
) -> list[float]:
    """Softmax probability of ``label`` for each text (a one-output model: sigmoid of its logit)."""
    logits = _logits(clf, texts, batch_size, max_length, special_tokens=True)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0]).tolist()
    return torch.softmax(logits, dim=1)[:, label_index(clf, label)].tolist()
