"""The systems timed on a workload, each run in its own process (`python -m alphaalign.perf.systems ...`) so
that its peak RSS is its own. Every system does the same work per step: generate prompts × generations
completions of exactly `new_tokens` tokens, score them, one reference forward, one policy forward/backward
and one AdamW step. The per-step wall-clock seconds are printed as one JSON line after `RESULT_MARK`.

* `trl`: trl's GRPOTrainer in its fastest configuration found here (docs/benchmarks.md lists what was tried);
  `trl_defaults` keeps GRPOConfig's defaults (gradient checkpointing on) for comparison.
* `alphaalign`: `alphaalign.rl.trainer.train` with the in-process transformers engine.
* `trl_bf16`, `alphaalign_bf16`, `floor_bf16`: the same under bf16 mixed precision (float32 weights, forward
  passes under torch.autocast): trl's `bf16=True`, alphaalign's `model.autocast: bfloat16`. Float32 workloads only.
* `alphaalign_vllm_async`: the same with `rollout.engine: vllm_server` (a local vLLM server, checkpoint
  weight sync) and `rollout.async_steps: 1`.
* `floor`: the model calls alphaalign makes, called directly without the trainer around them.
* `floor_plain`: the same model work with transformers' defaults (sampling `generate`, whole-sequence forwards).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from alphaalign.perf.workload import WORKLOADS, Workload

RESULT_MARK = "BENCH_RESULT "
# what `run_system` can run
SYSTEMS = (
    "trl",
    "trl_defaults",
    "trl_bf16",
    "alphaalign",
    "alphaalign_bf16",
    "alphaalign_vllm_async",
    "floor",
    "floor_bf16",
    "floor_plain",
)
MIXED_PRECISION_SYSTEMS = ("trl_bf16", "alphaalign_bf16", "floor_bf16")


def prompt_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# trl


TRL_FASTEST = {"gradient_checkpointing": False}  # see docs/benchmarks.md: the variants tried


def run_trl(folder: Path, w: Workload, device: str, out: Path, overrides: dict) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alphaalign.rewards.alphaalign_safety import alphaalign_safety

    def safety(prompts, completions, label, **kwargs):
        return alphaalign_safety(prompts, [c[0]["content"] for c in completions], label=label)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.seconds.append(time.perf_counter() - self.start)

    rows = prompt_rows(folder)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "label": r["label"]} for r in rows]
    )
    config = dict(
        output_dir=str(out),
        use_cpu=device == "cpu",
        bf16=w.dtype == "bfloat16",
        fp16=False,
        model_init_kwargs={"dtype": w.dtype},
        per_device_train_batch_size=w.prompts * w.generations,
        gradient_accumulation_steps=1,
        num_generations=w.generations,
        max_completion_length=w.new_tokens,
        generation_kwargs={"min_new_tokens": w.new_tokens},
        temperature=1.0,
        beta=w.beta,
        loss_type="dapo",
        num_iterations=1,
        learning_rate=w.learning_rate,
        max_steps=w.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    config.update(overrides)
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=str(folder),
        reward_funcs=[safety],
        args=GRPOConfig(**config),
        train_dataset=dataset,
        callbacks=[timer],
    )
    trainer.train()
    return timer.seconds


# ---------------------------------------------------------------------------------------------------------
# alphaalign


def alphaalign_recipe(
    folder: Path, w: Workload, device: str, out: Path, engine: str, autocast: str | None = None
):
    from alphaalign.config import Recipe

    rollout = {
        "engine": engine,
        "num_generations": w.generations,
        "max_new_tokens": w.new_tokens,
        "min_new_tokens": w.new_tokens,
        "temperature": 1.0,
    }
    if engine == "vllm_server":
        rollout["async_steps"] = 1
    else:
        rollout["static_cache"] = device == "cuda"  # CUDA graphs on a GPU; see docs/gpu.md
    return Recipe.model_validate(
        {
            "model": {"name_or_path": str(folder), "dtype": w.dtype, "autocast": autocast},
            "data": {"train": [{"path": str(folder / "prompts.jsonl")}], "template": "none"},
            "rollout": rollout,
            "algorithm": {"loss_type": "dapo", "beta": w.beta, "kl_estimator": "k3", "num_iterations": 1},
            "trainer": {
                "learning_rate": w.learning_rate,
                "prompts_per_step": w.prompts,
                "max_steps": w.steps,
                "save_every": 10**6,
                "output_dir": str(out),
                "device": device,
                "progress_bar": False,
            },
            "rewards": [{"name": "alphaalign_safety"}],
            "logging": {"wandb_mode": "disabled"},
        }
    )


def run_alphaalign(
    folder: Path, w: Workload, device: str, out: Path, engine: str, autocast: str | None = None
) -> list[float]:
    from alphaalign.rl.trainer import train

    train(alphaalign_recipe(folder, w, device, out, engine, autocast))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["time/step_s"] for line in lines]


# ---------------------------------------------------------------------------------------------------------
# the floors: the model work alone


def run_floor(
    folder: Path, w: Workload, device: str, plain: bool, autocast: str | None = None
) -> list[float]:
    """One step's model work and nothing else: sample, reference forward, policy forward/backward, AdamW.

    `plain`: transformers' defaults, as a hand-written loop (or trl) calls them: `generate` with sampling and
    `num_return_sequences`, whole-sequence forwards, transformers' sdpa attention. Otherwise the model calls
    alphaalign makes, called directly: its model loading (grouped sdpa on CPU), its engine's `generate`, its
    shared-prompt forward and its fused log-prob/entropy; without the trainer around them (recipe, data, reward
    stack, advantages, metrics, logging). `autocast`: alphaalign's `model.autocast` (not with `plain`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphaalign.config import ModelConfig
    from alphaalign.models import load_causal_lm
    from alphaalign.rl.algos import token_logprobs, token_logprobs_and_entropy
    from alphaalign.rl.batching import completion_logits, micro_batches
    from alphaalign.rollout.base import SamplingParams
    from alphaalign.rollout.transformers_engine import TransformersEngine

    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for r in prompt_rows(folder)
    ]
    if plain:
        policy, ref = (
            AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, w.dtype)).to(device)
            for _ in range(2)
        )
        ref.requires_grad_(False).eval()
        sample, logprobs = plain_model_calls(policy, tokenizer, encoded, w, device)
    else:
        config = ModelConfig(name_or_path=str(folder), dtype=w.dtype, autocast=autocast)
        policy = load_causal_lm(config, torch.device(device))
        ref = load_causal_lm(config, torch.device(device), trainable=False)
        engine = TransformersEngine(
            policy, tokenizer, w.prompts * w.generations, static_cache=device == "cuda"
        )
        sampling = SamplingParams(w.new_tokens, min_new_tokens=w.new_tokens)

        def sample():
            rollouts = engine.generate(encoded, w.generations, sampling)
            return micro_batches(
                rollouts, 10**9, [True] * len(rollouts.completion_ids), tokenizer.pad_token_id, device
            )[0]

        def logprobs(model, mb):
            logits = completion_logits(model, mb)
            if torch.is_grad_enabled():
                return token_logprobs_and_entropy(logits, mb.completion_ids)[0]
            return token_logprobs(logits, mb.completion_ids)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=w.learning_rate)
    seconds = []
    for _ in range(w.steps):
        start = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            batch = sample()
            ref_logp = logprobs(ref, batch)
        policy.train()
        logp = logprobs(policy, batch)
        advantages = torch.randn(logp.shape[0], 1, device=device)  # scoring is not model work
        log_ratio = ref_logp - logp
        loss = (
            -torch.exp(logp - logp.detach()) * advantages + w.beta * (log_ratio.exp() - log_ratio - 1)
        ).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def plain_model_calls(policy, tokenizer, encoded: list[list[int]], w: Workload, device: str):
    """`sample()` -> token sequences [B, P + C] and `logprobs(model, sequences)` with transformers' defaults."""
    width = max(map(len, encoded))
    prompt_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + list(p) for p in encoded])
    prompt_mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in encoded])[:, None]).long()
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    full_mask = torch.cat(
        [
            prompt_mask.repeat_interleave(w.generations, 0),
            torch.ones(len(encoded) * w.generations, w.new_tokens, dtype=torch.long, device=device),
        ],
        1,
    )
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)

    def sample():
        return policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            max_new_tokens=w.new_tokens,
            min_new_tokens=w.new_tokens,
            num_return_sequences=w.generations,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    def logprobs(model, sequences):
        logits = model(
            input_ids=sequences,
            attention_mask=full_mask,
            position_ids=positions,
            logits_to_keep=w.new_tokens + 1,
            use_cache=False,
        ).logits[:, :-1]
        targets = sequences[:, -w.new_tokens :]
        return logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    return sample, logprobs


# ---------------------------------------------------------------------------------------------------------


class PeakRSS:
    """Samples the resident memory of this process plus all its descendants (a vLLM server and its engine
    process) every `interval` seconds in a background thread; `peak_mb` is the largest sum seen."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.process, self.interval, self.peak_mb = psutil.Process(), interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.process, *self.process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_system(system: str, folder: Path, workload: Workload, device: str) -> dict:
    runners = {
        "trl": lambda out: run_trl(folder, workload, device, out, TRL_FASTEST),
        "trl_defaults": lambda out: run_trl(folder, workload, device, out, {}),
        "trl_bf16": lambda out: run_trl(folder, workload, device, out, {**TRL_FASTEST, "bf16": True}),
        "alphaalign": lambda out: run_alphaalign(folder, workload, device, out, "transformers"),
        "alphaalign_bf16": lambda out: run_alphaalign(
            folder, workload, device, out, "transformers", "bfloat16"
        ),
        "alphaalign_vllm_async": lambda out: run_alphaalign(folder, workload, device, out, "vllm_server"),
        "floor": lambda out: run_floor(folder, workload, device, plain=False),
        "floor_bf16": lambda out: run_floor(folder, workload, device, plain=False, autocast="bfloat16"),
        "floor_plain": lambda out: run_floor(folder, workload, device, plain=True),
    }
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as tmp, PeakRSS() as memory:
        try:
            seconds = runners[system](Path(tmp))
        except Exception:
            for log in sorted(Path(tmp).rglob("*.log")):  # a vLLM server's output
                print(f"---- {log.name}\n{log.read_text(errors='replace')}", file=sys.stderr)
            raise
    own_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "step_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(max(memory.peak_mb, own_peak_mb), 1),
    }
    if device == "cuda":  # what torch's allocator held at most in this process (not a vLLM server's memory)
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


if __name__ == "__main__":
    name, model_folder, workload_name, device_name = sys.argv[1:5]
    os.environ.setdefault("WANDB_MODE", "disabled")
    result = run_system(name, Path(model_folder), WORKLOADS[workload_name], device_name)
    print(RESULT_MARK + json.dumps(result), flush=True)
