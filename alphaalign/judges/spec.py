"""Which judge decides refusals and harm: typed options, one class per judge, selected by `type`.

The same classes serve `alphaalign eval --judge`, `alphaalign score --judge`, a recipe's `judge:` block and the
rewards' `refusal: {detector: ...}` argument. Only pydantic is imported here, so config.py can use them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from alphaalign.errors import UserError
from alphaalign.parsing import safe_load_bounded

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RulesJudge(_Spec):
    """The rule-based refusal verifier V_r (`is_refusal`) on the final answer."""

    type: Literal["rules"] = "rules"

    def describe(self) -> str:
        return "rules (refusal verifier V_r)"


class ClassifierJudge(_Spec):
    """A Hugging Face sequence-classification model: a refusal when P(label) >= threshold."""

    type: Literal["classifier"] = "classifier"
    model: str  # hub id or local folder
    label: str | int = "refusal"  # a label name from the model's id2label, or an output index
    threshold: float = Field(0.5, ge=0, le=1)

    def describe(self) -> str:
        return f"classifier {self.model} (refusal when P({self.label}) >= {self.threshold})"


class LLMJudge(_Spec):
    """A chat model behind an OpenAI-compatible endpoint, asked one rubric per (prompt, response).

    With `url` the endpoint is used as it is (its API key, if any, read from the environment variable named by
    `api_key_env`); without it a local vLLM server is started for `model` and stopped at the end.
    """

    type: Literal["llm"] = "llm"
    rubric: Literal["refusal", "strongreject", "harm"] = "refusal"
    model: str  # the model name the endpoint serves, or the hub id / folder to serve
    url: str | None = None  # base URL as OpenAI clients take it, e.g. https://api.openai.com/v1
    api_key_env: str | None = None  # the NAME of the variable holding the key; the key is never stored
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, gt=0)  # of the judge's reply
    concurrency: int = Field(8, ge=1)  # requests in flight at once
    request_timeout: float = Field(120.0, gt=0)  # wall-clock s one attempt may take, however it trickles
    time_budget: float = Field(600.0, gt=0)  # wall-clock seconds one judgement may take, retries included
    retries: int = Field(3, ge=0)  # extra attempts after a failure (connection, timeout, 5xx, 429, non-JSON)
    cache: bool = True
    cache_dir: str | None = None  # default: $ALPHAALIGN_CACHE/judges, else ~/.cache/alphaalign/judges
    # a server this project starts (no url)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_model_len: int = Field(8192, gt=0)  # tokens of rubric + prompt + response + reply
    server_start_timeout: float = Field(900.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError(f"{url!r} is not an http(s):// URL")
        # the base URL, as OpenAI clients take it; the endpoint's own URL, pasted from a curl line, means the same
        return None if url is None else url.rstrip("/").removesuffix("/chat/completions")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name (give the name, never the key)")
        return name

    def describe(self) -> str:
        where = self.url or "a local vLLM server"
        return f"llm {self.model} at {where}, rubric {self.rubric}"


JudgeSpec = Annotated[RulesJudge | ClassifierJudge | LLMJudge, Field(discriminator="type")]
JUDGE_TYPES = ("rules", "classifier", "llm")
_ADAPTER: TypeAdapter = TypeAdapter(JudgeSpec)


def error_text(err: dict, tag_key: str = "type") -> tuple[str, str]:
    """(dotted key within the judge block, message) of one pydantic error, the union's tag left out."""
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] in JUDGE_TYPES:
        loc = loc[1:]
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        got = err.get("ctx", {}).get("tag")
        return tag_key, f"unknown judge {got!r}; the choices are {', '.join(JUDGE_TYPES)}"
    if kind == "union_tag_not_found":
        return tag_key, f"required key is missing (one of {', '.join(JUDGE_TYPES)})"
    if kind == "model_type" or kind == "model_attributes_type":
        return ".".join(loc), "must be a mapping"
    if kind == "extra_forbidden":
        return ".".join(loc), "unknown key"
    if kind == "missing":
        return ".".join(loc), "required key is missing"
    if kind != "value_error" and not isinstance(err.get("input"), dict | list):
        msg += f" (got {err.get('input')!r})"
    return ".".join(loc), msg


def parse_judge(data: Any, where: str, tag_key: str = "type"):
    """Validate a judge block; a mistake is a `UserError` naming ``where`` and the dotted key."""
    if isinstance(data, dict) and tag_key != "type":
        if "type" in data:
            raise UserError(f"{where}.type: unknown key (choose the detector with '{tag_key}')")
        data = {("type" if k == tag_key else k): v for k, v in data.items()}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        key, msg = error_text(exc.errors()[0], tag_key)
        sep = ": " if where.startswith("-") else "."  # a flag, or a dotted recipe key
        raise UserError(f"{where}{sep + key if key else ''}: {msg}") from None


def judge_from_option(text: str, flag: str = "--judge"):
    """`--judge`: a type name (rules, classifier, llm), a YAML/JSON file, or an inline YAML mapping."""
    text = text.strip()
    if text in JUDGE_TYPES:
        data: Any = {"type": text}
    else:
        path = Path(text).expanduser()
        if text.endswith((".yaml", ".yml", ".json")):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise UserError(f"{flag}: cannot read {path} ({exc.strerror})") from None
        try:
            data = safe_load_bounded(text)
        except ValueError as exc:
            raise UserError(f"{flag}: {exc}") from None
        except yaml.YAMLError:
            raise UserError(
                f"{flag}: neither a judge type ({', '.join(JUDGE_TYPES)}) nor valid YAML"
            ) from None
        if not isinstance(data, dict):
            raise UserError(
                f"{flag}: expected {', '.join(JUDGE_TYPES)} or a mapping like "
                f"'{{type: llm, model: M, url: U}}', got {text!r}"
            )
    return parse_judge(data, flag)
