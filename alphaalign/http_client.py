"""The one HTTP client for the servers the project talks to (vLLM generation, weight sync and health checks;
remote reward servers): every request ends by a wall-clock deadline, retries included.

A per-read timeout only bounds the wait for the next byte, so a server that keeps the connection open and
trickles a byte a second never trips it. Here every socket operation of a request (connect, TLS, each read
and write, waiting for a pooled connection) waits at most until the request's deadline, and fails once it
has passed: an attempt ends at its deadline whatever the server sends, headers or body.

`request()` retries connection errors, timeouts, 5xx replies and replies the caller's `check` rejects with
`Retry`, at most `retries` times, sleeping `backoff(k)` seconds before retry k (cut short by the deadline;
`exponential_backoff` makes the usual one), and raises `RequestFailed` with the number of attempts and the
last failure.

Replies are untrusted: `parse_reply` checks a body against a pydantic model of the reply's shape (`Reply`:
strict types, finite floats, unknown fields ignored) and says in one line what is wrong with it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpcore
import httpx
import pydantic

from alphaalign import parsing

_current = threading.local()  # the deadline (time.monotonic()) of the request this thread is sending


def _clamped(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout` cut to what is left of this thread's request deadline; `error` once it has passed."""
    deadline = getattr(_current, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clamped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clamped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        timeout = _clamped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self):
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        timeout = _clamped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        timeout = _clamped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class DeadlineClient:
    """An httpx client whose requests each end by a deadline; safe to share between threads (each thread's
    request has its own deadline). Proxies from the environment are not used: the servers are addressed
    directly, and a proxy's connection would escape the deadline."""

    def __init__(self, headers: dict[str, str] | None = None):
        transport = httpx.HTTPTransport()
        # httpx builds its pool without a network-backend argument; this one is httpx's default pool on
        # the deadline-enforcing backend (httpx still maps requests, replies and errors)
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_DeadlineBackend(),
        )
        self.http = httpx.Client(transport=transport, headers=headers, trust_env=False)

    def send(self, method: str, url: str, *, json: Any = None, deadline: float) -> httpx.Response:
        """One attempt, the whole reply read, ending by `deadline` (time.monotonic()) or raising
        httpx.TimeoutException."""
        _current.deadline = deadline
        try:
            return self.http.request(method, url, json=json, timeout=max(deadline - time.monotonic(), 1e-3))
        finally:
            _current.deadline = None

    def close(self) -> None:
        self.http.close()


class Retry(Exception):
    """Raised by a reply check: this reply is unusable, try again."""


class RequestFailed(Exception):
    def __init__(self, attempts: int, last: str):
        super().__init__(last)
        self.attempts, self.last = attempts, last


def short(text: str, limit: int = 300) -> str:
    """A reply body on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def exponential_backoff(first: float, cap: float = math.inf) -> Callable[[int], float]:
    """The pause before retry k = 1, 2, ...: `first` · 2^(k-1) seconds, at most `cap`."""
    return lambda retry: min(first * 2 ** (retry - 1), cap)


def request(
    client: DeadlineClient,
    method: str,
    url: str,
    *,
    json: Any = None,
    deadline: float,
    retries: int,
    backoff: Callable[[int], float],
    attempt_timeout: float | None = None,
    check: Callable[[httpx.Response], Any] = lambda response: response,
    on_failure: Callable[[str], None] | None = None,
) -> Any:
    """`check(reply)` of the first usable reply, trying at most `retries` + 1 times, all by `deadline`; each
    attempt also ends `attempt_timeout` seconds after it starts. A 5xx reply, a connection error, a timeout
    or a `Retry` from `check` is a failure (reported to `on_failure`); anything else `check` raises ends the
    request at once (a 4xx reply, say)."""
    attempts, last = 0, "the deadline had passed before the first attempt"
    while attempts <= retries:
        if attempts:
            pause = min(backoff(attempts), deadline - time.monotonic())
            if pause > 0:
                time.sleep(pause)
        start = time.monotonic()
        if start >= deadline:
            break
        end = deadline if attempt_timeout is None else min(deadline, start + attempt_timeout)
        attempts += 1
        try:
            reply = client.send(method, url, json=json, deadline=end)
        except httpx.TimeoutException as exc:
            last = f"no complete reply within {round(end - start, 1):g} s ({type(exc).__name__})"
        except httpx.HTTPError as exc:  # refused, reset, protocol error
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if reply.status_code < 500:
                try:
                    return check(reply)
                except Retry as exc:
                    last = str(exc)
            else:
                last = f"HTTP {reply.status_code}: {short(reply.text)}"
        if on_failure is not None:
            on_failure(last)
    raise RequestFailed(attempts, last)


class Reply(pydantic.BaseModel):
    """Base of the models of server replies: no type coercion (a token id "5" or 5.0 is not an id), no inf
    or NaN, extra fields ignored (servers add fields between versions)."""

    model_config = pydantic.ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    def retry_reason(self) -> str | None:
        """Why a well-formed reply says "not now" (the request is retried), or None."""
        return None


class BadReply(ValueError):
    """A reply body that is not JSON or not of the expected shape; the message is one line."""


R = TypeVar("R", bound=Reply)


def parse_reply(response: httpx.Response, model: type[R]) -> R:
    """The reply body as `model`, or `BadReply` saying which field is wrong (dotted path) and why."""
    try:
        body = parsing.loads(response.content)
    except parsing.UnusableJSON as exc:
        raise BadReply(f"the reply's JSON: {exc.msg}") from None
    except ValueError:  # HTML from a proxy, plain text, an empty body
        kind = response.headers.get("content-type", "no content type")
        raise BadReply(
            f"the reply is not JSON ({kind}): {short(response.text, 80) or 'empty body'}"
        ) from None
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise BadReply(describe(exc)) from None


def describe(exc: pydantic.ValidationError, whole: str = "the reply") -> str:
    """A validation error in one line: the first bad field (or `whole`), its value, and how many more there are."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or whole
    if first["type"] == "value_error":  # a validator's own message, which says what is wrong
        return f"{where}: {first['ctx']['error']}" if first["loc"] else str(first["ctx"]["error"])
    value = short(repr(first.get("input")), 60)
    more = exc.error_count() - 1
    return f"{where}: {first['msg'].lower()} (got {value})" + (
        f", and {more} more problem(s)" if more else ""
    )
