"""The benchmark workloads: a random-weight Qwen2, a byte-level BPE tokenizer trained offline, fixed prompts.

W1 (CPU): hidden 256, 4 layers, intermediate 1024, 4 heads, 2 KV heads, tied embeddings, vocabulary 4096;
8 prompts × 8 generations of exactly 64 new tokens; β = 0.04 (k3, frozen reference); loss dapo; one update
per batch; 6 steps, the first not counted. `qwen2.5-1.5b` has Qwen2.5-1.5B's shape (bf16, for a GPU);
`tiny` is a seconds-long version of W1 for the tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alphaalign.demo.build import TAGS, random_qwen2, train_tokenizer
from alphaalign.resources import package_path

DEMO_DATA = package_path("recipes", "data", "demo")


@dataclass(frozen=True)
class Workload:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int  # the tokenizer's vocabulary; the model's embedding table has `model_vocab` rows
    model_vocab: int | None = None  # None: the tokenizer's size
    dtype: str = "float32"
    prompts: int = 8
    generations: int = 8
    new_tokens: int = 64
    beta: float = 0.04
    learning_rate: float = 1e-5
    steps: int = 6  # the first is a warm-up and is not counted

    def describe(self) -> dict:
        return asdict(self)


WORKLOADS = {
    "w1": Workload("w1", hidden=256, layers=4, intermediate=1024, heads=4, kv_heads=2, vocab=4096),
    "qwen2.5-1.5b": Workload(
        "qwen2.5-1.5b",
        hidden=1536,
        layers=28,
        intermediate=8960,
        heads=12,
        kv_heads=2,
        vocab=4096,
        model_vocab=151936,
        dtype="bfloat16",
    ),
    "tiny": Workload(
        "tiny",
        hidden=64,
        layers=2,
        intermediate=128,
        heads=2,
        kv_heads=1,
        vocab=512,
        prompts=2,
        generations=2,
        new_tokens=8,
        steps=3,
    ),
}


def corpus(limit_bytes: int = 3_000_000) -> list[str]:
    """Tokenizer training text that exists on every machine: the demo prompts and the Python standard library."""
    texts = [json.loads(line)["prompt"] for f in sorted(DEMO_DATA.glob("*.jsonl")) for line in f.open()]
    size = 0
    for path in sorted(Path(json.__file__).parents[1].glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size > limit_bytes:
            break
    return texts


def bench_prompts(n: int) -> list[dict]:
    """`n` demo training prompts, harmful and benign alternating."""
    files = [(DEMO_DATA / f"train_{label}.jsonl").read_text().splitlines() for label in ("harmful", "benign")]
    rows = [json.loads(line) for pair in zip(*files, strict=True) for line in pair]
    return [{"prompt": r["prompt"], "label": r["label"]} for r in rows[:n]]


def build(workload: Workload, folder: Path) -> Path:
    """Save the random policy, its tokenizer and the prompt file into `folder` (reused when present)."""
    if (folder / "config.json").exists():
        return folder
    tokenizer = train_tokenizer(corpus(), vocab_size=workload.vocab - len(TAGS))  # the tags are added after
    model = random_qwen2(
        tokenizer,
        hidden=workload.hidden,
        layers=workload.layers,
        heads=workload.heads,
        kv_heads=workload.kv_heads,
        intermediate=workload.intermediate,
        seed=0,
        vocab_size=workload.model_vocab,
    )
    model.to(getattr(torch, workload.dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with (folder / "prompts.jsonl").open("w") as f:
        for row in bench_prompts(workload.prompts):
            f.write(json.dumps(row) + "\n")
    return folder
