"""CSRM: a configurable safety reward model (Jiang et al., arXiv 2605.30487) as the reward term `csrm`.

A CSRM is a one-output `AutoModelForSequenceClassification` that reads a safety configuration c (the rules a
deployment sets: what is allowed, what is forbidden) and a conversation x (user request, assistant answer),
and returns a logit z = f(c, x). The chat it reads is [system: c, user: prompt, assistant: answer], rendered
with the model tokenizer's own chat template (CoSAlign's convention: the configuration is the system prompt).

The paper's method section was not readable (shared/research/csrm.md §1.4); what follows is our
reconstruction. The calibrated probability that the answer complies with the configuration is

    P(compliant | c, x) = σ((z − b) / T)                                            (temperature scaling)

with temperature T > 0 and bias b fitted on held-out compliance labels after training
(`fit_calibration`) and stored beside the weights in `csrm_calibration.json`. The reward (`output` arg):

    probability               p = σ((z − b) / T) ∈ (0, 1)
    log_odds                  log(p / (1 − p)) = (z − b) / T
    helpfulness_x_compliance  R = h · s, with h ≥ 0 the normalized helpfulness of the answer (paper Eq. 6 of
                              AlphaAlign: RM score z-scored in the prompt's group, clipped at 0, 0 for
                              refusals) from `helpfulness_model`, and s ∈ [−1, 1] the compliance sign:
                              s = 2p − 1 (compliance: expected, the expectation of ±1 under p) or
                              s = +1 if p ≥ threshold else −1 (compliance: hard). This is CoSA-Score's
                              per-response term, helpfulness × (±1 compliance), with our two scores.

The configuration of each row is the row's `config_column` value (default: the data column `config`); a row
without one falls back to the fixed `config_text` from the recipe; a row with neither is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from alphaalign import parsing
from alphaalign.errors import UserError
from alphaalign.rewards.helpfulness import helpfulness_rm
from alphaalign.rewards.refusal_arg import check_refusal_args
from alphaalign.rewards.registry import register_reward
from alphaalign.rewards.verifiers import parse_alphaalign

CALIBRATION_FILE = "csrm_calibration.json"
OUTPUTS = ("probability", "log_odds", "helpfulness_x_compliance")


@dataclass(frozen=True)
class Calibration:
    """P(compliant) = σ((logit − bias) / temperature)."""

    temperature: float = 1.0
    bias: float = 0.0

    def log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits - self.bias) / self.temperature

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_odds(logits))


def save_calibration(model_dir: str | Path, calibration: Calibration, **info) -> Path:
    """Write ``csrm_calibration.json`` (temperature, bias and any ``info``, e.g. how it was fitted)."""
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(json.dumps({**asdict(calibration), **info}, indent=2) + "\n")
    return path


def load_calibration(model: str, temperature: float | None = None, bias: float | None = None) -> Calibration:
    """The calibration stored with ``model`` (a folder or a hub id); ``temperature``/``bias`` override it."""
    if temperature is not None and bias is not None:
        return _checked(Calibration(float(temperature), float(bias)), "args")
    from transformers.utils import cached_file

    from alphaalign.models import no_such_folder

    if no_such_folder(model):
        raise UserError(f"csrm: {model!r}: no such folder")
    try:
        path = cached_file(model, CALIBRATION_FILE, _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if path is None:
        raise UserError(
            f"csrm: {model!r} has no {CALIBRATION_FILE}; train it with `alphaalign train-rm`, "
            "or give both args temperature and bias"
        )
    try:
        stored = parsing.loads(Path(path).read_text())
        found = Calibration(float(stored["temperature"]), float(stored["bias"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a valid calibration file ({exc.__class__.__name__}: {exc})") from None
    overridden = Calibration(
        found.temperature if temperature is None else float(temperature),
        found.bias if bias is None else float(bias),
    )
    return _checked(overridden, str(path))


def _checked(calibration: Calibration, where: str) -> Calibration:
    if not (calibration.temperature > 0 and math.isfinite(calibration.temperature)):
        raise UserError(f"{where}: temperature must be a positive number, got {calibration.temperature}")
    if not math.isfinite(calibration.bias):
        raise UserError(f"{where}: bias must be a finite number, got {calibration.bias}")
    return calibration


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> Calibration:
    """Temperature and bias minimising the binary cross-entropy of σ((z − b)/T) against ``labels`` (1 =
    compliant), by L-BFGS on (log T, b). Needs both classes: with one, the optimum is at infinity."""
    z, y = logits.detach().double().flatten(), labels.detach().double().flatten()
    if y.numel() == 0 or y.min() == y.max():
        raise UserError("calibration needs held-out examples of both compliant and non-compliant answers")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits((z - bias) / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return Calibration(float(log_t.detach().exp()), float(bias.detach()))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE of probabilities ``probs`` of the event ``labels == 1``: Σ_b (n_b / N)·|mean(labels_b) −
    mean(probs_b)| over ``bins`` equal-width bins of [0, 1] (the last bin includes 1)."""
    p, y = probs.detach().double().flatten(), labels.detach().double().flatten()
    if p.numel() == 0:
        return math.nan
    index = (p * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            total += float(in_bin.sum()) / p.numel() * abs(float(y[in_bin].mean() - p[in_bin].mean()))
    return total


def row_configs(n: int, columns: dict, config_text: str | None, config_column: str | None) -> list[str]:
    """Each row's configuration: its ``config_column`` value, else the fixed ``config_text``."""
    values = columns.get(config_column) if config_column else None
    out = []
    for i in range(n):
        value = values[i] if values is not None else None
        value = value if isinstance(value, str) and value.strip() else config_text
        if value is None:
            where = f"no '{config_column}' value and " if config_column else ""
            raise UserError(f"csrm: row {i} has {where}no args.config_text to fall back on")
        out.append(value)
    return out


def compliance_logits(
    model: str,
    chats: list[list[dict]],
    dtype: str,
    device: str,
    trust_remote_code: bool,
    batch_size: int,
    max_length: int,
) -> torch.Tensor:
    """The CSRM's raw logits z for ``chats`` ([system: configuration, user, assistant?] lists)."""
    from alphaalign.rewards.rm_scoring import load_classifier, score_chats

    clf = load_classifier(model, dtype, device, trust_remote_code)
    return torch.tensor(score_chats(clf, chats, batch_size, max_length), dtype=torch.float64)


@register_reward("csrm", check=check_refusal_args)
def csrm(
    prompts: list[str],
    completions: list[str],
    *,
    model: str,
    config_text: str | None = None,
    config_column: str | None = "config",
    output: Literal["probability", "log_odds", "helpfulness_x_compliance"] = "probability",
    compliance: Literal["expected", "hard"] = "expected",
    threshold: float = 0.5,
    helpfulness_model: str | None = None,
    temperature: float | None = None,
    bias: float | None = None,
    group: list | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    batch_size: int = 8,
    max_length: int = 4096,
    reasoning_tag: str = "safety_reasoning",
    answer_tag: str = "answer",
    refusal: dict | None = None,
    refusal_classifier: str | None = None,
    refusal_label: str | int | None = None,
    refusal_threshold: float | None = None,
    **columns,
) -> list[float]:
    """The CSRM's calibrated compliance of each final answer with its row's safety configuration."""
    from alphaalign.rewards.rm_scoring import user_assistant

    if output not in OUTPUTS:
        raise UserError(f"csrm: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if compliance not in ("expected", "hard"):
        raise UserError(f"csrm: compliance must be 'expected' or 'hard', got {compliance!r}")
    if output == "helpfulness_x_compliance" and not helpfulness_model:
        raise UserError("csrm: output helpfulness_x_compliance needs args.helpfulness_model")
    if not completions:
        return []
    calibration = load_calibration(model, temperature, bias)
    configs = row_configs(len(completions), columns, config_text, config_column)
    answers = [parse_alphaalign(c, reasoning_tag, answer_tag).final for c in completions]
    chats = [user_assistant(p, a, c) for p, a, c in zip(prompts, answers, configs, strict=True)]
    logits = compliance_logits(model, chats, dtype, device, trust_remote_code, batch_size, max_length)
    if output == "log_odds":
        return calibration.log_odds(logits).tolist()
    p_comply = calibration.probability(logits)
    if output == "probability":
        return p_comply.tolist()
    sign = 2 * p_comply - 1 if compliance == "expected" else torch.where(p_comply >= threshold, 1.0, -1.0)
    helpfulness = helpfulness_rm(
        prompts,
        completions,
        model=helpfulness_model,
        group=group,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        batch_size=batch_size,
        max_length=max_length,
        reasoning_tag=reasoning_tag,
        answer_tag=answer_tag,
        refusal=refusal,
        refusal_classifier=refusal_classifier,
        refusal_label=refusal_label,
        refusal_threshold=refusal_threshold,
    )
    return [h * float(s) for h, s in zip(helpfulness, sign, strict=True)]
