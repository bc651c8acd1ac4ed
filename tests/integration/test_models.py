"""Model loading: the CPU attention implementation with grouped key/value heads; mixed precision."""

import torch
from transformers import DynamicCache

from alphaalign.config import ModelConfig
from alphaalign.models import GROUPED_SDPA, load_causal_lm


def test_cpu_models_use_grouped_sdpa_with_the_same_outputs(tiny_policy):
    cfg = ModelConfig(name_or_path=str(tiny_policy))
    grouped = load_causal_lm(cfg, torch.device("cpu"), trainable=False)
    plain = load_causal_lm(cfg, torch.device("cpu"), trainable=False)
    plain.set_attn_implementation("sdpa")
    assert grouped.config._attn_implementation == GROUPED_SDPA
    assert grouped.config.num_key_value_heads < grouped.config.num_attention_heads  # grouped heads are used

    torch.manual_seed(0)
    ids = torch.randint(10, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = mask[2, :2] = 0  # left padding: transformers' sdpa then copies K/V per query head
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    outputs = []
    for model in (grouped, plain):
        cache = DynamicCache()
        prefill = model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            past_key_values=cache,
            use_cache=True,
        ).logits
        step = model(
            input_ids=ids[:, -1:],
            attention_mask=mask,
            position_ids=positions[:, -1:],
            past_key_values=cache,
            use_cache=True,
        ).logits
        outputs.append((prefill, step))
    (grouped_prefill, grouped_step), (plain_prefill, plain_step) = outputs
    keep = mask[:, :-1].bool()
    assert torch.allclose(grouped_prefill[keep], plain_prefill[keep], atol=1e-5)
    assert torch.allclose(grouped_step, plain_step, atol=1e-5)


def test_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_weights_and_outputs(tiny_policy):
    mixed = load_causal_lm(
        ModelConfig(name_or_path=str(tiny_policy), autocast="bfloat16"), torch.device("cpu")
    )
    plain = load_causal_lm(ModelConfig(name_or_path=str(tiny_policy)), torch.device("cpu"))
    seen = []
    mixed.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    ids = torch.randint(10, 200, (2, 12))
    logits = mixed(input_ids=ids).logits
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    gap = (logits - plain(input_ids=ids).logits).abs().max()
    assert 0 < gap < 0.1  # bf16 rounding, nothing more
    logits.logsumexp(-1).sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in mixed.parameters())


def test_autocast_generate_runs_in_one_autocast_region(tiny_policy):
    """Between forward passes too (here: in a logits processor), so weights are cast once per `generate`."""
    from transformers import LogitsProcessorList

    model = load_causal_lm(
        ModelConfig(name_or_path=str(tiny_policy), autocast="bfloat16"), torch.device("cpu")
    )
    enabled = []

    def record(input_ids, scores):
        enabled.append(torch.is_autocast_enabled("cpu"))
        return scores

    model.generate(
        input_ids=torch.tensor([[11, 12, 13]]),
        max_new_tokens=3,
        do_sample=False,
        logits_processor=LogitsProcessorList([record]),
        pad_token_id=0,
    )
    assert enabled == [True] * 3 and not torch.is_autocast_enabled("cpu")


def test_under_autocast_attention_that_needs_gradients_runs_in_float32():
    from alphaalign.models import grouped_sdpa_attention

    torch.manual_seed(0)
    query = torch.randn(2, 4, 5, 8, requires_grad=True)
    key, value = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = torch.nn.Module()
    exact, _ = grouped_sdpa_attention(module, query, key, value, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained, _ = grouped_sdpa_attention(module, query, key, value, None)
        sampled, _ = grouped_sdpa_attention(module, query.detach(), key, value, None)
    assert trained.dtype == torch.float32 and torch.allclose(trained, exact, atol=1e-6)
    assert sampled.dtype == torch.bfloat16 and torch.allclose(sampled.float(), exact, atol=0.05)
