"""Numerical parity with trl 1.16's GRPOTrainer on identical inputs.

TRL's own code is executed wherever possible: `GRPOTrainer._compute_loss` (losses, gradients, clip metrics),
`GRPOTrainer._generate_and_score_completions` (rewards → advantages) and `trl.trainer.utils`
(`selective_log_softmax`, `nanstd`). Ours is computed from the same tokens with the trainer's update
(`alphaalign.rl.batching`, `alphaalign.rl.update`) and `alphaalign.rl.algos`.

TRL patches its policy's `forward` with a fused LM head that divides by the temperature (`add_fused_lm_head`),
so TRL and we each get our own deep copy of the same weights (checked in `test_fused_head_leaves_our_copy_alone`).
"""

import copy  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from alphaalign.config import Recipe  # noqa: E402
from alphaalign.demo.build import random_qwen2, train_tokenizer  # noqa: E402
from alphaalign.rl import algos  # noqa: E402
from alphaalign.rl.batching import completion_logits, micro_batches  # noqa: E402
from alphaalign.rl.update import BatchCounts, micro_batch_loss, resolved_algorithm  # noqa: E402
from alphaalign.rollout.base import Rollouts  # noqa: E402

LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5
GRAD_RTOL = 1e-4  # relative to the largest gradient entry of the parameter
TEMPERATURE = 0.7
MAX_COMPLETION = 8
G = 3  # num_generations
PROMPT_LENGTHS = [5, 5, 5, 3, 3, 3]  # two groups with different prompt lengths -> left padding
COMPLETION_LENGTHS = [8, 5, 7, 4, 8, 6]  # right padding; two completions reach MAX_COMPLETION
B = len(PROMPT_LENGTHS)
ADVANTAGES = [1.3, -0.7, 0.4, -1.1, 0.9, -0.8]
# log π_old = log π_θ + offset_i + noise: per-sequence offsets push some ratios outside [1-ε_low, 1+ε_high]
# in both directions, for token- and sequence-level importance weights alike.
OLD_OFFSETS = [-0.45, 0.40, 0.05, -0.40, 0.35, -0.05]


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tok():
    text = "the quick brown fox jumps over the lazy dog; a refusal is safe, a compliance is helpful."
    return train_tokenizer([text] * 50, vocab_size=300)


@pytest.fixture(scope="module")
def base_model(tok):
    model = random_qwen2(tok, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=0).float()
    model.train()
    return model


@pytest.fixture(scope="module")
def model_dir(tok, base_model, tmp_path_factory):
    """TRL builds its reference model (beta > 0) from `config._name_or_path`: give it a local directory."""
    path = tmp_path_factory.mktemp("tiny_policy")
    base_model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(tok, base_model):
    """Token ids, π_old / π_ref log-probs and advantages shared by TRL and us."""
    gen = torch.Generator().manual_seed(0)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]

    def draw(n):
        return [vocab[int(j)] for j in torch.randint(len(vocab), (n,), generator=gen)]

    group_prompts = [draw(PROMPT_LENGTHS[g * G]) for g in range(B // G)]
    prompts = [group_prompts[i // G] for i in range(B)]
    completions = [draw(n) for n in COMPLETION_LENGTHS]
    P, C = max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    prompt_ids = torch.full((B, P), tok.pad_token_id)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    completion_ids = torch.full((B, C), tok.pad_token_id)
    completion_mask = torch.zeros((B, C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = torch.tensor(p), 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1

    # Current log-probs, computed independently of both implementations (plain forward, explicit positions).
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = base_model(
            input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)
        ).logits
    logits = logits[:, P - 1 : -1].double() / TEMPERATURE
    current = (logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)).float()
    mask = completion_mask.float()
    old = (current + torch.tensor(OLD_OFFSETS).unsqueeze(1) + 0.25 * torch.randn(B, C, generator=gen)) * mask
    ref = (current + 0.3 * torch.randn(B, C, generator=gen)) * mask
    return {
        "prompts": prompts,
        "completions": completions,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "current": current * mask,
        "old": old,
        "ref": ref,
        "advantages": torch.tensor(ADVANTAGES),
        "mask": mask,
    }


# ---------------------------------------------------------------------------------------------------------
# Helpers


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def make_trainer(model, tok, tmp_path, model_dir, *, n_rows=B, reward_funcs=(zero_reward,), **overrides):
    model.config._name_or_path = str(model_dir)
    args = dict(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        report_to="none",
        bf16=False,
        fp16=False,
        per_device_train_batch_size=n_rows,
        num_generations=G,
        gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_dropout=True,
        # TRL 1.16 defaults to True (KL term × the importance ratio); the parametrised cases compare the plain
        # k3 term (alphaalign's kl_bias_correction: false). test_kl_parity_with_trl_default_bias_correction
        # compares both defaults.
        use_bias_correction_kl=False,
    )
    args.update(overrides)
    dataset = datasets.Dataset.from_dict(
        {"prompt": ["the quick brown fox"] * n_rows, "idx": list(range(n_rows))}
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=list(reward_funcs),
        args=GRPOConfig(**args),
        train_dataset=dataset,
        processing_class=tok,
    )
    trainer.model.train()
    # Set by `Trainer`'s training loop to the number of micro-batches in the optimizer step.
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    # One generation batch per optimizer step, one process: TRL's normalizers then span the whole batch.
    assert trainer.args.steps_per_generation == trainer.args.gradient_accumulation_steps
    assert trainer.accelerator.num_processes == 1
    return trainer


def make_recipe(loss_type, beta, epsilon_high, level, bias_correction=False, **algorithm):
    return Recipe.model_validate(
        {
            "model": {"name_or_path": "x"},
            "data": {"train": [{"path": "x.jsonl"}]},
            "rewards": [{"name": "alphaalign_safety"}],
            "algorithm": {
                "loss_type": loss_type,
                "beta": beta,
                "kl_estimator": "k3",
                "epsilon": 0.2,
                "epsilon_high": epsilon_high,
                "importance_sampling_level": level,
                "kl_bias_correction": bias_correction,
                **algorithm,
            },
            "rollout": {"num_generations": G, "max_new_tokens": MAX_COMPLETION, "temperature": TEMPERATURE},
        }
    )


def trl_inputs(batch, rows, beta):
    inputs = {
        key: batch[key][rows] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    }
    inputs["advantages"] = batch["advantages"][rows]
    # TRL counts the loss tokens of the whole generation batch (all micro-batches, all processes)
    inputs["num_items_in_batch"] = batch["completion_mask"].sum()
    inputs["old_per_token_logps"] = batch["old"][rows]
    if beta > 0:
        inputs["ref_per_token_logps"] = batch["ref"][rows]
    return inputs


def rollouts(batch):
    return Rollouts(
        prompt_ids=batch["prompts"],
        completion_ids=batch["completions"],
        logprobs=[[0.0] * len(c) for c in batch["completions"]],
        finish_reasons=["stop"] * B,
        policy_version=0,
    )


def loss_settings(recipe):
    """`micro_batch_loss`'s algorithm config, temperature and dr_grpo length, from a recipe."""
    return resolved_algorithm(recipe), recipe.rollout.temperature, recipe.rollout.max_new_tokens


def our_losses(model, tok, batch, recipe, budget):
    """Micro-batch losses (each backpropagated into `model`) and the clip masks of each micro-batch."""
    mbs = micro_batches(rollouts(batch), budget, [True] * B, tok.pad_token_id, "cpu")
    counts = BatchCounts(B, float(batch["mask"].sum()), len(mbs))
    losses, clips = [], []
    for mb in mbs:
        C = mb.completion_ids.shape[1]
        ref = batch["ref"][mb.rows, :C] if recipe.algorithm.beta > 0 else None
        loss, stats = micro_batch_loss(
            model,
            mb,
            batch["advantages"][mb.rows],
            batch["old"][mb.rows, :C],
            ref,
            *loss_settings(recipe),
            counts,
        )
        loss.backward()
        losses.append(loss.detach())
        clips.append((mb, stats["clip_low"], stats["clip_high"]))
    return mbs, losses, clips


def grad_diff(trl_model, our_model) -> float:
    """Largest |g_trl − g_ours| over all parameters; asserts every parameter is within tolerance."""
    ours = dict(our_model.named_parameters())
    worst = 0.0
    for name, p in trl_model.named_parameters():
        q = ours[name]
        assert p.grad is not None and q.grad is not None, name
        diff = float((p.grad - q.grad).abs().max())
        scale = float(p.grad.abs().max())
        assert diff <= GRAD_ATOL or diff <= GRAD_RTOL * scale, (
            f"{name}: max |Δgrad| {diff:.3g} (max |g| {scale:.3g})"
        )
        worst = max(worst, diff)
    assert any(float(p.grad.abs().max()) > 1e-4 for p in trl_model.parameters())  # not vacuous
    return worst


# ---------------------------------------------------------------------------------------------------------
# 1. Losses and gradients


def test_fused_head_leaves_our_copy_alone(tok, base_model, batch, model_dir, tmp_path):
    """TRL rebinds its policy's `forward` (fused LM head, temperature inside); a deep copy made before is untouched."""
    trl_model, ours = copy.deepcopy(base_model), copy.deepcopy(base_model)
    trainer = make_trainer(trl_model, tok, tmp_path, model_dir, loss_type="dapo")
    assert "forward" in trainer.model.__dict__ and "forward" not in ours.__dict__
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        plain = ours(input_ids=ids, attention_mask=attn).logits
        unfused = trainer.model(input_ids=ids, attention_mask=attn).logits  # non-fused path: the original
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attn, ids.shape[1] - batch["prompt_ids"].shape[1]
        )
    assert torch.equal(plain, unfused)
    # The fused head's log-probs are log_softmax(logits / T) of the copy's forward, zero on padding. TRL passes no
    # position_ids (0..L−1 over the left padding) where we count from the first real token: RoPE is relative, so
    # the two agree to float precision.
    assert float((logps - batch["current"]).abs().max()) < 1e-5
    assert torch.all(logps[batch["mask"] == 0] == 0)


CASES = [
    (loss_type, beta, 0.28, level)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    for beta in (0.0, 0.04)
    for level in ("token", "sequence")
] + [(loss_type, 0.04, None, "token") for loss_type in ("grpo", "dapo")]  # epsilon_high unset: ε_high = ε


@pytest.mark.parametrize(("loss_type", "beta", "epsilon_high", "level"), CASES)
def test_loss_and_gradient_parity(
    tok, base_model, batch, model_dir, tmp_path, loss_type, beta, epsilon_high, level
):
    trl_model, ours = copy.deepcopy(base_model), copy.deepcopy(base_model)
    # TRL 1.16 accepts sequence-level weights with every loss type here (it only warns for bnpo/dr_grpo/dapo).
    trainer = make_trainer(
        trl_model,
        tok,
        tmp_path,
        model_dir,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        importance_sampling_level=level,
    )
    assert trainer.epsilon_high == (epsilon_high or 0.2) and trainer.temperature == TEMPERATURE
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs(batch, slice(None), beta))
    trl_loss.backward()

    recipe = make_recipe(loss_type, beta, epsilon_high, level)
    mbs, losses, clips = our_losses(ours, tok, batch, recipe, budget=10**6)
    assert len(mbs) == 1 and mbs[0].rows == list(range(B))
    loss_diff = abs(float(trl_loss.detach()) - float(losses[0]))
    assert loss_diff <= LOSS_ATOL, (float(trl_loss.detach()), float(losses[0]))
    gdiff = grad_diff(trainer.model, ours)

    # Clipping is active (so the clipped branch is exercised) and our clip masks match TRL's metrics.
    mb, low, high = clips[0]
    mask = mb.mask.bool()
    n_low, n_high = int((low.expand_as(mask) & mask).sum()), int((high.expand_as(mask) & mask).sum())
    assert n_low > 0 and n_high > 0, (n_low, n_high)
    metrics = trainer._metrics["train"]
    if level == "token":
        n = float(mask.sum())
        assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(n_low / n, abs=1e-6)
        assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(n_high / n, abs=1e-6)
    else:  # TRL reports sequence-level clip fractions per sequence
        assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(float(low[:, 0].float().mean()), abs=1e-6)
        assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(
            float(high[:, 0].float().mean()), abs=1e-6
        )
    print(
        f"\n[parity] {loss_type:8s} beta={beta:<5} eps_high={epsilon_high} {level:8s} "
        f"|Δloss|={loss_diff:.2e} max|Δgrad|={gdiff:.2e} clipped low/high={n_low}/{n_high}"
    )


SOFT_CASES = [
    (loss_type, beta, level)
    for loss_type in ("cispo", "sapo")
    for beta in (0.0, 0.04)
    for level in ("token", "sequence")
]
CISPO_CAP = 1.3  # low enough that the fixture's ratios exceed it (ScaleRL's 5.0 caps nothing here)
SAPO_TEMPERATURES = {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.3}  # not trl's defaults


@pytest.mark.parametrize(("loss_type", "beta", "level"), SOFT_CASES)
def test_cispo_and_sapo_parity(tok, base_model, batch, model_dir, tmp_path, loss_type, beta, level):
    """trl's `cispo` (capped, detached weight × log π, global token mean) and `sapo` (sigmoid gate, sequence
    mean): same loss, gradients and, for cispo, the capped-token fraction."""
    trl_model, ours = copy.deepcopy(base_model), copy.deepcopy(base_model)
    extra = SAPO_TEMPERATURES if loss_type == "sapo" else {}
    epsilon_high = CISPO_CAP if loss_type == "cispo" else 0.28
    trainer = make_trainer(
        trl_model,
        tok,
        tmp_path,
        model_dir,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        importance_sampling_level=level,
        **extra,
    )
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs(batch, slice(None), beta))
    trl_loss.backward()

    recipe = make_recipe(loss_type, beta, epsilon_high, level, **extra)
    mbs, losses, clips = our_losses(ours, tok, batch, recipe, budget=10**6)
    assert len(mbs) == 1
    loss_diff = abs(float(trl_loss.detach()) - float(losses[0]))
    assert loss_diff <= LOSS_ATOL, (float(trl_loss.detach()), float(losses[0]))
    gdiff = grad_diff(trainer.model, ours)
    mb, low, high = clips[0]
    mask = mb.mask.bool()
    n_high = int((high.expand_as(mask) & mask).sum())
    assert not (low.expand_as(mask) & mask).any()
    if loss_type == "cispo":
        assert n_high > 0  # the cap is exercised
        fraction = n_high / float(mask.sum()) if level == "token" else float(high[:, 0].float().mean())
        assert trainer._metrics["train"]["cispo_clip_ratio"][-1] == pytest.approx(fraction, abs=1e-6)
    else:
        assert n_high == 0  # sapo clips nothing
    print(
        f"\n[parity] {loss_type:6s} beta={beta:<5} {level:8s} |Δloss|={loss_diff:.2e} "
        f"max|Δgrad|={gdiff:.2e} capped={n_high}"
    )


def test_sapo_temperatures_matter(tok, base_model, batch):
    """The gate's temperatures reach the loss (a recipe that ignored them would still pass parity at defaults)."""
    losses = []
    for extra in ({}, SAPO_TEMPERATURES):
        _, (loss,), _ = our_losses(
            copy.deepcopy(base_model),
            tok,
            batch,
            make_recipe("sapo", 0.0, None, "token", **extra),
            budget=10**6,
        )
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_on_policy_parity(tok, base_model, batch, model_dir, tmp_path, loss_type):
    """No π_old (one update per batch): both use π_old = stopgrad(π_θ), ratio 1, gradient intact."""
    trl_model, ours = copy.deepcopy(base_model), copy.deepcopy(base_model)
    trainer = make_trainer(
        trl_model, tok, tmp_path, model_dir, loss_type=loss_type, beta=0.04, epsilon_high=0.28
    )
    inputs = trl_inputs(batch, slice(None), 0.04)
    del inputs["old_per_token_logps"]
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    recipe = make_recipe(loss_type, 0.04, 0.28, "token")
    mbs = micro_batches(rollouts(batch), 10**6, [True] * B, tok.pad_token_id, "cpu")
    counts = BatchCounts(B, float(batch["mask"].sum()), 1)
    loss, _ = micro_batch_loss(
        ours, mbs[0], batch["advantages"], None, batch["ref"], *loss_settings(recipe), counts
    )
    loss.backward()
    assert abs(float(trl_loss.detach()) - float(loss.detach())) <= LOSS_ATOL
    print(
        f"\n[parity] on-policy {loss_type}: |Δloss|={abs(float(trl_loss.detach()) - float(loss.detach())):.2e} "
        f"max|Δgrad|={grad_diff(trainer.model, ours):.2e}"
    )


def test_kl_parity_with_trl_default_bias_correction(tok, base_model, batch, model_dir, tmp_path):
    """Both defaults (KL × importance ratio) agree; on-policy the ratio is 1 but carries a gradient."""
    trl_model, ours = copy.deepcopy(base_model), copy.deepcopy(base_model)
    trainer = make_trainer(
        trl_model, tok, tmp_path, model_dir, loss_type="dapo", beta=0.04, use_bias_correction_kl=True
    )
    inputs = trl_inputs(batch, slice(None), 0.04)
    del inputs["old_per_token_logps"]
    trainer._compute_loss(trainer.model, inputs).backward()
    recipe = make_recipe("dapo", 0.04, None, "token", bias_correction=True)
    assert Recipe.model_fields["algorithm"].default.kl_bias_correction  # the default matches TRL's
    mbs = micro_batches(rollouts(batch), 10**6, [True] * B, tok.pad_token_id, "cpu")
    counts = BatchCounts(B, float(batch["mask"].sum()), 1)
    micro_batch_loss(ours, mbs[0], batch["advantages"], None, batch["ref"], *loss_settings(recipe), counts)[
        0
    ].backward()
    grad_diff(trainer.model, ours)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_match_trl_gradient_accumulation(
    tok, base_model, batch, model_dir, tmp_path, loss_type
):
    """Several micro-batches (totals over the whole batch) sum to the one-batch loss for grpo/dr_grpo/dapo;
    bnpo is a token mean per micro-batch averaged over micro-batches, as TRL does under gradient accumulation.

    TRL is run on the same row groups with `current_gradient_accumulation_steps = steps_per_generation = n`,
    which is what its training loop does with n accumulation steps per generation batch.
    """
    beta = 0.04
    recipe = make_recipe(loss_type, beta, 0.28, "token")
    whole_model, split_model, trl_model = (copy.deepcopy(base_model) for _ in range(3))
    _, (whole,), _ = our_losses(whole_model, tok, batch, recipe, budget=10**6)

    longest = max(p + c for p, c in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True))
    mbs, losses, _ = our_losses(split_model, tok, batch, recipe, budget=2 * longest)
    assert [mb.rows for mb in mbs] == [[0, 1], [2, 3], [4, 5]]
    split = sum(float(x) for x in losses)

    trainer = make_trainer(
        trl_model,
        tok,
        tmp_path,
        model_dir,
        n_rows=2,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        gradient_accumulation_steps=3,
    )
    assert trainer.current_gradient_accumulation_steps == trainer.args.steps_per_generation == 3
    trl_total = 0.0
    for mb in mbs:
        loss = trainer._compute_loss(trainer.model, trl_inputs(batch, mb.rows, beta))
        loss.backward()
        trl_total += float(loss.detach())
    assert abs(split - trl_total) <= LOSS_ATOL, (split, trl_total)
    gdiff = grad_diff(trainer.model, split_model)
    print(
        f"\n[parity] 3 micro-batches {loss_type}: |Δloss| vs TRL GA={abs(split - trl_total):.2e} "
        f"max|Δgrad|={gdiff:.2e}; |split − whole|={abs(split - float(whole)):.2e}"
    )

    if loss_type == "bnpo":
        # Independent check: mean over micro-batches of each micro-batch's masked token mean.
        per_token = per_token_loss_by_hand(batch, recipe)
        means = [
            float((per_token[mb.rows] * batch["mask"][mb.rows]).sum() / batch["mask"][mb.rows].sum())
            for mb in mbs
        ]
        assert split == pytest.approx(sum(means) / len(means), abs=LOSS_ATOL)
        assert abs(split - float(whole)) > 1e-4  # differs from the whole-batch token mean here
    else:
        assert abs(split - float(whole)) <= LOSS_ATOL, (split, float(whole))
        grad_diff(whole_model, split_model)


def per_token_loss_by_hand(batch, recipe):
    """Clipped surrogate + β·k3 written out from the formulas, on the reference log-probs of the fixture."""
    ac = recipe.algorithm
    logp, old, ref = batch["current"].double(), batch["old"].double(), batch["ref"].double()
    ratio = torch.exp(logp - old)
    adv = batch["advantages"].double().unsqueeze(1)
    eps_high = ac.epsilon_high if ac.epsilon_high is not None else ac.epsilon
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - ac.epsilon, 1 + eps_high) * adv)
    return (surrogate + ac.beta * (torch.exp(ref - logp) - (ref - logp) - 1)).float()


def test_shared_prompt_forward_matches_whole_sequences(tok, base_model, batch):
    """Rows that share a prompt reuse one prompt forward (and its backward): same logits and gradients as
    running every row's whole sequence; a single-token prompt turns sharing off."""
    results = []
    for share in (True, False):
        mb = micro_batches(rollouts(batch), 10**6, [True] * B, tok.pad_token_id, "cpu", share)[0]
        if share:
            assert mb.prompt_firsts.tolist() == [0, 3] and mb.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
        else:
            assert mb.prompt_index is None
        model = copy.deepcopy(base_model)
        logits = completion_logits(model, mb)
        (logits.log_softmax(-1) * mb.mask.unsqueeze(-1)).sum().backward()
        results.append((logits.detach(), model))
    (shared, shared_model), (whole, whole_model) = results
    assert shared.shape == whole.shape == (B, max(COMPLETION_LENGTHS), len(tok))
    assert torch.allclose(shared, whole, atol=1e-5)
    grad_diff(whole_model, shared_model)

    one_token = Rollouts([[7], [7], [7, 8], [7, 8]], [[9, 10]] * 4, [[0.0, 0.0]] * 4, ["stop"] * 4, 0)
    assert micro_batches(one_token, 10**6, [True] * 4, tok.pad_token_id, "cpu")[0].prompt_index is None


# ---------------------------------------------------------------------------------------------------------
# 2. Advantages: TRL's `_generate_and_score_completions` with pre-drawn rewards

N_ADV = 12  # 4 groups of G = 3
NAN = None
REWARDS_A = [1.0, 0.0, 2.5, 0.5, NAN, 1.5, 3.0, 3.0, 3.0, -1.0, 0.25, 2.0]
REWARDS_B = [0.2, NAN, -0.4, 1.0, NAN, 0.3, 0.5, 0.5, 0.5, NAN, NAN, NAN]
WEIGHTS = [0.7, 1.8]
# row 4: both None (unscorable); group 3: reward B missing throughout; group 2: constant rewards


def reward_a(completions, idx, **kwargs):
    return [REWARDS_A[i] for i in idx]


def reward_b(completions, idx, **kwargs):
    return [REWARDS_B[i] for i in idx]


def our_advantages(scale, aggregation):
    per_term = torch.tensor(
        [[math.nan if v is None else v for v in row] for row in zip(REWARDS_A, REWARDS_B, strict=True)]
    )
    from alphaalign.config import AlgorithmConfig

    algorithm = AlgorithmConfig(scale_rewards=scale, reward_aggregation=aggregation)
    return algos.advantages(per_term, torch.tensor(WEIGHTS), G, algorithm)[1]  # the trainer's one call


@pytest.mark.parametrize(
    ("scale", "aggregation"),
    [
        ("group", "sum_then_normalize"),
        ("batch", "sum_then_normalize"),
        ("none", "sum_then_normalize"),
        ("group", "normalize_then_sum"),
    ],
)
def test_advantage_parity(tok, base_model, model_dir, tmp_path, scale, aggregation):
    trainer = make_trainer(
        copy.deepcopy(base_model),
        tok,
        tmp_path,
        model_dir,
        n_rows=N_ADV,
        reward_funcs=(reward_a, reward_b),
        reward_weights=WEIGHTS,
        scale_rewards=scale,
        multi_objective_aggregation=aggregation,
        max_completion_length=3,
        loss_type="dapo",
    )
    inputs = [{"prompt": f"the quick brown fox {i // G}", "idx": i} for i in range(N_ADV)]  # groups of G rows
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(inputs)
    theirs = out["advantages"]
    ours = our_advantages(scale, aggregation)
    assert theirs.shape == ours.shape == (N_ADV,)
    diff = float((theirs - ours).abs().max())
    print(f"\n[advantages] {aggregation} scale={scale}: max|Δ|={diff:.2e}")
    assert diff <= 1e-5, (theirs, ours)
    assert ours[4] == 0 and theirs[4] == 0  # the unscorable row
    assert ours.abs().max() > 0.1  # not vacuous
    if aggregation == "sum_then_normalize" and scale != "batch":
        assert torch.all(ours[6:9] == 0)  # constant group: no signal


# ---------------------------------------------------------------------------------------------------------
# 3. Log-probs and nanstd


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_logprobs_match_selective_log_softmax(temperature, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(3, 7, 257, generator=gen)).to(dtype)
    targets = torch.randint(257, (3, 7), generator=gen)
    ours = algos.token_logprobs(logits, targets, temperature)
    theirs = selective_log_softmax(logits, targets, temperature=temperature)
    assert float((ours.double() - theirs.double()).abs().max()) <= 1e-5
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_nanstd_matches_trl(dim):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, generator=gen) * 3 + 1
    x[0, 1] = x[2, 2] = x[3, 0] = math.nan
    x[1, :3] = math.nan  # a row with one value left
    x[:, 3] = math.nan
    x[4, 3] = 2.0  # a column with one value left
    ours, theirs = algos.nanstd(x, dim=dim), trl_nanstd(x, dim=dim)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6, equal_nan=True)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    for keepdim_dim in (0, 1):
        assert torch.allclose(
            algos.nanstd(x, dim=keepdim_dim, keepdim=True),
            trl_nanstd(x, dim=keepdim_dim, keepdim=True),
            atol=1e-6,
            equal_nan=True,
        )
