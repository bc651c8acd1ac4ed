"""Properties of the pure RL functions in `alphaalign.rl.algos`.

Expected values are derived by hand or from an independent formula written out in the test, never copied from
a run of the code under test.
"""

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from alphaalign.rl import algos  # noqa: E402

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
FAST = settings(max_examples=40, deadline=None, derandomize=True)

finite = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def batches(draw, max_b=4, max_t=5):
    """(logp, old_logp, mask) for B completions of up to T tokens; every row has at least one token."""
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    logp = torch.tensor(draw(st.lists(st.floats(-6, 0, width=32), min_size=b * t, max_size=b * t))).view(b, t)
    shift = torch.tensor(draw(st.lists(st.floats(-1.5, 1.5, width=32), min_size=b * t, max_size=b * t))).view(
        b, t
    )
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    mask = (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    return logp, logp + shift, mask


def grad_wrt_logp(logp, fn):
    x = logp.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


# ---------------------------------------------------------------------------------------------------------
# Policy-gradient surrogate


@FAST
@given(
    batches(),
    st.sampled_from(LOSS_TYPES),
    st.sampled_from(["token", "sequence"]),
    st.sampled_from([None, 0.28]),
)
def test_zero_advantage_gives_zero_policy_gradient(data, loss_type, level, eps_high):
    logp, old, mask = data
    adv = torch.zeros(logp.shape[0])

    def loss(x):
        log_w = algos.importance_log_weights(x, old, mask, level)
        per_token, low, high = algos.clipped_surrogate(log_w, adv, 0.2, eps_high)
        assert not low.any() and not high.any()  # no advantage, nothing to clip
        return algos.aggregate_loss(per_token, mask, loss_type, max_completion_length=logp.shape[1])

    grad = grad_wrt_logp(logp, loss)
    assert torch.all(grad == 0)


@FAST
@given(batches(), st.lists(finite, min_size=4, max_size=4), st.sampled_from([None, 0.28]))
def test_ratio_one_token_level(data, adv_values, eps_high):
    """π_old = π_θ: loss −Â on every token, gradient −Â·∇logp, nothing clipped."""
    logp, _, mask = data
    adv = torch.tensor(adv_values[: logp.shape[0]])
    per_token, low, high = algos.clipped_surrogate(
        algos.importance_log_weights(logp, logp, mask, "token"), adv, 0.2, eps_high
    )
    assert torch.equal(per_token, -adv.unsqueeze(1).expand_as(logp))
    assert not low.any() and not high.any()

    def total(x):
        log_w = algos.importance_log_weights(x, x.detach(), mask, "token")
        return algos.clipped_surrogate(log_w, adv, 0.2, eps_high)[0].sum()

    assert torch.allclose(grad_wrt_logp(logp, total), -adv.unsqueeze(1).expand_as(logp), atol=1e-6)


@FAST
@given(batches(), st.lists(finite, min_size=4, max_size=4))
def test_ratio_one_sequence_level(data, adv_values):
    """GSPO at ratio 1: one weight per sequence; the masked token sum of the loss has gradient −Â·mask/|o_i|."""
    logp, _, mask = data
    adv = torch.tensor(adv_values[: logp.shape[0]])

    def total(x):
        log_w = algos.importance_log_weights(x, x.detach(), mask, "sequence")
        assert log_w.shape == (x.shape[0], 1)
        per_token, low, high = algos.clipped_surrogate(log_w, adv, 0.2)
        assert not low.any() and not high.any()
        return (per_token * mask).sum()

    # Σ_t −Â·exp(s)·m_t = −Â·n·exp(s) with s = Σ_t m_t(x_t − old_t)/n, so d/dx_t = −Â·exp(s)·m_t = −Â·m_t at s = 0
    expected = -adv.unsqueeze(1) * mask
    assert torch.allclose(grad_wrt_logp(logp, total), expected, atol=1e-5)


@FAST
@given(
    st.lists(st.floats(-0.75, 0.75, width=32), min_size=1, max_size=12),
    st.floats(0.1, 2.0),
    st.sampled_from([1.0, -1.0]),
    st.sampled_from([(0.2, None), (0.2, 0.28), (0.1, 0.4)]),
)
def test_clipping_removes_gradient_exactly_where_expected(log_ratios, magnitude, sign, eps):
    eps_low, eps_high = eps
    hi = 1 + (eps_low if eps_high is None else eps_high)
    lo = 1 - eps_low
    log_ratio = torch.tensor(log_ratios)
    ratio = log_ratio.exp()
    assume(bool(((ratio - hi).abs() > 1e-4).all() and ((ratio - lo).abs() > 1e-4).all()))
    adv = torch.full((1,), sign * magnitude)
    old = torch.zeros(1, len(log_ratios))

    def total(x):
        return algos.clipped_surrogate(
            algos.importance_log_weights(x, old, None, "token"), adv, eps_low, eps_high
        )[0].sum()

    grad = grad_wrt_logp(log_ratio.unsqueeze(0), total)[0]
    _, low, high = algos.clipped_surrogate(log_ratio.unsqueeze(0), adv, eps_low, eps_high)
    if sign > 0:
        clipped = ratio > hi
        assert torch.equal(high[0], clipped) and not low.any()
    else:
        clipped = ratio < lo
        assert torch.equal(low[0], clipped) and not high.any()
    # d/dlogp of −w·Â is −Â·w where the unclipped branch is active, exactly 0 where the clip took over
    expected = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio)
    assert torch.all(grad[clipped] == 0)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_asymmetric_epsilon_high_is_honoured():
    ratio = torch.tensor([[1.25, 1.30, 0.85, 0.75]])
    adv_pos, adv_neg = torch.tensor([1.0]), torch.tensor([-1.0])
    log_w = ratio.log()
    _, _, high_sym = algos.clipped_surrogate(log_w, adv_pos, 0.2)
    _, _, high_asym = algos.clipped_surrogate(log_w, adv_pos, 0.2, 0.28)
    assert high_sym.tolist() == [[True, True, False, False]]
    assert high_asym.tolist() == [[False, True, False, False]]  # 1.25 < 1.28 stays unclipped
    loss_asym, low, _ = algos.clipped_surrogate(log_w, adv_neg, 0.2, 0.28)
    assert low.tolist() == [[False, False, False, True]]  # ε_low still 0.2 on the negative side
    # Â<0 at ratio 0.75: −min(−0.75, −0.8) = 0.8
    assert loss_asym[0, 3].item() == pytest.approx(0.8)
    loss_pos, _, _ = algos.clipped_surrogate(log_w, adv_pos, 0.2, 0.28)
    assert loss_pos[0].tolist() == pytest.approx([-1.25, -1.28, -0.85, -0.75])


# ---------------------------------------------------------------------------------------------------------
# Advantages


def reward_groups(n_groups=(1, 4), group=(2, 6)):
    return st.integers(*n_groups).flatmap(
        lambda g: st.integers(*group).flatmap(
            lambda n: st.tuples(
                st.just(n),
                st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=g * n, max_size=g * n),
            )
        )
    )


@FAST
@given(reward_groups(), st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_sum_to_zero(data, scale):
    n, values = data
    adv = algos.grpo_advantages(torch.tensor(values, dtype=torch.float64), n, scale)
    assert torch.allclose(
        adv.view(-1, n).sum(1), torch.zeros(len(values) // n, dtype=torch.float64), atol=1e-6
    )


@FAST
@given(
    reward_groups(),
    st.lists(st.floats(-100, 100, width=32), min_size=4, max_size=4),
    st.sampled_from(["group", "none"]),
)
def test_group_advantages_invariant_to_group_constant(data, shifts, scale):
    n, values = data
    r = torch.tensor(values, dtype=torch.float64)
    shift = torch.tensor(shifts[: len(values) // n], dtype=torch.float64).repeat_interleave(n)
    assert torch.allclose(
        algos.grpo_advantages(r + shift, n, scale), algos.grpo_advantages(r, n, scale), atol=1e-6
    )


@FAST
@given(reward_groups(), st.floats(0.5, 20.0))
def test_group_scaled_advantages_invariant_to_reward_scale(data, c):
    n, values = data
    r = torch.tensor(values, dtype=torch.float64)
    sigma = r.view(-1, n).std(dim=1, unbiased=True)
    assume(bool((sigma > 0.1).all()))
    a, a_c = algos.grpo_advantages(r, n, "group"), algos.grpo_advantages(c * r, n, "group")
    # A_c / A = c(σ + ε) / (cσ + ε), so |A_c − A| ≤ |A|·ε·|c − 1| / (cσ): only the ε = 1e-4 term moves
    bound = a.abs() * 1e-4 * abs(c - 1) / (c * sigma.repeat_interleave(n)) + 1e-9
    assert torch.all((a_c - a).abs() <= bound)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_has_zero_advantage(scale):
    r = torch.tensor([2.0, 2.0, 2.0, 1.0, 2.0, 6.0])
    adv = algos.grpo_advantages(r, 3, scale)
    assert torch.all(adv[:3] == 0)
    assert adv[3:].abs().min() > 0.1


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0, 4.0])
    # group 1: mean 3, Bessel std 2; group 2: mean 4/3, Bessel std sqrt(((4/3)²·2 + (8/3)²)/2) = sqrt(16/3)
    g2 = torch.tensor([-4 / 3, -4 / 3, 8 / 3])
    expected_group = torch.cat([torch.tensor([-2.0, 0.0, 2.0]) / (2 + 1e-4), g2 / (math.sqrt(16 / 3) + 1e-4)])
    assert torch.allclose(algos.grpo_advantages(r, 3, "group"), expected_group, atol=1e-6)
    centered = torch.tensor([-2.0, 0.0, 2.0, -4 / 3, -4 / 3, 8 / 3])
    assert torch.allclose(algos.grpo_advantages(r, 3, "none"), centered, atol=1e-6)
    # batch: per-group mean, std of all six rewards (mean 13/6, Bessel)
    batch_std = math.sqrt(sum((x - 13 / 6) ** 2 for x in r.tolist()) / 5)
    assert torch.allclose(algos.grpo_advantages(r, 3, "batch"), centered / (batch_std + 1e-4), atol=1e-6)


def test_nan_rewards_get_zero_advantage_and_are_excluded_from_stats():
    r = torch.tensor([1.0, math.nan, 3.0, 5.0, math.nan, math.nan, math.nan, math.nan])
    adv = algos.grpo_advantages(r, 4, "group")
    # group 1 over {1, 3, 5}: mean 3, std 2; group 2 has no reward at all
    expected = torch.tensor([-2 / (2 + 1e-4), 0.0, 0.0, 2 / (2 + 1e-4), 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert not torch.isnan(adv).any()
    # a group with a single scored reward: no spread, no signal
    single = algos.grpo_advantages(torch.tensor([math.nan, 7.0, math.nan]), 3, "group")
    assert torch.equal(single, torch.zeros(3))


@FAST
@given(reward_groups())
def test_rloo_is_leave_one_out(data):
    n, values = data
    r = torch.tensor(values, dtype=torch.float64)
    grouped = r.view(-1, n)
    # r_i − mean of the others, written out
    loo = torch.stack([grouped[:, i] - (grouped.sum(1) - grouped[:, i]) / (n - 1) for i in range(n)], dim=1)
    mean = grouped.mean(1, keepdim=True)
    assert torch.allclose(loo, n / (n - 1) * (grouped - mean), atol=1e-9)
    assert torch.allclose(algos.rloo_advantages(r, n, "none").view(-1, n), loo, atol=1e-6)


def test_combine_rewards_by_hand():
    per_term = torch.tensor([[1.0, 2.0], [math.nan, 4.0], [math.nan, math.nan], [3.0, math.nan]])
    w = torch.tensor([0.5, 2.0])
    out = algos.combine_rewards(per_term, w, 2, "sum_then_normalize")
    assert out[:2].tolist() == [0.5 + 4.0, 8.0] and out[3].item() == 1.5
    assert math.isnan(out[2].item())  # unscorable stays NaN
    # normalize_then_sum: each term z-scored within its group of 2: (x − mean)/(σ + ε), Bessel σ of {a, b} = |a − b|/√2
    per_term = torch.tensor([[1.0, 10.0], [3.0, 30.0], [0.0, 5.0], [4.0, 5.0]])
    out = algos.combine_rewards(per_term, w, 2, "normalize_then_sum")
    e0 = -1.0 / (2 / math.sqrt(2) + 1e-4) * 0.5 - 10.0 / (20 / math.sqrt(2) + 1e-4) * 2.0
    e2 = -2.0 / (4 / math.sqrt(2) + 1e-4) * 0.5  # term 2 constant: 0 / (0 + ε) = 0
    assert out[0].item() == pytest.approx(e0, abs=1e-5) and out[1].item() == pytest.approx(-e0, abs=1e-5)
    assert out[2].item() == pytest.approx(e2, abs=1e-5) and out[3].item() == pytest.approx(-e2, abs=1e-5)


def test_batch_zscore_by_hand():
    r = torch.tensor([1.0, math.nan, 2.0, 6.0])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    expected = torch.tensor(
        [(1 - mean) / (std + 1e-4), 0.0, (2 - mean) / (std + 1e-4), (6 - mean) / (std + 1e-4)]
    )
    assert torch.allclose(algos.batch_zscore(r), expected, atol=1e-6)


@FAST
@given(st.lists(st.floats(-50, 50, width=32), min_size=2, max_size=20))
def test_nanstd_is_bessel_std_and_ignores_nan(values):
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(algos.nanstd(x), x.std(unbiased=True), atol=1e-9)
    with_nan = torch.cat([x, torch.tensor([math.nan, math.nan], dtype=torch.float64)])
    assert torch.allclose(algos.nanstd(with_nan), x.std(unbiased=True), atol=1e-9)
    assert math.isnan(algos.nanstd(torch.tensor([1.0, math.nan])).item())


# ---------------------------------------------------------------------------------------------------------
# KL estimators


@FAST
@given(st.lists(st.floats(-20, 0, width=32), min_size=1, max_size=10))
def test_kl_estimators_vanish_at_equality(values):
    x = torch.tensor(values)
    for name in ("k1", "k2", "k3"):
        assert torch.all(algos.KL_ESTIMATORS[name](x, x.clone()) == 0), name


@FAST
@given(st.lists(st.tuples(st.floats(-15, 0, width=32), st.floats(-15, 0, width=32)), min_size=1, max_size=10))
def test_k3_nonnegative_and_k2_half_square(pairs):
    logp, ref = torch.tensor(pairs, dtype=torch.float64).unbind(1)
    assert torch.all(algos.kl_k3(logp, ref) >= 0)
    assert torch.allclose(algos.kl_k2(logp, ref), 0.5 * (logp - ref) ** 2)
    assert torch.allclose(algos.kl_k1(logp, ref), logp - ref)


def test_kl_estimators_are_unbiased_for_exact_kl():
    """E_{x~π}[k1] = E_{x~π}[k3] = KL(π‖ref) on a small categorical (Monte-Carlo, 5 standard errors)."""
    pi = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=torch.float64)
    exact = float((pi * (pi / ref).log()).sum())
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    logp, ref_logp = pi.log()[x], ref.log()[x]
    for name in ("k1", "k3"):
        samples = algos.KL_ESTIMATORS[name](logp, ref_logp)
        stderr = float(samples.std()) / math.sqrt(len(samples))
        assert abs(float(samples.mean()) - exact) < 5 * stderr, name
        assert stderr < 0.01
    # k2 is biased (it estimates ½E[d²], not KL): it must not agree here
    assert abs(float(algos.kl_k2(logp, ref_logp).mean()) - exact) > 0.01


# ---------------------------------------------------------------------------------------------------------
# Aggregation

L23 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M23 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_aggregate_loss_by_hand():
    # masked tokens: row 0 → 1, 2 ; row 1 → 4. Sum 7, 3 tokens.
    assert algos.aggregate_loss(L23, M23, "grpo").item() == pytest.approx((1.5 + 4.0) / 2)
    assert algos.aggregate_loss(L23, M23, "bnpo").item() == pytest.approx(7 / 3)
    assert algos.aggregate_loss(L23, M23, "dr_grpo", max_completion_length=4).item() == pytest.approx(7 / 8)
    assert algos.aggregate_loss(L23, M23, "dapo").item() == pytest.approx(7 / 3)
    # batch-wide totals
    assert algos.aggregate_loss(L23, M23, "grpo", total_sequences=4).item() == pytest.approx(5.5 / 4)
    assert algos.aggregate_loss(L23, M23, "bnpo", num_micro_batches=2).item() == pytest.approx(7 / 6)
    assert algos.aggregate_loss(
        L23, M23, "dr_grpo", total_sequences=5, max_completion_length=4
    ).item() == pytest.approx(7 / 20)
    assert algos.aggregate_loss(L23, M23, "dapo", total_tokens=10).item() == pytest.approx(0.7)


@FAST
@given(batches(max_b=6, max_t=6), st.integers(1, 6))
def test_dapo_and_grpo_micro_batches_sum_to_batch_loss(data, chunk):
    per_token, _, mask = data
    b = per_token.shape[0]
    total_tokens = float(mask.sum())
    parts = range(0, b, chunk)
    dapo = sum(
        algos.aggregate_loss(per_token[i : i + chunk], mask[i : i + chunk], "dapo", total_tokens=total_tokens)
        for i in parts
    )
    assert float(dapo) == pytest.approx(float((per_token * mask).sum() / mask.sum()), abs=1e-5)
    grpo = sum(
        algos.aggregate_loss(per_token[i : i + chunk], mask[i : i + chunk], "grpo", total_sequences=b)
        for i in parts
    )
    seq_means = [float((per_token[r] * mask[r]).sum() / mask[r].sum()) for r in range(b)]
    assert float(grpo) == pytest.approx(sum(seq_means) / b, abs=1e-5)
    dr = sum(
        algos.aggregate_loss(
            per_token[i : i + chunk],
            mask[i : i + chunk],
            "dr_grpo",
            total_sequences=b,
            max_completion_length=7,
        )
        for i in parts
    )
    assert float(dr) == pytest.approx(float((per_token * mask).sum()) / (b * 7), abs=1e-5)


def test_grpo_weights_sequences_equally_regardless_of_length():
    short = torch.tensor([[2.0, 9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    # sequence means 2 and 1 → 1.5, whatever the lengths; dapo weighs by tokens: (2 + 5) / 6
    assert algos.aggregate_loss(short, mask, "grpo").item() == pytest.approx(1.5)
    assert algos.aggregate_loss(short, mask, "dapo").item() == pytest.approx(7 / 6)
    longer = torch.tensor([[2.0, 2.0, 2.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask_longer = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert algos.aggregate_loss(longer, mask_longer, "grpo").item() == pytest.approx(1.5)


def test_dr_grpo_uses_max_completion_length():
    a = algos.aggregate_loss(L23, M23, "dr_grpo", max_completion_length=3).item()
    b = algos.aggregate_loss(L23, M23, "dr_grpo", max_completion_length=6).item()
    assert a == pytest.approx(7 / 6) and b == pytest.approx(7 / 12)
    with pytest.raises(ValueError):
        algos.aggregate_loss(L23, M23, "dr_grpo")


def test_aggregate_loss_broadcasts_sequence_level_loss():
    per_seq = torch.tensor([[2.0], [-1.0]])
    assert algos.aggregate_loss(per_seq, M23, "grpo").item() == pytest.approx(0.5)
    assert algos.aggregate_loss(per_seq, M23, "dapo").item() == pytest.approx((2 + 2 - 1) / 3)


# ---------------------------------------------------------------------------------------------------------
# Rollout-engine correction

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -4.0]])
ENGINE = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, math.nan, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# token ratios π_old/π_engine: row 0 → e^{0.5}, e^{-1}, 1 ; row 1 → 1, 1 (NaN engine), 1 (padding)


def test_correction_shapes_and_values():
    token = algos.rollout_correction_weights(OLD, ENGINE, MASK, "token_truncate", cap_max=100.0)
    seq = algos.rollout_correction_weights(OLD, ENGINE, MASK, "sequence_truncate", cap_max=100.0)
    assert token.shape == (2, 3) and seq.shape == (2, 1)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(token, expected)
    assert not torch.isnan(token).any()
    # sequence ratio = product of the token ratios
    assert torch.allclose(seq, expected.prod(dim=1, keepdim=True))


def test_correction_truncate_clamps_to_caps():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    engine = torch.tensor([[-3.0, 0.0, 2.0]])  # ratios e^3 ≈ 20, 1, e^-2 ≈ 0.135
    w = algos.rollout_correction_weights(old, engine, torch.ones(1, 3), "token_truncate", cap_max=3.0)
    assert torch.allclose(w, torch.tensor([[3.0, 1.0, math.exp(-2.0)]]))
    w = algos.rollout_correction_weights(
        old, engine, torch.ones(1, 3), "token_truncate", cap_max=3.0, cap_min=0.5
    )
    assert torch.allclose(w, torch.tensor([[3.0, 1.0, 0.5]]))
    seq = algos.rollout_correction_weights(old, engine, torch.ones(1, 3), "sequence_truncate", cap_max=2.0)
    assert torch.allclose(seq, torch.tensor([[2.0]]))  # e^{3 + 0 − 2} = e > 2


def test_correction_mask_zeroes_outside_range():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    engine = torch.tensor([[-3.0, 0.0, 2.0, -0.5]])  # ratios ≈ 20.1, 1, 0.135, 1.65
    w = algos.rollout_correction_weights(
        old, engine, torch.ones(1, 4), "token_mask", cap_max=3.0, cap_min=0.5
    )
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0, math.exp(0.5)]]))
    w = algos.rollout_correction_weights(old, engine, torch.ones(1, 4), "token_mask", cap_max=3.0)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, math.exp(-2.0), math.exp(0.5)]]))  # no lower bound
    seq = algos.rollout_correction_weights(old, engine, torch.ones(1, 4), "sequence_mask", cap_max=3.0)
    assert seq.item() == 0.0  # e^{3 + 0 − 2 + 0.5} = e^{1.5} ≈ 4.48 > 3
    seq = algos.rollout_correction_weights(old, engine, torch.ones(1, 4), "sequence_mask", cap_max=50.0)
    assert seq.item() == pytest.approx(math.exp(1.5), rel=1e-5)


@FAST
@given(batches(), st.sampled_from(["token", "sequence"]))
def test_correction_sequence_is_product_of_tokens(data, level):
    old, engine, mask = data
    token = algos.rollout_correction_weights(old, engine, mask, "token_truncate", cap_max=1e30)
    seq = algos.rollout_correction_weights(old, engine, mask, "sequence_truncate", cap_max=1e30)
    direct = torch.exp(((old - engine) * mask).double())
    assert torch.allclose(token.double(), direct, rtol=1e-5)
    assert torch.allclose(seq.double(), direct.prod(dim=1, keepdim=True), rtol=1e-4)
    assert torch.all(token[mask == 0] == 1)


# ---------------------------------------------------------------------------------------------------------
# Log-probs, entropy, registries, unknown names


def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # softmax(x/1) = (1/4, 3/4) and (1/2, 1/2)
    lp = algos.token_logprobs(logits, torch.tensor([[1, 0]]), 1.0)
    assert lp[0].tolist() == pytest.approx([math.log(0.75), math.log(0.5)])
    # temperature 0.5 doubles the logits: (1, 9)/10
    lp = algos.token_logprobs(logits, torch.tensor([[1, 0]]), 0.5)
    assert lp[0].tolist() == pytest.approx([math.log(0.9), math.log(0.5)])
    assert algos.token_logprobs(logits.bfloat16(), torch.tensor([[1, 0]])).dtype == torch.float32
    lp, ent = algos.token_logprobs_and_entropy(logits, torch.tensor([[1, 0]]), 1.0)
    assert lp[0].tolist() == pytest.approx([math.log(0.75), math.log(0.5)])
    assert ent[0].tolist() == pytest.approx([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)])
    lp, ent = algos.token_logprobs_and_entropy(logits, torch.tensor([[1, 0]]), 0.5)
    assert lp[0].tolist() == pytest.approx([math.log(0.9), math.log(0.5)])
    assert ent[0].tolist() == pytest.approx([-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), math.log(2.0)])


def test_fused_logprobs_keep_the_gradient_of_the_plain_ones():
    logits = torch.randn(2, 3, 50) * 4
    targets = torch.randint(50, (2, 3))
    plain = logits.clone().requires_grad_()
    fused = logits.clone().requires_grad_()
    algos.token_logprobs(plain, targets, 0.7).sum().backward()
    lp, ent = algos.token_logprobs_and_entropy(fused, targets, 0.7)
    lp.sum().backward()
    assert not ent.requires_grad and torch.allclose(plain.grad, fused.grad, atol=1e-6)


def test_fused_logprobs_gradient_with_per_token_weights_and_a_second_backward_is_refused():
    logits = torch.randn(2, 3, 7) * 3
    targets = torch.randint(7, (2, 3))
    upstream = torch.randn(2, 3)  # a different weight per token, as a real loss gives
    plain, fused = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (algos.token_logprobs(plain, targets) * upstream).sum().backward()
    lp, _ = algos.token_logprobs_and_entropy(fused, targets)
    (lp * upstream).sum().backward(retain_graph=True)
    assert torch.allclose(plain.grad, fused.grad, atol=1e-6)
    with pytest.raises(RuntimeError, match="runs once"):
        lp.sum().backward()  # its buffer became the first gradient


def test_registries_hold_the_recipe_choices():
    assert set(algos.ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert set(algos.KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert set(algos.TOKEN_ADVANTAGE_ESTIMATORS) == {"gae", "reinforce_pp"}
    assert set(algos.POLICY_LOSSES) == {"clip", "cispo", "sapo"}
    assert set(algos.LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"}
    assert algos.RECIPE_REGISTRIES["algorithm.loss_type"] is algos.LOSS_TYPES
    for loss_type, (surrogate, normaliser) in algos.LOSS_TYPES.items():  # each has a surrogate and normaliser
        assert surrogate in algos.POLICY_LOSSES and normaliser in algos.LOSS_AGGREGATIONS
        algos.aggregate_loss(L23, M23, loss_type, max_completion_length=3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: algos.combine_rewards(torch.zeros(2, 1), torch.ones(1), 2, "mean"),
        lambda: algos.grpo_advantages(torch.zeros(4), 2, "global"),
        lambda: algos.rloo_advantages(torch.zeros(4), 2, "std"),
        lambda: algos.importance_log_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "batch"),
        lambda: algos.aggregate_loss(L23, M23, "ppo"),
        lambda: algos.rollout_correction_weights(OLD, ENGINE, MASK, "batch_truncate"),
        lambda: algos.rollout_correction_weights(OLD, ENGINE, MASK, "token_clip"),
        lambda: algos.rollout_correction_weights(OLD, ENGINE, MASK, "token"),
    ],
)
def test_unknown_names_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------------------------------
# PPO with a critic: GAE, whitening, value loss, KL in the reward; REINFORCE++; cispo and sapo


def gae_reference(rewards, values, gamma, lam):
    """One sequence, written from Schulman et al. (2016): δ_t = r_t + γV_{t+1} − V_t (V_T = 0),
    Â_t = Σ_l (γλ)^l δ_{t+l}, computed as the explicit sum (not the backward recursion)."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


@st.composite
def token_batches(draw, max_b=4, max_t=6):
    """(token_rewards, values, mask, lengths) with garbage (99) on the padding."""
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    rewards = torch.tensor(draw(st.lists(finite, min_size=b * t, max_size=b * t))).view(b, t).double()
    values = torch.tensor(draw(st.lists(finite, min_size=b * t, max_size=b * t))).view(b, t).double()
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    mask = (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).double()
    return rewards.masked_fill(mask == 0, 99.0), values.masked_fill(mask == 0, 99.0), mask, lengths


unit = st.floats(0.0, 1.0, allow_nan=False)


@FAST
@given(token_batches(), unit, unit)
def test_gae_matches_the_papers_sum(data, gamma, lam):
    rewards, values, mask, lengths = data
    adv, ret = algos.gae_advantages(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        ref_adv, ref_ret = gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(ref_adv, abs=1e-9)
        assert ret[i, :n].tolist() == pytest.approx(ref_ret, abs=1e-9)
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)  # padding ignored, zero out


@FAST
@given(token_batches(), unit)
def test_gae_lambda_one_is_discounted_return_minus_value(data, gamma):
    rewards, values, mask, _ = data
    adv, ret = algos.gae_advantages(rewards, values, mask, gamma, 1.0)
    discounted = algos.discounted_returns(rewards, mask, gamma)
    assert torch.allclose(adv, (discounted - values) * mask, atol=1e-9)
    assert torch.allclose(ret, discounted, atol=1e-9)  # the critic's target is the Monte-Carlo return


@FAST
@given(token_batches())
def test_gae_gamma_lambda_one_zero_values_is_reward_to_go(data):
    rewards, _, mask, _ = data
    adv, _ = algos.gae_advantages(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    assert torch.allclose(adv, reward_to_go, atol=1e-9)


def test_gae_lambda_zero_is_one_step_td_and_a_hand_case():
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2)
    adv, ret = algos.gae_advantages(rewards, values, mask, 0.9, 0.8)
    # δ_1 = 1 − 0.2 = 0.8; δ_0 = 0.9·0.2 − 0.5 = −0.32; Â_0 = −0.32 + 0.72·0.8 = 0.256
    assert adv.tolist()[0] == pytest.approx([0.256, 0.8])
    assert ret.tolist()[0] == pytest.approx([0.756, 1.0])
    td, _ = algos.gae_advantages(rewards, values, mask, 0.9, 0.0)
    assert td.tolist()[0] == pytest.approx([-0.32, 0.8])


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # masked entries 1, 2, 3, 4: mean 2.5, Bessel variance 5/3
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-8)
    out = algos.masked_whiten(x, mask)
    assert out[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert out[1, 1:].tolist() == [0.0, 0.0]
    kept = algos.masked_whiten(x, mask, shift_mean=False)
    assert kept[mask.bool()].tolist() == pytest.approx((expected + 2.5).tolist(), abs=1e-6)
    assert algos.masked_whiten(torch.tensor([[7.0, 1.0]]), torch.tensor([[1.0, 0.0]])).tolist() == [
        [0.0, 0.0]
    ]


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.6, 3.0, 5.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipped = algos.value_loss(values, old, returns, mask, clip=0.2)
    # token 0: (1−2)² = 1 vs (0.7−2)² = 1.69; token 1: 0 vs 0.3² = 0.09; token 2: inside the clip range,
    # 1.4² = 1.96 both; token 3: 3² = 9 vs 0.7² = 0.49; token 4: padding
    assert loss.tolist()[0] == pytest.approx([0.845, 0.045, 0.98, 4.5, 0.0])
    assert clipped.tolist()[0] == [True, True, False, False, False]
    loss.sum().backward()
    # the clipped branch is constant in V; the unclipped one has gradient V − R
    assert values.grad.tolist()[0] == pytest.approx([0.0, 0.0, 0.6 - 2.0, 3.0, 0.0])
    plain, none = algos.value_loss(values.detach(), old, returns, mask, clip=None)
    assert plain.tolist()[0] == pytest.approx([0.5, 0.0, 0.98, 4.5, 0.0]) and not none.any()


def test_kl_in_reward_by_hand():
    rewards = torch.tensor([2.0, -1.0, math.nan, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0], [-0.2, 0.4, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = algos.kl_in_reward(rewards, kl, mask, beta=0.5)
    expected = [
        [-0.05, -0.1, 2.0 - 0.15],
        [-1.0 - 0.25, 0.0, 0.0],
        [0.1, -0.2, 0.0],  # unscorable: only the KL
        [0.0, 0.0, 0.0],  # an empty completion has nowhere to put its reward
    ]
    for row, want in zip(out.tolist(), expected, strict=True):
        assert row == pytest.approx(want)
    k1 = algos.KL_ESTIMATORS["k1"](torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]))
    folded = algos.kl_in_reward(torch.tensor([1.0]), k1, torch.ones(1, 2), beta=0.1)
    assert folded.tolist()[0] == pytest.approx([-0.05, 1.0 + 0.1])


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert algos.discounted_returns(rewards, mask, 0.5).tolist() == [[1.5, 1.0, 2.0], [4.0, 0.0, 0.0]]


def test_reinforce_pp_token_level_whitens_returns_over_all_tokens():
    rewards = torch.tensor([1.0, 0.0, 3.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.2, -0.1, 0.4], [0.3, 0.1, 5.0], [0.0, 5.0, 5.0]])
    beta = 0.5
    adv, ret = algos.reinforce_pp_token_advantages(algos.kl_in_reward(rewards, kl, mask, beta), mask)
    # γ = 1: return = reward + the −β·KL still to come
    want = [[1.0 - 0.25, 1.0 - 0.15, 1.0 - 0.2], [-0.2, -0.05, 0.0], [3.0, 0.0, 0.0]]
    for row, w in zip(ret.tolist(), want, strict=True):
        assert row == pytest.approx(w)
    flat = ret[mask.bool()]
    assert adv[mask.bool()].tolist() == pytest.approx(((flat - flat.mean()) / flat.std()).tolist(), abs=1e-6)
    assert torch.all(adv[~mask.bool()] == 0)


@FAST
@given(st.lists(finite, min_size=6, max_size=6), st.floats(1, 10), st.floats(-5, 5))
def test_reinforce_pp_invariant_to_affine_rewards(values, scale, shift):
    rewards = torch.tensor(values).double()
    assume(float(rewards.std()) > 0.5)  # the ε = 1e-4 added to σ is then negligible
    for name in ("reinforce_pp", "reinforce_pp_baseline"):
        fn = algos.ADVANTAGE_ESTIMATORS[name]
        assert torch.allclose(fn(rewards, 3), fn(rewards * scale + shift, 3), atol=1e-3)
    mask = torch.ones(6, 4, dtype=torch.float64)
    a, _ = algos.reinforce_pp_token_advantages(algos.last_token_rewards(rewards, mask), mask)
    b, _ = algos.reinforce_pp_token_advantages(algos.last_token_rewards(rewards * scale + shift, mask), mask)
    assert torch.allclose(a, b, atol=1e-4)


def test_reinforce_pp_sequence_level_by_hand():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, math.nan])
    plain = algos.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, 3)
    present = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0])  # mean 2.6
    assert plain[:5].tolist() == pytest.approx(((present - 2.6) / (present.std() + 1e-4)).tolist(), abs=1e-6)
    # baseline: group means 3 and 2 (NaN left out) -> centered −2, −1, 3, −2, 2, then whitened over the batch
    centered = torch.tensor([-2.0, -1.0, 3.0, -2.0, 2.0])
    baseline = algos.ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](rewards, 3)
    assert baseline[:5].tolist() == pytest.approx((centered / (centered.std() + 1e-4)).tolist(), abs=1e-6)
    assert plain[5] == 0 and baseline[5] == 0


@FAST
@given(st.lists(finite, min_size=6, max_size=6), st.lists(finite, min_size=2, max_size=2))
def test_reinforce_pp_baseline_ignores_per_prompt_offsets(values, shifts):
    rewards = torch.tensor(values).double()
    shifted = rewards + torch.tensor(shifts).double().repeat_interleave(3)
    fn = algos.ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"]
    assert torch.allclose(fn(rewards, 3), fn(shifted, 3), atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "cispo", "sapo"])
def test_every_policy_loss_is_the_policy_gradient_on_policy(name):
    """At π_old = π_θ each surrogate's gradient is −Â·∇log π (sapo: (4/τ)·σ'(0)·τ = 1)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], requires_grad=True)
    adv = torch.tensor([1.5, -0.7])
    loss, low, high = algos.POLICY_LOSSES[name](
        logp - logp.detach(),
        adv,
        logp,
        epsilon_low=0.2,
        epsilon_high=5.0,
        temperature_pos=1.0,
        temperature_neg=1.05,
    )
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv.unsqueeze(1).expand(2, 3))
    assert not low.any() and not high.any()


def test_cispo_caps_and_detaches_the_weight():
    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    log_w = torch.log(torch.tensor([[0.5, 2.0, 8.0]]))
    loss, low, high = algos.cispo_loss(log_w, torch.tensor([2.0]), logp, epsilon_high=5.0)
    assert loss.tolist()[0] == pytest.approx([1.0, 4.0, 10.0])  # −min(w, 5)·Â·log π
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.0, -4.0, -10.0])  # capped tokens keep a gradient
    assert high.tolist() == [[False, False, True]] and not low.any()
    _, _, negative = algos.cispo_loss(log_w, torch.tensor([-2.0]), logp, epsilon_high=5.0)
    assert not negative.any()


def test_sapo_gate_by_hand():
    log_w = torch.log(torch.tensor([[1.0, 1.5], [1.0, 0.5]]))
    adv = torch.tensor([2.0, -1.0])
    loss, _, _ = algos.sapo_loss(log_w, adv, temperature_pos=1.0, temperature_neg=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.tolist()[0] == pytest.approx([-4 * 0.5 * 2.0, -4 * sig(0.5) * 2.0])
    assert loss.tolist()[1] == pytest.approx([2 * 0.5, 2 * sig(-1.0)])  # τ = 2 where Â ≤ 0
