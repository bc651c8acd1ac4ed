"""`alphaalign score`: a recipe's reward terms on a JSONL file of (prompt, completion) rows, streamed.

Input rows: `prompt` and `completion` (strings), optional `label` (harmful/benign, or the synonyms data files
accept), any other fields (e.g. `config`, `group`), which are passed to the rewards as columns and written
back. Output rows: every input field, plus `rewards` {term: value, null where the term does not apply},
`total` (the weighted sum of the applicable terms, null when none applies) and `verdicts`
{format_ok, refused, judge}: the format verifier with the recipe's tag names, and the refusal verdict of the
judge named in `judge` (`--judge`, else the recipe's `judge:` block, else the rules); an LLM judge also gives
`attack_success`, `judge_label` and `judge_error`, and `refused` is null where its reply was unparseable. Rows are read and written in
chunks of `chunk_rows`, so memory does not grow with the file. The output is written beside OUT and renamed
into place at the end: a bad input line leaves no partial file.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from alphaalign import parsing
from alphaalign.config import FormatConfig, RewardSpec
from alphaalign.data import LABELS
from alphaalign.errors import UserError
from alphaalign.judges import stats_line
from alphaalign.outputs import check_output
from alphaalign.rewards import parse_alphaalign
from alphaalign.rewards.stack import RewardStack
from alphaalign.rl import algos


def select_terms(specs: list[RewardSpec], only: list[str] | None) -> list[RewardSpec]:
    """The terms named in ``only`` (by reward name or by the name metrics use), in recipe order."""
    if not only:
        return specs
    names = RewardStack(specs).names
    known = {n for spec, shown in zip(specs, names, strict=True) for n in (spec.name, shown)}
    for name in only:
        if name not in known:
            raise UserError(f"--only: no reward term {name!r}; the terms are: {', '.join(names)}")
    return [spec for spec, shown in zip(specs, names, strict=True) if spec.name in only or shown in only]


def _read_row(line: str, where: str) -> dict:
    try:
        row = parsing.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "completion"):
        if key not in row:
            raise UserError(
                f"{where}: no '{key}' field (this row has: {', '.join(map(repr, row)) or 'none'})"
            )
        if not isinstance(row[key], str):
            raise UserError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    label = row.get("label")
    if label is not None and str(label).strip().lower() not in LABELS:
        raise UserError(f"{where}: label must be harmful or benign, got {label!r}")
    return row


def _score_chunk(stack: RewardStack, rows: list[dict], tags: tuple[str, str], judge) -> list[dict]:
    prompts = [r["prompt"] for r in rows]
    completions = [r["completion"] for r in rows]
    labels = [None if r.get("label") is None else LABELS[str(r["label"]).strip().lower()] for r in rows]
    columns: dict[str, list] = {"label": labels}
    for key in {k for r in rows for k in r} - {"prompt", "completion", "label"}:
        columns[key] = [r.get(key) for r in rows]
    per_term = stack.score(prompts, completions, columns)
    totals = algos.combine_rewards(per_term, stack.weights, 1, "sum_then_normalize").tolist()
    parses = [parse_alphaalign(c, *tags) for c in completions]
    judgements = judge.judge(prompts, [p.final for p in parses])
    detail = judge.spec.type == "llm"
    out = []
    for row, parsed, j, values, total in zip(
        rows, parses, judgements, per_term.tolist(), totals, strict=True
    ):
        rewards = {name: None if math.isnan(v) else v for name, v in zip(stack.names, values, strict=True)}
        verdicts = {"format_ok": parsed.format_ok, "refused": j.refused, "judge": judge.describe()}
        if detail:
            verdicts.update(attack_success=j.success, judge_label=j.label, judge_error=j.error)
        out.append(
            {**row, "rewards": rewards, "total": None if math.isnan(total) else total, "verdicts": verdicts}
        )
    return out


def score_file(
    input_path: str | Path,
    output_path: str | Path,
    specs: list[RewardSpec],
    answer_format: FormatConfig | None = None,
    chunk_rows: int = 1024,
    judge=None,
) -> dict:
    """Score every row of ``input_path`` into ``output_path``; returns counts for the summary. ``judge``: an
    open `alphaalign.judges.Judge` for the verdicts (default: the rules); ``answer_format``: the recipe's
    `format:` (default `FormatConfig()`)."""
    from alphaalign.judges import Judge, RulesJudge

    judge = judge or Judge(RulesJudge())
    input_path, output_path = Path(input_path), Path(output_path)
    answer_format = answer_format or FormatConfig()
    tags = answer_format.tags
    stack = RewardStack(specs, answer_format)
    counts: Counter = Counter()
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    try:
        source = input_path.open(encoding="utf-8-sig")  # a leading BOM is not part of the first row
    except OSError as exc:
        raise UserError(f"{input_path}: cannot read ({exc.strerror})") from None
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        sink = tmp.open("w", encoding="utf-8")
    except OSError as exc:
        source.close()
        raise UserError(f"{output_path}: cannot write ({exc.strerror})") from None
    try:
        with source, sink:
            chunk: list[dict] = []
            try:
                for lineno, line in enumerate(source, start=1):
                    if line.strip():
                        chunk.append(_read_row(line, f"{input_path}:{lineno}"))
                        stack.check_columns(
                            chunk[-1].keys() - {"prompt", "completion"}, f"{input_path}:{lineno}"
                        )
                    if len(chunk) == chunk_rows:
                        _write(_score_chunk(stack, chunk, tags, judge), sink, counts)
                        chunk = []
            except UnicodeDecodeError:
                raise UserError(f"{input_path}: not a UTF-8 text file") from None
            if chunk:
                _write(_score_chunk(stack, chunk, tags, judge), sink, counts)
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {**counts, "judge": judge.describe(), "judge_stats": dict(judge.stats)}


def _write(rows: list[dict], sink: TextIO, counts: Counter) -> None:
    for row in rows:
        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        label = LABELS[str(row["label"]).strip().lower()] if row.get("label") is not None else "unlabelled"
        counts["rows"] += 1
        counts["format_ok"] += row["verdicts"]["format_ok"]
        counts[f"{label}/rows"] += 1
        if row["verdicts"]["refused"] is None:
            counts[f"{label}/unparseable"] += 1
        else:
            counts[f"{label}/refused"] += row["verdicts"]["refused"]
            counts[f"{label}/success"] += row["verdicts"].get("attack_success") or 0.0


def format_summary(counts: dict, output_path: str | Path) -> str:
    """Refusal rate per label and format rate, for stderr."""
    n = counts.get("rows", 0)
    lines = [f"scored {n} rows into {output_path}", f"refusals judged by: {counts.get('judge', 'rules')}"]
    for label in ("harmful", "benign", "unlabelled"):
        rows = counts.get(f"{label}/rows", 0) - counts.get(f"{label}/unparseable", 0)
        if rows:
            refused = counts.get(f"{label}/refused", 0)
            lines.append(f"refusal rate, {label}: {refused / rows:.1%} ({refused}/{rows})")
    judged = counts.get("harmful/rows", 0) - counts.get("harmful/unparseable", 0)
    if "requests" in counts.get("judge_stats", {}) and judged:
        lines.append(f"attack success, harmful: {counts['harmful/success'] / judged:.3f} (mean of {judged})")
    unparseable = sum(counts.get(f"{label}/unparseable", 0) for label in ("harmful", "benign", "unlabelled"))
    judge_line = stats_line(counts.get("judge_stats", {}), unparseable)
    if judge_line:
        lines.append(judge_line)
    if n:
        lines.append(f"format rate: {counts['format_ok'] / n:.1%} ({counts['format_ok']}/{n})")
    return "\n".join(lines)


def run(args) -> int:
    """`alphaalign score`: a JSONL file of completions scored with a recipe's reward terms (default: the
    rule-based alphaalign_safety)."""
    from alphaalign.config import load_recipe
    from alphaalign.judges import RulesJudge, judge_from_option, open_judge
    from alphaalign.validate import check_rewards

    check_output(args.output, "--output", folder=False)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    judge, where = RulesJudge(), "--judge"
    if args.recipe:
        recipe = load_recipe(args.recipe)
        check_rewards(args.recipe, recipe)
        specs, answer_format, judge = recipe.rewards, recipe.format, recipe.judge
        where = f"{args.recipe}: judge"
    else:
        specs, answer_format = [RewardSpec(name="alphaalign_safety")], FormatConfig()
    if args.judge:
        judge, where = judge_from_option(args.judge), "--judge"
    terms = select_terms(specs, only)
    with open_judge(judge, where, Path(args.output).parent) as opened:
        counts = score_file(args.input, args.output, terms, answer_format, judge=opened)
    print(format_summary(counts, args.output), file=sys.stderr)
    return 0
