"""Judge replies on disk, keyed by a hash of (judge identity, prompt, response), so a re-run asks nothing again.

The identity holds everything that changes a reply: the judge model, the rubric and its version, and the
sampling settings; not the URL, so the same model served elsewhere (or on another port) hits the cache. One
SQLite file per cache folder; several processes may share it (SQLite locks it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from alphaalign.errors import UserError


def default_dir() -> Path:
    root = os.environ.get("ALPHAALIGN_CACHE")
    return Path(root) / "judges" if root else Path.home() / ".cache" / "alphaalign" / "judges"


def key(identity: dict, prompt: str, response: str) -> str:
    text = json.dumps([identity, prompt, response], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ReplyCache:
    def __init__(self, folder: Path, where: str):
        folder = Path(folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(folder / "replies.sqlite", timeout=60, check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"{where}: cannot use the judge cache in {folder} ({exc})") from None

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite's bound-parameter limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk))
        return found

    def put(self, key: str, reply: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, reply))

    def close(self) -> None:
        self.db.close()
