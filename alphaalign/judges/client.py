"""A small client for OpenAI-compatible chat endpoints (`POST {url}/chat/completions`), for LLM judges.

Each attempt has a hard wall-clock deadline (`asyncio.wait_for` around the whole exchange: a server that
trickles bytes cannot stretch it, unlike per-read socket timeouts), each request a time budget that its
retries share, and at most `concurrency` requests are in flight. Connection errors, timeouts, 5xx, 429 and
replies that are not chat-completion JSON are retried with exponential backoff; another 4xx (a wrong key,
model or URL) fails at once. When one request has used up its budget the whole batch stops: a dead server
ends the run within about one budget, not one budget per queued request. Kept self-contained on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
from pydantic import Field

from alphaalign.errors import UserError
from alphaalign.http_client import BadReply, Reply, exponential_backoff, parse_reply, short

MAX_BACKOFF_S = 10.0
_backoff = exponential_backoff(0.5, MAX_BACKOFF_S)


class JudgeError(UserError):
    """A judge endpoint that is down, too slow, refuses the request, or answers something unusable."""


class _Retry(Exception):
    def __init__(self, message: str, after: float | None = None):
        super().__init__(message)
        self.after = after  # seconds the server asked us to wait (Retry-After), else the backoff's


def _retry_after(response: httpx.Response) -> float | None:
    """A Retry-After header in seconds (a hosted API's rate limit says when to come back); None for a date or none."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


class _RenameMaxTokens(Exception):
    """The endpoint wants the reply's token limit as `max_completion_tokens` (OpenAI's reasoning models)."""


class _NoSystemTurn(Exception):
    """The model's chat template has no system role (Gemma's "System role not supported"; Mistral's and Llama-2's
    "roles must alternate")."""


_NO_SYSTEM = ("System role not supported", "roles must alternate")


def without_system_turn(messages: list[dict]) -> list[dict]:
    """The system turn's text put before the first user turn's, for a model whose template has no system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    return [{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest]


class _Message(Reply):
    # null when the judge declined to answer (OpenAI's `refusal` then says why) or spent its max_tokens thinking
    # (a vLLM reasoning parser keeps the thoughts apart): a reply, if an unusable one, not a broken server
    content: str | None = None
    refusal: str | None = None

    @property
    def text(self) -> str:
        return self.content if self.content is not None else (self.refusal or "")


class _Choice(Reply):
    message: _Message


class ChatReply(Reply):
    """An OpenAI chat completion: the first choice's message text is the judge's answer."""

    choices: list[_Choice] = Field(min_length=1)


class ChatClient:
    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None,
        *,
        concurrency: int,
        request_timeout: float,
        time_budget: float,
        retries: int,
        temperature: float,
        max_tokens: int,
    ):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency = model, concurrency
        self.request_timeout, self.time_budget, self.retries = request_timeout, time_budget, retries
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        self.system_turn = True  # until the model's template refuses one
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.requests = 0  # attempts sent, for the run's summary

    def complete_all(self, conversations: list[list[dict]], done: Callable[[int, str], None]) -> None:
        """Ask every conversation; `done(i, reply_text)` is called as each reply arrives (so finished work is
        kept when a later request fails). Raises `JudgeError` on the first request that cannot be answered."""
        if not conversations:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self._all(conversations, done))
            return
        errors: list[BaseException] = []  # called from inside an event loop: run ours in a thread

        def run():
            try:
                asyncio.run(self._all(conversations, done))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

    async def _all(self, conversations, done) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(headers=self.headers, limits=limits, timeout=None) as http:

            async def one(i: int, messages: list[dict]) -> None:
                async with gate:
                    done(i, await self._ask(http, messages))

            tasks = [asyncio.ensure_future(one(i, m)) for i, m in enumerate(conversations)]
            try:
                await asyncio.gather(*tasks)
            finally:  # the first failure stops the rest
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, http: httpx.AsyncClient, messages: list[dict]) -> str:
        deadline = time.monotonic() + self.time_budget
        attempts, last = 0, "no attempt"
        while attempts <= self.retries and (remaining := deadline - time.monotonic()) > 0:
            attempts, after = attempts + 1, None
            self.requests += 1
            limit = min(self.request_timeout, remaining)
            turns = messages if self.system_turn else without_system_turn(messages)
            payload = {"model": self.model, "messages": turns, **self.sampling}
            try:
                response = await asyncio.wait_for(http.post(self.endpoint, json=payload), limit)
                return self._content(response, payload)
            except _RenameMaxTokens:  # for every request from now on; this one again at once
                if "max_tokens" in self.sampling:  # not yet renamed after another request's reply
                    self.sampling["max_completion_tokens"] = self.sampling.pop("max_tokens")
                attempts -= 1
                continue
            except _NoSystemTurn:  # likewise
                self.system_turn = False
                attempts -= 1
                continue
            except asyncio.TimeoutError:
                last = f"no complete reply within {limit:g} s"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except _Retry as exc:
                last, after = str(exc), exc.after
            pause = min(_backoff(attempts) if after is None else after, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)
        raise JudgeError(
            f"judge {self.endpoint}: {attempts} failed attempt(s) within time_budget={self.time_budget:g} s "
            f"(request_timeout={self.request_timeout:g} s, retries={self.retries}), the last: {last}"
        )

    def _content(self, response: httpx.Response, payload: dict) -> str:
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Retry(f"HTTP {status}: {short(response.text, 200)}", _retry_after(response))
        if status == 400 and "max_tokens" in payload and "max_completion_tokens" in response.text:
            raise _RenameMaxTokens
        sent_system = payload["messages"][0]["role"] == "system"
        if status == 400 and sent_system and any(reason in response.text for reason in _NO_SYSTEM):
            raise _NoSystemTurn
        if status >= 400:
            raise JudgeError(f"judge {self.endpoint}: HTTP {status}: {short(response.text, 200)}")
        try:
            return parse_reply(response, ChatReply).choices[0].message.text
        except BadReply as exc:
            raise _Retry(f"HTTP {status} but not chat-completion JSON: {exc}") from None
