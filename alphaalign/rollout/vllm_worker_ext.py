"""A vLLM worker extension: reload the policy's weights from a Hugging Face checkpoint folder in place.

Servers started by `alphaalign serve` load it with `--worker-extension-cls
alphaalign.rollout.vllm_worker_ext.WeightReloader`; the trainer calls it through the dev-mode route
`POST /collective_rpc {"method": "alphaalign_reload", "kwargs": {"weights_path": DIR}}`.

Why not plain `reload_weights`: on CPU, vLLM packs each output layer's weight into a kernel-specific copy
when the model loads. A reload re-packs the layers whose tensors come from the checkpoint, but a tied
`lm_head` is an alias of the embedding and is skipped, so it would keep sampling from the old weights.
This method re-packs every `ParallelLMHead` after the reload. On GPUs there is no packed copy.
This module is imported inside vLLM's worker processes only.
"""

from __future__ import annotations

import time


class WeightReloader:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def alphaalign_reload(self, weights_path: str) -> dict:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
        from vllm.platforms import current_platform

        start = time.perf_counter()
        self.reload_weights(weights_path=weights_path)
        repacked = 0
        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            with set_current_vllm_config(self.vllm_config):
                for module in self.model_runner.get_model().modules():
                    if isinstance(module, ParallelLMHead):
                        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                        repacked += 1
        return {"seconds": time.perf_counter() - start, "lm_heads_repacked": repacked}
