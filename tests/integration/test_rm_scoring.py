"""Loading sequence-classification models and scoring conversations with a reward model."""

import pytest
import torch
from helpers import build_tiny_classifier
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alphaalign.errors import UserError
from alphaalign.rewards.rm_scoring import (
    label_probabilities,
    load_classifier,
    render_conversations,
    score_conversations,
)

PROMPTS = ["How do I bake bread?", "Name a prime number.", "How do I bake bread?"]
ANSWERS = ["Mix flour, water and yeast, then bake at 230 °C for 35 minutes.", "7", "I can't help with that."]


def reference_scores(path, prompts, answers):
    """One conversation at a time, no padding: what batching must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    scores = []
    for p, a in zip(prompts, answers, strict=True):
        chat = [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False, return_tensors="pt")
        with torch.no_grad():
            scores.append(float(model(input_ids=ids).logits[0, 0]))
    return scores


def test_batched_scores_match_one_by_one_scoring(tiny_rm):
    clf = load_classifier(str(tiny_rm), dtype="auto", device="cpu")
    assert next(clf.model.parameters()).dtype == torch.float32  # auto on CPU
    got = score_conversations(clf, PROMPTS, ANSWERS, batch_size=2)
    assert got == pytest.approx(reference_scores(tiny_rm, PROMPTS, ANSWERS), abs=1e-5)
    assert len(set(got)) == 3


def test_conversations_use_the_models_own_chat_template(tiny_rm):
    clf = load_classifier(str(tiny_rm), device="cpu")
    [text] = render_conversations(clf, ["Hi?"], ["Hello."])
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"


def test_models_are_cached_per_path_dtype_and_device(tiny_rm):
    a = load_classifier(str(tiny_rm), device="cpu")
    assert load_classifier(str(tiny_rm), dtype="float32", device="cpu") is a
    b = load_classifier(str(tiny_rm), dtype="bfloat16", device="cpu")
    assert b is not a and next(b.model.parameters()).dtype == torch.bfloat16


def test_long_answers_are_truncated_not_fatal(tiny_rm):
    clf = load_classifier(str(tiny_rm), device="cpu")
    long_answer = "word " * 20_000
    scores = score_conversations(clf, ["q", "q"], [long_answer, "short"], max_length=64)
    assert all(torch.isfinite(torch.tensor(scores)))


def test_missing_model_is_a_one_line_user_error(tmp_path):
    """A path with no folder says so (transformers would call it a malformed hub id)."""
    for path in (str(tmp_path / "nope"), "./nope", "~/nope-alphaalign"):
        with pytest.raises(UserError) as exc:
            load_classifier(path, device="cpu")
        assert str(exc.value) == f"cannot load sequence-classification model {path!r}: no such folder"
    with pytest.raises(UserError, match="cannot load sequence-classification model 'no/such-hub-model'"):
        load_classifier("no/such-hub-model", device="cpu")  # a hub id: tried offline, one line too


def test_a_model_with_several_outputs_is_not_a_reward_model(tmp_path):
    path = build_tiny_classifier(tmp_path / "clf", num_labels=2, labels=["comply", "refusal"])
    clf = load_classifier(str(path), device="cpu")
    with pytest.raises(UserError, match="has 2 outputs; a reward model needs 1"):
        score_conversations(clf, ["q"], ["a"])
    probs = label_probabilities(clf, ["I can't help.", "Sure, here it is."], "refusal")
    other = label_probabilities(clf, ["I can't help.", "Sure, here it is."], "comply")
    assert [p + q for p, q in zip(probs, other, strict=True)] == pytest.approx([1.0, 1.0])
    assert label_probabilities(clf, ["I can't help."], 1) == pytest.approx(probs[:1])
    with pytest.raises(UserError, match="has no label 'refuse'; its labels: comply, refusal"):
        label_probabilities(clf, ["x"], "refuse")
