"""Secrets are masked by what they are, never by a substring of a hyperparameter's name.

A secret is: the string value of a key named like a credential (whole words: `token`, `api_key`, `secret`,
`password`, `credential`, `authorization`, ...; `max_new_tokens` is not one, nor `token_env`, which names an
environment variable), an HTTP authorization value (`Bearer ...`, `Basic ...`), or the password of a
`scheme://user:password@host` URL. `mask_tree` masks recipe data (recipe.resolved.yaml, the wandb config),
`mask_text` any line the run prints or writes (errors that echo an override, a URL in a message), and
`masked_argv` the command line wandb records.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any

MASK = "***"

SECRET_WORDS = {
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "apikey",
    "credential",
    "credentials",
    "authorization",
    "cookie",
    "bearer",
}
SECRET_PAIRS = {
    ("api", "key"),
    ("access", "key"),
    ("private", "key"),
    ("secret", "key"),
    ("client", "secret"),
}
# a key ending in one of these names where a secret is, not the secret (`token_env`, `api_key_file`)
POINTER_WORDS = {"env", "var", "file", "path", "name", "field", "tag", "type"}


def key_words(key: str) -> list[str]:
    """`X-Api-Key` -> [x, api, key]; `hfToken` -> [hf, token]; `max_new_tokens` -> [max, new, tokens]."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(key))
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    words = key_words(key)
    if not words or words[-1] in POINTER_WORDS:
        return False
    return any(w in SECRET_WORDS for w in words) or any(
        pair in SECRET_PAIRS for pair in zip(words, words[1:], strict=False)
    )


# The URL, query and key-value patterns start only where a run of their characters starts, and take runs whole
# (possessive): a pattern that may start anywhere inside a long run searches in time quadratic in its length.
_URL_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9+.-])([0-9+.-]*+[A-Za-z][A-Za-z0-9+.-]*+://[^\s/:@'\"]*:)([^\s/@'\"]+)(@)"
)
_CREDENTIAL = r"[A-Za-z0-9._~+/=-]"
# `Bearer <anything>`; `Basic`, `Token`, `Digest` only before something that is not a plain word (prose)
_AUTH_VALUE = re.compile(
    rf"\b(?:(Bearer)(\s+){_CREDENTIAL}+|(Basic|Token|Digest)(\s+)(?={_CREDENTIAL}*[0-9._~+/=-]){_CREDENTIAL}{{6,}})",
    re.IGNORECASE,
)
_QUERY_PARAM = re.compile(r"((?<![^=&#\s])[^=&#\s?]*+\?|&)([^=&#\s]++)=([^&#\s'\"]+)")
# `key=value`, `key: value`, `"key": "value"` (a quoted value whole; a bare one with its auth scheme)
_KEY_VALUE = re.compile(
    r"""(?<![\w.-])(?P<pre>(?:(?![A-Za-z_])[\w.-])*+)(?P<key>[A-Za-z_][\w.-]*+)(?P<sep>["']?\s*[=:]\s*)"""
    r"""(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>(?:(?:Bearer|Basic|Token|Digest)\s+)?[^\s,;{}\[\]'"&]+))""",
    re.IGNORECASE,
)


def mask_in_string(value: str) -> str:
    """A string value with URL passwords, credential URL parameters and authorization values masked."""
    value = _URL_PASSWORD.sub(rf"\1{MASK}\3", value)
    value = _QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if is_secret_key(m[2]) else m[0], value)
    return _AUTH_VALUE.sub(lambda m: f"{m[1] or m[3]}{m[2] or m[4]}{MASK}", value)


def mask_text(text: str) -> str:
    """A line to print or write: `mask_in_string`, and credential-named `key=value` / `key: value` pairs."""
    text = mask_in_string(text)

    def pair(m: re.Match) -> str:
        value = m["dq"] if m["dq"] is not None else m["sq"] if m["sq"] is not None else m["bare"]
        if value in ("", MASK) or not is_secret_key(m["key"].rsplit(".", 1)[-1]):
            return m[0]
        quote = '"' if m["dq"] is not None else "'" if m["sq"] is not None else ""
        return f"{m['pre']}{m['key']}{m['sep']}{quote}{MASK}{quote}"

    return _KEY_VALUE.sub(pair, text)


def mask_tree(node: Any) -> Any:
    """Recipe data with every secret masked: the non-empty strings under credential-named keys, and the
    secrets inside any string (`mask_in_string`)."""
    if isinstance(node, dict):
        return {
            k: MASK if is_secret_key(k) and isinstance(v, str) and v else mask_tree(v)
            for k, v in node.items()
        }
    if isinstance(node, list | tuple):
        return [mask_tree(v) for v in node]
    if isinstance(node, str):
        return mask_in_string(node)
    return node


def mask_override(override: str) -> str:
    """A `dotted.key=value` command-line override as it may be shown: its value masked when the key is a
    credential, the secrets inside the value (a YAML mapping, a URL) masked otherwise."""
    key, sep, value = override.partition("=")
    if sep and is_secret_key(key.rsplit(".", 1)[-1]) and value:
        return f"{key}={MASK}"
    return mask_text(override)


@contextlib.contextmanager
def masked_argv():
    """`sys.argv` with every argument masked while the block runs (wandb records the command line)."""
    saved = sys.argv
    masked = [mask_override(arg) for arg in saved]
    for i, arg in enumerate(saved[:-1]):  # `--api-key VALUE`: the value follows its flag
        if arg.startswith("-") and "=" not in arg and is_secret_key(arg.lstrip("-")):
            masked[i + 1] = MASK
    sys.argv = masked
    try:
        yield
    finally:
        sys.argv = saved
