"""Reliability: numerical guards, exact resume after kill -9, secrets kept out of outputs, one-line input errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reward_fixtures
import torch
from helpers import ROOT, read_metrics, recipe_for, strip_timing
from safetensors.torch import load_file

from alphaalign.cli import main
from alphaalign.config import ModelConfig, load_recipe
from alphaalign.models import load_causal_lm
from alphaalign.rl.trainer import train
from alphaalign.rl.update import first_nonfinite

# ---- numerical guards


def test_first_nonfinite_names_the_offending_argument():
    ok, bad = torch.zeros(3), torch.tensor([0.0, float("inf")])
    assert first_nonfinite(a=ok, b=[ok, ok]) is None
    assert first_nonfinite(a=ok, b=[ok, bad], c=bad) == "b"
    assert first_nonfinite(loss=torch.tensor(float("nan"))) == "loss"


@pytest.mark.slow
def test_a_step_with_infinite_rewards_is_skipped_and_the_weights_are_kept(
    write_recipe, tiny_policy, tmp_path
):
    reward_fixtures.CALLS.clear()
    rewards = [
        {"name": "alphaalign_safety"},
        {"name": "reward_fixtures:infinite_on_call", "args": {"bad_call": 2}},
    ]
    path = recipe_for(
        write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 3, "save_every": 1, "keep_last": 3}
    )
    train(load_recipe(path, [f"rewards={json.dumps(rewards)}"]))
    rows = read_metrics(tmp_path / "run")
    assert [r["guard/skipped_step"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["guard/skipped_steps_total"] for r in rows] == [0, 1, 1]
    assert "loss" in rows[0] and "loss" not in rows[1] and "loss" in rows[2]
    ckpt = tmp_path / "run" / "checkpoints"
    weights = [load_file(ckpt / f"step-00000{i}" / "policy" / "model.safetensors") for i in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 3 trained again
    assert json.loads((ckpt / "step-000003" / "state.json").read_text())["bad_steps"] == 1


@pytest.mark.slow
def test_too_many_bad_steps_abort_with_one_line(write_recipe, tiny_policy, tmp_path, capsys):
    rewards = [{"name": "reward_fixtures:infinite_on_call", "args": {"bad_call": 0}}]  # every call
    path = recipe_for(write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 5, "max_bad_steps": 1})
    assert main(["train", str(path), f"rewards={json.dumps(rewards)}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: aborting at step 2: 2 steps had non-finite values (last: rewards)")
    assert "trainer.max_bad_steps=1" in err[-1]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]  # the aborting step is logged


def test_an_infinite_loss_leaves_the_weights_untouched(tiny_policy, write_recipe, tmp_path):
    from alphaalign.models import load_causal_lm, load_tokenizer
    from alphaalign.rl.optim import TorchOptimization
    from alphaalign.rl.update import UpdateSettings, policy_update
    from alphaalign.rollout.base import SamplingParams
    from alphaalign.rollout.transformers_engine import TransformersEngine

    recipe = load_recipe(recipe_for(write_recipe, tiny_policy, tmp_path))
    tokenizer = load_tokenizer(recipe.model)
    policy = load_causal_lm(recipe.model, torch.device("cpu"))
    opt = TorchOptimization(policy, recipe.trainer, 10)
    prompt = tokenizer("how do I bake bread?")["input_ids"]
    rollouts = TransformersEngine(policy, tokenizer, 8).generate([prompt], 4, SamplingParams(8))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    advantages = torch.tensor([1.0, float("inf"), -1.0, 0.0])
    out = policy_update(
        opt, None, rollouts, advantages, UpdateSettings.from_recipe(recipe), tokenizer.pad_token_id
    )
    assert out == {"nonfinite": "loss"}
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert opt.scheduler.last_epoch == 0  # no scheduler step either


# ---- exact resume after kill -9


def _train_cli(recipe: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "alphaalign.cli", "train", str(recipe), *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_matches_the_uninterrupted_run(write_recipe, tiny_policy, tmp_path):
    path = recipe_for(write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 6, "save_every": 2})
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = _train_cli(path, f"trainer.output_dir={killed}")
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-000002" / "state.json").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.stderr else ""
        time.sleep(0.05)
    while len(read_metrics(killed)) < 3 and time.monotonic() < deadline:  # kill in the middle of the run
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    assert len(read_metrics(killed)) < 6

    for out in (killed, full):  # the same command again; and an uninterrupted run
        rerun = _train_cli(path, f"trainer.output_dir={out}")
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert strip_timing(read_metrics(killed)) == strip_timing(read_metrics(full))
    a = load_file(full / "checkpoints" / "step-000006" / "policy" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step-000006" / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- secrets


@pytest.mark.slow
def test_secrets_never_reach_outputs(write_recipe, tiny_policy, tmp_path, monkeypatch):
    secrets = {"WANDB_API_KEY": "wandb-s3cr3t-4711", "HF_TOKEN": "hf_s3cr3t_4712"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    rewards = [
        {"name": "alphaalign_safety"},
        {"name": "reward_fixtures:constant", "args": {"api_key": "arg-s3cr3t-4713", "value": 0.5}},
    ]
    path = recipe_for(
        write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 2}, logging={"wandb_mode": "offline"}
    )
    train(load_recipe(path, [f"rewards={json.dumps(rewards)}"]))
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "recipe.resolved.yaml" for p in files) and any("wandb" in p.parts for p in files)
    for p in files:
        data = p.read_bytes()
        for secret in [*secrets.values(), "arg-s3cr3t-4713"]:
            assert secret.encode() not in data, f"{secret} leaked into {p}"
    assert "api_key: '***'" in (tmp_path / "run" / "recipe.resolved.yaml").read_text()


CUSTOM_CODE = """
from pathlib import Path
from transformers import Qwen2ForCausalLM

MARKER = Path({marker!r})
MARKER.write_text("custom code ran")


class CustomQwen2(Qwen2ForCausalLM):
    pass
"""


def test_model_code_from_the_model_folder_runs_only_when_the_recipe_allows_it(tiny_policy, tmp_path):
    """A model folder that ships Python (`auto_map`) loads with transformers' own class and never runs that
    code unless `model.trust_remote_code: true`."""
    folder, marker = tmp_path / "model-with-code", tmp_path / "marker"
    shutil.copytree(tiny_policy, folder)
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "custom.CustomQwen2"}})
    )

    model = load_causal_lm(ModelConfig(name_or_path=str(folder)), torch.device("cpu"))
    assert type(model).__name__ == "Qwen2ForCausalLM" and not marker.exists()
    model = load_causal_lm(ModelConfig(name_or_path=str(folder), trust_remote_code=True), torch.device("cpu"))
    assert type(model).__name__ == "CustomQwen2" and marker.exists()


# ---- input errors: one line naming file and key or line, exit 2, no traceback


def _bad_file(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


INPUT_ERRORS = [
    # (recipe text or None for the valid base, overrides, expected fragment of the single error line)
    ("model: [unclosed", [], "YAML syntax error"),
    ("- just\n- a list\n", [], "the top level must be a mapping"),
    (None, ["trainer.no_such_key=1"], "trainer.no_such_key: unknown key"),
    (None, ["trainer.learning_rate=fast"], "trainer.learning_rate: "),
    (None, ["rollout.num_generations=1"], "rollout.num_generations: "),
    (None, ["rollout.engine=tgi"], "rollout.engine: "),
    (None, ["rewards=[{name: nope}]"], "rewards.0.name: unknown reward 'nope'"),
    (
        None,
        ["trainer.micro_batch_tokens=100"],
        "trainer.micro_batch_tokens: 100 is smaller than one sequence",
    ),
    (None, ["data.train=[{path: missing.jsonl}]"], "data.train.0.path: file not found"),
    (None, ["trainer.output_dir=/proc/version/run"], "trainer.output_dir: cannot write"),
]


@pytest.mark.parametrize("text, overrides, fragment", INPUT_ERRORS)
def test_recipe_mistakes_fail_validate_in_one_line(write_recipe, tmp_path, capsys, text, overrides, fragment):
    path = write_recipe() if text is None else _bad_file(tmp_path, "bad.yaml", text.encode())
    assert main(["validate", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert Path(path).name in err[0] or err[0].startswith("error: override '"), err


DATA_ERRORS = [
    ("bin.jsonl", b'{"prompt": "a", "label": "benign"}\n\x00\x01\x02\xff', "not a UTF-8 text file"),
    ("nul.jsonl", b'{"prompt": "a", "label": "benign"}\n\x00\x00', "binary data"),
    ("empty.jsonl", b"", "no rows"),
    ("badjson.jsonl", b'{"prompt": "a", "label": "benign"}\n{"prompt": oops}\n', ":2: invalid JSON"),
    (
        "noprompt.jsonl",
        b'{"prompt": "a", "label": "benign"}\n{"text": "b", "label": "harmful"}\n',
        ":2: missing or empty prompt",
    ),
    ("label.jsonl", b'{"prompt": "a", "label": "spicy"}\n', ":1: label field 'label' is 'spicy'"),
]


@pytest.mark.parametrize("name, content, fragment", DATA_ERRORS)
def test_data_mistakes_fail_validate_in_one_line(write_recipe, tmp_path, capsys, name, content, fragment):
    data = _bad_file(tmp_path, name, content)
    path = write_recipe({"data": {"train": [{"path": data}]}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and data in err[0] and fragment in err[0], err
