"""Reliability, round 2 (issue 22, classes 7-9): untrusted server replies, names that collide, every output
path and every CLI flag. Everything runs through `alphaalign.cli.main` against real local HTTP servers."""

import http.server
import json
import threading
from pathlib import Path

import pytest

from alphaalign.cli import build_parser, main, non_negative_int, port, positive_int

UNWRITABLE = "/proc/alphaalign-test"  # a folder no one, root included, can create files in


def run(capsys, argv) -> tuple[int, str]:
    """Exit code and stderr of `alphaalign ARGV`, argparse's own exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    """The error line of a run that failed with exit code 2: the last line of stderr and the only one that
    says error (a model load's progress bar may come before it), no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum("error" in line.lower() for line in lines) == 1, err
    return lines[-1]


# ---- a scripted HTTP server: each route answers what the test says


class Scripted(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict):
        """`routes`: path -> (status, body, content type), or a function of the request's JSON returning one."""
        self.routes, self.requests = routes, []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        path = self.path.split("?")[0]
        self.server.requests.append(path)
        reply = self.server.routes.get(path, (404, "not found", "text/plain"))
        status, text, kind = reply(body) if callable(reply) else reply
        data = text.encode() if isinstance(text, str) else json.dumps(text).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(routes):
        servers.append(Scripted(routes))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


JSON = "application/json"
HTML = (200, "<html><body>Sign in to continue</body></html>", "text/html")


def completion(n, ids=(5, 6, 7), logprobs=(-0.5, -0.25, -1.0), reason="length", **choice):
    return {
        "choices": [
            {
                "index": i,
                "text": "x",
                "token_ids": list(ids),
                "finish_reason": reason,
                "logprobs": None if logprobs is None else {"token_logprobs": list(logprobs)},
                **choice,
            }
            for i in range(n)
        ]
    }


def vllm_routes():
    """A vLLM server as `alphaalign serve` starts it: health, model list, completions, checkpoint reload and
    prefix-cache reset."""
    return {
        "/health": (200, "", "text/plain"),
        "/v1/models": (200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]}, JSON),
        "/v1/completions": lambda body: (200, completion(body["n"]), JSON),
        "/collective_rpc": (200, {"results": [{"seconds": 0.01, "lm_heads_repacked": 1}]}, JSON),
        "/reset_prefix_cache": (200, {"success": True}, JSON),
    }


def eval_argv(tiny_policy, write_recipe, tmp_path, url):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    recipe = write_recipe(
        {
            "model": {"name_or_path": str(tiny_policy)},
            "rollout": {
                "engine": "vllm_server",
                "servers": [url],
                "timeout": 20,
                "retries": 1,
                "max_new_tokens": 3,
            },
        }
    )
    return ["eval", "--recipe", recipe, "--data", prompts, "--label", "harmful", "--out", tmp_path / "ev"]


# ---- 7. untrusted replies


def test_a_well_behaved_server_passes(serve, tiny_policy, write_recipe, tmp_path, capsys):
    """The control: the scripted server as the tests below alter it, unaltered, gives a normal evaluation."""
    server = serve(vllm_routes())
    code, err = run(capsys, eval_argv(tiny_policy, write_recipe, tmp_path, server.url))
    assert code == 0, err
    assert {"/health", "/v1/models", "/collective_rpc", "/reset_prefix_cache", "/v1/completions"} <= set(
        server.requests
    )


DEEP = "[" * 100_000 + "]" * 100_000  # Python's JSON parser recurses per level: RecursionError near 1,000


def _choices(**change):
    return lambda body: (200, completion(body["n"], **change), JSON)


BAD_REPLIES = {  # route -> (reply, what the error line says)
    "models: html": ("/v1/models", HTML, "not JSON (text/html)"),
    "models: empty list": (
        "/v1/models",
        (200, {"object": "list", "data": []}, JSON),
        "data: list should have",
    ),
    "models: no data": ("/v1/models", (200, {"object": "list"}, JSON), "data: field required"),
    "models: id not text": (
        "/v1/models",
        (200, {"data": [{"id": 7}]}, JSON),
        "data.0.id: input should be a valid string",
    ),
    "models: not an object": ("/v1/models", (200, [1, 2], JSON), "input should be a valid dictionary"),
    "completions: html": ("/v1/completions", HTML, "not JSON"),
    "completions: empty body": ("/v1/completions", (200, "", JSON), "not JSON"),
    "completions: nested too deeply": ("/v1/completions", (200, DEEP, JSON), "nested more than 100 levels"),
    "completions: no choices": ("/v1/completions", (200, {"id": "x"}, JSON), "choices: field required"),
    "completions: ids as strings": (
        "/v1/completions",
        _choices(ids=["5", "6", "7"]),
        "token_ids.0: input should be a valid integer",
    ),
    "completions: ids as floats": (
        "/v1/completions",
        _choices(ids=[5.0, 6.0, 7.0]),
        "token_ids.0: input should be a valid integer",
    ),
    "completions: ids as booleans": (
        "/v1/completions",
        _choices(ids=[True, False, True]),
        "token_ids.0: input should be a valid integer",
    ),
    "completions: negative id": (
        "/v1/completions",
        _choices(ids=[5, -1, 7]),
        "token_ids.1: input should be greater than or equal to 0",
    ),
    "completions: id beyond the vocabulary": (
        "/v1/completions",
        _choices(ids=[5, 6, 10**6]),
        "outside the policy's vocabulary",
    ),
    "completions: nan log-prob": (
        "/v1/completions",
        _choices(logprobs=[-0.5, float("nan"), -1.0]),
        "token_logprobs.1: input should be a finite number",
    ),
    "completions: null log-prob": (
        "/v1/completions",
        _choices(logprobs=[-0.5, None, -1.0]),
        "token_logprobs.1: input should be a valid number",
    ),
    "completions: positive log-prob": (
        "/v1/completions",
        _choices(logprobs=[-0.5, 3.0, -1.0]),
        "token_logprobs.1: input should be less than or equal to 0",
    ),
    "completions: log-probs as text": (
        "/v1/completions",
        _choices(logprobs=["-0.5", "-0.2", "-1"]),
        "token_logprobs.0: input should be a valid number",
    ),
    "completions: no log-probs": (
        "/v1/completions",
        _choices(logprobs=None),
        "logprobs: input should be a valid dictionary",
    ),
    "completions: fewer log-probs than ids": (
        "/v1/completions",
        _choices(logprobs=[-0.5]),
        "3 completion tokens but 1 log-probs",
    ),
    "completions: finish reason": ("/v1/completions", _choices(reason="abort"), "finish_reason 'abort'"),
    "completions: too few choices": ("/v1/completions", (200, completion(0), JSON), "expected 1 completions"),
    "reload: html": ("/collective_rpc", HTML, "not JSON"),
    "reload: no result": (
        "/collective_rpc",
        (200, {"results": []}, JSON),
        "results: list should have at least 1",
    ),
    "reload: other method's result": (
        "/collective_rpc",
        (200, {"results": ["ok"]}, JSON),
        "results.0: input should be a valid dictionary",
    ),
    "prefix cache: not a boolean": (
        "/reset_prefix_cache",
        (200, {"success": "yes"}, JSON),
        "success: input should be a valid boolean",
    ),
    "prefix cache: never reset": (
        "/reset_prefix_cache",
        (200, {"success": False}, JSON),
        "did not reset its prefix cache",
    ),
}


class _Policy:
    """Stands in for the trainer's policy in weight sync: what is saved does not matter to a reload reply."""

    def save_pretrained(self, folder, state_dict=None):
        Path(folder).mkdir(parents=True)


@pytest.mark.parametrize("case", BAD_REPLIES)
def test_every_bad_reply_of_a_vllm_server_is_refused_in_one_line_naming_the_endpoint(case, serve, tmp_path):
    """The engine and weight sync, as the trainer and `eval` drive them, against each bad reply."""
    from alphaalign.rollout.base import SamplingParams
    from alphaalign.rollout.vllm_server import ServerError, VLLMServerEngine
    from alphaalign.rollout.weight_sync import CheckpointSync

    route, reply, says = BAD_REPLIES[case]
    server = serve({**vllm_routes(), route: reply})
    with pytest.raises(ServerError) as err:
        sync = CheckpointSync(_Policy(), tmp_path / "sync", keep=2)
        engine = VLLMServerEngine([server.url], sync, timeout=5.0, retries=1, vocab_size=600)
        engine.update_weights(1)
        engine.generate([[1, 2, 3]], 1, SamplingParams(max_new_tokens=3, temperature=1.0))
    line = str(err.value)
    assert line.startswith(f"{server.url}{route}: ") and "\n" not in line, line
    assert says in line, line


CLI_CASES = [
    "models: empty list",
    "completions: ids as strings",
    "completions: id beyond the vocabulary",
    "reload: html",
    "prefix cache: never reset",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_replies_end_alphaalign_eval_with_exit_2_and_one_line(
    case, serve, tiny_policy, write_recipe, tmp_path, capsys
):
    route, reply, says = BAD_REPLIES[case]
    server = serve({**vllm_routes(), route: reply})
    line = one_line_error(*run(capsys, eval_argv(tiny_policy, write_recipe, tmp_path, server.url)))
    assert line.startswith(f"error: {server.url}{route}: "), line
    assert says in line, line
    assert not (tmp_path / "ev" / "summary.json").exists()


REWARD_REPLIES = {
    "html": (HTML, "not JSON (text/html)"),
    "nested too deeply": ((200, '{"scores": ' + DEEP + "}", JSON), "nested more than 100 levels"),
    "scores as text": ((200, {"scores": ["0.5"]}, JSON), "scores.0: input should be a valid number"),
    "null score": ((200, {"scores": [None]}, JSON), "scores.0: input should be a valid number"),
    "boolean score": ((200, {"scores": [True]}, JSON), "scores.0: input should be a valid number"),
    "nan score": ((200, '{"scores": [NaN]}', JSON), "scores.0: input should be a finite number"),
    "scores not a list": ((200, {"scores": {"a": 1}}, JSON), "scores: input should be a valid list"),
    "no scores": ((200, {"score": [0.5]}, JSON), "scores: field required"),
    "wrong count": ((200, {"scores": [0.5, 0.5]}, JSON), "expected 1 scores, got 2"),
}


@pytest.mark.parametrize("case", REWARD_REPLIES)
def test_every_bad_reply_of_a_reward_server_ends_in_one_line_naming_it(
    case, serve, write_recipe, tmp_path, capsys
):
    reply, says = REWARD_REPLIES[case]
    server = serve({"/score": reply})
    recipe = write_recipe(
        {
            "rewards": [
                {
                    "name": "remote_rm",
                    "args": {"url": server.url + "/score", "retries": 1, "backoff": 0.01, "timeout": 5},
                }
            ]
        }
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "hi", "completion": "<answer>hello</answer>", "label": "benign"}) + "\n"
    )
    line = one_line_error(
        *run(capsys, ["score", "--recipe", recipe, "--input", rows, "--output", tmp_path / "o.jsonl"])
    )
    assert line.startswith(f"error: remote_rm: {server.url}/score: "), line
    assert says in line and "(after 2 attempts)" in line, line
    assert not (tmp_path / "o.jsonl").exists()


JUDGE_REPLIES = {
    "html": (HTML, "not JSON (text/html)"),
    "nested too deeply": ((200, DEEP, JSON), "nested more than 100 levels"),
    "a lone surrogate": (
        (200, '{"choices": [{"message": {"content": "\\ud800"}}]}', JSON),
        "choices.0.message.content: a lone surrogate",
    ),
    "no choices": ((200, {"choices": []}, JSON), "choices: list should have at least 1"),
    "content not text": (  # null content is a reply, if an unusable one: test_judges.py
        (200, {"choices": [{"message": {"content": 5}}]}, JSON),
        "content: input should be a valid string",
    ),
    "no message": ((200, {"choices": [{"text": "ok"}]}, JSON), "choices.0.message: field required"),
}


@pytest.mark.parametrize("case", JUDGE_REPLIES)
def test_every_bad_reply_of_a_judge_ends_in_one_line_naming_it(case, serve, tmp_path, capsys):
    reply, says = JUDGE_REPLIES[case]
    server = serve({"/v1/chat/completions": reply})
    judge = {
        "type": "llm",
        "model": "m",
        "url": server.url + "/v1",
        "retries": 1,
        "cache_dir": str(tmp_path / "c"),
    }
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "hi", "completion": "<answer>hello</answer>", "label": "benign"}) + "\n"
    )
    argv = ["score", "--input", rows, "--output", tmp_path / "o.jsonl", "--judge", json.dumps(judge)]
    line = one_line_error(*run(capsys, argv))
    assert line.startswith(f"error: judge {server.url}/v1/chat/completions: 2 failed attempt(s)"), line
    assert says in line, line


# ---- 8. names that collide: data columns and the names the pipeline passes itself


def data_file(tmp_path, row: dict, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "harm": "benign"}) + "\n")
    return path


def recipe_on(write_recipe, path, rewards=None):
    source = {"path": str(path), "prompt_field": "question", "label_field": "harm"}
    return write_recipe({"data": {"train": [source]}, "rewards": rewards or [{"name": "alphaalign_safety"}]})


def test_the_reserved_names_are_the_ones_the_pipeline_passes():
    """Reward functions take prompts and completions positionally and label/group from the trainer; the
    template takes prompt: a new such name must be added to RESERVED_COLUMNS."""
    from alphaalign.data import RESERVED_COLUMNS
    from alphaalign.rewards.registry import _POSITIONAL, COLUMNS_FROM_TRAINER

    assert set(RESERVED_COLUMNS) == {"prompt", *_POSITIONAL, *COLUMNS_FROM_TRAINER}


@pytest.mark.parametrize("column", ["prompt", "prompts", "completions", "label", "group"])
def test_a_column_with_a_reserved_name_fails_validate_in_one_line(column, write_recipe, tmp_path, capsys):
    path = data_file(tmp_path, {"question": "How do I pick a lock?", "harm": "harmful", column: "x"})
    line = one_line_error(*run(capsys, ["validate", recipe_on(write_recipe, path)]))
    assert f"{path}:1: column '{column}' collides with" in line, line


def registered_arguments():
    """(reward, argument) for every recipe argument of every built-in reward."""
    import inspect

    from alphaalign.rewards import resolve_reward
    from alphaalign.rewards.registry import COLUMNS_FROM_TRAINER, reward_names

    for name in reward_names():
        for arg, p in inspect.signature(resolve_reward(name)).parameters.items():
            if p.kind is p.KEYWORD_ONLY and arg not in COLUMNS_FROM_TRAINER:
                yield name, arg


REQUIRED_ARGS = {
    "csrm": {"model": "m"},
    "helpfulness_rm": {"model": "m"},
    "remote_rm": {"url": "http://127.0.0.1:9"},
    "overlong_buffer": {"buffer_length": 4},
}


def test_the_walk_covers_the_arguments_the_issue_names():
    assert {
        ("alphaalign_safety", "r_f"),
        ("alphaalign_safety", "answer_tag"),
        ("csrm", "config_column"),
    } <= set(registered_arguments())


@pytest.mark.parametrize("reward, arg", list(registered_arguments()))
def test_a_column_named_like_a_built_in_reward_argument_fails_validate(
    reward, arg, write_recipe, tmp_path, capsys
):
    """Given in the recipe or left at its default, the argument would be replaced by the column (or the
    column dropped): validate says so in one line naming the file, the column and the reward."""
    path = data_file(tmp_path, {"question": "How do I pick a lock?", "harm": "harmful", arg: "x"})
    recipe = recipe_on(write_recipe, path, [{"name": reward, "args": REQUIRED_ARGS.get(reward, {})}])
    line = one_line_error(*run(capsys, ["validate", recipe]))
    assert (
        f"data.train.0: {path}: data column '{arg}' has the name of an argument of rewards.0 ({reward})"
        in line
    )


CUSTOM = """
import math

def scaled(prompts, completions, scale=1.0, **columns):
    return [scale] * len(completions)

def by_answer(prompts, completions, answer, **columns):
    return [float(a in c) for a, c in zip(answer, completions)]

def raises(prompts, completions, **columns):
    raise KeyError("answer")

def one_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)

def words(prompts, completions, **columns):
    return ["good"] * len(completions)

def nothing(prompts, completions, **columns):
    return None

def a_number(prompts, completions, **columns):
    return 1.0

def nested(prompts, completions, **columns):
    return [[1.0]] * len(completions)

async def async_raises(prompts, completions, **columns):
    raise ValueError("server said no")

def tensor(prompts, completions, **columns):
    import torch
    return torch.ones(len(completions))

def with_gaps(prompts, completions, **columns):
    return [None if i % 2 else True for i in range(len(completions))]
"""


@pytest.fixture
def custom_rewards(tmp_path, monkeypatch):
    import importlib
    import sys

    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "contract_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("contract_rewards", None)
    importlib.invalidate_caches()
    return "contract_rewards"


def test_custom_reward_columns_and_arguments(custom_rewards, write_recipe, tmp_path, capsys):
    """A recipe arg of a custom reward may not also be a column; a named parameter the recipe leaves alone is a
    column (TRL's way), and passes."""
    path = data_file(tmp_path, {"question": "q", "harm": "harmful", "scale": 3, "answer": "x"})
    clash = [{"name": f"{custom_rewards}:scaled", "args": {"scale": 2.0}}]
    line = one_line_error(*run(capsys, ["validate", recipe_on(write_recipe, path, clash)]))
    assert f"data column 'scale' has the name of an argument of rewards.0 ({custom_rewards}:scaled)" in line
    fine = [{"name": f"{custom_rewards}:by_answer"}, {"name": "alphaalign_safety"}]
    code, err = run(capsys, ["validate", recipe_on(write_recipe, path, fine)])
    assert code == 0, err


def score_rows(tmp_path, *rows) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("column", ["prompts", "completions", "r_f", "answer_tag", "refusal"])
def test_score_input_columns_that_clash_are_refused_naming_the_line(column, tmp_path, capsys):
    good = {"prompt": "hi", "completion": "<answer>hello</answer>", "label": "benign"}
    rows = score_rows(tmp_path, good, {**good, column: 1})
    line = one_line_error(*run(capsys, ["score", "--input", rows, "--output", tmp_path / "o.jsonl"]))
    assert (
        f"{rows}:2: data column '{column}' has the name of an argument of rewards.0 (alphaalign_safety)"
        in line
    )
    assert not (tmp_path / "o.jsonl").exists()


# ---- 9. reward contract, output paths, flags, launch divisibility, BOMs

CONTRACT = {
    "raises": "the reward function raised KeyError: 'answer'",
    "async_raises": "the reward function raised ValueError: server said no",
    "one_short": "returned 1 values for 2 completions",
    "words": "value 0 is str 'good', not a number or None",
    "nothing": "returned NoneType; a reward returns a list of 2 numbers",
    "a_number": "returned float; a reward returns a list of 2 numbers",
    "nested": "value 0 is list [1.0], not a number or None",
}


@pytest.mark.parametrize("fn", CONTRACT)
def test_a_custom_reward_that_breaks_the_contract_ends_in_one_line_naming_it(
    fn, custom_rewards, write_recipe, tmp_path, capsys
):
    name = f"{custom_rewards}:{fn}"
    recipe = write_recipe({"rewards": [{"name": "alphaalign_safety"}, {"name": name}]})
    good = {"prompt": "hi", "completion": "<answer>hello</answer>", "label": "benign"}
    rows = score_rows(tmp_path, good, good)
    argv = ["score", "--recipe", recipe, "--input", rows, "--output", tmp_path / "o.jsonl"]
    line = one_line_error(*run(capsys, argv))
    assert line == f"error: rewards.1 ({name}): {CONTRACT[fn]}" or line.startswith(
        f"error: rewards.1 ({name}): {CONTRACT[fn]}"
    ), line
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("fn, expected", [("tensor", [1.0, 1.0]), ("with_gaps", [1.0, None])])
def test_rewards_that_keep_the_contract_still_score(
    fn, expected, custom_rewards, write_recipe, tmp_path, capsys
):
    name = f"{custom_rewards}:{fn}"
    good = {"prompt": "hi", "completion": "<answer>hello</answer>", "label": "benign"}
    rows = score_rows(tmp_path, good, good)
    out = tmp_path / "new" / "folder" / "o.jsonl"  # a missing parent is created
    code, err = run(
        capsys,
        ["score", "--recipe", write_recipe({"rewards": [{"name": name}]}), "--input", rows, "--output", out],
    )
    assert code == 0, err
    assert [json.loads(line)["rewards"][fn] for line in out.read_text().splitlines()] == expected


def output_commands(tmp_path):
    """Each command that writes an output path: (argv up to the path, flag, a folder is expected). Every
    other argument names something missing, so an error that is not about the output path would show that
    the command did work (or checks) before checking where its results go."""
    run_folder = tmp_path / "run"
    run_folder.mkdir(exist_ok=True)
    missing = tmp_path / "missing.jsonl"
    return {
        "report --out": (["report", run_folder, "--out"], True),
        "eval --out": (
            ["eval", "--model", tmp_path / "no-model", "--data", missing, "--label", "harmful", "--out"],
            True,
        ),
        "score --output": (["score", "--input", missing, "--output"], False),
        "eval-rm --output": (["eval-rm", missing, "--model", tmp_path / "no-model", "--output"], False),
        "bench --out": (["bench", "--workload", "tiny", "--cache", tmp_path / "cache", "--out"], False),
        "eval-detector --errors": (["eval-detector", missing, "--errors"], False),
        "eval-detector --json": (["eval-detector", missing, "--json"], False),
    }


def test_the_output_command_list_is_complete():
    """Every option of every subcommand whose help says it is written to is in output_commands."""
    found = set()
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.option_strings[0] in (
                "--out",
                "--output",
                "--errors",
                "--json",
            ):
                found.add(f"{name} {action.option_strings[0]}")
    assert found == set(OUTPUT_NAMES)


OUTPUT_NAMES = [
    "report --out",
    "eval --out",
    "score --output",
    "eval-rm --output",
    "bench --out",
    "eval-detector --errors",
    "eval-detector --json",
]
FOLDER_OUTPUTS = {"report --out", "eval --out"}
BAD_PATHS = [
    (command, bad)
    for command in OUTPUT_NAMES
    for bad in [
        "file for a folder" if command in FOLDER_OUTPUTS else "folder for a file",
        "parent is a file",
        "unwritable parent",
    ]
]


@pytest.mark.parametrize("command, bad", BAD_PATHS)
def test_every_output_path_is_checked_before_any_work(command, bad, tmp_path, capsys):
    argv, folder = output_commands(tmp_path)[command]
    assert folder == (command in FOLDER_OUTPUTS)
    a_file, a_folder = tmp_path / "a_file", tmp_path / "a_folder"
    a_file.write_text("keep me")
    a_folder.mkdir()
    path = {
        "file for a folder": a_file,
        "folder for a file": a_folder,
        "parent is a file": a_file / "out",
        "unwritable parent": Path(UNWRITABLE) / "out",
    }[bad]
    line = one_line_error(*run(capsys, [*argv, path]))
    flag = command.split()[1]
    assert line.startswith(f"error: {flag}: ") and str(path) in line, line
    assert a_file.read_text() == "keep me" and not any(a_folder.iterdir())


def int_flags():
    """(subcommand words, flag, type) of every integer option of every subcommand."""
    from alphaalign.cli import build_parser

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*words, name])
            elif action.type in (int, positive_int, non_negative_int, port) and action.option_strings:
                yield " ".join(words), action.option_strings[0], action.type

    return list(walk(build_parser(), []))


def int_flag_base(words: str, tmp_path, write_recipe) -> list:
    """A valid command line for each subcommand with integer options."""
    recipe = write_recipe(
        {"rollout": {"engine": "vllm_server"}, "trainer": {"output_dir": str(tmp_path / "r")}}
    )
    return {
        "validate": ["validate", recipe],
        "eval-rm": ["eval-rm", tmp_path / "f.jsonl", "--model", "m"],
        "eval": ["eval", "--model", "m", "--out", tmp_path / "ev"],
        "serve": ["serve", recipe],
        "bench": ["bench", "--workload", "tiny", "--cache", tmp_path / "c", "--out", tmp_path / "b.json"],
        "launch slurm": ["launch", "slurm", recipe, "--nodes", "2", "--gpus-per-node", "0", "--dry-run"],
        "launch local": ["launch", "local", recipe, "--gpus", "0", "--dry-run"],
    }[words]


# launch's counts are checked with the layout (launch.check_layout), bench's rounds by run_bench
CHECKED_AFTER_PARSING = {
    ("launch slurm", "--nodes"),
    ("launch slurm", "--gpus-per-node"),
    ("launch slurm", "--vllm-nodes"),
    ("launch slurm", "--vllm-gpus"),
    ("launch local", "--gpus"),
    ("launch local", "--vllm-servers"),
    ("bench", "--rounds"),
}


def test_every_plain_int_flag_is_checked_after_parsing():
    plain = {(words, flag) for words, flag, kind in int_flags() if kind is int}
    assert plain == CHECKED_AFTER_PARSING, "a new int flag: give it positive_int (or check it and list it)"


@pytest.mark.parametrize("words, flag, kind", int_flags())
def test_every_int_flag_refuses_values_out_of_range_in_one_line(
    words, flag, kind, tmp_path, write_recipe, capsys
):
    zero_is_bad = kind in (positive_int, port) or flag in ("--nodes", "--rounds")
    for bad in ["-1", "0"] if zero_is_bad else ["-1"]:
        line = one_line_error(*run(capsys, [*int_flag_base(words, tmp_path, write_recipe), f"{flag}={bad}"]))
        assert flag in line, line


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["eval-rm", "f.jsonl", "--model", "m", "--device", "tpu"],
            "--device: expected auto, cpu, cuda or cuda:N",
        ),
        (["eval-rm", "f.jsonl", "--model", "m", "--dtype", "fp8"], "--dtype: invalid choice: 'fp8'"),
        (
            ["eval-rm", "f.jsonl", "--model", "m", "--batch-size", "two"],
            "--batch-size: not an integer: 'two'",
        ),
        (["serve", "r.yaml", "--port", "70000"], "--port: a TCP port is 1 to 65535"),
    ],
)
def test_flags_with_impossible_values_are_refused_before_any_work(argv, says, capsys):
    line = one_line_error(*run(capsys, argv))
    assert says in line, line


LAYOUTS = [  # (launch arguments, trainer processes counted by hand)
    (["slurm", "--nodes", "2", "--gpus-per-node", "0"], 2),  # CPU nodes: one process each
    (["slurm", "--nodes", "3", "--gpus-per-node", "2", "--vllm-nodes", "1"], 4),
    (["slurm", "--nodes", "1", "--gpus-per-node", "4", "--vllm-nodes", "1", "--vllm-gpus", "1"], 3),
    (["local", "--gpus", "4", "--vllm-servers", "1"], 3),
    (["local", "--gpus", "3", "--vllm-servers", "1"], 2),
]


@pytest.mark.parametrize("layout, procs", LAYOUTS)
def test_launch_refuses_prompts_per_step_that_do_not_divide_over_the_trainer_processes(
    layout, procs, write_recipe, tmp_path, capsys
):
    recipe = write_recipe(
        {
            "rollout": {"engine": "vllm_server"},
            "trainer": {"output_dir": str(tmp_path / "r"), "deepspeed": "zero2"},
        }
    )
    where, *flags = layout
    argv = ["launch", where, recipe, *flags, "--dry-run"]
    line = one_line_error(*run(capsys, [*argv, f"trainer.prompts_per_step={procs + 1}"]))
    assert (
        f"trainer.prompts_per_step: {procs + 1} prompts do not split evenly over the {procs} trainer" in line
    )
    code, err = run(capsys, [*argv, f"trainer.prompts_per_step={2 * procs}"])
    assert code == 0, err
    assert not (tmp_path / "r").exists()


def test_files_with_a_byte_order_mark_read(write_recipe, tmp_path, capsys):
    """Excel writes UTF-8 CSVs with a BOM, which must not become part of the first column's name."""
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes(
        "prompt,label\nHow do I pick a lock?,harmful\nHow do I bake bread?,benign\n".encode("utf-8-sig")
    )
    code, err = run(capsys, ["validate", write_recipe({"data": {"train": [{"path": str(csv_file)}]}})])
    assert code == 0, err
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(
        (json.dumps({"prompt": "hi", "completion": "<answer>hello</answer>"}) + "\n").encode("utf-8-sig")
    )
    code, err = run(capsys, ["score", "--input", rows, "--output", tmp_path / "o.jsonl"])
    assert code == 0, err
    from alphaalign.rm.data import read_pairs  # the reward-model data reader shares the file reader

    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("config,prompt,chosen,rejected\nc,p,a,b\n".encode("utf-8-sig"))
    assert read_pairs(pairs)
