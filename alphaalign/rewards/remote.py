"""Client for an HTTP reward server (used by the `remote_rm` reward).

Request: ``POST <url>`` with ``Content-Type: application/json`` and, when a token is configured,
``Authorization: Bearer <token>``::

    {"prompts": ["<user request>", ...], "responses": ["<final answer>", ...]}

Reply: status 200 and ``{"scores": [<float>, ...]}``, one finite number per (prompt, response) pair, in
order. Larger batches are split into requests of at most ``batch_size`` pairs.

Each attempt may take ``timeout`` seconds of wall-clock time, however slowly the server sends
(`alphaalign.http_client`). Timeouts, connection errors, 5xx replies and malformed replies are retried
``retries`` times, sleeping ``backoff · 2^k`` seconds before retry k; a 4xx reply fails at once. So a request
ends within (retries + 1) · timeout plus the pauses. What
finally fails is a one-line `UserError` naming the endpoint. The token is read from the environment variable
named by ``token_env`` and never printed.
"""

from __future__ import annotations

import os
import time

import httpx

from alphaalign.errors import UserError
from alphaalign.http_client import (
    BadReply,
    DeadlineClient,
    Reply,
    RequestFailed,
    Retry,
    exponential_backoff,
    parse_reply,
    request,
    short,
)


class Scores(Reply):
    """The reply: finite numbers only (`Reply` refuses strings, booleans, null, inf and NaN)."""

    scores: list[float]


class RemoteScorer:
    def __init__(
        self,
        url: str,
        token_env: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
    ):
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
        client = DeadlineClient(headers=self.headers)
        try:
            for start in range(0, len(prompts), batch_size):
                end = start + batch_size
                scores += self._request(client, prompts[start:end], responses[start:end])
        finally:
            client.close()
        return scores

    def _request(self, client: DeadlineClient, prompts: list[str], responses: list[str]) -> list[float]:
        def check(reply: httpx.Response) -> list[float]:
            if 400 <= reply.status_code < 500:
                raise UserError(
                    f"remote_rm: {self.url} answered HTTP {reply.status_code}: {short(reply.text, 80)}"
                )
            return _parse_scores(reply, len(prompts))

        backoff = exponential_backoff(self.backoff)
        # each attempt has `timeout` seconds; the request, retries and pauses included, ends by this deadline
        deadline = (
            time.monotonic()
            + (self.retries + 1) * self.timeout
            + sum(map(backoff, range(1, self.retries + 1)))
        )
        try:
            return request(
                client,
                "POST",
                self.url,
                json={"prompts": prompts, "responses": responses},
                deadline=deadline,
                retries=self.retries,
                backoff=backoff,
                attempt_timeout=self.timeout,
                check=check,
            )
        except RequestFailed as exc:
            raise UserError(f"remote_rm: {self.url}: {exc.last} (after {exc.attempts} attempts)") from None


def _parse_scores(reply: httpx.Response, expected: int) -> list[float]:
    if reply.status_code != 200:
        raise Retry(f"HTTP {reply.status_code}: {short(reply.text, 80)}")
    try:
        scores = parse_reply(reply, Scores).scores
    except BadReply as exc:
        raise Retry(f'the reply is not of the form {{"scores": [<finite number>, ...]}}: {exc}') from None
    if len(scores) != expected:
        raise Retry(f"expected {expected} scores, got {len(scores)}")
    return scores
