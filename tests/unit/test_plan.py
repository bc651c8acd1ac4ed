"""The plan check (alphaalign/plan.py): architectures, the memory estimate against hand-computed numbers, and the
shipped GPU recipes' plans on one and several nodes (`make train` of such a recipe without a GPU:
tests/integration/test_cli_process.py)."""

import json
import re
import sys

import pytest
from helpers import ROOT

from alphaalign.cli import main
from alphaalign.config import load_recipe
from alphaalign.errors import UserError
from alphaalign.plan import (
    LLAMA3_8B,
    LLAMA32_3B,
    QWEN25_3B,
    QWEN25_7B,
    Plan,
    check_plan,
    estimate_memory,
    find_architecture,
    recipe_plan,
)

QWEN = ROOT / "recipes" / "alphaalign-qwen.yaml"


def test_parameter_counts_match_the_published_models():
    # the counts transformers reports for the hub checkpoints
    assert QWEN25_7B.params() == 7_615_616_512
    assert QWEN25_3B.params() == 3_085_938_688
    assert LLAMA32_3B.params() == 3_212_749_824
    assert LLAMA3_8B.params() == 8_030_261_248
    assert LLAMA3_8B.params(lm_head=False) == 8_030_261_248 - 128256 * 4096  # a classifier: no LM head


def test_a_local_config_json_is_read(tmp_path):
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = find_architecture(str(tmp_path))
    # embedding 1000*64; per layer q, o 64*64, k, v 64*32, MLP 3*64*128, two norms; the final norm
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert arch.params() == 1000 * 64 + 2 * per_layer + 64
    assert find_architecture(str(tmp_path / "missing")) is None


def test_memory_of_the_7b_recipe_by_hand():
    """alphaalign-qwen on its 8 GPUs: ZeRO-3 over 4 trainer processes, bf16, the 8B RM on each of them."""
    recipe = load_recipe(QWEN)
    est = estimate_memory(recipe, recipe_plan(recipe))
    phi, rm = 7_615_616_512, 8_030_261_248 - 128256 * 4096
    assert est.held["weights"] == pytest.approx(2 * phi / 4 / 1e9)  # bf16, sharded
    assert est.held["gradients"] == pytest.approx(2 * phi / 4 / 1e9)
    assert est.held["optimizer"] == pytest.approx(12 * phi / 4 / 1e9)  # fp32 master + two AdamW moments
    assert est.held["ZeRO-3 gathered"] == pytest.approx(2 * 2 * 152064 * 3584 / 1e9)  # the embedding, twice
    assert est.held["reward models"] == pytest.approx(2 * rm / 1e9)
    assert "reference" not in est.held  # beta 0
    # 8192 tokens: 28 checkpointed layer inputs (bf16) and one layer recomputed; 4096 completion tokens of logits
    # in bf16 plus their float32 copy and exponentials
    layer = 2 * (6 * 3584 + 2 * 512 + 4 * 18944)
    update = 8192 * (28 * 3584 * 2 + layer) + 4096 * 152064 * (2 + 8)
    assert est.peaks["update activations"] == pytest.approx(update / 1e9)
    assert est.total == pytest.approx(sum(est.held.values()) + update / 1e9)
    assert 55 < est.total < 65 and est.server == pytest.approx(2 * phi / 1e9)


def test_memory_of_one_process_without_deepspeed_by_hand(write_recipe):
    """float32 weights updated in one process: weights, gradients and AdamW's two moments, 16 bytes a parameter;
    a KL reference copy; no gradient checkpointing: every layer's activations; the in-process KV cache."""
    path = write_recipe(
        {
            "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"},
            "algorithm": {"beta": 0.1},
            "trainer": {"micro_batch_tokens": 1024, "device": "cuda"},
            "rollout": {"max_new_tokens": 256, "generation_batch_size": 4},
        }
    )
    recipe = load_recipe(path)
    est = estimate_memory(recipe, Plan(gpus=True))
    phi = 494_032_768  # Qwen2.5-0.5B
    assert phi == find_architecture("Qwen/Qwen2.5-0.5B-Instruct").params()
    assert est.held["weights"] + est.held["gradients"] + est.held["optimizer"] == pytest.approx(
        16 * phi / 1e9
    )
    assert est.held["reference"] == pytest.approx(4 * phi / 1e9)
    acts = 1024 * 24 * 4 * (6 * 896 + 2 * 128 + 4 * 4864) + 1024 * 256 / 768 * 151936 * (4 + 8)
    assert est.peaks["update activations"] == pytest.approx(acts / 1e9)
    assert est.peaks["generation KV cache"] == pytest.approx(4 * 768 * 24 * 2 * 128 * 4 / 1e9)


def test_a_7b_policy_on_one_trainer_gpu_is_refused_with_the_numbers_and_the_knobs():
    recipe = load_recipe(QWEN)
    with pytest.raises(UserError) as refused:
        check_plan("r.yaml", recipe, recipe_plan(recipe, gpus=2))  # 1 server + 1 trainer process
    message = str(refused.value)
    assert "\n" not in message
    assert re.match(
        r"r\.yaml: does not fit: 2 GPUs: 1 vLLM server \(GPU 0\), 1 trainer process \(GPU 1\) needs "
        r"about (\d+\.\d) GB per trainer GPU \(weights 15\.2, gradients 15\.2, optimizer 91\.4",
        message,
    )
    assert "and a GPU has 80 GB (--gpu-memory); what helps: " in message
    assert "trainer.deepspeed: zero3_offload" in message and "more trainer GPUs" in message
    assert "the reward model served elsewhere (remote_rm)" in message
    with pytest.raises(UserError, match="does not fit"):
        check_plan("r.yaml", recipe, recipe_plan(recipe, gpu_memory=40))  # 8 GPUs of 40 GB


def test_a_self_started_server_counts_on_the_trainer_gpu(write_recipe):
    """vllm_server without servers in the plan: rank 0 starts its own vLLM, which takes its share of the GPU."""
    recipe = load_recipe(write_recipe({"rollout": {"engine": "vllm_server"}, "trainer": {"device": "cuda"}}))
    with pytest.raises(UserError, match=r"vLLM on the trainer GPU 72\.0.*vLLM servers on their own GPUs"):
        check_plan("r.yaml", recipe, Plan(gpus=True))


def test_unknown_models_are_left_out_and_named(write_recipe):
    recipe = load_recipe(
        write_recipe({"model": {"name_or_path": "someone/unknown-model"}, "trainer": {"device": "cuda"}})
    )
    est = check_plan("r.yaml", recipe, Plan(gpus=True))
    assert est.unknown == ["someone/unknown-model"] and "not counted" in est.describe(80)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launch={gpus: 4, vllm_gpus: 4}"],
            "launch.vllm_gpus: 4 leaves none of the node's 4 GPUs to the trainer",
        ),
        (
            ["rollout.engine=transformers"],
            "launch.vllm_gpus: 4 GPUs for vLLM servers need rollout.engine: vllm_server",
        ),
        (
            ["trainer.deepspeed=null", "model.dtype=float32"],
            "trainer.deepspeed: 8 GPUs: 4 vLLM servers (GPU 0-3), 4 trainer processes",
        ),
        (
            ["launch.vllm_gpus=2"],
            "trainer.prompts_per_step: 16 prompts do not split evenly over the 6 trainer",
        ),
    ],
)
def test_validate_refuses_a_recipe_whose_own_plan_would_die(capsys, overrides, message):
    assert main(["validate", str(QWEN), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_shipped_recipe_on_two_nodes_runs_only_with_a_server_node(capsys, tmp_path):
    """The issue's unrunnable script: 2 nodes x 8 GPUs without --vllm-nodes trained 16 processes with no servers;
    the trainer would start its own vLLM on a training GPU. Refused; with a server node the plan runs."""
    args = [
        "launch",
        "slurm",
        str(QWEN),
        "--nodes",
        2,
        "--gpus-per-node",
        8,
        "--output-dir",
        tmp_path / "run",
    ]
    assert main([*map(str, args), "--dry-run"]) == 2
    assert "does not fit: 2 nodes x 8 GPUs, trainer 2 nodes x 8 processes needs" in capsys.readouterr().err
    assert main([*map(str, args), "--vllm-nodes", "1", "--dry-run"]) == 0
    script, err = capsys.readouterr()
    assert "--nnodes=1 --nproc-per-node=8" in script and "alphaalign.cli serve" in script
    assert re.fullmatch(
        r"plan: 2 nodes x 8 GPUs \(1 with 8 vLLM servers\), trainer 1 node x 8 processes; memory: "
        r"\d+\.\d of 80 GB per trainer GPU \(.*\); 15\.2 GB of weights per vLLM server GPU\n",
        err,
    )


def test_launch_local_splits_the_gpus_by_the_recipes_share(capsys, tmp_path):
    qwen3b = (
        ROOT / "recipes" / "alphaalign-qwen3b.yaml"
    )  # written for 4 GPUs: 2 servers + 2 trainer processes
    for recipe, gpus, servers, trainer in (
        (QWEN, 8, 4, "4,5,6,7"),
        (qwen3b, 8, 4, "4,5,6,7"),
        (qwen3b, 4, 2, "2,3"),
    ):
        args = [
            "launch",
            "local",
            str(recipe),
            "--gpus",
            str(gpus),
            "--output-dir",
            str(tmp_path),
            "--dry-run",
        ]
        code = main(args)
        script, err = capsys.readouterr()
        assert code == 0, err
        assert (
            f"CUDA_VISIBLE_DEVICES={trainer} \\\n" in script
            and f"--nproc-per-node={gpus - servers}" in script
        )
        assert len(re.search(r"^for port in ([\d ]+); do$", script, re.M).group(1).split()) == servers
        assert err.startswith(f"plan: {gpus} GPUs: {servers} vLLM servers")
    # the 7B recipe's share of 4 GPUs leaves 2 trainer processes: ZeRO-3 over 2 does not fit in 80 GB
    assert (
        main(["launch", "local", str(QWEN), "--gpus", "4", "--output-dir", str(tmp_path), "--dry-run"]) == 2
    )
    assert "does not fit: 4 GPUs: 2 vLLM servers (GPU 0-1), 2 trainer processes" in capsys.readouterr().err


def test_offloading_and_the_csrm_recipes_reward_models():
    recipe = load_recipe(QWEN, ["trainer.deepspeed=zero3_offload"])
    est = estimate_memory(recipe, recipe_plan(recipe))
    assert est.held["weights"] == est.held["optimizer"] == 0  # both in CPU memory
    assert est.held["gradients"] == pytest.approx(2 * 7_615_616_512 / 4 / 1e9)
    csrm = load_recipe(ROOT / "recipes" / "alphaalign-qwen-csrm.yaml")
    est = estimate_memory(csrm, recipe_plan(csrm))
    # the 8B helpfulness model is counted; the CSRM is a train-rm output that does not exist yet
    assert est.held["reward models"] == pytest.approx(2 * (8_030_261_248 - 128256 * 4096) / 1e9)
    assert est.unknown == ["outputs/csrm-qwen"]


def test_launch_local_with_servers_needs_vllm_installed_before_it_writes_anything(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed
    args = [
        "launch",
        "local",
        "demo-vllm",
        "--gpus",
        "0",
        "--vllm-servers",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out.startswith("plan: CPU: 1 vLLM server(s), 1 trainer process\n")
    assert err.startswith("error: rollout.engine: vllm_server needs vLLM here") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
