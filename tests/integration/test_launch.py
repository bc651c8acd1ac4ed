"""`alphaalign launch`: the rendered scripts' structure, argument checks, the CPU demo run on a real Slurm
(trainer only, requeued and resumed; and beside a vLLM server step) and on this machine.

The Slurm tests need a running cluster (`bash launch/ci/slurm_setup.sh` brings one up on localhost; `.ci/run`
does it before the tests) and skip with the reason otherwise.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import (
    DEMO_RECIPE,
    FINISHED,
    ROOT,
    demo_overrides,
    freeze_trainer,
    job_field,
    job_report,
    launch,
    read_metrics,
    wait_for,
)

from alphaalign.cli import main

# ---------------------------------------------------------------------------------------------------------
# The rendered script


def test_dry_run_trainer_only_on_four_gpu_nodes(capsys, write_recipe, tmp_path):
    recipe = write_recipe(
        {"trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": "zero2", "prompts_per_step": 32}}
    )
    code, script, _ = launch(
        capsys,
        "slurm",
        recipe,
        "--nodes",
        4,
        "--gpus-per-node",
        8,
        "--partition",
        "gpu",
        "--time",
        "2-00:00:00",
        "--account",
        "lab",
        "--dry-run",
        "trainer.max_steps=7",
    )
    assert code == 0
    assert script.startswith("#!/bin/bash\n")
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M))
    assert directives["nodes"] == "4" and directives["gpus-per-node"] == "8"
    assert (
        directives["partition"] == "gpu"
        and directives["time"] == "2-00:00:00"
        and directives["account"] == "lab"
    )
    assert "requeue" in directives and directives["output"] == f"{tmp_path}/run/logs/job-%j.out"
    steps = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(steps) == 1 and "--overlap" in steps[0] and "--nodes=4" in steps[0]
    assert "--nnodes=4 --nproc-per-node=8" in script
    assert '--rdzv-endpoint="${TRAINER_NODES[0]}:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"' in script
    assert "RDZV_PORT=$PORT_BASE" in script and "PORT_BASE=$((20000 + SLURM_JOB_ID % 1000 * 32))" in script
    assert f"OVERRIDES=(trainer.max_steps=7 trainer.output_dir={tmp_path}/run)" in script
    assert "alphaalign.cli serve" not in script
    assert not (tmp_path / "run").exists()  # --dry-run writes nothing


def steps_of(script: str) -> list[str]:
    """The script's srun command lines, continuation lines joined."""
    return [line for line in script.replace("\\\n", " ").splitlines() if line.startswith("srun ")]


def test_dry_run_servers_on_the_first_of_four_gpu_nodes(capsys, write_recipe, tmp_path):
    recipe = write_recipe(
        {
            "rollout": {"engine": "vllm_server", "server_start_timeout": 900},
            "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": "zero3", "prompts_per_step": 48},
        }
    )
    code, script, _ = launch(
        capsys, "slurm", recipe, "--nodes", 4, "--gpus-per-node", 8, "--vllm-nodes", 1, "--dry-run"
    )
    assert code == 0
    assert 'SERVER_NODES=("${NODES[@]:0:1}")' in script and 'TRAINER_NODES=("${NODES[@]:1}")' in script
    server, trainer = steps_of(script)
    assert server.endswith("&") and "alphaalign.cli serve" in server and "--host 0.0.0.0" in server
    # the servers on other nodes are reachable by the network, so every job has its own secret, made when
    # the job runs (not written into the script) and passed in the environment only
    assert 'export ALPHAALIGN_VLLM_TOKEN="$("$PYTHON" -c \'import secrets;' in script
    assert script.index("export ALPHAALIGN_VLLM_TOKEN") < script.index(server.split()[0] + " --overlap")
    assert "--overlap --nodes=1 --ntasks-per-node=8" in server and "server-%N-%t.log" in server
    assert (
        "export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in server
        and "--port $((SERVER_PORT + SLURM_LOCALID))" in server
    )
    assert "--overlap --nodes=3 --ntasks-per-node=1" in trainer and "--nnodes=3 --nproc-per-node=8" in trainer
    assert "trainer-%N.log" in trainer and "CUDA_VISIBLE_DEVICES" not in trainer
    # explicit task counts: a step would otherwise inherit the job's 4 tasks (test_rehearsal.py ran into it)
    assert "--ntasks=8 " in server and "--ntasks=3 " in trainer
    assert "SERVER_PORT=$((PORT_BASE + 1))" in script  # the rendezvous keeps PORT_BASE
    assert 'SERVER_URLS+=("http://$node:$((SERVER_PORT + i))")' in script and "i < 8" in script
    assert "deadline=$((SECONDS + 900))" in script  # rollout.server_start_timeout
    assert script.index('OVERRIDES+=("rollout.servers=[$(IFS=,; echo "${SERVER_URLS[*]}")]")') < script.index(
        trainer.split()[0] + " --overlap --nodes=3"
    )
    assert "trap stop_servers EXIT" in script


def test_dry_run_one_gpu_node_split_between_servers_and_trainer(capsys, write_recipe, tmp_path):
    recipe = write_recipe(
        {
            "rollout": {"engine": "vllm_server"},
            "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": "zero2", "prompts_per_step": 24},
        }
    )
    args = ("--nodes", 1, "--gpus-per-node", 8, "--vllm-nodes", 1, "--vllm-gpus", 2, "--dry-run")
    code, script, _ = launch(capsys, "slurm", recipe, *args)
    assert code == 0
    server, trainer = steps_of(script)
    assert "--nodes=1 --ntasks-per-node=2" in server
    assert "--host 127.0.0.1" in server and "0.0.0.0" not in script  # one node: loopback only
    assert 'SERVER_URLS+=("http://127.0.0.1:$((SERVER_PORT + i))")' in script
    assert "export ALPHAALIGN_VLLM_TOKEN=" in script
    assert "env CUDA_VISIBLE_DEVICES=2,3,4,5,6,7" in trainer and "--nnodes=1 --nproc-per-node=6" in trainer
    code, _, err = launch(capsys, "slurm", recipe, *args[:-3], "--dry-run")
    assert code == 2 and "--vllm-gpus: with one node shared by servers and trainer, give 1..7" in err


def test_the_trainer_refuses_to_run_as_several_processes(capsys, monkeypatch, write_recipe, tmp_path):
    """torchrun with more than one process per run would train the run twice over: one clear line instead."""
    recipe = write_recipe({"trainer": {"output_dir": str(tmp_path / "run")}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(recipe)]) == 2
    assert (
        "trainer.deepspeed: WORLD_SIZE=2 runs 2 trainer processes, which share the policy update only through "
        "DeepSpeed" in capsys.readouterr().err
    )


def test_the_script_is_valid_bash(capsys, write_recipe, tmp_path):
    recipe = write_recipe({"trainer": {"output_dir": str(tmp_path / "run")}})
    _, script, _ = launch(capsys, "slurm", recipe, "--nodes", 2, "--gpus-per-node", 0, "--dry-run")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--nodes", 2, "--gpus-per-node", 8, "--vllm-nodes", 2],
            "--vllm-nodes: must be at least 0 and less than",
        ),
        (["--nodes", 0, "--gpus-per-node", 8], "--nodes: must be at least 1"),
        (["--nodes", 2, "--gpus-per-node", -1], "--gpus-per-node: must be 0 (CPU) or more"),
        (
            ["--nodes", 2, "--gpus-per-node", 8, "--vllm-gpus", 2],
            "--vllm-gpus: only for --nodes 1 --vllm-nodes 1",
        ),
        (
            ["--nodes", 2, "--gpus-per-node", 8, "--time", "two hours"],
            "--time: 'two hours' is not a valid value",
        ),
        (["--nodes", 2, "--gpus-per-node", 8, "--partition", "gpu\n#SBATCH --x"], "--partition:"),
        (
            ["--nodes", 2, "--gpus-per-node", 8, "--vllm-nodes", 1],
            "rollout.engine: --vllm-nodes 1 needs engine: vllm_server",
        ),
        (
            ["--nodes", 2, "--gpus-per-node", 8, "trainer.resume_from=none"],
            "trainer.resume_from: must be 'auto'",
        ),
        (["--nodes", 2, "--gpus-per-node", 8, "trainer.max_steps=0"], "trainer.max_steps:"),
        # the plan check (alphaalign/plan.py): layouts that would die once started
        (
            ["--nodes", 2, "--gpus-per-node", 8],
            "trainer.deepspeed: 2 nodes x 8 GPUs, trainer 2 nodes x 8 "
            "processes runs 16 trainer processes, which share the policy update only through DeepSpeed",
        ),
        (
            ["--nodes", 2, "--gpus-per-node", 6, "trainer.deepspeed=zero2"],
            "trainer.prompts_per_step: 16 prompts do not split evenly over the 12 trainer processes",
        ),
        (["--nodes", 1, "--gpus-per-node", 0, "trainer.device=cuda"], "trainer.device: 'cuda' on CPU only"),
        (
            [
                "--nodes",
                1,
                "--gpus-per-node",
                1,
                "rollout.engine=vllm_server",
                "rollout.weight_sync=nccl",
                "model.lora={r: 8}",
            ],
            "rollout.weight_sync: 'nccl' streams whole weights by name and cannot push LoRA",
        ),
        (
            ["--nodes", 1, "--gpus-per-node", 1, "rollout.engine=vllm_server", "rollout.weight_sync=lora"],
            "rollout.weight_sync: 'lora' pushes LoRA adapters, and this recipe has no model.lora",
        ),
        (
            ["--nodes", 1, "--gpus-per-node", 1, "--gpu-memory", 16],
            "does not fit: 1 node x 1 GPU, trainer 1 node x 1 process needs about",
        ),
    ],
)
def test_bad_arguments_and_recipes_exit_2_with_one_line_and_write_nothing(
    capsys, write_recipe, tmp_path, args, message
):
    recipe = write_recipe({"trainer": {"output_dir": str(tmp_path / "run")}})
    code, out, err = launch(capsys, "slurm", recipe, *args, "--submit")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# A real Slurm


def slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return (
            "sbatch not found: `bash launch/ci/slurm_setup.sh` installs and starts a local Slurm "
            "(Debian; needs root or passwordless sudo)"
        )
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if done.returncode != 0 or not {"idle", "mixed"} & set(done.stdout.split()):
        return f"no idle Slurm node (sinfo: {(done.stdout + done.stderr).strip()!r}); run launch/ci/slurm_setup.sh"
    return None


needs_slurm = pytest.mark.skipif(slurm_unavailable() is not None, reason=str(slurm_unavailable()))


def submit(capsys, tmp_path, *args) -> str:
    """`alphaalign launch slurm recipes/demo.yaml ... --submit` on the local one-node cluster; the job id."""
    code, out, err = launch(
        capsys,
        "slurm",
        DEMO_RECIPE,
        "--nodes",
        1,
        "--gpus-per-node",
        0,
        "--time",
        10,
        "--output-dir",
        tmp_path / "run",
        "--submit",
        *args,
    )
    assert code == 0, err
    return re.search(r"^submitted job (\d+): .*\n\Z", out, re.M).group(1)  # after the plan it prints


@pytest.mark.slow
@needs_slurm
def test_slurm_demo_trainer_only_completes_and_resumes_after_requeue(capsys, tiny_policy, tmp_path):
    """The demo for 20 steps, --vllm-nodes 0: frozen and requeued once its step-2 checkpoint exists, the job
    runs its script again, the trainer resumes from its newest checkpoint before the end and completes."""
    steps = 20
    run = tmp_path / "run"
    job = submit(capsys, tmp_path, "--vllm-nodes", 0, *demo_overrides(tiny_policy, steps=steps))
    assert (run / "slurm.sbatch").is_file()

    deadline, polls = time.monotonic() + 180, 0
    while not (run / "checkpoints" / "step-000002" / "state.json").exists():  # a step takes ~0.1 s: poll fast
        polls += 1
        if polls % 100 == 0:
            assert job_field(job, "JobState") in {"PENDING", "RUNNING"}, job_report(job, run)
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.01)
    freeze_trainer(run)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(job, {"PENDING"}, 60)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)  # no requeue delay

    assert wait_for(job, FINISHED, 240) == "COMPLETED", job_report(job, run)
    assert job_field(job, "Restarts") == "1"
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1))
    assert (run / "checkpoints" / f"step-{steps:06d}" / "state.json").is_file()
    (trainer_log_path,) = (run / "logs").glob("trainer-*.log")  # named after the node's host name
    trainer_log = trainer_log_path.read_text()
    resumed = re.search(r"resuming from \S+/step-(\d+) \(step (\d+)\)", trainer_log)
    assert resumed and 2 <= int(resumed.group(2)) < steps, trainer_log[-2000:]
    assert f"finished step {steps}" in trainer_log
    job_log = (run / "logs" / f"job-{job}.out").read_text()
    assert "(restart 0)" in job_log and "(restart 1)" in job_log and "trainer exited with 0" in job_log


def served_demo_overrides(policy) -> list[str]:
    """The shortened demo with its rollouts from a vLLM server, 2 steps."""
    return [
        *demo_overrides(policy, steps=2),
        "rollout.engine=vllm_server",
        "rollout.timeout=120",
        "rollout.max_new_tokens=16",
        "data.max_prompt_tokens=96",
    ]


def check_served_run(run, log_text: str, server_log) -> None:
    """Both steps trained on rollouts from the launched server, which the trainer did not start itself, and
    the server is gone once the run ended."""
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["time/weight_sync_s"] > 0 for r in rows)
    assert (run / "checkpoints" / "step-000002" / "state.json").is_file()
    url = re.search(r"servers up after \d+ s: (http://\S+)", log_text).group(1)
    assert "trainer exited with 0" in log_text
    assert "POST /v1/completions" in server_log.read_text()
    assert "starting a vLLM server" not in log_text
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


@pytest.mark.slow
@needs_slurm
def test_slurm_demo_with_a_vllm_server_step_beside_the_trainer(capsys, vllm_cpu_env, vllm_policy, tmp_path):
    """One node, --vllm-nodes 1: the server step and the trainer step share it (srun --overlap); the
    trainer's rollouts come from that server, and the server is stopped when the trainer exits."""
    run = tmp_path / "run"
    job = submit(capsys, tmp_path, "--vllm-nodes", 1, *served_demo_overrides(vllm_policy))
    assert wait_for(job, FINISHED, 480) == "COMPLETED", job_report(job, run)
    (trainer_log,) = (run / "logs").glob("trainer-*.log")
    (server_log,) = (run / "logs").glob("server-*-0.log")
    job_log = (run / "logs" / f"job-{job}.out").read_text()
    check_served_run(run, job_log + trainer_log.read_text(), server_log)


# ---------------------------------------------------------------------------------------------------------
# One machine


def launch_local(tmp_path, *args) -> subprocess.CompletedProcess:
    """`alphaalign launch local recipes/demo.yaml ...` in a child process, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "alphaalign.cli",
        "launch",
        "local",
        str(DEMO_RECIPE),
        "--output-dir",
        str(tmp_path / "run"),
        *map(str, args),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=480)


def test_local_dry_run_splits_the_gpus(capsys, write_recipe, tmp_path):
    recipe = write_recipe(
        {
            "rollout": {"engine": "vllm_server"},
            "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": "zero2", "prompts_per_step": 6},
        }
    )
    code, script, _ = launch(capsys, "local", recipe, "--gpus", 8, "--vllm-servers", 2, "--dry-run")
    assert code == 0 and subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    ports = re.search(r"^for port in (\d+) (\d+); do$", script, re.M).groups()
    assert len(set(ports)) == 2
    assert "CUDA_VISIBLE_DEVICES=$i \\\n" in script and "CUDA_VISIBLE_DEVICES=2,3,4,5,6,7 \\\n" in script
    assert "--standalone --nproc-per-node=6" in script
    assert script.index("export ALPHAALIGN_VLLM_TOKEN=") < script.index('"$PYTHON" -m alphaalign.cli serve')
    assert not (tmp_path / "run").exists()
    code, _, err = launch(capsys, "local", recipe, "--gpus", 2, "--vllm-servers", 2, "--dry-run")
    assert code == 2 and "--vllm-servers: must be at least 0 and less than --gpus 2 (got 2)" in err


@pytest.mark.slow
def test_local_demo_trainer_only_runs_and_a_second_launch_resumes(tiny_policy, tmp_path):
    run = tmp_path / "run"
    first = launch_local(tmp_path, "--gpus", 0, *demo_overrides(tiny_policy, steps=2))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "finished step 2" in (run / "logs" / "trainer.log").read_text()
    again = launch_local(tmp_path, "--gpus", 0, *demo_overrides(tiny_policy, steps=3))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        "resuming from" in again.stdout and "(step 2)" in again.stdout and "finished step 3" in again.stdout
    )
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert (run / "local.sh").is_file()


@pytest.mark.slow
def test_local_demo_with_a_vllm_server(vllm_cpu_env, vllm_policy, tmp_path):
    run = tmp_path / "run"
    done = launch_local(tmp_path, "--gpus", 0, "--vllm-servers", 1, *served_demo_overrides(vllm_policy))
    assert done.returncode == 0, (
        done.stdout + done.stderr + (run / "logs" / "server-0.log").read_text()[-3000:]
    )
    check_served_run(run, done.stdout, run / "logs" / "server-0.log")
