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


def demo_examples(split: str = "train", limit: int | None = None):
    from alphaalign.data import Example

    rows = [json.loads(line) for line in (DEMO_DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return [Example(r["prompt"], r["label"]) for r in rows[:limit]]


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    """A ~0.2M-parameter Qwen2 with a locally trained tokenizer, warm-started for two epochs on the demo
    prompts so that its completions vary in format and refusal (a random model earns only zero rewards)."""
    from alphaalign.data import ALPHAALIGN_TEMPLATE, compile_template
    from alphaalign.demo.build import CHATML, random_qwen2, train_tokenizer, warm_start

    examples = demo_examples("train", limit=160)
    tokenizer = train_tokenizer([ex.prompt for ex in examples] + [ALPHAALIGN_TEMPLATE, CHATML], vocab_size=600)
    model = random_qwen2(tokenizer, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=0)
    warm_start(model, tokenizer, examples, compile_template("alphaalign"), None, epochs=2)
    path = tmp_path_factory.mktemp("policy") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict (merged over a small valid base) to tmp_path and return its path."""

    def write(overrides: dict | None = None, name: str = "recipe.yaml", base: bool = True) -> Path:
        recipe = {
            "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"},
            "data": {"train": [{"path": str(DEMO_DATA / "train.jsonl")}]},
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
