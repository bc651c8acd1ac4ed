"""Training data for a CSRM: preference pairs with configurations, and configuration-targeted augmentation.

Two kinds of files (JSONL, JSON, CSV or parquet rows, as recipes' data files):

* `pairs`: `{config, prompt, chosen, rejected}` plus optional booleans `chosen_compliant` and
  `rejected_compliant` (does the response comply with `config`?), used by the calibration loss.
* `categorized`: `{prompt, categories, responses}`, where `categories` are the request's risk categories and
  each response is `{text, categories, addresses}`: the risk categories present in it, and whether it
  addresses the request at all (a refusal does not).

Augmentation (CoSAlign's data builder, which CSRM's "configuration-targeted augmentation that preserves
relative severity" most likely follows; shared/research/csrm.md §1.4). For a prompt with risk categories S,
sample configurations by allowed set A, one mode at a time:

    exact_match   A = S                                        (the request is allowed)
    superset      A = S ∪ (a non-empty set of other categories) (allowed)
    safe          A = ∅                                        (forbidden when S ≠ ∅)
    not_superset  A ⊉ S: a random set missing ≥ 1 of S         (forbidden)

Under A, a response with categories R gets the error score

    e(R | A) = unaddressed·[does not address] + α·|R ∩ A| + β·|R \\ A|,

and every two responses with e_chosen < e_rejected form a pair, unless e_chosen ≥ β (the better response
itself violates A). With the defaults (α 0.1 < unaddressed 1 < β 3) this keeps the severity order: a compliant
answer beats a refusal, which beats any violation, and fewer forbidden categories beat more. A response
complies with A when R ⊆ A; the request alone complies when S ⊆ A (`prompt_labels`). The configuration text is
one of the recipe's templates rendered with the descriptions of the allowed and forbidden categories.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import jinja2

from alphaalign import templates as jinja_templates
from alphaalign.data import rows_from_file
from alphaalign.errors import UserError
from alphaalign.rm.recipe import AugmentationConfig, RewardModelRecipe


@dataclass(frozen=True)
class Pair:
    config: str
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Labelled:
    """Does ``answer`` (None: the request alone) comply with ``config``?"""

    config: str
    prompt: str
    answer: str | None
    compliant: bool


@dataclass(frozen=True)
class Response:
    text: str
    categories: frozenset[str]
    addresses: bool


@dataclass(frozen=True)
class CategorizedPrompt:
    prompt: str
    categories: frozenset[str]
    responses: tuple[Response, ...]


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string")
    return value


def _optional_bool(row: dict, key: str, where: str) -> bool | None:
    value = row.get(key)
    if value is not None and not isinstance(value, bool):
        raise UserError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _rows(path: Path) -> list[tuple[str, dict]]:
    """("file:line", row) pairs."""
    return [(f"{path}:{lineno}", row) for lineno, row in rows_from_file(path)]


def read_pairs(path: Path, fields: dict[str, str] | None = None) -> tuple[list[Pair], list[Labelled]]:
    """The file's preference pairs, and the compliance labels it gives for their responses. ``fields`` names
    the file's column for a key whose column has another name (e.g. ``{"config": "system_prompt"}``)."""
    column = (fields or {}).get
    pairs, labelled = [], []
    for where, row in _rows(path):
        config, prompt = (
            _text(row, column("config", "config"), where),
            _text(row, column("prompt", "prompt"), where),
        )
        chosen, rejected = (
            _text(row, column("chosen", "chosen"), where),
            _text(row, column("rejected", "rejected"), where),
        )
        pairs.append(Pair(config, prompt, chosen, rejected))
        for answer, key in ((chosen, "chosen_compliant"), (rejected, "rejected_compliant")):
            compliant = _optional_bool(row, column(key, key), where)
            if compliant is not None:
                labelled.append(Labelled(config, prompt, answer, compliant))
    return pairs, labelled


def _categories(row: dict, where: str, known: dict[str, str]) -> frozenset[str]:
    value = row.get("categories", [])
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise UserError(f"{where}: 'categories' must be a list of category names")
    for name in value:
        if name not in known:
            raise UserError(
                f"{where}: unknown risk category {name!r}; augmentation.categories has: {', '.join(known)}"
            )
    return frozenset(value)


def read_categorized(path: Path, known: dict[str, str]) -> list[CategorizedPrompt]:
    """The file's prompts with their risk categories and categorized responses."""
    prompts = []
    for where, row in _rows(path):
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError(f"{where}: 'responses' must be a list of at least 2 responses")
        parsed = []
        for i, resp in enumerate(responses):
            at = f"{where}: responses.{i}"
            if not isinstance(resp, dict):
                raise UserError(f"{at}: a response must be an object")
            addresses = _optional_bool(resp, "addresses", at)
            if addresses is None:
                raise UserError(f"{at}: 'addresses' (true or false) is required")
            parsed.append(Response(_text(resp, "text", at), _categories(resp, at, known), addresses))
        prompts.append(
            CategorizedPrompt(_text(row, "prompt", where), _categories(row, where, known), tuple(parsed))
        )
    return prompts


def sample_allowed(
    mode: str, requested: frozenset[str], every: list[str], rng: random.Random
) -> frozenset[str] | None:
    """An allowed set A for ``mode`` (see the module docstring); None when the mode cannot apply."""
    others = [c for c in every if c not in requested]
    if mode == "exact_match":
        return requested
    if mode == "safe":
        return frozenset()
    if mode == "superset":
        if not others:
            return None
        return requested | frozenset(rng.sample(others, rng.randint(1, len(others))))
    if not requested:  # not_superset: every set is a superset of ∅
        return None
    dropped = frozenset(rng.sample(sorted(requested), rng.randint(1, len(requested))))
    kept = [c for c in every if c not in dropped]
    return frozenset(rng.sample(kept, rng.randint(0, len(kept))))


def error_score(response: Response, allowed: frozenset[str], aug: AugmentationConfig) -> float:
    """e(R | A) = unaddressed·[does not address] + α·|R ∩ A| + β·|R \\ A|."""
    return (
        aug.unaddressed * (not response.addresses)
        + aug.alpha * len(response.categories & allowed)
        + aug.beta * len(response.categories - allowed)
    )


def render_config(template: jinja2.Template, allowed: frozenset[str], categories: dict[str, str]) -> str:
    """The configuration text: the template with the descriptions of the allowed and forbidden categories."""
    return template.render(
        allowed=[desc for name, desc in categories.items() if name in allowed],
        forbidden=[desc for name, desc in categories.items() if name not in allowed],
    )


def augment(
    item: CategorizedPrompt, aug: AugmentationConfig, templates: list[jinja2.Template], rng: random.Random
) -> tuple[list[Pair], list[Labelled]]:
    """Pairs and compliance labels for ``item`` under ``aug.configs_per_prompt`` sampled configurations."""
    every = list(aug.categories)
    pairs, labelled, seen = [], [], set()
    modes = list(aug.modes)
    rng.shuffle(modes)
    for k in range(aug.configs_per_prompt):
        allowed = sample_allowed(modes[k % len(modes)], item.categories, every, rng)
        if allowed is None or allowed in seen:
            continue
        seen.add(allowed)
        config = render_config(rng.choice(templates), allowed, aug.categories)
        errors = [error_score(r, allowed, aug) for r in item.responses]
        for a, ea in zip(item.responses, errors, strict=True):
            labelled.append(Labelled(config, item.prompt, a.text, a.categories <= allowed))
            for b, eb in zip(item.responses, errors, strict=True):
                if ea < eb and ea < aug.beta:
                    pairs.append(Pair(config, item.prompt, a.text, b.text))
        if aug.prompt_labels:
            labelled.append(Labelled(config, item.prompt, None, item.categories <= allowed))
    return pairs, labelled


def _resolve(path: str, base: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else base / path


def load_rm_data(recipe: RewardModelRecipe) -> tuple[list[Pair], list[Labelled]]:
    """Every pair and compliance label of the recipe's files, augmentation applied (seeded)."""
    base = recipe._source.parent if recipe._source else Path.cwd()
    aug = recipe.augmentation
    env = jinja_templates.environment()
    templates = []
    for i, text in enumerate(aug.templates):
        try:
            templates.append(env.from_string(text))
            render_config(templates[-1], frozenset(), aug.categories)
        except jinja2.TemplateError as exc:
            raise UserError(f"augmentation.templates.{i}: {exc}") from None
    rng = random.Random(recipe.training.seed)
    pairs, labelled = [], []
    for path in recipe.data.pairs:
        p, lab = read_pairs(_resolve(path, base), recipe.data.pair_fields)
        pairs += p
        labelled += lab
    for path in recipe.data.categorized:
        for item in read_categorized(_resolve(path, base), aug.categories):
            p, lab = augment(item, aug, templates, rng)
            pairs += p
            labelled += lab
    return pairs, labelled


def split_by_prompt(pairs: list[Pair], labelled: list[Labelled], fraction: float, seed: int):
    """(train pairs, train labels, held-out pairs, held-out labels): a prompt's rows stay on one side."""
    prompts = sorted({x.prompt for x in pairs} | {x.prompt for x in labelled})
    if len(prompts) < 2:
        raise UserError("train-rm needs at least 2 distinct prompts (some are held out for calibration)")
    random.Random(seed).shuffle(prompts)
    heldout = set(prompts[: max(1, round(fraction * len(prompts)))])
    return (
        [x for x in pairs if x.prompt not in heldout],
        [x for x in labelled if x.prompt not in heldout],
        [x for x in pairs if x.prompt in heldout],
        [x for x in labelled if x.prompt in heldout],
    )
