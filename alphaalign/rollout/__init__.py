"""Rollout engines: in-process transformers, or vLLM servers with weight sync (`rollout.engine`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from alphaalign.config import Recipe
from alphaalign.parallel import ONE_PROCESS


def make_engine(
    recipe: Recipe,
    policy,
    tokenizer,
    out: Path,
    resources: contextlib.ExitStack,
    ranks=ONE_PROCESS,
    whole_weights: Callable[[], dict | None] | None = None,
):
    """The recipe's engine; servers, clients and threads it starts are released by `resources`. Under
    DeepSpeed every rank has its own engine; a server the trainer starts is started by rank 0 alone, and
    weight pushes are collective: `whole_weights` gathers the weights on rank 0 (None when not sharded)."""
    rc = recipe.rollout
    if rc.engine == "transformers":
        from alphaalign.rollout.transformers_engine import TransformersEngine

        return TransformersEngine(policy, tokenizer, rc.generation_batch_size, rc.static_cache)

    from alphaalign.rollout.vllm_launch import LocalServer, require_vllm
    from alphaalign.rollout.vllm_server import VLLMServerEngine
    from alphaalign.rollout.weight_sync import GatheredSync, check_weight_sync, make_weight_sync

    check_weight_sync(rc.weight_sync)  # before a server starts
    servers, token, restart = rc.servers, None, None  # servers given: their token is in the environment
    if not servers:
        url = None
        if ranks.is_main:
            require_vllm()
            server = LocalServer(
                recipe, out / "logs" / "vllm_server.log", start_timeout=rc.server_start_timeout
            )
            resources.callback(server.stop)
            url = server.wait_ready()
            # its own server: restarting it is the last resort of checkpoint sync
            restart, token = server.restart, server.token
        url, token = ranks.gather((url, token))[0]  # every rank's clients send the server's token
        servers = [url]
    sync_dir = Path(rc.weight_sync_dir or out / "weight_sync")
    sync = make_weight_sync(rc.weight_sync, policy, sync_dir, rc.weight_sync_keep, restart)
    if whole_weights is not None:
        sync = GatheredSync(sync, ranks, whole_weights)
    vocab_size = policy.config.vocab_size  # the embedding's rows: a larger id would crash the trainer
    engine = VLLMServerEngine(
        servers, sync, rc.timeout, rc.retries, recipe.trainer.seed, ranks.rank, token, vocab_size
    )
    resources.callback(engine.close)
    return engine
