"""The command line as a user runs it, each call in a fresh process: `alphaalign validate` accepts every shipped
recipe without a warning, and `alphaalign train` of a GPU recipe on a machine without a GPU stops in one line."""

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

from alphaalign.config import load_recipe
from alphaalign.rm.recipe import RewardModelRecipe

QWEN = ROOT / "recipes" / "alphaalign-qwen.yaml"
SHIPPED = sorted({*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "recipes").glob("**/*.yaml")})


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates_without_a_warning(path):
    """`alphaalign validate`, as a user runs it, accepts every shipped recipe, checks its plan (the memory of
    one GPU for the GPU recipes) and writes nothing to stderr; the train-rm recipes of recipes/rm/ load."""
    if path.parent.name == "rm":  # `alphaalign train-rm` recipes, another schema
        assert isinstance(load_recipe(path, schema=RewardModelRecipe), RewardModelRecipe)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "alphaalign.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    ok, plan = done.stdout.splitlines()
    assert ok.startswith(f"{path}: ok (")
    if load_recipe(path).launch is not None:
        assert re.search(r"memory: \d+\.\d of 80 GB per trainer GPU \(weights", plan), plan
    else:
        assert plan == "plan: one trainer process"


def test_make_train_of_a_gpu_recipe_without_a_gpu_says_what_it_needs(tmp_path):
    """`make train RECIPE=alphaalign-qwen` runs `alphaalign train recipes/alphaalign-qwen.yaml`: outside torchrun
    a recipe with a launch: section starts as `launch local`, which counts no GPU here and stops."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    command = [
        sys.executable,
        "-m",
        "alphaalign.cli",
        "train",
        str(QWEN),
        f"trainer.output_dir={tmp_path / 'run'}",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert (
        "launch: written for a node of 8 GPUs of 80 GB (8 GPUs: 4 vLLM servers (GPU 0-3), 4 trainer"
        in done.stderr
    )
    assert (
        "no CUDA GPU is visible here" in done.stderr and "tests/integration/test_rehearsal.py" in done.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_reader_that_stops_early_costs_no_output_file_and_no_traceback(tmp_path):
    """`alphaalign eval-detector DATA --json T | head`: the table (here 3,000 groups, more than a pipe holds) is cut
    off where the reader stopped, and the command still writes T, which comes after the table."""
    import json

    rows = [
        {"response": "I can't help with that.", "refused": 1, "source": f"group-{i:04d}"} for i in range(3000)
    ]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "table.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "alphaalign.cli", "eval-detector", str(data), "--json", str(table)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
    ) as proc:
        assert proc.stdout.readline().startswith(b"judge: rules")
        proc.stdout.close()  # as `head -1` does
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, stderr
    assert stderr == ""
    assert len(json.loads(table.read_text())["groups"]) == 3001  # every group, and "all"
