"""PPO with a critic and the per-token path, the pure parts: the recipe checks of the critic's keys, the
per-token advantages the trainer computes, explained variance, and the plan's count of the critic's memory."""

import pytest
import torch

from alphaalign.config import AlgorithmConfig, load_recipe
from alphaalign.errors import UserError
from alphaalign.rl import algos

# ---------------------------------------------------------------------------------------------------------
# The recipe


def test_gae_gets_a_default_critic_and_grpo_none(write_recipe):
    recipe = load_recipe(write_recipe({"algorithm": {"advantage_estimator": "gae"}}))
    assert recipe.critic is not None and recipe.critic.init_from == "policy"
    assert recipe.critic.learning_rate == 1e-5  # verl's critic lr
    assert (recipe.algorithm.gamma, recipe.algorithm.lam, recipe.algorithm.value_clip) == (1.0, 1.0, 0.5)
    assert load_recipe(write_recipe()).critic is None


@pytest.mark.parametrize("estimator", ["grpo", "gae", "reinforce_pp"])
def test_a_resolved_recipe_which_writes_every_key_loads_again(write_recipe, tmp_path, estimator):
    # the run's recipe.resolved.yaml holds every default (lam, value_clip, critic: null, ...)
    import yaml

    recipe = load_recipe(write_recipe({"algorithm": {"advantage_estimator": estimator}}))
    resolved = tmp_path / "recipe.resolved.yaml"
    resolved.write_text(yaml.safe_dump(recipe.public_dump(), sort_keys=False))
    assert load_recipe(resolved).public_dump() == recipe.public_dump()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"critic": {"learning_rate": 1e-5}}, "critic: only algorithm.advantage_estimator gae uses a critic"),
        (
            {"algorithm": {"advantage_estimator": "gae"}, "critic": None},
            "critic: algorithm.advantage_estimator gae needs a critic",
        ),
        ({"algorithm": {"lam": 0.95}}, "algorithm.lam: only advantage_estimator gae uses it"),
        ({"algorithm": {"value_clip": 0.2}}, "algorithm.value_clip: only advantage_estimator gae uses it"),
        (
            {"algorithm": {"kl_in_reward": True, "beta": 0.1}},
            "algorithm.kl_in_reward: needs a per-token advantage estimator",
        ),
        (
            {"algorithm": {"advantage_estimator": "gae", "kl_in_reward": True}},
            "algorithm.kl_in_reward: folds β·KL",
        ),
        ({"algorithm": {"gamma": 0.99}}, "algorithm.gamma: discounts per-token rewards"),
        (
            {"algorithm": {"advantage_estimator": "gae", "scale_rewards": "none"}},
            "algorithm.scale_rewards: 'none' has no effect with per-token advantages",
        ),
        ({"algorithm": {"advantage_estimator": "reinforce_pp", "gamma": 0.99}}, "algorithm.gamma: discounts"),
        ({"algorithm": {"advantage_estimator": "gae"}, "critic": {"lr": 1e-5}}, "critic.lr: unknown key"),
        (
            {"algorithm": {"advantage_estimator": "gae"}, "critic": {"learning_rate": 0}},
            "critic.learning_rate: ",
        ),
        (
            {"algorithm": {"advantage_estimator": "gea"}},
            "algorithm.advantage_estimator: 'gea' is not registered",
        ),
    ],
)
def test_critic_keys_are_checked_in_one_line_naming_the_file(write_recipe, sections, message):
    path = write_recipe(sections)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path.name}: ") or line.startswith(f"{path}: "), line
    assert message in line, line


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


def test_the_plan_counts_the_critics_weights_gradients_and_optimizer(write_recipe):
    from alphaalign.plan import Plan, estimate_memory, find_architecture

    path = write_recipe(
        {
            "algorithm": {"advantage_estimator": "gae"},
            "trainer": {"micro_batch_tokens": 1024, "device": "cuda"},
        }
    )
    est = estimate_memory(load_recipe(path), Plan(gpus=True))
    backbone = find_architecture("Qwen/Qwen2.5-0.5B-Instruct").params(lm_head=False)
    assert est.held["critic"] == pytest.approx(16 * backbone / 1e9)  # float32 weights, gradients, 2 moments
    grpo = estimate_memory(
        load_recipe(write_recipe({"trainer": {"micro_batch_tokens": 1024}})), Plan(gpus=True)
    )
    assert "critic" not in grpo.held
