"""PPO with a critic (`advantage_estimator: gae`) and the per-token path (REINFORCE++ with `kl_in_reward`):
the recipe checks, the token-level advantages the trainer computes, the critic's values and its update on a
fixed batch, a critic started from a reward model, and end-to-end runs with exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alphaalign.config import AlgorithmConfig, load_recipe
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
        "trainer": {"prompts_per_step": 8, "max_steps": 4, "learning_rate": 1e-3, "save_every": 2,
                    "output_dir": str(tmp_path / "run"), "progress_bar": False},
        "logging": {"wandb_mode": "disabled"},
    }  # fmt: skip
    for key, value in sections.items():
        recipe[key] = value if value is None else {**recipe.get(key, {}), **value}
    return recipe


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# The recipe


def test_gae_gets_a_default_critic_and_grpo_none(write_recipe):
    recipe = load_recipe(write_recipe({"algorithm": {"advantage_estimator": "gae"}}))
    assert recipe.critic is not None and recipe.critic.init_from == "policy"
    assert recipe.critic.learning_rate == 1e-5  # verl's critic lr
    assert (recipe.algorithm.gamma, recipe.algorithm.lam, recipe.algorithm.value_clip) == (1.0, 1.0, 0.5)
    assert load_recipe(write_recipe()).critic is None


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"critic": {"learning_rate": 1e-5}}, "critic: only algorithm.advantage_estimator gae uses a critic"),
        ({"algorithm": {"advantage_estimator": "gae"}, "critic": None}, "critic: algorithm.advantage_estimator gae needs a critic"),
        ({"algorithm": {"lam": 0.95}}, "algorithm.lam: only advantage_estimator gae uses it"),
        ({"algorithm": {"value_clip": 0.2}}, "algorithm.value_clip: only advantage_estimator gae uses it"),
        ({"algorithm": {"kl_in_reward": True, "beta": 0.1}}, "algorithm.kl_in_reward: needs a per-token advantage estimator"),
        ({"algorithm": {"advantage_estimator": "gae", "kl_in_reward": True}}, "algorithm.kl_in_reward: folds β·KL"),
        ({"algorithm": {"gamma": 0.99}}, "algorithm.gamma: discounts per-token rewards"),
        ({"algorithm": {"advantage_estimator": "reinforce_pp", "gamma": 0.99}}, "algorithm.gamma: discounts"),
        ({"algorithm": {"advantage_estimator": "gae"}, "critic": {"lr": 1e-5}}, "critic.lr: unknown key"),
        ({"algorithm": {"advantage_estimator": "gae"}, "critic": {"learning_rate": 0}}, "critic.learning_rate: "),
        ({"algorithm": {"advantage_estimator": "gea"}}, "algorithm.advantage_estimator: 'gea' is not registered"),
    ],
)  # fmt: skip
def test_critic_keys_are_checked_in_one_line_naming_the_file(write_recipe, sections, message):
    path = write_recipe(sections)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path.name}: ") or line.startswith(f"{path}: "), line
    assert message in line, line


def test_cli_validate_refuses_a_critic_without_gae(write_recipe):
    import subprocess
    import sys

    path = write_recipe({"critic": {"init_from": "policy"}})
    done = subprocess.run([sys.executable, "-m", "alphaalign.cli", "validate", str(path)], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "critic: only algorithm.advantage_estimator gae uses a critic" in done.stderr


def test_which_settings_take_the_per_token_path():
    def level(**kw):
        return algos.token_level(AlgorithmConfig(**kw))

    assert level(advantage_estimator="gae") and level(advantage_estimator="reinforce_pp", kl_in_reward=True)
    assert not level(advantage_estimator="reinforce_pp") and not level(advantage_estimator="grpo")
    assert not level(advantage_estimator="rloo", kl_in_reward=True)  # refused by the recipe check


# ---------------------------------------------------------------------------------------------------------
# The per-token advantages


def test_token_advantages_place_the_reward_on_the_last_token_and_whiten_gae():
    rewards = torch.tensor([1.0, -0.5, float("nan")])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.0, -0.1, 9.0, 9.0], [0.5, 0.5, 0.5, 0.5]])
    ac = AlgorithmConfig(advantage_estimator="gae", gamma=0.9, lam=0.8)
    adv, ret = algos.token_advantages(rewards, mask, ac, values)
    token_rewards = torch.zeros(3, 4)
    token_rewards[0, 2], token_rewards[1, 1] = 1.0, -0.5  # NaN (unscorable) counts as 0
    raw, expected_ret = algos.gae_advantages(token_rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, algos.masked_whiten(raw, mask)) and torch.equal(ret, expected_ret)
    assert abs(float(algos.masked_mean(adv, mask))) < 1e-6  # whitened over the batch's tokens
    assert float(ret[0, 2]) == pytest.approx(1.0)  # the last token's return is its reward (V after it: 0)

    kl = torch.full((3, 4), 0.2)
    ac = AlgorithmConfig(advantage_estimator="reinforce_pp", kl_in_reward=True, beta=0.5)
    adv, ret = algos.token_advantages(rewards, mask, ac, kl=kl)
    # returns-to-go of −β·KL per token plus the reward at the end: row 0 = 1 − 0.1·(3, 2, 1)
    assert torch.allclose(ret[0], torch.tensor([0.7, 0.8, 0.9, 0.0]))
    assert torch.allclose(adv, algos.masked_whiten(ret, mask))


def test_explained_variance_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert algos.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert algos.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(
        0.0, abs=1e-6
    )
    # residuals (0, 0, 1.5) have variance 0.5 (population), returns 2/3
    assert algos.explained_variance(torch.tensor([[1.0, 2.0, 1.5, 0.0]]), returns, mask) == pytest.approx(
        0.25
    )


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
    recipe_dict = base_recipe(tiny_policy, folder, trainer={"micro_batch_tokens": 120},
                              data={"max_prompt_tokens": 40, "train": [{"path": "x.jsonl"}]},
                              rollout={"max_new_tokens": 16})  # fmt: skip
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
        explained.append(algos.explained_variance(values, algos.discounted_returns(
            algos.last_token_rewards(rewards, mask), mask), mask))  # fmt: skip
        metrics = critic.update(batch, old, returns, ac)
        assert "nonfinite" not in metrics and set(metrics) == {"critic/value_loss", "critic/vf_clipfrac",
                                                               "critic/grad_norm", "critic/lr"}  # fmt: skip
        losses.append(metrics["critic/value_loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert explained[-1] > explained[0] + 0.2, explained


def test_a_critic_update_that_overflows_leaves_the_critic_as_it_was(fixed_batch):
    """Two epochs, a learning rate of 1e30: the first epoch's step sends the weights to ±1e30, the second's loss
    is not finite; the update is refused and the weights, Adam's moments and the schedule are as before."""
    from alphaalign.rl.critic import Critic
    from alphaalign.rl.parallel import ONE_PROCESS
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

    path = write_recipe({"model": {"name_or_path": str(tiny_rm)}, "algorithm": {"advantage_estimator": "gae"},
                         "critic": {"init_from": str(tiny_rm)}})  # fmt: skip
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
    path = write_recipe(base_recipe(tiny_policy, tmp_path))
    train(load_recipe(path, [f"trainer.output_dir={full_dir}"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}", "trainer.max_steps=2"]))
    train(load_recipe(path, [f"trainer.output_dir={split_dir}"]))  # resumes from step 2, critic included
    full, split = strip_timing(read_metrics(full_dir)), strip_timing(read_metrics(split_dir))
    assert [r["step"] for r in split] == [1, 2, 3, 4] and split == full
    assert not any(r["guard/skipped_step"] for r in full)
    for key in ("critic/value_loss", "critic/vf_clipfrac", "critic/explained_variance", "critic/values_mean",
                "critic/grad_norm", "critic/lr", "kl/k3_mean"):  # fmt: skip
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
    recipe = base_recipe(tiny_policy, tmp_path, critic=None, trainer={"max_steps": 3},
                         algorithm={"advantage_estimator": "reinforce_pp", "kl_in_reward": True,
                                    "kl_estimator": "k1", "beta": 0.1})  # fmt: skip
    del recipe["critic"]
    train(load_recipe(write_recipe(recipe)))
    out = tmp_path / "run"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["guard/skipped_step"] for r in rows)
    assert not any(key.startswith("critic/") for r in rows for key in r)
    assert abs(rows[0]["kl/k1_mean"]) < 1e-6 < abs(rows[-1]["kl/k1_mean"])  # measured, in the reward
    assert all(abs(r["advantage/mean"]) < 1e-5 for r in rows)  # whitened over the batch's tokens
    assert not (out / "checkpoints" / "step-000002" / "critic").exists()


def test_the_plan_counts_the_critics_weights_gradients_and_optimizer(write_recipe):
    from alphaalign.plan import Plan, estimate_memory, find_architecture

    path = write_recipe({"algorithm": {"advantage_estimator": "gae"},
                         "trainer": {"micro_batch_tokens": 1024, "device": "cuda"}})  # fmt: skip
    est = estimate_memory(load_recipe(path), Plan(gpus=True))
    backbone = find_architecture("Qwen/Qwen2.5-0.5B-Instruct").params(lm_head=False)
    assert est.held["critic"] == pytest.approx(16 * backbone / 1e9)  # float32 weights, gradients, 2 moments
    grpo = estimate_memory(
        load_recipe(write_recipe({"trainer": {"micro_batch_tokens": 1024}})), Plan(gpus=True)
    )
    assert "critic" not in grpo.held
