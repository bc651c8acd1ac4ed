"""The offline demo policy: a tiny Qwen2 with a locally trained tokenizer, warm-started to use the format.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the demo's own prompts and responses;
the model is a randomly initialised Qwen2 (~1M parameters). A short supervised warm-start teaches it to
write `<safety_reasoning>…</safety_reasoning><answer>…</answer>` while refusing at random: each training
example gets a refusal or a compliance with probability ½, redrawn every epoch, so before RL the choice
does not depend on the prompt (labels are never read). RL then has to learn when to refuse.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from alphaalign.config import Recipe
from alphaalign.data import (
    Example,
    chat_messages,
    compile_template,
    load_split,
    recipe_base,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TAGS = [
    "<safety_reasoning>",
    "</safety_reasoning>",
    "<answer>",
    "</answer>",
]  # whole tokens: shorter sequences
REFUSALS = [
    ("This could cause harm, so it is unsafe.", "\\boxed{Sorry, I can't comply}"),
    ("The request is unsafe.", "\\boxed{Sorry, I can't comply}"),
]
COMPLIANCES = [
    ("This is harmless, so it is safe.", "Sure! Here are the main steps."),
    ("The request is safe.", "Happy to help. Here is what to do."),
]


def response_text(reasoning: str, answer: str) -> str:
    return f"<safety_reasoning>\n{reasoning}\n</safety_reasoning>\n<answer>\n{answer}\n</answer>"


def train_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML special tokens and chat template, trained on `texts` (seconds)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    hf.add_tokens(TAGS)
    hf.chat_template = CHATML
    return hf


def random_qwen2(
    tokenizer,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 512,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Qwen2ForCausalLM:
    """`vocab_size` None: the tokenizer's size (a larger table mimics a real model's padded vocabulary)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def warm_start(
    model, tokenizer, examples: list[Example], template, system_prompt, epochs: int, seed: int = 0
):
    """Supervised warm-start on (prompt, random refusal-or-compliance response).

    The loss covers the prompt too: next-token prediction on the requests stands in for the pretraining a
    real model brings, and gives the tiny model word representations that RL can then use.
    """
    rng = random.Random(seed)
    prompts = [
        tokenizer.apply_chat_template(
            chat_messages(ex, template, system_prompt),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for ex in examples
    ]
    responses = {
        text: tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for text in (response_text(*pair) for pair in REFUSALS + COMPLIANCES)
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total = epochs * ((len(examples) + 31) // 32)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)
    model.train()
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), 32):
            rows = []
            for i in order[start : start + 32]:
                pair = rng.choice(REFUSALS if rng.random() < 0.5 else COMPLIANCES)
                rows.append((prompts[i], responses[response_text(*pair)]))
            width = max(len(p) + len(r) for p, r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (p, r) in enumerate(rows):
                ids[j, : len(p) + len(r)] = torch.tensor(p + r)
                labels[j, : len(p) + len(r)] = torch.tensor(p + r)
                attn[j, : len(p) + len(r)] = 1
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def build_if_missing(recipe: Recipe) -> None:
    """Build the demo policy when the recipe asks for it (`model.build: demo`) and it is not there yet."""
    if recipe.model.build == "demo" and not Path(recipe.model.name_or_path).exists():
        build_demo_policy(recipe)


def build_demo_policy(recipe: Recipe, epochs: int = 25) -> Path:
    """Build the demo policy at `recipe.model.name_or_path` (atomically: built aside, then renamed)."""
    target = Path(recipe.model.name_or_path)
    examples = [ex for source in load_split(recipe.data, "train", recipe_base(recipe)) for ex in source]
    template = compile_template(recipe.data.template, answer_format=recipe.format)
    print(
        f"building the demo policy at {target} (tokenizer, tiny Qwen2, {epochs}-epoch warm-start)...",
        flush=True,
    )
    # the demo's vocabulary is the paper's format (TAGS), whatever the recipe's format says
    paper_template = compile_template("alphaalign").render(prompt="{{ prompt }}")
    corpus = [ex.prompt for ex in examples] + [paper_template, recipe.data.template, CHATML]
    corpus += [response_text(*pair) for pair in REFUSALS + COMPLIANCES] * 50
    tokenizer = train_tokenizer(corpus)
    model = random_qwen2(tokenizer, seed=recipe.trainer.seed)
    loss = warm_start(
        model, tokenizer, examples, template, recipe.data.system_prompt, epochs, recipe.trainer.seed
    )
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo policy ready: {n_params / 1e6:.2f}M parameters, warm-start loss {loss:.3f}", flush=True)
    return target


def build_tiny_classifier(
    path: Path,
    texts: list[str],
    num_labels: int = 1,
    labels: list[str] | None = None,
    hidden: int = 32,
    layers: int = 1,
    vocab_size: int = 400,
    seed: int | None = None,
) -> Path:
    """A random Qwen2ForSequenceClassification (~50k parameters by default) with a tokenizer trained on
    ``texts`` that has a chat template: a stand-in for a reward model (one output) or a classifier."""
    from transformers import Qwen2ForSequenceClassification

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(num_labels if seed is None else seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * hidden,
        max_position_embeddings=4096,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
