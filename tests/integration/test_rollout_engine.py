"""The in-process transformers engine: grouping, finish reasons, and log-probs equal to the trainer's."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer

from alphaalign.rl import algos
from alphaalign.rollout import transformers_engine
from alphaalign.rollout.base import SamplingParams
from alphaalign.rollout.transformers_engine import ReservedLayer, TransformersEngine, sample_from_logits


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path
    )


def prompts(tokenizer):
    texts = ["How do I bake bread?", "Explain how to pick a lock on my neighbour's door quickly and quietly."]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for t in texts
    ]


def test_groups_finish_reasons_and_lengths(tiny_policy):
    model, tok = load(tiny_policy)
    engine = TransformersEngine(model, tok, generation_batch_size=4)  # two generate calls of 1 prompt x 3
    torch.manual_seed(0)
    ids = prompts(tok)
    out = engine.generate(ids, n=3, sampling=SamplingParams(max_new_tokens=12, temperature=1.0))
    assert (
        len(out.completion_ids) == 6
        and out.prompt_ids[:3] == [ids[0]] * 3
        and out.prompt_ids[3:] == [ids[1]] * 3
    )
    for completion, logprobs, reason in zip(
        out.completion_ids, out.logprobs, out.finish_reasons, strict=True
    ):
        assert len(completion) == len(logprobs) <= 12
        if reason == "stop":
            assert completion[-1] == tok.eos_token_id and tok.eos_token_id not in completion[:-1]
        else:
            assert len(completion) == 12 and tok.eos_token_id not in completion
    assert all(lp <= 0 for row in out.logprobs for lp in row)


def test_logprobs_match_a_full_forward_with_temperature(tiny_policy):
    model, tok = load(tiny_policy)
    engine = TransformersEngine(model, tok)
    torch.manual_seed(1)
    ids = prompts(tok)
    out = engine.generate(ids, n=4, sampling=SamplingParams(max_new_tokens=16, temperature=0.7))
    for prompt, completion, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs, strict=True):
        full = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(full).logits[:, len(prompt) - 1 : -1]
        expected = algos.token_logprobs(logits, torch.tensor([completion]), 0.7)[0]
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)


def test_the_models_own_generation_defaults_do_not_change_the_samples(tiny_policy):
    model, tok = load(tiny_policy)
    model.generation_config.update(repetition_penalty=50.0, no_repeat_ngram_size=1)
    torch.manual_seed(2)
    out = TransformersEngine(model, tok).generate(
        prompts(tok), n=4, sampling=SamplingParams(max_new_tokens=16)
    )
    for prompt, completion, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1]
        expected = algos.token_logprobs(logits, torch.tensor([completion]))[0]
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)  # no penalty was applied


def test_top_k_one_is_greedy(tiny_policy):
    model, tok = load(tiny_policy)
    engine = TransformersEngine(model, tok)
    ids = prompts(tok)[:1]
    out = engine.generate(ids, n=3, sampling=SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1))
    assert out.completion_ids[0] == out.completion_ids[1] == out.completion_ids[2]
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor(ids),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(ids[0]) :].tolist()
    assert out.completion_ids[0] == greedy[: len(out.completion_ids[0])]


def test_version_stamp_and_training_mode_restored(tiny_policy):
    model, tok = load(tiny_policy)
    model.train()
    engine = TransformersEngine(model, tok)
    engine.update_weights(5)
    out = engine.generate(prompts(tok)[:1], n=2, sampling=SamplingParams(max_new_tokens=4))
    assert out.policy_version == 5 and model.training


def test_min_new_tokens_forces_full_length(tiny_policy):
    model, tok = load(tiny_policy)
    engine = TransformersEngine(model, tok)
    torch.manual_seed(0)
    free = engine.generate(prompts(tok), n=4, sampling=SamplingParams(max_new_tokens=48))
    assert "stop" in free.finish_reasons  # the warm-started policy ends its answers well before 48 tokens
    fixed = engine.generate(prompts(tok), n=4, sampling=SamplingParams(max_new_tokens=48, min_new_tokens=48))
    assert [len(c) for c in fixed.completion_ids] == [48] * 8 and set(fixed.finish_reasons) == {"length"}
    assert all(tok.eos_token_id not in c for c in fixed.completion_ids)


def test_inverse_transform_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 5)  # token 1 has probability 0 (logit -inf)
    torch.manual_seed(0)
    counts = torch.bincount(sample_from_logits(logits), minlength=5).float()
    assert counts[1] == 0
    # each frequency within 4.5 standard errors of its probability
    assert torch.all((counts / 20000 - probs).abs() <= 4.5 * (probs * (1 - probs) / 20000).sqrt() + 1e-9)


def test_a_reserved_cache_layer_holds_what_a_copying_one_does():
    torch.manual_seed(0)
    copying = DynamicLayer()
    copying.update(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
    reserved = ReservedLayer(copying, extra=3)
    copying_keys = copying.keys
    for length in (1, 2, 1):  # the third update runs past the room: the layer falls back to copying
        k, v = torch.randn(3, 2, length, 4), torch.randn(3, 2, length, 4)
        expected = copying.update(k, v)
        got = reserved.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        assert reserved.get_seq_length() == copying.get_seq_length()
    assert torch.equal(copying_keys, reserved.buffers[0][:, :, :5])  # the prompt part was copied in once


def test_generation_with_the_reserved_cache_samples_what_the_copying_cache_does(tiny_policy, monkeypatch):
    model, tok = load(tiny_policy)
    engine = TransformersEngine(model, tok)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0)
    rooms, reserve = [], transformers_engine.reserve
    monkeypatch.setattr(
        transformers_engine, "reserve", lambda cache, extra: rooms.append(extra) or reserve(cache, extra)
    )
    torch.manual_seed(3)
    reserved = engine.generate(prompts(tok), n=3, sampling=sampling)
    assert rooms == [10]
    monkeypatch.setattr(transformers_engine, "reserve", lambda cache, extra: cache)
    torch.manual_seed(3)
    copying = engine.generate(prompts(tok), n=3, sampling=sampling)
    assert reserved.completion_ids == copying.completion_ids
    assert torch.allclose(torch.tensor(reserved.logprobs), torch.tensor(copying.logprobs), atol=1e-6)


def test_static_cache_pads_prompts_to_powers_of_two():
    widths = [transformers_engine.static_width(w) for w in (1, 31, 64, 65, 100, 129, 1000, 1025)]
    assert widths == [64, 64, 64, 128, 128, 256, 1024, 2048]


def test_generation_with_a_static_cache_samples_what_the_shared_prompt_cache_does(tiny_policy, monkeypatch):
    model, tok = load(tiny_policy)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0)
    calls, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    torch.manual_seed(4)
    static = TransformersEngine(model, tok, static_cache=True).generate(prompts(tok), n=3, sampling=sampling)
    (call,) = calls
    assert call["generation_config"].cache_implementation == "static" and call["past_key_values"] is None
    assert call["input_ids"].shape[1] == 64 > max(map(len, prompts(tok)))  # left-padded to the bucket
    torch.manual_seed(4)
    shared = TransformersEngine(model, tok).generate(prompts(tok), n=3, sampling=sampling)
    assert calls[1]["past_key_values"] is not None
    assert static.completion_ids == shared.completion_ids and static.prompt_ids == shared.prompt_ids
    for a, b in zip(static.logprobs, shared.logprobs, strict=True):  # rows end at their EOS
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_the_recipe_key_turns_the_static_cache_on(write_recipe, tiny_policy, tmp_path):
    import contextlib

    from alphaalign.config import load_recipe
    from alphaalign.rollout import make_engine

    model, tok = load(tiny_policy)
    path = write_recipe({"model": {"name_or_path": str(tiny_policy)}})
    for overrides, expected in (([], False), (["rollout.static_cache=true"], True)):
        recipe = load_recipe(path, overrides)
        with contextlib.ExitStack() as resources:
            assert make_engine(recipe, model, tok, tmp_path, resources).static_cache is expected
