"""The wheel works outside the checkout: it is built, installed into a fresh virtual environment in a
temporary folder, and the commands that read shipped files (launch templates, DeepSpeed configs, recipes and
their data, the refusal set) run from a folder where the checkout is not importable.

The new environment gets its dependencies (torch, transformers, ...) from this one's site-packages, added by
path in a .pth file: nothing is downloaded, and this environment's own .pth files (an editable install of the
checkout among them) are not processed there.
"""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, demo_overrides, jsonl_rows

pytestmark = pytest.mark.slow

# What a source tree holds beyond the package's sources; a stale build/ folder would hide a missing file.
NOT_SOURCES = (
    ".git",
    ".venv",
    "build",
    "dist",
    "outputs",
    ".cache",
    "wandb",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
)


def run(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{tail}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the new environment's folder, its environment variables, a working folder outside the checkout)"""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        tmp / "dist",
        src,
    )
    (wheel,) = (tmp / "dist").glob("alphaalign-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # installed before the dependencies' path is added, so pip sees no other alphaalign there
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(purelib, "dependencies.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    work = tmp / "work"
    work.mkdir()
    return venv, env, work


def test_the_installed_package_is_the_wheel_and_holds_every_shipped_file(installed):
    venv, env, work = installed
    code = "import alphaalign.resources as r; print(r.package_path())"
    package = Path(run(venv / "bin" / "python", "-c", code, cwd=work, env=env).stdout.strip())
    assert package.is_relative_to(venv) and package.is_dir(), package  # not the checkout
    source = ROOT / "alphaalign"
    shipped = {
        (Path(d) / f).relative_to(source)
        for d, _, files in os.walk(source, followlinks=True)
        for f in files
        if not f.endswith((".py", ".pyc"))
    }
    assert {
        "launch_templates/slurm.sbatch.j2",
        "rl/deepspeed_configs/zero3.json",
        "recipes/demo.yaml",
        "eval/refusal_labels.jsonl",
    } <= {p.as_posix() for p in shipped}
    missing = sorted(str(p) for p in shipped if not (package / p).is_file())
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"


def test_validate_and_launch_a_shipped_zero_recipe(installed):
    venv, env, work = installed
    done = run("alphaalign", "validate", "demo_zero3", cwd=work, env=env)
    assert done.stdout.startswith("demo_zero3: ok") and "warning" not in done.stderr
    # the ZeRO config is read by name from the package: a wrong name lists what the wheel ships
    bad = subprocess.run(
        ["alphaalign", "validate", "demo_zero3", "trainer.deepspeed=zero9"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "shipped: zero2, zero2_offload, zero3, zero3_offload" in bad.stderr

    recipe = venv.glob("lib/python*/site-packages/alphaalign/recipes/demo_zero3.yaml")
    script = run(
        "alphaalign",
        "launch",
        "slurm",
        "demo_zero3",
        "--nodes",
        2,
        "--gpus-per-node",
        0,
        "--dry-run",
        cwd=work,
        env=env,
    ).stdout
    assert f"RECIPE={next(recipe)}\n" in script and "--nnodes=2 --nproc-per-node=1" in script
    script = run(
        "alphaalign",
        "launch",
        "local",
        "demo-vllm",
        "--gpus",
        0,
        "--vllm-servers",
        1,
        "--dry-run",
        cwd=work,
        env=env,
    ).stdout
    assert "/health" in script and "-m alphaalign.cli serve" in script  # wait_for_servers.sh.j2 included
    assert not (work / "outputs").exists()


def test_bench_and_the_refusal_set(installed):
    venv, env, work = installed
    out = work / "bench.json"
    run(
        "alphaalign",
        "bench",
        "--workload",
        "tiny",
        "--no-rewards",
        "--systems",
        "alphaalign",
        "--rounds",
        1,
        "--cache",
        work / "bench-cache",
        "--out",
        out,
        cwd=work,
        env=env,
    )
    assert json.loads(out.read_text())["workload"]["name"] == "tiny"
    code = "import json; from alphaalign.perf.rewards import refusal_accuracy; print(json.dumps(refusal_accuracy()))"
    assert json.loads(run(venv / "bin" / "python", "-c", code, cwd=work, env=env).stdout)["n"] == jsonl_rows(
        ROOT / "alphaalign" / "eval" / "refusal_labels.jsonl"
    )


def test_two_demo_training_steps(installed, tiny_policy):
    """The shipped demo recipe with its shipped data (paths relative to the recipe), the tiny test policy
    instead of the demo's (whose build takes minutes), and its held-out evaluation cut to 4 prompts."""
    venv, env, work = installed
    overrides = [o for o in demo_overrides(tiny_policy, 2) if o != "data.eval=[]"]
    overrides.append("data.eval.0.max_rows=4")
    done = run("alphaalign", "train", "demo", *overrides, cwd=work, env=env)
    assert "finished step 2" in done.stdout
    steps = [json.loads(line) for line in (work / "outputs/demo/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward/mean" in s] == [1, 2]
