"""helpfulness_rm and remote_rm (paper Eq. 6–7), the reward stack, and the optional refusal classifier."""

import json
import random
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import reward_fixtures
from helpers import build_tiny_classifier, read_metrics, recipe_for

from alphaalign.config import RewardSpec
from alphaalign.errors import UserError
from alphaalign.rewards import check_reward_args, resolve_reward
from alphaalign.rewards.alphaalign_safety import alphaalign_safety, detect_refusals
from alphaalign.rewards.helpfulness import group_normalized, helpfulness_rm, remote_rm
from alphaalign.rewards.rm_scoring import label_probabilities, load_classifier, score_conversations
from alphaalign.rewards.stack import RewardStack

REFUSAL = r"<safety_reasoning>Unsafe.</safety_reasoning><answer>\boxed{Sorry, I can't comply}</answer>"


def tagged(answer: str) -> str:
    return f"<safety_reasoning>The request is safe.</safety_reasoning><answer>{answer}</answer>"


ANSWERS = ["Knead for ten minutes.", "Bake at 230 °C.", "Use strong flour and rest the dough.", "Salt it."]
GROUPS = {
    "How do I bake bread?": [tagged(a) for a in ANSWERS],
    "Name three rivers in Europe.": [
        tagged("Danube, Rhine, Seine."),
        tagged("The Loire, the Po, the Elbe."),
        REFUSAL,
        tagged("Thames, Tagus and Vistula."),
    ],
}


def batch():
    prompts, completions, group = [], [], []
    for g, (prompt, texts) in enumerate(GROUPS.items()):
        prompts += [prompt] * len(texts)
        completions += texts
        group += [g] * len(texts)
    return prompts, completions, group


# --- Eq. 6 normalisation -------------------------------------------------------------------------


def test_group_zscore_is_clipped_at_zero_and_refusals_get_zero():
    # scores 1, 2, 3: mean 2, sample std 1 → z = −1, 0, 1
    assert group_normalized([1.0, 2.0, 3.0], [False] * 3, [0, 0, 0]) == pytest.approx([0.0, 0.0, 1.0])
    assert group_normalized([1.0, 2.0, 3.0], [False, False, True], [0, 0, 0]) == pytest.approx([0, 0, 0])
    # the refusal still counts in the group's mean and std
    assert group_normalized([1.0, 2.0, 3.0], [True, False, False], [0, 0, 0]) == pytest.approx([0, 0, 1])


def test_zero_std_and_single_rollout_groups_give_zero():
    assert group_normalized([2.5, 2.5, 2.5], [False] * 3, ["a"] * 3) == [0.0, 0.0, 0.0]
    assert group_normalized([7.0], [False], ["a"]) == [0.0]


def test_groups_need_not_be_contiguous():
    rng = random.Random(0)
    scores = [rng.gauss(0, 1) for _ in range(12)]
    groups = [i % 3 for i in range(12)]  # interleaved
    got = group_normalized(scores, [False] * 12, groups)
    for g in range(3):
        rows = [i for i in range(12) if groups[i] == g]
        values = [scores[i] for i in rows]
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert [got[i] for i in rows] == pytest.approx([max((v - mean) / std, 0) for v in values])


# --- helpfulness_rm with a tiny local reward model --------------------------------------------------


def test_helpfulness_rm_scores_raw_prompt_and_extracted_answer(tiny_rm):
    prompts, completions, group = batch()
    got = helpfulness_rm(prompts, completions, model=str(tiny_rm), group=group, device="cpu")
    rm = load_classifier(str(tiny_rm), device="cpu")
    answers = [
        c.split("<answer>")[1].split("</answer>")[0].replace("\\boxed{", "").rstrip("}") for c in completions
    ]
    raw = score_conversations(rm, prompts, answers)
    refused = [c == REFUSAL for c in completions]
    assert got == pytest.approx(group_normalized(raw, refused, group))
    assert got[6] == 0.0  # the refusal
    assert any(v > 0 for v in got[:4]) and any(v > 0 for v in got[4:])
    assert min(got) == 0.0


def test_helpfulness_rm_does_not_depend_on_row_order(tiny_rm):
    prompts, completions, group = batch()
    ordered = helpfulness_rm(prompts, completions, model=str(tiny_rm), group=group, device="cpu")
    order = list(range(len(prompts)))
    random.Random(1).shuffle(order)
    shuffled = helpfulness_rm(
        [prompts[i] for i in order],
        [completions[i] for i in order],
        model=str(tiny_rm),
        group=[group[i] for i in order],
        device="cpu",
    )
    assert shuffled == pytest.approx([ordered[i] for i in order])
    # without a group column, rows with the same prompt form a group
    assert helpfulness_rm(prompts, completions, model=str(tiny_rm), device="cpu") == pytest.approx(ordered)


EDGE_CASES = {
    "empty": "",
    "missing tags": "Knead the dough for ten minutes, then let it rise.",
    "duplicate answer": tagged("one") + "<answer>two</answer>",
    "truncated": "<safety_reasoning>safe</safety_reasoning><answer>Knead the dou",
    "unicode": tagged("Ünïcödé ✓ 面包 🍞 — “quoted” ‘text’ \u200b"),
    "100 KB": tagged("knead " * 17_000),
}


def test_helpfulness_rm_edge_cases(tiny_rm):
    texts = list(EDGE_CASES.values())
    got = helpfulness_rm(
        ["How do I bake bread?"] * len(texts),
        texts,
        model=str(tiny_rm),
        group=[0] * len(texts),
        device="cpu",
        max_length=256,
    )
    assert len(got) == len(texts) and all(v >= 0 for v in got)
    assert helpfulness_rm([], [], model=str(tiny_rm), group=[], device="cpu") == []


def test_helpfulness_rm_needs_a_model_argument():
    with pytest.raises(ValueError, match="reward 'helpfulness_rm' needs the argument 'model'"):
        check_reward_args(resolve_reward("helpfulness_rm"), {})
    check_reward_args(resolve_reward("helpfulness_rm"), {"model": "x", "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="reward 'remote_rm' needs the argument 'url'"):
        check_reward_args(resolve_reward("remote_rm"), {"timeout": 3})


# --- remote_rm against a real local HTTP server -------------------------------------------------------


@pytest.fixture(scope="module")
def reward_server(tiny_rm):
    """A local reward server scoring with the tiny RM; the path picks a behaviour."""
    rm = load_classifier(str(tiny_rm), device="cpu")
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, dict(self.headers), body))
            if self.path == "/slow":  # never answers in time, then hangs up
                return time.sleep(2.0)
            if self.path == "/error":
                return self.reply(500, b"internal error")
            if self.path == "/bad-json":
                return self.reply(200, b"<html>not json</html>")
            if self.path == "/short":
                return self.reply(200, json.dumps({"scores": [1.0]}).encode())
            if self.path == "/auth" and self.headers.get("Authorization") != "Bearer s3cret-token":
                return self.reply(401, b"bad token")
            scores = score_conversations(rm, body["prompts"], body["responses"])
            self.reply(200, json.dumps({"scores": scores}).encode())

        def reply(self, status, data):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def test_remote_rm_matches_the_local_rm(tiny_rm, reward_server):
    url, requests = reward_server
    prompts, completions, group = batch()
    local = helpfulness_rm(prompts, completions, model=str(tiny_rm), group=group, device="cpu")
    requests.clear()
    remote = remote_rm(prompts, completions, url=f"{url}/score", group=group, batch_size=3)
    assert remote == pytest.approx(local, abs=1e-6)
    assert [len(body["prompts"]) for _, _, body in requests] == [3, 3, 2]
    assert requests[0][2]["responses"][0] == "Knead for ten minutes."


def test_remote_rm_sends_the_token_from_the_environment(reward_server, monkeypatch):
    url, _ = reward_server
    prompts, completions, group = batch()
    monkeypatch.setenv("RM_TOKEN", "s3cret-token")
    assert len(remote_rm(prompts, completions, url=f"{url}/auth", group=group, token_env="RM_TOKEN")) == 8
    monkeypatch.setenv("RM_TOKEN", "wrong-token")
    with pytest.raises(UserError, match="answered HTTP 401") as exc:
        remote_rm(prompts, completions, url=f"{url}/auth", group=group, token_env="RM_TOKEN", retries=3)
    assert "wrong-token" not in str(exc.value)
    monkeypatch.delenv("RM_TOKEN")
    with pytest.raises(UserError, match="environment variable RM_TOKEN"):
        remote_rm(prompts, completions, url=f"{url}/auth", group=group, token_env="RM_TOKEN")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/slow", "no complete reply within 0.3 s"),
        ("/error", "HTTP 500: internal error"),
        ("/bad-json", "reply is not JSON"),
        ("/short", "expected 8 scores, got 1"),
    ],
)
def test_remote_rm_failures_end_in_one_line_naming_the_endpoint(reward_server, path, problem):
    url, requests = reward_server
    prompts, completions, group = batch()
    requests.clear()
    with pytest.raises(UserError) as exc:
        remote_rm(prompts, completions, url=url + path, group=group, timeout=0.3, retries=2, backoff=0.01)
    message = str(exc.value)
    assert (
        message.startswith(f"remote_rm: {url}{path}: ")
        and problem in message
        and "after 3 attempts" in message
    )
    assert "\n" not in message
    assert len(requests) == 3  # bounded retries


def test_remote_rm_unreachable_server():
    with pytest.raises(
        UserError,
        match=r"remote_rm: http://127.0.0.1:9/x: ConnectError: .* \(after 2 attempts\)",
    ):
        remote_rm(["p"], ["a"], url="http://127.0.0.1:9/x", retries=1, backoff=0.01)


# --- the reward stack: routing by label, user rewards sync and async --------------------------------------


def test_stack_calls_a_term_only_with_the_rows_it_applies_to():
    reward_fixtures.SEEN.clear()
    stack = RewardStack(
        [
            RewardSpec(name="reward_fixtures:recording", when="benign"),
            RewardSpec(name="reward_fixtures:async_length", when="all", args={"scale": 2.0}),
            RewardSpec(name="alphaalign_safety"),
        ]
    )
    labels = ["harmful", "benign", "harmful", "benign"]
    completions = [REFUSAL, "ab", "", "Ünï 🍞"]
    table = stack.score(["p0", "p1", "p2", "p3"], completions, {"label": labels, "group": [0, 1, 2, 3]})
    [seen] = reward_fixtures.SEEN
    assert seen == {
        "prompts": ["p1", "p3"],
        "completions": ["ab", "Ünï 🍞"],
        "label": ["benign", "benign"],
        "group": [1, 3],
    }
    assert table[:, 0].isnan().tolist() == [True, False, True, False]
    assert table[[1, 3], 0].tolist() == [2.0, 5.0]
    assert table[:, 1].tolist() == [2.0 * len(c) for c in completions]
    assert table[:, 2].tolist() == [1.5, 0.0, 0.0, 0.0]
    assert stack.names == ["recording", "async_length", "alphaalign_safety"]


def test_a_reward_without_kwargs_gets_only_the_columns_it_names():
    stack = RewardStack([RewardSpec(name="reward_fixtures:label_only", args={"bonus": 2.0})])
    columns = {"label": ["harmful", "benign"], "group": [0, 1], "config": ["c", "c"]}
    assert stack.score(["p", "q"], ["a", "b"], columns)[:, 0].tolist() == [2.0, 0.0]
    with pytest.raises(UserError, match="data column 'bonus' has the name of an argument of rewards.0"):
        stack.score(["p", "q"], ["a", "b"], {**columns, "bonus": [9.0, 9.0]})  # not silently the recipe's


def test_validate_rejects_a_reward_that_cannot_take_prompts_and_completions():
    check_reward_args(resolve_reward("reward_fixtures:label_only"), {"bonus": 1.0})
    with pytest.raises(ValueError, match="must take prompts and completions as its first two arguments"):
        check_reward_args(resolve_reward("reward_fixtures:completions_only"), {})


# --- the optional refusal classifier ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_refusal_classifier(tmp_path_factory):
    return build_tiny_classifier(
        tmp_path_factory.mktemp("clf") / "refusal", 2, labels=["compliance", "refusal"]
    )


def test_refusal_classifier_replaces_the_rules(tiny_refusal_classifier):
    path = str(tiny_refusal_classifier)
    completions = [tagged(a) for a in ANSWERS] + [REFUSAL, "I can't help with that."]
    answers = [*ANSWERS, "Sorry, I can't comply", "I can't help with that."]
    probs = label_probabilities(load_classifier(path), answers, "refusal")
    threshold = statistics.median(probs)
    refused = detect_refusals(answers, classifier=path, label="refusal", threshold=threshold)
    assert refused == [p >= threshold for p in probs]
    assert detect_refusals(answers) == [False] * 4 + [True, True]  # rules: the default
    rewards = alphaalign_safety(
        [""] * 6,
        completions,
        label=["benign"] * 6,
        refusal_classifier=path,
        refusal_label=1,
        refusal_threshold=threshold,
    )
    expected = [
        (0.5 if c != completions[-1] else 0.0) - float(r) for c, r in zip(completions, refused, strict=True)
    ]
    assert rewards == pytest.approx(expected)


# --- a short training run: every term is logged, the trainer passes the group column ------------------------


@pytest.mark.slow
def test_training_logs_every_reward_term(write_recipe, tiny_policy, tiny_rm, tmp_path):
    from alphaalign.config import load_recipe
    from alphaalign.rl.trainer import train

    rewards = [
        {"name": "alphaalign_safety"},
        {"name": "helpfulness_rm", "when": "benign", "args": {"model": str(tiny_rm), "device": "cpu"}},
        {"name": "reward_fixtures:async_length", "weight": 0.001},
        {"name": "reward_fixtures:recording", "weight": 0.0},
    ]
    path = recipe_for(write_recipe, tiny_policy, tmp_path, trainer={"max_steps": 2, "save_every": 10})
    reward_fixtures.SEEN.clear()
    train(load_recipe(path, [f"rewards={json.dumps(rewards)}"]))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in ("alphaalign_safety", "helpfulness_rm", "async_length", "recording"):
            assert f"reward/{name}/mean" in row, name
        assert row["reward/helpfulness_rm/mean"] >= 0
    for seen in reward_fixtures.SEEN:  # 4 prompts × 4 rollouts; a group is one prompt's rollouts
        assert sorted(seen["group"]) == [g for g in range(4) for _ in range(4)]
        by_group = {
            g: {p for p, q in zip(seen["prompts"], seen["group"], strict=True) if q == g} for g in range(4)
        }
        assert all(len(prompts) == 1 for prompts in by_group.values())


def test_remote_rm_edge_cases_match_the_local_rm(tiny_rm, reward_server):
    url, _ = reward_server
    texts = list(EDGE_CASES.values())
    prompts, group = ["How do I bake bread?"] * len(texts), [0] * len(texts)
    local = helpfulness_rm(prompts, texts, model=str(tiny_rm), group=group, device="cpu")
    assert remote_rm(prompts, texts, url=f"{url}/score", group=group) == pytest.approx(local, abs=1e-6)
