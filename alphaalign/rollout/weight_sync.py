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
from pathlib import Path

import torch

from alphaalign.errors import UserError
from alphaalign.rollout.vllm_server import PrefixCacheReset, ReloadReply, ServerError

ADAPTER_NAME = "policy"


class _FolderSync:
    """Shared by the checkpoint and lora backends: one folder per version, the oldest pruned."""

    model_name: str | None = None

    def __init__(self, policy, root: Path, keep: int):
        self.policy, self.root, self.keep = policy, Path(root), keep
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
    """`restart(folder)`, when set (a server the trainer started), replaces a server whose reload failed."""

    restart = None

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


class NcclSync:
    """vLLM's NCCL weight transfer through trl 1.16's client; each server gets its own process group."""

    model_name: str | None = None

    def __init__(self, policy, group_port: int = 51216):
        if not torch.cuda.is_available():
            raise UserError(
                "rollout.weight_sync: 'nccl' streams weights over NCCL and needs CUDA GPUs; use 'checkpoint' or 'lora'"
            )
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

    def push(self, version: int) -> None:
        for client in self.clients:
            client.update_model_params(self.policy)
            client.reset_prefix_cache()


def make_weight_sync(kind: str, policy, root: Path, keep: int):
    if kind == "nccl":
        return NcclSync(policy)
    return {"checkpoint": CheckpointSync, "lora": LoraSync}[kind](policy, root, keep)
