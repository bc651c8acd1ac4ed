"""Pushing the trainer's policy weights to vLLM servers: `rollout.weight_sync` picks one of three ways.

checkpoint  save the full weights (HF safetensors) to a new folder per version, then every server reloads
            them in place (`/collective_rpc` → the `alphaalign_reload` worker extension) and drops its
            prefix cache, whose keys do not change with the weights. Needs VLLM_SERVER_DEV_MODE=1.
lora        save the PEFT adapter to a new folder per version and load it under one name with
            `/v1/load_lora_adapter {load_inplace: true}`; the base weights never move.
nccl        stream the weights over NCCL with trl's `VLLMClient` (vLLM's weight-transfer engine); GPUs only.

Folders: a server re-reads an adapter from its folder whenever the adapter is evicted, and a folder that
vanished kills its engine, so only versions older than the last `keep` (≥ 2: the current one and the one a
server may still be reading) are deleted, after every server has been pointed at the new one.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from alphaalign.errors import UserError
from alphaalign.rollout.vllm_server import PrefixCacheReset, ReloadReply, ServerError

ADAPTER_NAME = "policy"

Restart = Callable[[Path], None]  # a new server on the weights in a folder, in place of one that failed


class WeightSync(Protocol):
    """What the server engine (`VLLMServerEngine`) asks of a weight sync; each backend below declares it."""

    model_name: str | None  # the model name requests ask for (the adapter's); None: the server's own
    restart: Restart | None  # given when the trainer started the server itself: the last resort on failure

    def attach(self, clients: list) -> None:
        """The engine's clients, one per server, given once when the engine starts."""
        ...

    def push(self, version: int, state_dict: dict | None = None) -> None:
        """Every attached server serves `version` when this returns. `state_dict`: the whole weights when
        the policy's own are sharded (DeepSpeed ZeRO-3)."""
        ...


class _FolderSync(WeightSync):
    """Shared by the checkpoint and lora backends: one folder per version, the oldest pruned."""

    model_name: str | None = None

    def __init__(self, policy, root: Path, keep: int, restart: Restart | None = None):
        self.policy, self.root, self.keep, self.restart = policy, Path(root), keep, restart
        self.clients: list = []

    def attach(self, clients: list) -> None:
        self.clients = clients

    def push(self, version: int, state_dict: dict | None = None) -> None:
        """`state_dict`: the whole weights when the policy's own are sharded (DeepSpeed ZeRO-3)."""
        folder = self.root / f"v{version:06d}"
        shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted run
        self.policy.save_pretrained(folder, state_dict=state_dict)
        for client in self.clients:
            self.load(client, folder)
        for old in sorted(self.root.glob("v*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, client, folder: Path) -> None:
        raise NotImplementedError


class CheckpointSync(_FolderSync):
    """`restart(folder)`, when given (a server the trainer started), replaces a server whose reload failed."""

    def load(self, client, folder: Path) -> None:
        rpc = {"method": "alphaalign_reload", "kwargs": {"weights_path": str(folder.resolve())}}
        try:
            client.call("POST", "/collective_rpc", rpc, reply=ReloadReply)
            client.call("POST", "/reset_prefix_cache", reply=PrefixCacheReset)
        except ServerError as exc:
            if self.restart is None:
                raise ServerError(f"{exc} (restart that server on {folder} to go on)") from None
            print(f"weight sync: {exc}; restarting the server on {folder}", file=sys.stderr, flush=True)
            self.restart(folder)
            client.reset()


class LoraSync(_FolderSync):
    model_name = ADAPTER_NAME

    def load(self, client, folder: Path) -> None:
        request = {"lora_name": ADAPTER_NAME, "lora_path": str(folder.resolve()), "load_inplace": True}
        client.call("POST", "/v1/load_lora_adapter", request)  # answers plain text; the status says it all
        client.call("POST", "/reset_prefix_cache", reply=PrefixCacheReset)


class NcclSync(WeightSync):
    """vLLM's NCCL weight transfer through trl 1.16's client; each server gets its own process group."""

    model_name: str | None = None
    restart: Restart | None = None  # a stream that failed leaves no folder to restart a server on

    def __init__(self, policy, group_port: int = 51216):
        check_weight_sync("nccl")
        self.policy, self.group_port = policy, group_port
        self.clients: list = []

    def attach(self, clients: list) -> None:
        from trl.generation.vllm_client import VLLMClient

        device = next(self.policy.parameters()).device
        for i, client in enumerate(clients):
            nccl = VLLMClient(base_url=client.url, group_port=self.group_port + i)
            if "authorization" in client.http.headers:  # the server's token (vllm_auth.py)
                nccl.session.headers["Authorization"] = client.http.headers["authorization"]
            nccl.init_communicator(device=device)
            self.clients.append(nccl)

    def push(self, version: int, state_dict: dict | None = None) -> None:
        # gathered weights come only from DeepSpeed runs, which the recipe check refuses nccl
        assert state_dict is None, "nccl weight sync streams the policy's own (whole) weights"
        for client in self.clients:
            client.update_model_params(self.policy)
            client.reset_prefix_cache()


class GatheredSync(WeightSync):
    """Weight pushes to vLLM servers from a DeepSpeed run: every rank takes part, rank 0 pushes.

    The server engine calls `push` holding its lock, so when all ranks have passed the first barrier none of
    them is generating; the weights are gathered (`whole_weights`, a collective: ZeRO-3's shards, None when
    every rank holds them whole), rank 0 pushes them, and the second barrier keeps every rank from
    generating before the servers have the new version."""

    def __init__(self, sync: WeightSync, ranks, whole_weights: Callable[[], dict | None]):
        self.sync, self.ranks, self.whole_weights = sync, ranks, whole_weights
        self.model_name, self.restart = sync.model_name, sync.restart

    def attach(self, clients: list) -> None:
        self.sync.attach(clients)

    def push(self, version: int, state_dict: dict | None = None) -> None:
        self.ranks.barrier()
        state = self.whole_weights()
        if self.ranks.is_main:
            self.sync.push(version, state)
        self.ranks.barrier()


def check_weight_sync(kind: str) -> None:
    """What a backend needs of this machine, checked before a server is started for it."""
    if kind == "nccl" and not torch.cuda.is_available():
        raise UserError(
            "rollout.weight_sync: 'nccl' streams weights over NCCL and needs CUDA GPUs; use 'checkpoint' or 'lora'"
        )


def make_weight_sync(kind: str, policy, root: Path, keep: int, restart: Restart | None = None) -> WeightSync:
    """`restart`: how to replace a server that failed to reload (the trainer's own server); used by the
    checkpoint backend."""
    if kind == "nccl":
        return NcclSync(policy)
    return {"checkpoint": CheckpointSync, "lora": LoraSync}[kind](policy, root, keep, restart)
