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
