"""LoRA policies (`model.lora`): adapters train, the base stays frozen and is the KL reference, and
checkpoints hold only the adapters and resume exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alphaalign.config import load_recipe
from alphaalign.errors import UserError
from alphaalign.rl.trainer import train

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def lora_recipe(write_recipe, tiny_policy, out, **trainer):
    return write_recipe(
        {
            "model": {"name_or_path": str(tiny_policy), "lora": LORA},
            "data": {"template": "none"},
            "rollout": {"num_generations": 4, "max_new_tokens": 32},
            "algorithm": {"beta": 0.1},
            "trainer": {
                "prompts_per_step": 4,
                "max_steps": 4,
                "learning_rate": 1e-2,
                "output_dir": str(out),
                "save_every": 1,
                "keep_last": 3,
                "progress_bar": False,
                **trainer,
            },
            "logging": {"wandb_mode": "disabled"},
        }
    )


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


@pytest.mark.slow
def test_lora_trains_adapters_only_against_the_base_and_resumes_exactly(write_recipe, tiny_policy, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(load_recipe(lora_recipe(write_recipe, tiny_policy, full)))
    path = lora_recipe(write_recipe, tiny_policy, split)
    train(load_recipe(path, ["trainer.max_steps=2"]))
    train(load_recipe(path))  # resumes from the step-2 adapters

    rows = metrics(full)
    # fresh adapters are a no-op (B = 0): the policy equals the reference (the base) exactly until the
    # first update with a gradient, and differs from it afterwards
    first = next(i for i, r in enumerate(rows) if r["grad_norm"] > 0)
    assert first < len(rows) - 1
    assert all(r["kl/k3_mean"] == 0.0 for r in rows[: first + 1])
    assert all(r["kl/k3_mean"] > 0.0 for r in rows[first + 1 :])
    assert metrics(split) == rows

    policy = full / "checkpoints" / "step-000004" / "policy"
    assert (policy / "adapter_config.json").is_file() and not (policy / "model.safetensors").exists()
    adapters = load_file(policy / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    assert any(float(t.abs().max()) > 0 for name, t in adapters.items() if "lora_B" in name)
    resumed = load_file(split / "checkpoints" / "step-000004" / "policy" / "adapter_model.safetensors")
    assert all(torch.equal(adapters[k], resumed[k]) for k in adapters)
    config = json.loads((policy / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_policy) and config["r"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora.target_modules=[]", "model.lora.target_modules: name at least one module"),
        ("model.lora.r=0", "model.lora.r: Input should be greater than 0"),
        ("model.lora.rank=8", "model.lora.rank: unknown key"),
    ],
)
def test_lora_section_is_validated(write_recipe, tiny_policy, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_recipe(lora_recipe(write_recipe, tiny_policy, tmp_path / "run"), [override])
