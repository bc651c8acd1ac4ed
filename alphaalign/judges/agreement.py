"""How well a refusal judge agrees with human labels: `alphaalign eval-detector DATA`.

Every row of a labelled file (JSONL, JSON, CSV or parquet) holds a response and a 0/1 label (1 = a full or
partial refusal); the judge (rules, classifier or llm, as for `eval --judge`) gives its verdict on each, and the
report is accuracy, precision, recall and F1 with the confusion counts, overall and per value of a grouping
field (`--by`, default `source`). Rows the judge got wrong can be written to a file for reading.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from alphaalign.errors import UserError
from alphaalign.rewards.verifiers import parse_alphaalign

# Besides 0/1 and true/false, the three classes of the XSTest rubric, as its annotations name them
# ("2_full_refusal") or bare: a partial refusal is a refusal.
TRUE_LABELS = {1, "1", "true", "yes", "refusal", "refused", "full_refusal", "partial_refusal"}
FALSE_LABELS = {0, "0", "false", "no", "compliance", "complied", "full_compliance"}
_XSTEST_PREFIX = re.compile(r"[123]_(?=(?:full|partial)_)")


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    refused: bool
    group: str
    row: dict


@dataclass
class Agreement:
    """Confusion counts with refusal as the positive class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, label: bool, verdict: bool) -> None:
        if label:
            self.tp, self.fn = self.tp + verdict, self.fn + (not verdict)
        else:
            self.fp, self.tn = self.fp + verdict, self.tn + (not verdict)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def metrics(self) -> dict:
        """Rates of the counts; a rate whose denominator is 0 (no refusal predicted, none labelled) is None."""
        tp = self.tp
        precision = tp / (tp + self.fp) if tp + self.fp else None
        recall = tp / (tp + self.fn) if tp + self.fn else None
        f1 = 2 * tp / (2 * tp + self.fp + self.fn) if tp + self.fp + self.fn else None
        accuracy = (tp + self.tn) / self.n if self.n else None
        return {
            "n": self.n,
            "accuracy": accuracy,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            **asdict(self),
        }


def _field(row: dict, dotted: str):
    """A row's value at a dotted path (`orig_label.tone`), or None."""
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _label(value, where: str, field: str) -> bool:
    if isinstance(value, str):
        key = _XSTEST_PREFIX.sub("", value.strip().lower(), count=1)
    else:
        key = (
            value if isinstance(value, int | float) else None
        )  # a list or an object is no label (nor hashable)
    if key in TRUE_LABELS:
        return True
    if key in FALSE_LABELS:
        return False
    raise UserError(
        f"{where}: '{field}' must be 0 or 1 (or true/false, or full_compliance / full_refusal / partial_refusal), "
        f"got {value!r}"
    )


_NO_GROUP = "(none)"  # the group of rows that lack the --by field


def read_labelled(
    path: str | Path, response_field: str, label_field: str, prompt_field: str, by: str
) -> list[LabelledResponse]:
    """The file's labelled responses; a UserError naming the file, line and field for a bad row."""
    from alphaalign.data import rows_from_file

    path = Path(path)
    out = []
    for lineno, row in rows_from_file(path):
        where = f"{path}:{lineno}"
        response = _field(row, response_field)
        if not isinstance(response, str):
            raise UserError(f"{where}: no text in '{response_field}' (set --response-field)")
        label = _field(row, label_field)
        if label is None:
            raise UserError(f"{where}: no '{label_field}' (set --label-field)")
        prompt = _field(row, prompt_field)
        group = _field(row, by) if by else None
        out.append(
            LabelledResponse(
                prompt if isinstance(prompt, str) else "",
                response,
                _label(label, where, label_field),
                "" if group is None else str(group),
                row,
            )
        )
    if any(r.group for r in out):  # rows without the field form a group of their own
        out = [r if r.group else replace(r, group=_NO_GROUP) for r in out]
    return out


def agreement(rows: list[LabelledResponse], verdicts: list[bool | None]) -> tuple[dict[str, Agreement], int]:
    """Confusion counts overall ("all") and per group, and the number of rows the judge gave no verdict on. Every
    group is in the table, with n = 0 when the judge gave none of its rows a verdict."""
    table: dict[str, Agreement] = {"all": Agreement(), **{r.group: Agreement() for r in rows if r.group}}
    unparsed = 0
    for row, verdict in zip(rows, verdicts, strict=True):
        if verdict is None:
            unparsed += 1
            continue
        table["all"].add(row.refused, verdict)
        if row.group:
            table[row.group].add(row.refused, verdict)
    return table, unparsed


def format_table(table: dict[str, Agreement], judge: str, by: str) -> str:
    groups = ["all"] + sorted(g for g in table if g != "all")
    width = max(len(by or "group"), *(len(g) for g in groups))
    lines = [
        f"judge: {judge}",
        f"{by or 'group':<{width}}  {'n':>6} {'acc':>6} {'prec':>6} {'recall':>6} "
        f"{'F1':>6}   {'TP':>5} {'FP':>5} {'FN':>5} {'TN':>5}",
    ]
    for group in groups:
        m = table[group].metrics()
        rates = " ".join(
            f"{'—':>6}" if m[k] is None else f"{m[k]:>6.3f}"
            for k in ("accuracy", "precision", "recall", "f1")
        )
        lines.append(
            f"{group:<{width}}  {m['n']:>6} {rates}   {m['tp']:>5} {m['fp']:>5} {m['fn']:>5} {m['tn']:>5}"
        )
    return "\n".join(lines)


def run(args) -> int:
    """`alphaalign eval-detector`: judge every labelled response, print the table, write the errors."""
    from alphaalign.judges import judge_from_option, open_judge
    from alphaalign.outputs import check_output

    errors_path = check_output(args.errors, "--errors", folder=False) if args.errors else None
    json_path = check_output(args.json, "--json", folder=False) if args.json else None
    # the default groups by source where the rows have one; a field asked for by name must exist
    by = "source" if args.by is None else args.by
    rows = read_labelled(args.data, args.response_field, args.label_field, args.prompt_field, by)
    grouped = any(r.group for r in rows)
    if args.by and not grouped:
        raise UserError(f"--by: no row of {args.data} has a '{args.by}' field")
    if not grouped:
        by = ""
    spec = judge_from_option(args.judge)
    unprompted = sum(not r.prompt for r in rows)
    if unprompted and spec.type == "llm":  # the rubric asks about the request too
        print(
            f"warning: {unprompted} of {len(rows)} rows have no text in '{args.prompt_field}' (set --prompt-field): "
            "the llm judge sees their responses without the request",
            file=sys.stderr,
        )
    # a judge server's log goes beside the outputs, else to the judge's cache
    output = errors_path or json_path
    with open_judge(spec, "--judge", output.absolute().parent if output else None) as judge:
        # the final answer, as `eval` and `score` judge it: never the reasoning (tagged, or a model's <think>)
        answers = [parse_alphaalign(r.response).final for r in rows]
        judgements = judge.judge([r.prompt for r in rows], answers)
        described = judge.describe()
    verdicts = [j.refused for j in judgements]
    table, unparsed = agreement(rows, verdicts)
    print(format_table(table, described, by))
    if unparsed:
        print(f"{unparsed} of {len(rows)} replies could not be parsed and are left out of the table")
    if errors_path:
        errors_path.parent.mkdir(parents=True, exist_ok=True)
        with errors_path.open("w", encoding="utf-8") as f:
            for row, verdict in zip(rows, verdicts, strict=True):
                if verdict is not None and verdict != row.refused:
                    f.write(json.dumps({**row.row, "verdict": int(verdict)}, ensure_ascii=False) + "\n")
        print(f"misclassified rows: {errors_path}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "judge": described,
            "data": str(args.data),
            "by": by,
            "unparsed": unparsed,
            "groups": {g: a.metrics() for g, a in table.items()},
        }
        json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
