"""The `alphaalign train-rm` recipe: a configurable safety reward model (CSRM) from preference pairs with
configurations. Loaded by `alphaalign.config.load_recipe(path, schema=RewardModelRecipe)`, with the same
`extends:`, overrides and one-line errors as the RL recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from alphaalign.config import _Section

DEFAULT_CONFIG_TEMPLATES = [
    "Safety configuration. Allowed content: {{ allowed | join('; ') or 'none' }}. "
    "Forbidden content: {{ forbidden | join('; ') or 'none' }}.",
    "You are deployed under these safety rules. You may produce: {{ allowed | join('; ') or 'nothing sensitive' }}. "
    "You must never produce: {{ forbidden | join('; ') or 'nothing beyond the usual' }}.",
    "Content policy. Never: {{ forbidden | join('; ') or 'no extra restrictions' }}. "
    "Permitted on request: {{ allowed | join('; ') or 'no sensitive categories' }}.",
]


class RMModelConfig(_Section):
    # the initial model: a one-output sequence classifier, or a causal LM (a new one-output score head is added)
    name_or_path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_length: int = Field(1024, gt=0)  # tokens per chat (configuration + conversation), cut at the end
    build: Literal["demo"] | None = None  # build a tiny random classifier at name_or_path if it is missing


class RMDataConfig(_Section):
    # JSONL rows {config, prompt, chosen, rejected[, chosen_compliant, rejected_compliant]}
    pairs: list[str] = []
    # the pair files' column for a key whose column is named differently, e.g. {config: system_prompt}
    pair_fields: dict[str, str] = {}
    # JSONL rows {prompt, categories, responses: [{text, categories, addresses}]}, expanded by augmentation
    categorized: list[str] = []
    heldout_fraction: float = Field(0.2, gt=0, lt=1)  # share of prompts kept out of training, for calibration

    @field_validator("pair_fields")
    @classmethod
    def _known_pair_keys(cls, fields: dict[str, str]) -> dict[str, str]:
        keys = ("config", "prompt", "chosen", "rejected", "chosen_compliant", "rejected_compliant")
        for key in fields:
            if key not in keys:
                raise ValueError(f"unknown key {key!r}; the keys are {', '.join(keys)}")
        return fields

    @model_validator(mode="after")
    def _some_data(self) -> RMDataConfig:
        if not self.pairs and not self.categorized:
            raise ValueError("give at least one file in 'pairs' or 'categorized'")
        return self


class AugmentationConfig(_Section):
    categories: dict[str, str] = {}  # risk category name -> how configurations describe it
    configs_per_prompt: int = Field(4, ge=1)
    modes: list[Literal["exact_match", "superset", "safe", "not_superset"]] = Field(
        ["exact_match", "superset", "safe", "not_superset"], min_length=1
    )
    alpha: float = Field(0.1, ge=0)  # error per allowed category present in a response
    unaddressed: float = Field(1.0, gt=0)  # error of a response that does not address the request
    # error per forbidden category present; a chosen response must stay below it
    beta: float = Field(3.0, gt=0)
    # also label (configuration, request alone): compliant iff its categories are allowed
    prompt_labels: bool = True
    # Jinja templates of a configuration: {{ allowed }}, {{ forbidden }}
    templates: list[str] = Field(DEFAULT_CONFIG_TEMPLATES, min_length=1)

    @field_validator("beta")
    @classmethod
    def _severity_order(cls, beta: float, info: ValidationInfo) -> float:
        if "unaddressed" in info.data and not beta > info.data["unaddressed"]:
            raise ValueError(
                f"must exceed unaddressed ({info.data['unaddressed']}): a violation is worse than a refusal"
            )
        return beta


class RMTrainingConfig(_Section):
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, gt=0)  # preference pairs per step (and as many compliance-labelled chats)
    calibration_weight: float = Field(1.0, ge=0)  # λ in loss = BT + λ·BCE
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "outputs/csrm"
    log_every: int = Field(10, gt=0)


class RewardModelRecipe(_Section):
    model: RMModelConfig
    data: RMDataConfig
    augmentation: AugmentationConfig = AugmentationConfig()
    training: RMTrainingConfig = RMTrainingConfig()
    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _categorized_needs_categories(self) -> RewardModelRecipe:
        if self.data.categorized and not self.augmentation.categories:
            raise ValueError("augmentation.categories: data.categorized needs the risk categories")
        return self
