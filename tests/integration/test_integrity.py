"""Issue 22, classes 1-3: a skipped step changes nothing (weights, optimizer, schedule) for any number of
iterations; recipe templates render in a sandbox and checkpoints load without running code; secrets are masked
by what they are, wherever the run writes."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, read_metrics, recipe_for
from safetensors.torch import load_file

from alphaalign.cli import main
from alphaalign.config import load_recipe
from alphaalign.data import compile_template
from alphaalign.errors import UserError
from alphaalign.rl.optim import rng_state
from alphaalign.rl.trainer import train

# ---- 1. a skipped step changes nothing


def _state(opt) -> dict:
    """Everything an optimizer step may change, copied."""
    return {
        "weights": {k: v.clone() for k, v in opt.module.state_dict().items()},
        "optimizer": torch.utils._pytree.tree_map(
            lambda v: v.clone() if isinstance(v, torch.Tensor) else v, opt.optimizer.state_dict()
        ),
        "scheduler": dict(opt.scheduler.state_dict()),
    }


def _same(a, b) -> bool:
    """Bit-identical, nested."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.slow
def test_a_later_iteration_that_overflows_undoes_the_earlier_ones(tiny_policy, write_recipe, tmp_path):
    from alphaalign.models import load_causal_lm, load_tokenizer
    from alphaalign.rl.optim import TorchOptimization
    from alphaalign.rl.update import UpdateSettings, policy_update
    from alphaalign.rollout.base import SamplingParams
    from alphaalign.rollout.transformers_engine import TransformersEngine

    path = recipe_for(write_recipe, tiny_policy, tmp_path, algorithm={"num_iterations": 3})
    recipe = load_recipe(path)
    settings = UpdateSettings.from_recipe(recipe)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_causal_lm(recipe.model, torch.device("cpu"))
    opt = TorchOptimization(policy, recipe.trainer, 10)
    torch.manual_seed(0)
    prompts = [tokenizer(p)["input_ids"] for p in ["how do I bake bread?", "write a phishing email"]]
    rollouts = TransformersEngine(policy, tokenizer, 8).generate(prompts, 4, SamplingParams(8))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    ok = policy_update(opt, None, rollouts, advantages, settings, tokenizer.pad_token_id)
    assert "nonfinite" not in ok  # a normal update first: the optimizer has moments and a step count

    # the learning rate now overflows: the first iteration's step is finite, the weights it leaves are huge
    opt.scheduler.base_lrs = [1e30]
    for group in opt.optimizer.param_groups:
        group["lr"] = 1e30
    before = _state(opt)
    out = policy_update(opt, None, rollouts, advantages, settings, tokenizer.pad_token_id)
    assert out == {"nonfinite": "loss"}
    after = _state(opt)
    assert _same(before["weights"], after["weights"])
    assert _same(before["optimizer"], after["optimizer"])
    assert _same(before["scheduler"], after["scheduler"])

    # and training goes on from there as if the skipped step had not happened
    opt.scheduler.base_lrs = [1e-3]
    for group in opt.optimizer.param_groups:
        group["lr"] = 1e-3
    assert "nonfinite" not in policy_update(opt, None, rollouts, advantages, settings, tokenizer.pad_token_id)


@pytest.mark.slow
def test_a_run_whose_learning_rate_overflows_skips_the_step_and_keeps_the_initial_weights(
    write_recipe, tiny_policy, tmp_path
):
    trainer = {"max_steps": 1, "learning_rate": 1e30}
    path = recipe_for(write_recipe, tiny_policy, tmp_path, trainer=trainer, algorithm={"num_iterations": 2})
    train(load_recipe(path))
    assert [r["guard/skipped_step"] for r in read_metrics(tmp_path / "run")] == [1.0]
    initial = load_file(next(tiny_policy.glob("*.safetensors")))
    last = tmp_path / "run" / "checkpoints" / "step-000001"
    final = load_file(last / "policy" / "model.safetensors")
    assert all(torch.equal(initial[k], final[k]) for k in initial)
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["state"] == {} and state["scheduler"]["last_epoch"] == 0


# ---- 2. recipe strings render in a sandbox; checkpoints are data


def _escape(marker: Path) -> str:
    """A template that, rendered outside the sandbox, creates `marker` through a shell command."""
    return "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}{{ prompt }}"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("kind", ["escape", "undefined", "mutation", "syntax"])
def test_validate_renders_the_template_in_the_sandbox(write_recipe, tmp_path, capsys, kind):
    marker = tmp_path / "ran"
    template = {
        "escape": _escape(marker),
        "undefined": "{{ prompt }} (topic: {{ topic_that_no_row_has }})",
        "mutation": "{% set seen = [] %}{{ seen.append(prompt) }}{{ prompt }}",
        "syntax": "{{ prompt }",
    }[kind]
    path = write_recipe({"data": {"template": template}})
    assert main(["validate", str(path)]) == 2
    err = _one_line_error(capsys)
    assert f"{path}: data.template: " in err
    assert not marker.exists()


def test_a_template_that_uses_a_column_validates_and_renders(write_recipe, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "how do I bake bread?", "label": "benign", "topic": "food"}) + "\n")
    path = write_recipe({"data": {"train": [{"path": str(rows)}], "template": "[{{ topic }}] {{ prompt }}"}})
    assert main(["validate", str(path)]) == 0
    template = compile_template("[{{ topic }}] {{ prompt }}", "W")
    assert template.render(prompt="p", topic="t") == "[t] p"
    with pytest.raises(UserError, match=r"^W: cannot render \(UndefinedError: 'topic' is undefined\)$"):
        template.render(prompt="a row without the column")  # a later row, mid-run: one line too


def test_eval_template_is_sandboxed_and_checked_before_any_work(tiny_policy, tmp_path, capsys):
    marker, data = tmp_path / "ran", tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "how do I bake bread?", "label": "benign"}) + "\n")
    args = ["eval", "--model", str(tiny_policy), "--data", str(data), "--out", str(tmp_path / "out")]
    assert main([*args, "--template", _escape(marker)]) == 2
    assert _one_line_error(capsys).startswith("error: --template: cannot render (SecurityError")
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert main([*args, "--template", "{{ prompt }} {{ nope }}"]) == 2
    assert "--template: cannot render (UndefinedError: 'nope' is undefined)" in _one_line_error(capsys)


def test_reward_model_configuration_templates_are_sandboxed(tmp_path, capsys):
    marker = tmp_path / "ran"
    recipe = {
        "model": {"name_or_path": "m"},
        "data": {"pairs": ["p.jsonl"]},
        "augmentation": {"templates": [_escape(marker)]},
    }
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train-rm", str(tmp_path / "rm.yaml")]) == 2
    assert "augmentation.templates.0: " in _one_line_error(capsys)
    assert not marker.exists()


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint file carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    from alphaalign.config import TrainerConfig
    from alphaalign.rl.optim import TorchOptimization

    model = torch.nn.Linear(3, 2)
    opt = TorchOptimization(model, TrainerConfig(), 10)
    folder, marker = tmp_path / "checkpoint", tmp_path / "ran"
    folder.mkdir()
    good = {
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "rng": rng_state(),
    }
    torch.save(good, folder / "trainer_state.pt")
    opt.load(folder)  # what the trainer writes loads with the weights-only unpickler

    torch.save({**good, "rng": _RunsCode(marker)}, folder / "trainer_state.pt")
    with pytest.raises(UserError) as refused:
        opt.load(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / 'trainer_state.pt'}: refused: ") and "\n" not in message
    assert "system" in message  # names what it would have called
    assert not marker.exists()


# ---- 3. secrets masked by what they are


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("hf_token", True),
        ("api_key", True),
        ("X-Api-Key", True),
        ("Authorization", True),
        ("password", True),
        ("clientSecret", True),
        ("accessToken", True),
        ("credentials", True),
        ("max_new_tokens", False),
        ("max_prompt_tokens", False),
        ("micro_batch_tokens", False),
        ("token_env", False),
        ("api_key_env", False),
        ("tokenizer", False),
        ("keep_last", False),
    ],
)
def test_credential_keys_are_whole_words(key, secret):
    from alphaalign.masking import is_secret_key

    assert is_secret_key(key) is secret


def test_secret_values_are_masked_in_text():
    from alphaalign.masking import mask_override, mask_text, mask_tree

    assert mask_text("GET http://bob:hunter22@host:8000/v1?n=1&api_key=k9x") == (
        "GET http://bob:***@host:8000/v1?n=1&api_key=***"
    )
    assert mask_text("headers={'Authorization': 'Bearer abc.def'}") == "headers={'Authorization': '***'}"
    assert mask_text("Authorization: Basic dXNlcjpwYXNz") == "Authorization: ***"
    assert mask_text("the token budget; max_new_tokens: 256") == "the token budget; max_new_tokens: 256"
    assert mask_override("rewards.0.args.api_key=sk-1") == "rewards.0.args.api_key=***"
    assert mask_override("rewards=[{args: {password: pw1}}]") == "rewards=[{args: {password: ***}}]"
    import sys

    from alphaalign.masking import masked_argv

    argv = sys.argv
    sys.argv = ["alphaalign", "train", "r.yaml", "a.hf_token=t1", "--api-key", "k1", "--max-new-tokens", "8"]
    try:
        with masked_argv():
            assert sys.argv == [
                "alphaalign",
                "train",
                "r.yaml",
                "a.hf_token=***",
                "--api-key",
                "***",
                "--max-new-tokens",
                "8",
            ]
    finally:
        sys.argv = argv
    tree = {"max_new_tokens": 5, "token_env": "HF", "hf_token": "hf_1", "url": "https://u:p1@h/x"}
    assert mask_tree(tree) == {
        "max_new_tokens": 5,
        "token_env": "HF",
        "hf_token": "***",
        "url": "https://u:***@h/x",
    }


def test_secrets_are_masked_after_any_run_of_other_characters():
    from alphaalign.masking import mask_text

    assert (
        mask_text("9api_key=sk-1 .http://u:pw@h x=1?token=t2") == "9api_key=*** .http://u:***@h x=1?token=***"
    )


@pytest.mark.parametrize("run", ["a", "a.", "_", "?a", "?", "a-", "x1.", "a?b&"])
def test_masking_a_long_run_takes_linear_time(run):
    """A long token in an error line (a label or a blob echoed back) must not hang the error printer: a
    pattern that may start anywhere in a run of 100,000 characters searches for minutes. The bound is a hang
    guard, a hundred times what the linear search takes."""
    import time

    from alphaalign.masking import mask_text

    text = run * (100_000 // len(run)) + " api_key=sk-1"
    start = time.monotonic()
    assert mask_text(text).endswith(" api_key=***")
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_a_run_writes_no_secret_and_its_resolved_recipe_validates(
    write_recipe, tiny_policy, tmp_path, capsys
):
    """A secret given as a command-line override, in a header and in a URL password: in no file of the run
    (recipe.resolved.yaml, metrics, checkpoints, wandb's offline run with its copy of the command line)."""
    import subprocess
    import sys

    secrets = ["cli-s3cr3t-4721", "hdr-s3cr3t-4722", "url-s3cr3t-4723"]
    args = {
        "value": 0.5,
        "headers": {"Authorization": f"Bearer {secrets[1]}"},
        "endpoint": f"http://user:{secrets[2]}@127.0.0.1:9/v1",
    }
    rewards = [{"name": "alphaalign_safety"}, {"name": "reward_fixtures:constant", "args": args}]
    path = recipe_for(
        write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 1}, logging={"wandb_mode": "offline"}
    )
    recipe = yaml.safe_load(path.read_text())
    recipe["rewards"] = rewards
    path.write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }
    command = [
        sys.executable,
        "-m",
        "alphaalign.cli",
        "train",
        str(path),
        f"rewards.1.args.api_key={secrets[0]}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(s in done.stdout + done.stderr for s in secrets)

    out = tmp_path / "run"
    files = [p for p in out.rglob("*") if p.is_file()]
    wandb_files = [p for p in files if "wandb" in p.parts]
    assert any(b"rewards.1.args.api_key=***" in p.read_bytes() for p in wandb_files)  # its copy of argv
    for p in files:
        data = p.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret} leaked into {p}"

    resolved = out / "recipe.resolved.yaml"
    assert main(["validate", str(resolved)]) == 0, capsys.readouterr().err
    again = yaml.safe_load(resolved.read_text())
    assert again["rollout"]["max_new_tokens"] == 32 and again["data"]["max_prompt_tokens"] == 512
    assert again["rewards"][1]["args"]["api_key"] == "***"
    assert again["rewards"][1]["args"]["headers"] == {"Authorization": "***"}


@pytest.mark.parametrize(
    "override",
    [
        "rewards.0.args={api_key: s3cr3t-4731",
        "trainer.no_such_key=http://u:s3cr3t-4731@h/x",
        "trainer.max_steps=http://u:s3cr3t-4731@h/x",
    ],
)
def test_errors_that_echo_an_override_mask_its_secret(write_recipe, capsys, override):
    path = write_recipe()
    assert main(["validate", str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3cr3t-4731" not in err and "***" in err, err
