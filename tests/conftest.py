"""Shared fixtures: a tiny offline policy and recipe files. Nothing here touches the network."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "recipes" / "data" / "demo"

torch.set_num_threads(2)


def demo_examples(limit: int | None = None):
    """The demo's training prompts, harmful and benign alternating."""
    from alphaalign.data import Example

    files = [(DEMO_DATA / f"train_{label}.jsonl").read_text().splitlines() for label in ("harmful", "benign")]
    rows = [json.loads(line) for pair in zip(*files, strict=True) for line in pair]
    return [Example(r["prompt"], r["label"]) for r in rows[:limit]]


def build_tiny_policy(path: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A ~0.2M-parameter Qwen2 with a locally trained tokenizer, briefly warm-started on the demo prompts so
    that its completions vary in format and refusal (a random model earns only zero rewards)."""
    from alphaalign.data import compile_template
    from alphaalign.demo.build import (
        COMPLIANCES,
        REFUSALS,
        random_qwen2,
        response_text,
        train_tokenizer,
        warm_start,
    )

    examples = demo_examples(limit=256)
    responses = [response_text(*pair) for pair in REFUSALS + COMPLIANCES]
    tokenizer = train_tokenizer([ex.prompt for ex in examples] + responses * 50, vocab_size=600)
    model = random_qwen2(
        tokenizer, hidden=64, layers=2, heads=heads, kv_heads=kv_heads, intermediate=128, seed=0
    )
    warm_start(model, tokenizer, examples, compile_template("none"), None, epochs=12)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny")


@pytest.fixture(scope="session")
def vllm_policy(tmp_path_factory) -> Path:
    """The tiny policy with head size 32, the smallest that vLLM's CPU attention supports."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny-hd32", heads=2, kv_heads=1)


def build_tiny_classifier(path: Path, num_labels: int = 1, labels: list[str] | None = None) -> Path:
    """A random ~50k-parameter Qwen2ForSequenceClassification with a locally trained tokenizer that has a
    chat template: a stand-in for a reward model (one output) or a refusal classifier (named labels)."""
    from alphaalign.demo import build

    texts = [ex.prompt for ex in demo_examples(limit=128)] + [
        build.response_text(*p) for p in build.REFUSALS + build.COMPLIANCES
    ]
    return build.build_tiny_classifier(path, texts * 4, num_labels, labels)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory) -> Path:
    """A tiny random reward model (one output) in a local folder."""
    return build_tiny_classifier(tmp_path_factory.mktemp("rm") / "tiny-rm")


CSRM_CALIBRATION = {"temperature": 2.0, "bias": 0.25}


@pytest.fixture(scope="session")
def tiny_csrm(tiny_rm, tmp_path_factory) -> Path:
    """The tiny random RM with a stored calibration (temperature 2, bias 0.25): a stand-in for a trained CSRM."""
    import shutil

    from alphaalign.rewards.csrm import Calibration, save_calibration

    path = tmp_path_factory.mktemp("csrm") / "tiny-csrm"
    shutil.copytree(tiny_rm, path)
    save_calibration(path, Calibration(**CSRM_CALIBRATION))
    return path


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict (merged over a small valid base) to tmp_path and return its path."""

    def write(overrides: dict | None = None, name: str = "recipe.yaml", base: bool = True) -> Path:
        recipe = {
            "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"},
            "data": {"train": [{"path": str(DEMO_DATA / f"train_{label}.jsonl")} for label in ("harmful", "benign")]},
            "rewards": [{"name": "alphaalign_safety"}],
        } if base else {}  # fmt: skip
        for key, value in (overrides or {}).items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key] = {**recipe[key], **value}
            else:
                recipe[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write
