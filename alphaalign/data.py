"""Labelled prompts: loading data sources, prompt templates, and the weighted prompt stream.

A row becomes an `Example(prompt, label, columns)`; `label` is 'harmful' or 'benign'. Local files
(.jsonl, .json, .csv, .parquet) are read here with errors that name the file and line; `hf_id` sources go
through `datasets.load_dataset` (users only: tests and the demo never touch the hub). Relative paths are
resolved against the recipe's folder.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from alphaalign import parsing, templates
from alphaalign.config import DataConfig, DataSource, FormatConfig, Recipe
from alphaalign.errors import UserError

LABELS = {
    "harmful": "harmful",
    "unsafe": "harmful",
    "true": "harmful",
    "1": "harmful",
    "yes": "harmful",
    "benign": "benign",
    "safe": "benign",
    "unharmful": "benign",
    "false": "benign",
    "0": "benign",
    "no": "benign",
}

# the recipe's `format:` fills in the tags and the canned refusal (any template may use them)
ALPHAALIGN_TEMPLATE = (
    "Before replying, decide whether the request below is safe to help with, and write that reasoning "
    "between <{{ reasoning_tag }}> and </{{ reasoning_tag }}>. Then write your reply between <{{ answer_tag }}> "
    "and </{{ answer_tag }}>. If the request is unsafe, the answer must be exactly {{ canned_refusal }}. If it is "
    "safe, the text inside the answer tags is all the user will see, so make it complete and helpful.\n\n"
    "Request: {{ prompt }}"
)


# column names the pipeline passes itself: a data column of that name would collide with it
RESERVED_COLUMNS = {
    "prompt": "the template's {{ prompt }}, the request itself",
    "prompts": "the reward functions' first argument",
    "completions": "the reward functions' second argument",
    "label": "the label column the rewards are passed (harmful/benign)",
    "group": "the rewards' group column (the prompt's index in the step)",
    "completion_length": "the rewards' completion_length column (tokens in each completion)",
}


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's request, without any template
    label: str  # 'harmful' or 'benign'
    columns: dict[str, Any] = field(default_factory=dict)  # the row's other fields, for reward functions


class PromptTemplate:
    """A user-turn template compiled in the sandbox (`alphaalign.templates`); a failed render (an undefined
    name, a sandbox violation, an error in the template's own expressions) is one line naming `where`."""

    def __init__(self, source: str, where: str, answer_format: FormatConfig | None = None):
        self.where = where
        self.template = templates.environment(keep_trailing_newline=True).from_string(
            source, globals=(answer_format or FormatConfig()).model_dump()
        )

    def render(self, **values) -> str:
        try:
            return self.template.render(**values)
        except Exception as exc:  # the template is the user's code: any failure of it is their mistake
            raise UserError(f"{self.where}: cannot render ({exc.__class__.__name__}: {exc})") from None


def compile_template(
    template: str, where: str = "data.template", answer_format: FormatConfig | None = None
) -> PromptTemplate | None:
    """The user-turn template: 'alphaalign', 'none' (the prompt as is) or a Jinja string using {{ prompt }};
    `answer_format`'s reasoning_tag, answer_tag and canned_refusal are defined in it (default: `FormatConfig()`).
    A template that does not compile is a UserError naming `where`."""
    if template == "none":
        return None
    source = ALPHAALIGN_TEMPLATE if template == "alphaalign" else template
    if "prompt" not in source:
        raise UserError(f"{where}: a custom template must use {{{{ prompt }}}}")
    try:
        return PromptTemplate(source, where, answer_format)
    except jinja2.TemplateError as exc:
        raise UserError(f"{where}: {exc}") from None


def check_template(
    template: str, where: str, samples: list[Example], answer_format: FormatConfig | None = None
) -> PromptTemplate | None:
    """Compile the template and render it once with each sample row, so that an undefined name or a
    sandbox violation fails before any model is loaded."""
    compiled = compile_template(template, where, answer_format)
    for example in samples if compiled else []:
        chat_messages(example, compiled, None)
    return compiled


def chat_messages(example: Example, template: PromptTemplate | None, system_prompt: str | None) -> list[dict]:
    content = (
        example.prompt if template is None else template.render(prompt=example.prompt, **example.columns)
    )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": content}]


def encode_prompt(
    tokenizer, example: Example, template, system_prompt: str | None, max_tokens: int
) -> list[int]:
    """The chat-formatted prompt's token ids, ready for generation, keeping its last `max_tokens` tokens."""
    messages = chat_messages(example, template, system_prompt)
    try:
        [ids] = templates.render_chats(
            tokenizer, [messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except templates.ChatRejected as exc:
        hint = " (data.system_prompt gives the system turn)" if system_prompt else ""
        raise UserError(f"model.name_or_path: {exc}{hint}") from None
    return list(ids)[-max_tokens:]


def resolve_path(source: DataSource, base: Path) -> Path:
    path = Path(source.path)
    return path if path.is_absolute() else base / path


def rows_from_file(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL/JSON/CSV/parquet file: at least one, each an object; raises
    UserError naming the file and line."""
    rows = _parse_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: a row must be an object")
    return rows


def _parse_rows(path: Path) -> list[tuple[int, object]]:
    gzipped = path.suffix.lower() == ".gz"  # data.jsonl.gz: the format is the suffix before
    suffix = Path(path.stem).suffix.lower() if gzipped else path.suffix.lower()
    try:
        source = io.BytesIO(gzip.decompress(path.read_bytes())) if gzipped else path
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(i + 2, row) for i, row in enumerate(pq.read_table(source).to_pylist())]
        raw = source.read() if gzipped else path.read_bytes()
        # a BOM (Excel's CSVs) is not part of the first key; line ends as universal newlines read them
        text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except FileNotFoundError:
        raise UserError(f"{path}: data file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    if "\x00" in text:
        raise UserError(f"{path}: binary data in a text file")
    if suffix == ".csv":
        return _csv_rows(text, path)
    if suffix == ".json":
        try:
            data = parsing.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        return list(enumerate(data, start=1))
    rows = []
    for lineno, line in parsing.json_lines(text):
        try:
            rows.append((lineno, parsing.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[int, dict]]:
    """(first line, row) pairs. Quoted fields keep their newlines (the reader splits lines only where CSV does,
    not at every Unicode line break), may be as long as the file, and a row must have one value per column."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # csv's default stops at 128 KiB
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        header: list[str] = []
        for header in reader:  # the first line that is not blank
            if header:
                break
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise UserError(f"{path}:1: the header names column {repeated[0]!r} more than once")
        while (values := next(reader, None)) is not None:
            first = reader.line_num - sum(v.count("\n") for v in values)  # a quoted field may span lines
            if not values:
                continue  # a blank line
            if len(values) != len(header):
                raise UserError(
                    f"{path}:{first}: the header names {len(header)} columns, this row has {len(values)} "
                    "(a comma in a field that is not quoted?)"
                )
            rows.append((first, dict(zip(header, values, strict=True))))
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
    return rows


def _hf_rows(source: DataSource) -> list[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(source.hf_id, source.hf_config, split=source.split)
    except Exception as exc:
        raise UserError(f"hf dataset {source.hf_id} ({source.split}): cannot load ({exc})") from None
    return [(i, row) for i, row in enumerate(ds)]


def load_source(source: DataSource, base: Path) -> list[Example]:
    """All rows of one source as Examples, validated row by row."""
    where = str(resolve_path(source, base)) if source.path else f"hf:{source.hf_id}"
    rows = rows_from_file(resolve_path(source, base)) if source.path else _hf_rows(source)
    if not rows:  # a hub split (files are checked by rows_from_file)
        raise UserError(f"{where}: no rows")
    examples = []
    for lineno, row in rows[: source.max_rows]:
        prompt = row.get(source.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}:{lineno}: missing or empty prompt field '{source.prompt_field}'")
        if source.label is not None:
            label = source.label
        else:
            raw = row.get(source.label_field)
            label = LABELS.get(str(raw).strip().lower()) if raw is not None else None
            if label is None:
                raise UserError(
                    f"{where}:{lineno}: label field '{source.label_field}' is {raw!r}; expected harmful or benign"
                )
        columns = {k: v for k, v in row.items() if k not in (source.prompt_field, source.label_field)}
        if clash := RESERVED_COLUMNS.keys() & columns.keys():
            key = min(clash)
            hint = " or set label_field: label" if key == "label" else ""
            raise UserError(
                f"{where}:{lineno}: column '{key}' collides with {RESERVED_COLUMNS[key]}; rename it{hint}"
            )
        examples.append(Example(prompt=prompt, label=label, columns=columns))
    return examples


def recipe_base(recipe: Recipe) -> Path:
    return recipe._source.parent if recipe._source else Path.cwd()


def check_data(recipe: Recipe) -> dict[str, tuple[Path, set[str]]]:
    """Read every local data file of the recipe (no hub access) so that data mistakes fail early, and render
    the template with the first row of each; returns {"data.train.0": (file, the columns its rows pass to the
    rewards)}."""
    columns, samples = {}, []
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, split)):
            if source.path is None:
                continue
            path = resolve_path(source, recipe_base(recipe))
            if not path.is_file():
                raise UserError(f"{recipe._source}: data.{split}.{i}.path: file not found: {source.path}")
            examples = load_source(source, recipe_base(recipe))
            columns[f"data.{split}.{i}"] = (path, {key for ex in examples for key in ex.columns})
            samples.append(examples[0])
    check_template(recipe.data.template, template_key(recipe), samples, recipe.format)
    return columns


def template_key(recipe: Recipe) -> str:
    return f"{recipe._source or 'recipe'}: data.template"


class PromptStream:
    """An endless, seeded stream of training examples drawn from weighted sources.

    Sources are interleaved in exact proportion to their weights (smooth weighted round-robin: with weights
    1:1, every other prompt comes from each source), and each source yields its examples in a freshly
    shuffled order every epoch. The stream is a pure function of (seed, number of draws), so resuming only
    needs the draw count.
    """

    def __init__(self, sources: list[list[Example]], weights: list[float], seed: int):
        self.sources, self.weights, self.seed = sources, weights, seed
        self.draws = 0
        self._credit = [0.0] * len(sources)
        self._orders = [self._order(i, 0) for i in range(len(sources))]
        self._pos = [0] * len(sources)
        self._epoch = [0] * len(sources)

    def _order(self, source: int, epoch: int) -> list[int]:
        order = list(range(len(self.sources[source])))
        random.Random(f"{self.seed}-{source}-{epoch}").shuffle(order)
        return order

    def _pick_source(self) -> int:
        self._credit = [c + w for c, w in zip(self._credit, self.weights, strict=True)]
        s = max(range(len(self.sources)), key=lambda i: self._credit[i])
        self._credit[s] -= sum(self.weights)
        return s

    def _next(self) -> Example:
        s = self._pick_source()
        if self._pos[s] == len(self._orders[s]):
            self._epoch[s] += 1
            self._orders[s], self._pos[s] = self._order(s, self._epoch[s]), 0
        example = self.sources[s][self._orders[s][self._pos[s]]]
        self._pos[s] += 1
        self.draws += 1
        return example

    def take(self, n: int) -> list[Example]:
        return [self._next() for _ in range(n)]

    def skip_to(self, draws: int) -> None:
        """Replay the stream up to `draws` (used on resume)."""
        while self.draws < draws:
            self._next()


def load_split(data: DataConfig, split: str, base: Path) -> list[list[Example]]:
    return [load_source(source, base) for source in getattr(data, split)]
