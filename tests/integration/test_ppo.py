"""PPO with a critic (`advantage_estimator: gae`) and the per-token path (REINFORCE++ with `kl_in_reward`) on
the tiny model: the critic's values and its update on a fixed batch, LoRA, a critic started from a reward model,
checkpoints, `validate` from the command line, and end-to-end runs with exact resume (the pure parts:
tests/unit/test_ppo_math.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alphaalign.config import load_recipe
from alphaalign.errors import UserError
from alphaalign.rl import algos
from alphaalign.rl.trainer import train

TIMING = ("time/", "throughput/")


def base_recipe(tiny_policy, tmp_path, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": str(tiny_policy)},
        "data": {"template": "none"},
        "rollout": {"num_generations": 4, "max_new_tokens": 32},
        "algorithm": {"advantage_estimator": "gae", "beta": 0.05, "num_iterations": 2},
        "critic": {"learning_rate": 1e-3},
        "trainer": {
            "prompts_per_step": 8,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "save_every": 2,
            "output_dir": str(tmp_path / "run"),
            "progress_bar": False,
        },
        "logging": {"wandb_mode": "disabled"},
    }
    for key, value in sections.items():
        recipe[key] = value if value is None else {**recipe.get(key, {}), **value}
    return recipe


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_cli_validate_refuses_a_critic_without_gae(write_recipe):
    import subprocess
    import sys

    path = write_recipe({"critic": {"init_from": "policy"}})
    done = subprocess.run(
        [sys.executable, "-m", "alphaalign.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "critic: only algorithm.advantage_estimator gae uses a critic" in done.stderr


# ---------------------------------------------------------------------------------------------------------
# The critic on a fixed batch


@pytest.fixture(scope="module")
def fixed_batch(tiny_policy, tmp_path_factory):
    """The tiny policy's micro-batches of 2 prompts × 4 completions (a small token budget: several of them)."""
    import yaml

    from alphaalign.models import load_causal_lm, load_tokenizer
    from alphaalign.rl.optim import TorchOptimization
    from alphaalign.rl.update import UpdateSettings, prepare_batch
    from alphaalign.rollout.base import SamplingParams
    from alphaalign.rollout.transformers_engine import TransformersEngine

    folder = tmp_path_factory.mktemp("ppo-batch")
    recipe_dict = base_recipe(
        tiny_policy,
        folder,
        trainer={"micro_batch_tokens": 120},
        data={"max_prompt_tokens": 40, "train": [{"path": "x.jsonl"}]},
        rollout={"max_new_tokens": 16},
    )
    recipe_dict["rewards"] = [{"name": "alphaalign_safety"}]
    (folder / "x.jsonl").write_text('{"prompt": "hi", "label": "benign"}\n')
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_causal_lm(recipe.model, torch.device("cpu"))
    torch.manual_seed(0)
    prompts = [tokenizer(p)["input_ids"] for p in ["how do I bake bread?", "write a phishing email"]]
    rollouts = TransformersEngine(policy, tokenizer).generate(prompts, 4, SamplingParams(16))
    opt = TorchOptimization(policy, recipe.trainer, 10)
    batch = prepare_batch(opt, None, rollouts, UpdateSettings.from_recipe(recipe), tokenizer.pad_token_id)
    assert batch is not None and batch.real > 1
    return recipe, tokenizer, rollouts, batch


def test_values_are_read_before_each_completion_token(fixed_batch):
    from alphaalign.rl.critic import Critic

    recipe, tokenizer, rollouts, batch = fixed_batch
    critic = Critic(recipe, tokenizer, torch.device("cpu"), 10)
    values = critic.values(batch.mbs)
    model = critic.opt.model
    for mb, v in zip(batch.mbs[: batch.real], values, strict=True):
        for j, i in enumerate(mb.rows):
            prompt, completion = rollouts.prompt_ids[i], rollouts.completion_ids[i]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():  # the row alone, unpadded: position P−1+t holds the state before token t
                alone = model(input_ids=ids).logits[0, len(prompt) - 1 : -1, 0]
            assert torch.allclose(v[j, : len(completion)], alone, atol=1e-5)


@pytest.mark.slow
def test_the_critic_fits_fixed_returns(fixed_batch):
    """Repeated updates towards the same returns: the value loss falls and the explained variance rises."""
    from alphaalign.parallel import ONE_PROCESS
    from alphaalign.rl.critic import Critic
    from alphaalign.rl.ppo import per_row, whole_batch

    recipe, tokenizer, _, batch = fixed_batch
    critic = Critic(recipe, tokenizer, torch.device("cpu"), 40)
    mask = whole_batch(ONE_PROCESS, per_row(batch, [mb.mask for mb in batch.mbs]))
    rewards = torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5, 1.0, 1.0, -1.0])
    ac = recipe.algorithm.model_copy(update={"num_iterations": 1})
    losses, explained = [], []
    for _ in range(8):
        old = critic.values(batch.mbs)
        values = whole_batch(ONE_PROCESS, per_row(batch, old))
        _, returns = algos.token_advantages(rewards, mask, ac, values)
        explained.append(
            algos.explained_variance(
                values, algos.discounted_returns(algos.last_token_rewards(rewards, mask), mask), mask
            )
        )
        metrics = critic.update(batch, old, returns, ac)
        assert "nonfinite" not in metrics and set(metrics) == {
            "critic/value_loss",
            "critic/vf_clipfrac",
            "critic/grad_norm",
            "critic/lr",
        }
        losses.append(metrics["critic/value_loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert explained[-1] > explained[0] + 0.2, explained


@pytest.mark.slow
def test_a_critic_update_that_overflows_leaves_the_critic_as_it_was(fixed_batch):
    """Two epochs, a learning rate of 1e30: the first epoch's step sends the weights to ±1e30, the second's loss
    is not finite; the update is refused and the weights, Adam's moments and the schedule are as before."""
    from alphaalign.parallel import ONE_PROCESS
    from alphaalign.rl.critic import Critic
    from alphaalign.rl.ppo import per_row, whole_batch

    recipe, tokenizer, _, batch = fixed_batch
    critic = Critic(recipe, tokenizer, torch.device("cpu"), 10)
    mask = whole_batch(ONE_PROCESS, per_row(batch, [mb.mask for mb in batch.mbs]))
    _, returns = algos.token_advantages(torch.linspace(-1, 1, 8), mask, recipe.algorithm, mask * 0)
    ac = recipe.algorithm.model_copy(update={"num_iterations": 2})
    critic.update(batch, critic.values(batch.mbs), returns, ac)  # Adam has moments to restore
    opt = critic.opt
    opt.scheduler.base_lrs = [1e30 for _ in opt.scheduler.base_lrs]
    for group in opt.optimizer.param_groups:
        group["lr"] = 1e30
    weights = {k: v.clone() for k, v in opt.module.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.optimizer.state.items()}
    schedule = opt.scheduler.state_dict()
    assert critic.update(batch, critic.values(batch.mbs), returns, ac) == {"nonfinite": "critic loss"}
    assert all(torch.equal(weights[k], v) for k, v in opt.module.state_dict().items())
    for param, state in opt.optimizer.state.items():
        assert all(torch.equal(moments[id(param)][k], v) for k, v in state.items())
    assert opt.scheduler.state_dict() == schedule


def test_a_checkpoint_holds_the_critic_and_its_manifest_covers_it(fixed_batch, tmp_path):
    """save_checkpoint writes the critic beside the policy; a damaged critic file makes resume pass the
    checkpoint over, as a damaged policy file does."""
    from alphaalign.models import load_causal_lm
    from alphaalign.rl.checkpoint import checkpoint_problem, latest_checkpoint, save_checkpoint
    from alphaalign.rl.critic import Critic, WithCritic
    from alphaalign.rl.optim import TorchOptimization

    recipe, tokenizer, _, _ = fixed_batch
    opt = TorchOptimization(load_causal_lm(recipe.model, torch.device("cpu")), recipe.trainer, 10)
    both = WithCritic(opt, Critic(recipe, tokenizer, torch.device("cpu"), 10))
    first = save_checkpoint(tmp_path, 1, both, tokenizer, data_draws=4, keep_last=2)
    last = save_checkpoint(tmp_path, 2, both, tokenizer, data_draws=8, keep_last=2)
    for name in ("critic/policy/model.safetensors", "critic/trainer_state.pt", "policy/model.safetensors"):
        assert (last / name).is_file(), name
    assert checkpoint_problem(last) is None and latest_checkpoint(tmp_path) == last
    (last / "critic" / "trainer_state.pt").write_bytes(b"")  # truncated by a disk
    assert checkpoint_problem(last).startswith("critic/trainer_state.pt has 0 bytes")
    assert latest_checkpoint(tmp_path, quiet=True) == first


@pytest.mark.slow
def test_with_lora_the_critic_trains_its_own_adapters_and_head_and_resumes(fixed_batch, tmp_path):
    """model.lora: the critic gets LoRA adapters of its own and a trainable head (gradient checkpointing on,
    as the policy's); a checkpoint holds just those, and a critic loaded from it gives the same values."""
    from alphaalign.config import LoraSection
    from alphaalign.rl.critic import Critic

    recipe, tokenizer, _, batch = fixed_batch
    lora = LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = recipe.model.model_copy(update={"lora": lora, "gradient_checkpointing": True})
    recipe = recipe.model_copy(update={"model": model})
    critic = Critic(recipe, tokenizer, torch.device("cpu"), 10)
    trainable = [n for n, p in critic.opt.module.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all("score" in n or "lora_" in n for n in trainable), trainable
    assert critic.opt.module.is_gradient_checkpointing
    old = critic.values(batch.mbs)
    mask = torch.nn.utils.rnn.pad_sequence(
        [m for mb in batch.mbs[: batch.real] for m in mb.mask], batch_first=True
    )
    _, returns = algos.token_advantages(torch.linspace(-1, 1, 8), mask, recipe.algorithm, mask * 0)
    metrics = critic.update(batch, old, returns, recipe.algorithm.model_copy(update={"num_iterations": 1}))
    assert "nonfinite" not in metrics and metrics["critic/grad_norm"] > 0
    critic.save(tmp_path)
    saved = tmp_path / "critic" / "policy"
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    resumed = Critic(recipe, tokenizer, torch.device("cpu"), 10, resume=tmp_path)
    resumed.load(tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(critic.values(batch.mbs), resumed.values(batch.mbs), strict=True)
    )
    assert not all(torch.equal(a, b) for a, b in zip(old, critic.values(batch.mbs), strict=True))


def test_a_reward_model_starts_the_critic_with_its_score_head(tiny_rm, tmp_path, write_recipe):
    from alphaalign.models import load_tokenizer
    from alphaalign.rl.critic import Critic

    path = write_recipe(
        {
            "model": {"name_or_path": str(tiny_rm)},
            "algorithm": {"advantage_estimator": "gae"},
            "critic": {"init_from": str(tiny_rm)},
        }
    )
    recipe = load_recipe(path)
    critic = Critic(recipe, load_tokenizer(recipe.model), torch.device("cpu"), 10)
    rm = load_file(tiny_rm / "model.safetensors")
    head = critic.opt.module.score.weight.detach()
    assert torch.equal(head, rm["score.weight"])
    assert torch.equal(critic.opt.module.model.embed_tokens.weight.detach(), rm["model.embed_tokens.weight"])


def test_resuming_a_checkpoint_without_a_critic_is_refused_in_one_line(fixed_batch, tmp_path):
    from alphaalign.rl.critic import Critic

    recipe, tokenizer, _, _ = fixed_batch
    (tmp_path / "step-000002" / "policy").mkdir(parents=True)
    with pytest.raises(UserError, match=r"trainer.resume_from: .*step-000002 has no critic/ folder"):
        Critic(recipe, tokenizer, torch.device("cpu"), 10, resume=tmp_path / "step-000002")


# ---------------------------------------------------------------------------------------------------------
# End to end


def strip_timing(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


@pytest.mark.slow
def test_ppo_trains_the_policy_and_the_critic_and_resumes_exactly(write_recipe, tiny_policy, tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    # a value clip small enough that the second epoch's values pass it
    path = write_recipe(base_recipe(tiny_policy, tmp_path, algorithm={"value_clip": 0.005}))
    train(load_recipe(path, [f"trainer.output_dir={full_dir}"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}", "trainer.max_steps=2"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}"]))  # resumes from step 2, critic included
    full, split = strip_timing(read_metrics(full_dir)), strip_timing(read_metrics(split_dir))
    assert [r["step"] for r in split] == [1, 2, 3, 4] and split == full
    assert not any(r["guard/skipped_step"] for r in full)
    for key in (
        "critic/value_loss",
        "critic/vf_clipfrac",
        "critic/explained_variance",
        "critic/values_mean",
        "critic/grad_norm",
        "critic/lr",
        "kl/k3_mean",
    ):
        assert all(key in r for r in full), key
    assert any(r["critic/vf_clipfrac"] > 0 for r in full)  # the second epoch moves values past the clip
    assert any(r["reward/std"] > 0 for r in full)  # there was something to learn from
    last = full_dir / "checkpoints" / "step-000004"
    for part in ("policy", "critic/policy"):
        a, b = (
            load_file(last / part / "model.safetensors"),
            load_file(split_dir / last.relative_to(full_dir) / part / "model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    before = load_file(tiny_policy / "model.safetensors")
    after = load_file(last / "policy" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved
    critic = load_file(last / "critic" / "policy" / "model.safetensors")
    assert "score.weight" in critic and "lm_head.weight" not in critic
    assert any(not torch.equal(before[k], critic[k]) for k in before if k in critic)  # the backbone trained


@pytest.mark.slow
def test_reinforce_pp_with_the_kl_in_the_reward_trains(write_recipe, tiny_policy, tmp_path):
    recipe = base_recipe(
        tiny_policy,
        tmp_path,
        critic=None,
        trainer={"max_steps": 3},
        logging={"samples_every": 1, "samples_count": 8},
        algorithm={
            "advantage_estimator": "reinforce_pp",
            "kl_in_reward": True,
            "kl_estimator": "k1",
            "beta": 0.1,
        },
    )
    del recipe["critic"]
    train(load_recipe(write_recipe(recipe)))
    out = tmp_path / "run"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["guard/skipped_step"] for r in rows)
    assert not any(key.startswith("critic/") for r in rows for key in r)
    assert abs(rows[0]["kl/k1_mean"]) < 1e-6 < abs(rows[-1]["kl/k1_mean"])  # measured, in the reward
    assert all(abs(r["advantage/mean"]) < 1e-5 for r in rows)  # whitened over the batch's tokens
    assert not (out / "checkpoints" / "step-000002" / "critic").exists()
    # the samples carry each completion's mean per-token advantage: finite, and not one value for all
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    advantages = [row["advantage"] for row in samples]
    assert len(samples) == 3 * 8 * 4 and all(math.isfinite(a) for a in advantages)
    assert len({round(a, 6) for a in advantages}) > 1
