"""Accuracy of ``is_refusal`` on a labelled JSONL set (``alphaalign/eval/refusal_labels.jsonl``).

Each line is ``{"text": str, "refusal": bool, "kind": str}``; refusals are the positive class.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from alphaalign.rewards.verifiers import is_refusal


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def evaluate_refusal_detector(path: str | Path) -> dict:
    """Return n, accuracy, precision, recall, f1 and per-kind accuracy of ``is_refusal`` on ``path``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        predicted, truth = is_refusal(row["text"]), bool(row["refusal"])
        counts[("t" if predicted == truth else "f") + ("p" if predicted else "n")] += 1
        per_kind[row["kind"]][0] += predicted == truth
        per_kind[row["kind"]][1] += 1
    precision = _ratio(counts["tp"], counts["tp"] + counts["fp"])
    recall = _ratio(counts["tp"], counts["tp"] + counts["fn"])
    return {
        "n": len(rows),
        "accuracy": _ratio(counts["tp"] + counts["tn"], len(rows)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "per_kind": {kind: _ratio(right, n) for kind, (right, n) in sorted(per_kind.items())},
    }
