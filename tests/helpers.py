"""Plain helpers that several test files share (fixtures live in conftest.py): the repository's paths, the tiny
offline models, short training recipes and their metrics, and the queries of a local Slurm cluster.

Test files import it as `helpers`: pyproject's `pythonpath = ["tests"]` puts this folder on the path."""

import contextlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "recipes" / "data" / "demo"
DEMO_RECIPE = ROOT / "recipes" / "demo.yaml"

# The stored calibration of the tiny_csrm fixture: a stand-in for a trained CSRM's.
CSRM_CALIBRATION = {"temperature": 2.0, "bias": 0.25}


# ---------------------------------------------------------------------------------------------------------
# Tiny offline models


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


def build_tiny_classifier(path: Path, num_labels: int = 1, labels: list[str] | None = None) -> Path:
    """A random ~50k-parameter Qwen2ForSequenceClassification with a locally trained tokenizer that has a
    chat template: a stand-in for a reward model (one output) or a refusal classifier (named labels)."""
    from alphaalign.demo import build

    texts = [ex.prompt for ex in demo_examples(limit=128)] + [
        build.response_text(*p) for p in build.REFUSALS + build.COMPLIANCES
    ]
    return build.build_tiny_classifier(path, texts * 4, num_labels, labels)


# Checks of the kind real chat templates make (Llama-2 and Mistral: roles alternate; Gemma: no system role), through
# transformers' `raise_exception`.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ALTERNATING_TEMPLATE = (
    "{% set turns = messages[1:] if messages[0]['role'] == 'system' else messages %}{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% endfor %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
)


def with_chat_template(model: Path, copy: Path, template: str) -> Path:
    """A copy of a tiny model folder whose tokenizer has another chat template."""
    import shutil

    shutil.copytree(model, copy)
    (copy / "chat_template.jinja").write_text(template)
    return copy


def reference_chat_logits(path, chats):
    """A sequence classifier's logit for each chat, one chat at a time and unpadded: what the CSRM must read."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False, return_tensors="pt")
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Short training runs

TIMING = ("time/", "throughput/")


def recipe_for(write_recipe, tiny_policy, tmp_path, **sections):
    """A 3-step GRPO recipe on the tiny policy (4 prompts x 4 samples of 32 tokens), writing to tmp_path/run;
    `sections` are merged over it."""
    base = {
        "model": {"name_or_path": str(tiny_policy)},
        "data": {"template": "none"},
        "rollout": {"num_generations": 4, "max_new_tokens": 32},
        "trainer": {
            "prompts_per_step": 4,
            "max_steps": 3,
            "learning_rate": 1e-3,
            "output_dir": str(tmp_path / "run"),
            "save_every": 2,
            "progress_bar": False,
        },
        "logging": {"wandb_mode": "disabled"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_recipe(base)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def jsonl_rows(path) -> int:
    """The number of non-blank lines of a JSONL file, counted here rather than by the code under test."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def strip_timing(rows):
    """Metric rows without their wall-clock figures, which differ between identical runs."""
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def demo_overrides(policy, steps: int) -> list[str]:
    """The CPU demo (recipes/demo.yaml) shortened: the tiny test policy instead of building the demo's, 2
    prompts x 2 samples of 8 tokens per step, a checkpoint every 2 steps, no held-out evaluation."""
    return [
        f"model.name_or_path={policy}",
        "model.build=null",
        "data.eval=[]",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=8",
        "trainer.prompts_per_step=2",
        f"trainer.max_steps={steps}",
        "trainer.save_every=2",
        "trainer.progress_bar=false",
        "logging.wandb_mode=disabled",
    ]


# ---------------------------------------------------------------------------------------------------------
# `alphaalign launch` and a local Slurm cluster

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}


def launch(capsys, *args) -> tuple[int, str, str]:
    """`alphaalign launch ARGS` in this process: exit code, stdout, stderr."""
    from alphaalign.cli import main

    code = main(["launch", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def job_field(job_id: str, name: str) -> str:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    found = re.search(rf"\b{name}=(\S*)", line)
    return found.group(1) if found else ""


def wait_for(job_id: str, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_field(job_id, "JobState")) not in states:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(0.5)
    return state


def job_report(job_id: str, run) -> str:
    logs = sorted((run / "logs").glob("*")) if (run / "logs").is_dir() else []
    return f"job {job_id}: {job_field(job_id, 'JobState')} {job_field(job_id, 'Reason')}\n" + "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs
    )


def freeze_trainer(run) -> None:
    """SIGSTOP this run's trainer processes, so that a requeue lands mid-run however fast the steps are (Slurm
    sends SIGCONT with the SIGTERM that ends them)."""
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "alphaalign.cli" in command and "train" in command and any(str(run) in arg for arg in command):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGSTOP)
