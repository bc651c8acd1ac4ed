"""Client for an HTTP reward server (used by the `remote_rm` reward).

Request: ``POST <url>`` with ``Content-Type: application/json`` and, when a token is configured,
``Authorization: Bearer <token>``::

    {"prompts": ["<user request>", ...], "responses": ["<final answer>", ...]}

Reply: status 200 and ``{"scores": [<float>, ...]}``, one finite number per (prompt, response) pair, in
order. Larger batches are split into requests of at most ``batch_size`` pairs.

Each request may take ``timeout`` seconds. Timeouts, connection errors, 5xx replies and malformed replies are
retried ``retries`` times, sleeping ``backoff · 2^k`` seconds before retry k; a 4xx reply fails at once. What
finally fails is a one-line `UserError` naming the endpoint. The token is read from the environment variable
named by ``token_env`` and never printed.
"""

from __future__ import annotations

import math
import os
import time

import httpx

from alphaalign.errors import UserError


class _BadReply(Exception):
    pass


class RemoteScorer:
    def __init__(
        self, url: str, token_env: str | None = None, timeout: float = 60.0, retries: int = 3,
        backoff: float = 1.0,
    ):  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise UserError(f"remote_rm: url {url!r} is not an http(s):// URL")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = {}
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise UserError(
                    f"remote_rm: environment variable {token_env} (the server's token) is not set"
                )
            self.headers["Authorization"] = f"Bearer {token}"

    def score_all(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[float]:
        """Scores for all pairs, in requests of at most ``batch_size`` pairs."""
        scores: list[float] = []
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for start in range(0, len(prompts), batch_size):
                end = start + batch_size
                scores += self._request(client, prompts[start:end], responses[start:end])
        return scores

    def _request(self, client: httpx.Client, prompts: list[str], responses: list[str]) -> list[float]:
        payload = {"prompts": prompts, "responses": responses}
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = client.post(self.url, json=payload)
            except httpx.TimeoutException:
                problem = f"no reply within {self.timeout:g} s"
                continue
            except httpx.TransportError as exc:
                problem = f"cannot connect ({exc.__class__.__name__})"
                continue
            if 400 <= reply.status_code < 500:
                raise UserError(
                    f"remote_rm: {self.url} answered HTTP {reply.status_code}: {_snippet(reply.text)}"
                )
            try:
                return _parse_scores(reply, len(prompts))
            except _BadReply as exc:
                problem = str(exc)
        raise UserError(f"remote_rm: {self.url}: {problem} (after {self.retries + 1} attempts)")


def _parse_scores(reply: httpx.Response, expected: int) -> list[float]:
    if reply.status_code != 200:
        raise _BadReply(f"HTTP {reply.status_code}: {_snippet(reply.text)}")
    try:
        scores = reply.json()["scores"]
    except (ValueError, KeyError, TypeError):
        raise _BadReply(
            f'reply is not JSON of the form {{"scores": [...]}}: {_snippet(reply.text)}'
        ) from None
    if not isinstance(scores, list) or len(scores) != expected:
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise _BadReply(f"expected {expected} scores, got {got}")
    if not all(isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise _BadReply("scores must be finite numbers")
    return [float(s) for s in scores]


def _snippet(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")
