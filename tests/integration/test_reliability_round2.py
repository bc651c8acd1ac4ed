"""Reliability, round 2 (issue 22, classes 1-5): skipped steps that change nothing, sandboxed templates and
safe checkpoint loading, secrets masked by what they are, wall-clock deadlines and bounded recipes, finite
numbers everywhere."""

import itertools
import socketserver
import threading
import time
import types
import typing

import pytest
from pydantic import BaseModel

from alphaalign import config
from alphaalign.cli import main
from alphaalign.errors import UserError
from alphaalign.rm.recipe import RewardModelRecipe

# ---- 5. non-finite numbers: every float of every schema, every float flag


def _float_paths(model: type[BaseModel], prefix: str = "", setup: tuple[str, ...] = ()) -> list[tuple]:
    """(dotted key, annotation, overrides that select the key's section) of every float leaf of a schema, list
    items addressed as item 0. A member of a `type`-tagged union is selected by its tag and placeholder values
    for its other required strings."""
    found = []
    for name, field in model.model_fields.items():
        found += _paths_of(field.annotation, f"{prefix}{name}", setup)
    return found


def _selecting(member: type[BaseModel], path: str) -> tuple[str, ...]:
    tag = member.model_fields.get("type")
    if tag is None or typing.get_origin(tag.annotation) is not typing.Literal:
        return ()
    required = [n for n, f in member.model_fields.items() if f.is_required() and f.annotation is str]
    return (f"{path}.type={typing.get_args(tag.annotation)[0]}", *(f"{path}.{n}=m" for n in required))


def _paths_of(annotation, path: str, setup: tuple[str, ...]) -> list[tuple]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _paths_of(args[0], path, setup)
    if annotation is float:
        return [(path, float, setup)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _float_paths(annotation, path + ".", setup + _selecting(annotation, path))
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args if arg is not type(None) for found in _paths_of(arg, path, setup)]
    if origin is list:
        return _paths_of(args[0], path + ".0", setup)
    if origin is tuple and float in args:
        return [(path, tuple, setup)]
    return []


def test_the_walker_finds_the_floats_the_issue_names():
    paths = {p for p, *_ in _float_paths(config.Recipe)}
    assert {
        "trainer.learning_rate",
        "rollout.temperature",
        "rewards.0.weight",
        "algorithm.beta",
        "algorithm.epsilon",
        "algorithm.epsilon_high",
        "trainer.adam_betas",
        "data.train.0.weight",
        "model.lora.alpha",
    } <= paths
    assert {"training.learning_rate", "augmentation.alpha"} <= {
        p for p, *_ in _float_paths(RewardModelRecipe)
    }


RECIPE_BASE = [
    "model.name_or_path=m",
    "data.train=[{path: a.jsonl}]",
    "data.eval=[{path: b.jsonl}]",
    "rewards=[{name: alphaalign_safety}]",
]
RM_BASE = ["model.name_or_path=m", "data.pairs=[p.jsonl]"]


@pytest.mark.parametrize("schema, base", [(config.Recipe, RECIPE_BASE), (RewardModelRecipe, RM_BASE)])
@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan"])
def test_every_float_of_every_schema_refuses_non_finite_values(schema, base, bad):
    load = lambda *extra: config.load_recipe(None, [*base, *extra], schema=schema)  # noqa: E731
    load()  # the base is valid
    for path, kind, setup in _float_paths(schema):
        value = f"[{bad}, 0.9]" if kind is tuple else bad
        load(*setup)  # the section alone is valid
        with pytest.raises(UserError) as err:
            load(*setup, f"{path}={value}")
        assert f"{path}" in str(err.value) and "finite" in str(err.value), (path, str(err.value))


def test_non_finite_numbers_inside_reward_args_are_refused_with_their_key():
    with pytest.raises(UserError, match=r"rewards\.0\.args: inner\.1\.cap: must be a finite number"):
        config.load_recipe(
            None, [*RECIPE_BASE[:3], "rewards=[{name: x:y, args: {inner: [1.0, {cap: .nan}]}}]"]
        )


FLOAT_FLAGS = [
    ["eval", "--out", "o", "--model", "m", "--temperature"],
    ["eval", "--out", "o", "--model", "m", "--refusal-threshold"],
    ["eval-rm", "f.jsonl", "--model", "m", "--threshold"],
    ["eval-rm", "f.jsonl", "--model", "m", "--temperature"],
    ["eval-rm", "f.jsonl", "--model", "m", "--bias"],
    ["validate", "r.yaml", "--gpu-memory"],
    ["launch", "slurm", "r.yaml", "--nodes", "2", "--gpu-memory"],
    ["launch", "local", "r.yaml", "--gpu-memory"],
]


def test_the_float_flag_list_is_complete():
    """Every float flag the parser has is in FLOAT_FLAGS (a new flag must be added to the test above)."""
    from alphaalign.cli import build_parser, finite_float

    def float_flags(parser):
        for action in parser._actions:
            if action.type is float:
                yield action.option_strings[0]
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    yield from float_flags(action.choices[sub])

    assert not list(float_flags(build_parser())), "a float flag without the finite_float type"

    def finite_flags(parser, path):  # (subcommand path, flag) of every finite_float flag, nested commands too
        for action in parser._actions:
            if action.type is finite_float:
                yield (*path, action.option_strings[0])
            if isinstance(getattr(action, "choices", None), dict):
                for name, sub in action.choices.items():
                    yield from finite_flags(sub, (*path, name))

    def command(argv):  # the subcommand words of a FLOAT_FLAGS entry
        return tuple(argv[:2]) if argv[0] == "launch" else (argv[0],)

    listed = {(*command(argv), argv[-1]) for argv in FLOAT_FLAGS}
    assert set(finite_flags(build_parser(), ())) == listed


@pytest.mark.parametrize("argv", FLOAT_FLAGS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values(argv, bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:-1], f"{argv[-1]}={bad}"])  # '--flag=-inf': argparse takes '-inf' for an option
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-1]}: must be a finite number" in err


# ---- 4. wall-clock deadlines: a server that trickles bytes cannot hold a request past its deadline


class _Trickler(socketserver.ThreadingTCPServer):
    """Answers every request one byte a second, forever: in the status line and headers (`where="headers"`)
    or in a body announced as a megabyte long (`where="body"`)."""

    daemon_threads, allow_reuse_address = True, True

    def __init__(self, where: str):
        self.where, self.connections = where, 0
        super().__init__(("127.0.0.1", 0), _TrickleHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _TrickleHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.connections += 1
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.request.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        if self.server.where == "body":
            self.request.sendall(head)
        try:
            for byte in itertools.cycle(head if self.server.where == "headers" else b" "):
                self.request.sendall(bytes([byte]))
                time.sleep(1.0)
        except OSError:  # the client hung up
            pass


@pytest.fixture(params=["headers", "body"])
def trickler(request):
    server = _Trickler(request.param)
    yield server
    server.shutdown()
    server.server_close()


def test_the_generation_client_ends_by_its_deadline_against_a_trickling_server(trickler):
    from alphaalign.rollout.vllm_server import ServerClient, ServerError

    start = time.monotonic()
    with pytest.raises(ServerError) as err:
        ServerClient(trickler.url, timeout=3.0, retries=2).call("POST", "/v1/completions", {"prompt": [1]})
    took = time.monotonic() - start
    assert 2.9 < took < 4.0, took  # rollout.timeout, retries included
    message = str(err.value)
    assert message.startswith(
        f"{trickler.url}/v1/completions: 1 failed attempt(s) within rollout.timeout=3 s"
    )
    assert "ReadTimeout" in message and "\n" not in message


def test_the_reward_client_ends_by_its_deadline_against_a_trickling_server(trickler):
    from alphaalign.rewards.remote import RemoteScorer

    start = time.monotonic()
    with pytest.raises(UserError) as err:
        RemoteScorer(trickler.url + "/score", timeout=1.5, retries=1, backoff=0.1).score_all(["p"], ["a"])
    took = time.monotonic() - start
    assert 3.0 < took < 4.5, took  # two attempts of 1.5 s each and the pause between them
    assert "no complete reply within 1.5 s (ReadTimeout) (after 2 attempts)" in str(err.value)
    assert trickler.connections == 2


def test_health_checks_and_weight_pushes_use_the_same_deadline(trickler):
    """Every call of the server engine (health, model list, weight sync RPCs) goes through ServerClient.call,
    so a trickling server stops engine start-up within its budget too."""
    from alphaalign.rollout.vllm_server import ServerError, VLLMServerEngine

    start = time.monotonic()
    with pytest.raises(ServerError, match="/health: .*ReadTimeout"):
        VLLMServerEngine([trickler.url], None, timeout=2.0, retries=5)
    assert time.monotonic() - start < 3.0


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    """YAML whose last anchor expands to width**levels strings (a billion laughs at 9 levels of 10)."""
    lines = [f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines)


def test_a_recipe_that_aliases_expand_into_a_memory_bomb_fails_validate_in_one_line(write_recipe, capsys):
    path = write_recipe()
    text = path.read_text().replace("rewards:\n- name: alphaalign_safety\n", "")
    path.write_text(text + "rewards:\n- name: reward_fixtures:constant\n  args:\n" + _alias_bomb() + "\n")
    start = time.monotonic()
    assert main(["validate", str(path)]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path.name in err[0] and "rewards.0.args.l" in err[0], err
    assert "expands to more than 100,000 values" in err[0]
    # the same through an override, and a value that contains itself
    assert main(["validate", str(write_recipe()), "rewards=[{name: x:y, args: &a {me: *a}}]"]) == 2
    assert "an alias refers to a value that contains it" in capsys.readouterr().err


def test_aliases_that_stay_small_still_load():
    recipe = config.load_recipe(None, [*RECIPE_BASE, "rewards=[{name: x:y, args: {a: &v [1, 2], b: *v}}]"])
    assert recipe.rewards[0].args == {"a": [1, 2], "b": [1, 2]}
    assert config.safe_load_bounded("x:\n" + _alias_bomb(levels=4))["x"]["l3"][9][9][9][9] == "lol"  # 10**4


# ---- nesting: Python's JSON parser and PyYAML recurse once per level, so deep input must fail as malformed input

DEEP = 5_000  # far past the recursion limit (1,000)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "args",
    [
        "[" * DEEP + "1" + "]" * DEEP,  # flow style
        "\n" + "".join("  " * (i + 2) + "-\n" for i in range(DEEP)),  # block style
    ],
    ids=["flow", "block"],
)
def test_a_recipe_nested_too_deeply_fails_validate_in_one_line(args, write_recipe, capsys):
    path = write_recipe()
    path.write_text(path.read_text() + "judge:\n  type: rules\n  x: " + args + "\n")
    assert main(["validate", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {path}: nests more than 100 levels deep at line "), line


def test_aliases_that_nest_too_deeply_fail_validate_in_one_line(write_recipe, capsys):
    """Each anchor is shallow, but each nests the one before: the loaded value is 30 * 6 levels deep."""
    lines = ["    l0: &l0 " + "[" * 30 + "1" + "]" * 30]
    lines += [f"    l{i}: &l{i} " + "[" * 30 + f"*l{i - 1}" + "]" * 30 for i in range(1, 6)]
    path = write_recipe({"rewards": None})
    path.write_text(
        path.read_text().replace("rewards: null\n", "")
        + "rewards:\n- name: reward_fixtures:constant\n  args:\n"
        + "\n".join(lines)
        + "\n"
    )
    assert main(["validate", str(path)]) == 2
    line = _error_line(capsys)
    assert f"error: {path}: rewards.0.args.l" in line and "nests more than 100 levels deep" in line, line


def test_deep_values_in_overrides_and_judge_options_fail_in_one_line(write_recipe, tmp_path, capsys):
    deep = "[" * DEEP + "]" * DEEP
    assert main(["validate", str(write_recipe()), f"rewards.0.args.x={deep}"]) == 2
    assert "override 'rewards.0.args.x': the value nests more than 100 levels deep" in _error_line(capsys)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"response": "I cannot help with that.", "refused": 1}\n')
    assert main(["eval-detector", str(rows), "--judge", f"{{type: llm, model: {deep}}}"]) == 2
    assert _error_line(capsys).startswith("error: --judge: nests more than 100 levels deep")


def test_nesting_within_the_bound_still_loads():
    """A mapping and 99 lists: 100 levels, the most allowed."""
    value = config.safe_load_bounded("a: " + "[" * 99 + "1" + "]" * 99)
    for _ in range(100):
        (value,) = value if isinstance(value, list) else value.values()
    assert value == 1


# Rows that JSON allows and nothing downstream can use: the first row (with an emoji written as an escaped pair,
# which is text) is good, the second is one of these. A lone surrogate such as "\\ud800" is one UTF-8 cannot
# encode: the score writer crashed on it at once, a tokenizer would mid-run.
UNUSABLE_ROWS = {
    "nested too deeply": (
        lambda good: good[:-1] + ', "extra": ' + "[" * DEEP + "]" * DEEP + "}",
        "invalid JSON (nested more than 100 levels deep)",
    ),
    "a lone surrogate": (
        lambda good: good.replace("\\ude00", ""),
        "invalid JSON (prompt: a lone surrogate \\ud83d, which is not text)",
    ),
}


@pytest.mark.parametrize("command", ["score", "eval-detector", "validate"])
@pytest.mark.parametrize("case", UNUSABLE_ROWS)
def test_a_data_row_json_allows_but_nothing_can_use_fails_in_one_line_naming_its_line(
    case, command, write_recipe, tmp_path, capsys
):
    spoil, says = UNUSABLE_ROWS[case]
    rows = tmp_path / "rows.jsonl"
    good = '{"prompt": "hi \\ud83d\\ude00", "completion": "Hello.", "response": "Hello.", "refused": 0, "label": "benign"}'
    rows.write_text(good + "\n" + spoil(good) + "\n")
    argv = {
        "score": ["score", "--input", rows, "--output", tmp_path / "out.jsonl"],
        "eval-detector": ["eval-detector", rows],
        "validate": ["validate", write_recipe({"data": {"train": [{"path": str(rows)}]}})],
    }[command]
    assert main([str(a) for a in argv]) == 2
    line = _error_line(capsys)
    assert f"{rows}:2: {says}" in line, line
    assert not (tmp_path / "out.jsonl").exists()
