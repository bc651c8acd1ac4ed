"""Judges: who decides whether a response refused (and, for some, how harmful it is).

`open_judge(spec, where)` turns a spec from `alphaalign.judges.spec` (rules, classifier, llm) into a `Judge`
whose `judge(prompts, answers)` returns one `Judgement` per answer. The LLM judge asks an OpenAI-compatible
endpoint with a rubric (`rubric.py`), through a small bounded, deadline-enforcing client (`client.py`), with
every reply cached on disk (`cache.py`). See docs/evaluation.md.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

from alphaalign.errors import UserError
from alphaalign.judges.rubric import RUBRICS, Judgement
from alphaalign.judges.spec import (
    ClassifierJudge,
    JudgeSpec,
    LLMJudge,
    RulesJudge,
    judge_from_option,
    parse_judge,
)

__all__ = [
    "ClassifierJudge",
    "Judge",
    "JudgeSpec",
    "Judgement",
    "LLMJudge",
    "RulesJudge",
    "check_environment",
    "judge_from_option",
    "open_judge",
    "parse_judge",
    "stats_line",
]


def stats_line(stats: dict, unparseable: int) -> str | None:
    """What an LLM judge did, in one line for the terminal (None for the other judges, which ask no one)."""
    if "requests" not in stats:
        return None
    return (
        f"judge: {stats['requests']} request(s), {stats['cached']} cached, "
        f"{unparseable} unparseable repl{'y' if unparseable == 1 else 'ies'} (left out of the rates)"
    )


def check_environment(spec, where: str) -> str | None:
    """The API key of an LLM judge's endpoint, read from the variable it names; a `UserError` when unset."""
    if not isinstance(spec, LLMJudge) or spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        sep = ": " if where.startswith("-") else "."
        raise UserError(f"{where}{sep}api_key_env: the environment variable {spec.api_key_env} is not set")
    return key


class Judge:
    """Rules and classifier judges: refusal only; attack success on a harmful prompt = not refused."""

    def __init__(self, spec):
        self.spec = spec
        self.stats: Counter = Counter()

    def describe(self) -> str:
        return self.spec.describe()

    @property
    def asr_from(self) -> str:
        return "1 - refusal rate"

    def judge(self, prompts: list[str], answers: list[str]) -> list[Judgement]:
        from alphaalign.rewards.alphaalign_safety import detect_refusals

        spec = self.spec
        if isinstance(spec, ClassifierJudge):
            refused = detect_refusals(answers, spec.model, spec.label, spec.threshold)
        else:
            refused = detect_refusals(answers)
        self.stats["judged"] += len(answers)
        return [Judgement(r, float(not r), "refusal" if r else "no_refusal") for r in refused]


class LLMJudgeRunner(Judge):
    """Asks the endpoint only for (prompt, answer) pairs not in the cache; ``start()`` gives the endpoint's base
    URL and its key, and is called at the first miss (so a fully cached re-run starts no server)."""

    def __init__(self, spec: LLMJudge, model: str, where: str, start):
        from alphaalign.judges.cache import ReplyCache, default_dir

        super().__init__(spec)
        self.rubric = RUBRICS[spec.rubric]
        self.model, self._start, self.client = model, start, None
        self.identity = {
            "type": "llm",
            "model": model,
            "rubric": self.rubric.name,
            "rubric_version": self.rubric.version,
            "temperature": spec.temperature,
            "max_tokens": spec.max_tokens,
        }
        folder = Path(spec.cache_dir) if spec.cache_dir else default_dir()
        self.cache = ReplyCache(folder, where) if spec.cache else None
        self.stats.update(requests=0, cached=0, unparseable=0)

    def describe(self) -> str:
        where = self.spec.url or "a local vLLM server"
        return f"llm {self.model} at {where}, rubric {self.rubric.name} v{self.rubric.version}"

    @property
    def asr_from(self) -> str:
        return {
            "refusal": "1 - refusal rate (llm refusal rubric)",
            "strongreject": "mean StrongREJECT score",
            "harm": "harmful responses (llm harm rubric)",
        }[self.rubric.name]

    def _client(self):
        from alphaalign.judges.client import ChatClient

        if self.client is None:
            spec = self.spec
            url, api_key = self._start()
            self.client = ChatClient(
                url,
                self.model,
                api_key,
                concurrency=spec.concurrency,
                request_timeout=spec.request_timeout,
                time_budget=spec.time_budget,
                retries=spec.retries,
                temperature=spec.temperature,
                max_tokens=spec.max_tokens,
            )
        return self.client

    def judge(self, prompts: list[str], answers: list[str]) -> list[Judgement]:
        from alphaalign.judges.cache import key

        keys = [key(self.identity, p, a) for p, a in zip(prompts, answers, strict=True)]
        replies: dict[str, str] = self.cache.get_many(keys) if self.cache else {}
        self.stats["cached"] += sum(k in replies for k in keys)
        first_of: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in replies:
                first_of.setdefault(k, i)
        todo = list(first_of.values())  # one request per distinct (prompt, answer)

        def done(j: int, reply: str) -> None:
            replies[keys[todo[j]]] = reply
            if self.cache:
                self.cache.put(keys[todo[j]], reply)

        if todo:
            client = self._client()
            before = client.requests
            try:
                client.complete_all([self.rubric.messages(prompts[i], answers[i]) for i in todo], done)
            finally:
                self.stats["requests"] += client.requests - before
        out = [self.rubric.parse(replies[k]) for k in keys]
        self.stats["judged"] += len(out)
        self.stats["unparseable"] += sum(not j.parsed for j in out)
        return out

    def close(self) -> None:
        if self.cache:
            self.cache.close()


def serve_recipe(spec: LLMJudge):
    """A recipe whose vLLM server command (`alphaalign serve`'s) serves the judge model."""
    from alphaalign.config import Recipe

    prompt_tokens = max(spec.max_model_len - spec.max_tokens, 1)
    return Recipe.model_validate(
        {
            "model": {"name_or_path": spec.model, "dtype": spec.dtype},
            "data": {"train": [{"path": "-"}], "max_prompt_tokens": prompt_tokens},
            "rollout": {"max_new_tokens": spec.max_tokens, "server_start_timeout": spec.server_start_timeout},
            "trainer": {"micro_batch_tokens": max(16384, spec.max_model_len)},
            "rewards": [{"name": "alphaalign_safety"}],
        }
    )


@contextlib.contextmanager
def open_judge(spec, where: str, log_dir: Path | None = None):
    """The judge for ``spec``; an LLM judge without a URL starts a vLLM server at its first uncached request,
    stopped on exit."""
    if not isinstance(spec, LLMJudge):
        yield Judge(spec)
        return
    api_key = check_environment(spec, where)
    with contextlib.ExitStack() as stack:
        if spec.url is not None:
            model, start = spec.model, lambda: (spec.url, api_key)
        else:
            from alphaalign.rollout.vllm_launch import model_location

            recipe = serve_recipe(spec)
            model, start = model_location(recipe), lambda: _start_server(spec, recipe, log_dir, stack)
        runner = LLMJudgeRunner(spec, model, where, start)
        stack.callback(runner.close)
        yield runner


def _start_server(
    spec: LLMJudge, recipe, log_dir: Path | None, stack: contextlib.ExitStack
) -> tuple[str, str]:
    """The started server's base URL and its own secret, which it requires of every request."""
    from alphaalign.judges.cache import default_dir
    from alphaalign.rollout.vllm_launch import LocalServer, require_vllm

    require_vllm()
    log = Path(log_dir or (Path(spec.cache_dir) if spec.cache_dir else default_dir())) / "judge_server.log"
    print(f"starting a vLLM server for the judge {spec.model} (log: {log})", file=sys.stderr, flush=True)
    server = LocalServer(recipe, log, start_timeout=spec.server_start_timeout)
    stack.callback(server.stop)
    server.wait_ready()
    return server.url + "/v1", server.token


# Rewards judge batch after batch: each LLM judge stays open (its server running) for the whole process.
_OPEN: dict = {}
_EXIT = contextlib.ExitStack()
atexit.register(_EXIT.close)


def shared_judge(spec, where: str) -> Judge:
    if spec not in _OPEN:
        _OPEN[spec] = _EXIT.enter_context(open_judge(spec, where))
    return _OPEN[spec]
