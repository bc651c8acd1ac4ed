"""Accuracy of ``is_refusal`` on a labelled JSONL set (``alphaalign/eval/refusal_labels.jsonl``).

Each line is ``{"text": str, "refusal": bool, "kind": str}``; refusals are the positive class. The counting is
`alphaalign eval-detector`'s (`alphaalign.judges.agreement`), grouped by ``kind``.
"""

from __future__ import annotations

from pathlib import Path

from alphaalign.judges.agreement import agreement, read_labelled
from alphaalign.rewards.verifiers import is_refusal


def evaluate_refusal_detector(path: str | Path) -> dict:
    """n, accuracy, precision, recall, f1 (None where undefined) and per-kind accuracy of ``is_refusal``."""
    rows = read_labelled(path, response_field="text", label_field="refusal", prompt_field="prompt", by="kind")
    table, _ = agreement(rows, [is_refusal(row.response) for row in rows])
    overall = table.pop("all").metrics()
    return {
        **{key: overall[key] for key in ("n", "accuracy", "precision", "recall", "f1")},
        "per_kind": {kind: counts.metrics()["accuracy"] for kind, counts in sorted(table.items())},
    }
