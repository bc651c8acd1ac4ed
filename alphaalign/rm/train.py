"""`alphaalign train-rm`: train a CSRM from preference pairs with configurations, then calibrate it.

The model is a one-output `AutoModelForSequenceClassification`; its logit z = f(c, x) for a configuration c
(system turn) and a conversation x is both the reward and, through temperature scaling, P(compliant).
Each step takes a batch of preference pairs and a batch of compliance-labelled chats and minimises

    L = L_BT + λ·L_cal,  L_BT = −mean log σ(z_chosen − z_rejected),
                         L_cal = −mean [y log σ(z) + (1 − y) log(1 − σ(z))]   (y = 1: complies)

(Bradley–Terry as in TRL's RewardTrainer; the binary term as Safe-RLHF's cost model; λ =
`training.calibration_weight`). After training, temperature T and bias b are fitted on the held-out prompts'
labels (`alphaalign.rewards.csrm.fit_calibration`) and saved beside the weights.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alphaalign.errors import UserError
from alphaalign.models import DTYPES, pick_device
from alphaalign.rewards.csrm import expected_calibration_error, fit_calibration, save_calibration
from alphaalign.rewards.rm_scoring import user_assistant
from alphaalign.rm.data import Labelled, Pair, load_rm_data, split_by_prompt
from alphaalign.rm.recipe import RewardModelRecipe
from alphaalign.templates import ChatRejected, render_chats


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−mean log σ(z_chosen − z_rejected)."""
    return -F.logsigmoid(chosen - rejected).mean()


def calibration_loss(logits: torch.Tensor, compliant: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of σ(z) against the compliance labels (1 = complies)."""
    return F.binary_cross_entropy_with_logits(logits, compliant.to(logits.dtype))


def load_trainable(recipe: RewardModelRecipe, device: torch.device):
    """The initial model with one output (a causal LM gets a new score head) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = recipe.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.name_or_path, num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"model.name_or_path: cannot load {cfg.name_or_path!r} ({first_line})") from None
    if tokenizer.chat_template is None:
        raise UserError(f"model.name_or_path: the tokenizer of {cfg.name_or_path!r} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model.to(device), tokenizer


def chat(config: str, prompt: str, answer: str | None) -> list[dict]:
    return user_assistant(prompt, answer, config)


def forward_logits(model, tokenizer, chats: list[list[dict]], max_length: int) -> torch.Tensor:
    """The model's logit for each chat, in float32 (with gradients when the model is in training mode)."""
    try:  # every chat has the roles [system, user, assistant]: the first batch, before training, finds a refusal
        texts = render_chats(tokenizer, chats, tokenize=False)
    except ChatRejected as exc:
        raise UserError(f"model.name_or_path: {exc}") from None
    device = next(model.parameters()).device
    enc = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
        add_special_tokens=False,
    )
    return model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float()


@torch.no_grad()
def pair_metrics(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int) -> dict:
    """Bradley–Terry loss and pairwise accuracy (share of pairs with z_chosen > z_rejected)."""
    model.eval()
    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        z = forward_logits(
            model,
            tokenizer,
            [chat(p.config, p.prompt, p.chosen) for p in batch]
            + [chat(p.config, p.prompt, p.rejected) for p in batch],
            max_length,
        )
        margins.append(z[: len(batch)] - z[len(batch) :])
    m = torch.cat(margins) if margins else torch.empty(0)
    return {"bt_loss": float(-F.logsigmoid(m).mean()), "pairwise_accuracy": float((m > 0).float().mean())}


@torch.no_grad()
def labelled_logits(
    model, tokenizer, items: list[Labelled], max_length: int, batch_size: int
) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        chats = [chat(x.config, x.prompt, x.answer) for x in items[start : start + batch_size]]
        out.append(forward_logits(model, tokenizer, chats, max_length).cpu())
    return torch.cat(out) if out else torch.empty(0)


def endless_batches(items: list, size: int, rng: random.Random):
    """Batches of ``size`` items drawn without replacement, reshuffled each time the list runs out."""
    queue: list[int] = []
    while True:
        while len(queue) < size:
            queue += rng.sample(range(len(items)), len(items))
        yield [items[i] for i in queue[:size]]
        del queue[:size]


def _build_demo_model(recipe: RewardModelRecipe, pairs: list[Pair], labelled: list[Labelled]) -> None:
    """A tiny random classifier with a tokenizer trained on the recipe's own texts (offline demo)."""
    from alphaalign.demo.build import build_tiny_classifier

    target = Path(recipe.model.name_or_path)
    texts = [t for p in pairs for t in (p.config, p.prompt, p.chosen, p.rejected)]
    texts += [t for x in labelled for t in (x.config, x.prompt, x.answer or "")]
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_classifier(tmp, texts, hidden=64, layers=2, vocab_size=1000, seed=recipe.training.seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)


def check_output_dir(recipe: RewardModelRecipe) -> None:
    """The output folder may be new, empty, or an earlier train-rm output (which is replaced)."""
    out = Path(recipe.training.output_dir)
    if (
        out.exists()
        and (not out.is_dir() or any(out.iterdir()))
        and not (out / "train_rm_summary.json").exists()
    ):
        raise UserError(
            f"training.output_dir: {out} exists and is not a train-rm output; choose another folder"
        )


def train_rm(recipe: RewardModelRecipe, log=print) -> dict:
    """Train, calibrate and save a CSRM; return the summary written to ``train_rm_summary.json``."""
    tc = recipe.training
    check_output_dir(recipe)
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    pairs, labelled = load_rm_data(recipe)
    train_pairs, train_labels, held_pairs, held_labels = split_by_prompt(
        pairs, labelled, recipe.data.heldout_fraction, tc.seed
    )
    if not train_pairs:
        raise UserError("train-rm: no preference pairs left for training after holding out prompts")
    if len({x.compliant for x in held_labels}) < 2:
        raise UserError(
            "data.heldout_fraction: the held-out prompts need compliant and non-compliant labels for the "
            f"calibration, got {len(held_labels)} labels of {len({x.compliant for x in held_labels})} kind(s)"
        )
    if recipe.model.build == "demo" and not Path(recipe.model.name_or_path).exists():
        _build_demo_model(recipe, pairs, labelled)
    device = pick_device(tc.device)
    model, tokenizer = load_trainable(recipe, device)
    max_len, bs = recipe.model.max_length, tc.batch_size
    log(
        f"train-rm: {len(train_pairs)} train pairs, {len(train_labels)} labelled chats; held out "
        f"{len(held_pairs)} pairs, {len(held_labels)} labelled chats"
    )
    before = pair_metrics(model, tokenizer, train_pairs, max_len, bs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    labels = endless_batches(train_labels, bs, rng)
    history, step, started = [], 0, time.time()
    for epoch in range(tc.epochs):
        order = rng.sample(range(len(train_pairs)), len(train_pairs))
        for start in range(0, len(order), bs):
            model.train()
            batch = [train_pairs[i] for i in order[start : start + bs]]
            chats = [chat(p.config, p.prompt, p.chosen) for p in batch]
            chats += [chat(p.config, p.prompt, p.rejected) for p in batch]
            z = forward_logits(model, tokenizer, chats, max_len)
            bt = bradley_terry_loss(z[: len(batch)], z[len(batch) :])
            cal = torch.zeros((), device=z.device)
            if train_labels and tc.calibration_weight > 0:
                items = next(labels)
                zl = forward_logits(
                    model, tokenizer, [chat(x.config, x.prompt, x.answer) for x in items], max_len
                )
                cal = calibration_loss(zl, torch.tensor([x.compliant for x in items], device=zl.device))
            loss = bt + tc.calibration_weight * cal
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            optimizer.step()
            step += 1
            history.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss.item(),
                    "bt_loss": bt.item(),
                    "calibration_loss": cal.item(),
                }
            )
            if step % tc.log_every == 0:
                log(f"step {step}: loss {loss.item():.4f} (BT {bt.item():.4f}, calibration {cal.item():.4f})")
    after = pair_metrics(model, tokenizer, train_pairs, max_len, bs)
    summary = {
        "train_pairs": len(train_pairs),
        "train_labelled": len(train_labels),
        "steps": step,
        "seconds": round(time.time() - started, 1),
        "train_before": before,
        "train_after": after,
    }
    calibration = calibrate(model, tokenizer, held_pairs, held_labels, max_len, bs, summary)
    out = save_rm(recipe, model, tokenizer, calibration, summary, history)
    log(
        f"train-rm: train pairwise accuracy {before['pairwise_accuracy']:.1%} -> {after['pairwise_accuracy']:.1%}, "
        f"held-out ECE {summary['heldout']['ece_raw']:.3f} -> {summary['heldout']['ece']:.3f}; saved to {out}"
    )
    return summary


def calibrate(model, tokenizer, held_pairs, held_labels, max_len, bs, summary: dict):
    """Fit temperature and bias on the held-out labels; record held-out metrics in ``summary``."""
    z = labelled_logits(model, tokenizer, held_labels, max_len, bs)
    y = torch.tensor([x.compliant for x in held_labels], dtype=torch.float64)
    calibration = fit_calibration(z, y)
    heldout = pair_metrics(model, tokenizer, held_pairs, max_len, bs) if held_pairs else {}
    heldout.update(
        labelled=len(held_labels),
        ece_raw=expected_calibration_error(torch.sigmoid(z.double()), y),
        ece=expected_calibration_error(calibration.probability(z.double()), y),
        accuracy=float(((calibration.probability(z.double()) >= 0.5).double() == y).double().mean()),
    )
    summary["heldout"] = heldout
    summary["calibration"] = {"temperature": calibration.temperature, "bias": calibration.bias}
    return calibration


def save_rm(
    recipe: RewardModelRecipe, model, tokenizer, calibration, summary: dict, history: list[dict]
) -> Path:
    """Write model, tokenizer, calibration, summary and the loss log into a temporary folder, then rename it
    over ``training.output_dir``."""
    out = Path(recipe.training.output_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_calibration(
        tmp,
        calibration,
        fitted_on=summary["heldout"]["labelled"],
        ece_before=summary["heldout"]["ece_raw"],
        ece_after=summary["heldout"]["ece"],
    )
    (tmp / "train_rm_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (tmp / "train_rm_recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def run(args) -> int:
    """`alphaalign train-rm`: train and calibrate a CSRM from a train-rm recipe (or from dotted keys alone)."""
    from alphaalign.config import load_recipe

    recipe_path, overrides = args.recipe, args.overrides
    if "=" in recipe_path:  # no recipe file: the arguments are the recipe
        recipe_path, overrides = None, [args.recipe, *overrides]
    train_rm(load_recipe(recipe_path, overrides, schema=RewardModelRecipe))
    return 0
