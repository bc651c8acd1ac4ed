"""End-to-end training on a tiny offline model: outputs, checkpoints, exact resume, algorithm variants."""

import html
import json
import subprocess
import sys

import pytest
import torch
from helpers import NO_SYSTEM_TEMPLATE, read_metrics, recipe_for, strip_timing, with_chat_template
from safetensors.torch import load_file

from alphaalign.config import load_recipe
from alphaalign.errors import UserError
from alphaalign.rl.trainer import train


@pytest.mark.slow
def test_three_step_run_writes_metrics_checkpoints_and_changes_the_policy(
    write_recipe, tiny_policy, tmp_path
):
    recipe = load_recipe(recipe_for(write_recipe, tiny_policy, tmp_path))
    train(recipe)
    out = tmp_path / "run"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "reward/mean",
        "reward/alphaalign_safety/mean",
        "advantage/std",
        "loss",
        "grad_norm",
        "entropy/mean",
        "clip/low_fraction",
        "completion/length_mean",
        "rollout/harmful_refusal_rate",
        "rollout/benign_refusal_rate",
        "rollout/format_valid_rate",
        "time/generate_s",
        "time/score_s",
        "time/update_s",
        "throughput/completion_tokens_per_s",
    ):
        assert key in rows[0], key
    assert all(0 <= r["rollout/format_valid_rate"] <= 1 for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (out / "recipe.resolved.yaml").exists()
    before = load_file(tiny_policy / "model.safetensors")
    after = load_file(out / "checkpoints" / "step-000003" / "policy" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(write_recipe, tiny_policy, tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    path = recipe_for(write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 4, "save_every": 2})
    train(load_recipe(path, [f"trainer.output_dir={full_dir}"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}", "trainer.max_steps=2"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}"]))  # resumes automatically from step 2
    full, split = strip_timing(read_metrics(full_dir)), strip_timing(read_metrics(split_dir))
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert split == full
    a = load_file(full_dir / "checkpoints" / "step-000004" / "policy" / "model.safetensors")
    b = load_file(split_dir / "checkpoints" / "step-000004" / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kl_multiple_iterations_and_rollout_correction(write_recipe, tiny_policy, tmp_path):
    path = recipe_for(
        write_recipe,
        tiny_policy,
        tmp_path,
        algorithm={
            "beta": 0.04,
            "kl_estimator": "k3",
            "num_iterations": 2,
            "loss_type": "grpo",
            "scale_rewards": "batch",
            "rollout_correction": "token_truncate",
            "epsilon": 0.05,
        },
        trainer={"micro_batch_tokens": 400, "max_steps": 3, "prompts_per_step": 8},
        data={"max_prompt_tokens": 128},
    )
    train(load_recipe(path))
    rows = read_metrics(tmp_path / "run")
    assert any(r["advantage/std"] > 0 for r in rows)  # there was something to learn from
    assert all(r["kl/k3_mean"] >= 0 for r in rows)
    assert rows[-1]["kl/k3_mean"] > 0  # the policy moved away from the reference
    assert all(0.9 < r["rollout_correction/weight_mean"] < 1.1 for r in rows)  # same weights sampled them
    assert any(
        r["clip/low_fraction"] + r["clip/high_fraction"] > 0 for r in rows
    )  # 2nd iteration is off-policy


@pytest.mark.slow
@pytest.mark.parametrize(
    ("estimator", "kl_estimator"), [("rloo", "k1"), ("rloo", "k2"), ("reinforce_pp_baseline", "k1")]
)
def test_other_estimators_and_kl_estimators_train(
    write_recipe, tiny_policy, tmp_path, estimator, kl_estimator
):
    """RLOO, REINFORCE++-baseline and the k1/k2 KL terms run end to end and move the policy off the reference."""
    path = recipe_for(
        write_recipe,
        tiny_policy,
        tmp_path,
        algorithm={
            "advantage_estimator": estimator,
            "beta": 0.1,
            "kl_estimator": kl_estimator,
            "scale_rewards": "none",
        },
        trainer={"max_steps": 3, "prompts_per_step": 8, "save_every": 3},
    )
    train(load_recipe(path))
    out = tmp_path / "run"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["guard/skipped_step"] for r in rows)
    assert any(r["advantage/std"] > 0 for r in rows)  # there was something to learn from
    kl = [r[f"kl/{kl_estimator}_mean"] for r in rows]
    assert abs(kl[0]) < 1e-6  # the first batch is scored by the reference's own weights
    assert abs(kl[-1]) > 1e-6  # the updates moved the policy away from it
    if kl_estimator == "k2":
        assert all(v >= 0 for v in kl)
    for r in rows:  # both baselines centre each group (NaN-free rewards here), so advantages sum to zero
        assert abs(r["advantage/mean"]) < 1e-5
    before = load_file(tiny_policy / "model.safetensors")
    after = load_file(out / "checkpoints" / "step-000003" / "policy" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_autocast_trains_with_bfloat16_forward_passes(write_recipe, tiny_policy, tmp_path):
    path = recipe_for(
        write_recipe,
        tiny_policy,
        tmp_path,
        model={"autocast": "bfloat16"},
        algorithm={"beta": 0.04, "rollout_correction": "token_truncate"},
        trainer={"max_steps": 2},
    )
    train(load_recipe(path))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and not any(r["guard/skipped_step"] for r in rows)
    # the engine's log-probs and the trainer's differ by bf16 rounding (float32 passes agree to ~1e-7)
    assert all(1e-4 < r["rollout_correction/logp_abs_diff_mean"] < 0.05 for r in rows)


def test_unwritable_output_dir_fails_before_training(write_recipe, tiny_policy, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    recipe = load_recipe(
        recipe_for(write_recipe, tiny_policy, tmp_path), [f"trainer.output_dir={blocker}/run"]
    )
    with pytest.raises(UserError, match="trainer.output_dir: cannot write"):
        train(recipe)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "alphaalign.cli", *args], capture_output=True, text=True)


def test_cli_validate_ok_and_errors(write_recipe, tmp_path):
    ok = run_cli("validate", str(write_recipe()))
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("validate", str(write_recipe()), "trainer.learning_rat=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: override 'trainer.learning_rat=1': trainer.learning_rat: unknown key"
    ]
    debug = run_cli("--debug", "validate", str(write_recipe()), "trainer.learning_rat=1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("rewards=[{name: no_such_reward}]", "rewards.0.name: "),
        ("rewards=[{name: alphaalign_safety, args: {bogus: 1}}]", "rewards.0.args: "),
        ("data.train=[{path: missing.jsonl}]", "data.train.0.path: file not found: missing.jsonl"),
        ("model.name_or_path=./no/such/model", "model.name_or_path: no such folder"),
        ("data.template='{{ nothing }}'", "data.template: "),
    ],
)
def test_cli_validate_catches_each_mistake_in_one_line(write_recipe, override, message):
    result = run_cli("validate", str(write_recipe()), override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cli_bad_data_line(write_recipe, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "label": "benign"}\n{"prompt": "x", "label": "sometimes"}\n')
    result = run_cli("validate", str(write_recipe({"data": {"train": [{"path": str(data)}]}})))
    assert result.returncode == 2 and f"{data}:2: label field 'label' is 'sometimes'" in result.stderr


@pytest.mark.slow
def test_interrupted_checkpoint_write_never_shadows_the_last_good_one(write_recipe, tiny_policy, tmp_path):
    from alphaalign.rl.checkpoint import latest_checkpoint

    path = recipe_for(write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 2})
    train(load_recipe(path))
    out = tmp_path / "run"
    broken = out / "checkpoints" / ".tmp-step-000004"
    (broken / "policy").mkdir(parents=True)  # a write killed before state.json
    half = out / "checkpoints" / "step-000006"
    half.mkdir()  # no state.json: incomplete
    assert latest_checkpoint(out).name == "step-000002"
    train(load_recipe(path, ["trainer.max_steps=4"]))  # resumes from step 2, not from the broken folders
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert latest_checkpoint(out).name == "step-000004" and not broken.exists()


# ---- dynamic sampling (algorithm.filter_groups) and samples in the logs


@pytest.mark.slow
def test_dynamic_sampling_drops_all_equal_groups_refills_the_batch_and_resumes_exactly(
    write_recipe, tiny_policy, tmp_path
):
    """The demo reward on the tiny policy gives many groups one reward for all their completions: those are
    dropped, more prompts are drawn until the batch holds prompts_per_step groups, the checkpoint's data
    position counts every prompt drawn, and a run resumed from step 1 repeats the uninterrupted one."""
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    path = recipe_for(
        write_recipe,
        tiny_policy,
        tmp_path,
        algorithm={"filter_groups": "zero_std", "max_resample_rounds": 6},
        trainer={"max_steps": 2, "save_every": 1},
        logging={"samples_every": 1, "samples_count": 2},
    )
    train(load_recipe(path, [f"trainer.output_dir={full_dir}"]))
    rows = read_metrics(full_dir)
    assert sum(r["filter/groups_dropped"] for r in rows) > 0  # there were all-equal groups to drop
    for r in rows:
        assert r["filter/groups_kept"] == 4 and r["groups/zero_reward_std_fraction"] == 0.0
        assert r["filter/resample_rounds"] >= 1 and "loss" in r
    for step in range(1, len(rows) + 1):  # every prompt drawn so far, the refills included
        state = json.loads((full_dir / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert state["data_draws"] == 4 * sum(1 + q["filter/resample_rounds"] for q in rows[:step])

    train(load_recipe(path, [f"trainer.output_dir={split_dir}", "trainer.max_steps=1"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}"]))  # resumes from step 1
    assert strip_timing(read_metrics(split_dir)) == strip_timing(rows)
    assert (split_dir / "samples.jsonl").read_text() == (full_dir / "samples.jsonl").read_text()
    a = load_file(full_dir / "checkpoints" / "step-000002" / "policy" / "model.safetensors")
    b = load_file(split_dir / "checkpoints" / "step-000002" / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dynamic_sampling_that_keeps_nothing_makes_no_update(write_recipe, tiny_policy, tmp_path):
    """A constant reward makes every group all-equal: after max_resample_rounds the step has nothing to train
    on, reports so, and leaves the policy as it was."""
    path = recipe_for(
        write_recipe,
        tiny_policy,
        tmp_path,
        algorithm={"filter_groups": "zero_std", "max_resample_rounds": 1},
        trainer={"max_steps": 1},
    )
    recipe = load_recipe(path, ["rewards=[{name: 'reward_fixtures:constant', args: {value: 1.0}}]"])
    train(recipe)
    (row,) = read_metrics(tmp_path / "run")
    assert row["filter/groups_kept"] == 0 and row["filter/groups_dropped"] == 8
    assert row["filter/resample_rounds"] == 1 and "loss" not in row and not row["guard/skipped_step"]
    before = load_file(tiny_policy / "model.safetensors")
    after = load_file(tmp_path / "run" / "checkpoints" / "step-000001" / "policy" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "state.json").read_text())
    assert state["data_draws"] == 8


@pytest.mark.slow
def test_samples_reach_samples_jsonl_wandb_and_the_report(write_recipe, tiny_policy, tmp_path):
    """Every samples_every steps the completions of samples_count prompts, with each reward term (the
    overlong penalty computed from the completion's token count among them), the verdicts and the
    advantages, go to samples.jsonl and a wandb Table (offline run); the report shows the latest step's."""
    from alphaalign.report import write_report
    from alphaalign.rewards import parse_alphaalign, refusal_of
    from alphaalign.rewards.overlong import overlong_penalty

    path = recipe_for(
        write_recipe,
        tiny_policy,
        tmp_path,
        trainer={"max_steps": 3},
        logging={"samples_every": 2, "samples_count": 2, "wandb_mode": "offline"},
    )
    overlong = "{name: overlong_buffer, weight: 0.5, args: {buffer_length: 16, penalty_factor: 2.0}}"
    train(load_recipe(path, [f"rewards=[{{name: alphaalign_safety}}, {overlong}]"]))
    out = tmp_path / "run"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 8 and [s["group"] for s in samples] == [0] * 4 + [1] * 4
    for s in samples:
        assert set(s["rewards"]) == {"alphaalign_safety", "overlong_buffer"}
        assert s["rewards"]["overlong_buffer"] == overlong_penalty(s["completion_tokens"], 32, 16, 2.0)
        total = s["rewards"]["alphaalign_safety"] + 0.5 * s["rewards"]["overlong_buffer"]
        assert s["reward"] == pytest.approx(total)
        assert s["refused"] == refusal_of(s["completion"]) and s["label"] in ("harmful", "benign")
        assert s["format_valid"] == parse_alphaalign(s["completion"]).format_ok and s["prompt"]
    for g in (0, 1):  # GRPO centres each group
        assert abs(sum(s["advantage"] for s in samples if s["group"] == g)) < 1e-5

    (table_file,) = (out / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:6] == ["step", "group", "label", "prompt", "completion", "reward"]
    assert [row[4] for row in table["data"]] == [s["completion"] for s in samples]

    report = tmp_path / "report"
    write_report([out], report)
    md = (report / "report.md").read_text()
    assert "Latest samples (step 2" in md
    shown = html.escape(samples[0]["completion"].strip().splitlines()[0][:40], quote=False)  # tags as text
    assert shown in md and shown in (report / "report.html").read_text()


def test_a_system_prompt_the_policys_template_refuses_is_one_line(write_recipe, tiny_policy, tmp_path):
    """Gemma-2's template has no system role: with data.system_prompt set, the first prompt is refused."""
    policy = with_chat_template(tiny_policy, tmp_path / "no-system", NO_SYSTEM_TEMPLATE)
    recipe = recipe_for(write_recipe, policy, tmp_path, data={"system_prompt": "Be safe."})
    result = run_cli("train", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model.name_or_path: the chat template of '{policy}' refuses a chat of roles [system, user] "
        "(System role not supported) (data.system_prompt gives the system turn)"
    )
    assert "Traceback" not in result.stderr
