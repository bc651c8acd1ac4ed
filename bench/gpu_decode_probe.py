"""Where the in-process engine's rollout time goes on a GPU (docs/gpu.md, section 3).

Times the engine's `generate` (8 prompts x 8 completions x 64 new tokens, the bench workload) on the model of
Qwen2.5-1.5B's shape, with the default cache and with `static_cache` (transformers compiles the decode step and
replays it as a CUDA graph), and profiles one call of each: the GPU's kernel time against the wall time says
whether the decode loop waits on the GPU or the GPU waits on the host (kernel launches, Python).
Run from the repository root on a CUDA machine: `python bench/gpu_decode_probe.py`.
"""

import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

from alphaalign.config import ModelConfig
from alphaalign.models import load_causal_lm
from alphaalign.perf.systems import prompt_rows
from alphaalign.perf.workload import WORKLOADS, build
from alphaalign.rollout.base import SamplingParams
from alphaalign.rollout.transformers_engine import TransformersEngine

w = WORKLOADS["qwen2.5-1.5b"]
folder = build(w, Path(".cache/bench") / w.name)
tokenizer = AutoTokenizer.from_pretrained(folder)
prompts = [
    tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    for r in prompt_rows(folder)
]
policy = load_causal_lm(ModelConfig(name_or_path=str(folder), dtype=w.dtype), torch.device("cuda"))
sampling = SamplingParams(w.new_tokens, min_new_tokens=w.new_tokens)

for static_cache in (False, True):
    engine = TransformersEngine(policy, tokenizer, w.prompts * w.generations, static_cache=static_cache)

    def generate(engine: TransformersEngine = engine) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        rollouts = engine.generate(prompts, w.generations, sampling)
        torch.cuda.synchronize()
        assert all(len(c) == w.new_tokens for c in rollouts.completion_ids)
        assert all(lp <= 0 for row in rollouts.logprobs for lp in row), "a log-prob above 0"
        return time.perf_counter() - start

    warm = [generate() for _ in range(2)]  # a static cache's first calls compile and record the graph
    seconds = [generate() for _ in range(5)]
    wall = statistics.median(seconds)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled_wall = generate()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    print(
        f"static_cache={static_cache}: warm-up calls {[round(s, 1) for s in warm]} s, then median {wall:.3f} s "
        f"over {len(seconds)} calls ({[round(s, 3) for s in seconds]}), {1000 * wall / w.new_tokens:.1f} ms "
        f"per new token for {w.prompts * w.generations} sequences; profiled call: wall {profiled_wall:.3f} s, "
        f"GPU kernel time {kernel_s:.3f} s, {sum(e.count for e in kernels) / w.new_tokens:.0f} kernels per "
        "new token",
        flush=True,
    )
