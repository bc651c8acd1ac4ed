"""Rollouts from vLLM's OpenAI-compatible server(s), behind the `RolloutEngine` interface.

Prompts go as token ids to `/v1/completions` with `n`, `return_token_ids` and `logprobs: 0`; the server
must run with `--logprobs-mode processed_logprobs` so that the log-probs are log softmax(logits / T), the
quantity the trainer computes (`alphaalign serve RECIPE` starts it that way). Each prompt is one request
with its own seed; with several servers the prompts are dealt round-robin, and requests run concurrently.

Every request is bounded by `rollout.timeout` seconds of wall-clock time, retries included, however slowly
the server sends (`alphaalign.http_client`): connection failures, timeouts and 5xx answers are retried with exponential backoff (`rollout.retries` times), then a `ServerError` names the
endpoint and the last failure in one line. The budget runs from the start of the first call that failed
since the server's last answer, not from each call: once that budget is spent, every further call fails at
once, so a dead server stops the run within `rollout.timeout` however many calls were waiting on it. A
server that answers again within the budget is used again. Weight sync (`weight_sync.py`) and generation
take the same lock, so each batch is sampled by exactly one policy version, which is stamped on the rollouts.

Replies are checked field by field against models of their shape (`ModelList`, `Completions`, ...): a body
that is not JSON (an HTML error page from a proxy), an empty model list, a token id that is not an integer
or lies outside the policy's vocabulary, a missing or non-finite log-prob ends in one `ServerError` naming
the endpoint and the field, at once (a server that answers nonsense is not retried).
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, TypeVar

import httpx
from pydantic import Field

from alphaalign import parsing
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
from alphaalign.rollout.base import Rollouts, SamplingParams
from alphaalign.rollout.vllm_auth import auth_headers, env_token

if TYPE_CHECKING:
    from alphaalign.rollout.weight_sync import WeightSync

FINISH_REASONS = {"stop": "stop", "length": "length"}
MAX_REQUESTS_IN_FLIGHT = 64  # per engine; each server batches the requests it holds
MAX_BACKOFF_S = 10.0  # longest pause between attempts: a server that comes back is noticed within 10 s
_backoff = exponential_backoff(0.5, MAX_BACKOFF_S)


class ServerError(UserError):
    """A rollout server that is down, too slow, or answers something unusable."""


class _Model(Reply):
    id: str = Field(min_length=1)


class ModelList(Reply):
    """`GET /v1/models`: the served model comes first."""

    data: list[_Model] = Field(min_length=1)


class _Logprobs(Reply):
    token_logprobs: list[Annotated[float, Field(le=0.0)]]  # log-probs: finite (Reply) and at most 0


class _Choice(Reply):
    index: int = Field(ge=0)
    token_ids: list[Annotated[int, Field(ge=0)]]
    logprobs: _Logprobs
    finish_reason: str


class Completions(Reply):
    """`POST /v1/completions` with `return_token_ids` and `logprobs: 0`."""

    choices: list[_Choice]


class _ReloadResult(Reply):  # what vllm_worker_ext.WeightReloader.alphaalign_reload returns
    seconds: float = Field(ge=0.0)
    lm_heads_repacked: int = Field(ge=0)


class ReloadReply(Reply):
    """`POST /collective_rpc` of `alphaalign_reload`: one result per worker, so a 200 from something that is
    not the server (a proxy page) cannot pass for a reload."""

    results: list[_ReloadResult] = Field(min_length=1)


class PrefixCacheReset(Reply):
    """`POST /reset_prefix_cache`; false while blocks are still held (vLLM says: retry)."""

    success: bool

    def retry_reason(self) -> str | None:
        return None if self.success else "the server did not reset its prefix cache (success: false)"


R = TypeVar("R", bound=Reply)


class ServerClient:
    """JSON over HTTP to one server, each call bounded by a wall-clock budget and a number of retries
    (`alphaalign.http_client`: the budget holds however slowly the server sends).

    The budget counts from the start of the first call that failed since the last answer (`failing_since`),
    so calls queued behind a dead server do not each wait the whole budget again."""

    def __init__(self, url: str, timeout: float, retries: int, token: str | None = None):
        """`token`: the server's secret (vllm_auth.py); default: the ALPHAALIGN_VLLM_TOKEN variable."""
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.http = DeadlineClient(headers=auth_headers(token or env_token()))
        # when the first call that failed since the server's last answer began; None while it answers
        self.failing_since: float | None = None
        self.last_failure = ""

    def call(
        self,
        method: str,
        path: str,
        payload: dict | None = None,
        timeout: float | None = None,
        reply: type[R] | None = None,
    ) -> R | dict:
        """The reply parsed as `reply` (a `ServerError` naming the field when it does not fit), or without
        `reply`, its JSON as it is (plain text under 'text'), for routes whose body is not read."""
        budget = self.timeout if timeout is None else timeout
        endpoint = self.url + path
        start = time.monotonic() if self.failing_since is None else self.failing_since

        def check(response):
            self.failing_since = None  # it answers
            if response.status_code >= 400:
                raise ServerError(f"{endpoint}: HTTP {response.status_code}: {short(response.text)}")
            if reply is None:
                return _json(response)
            try:
                parsed = parse_reply(response, reply)
            except BadReply as exc:
                raise ServerError(f"{endpoint}: unusable reply: {exc}") from None
            if (reason := parsed.retry_reason()) is not None:
                raise Retry(reason)
            return parsed

        def failed(failure: str) -> None:
            self.last_failure = failure
            if (
                self.failing_since is None
            ):  # the budget of the call that saw the first failure is the shared one
                self.failing_since = start

        try:
            return request(
                self.http,
                method,
                endpoint,
                json=payload,
                deadline=start + budget,
                retries=self.retries,
                backoff=_backoff,
                check=check,
                on_failure=failed,
            )
        except RequestFailed as exc:
            if exc.attempts == 0:
                raise ServerError(
                    f"{endpoint}: failing for more than rollout.timeout={budget:g} s, the last: {self.last_failure}"
                ) from None
            raise ServerError(
                f"{endpoint}: {exc.attempts} failed attempt(s) within rollout.timeout={budget:g} s, "
                f"the last: {exc.last}"
            ) from None

    def reset(self) -> None:
        """Forget past failures (the server was replaced)."""
        self.failing_since = None

    def close(self) -> None:
        self.http.close()


def _json(response: httpx.Response) -> dict:
    """The reply's JSON; some routes answer plain text, kept under 'text'."""
    try:
        return parsing.loads(response.content) if response.content else {}
    except ValueError:
        return {"text": response.text}


def parse_completions(
    reply: Completions, n: int, endpoint: str, vocab_size: int | None = None
) -> list[tuple[list, list, str]]:
    """(completion ids, log-probs, finish reason) of the `n` choices for one prompt, in index order; every
    id below `vocab_size` (the policy's embedding rows) when given."""
    choices = sorted(reply.choices, key=lambda c: c.index)
    if [c.index for c in choices] != list(range(n)):
        raise ServerError(
            f"{endpoint}: expected {n} completions indexed 0..{n - 1}, got indices "
            f"{short(str([c.index for c in choices]), 80)}"
        )
    for c in choices:
        if c.finish_reason not in FINISH_REASONS:
            raise ServerError(f"{endpoint}: choices.{c.index}: finish_reason {c.finish_reason!r}")
        if len(c.token_ids) != len(c.logprobs.token_logprobs):
            raise ServerError(
                f"{endpoint}: choices.{c.index}: {len(c.token_ids)} completion tokens but "
                f"{len(c.logprobs.token_logprobs)} log-probs"
            )
        if vocab_size is not None and c.token_ids and max(c.token_ids) >= vocab_size:
            raise ServerError(
                f"{endpoint}: choices.{c.index}.token_ids: token id {max(c.token_ids)} is outside the "
                f"policy's vocabulary of {vocab_size} (is the server serving another model?)"
            )
    return [
        (list(c.token_ids), list(c.logprobs.token_logprobs), FINISH_REASONS[c.finish_reason]) for c in choices
    ]


class VLLMServerEngine:
    """Generation on one or more vLLM servers; `sync` pushes the trainer's weights to them (None: the
    servers' own weights are used as they are, e.g. to evaluate a served model)."""

    def __init__(
        self,
        servers: list[str],
        sync: WeightSync | None,
        timeout: float,
        retries: int,
        seed: int = 0,
        rank: int = 0,
        token: str | None = None,
        vocab_size: int | None = None,
    ):
        """`rank`: this trainer process's rank; its prompts are numbered after those of the ranks before it,
        so every process samples with its own seeds. `token`: the servers' secret (default: from the
        environment, see vllm_auth.py). `vocab_size`: the policy's, which every generated token id must be
        below."""
        self.clients = [ServerClient(url, timeout, retries, token) for url in servers]
        self.sync, self.seed, self.rank, self.vocab_size = sync, seed, rank, vocab_size
        self.version = 0
        self._calls_at_version = 0
        self._lock = threading.Lock()
        self.check_health()
        models = self.clients[0].call("GET", "/v1/models", timeout=min(timeout, 30.0), reply=ModelList)
        self.base_model = models.data[0].id
        if sync is not None:
            sync.attach(self.clients)

    def check_health(self) -> None:
        for client in self.clients:
            client.call("GET", "/health", timeout=min(client.timeout, 30.0))

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollouts:
        """One request per prompt, each with its own seed (one seed shared by the prompts of a request would
        correlate their samples), dealt round-robin to the servers and sent concurrently."""
        with self._lock:
            version, call = self.version, self._calls_at_version
            self._calls_at_version += 1
            model = (self.sync.model_name if self.sync is not None else None) or self.base_model
            first = self.rank * len(prompts)
            jobs = [
                (self.clients[i % len(self.clients)], prompt, self._seed(version, call, first + i))
                for i, prompt in enumerate(prompts)
            ]
            # a rank can have no prompts (fewer held-out prompts than ranks): the pool still needs one worker
            with ThreadPoolExecutor(max(1, min(len(jobs), MAX_REQUESTS_IN_FLIGHT))) as pool:
                groups = list(pool.map(lambda job: self._complete(*job, n, sampling, model), jobs))
        out = Rollouts([], [], [], [], version)
        for prompt, group in zip(prompts, groups, strict=True):
            for ids, logprobs, reason in group:
                out.prompt_ids.append(list(prompt))
                out.completion_ids.append(ids)
                out.logprobs.append(logprobs)
                out.finish_reasons.append(reason)
        return out

    def _seed(self, version: int, call: int, prompt: int) -> int:
        """A request's sampling seed: a pure function of the run seed, policy version, call and prompt number."""
        key = f"{self.seed}/{version}/{call}/{prompt}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") % 2**31

    def _complete(self, client, prompt, seed, n, sampling: SamplingParams, model: str):
        payload = {
            "model": model,
            "prompt": prompt,
            "n": n,
            "max_tokens": sampling.max_new_tokens,
            "min_tokens": sampling.min_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "logprobs": 0,
            "return_token_ids": True,
            "seed": seed,
        }
        reply = client.call("POST", "/v1/completions", payload, reply=Completions)
        return parse_completions(reply, n, client.url + "/v1/completions", self.vocab_size)

    def update_weights(self, version: int) -> float:
        """Push the trainer's weights to every server (after in-flight generation ends); returns seconds."""
        with self._lock:
            start = time.perf_counter()
            if self.sync is not None:
                self.sync.push(version)
            self.version, self._calls_at_version = version, 0
            return time.perf_counter() - start

    def close(self) -> None:
        for client in self.clients:
            client.close()
