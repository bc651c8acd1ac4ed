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
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from alphaalign.errors import UserError
from alphaalign.http_client import DeadlineClient, RequestFailed, request, short
from alphaalign.rollout.base import Rollouts, SamplingParams
from alphaalign.rollout.vllm_auth import auth_headers, env_token

FINISH_REASONS = {"stop": "stop", "length": "length"}
MAX_REQUESTS_IN_FLIGHT = 64  # per engine; each server batches the requests it holds
MAX_BACKOFF_S = 10.0  # longest pause between attempts: a server that comes back is noticed within 10 s


class ServerError(UserError):
    """A rollout server that is down, too slow, or answers something unusable."""


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

    def call(self, method: str, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        budget = self.timeout if timeout is None else timeout
        endpoint = self.url + path
        start = time.monotonic() if self.failing_since is None else self.failing_since

        def check(response):
            self.failing_since = None  # it answers
            if response.status_code >= 400:
                raise ServerError(f"{endpoint}: HTTP {response.status_code}: {short(response.text)}")
            return _json(response)

        def failed(failure: str) -> None:
            self.last_failure = failure
            if (
                self.failing_since is None
            ):  # the budget of the call that saw the first failure is the shared one
                self.failing_since = start

        try:
            return request(self.http, method, endpoint, json=payload, deadline=start + budget,
                           retries=self.retries, backoff=_backoff, check=check, on_failure=failed)  # fmt: skip
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


def _backoff(retry: int) -> float:
    return min(0.5 * 2 ** (retry - 1), MAX_BACKOFF_S)


def _json(response: httpx.Response) -> dict:
    """The reply's JSON; some routes answer plain text, kept under 'text'."""
    try:
        return response.json() if response.content else {}
    except ValueError:
        return {"text": response.text}


def parse_completions(reply: dict, n: int, endpoint: str) -> list[tuple[list, list, str]]:
    """(completion ids, log-probs, finish reason) of the `n` choices for one prompt, in index order."""
    try:
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        out = [(c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"]) for c in choices]
    except (KeyError, TypeError):
        raise ServerError(
            f"{endpoint}: the reply lacks token ids or log-probs (is it a vLLM server started by `alphaalign serve`?)"
        ) from None
    if len(out) != n:
        raise ServerError(f"{endpoint}: expected {n} completions, got {len(out)}")
    for ids, logprobs, reason in out:
        if reason not in FINISH_REASONS:
            raise ServerError(f"{endpoint}: a completion ended with finish_reason {reason!r}")
        if len(ids) != len(logprobs):
            raise ServerError(f"{endpoint}: {len(ids)} completion tokens but {len(logprobs)} log-probs")
    return [(ids, logprobs, FINISH_REASONS[reason]) for ids, logprobs, reason in out]


class VLLMServerEngine:
    """Generation on one or more vLLM servers; `sync` pushes the trainer's weights to them (None: the
    servers' own weights are used as they are, e.g. to evaluate a served model)."""

    def __init__(self, servers: list[str], sync, timeout: float, retries: int, seed: int = 0, rank: int = 0,
                 token: str | None = None):  # fmt: skip
        """`rank`: this trainer process's rank; its prompts are numbered after those of the ranks before it,
        so every process samples with its own seeds. `token`: the servers' secret (default: from the
        environment, see vllm_auth.py)."""
        self.clients = [ServerClient(url, timeout, retries, token) for url in servers]
        self.sync, self.seed, self.rank = sync, seed, rank
        self.version = 0
        self._calls_at_version = 0
        self._lock = threading.Lock()
        self.check_health()
        self.base_model = self.clients[0].call("GET", "/v1/models", timeout=min(timeout, 30.0))["data"][0][
            "id"
        ]
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
            model = getattr(self.sync, "model_name", None) or self.base_model
            first = self.rank * len(prompts)
            jobs = [(self.clients[i % len(self.clients)], prompt, self._seed(version, call, first + i))
                    for i, prompt in enumerate(prompts)]  # fmt: skip
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
            "model": model, "prompt": prompt, "n": n, "max_tokens": sampling.max_new_tokens,
            "min_tokens": sampling.min_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or -1,
            "min_p": 0.0, "repetition_penalty": 1.0, "logprobs": 0, "return_token_ids": True, "seed": seed,
        }  # fmt: skip
        reply = client.call("POST", "/v1/completions", payload)
        return parse_completions(reply, n, client.url + "/v1/completions")

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
