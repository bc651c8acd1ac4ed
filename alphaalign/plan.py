"""The plan of a run, checked before anything starts.

A `Plan` says which processes run where: trainer processes (nodes x processes per node), GPUs that run vLLM
servers, and the memory of one GPU. `check_plan` refuses, in one line, every layout that would die later
(several trainer processes without DeepSpeed, servers for a recipe without the server engine, a process count
the batch does not divide, CUDA asked of CPU nodes), then estimates the memory of one trainer GPU and of one
server GPU from the models' architectures and refuses a plan that does not fit. `alphaalign validate`, `launch
slurm|local` and the trainer itself (with its real process count) use it; docs/launch.md has the formulas.

Architectures come from a small table of the models the shipped recipes use (no hub needed), from a local
folder's config.json, or from the Hugging Face cache; a model found in none of them is left out of the estimate
and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alphaalign import parsing
from alphaalign.config import Recipe
from alphaalign.errors import UserError

GB = 1e9  # GPU memory is sold in decimal GB: an "80 GB" A100/H100 has 80-85e9 bytes
DEFAULT_GPU_MEMORY = 80.0
VLLM_MEMORY_FRACTION = 0.9  # vLLM's default gpu_memory_utilization; `alphaalign serve` keeps it
RUNTIME_OVERHEAD = 2.5 * GB  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer (Qwen2, Llama) as its config.json describes it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # the output projection shares the embedding's weights
    qkv_bias: bool = False
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by module name."""
        h, q, kv, i = (
            self.hidden,
            self.heads * (self.head_dim or self.hidden // self.heads),
            self.kv_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        bias = (
            self.heads * (self.head_dim or self.hidden // self.heads) + 2 * self.kv_dim
            if self.qkv_bias
            else 0
        )
        return sum(a * b for a, b in self.linears().values()) + bias + 2 * self.hidden

    def params(self, lm_head: bool = True) -> int:
        """Parameter count; `lm_head` False: a sequence classifier, whose one-output head is negligible."""
        head = self.vocab * self.hidden if lm_head and not self.tied else 0
        return self.vocab * self.hidden + self.layers * self.layer_params + self.hidden + head

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        names = (
            self.linears()
            if targets == "all-linear"
            else {t: self.linears()[t] for t in targets if t in self.linears()}
        )
        return self.layers * sum(r * (a + b) for a, b in names.values())

    def activation_bytes_per_token(self, width: int) -> int:
        """What one decoder layer keeps for the backward pass per token: the normed inputs, q, k, v, the
        attention output, the residual and the SwiGLU MLP's four intermediate tensors."""
        return width * (6 * self.hidden + 2 * self.kv_dim + 4 * self.intermediate)


QWEN25_7B = Architecture(3584, 28, 28, 4, 18944, 152064, tied=False, qkv_bias=True)
QWEN25_3B = Architecture(2048, 36, 16, 2, 11008, 151936, tied=True, qkv_bias=True)
QWEN25_1_5B = Architecture(1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True)
QWEN25_0_5B = Architecture(896, 24, 14, 2, 4864, 151936, tied=True, qkv_bias=True)
LLAMA32_3B = Architecture(3072, 28, 24, 8, 8192, 128256, tied=True)
LLAMA3_8B = Architecture(4096, 32, 32, 8, 14336, 128256, tied=False)

# the config.json values of the paper's models and the reward models the recipes name (hub ids, lower case)
KNOWN_ARCHITECTURES = {
    "qwen/qwen2.5-7b-instruct": QWEN25_7B,
    "qwen/qwen2.5-7b": QWEN25_7B,
    "qwen/qwen2.5-3b-instruct": QWEN25_3B,
    "qwen/qwen2.5-3b": QWEN25_3B,
    "qwen/qwen2.5-1.5b-instruct": QWEN25_1_5B,
    "qwen/qwen2.5-1.5b": QWEN25_1_5B,
    "qwen/qwen2.5-0.5b-instruct": QWEN25_0_5B,
    "qwen/qwen2.5-0.5b": QWEN25_0_5B,
    "meta-llama/llama-3.2-3b-instruct": LLAMA32_3B,
    "meta-llama/llama-3.2-3b": LLAMA32_3B,
    "sfairxc/fsfairx-llama3-rm-v0.1": LLAMA3_8B,
    "skywork/skywork-reward-v2-llama-3.1-8b": LLAMA3_8B,
}


def architecture_from_config(config: dict) -> Architecture:
    """The architecture in a transformers config.json (KeyError when a size is missing)."""
    heads = config["num_attention_heads"]
    return Architecture(
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        head_dim=config.get("head_dim"),
    )


def find_architecture(name_or_path: str, base: Path | None = None) -> Architecture | None:
    """The table's entry, a local folder's config.json, or a config.json in the Hugging Face cache; None when
    none of them knows the model (nothing is downloaded)."""
    known = KNOWN_ARCHITECTURES.get(name_or_path.lower())
    if known is not None:
        return known
    local = Path(name_or_path).expanduser()
    if not local.is_absolute() and base is not None and not local.exists():
        local = base / local
    candidates = [local / "config.json"]
    if not local.exists() and name_or_path.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name_or_path, "config.json")
        except ValueError:  # not a valid repository id
            cached = None
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        try:
            return architecture_from_config(parsing.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# The plan and its checks


@dataclass(frozen=True)
class Plan:
    """Where the processes of a run go. `server_gpus`: GPUs (or CPU processes) running vLLM servers;
    `gpu_memory`: GB of one GPU (0 GPUs per trainer process: CPU)."""

    trainer_nodes: int = 1
    procs_per_node: int = 1
    server_gpus: int = 0
    gpus: bool = False
    gpu_memory: float = DEFAULT_GPU_MEMORY
    servers_asked: str = ""  # the flag or key that asked for the servers, with its value, for messages
    layout: str = "one trainer process"  # the layout in words, for the plan line and messages

    @property
    def trainer_procs(self) -> int:
        return self.trainer_nodes * self.procs_per_node


@dataclass
class Estimate:
    """GB per trainer GPU: terms held through the step, and the largest transient peak of one phase."""

    held: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    server: float = 0.0  # GB of one vLLM server GPU (0: no server GPUs)
    unknown: list[str] = field(default_factory=list)  # models whose architecture is unknown

    @property
    def total(self) -> float:
        return sum(self.held.values()) + max(self.peaks.values(), default=0.0)

    def describe(self, gpu_memory: float | None = None) -> str:
        peak = max(self.peaks, key=self.peaks.get) if self.peaks else None
        parts = [f"{name} {gb:.1f}" for name, gb in self.held.items() if gb >= 0.05]
        if peak:
            parts.append(f"{peak} {self.peaks[peak]:.1f}")
        of = f" of {gpu_memory:g}" if gpu_memory else ""
        text = f"{self.total:.1f}{of} GB per trainer GPU ({', '.join(parts)})"
        if self.server:
            text += f"; {self.server:.1f} GB of weights per vLLM server GPU"
        if self.unknown:
            text += f"; not counted (architecture unknown offline): {', '.join(self.unknown)}"
        return text


def check_structure(where: str, recipe: Recipe, plan: Plan) -> None:
    """The layout checks that need no model: refuses with one line naming the recipe key or flag."""
    n, tc = plan.trainer_procs, recipe.trainer
    if plan.server_gpus and recipe.rollout.engine != "vllm_server":
        raise UserError(
            f"{where}: rollout.engine: {plan.servers_asked} needs engine: vllm_server "
            f"(got {recipe.rollout.engine!r})"
        )
    if n > 1 and tc.deepspeed is None:
        raise UserError(
            f"{where}: trainer.deepspeed: {plan.layout} runs {n} trainer processes, which share the policy "
            "update only through DeepSpeed; set trainer.deepspeed (zero2, zero3) or launch one trainer process"
        )
    if tc.prompts_per_step % n:
        raise UserError(
            f"{where}: trainer.prompts_per_step: {tc.prompts_per_step} prompts do not split evenly over the "
            f"{n} trainer processes of {plan.layout}"
        )
    if not plan.gpus and tc.device == "cuda":
        raise UserError(f"{where}: trainer.device: 'cuda' on CPU only ({plan.layout}); use 'auto' or 'cpu'")


def check_plan(where: str, recipe: Recipe, plan: Plan) -> Estimate | None:
    """`check_structure`, then the memory of one GPU against `plan.gpu_memory`; the estimate (None on CPU)."""
    check_structure(where, recipe, plan)
    if not plan.gpus or recipe.trainer.device == "cpu":
        return None
    estimate = estimate_memory(recipe, plan)
    if estimate.total > plan.gpu_memory:
        raise UserError(
            f"{where}: does not fit: {plan.layout} needs about {estimate.describe()}, and a GPU has "
            f"{plan.gpu_memory:g} GB (--gpu-memory); what helps: {', '.join(knobs(recipe, estimate))}"
        )
    if estimate.server > plan.gpu_memory * VLLM_MEMORY_FRACTION:
        raise UserError(
            f"{where}: does not fit: a vLLM server holds the policy's {estimate.server:.1f} GB of weights in "
            f"{VLLM_MEMORY_FRACTION:g} x {plan.gpu_memory:g} GB (--gpu-memory) with room for its KV cache; "
            "serve it with tensor parallelism (edit the launch script) or use larger GPUs"
        )
    return estimate


def knobs(recipe: Recipe, estimate: Estimate) -> list[str]:
    """The settings that lower the estimate, the ones this recipe has not used yet."""
    found = []
    if estimate.held.get("vLLM on the trainer GPU"):
        found.append(
            "vLLM servers on their own GPUs (launch.vllm_gpus, --vllm-nodes, --vllm-gpus, --vllm-servers)"
        )
    found.append("more trainer GPUs (launch.gpus, --gpus, --gpus-per-node, --nodes)")
    ds = recipe.trainer.deepspeed
    if ds is None or ds in ("zero2", "zero2_offload"):
        found.append("trainer.deepspeed: zero3 (shards weights, gradients and optimizer state)")
    if ds is None or not ds.endswith("_offload"):
        found.append("trainer.deepspeed: zero3_offload (optimizer state and weights in CPU memory)")
    if not recipe.model.gradient_checkpointing:
        found.append("model.gradient_checkpointing: true")
    found.append(f"a smaller trainer.micro_batch_tokens (now {recipe.trainer.micro_batch_tokens})")
    if estimate.held.get("reward models"):
        found.append("the reward model served elsewhere (remote_rm) or on the CPU (args.device: cpu)")
    if recipe.model.lora is None:
        found.append("model.lora")
    return found


def deepspeed_settings(recipe: Recipe) -> tuple[int, bool, bool, dict]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded, zero_optimization); stage 0: no DeepSpeed."""
    if recipe.trainer.deepspeed is None:
        return 0, False, False, {}
    from alphaalign.rl.zero import read_config

    zero = read_config(recipe)["zero_optimization"]
    on_cpu = lambda key: zero.get(key, {}).get("device", "none") == "cpu"  # noqa: E731
    return zero["stage"], on_cpu("offload_optimizer"), on_cpu("offload_param"), zero


WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}
# the built-in rewards' args that load a classifier; any reward's refusal detector may load one too
SCORING_MODELS = {"helpfulness_rm": ("model",), "csrm": ("model", "helpfulness_model")}


def estimate_memory(recipe: Recipe, plan: Plan) -> Estimate:
    """GB per trainer GPU and per vLLM server GPU; docs/launch.md, "The plan check", has the formulas."""
    from alphaalign.data import recipe_base

    base = recipe_base(recipe)
    est = Estimate()
    mc, rc, tc = recipe.model, recipe.rollout, recipe.trainer
    arch = find_architecture(mc.name_or_path, base)
    n = plan.trainer_procs
    w = WIDTH[mc.dtype]
    if arch is None:
        est.unknown.append(mc.name_or_path)
    else:
        phi = arch.params()
        trainable = arch.lora_params(mc.lora.r, mc.lora.target_modules) if mc.lora else phi
        stage, opt_cpu, param_cpu, zero = deepspeed_settings(recipe)
        # LoRA adapters train in float32; full fine-tuning keeps gradients in the weights' dtype, and DeepSpeed
        # adds a float32 master copy to AdamW's two moments when the weights are 16-bit
        grad_bytes = 4 if mc.lora else w
        opt_bytes = 8 if mc.lora or w == 4 else (12 if stage else 2 * w)
        shards = n if stage else 1
        est.held["weights"] = 0 if param_cpu else w * phi / (n if stage == 3 else 1)
        est.held["gradients"] = grad_bytes * trainable / shards
        est.held["optimizer"] = 0 if opt_cpu else opt_bytes * trainable / shards
        if stage:
            if stage == 3:  # parameters gathered for the layers being computed, and the next ones prefetched
                largest = max(arch.layer_params, arch.vocab * arch.hidden)
                est.held["ZeRO-3 gathered"] = 2 * w * largest
            else:  # ZeRO-2's reduce and all-gather buckets (elements)
                buckets = zero.get("reduce_bucket_size", 5e8) + zero.get("allgather_bucket_size", 5e8)
                est.held["ZeRO-2 buckets"] = w * min(buckets, 2 * trainable)
        if recipe.algorithm.beta > 0 and (mc.lora is None or mc.ref_name_or_path):
            ref = find_architecture(mc.ref_name_or_path, base) if mc.ref_name_or_path else arch
            if ref is None:
                est.unknown.append(mc.ref_name_or_path)
            else:
                est.held["reference"] = w * ref.params() / (n if stage == 3 else 1)
        if recipe.critic is not None:  # PPO's value model: its own weights, gradients and AdamW state
            init = recipe.critic.init_from
            critic = arch if init == "policy" else find_architecture(init, base)
            if critic is None:
                est.unknown.append(init)
            else:  # its update's activations are the policy's without the vocabulary logits: no new peak
                params = critic.params(lm_head=False)
                learned = critic.lora_params(mc.lora.r, mc.lora.target_modules) if mc.lora else params
                est.held["critic"] = (0 if param_cpu else w * params / (n if stage == 3 else 1)) + (
                    grad_bytes + (0 if opt_cpu else opt_bytes)
                ) * learned / shards
        # one micro-batch's forward and backward: checkpointed layer inputs and one layer recomputed, or every
        # layer's activations; the completion logits in the model's dtype, their float32 copy and exponentials
        tokens = tc.micro_batch_tokens
        completion = tokens * rc.max_new_tokens / (rc.max_new_tokens + recipe.data.max_prompt_tokens)
        per_layer = arch.activation_bytes_per_token(w if mc.autocast is None else 2)
        if mc.gradient_checkpointing:
            acts = tokens * (arch.layers * arch.hidden * w + per_layer)
        else:
            acts = tokens * arch.layers * per_layer
        est.peaks["update activations"] = acts + completion * arch.vocab * (w + 8)
        if rc.engine == "transformers":  # the in-process engine's KV cache for one generate() call
            seq = recipe.data.max_prompt_tokens + rc.max_new_tokens
            est.peaks["generation KV cache"] = (
                rc.generation_batch_size * seq * arch.layers * 2 * arch.kv_dim * w
            )
        if plan.server_gpus or rc.servers:
            est.server = w * phi
    held_rm, peak_rm = 0.0, 0.0
    for spec in recipe.rewards:
        args = spec.args
        if args.get("device", "auto") == "cpu":
            continue
        for key in (*SCORING_MODELS.get(spec.name, ()), "refusal_classifier"):
            if not isinstance(args.get(key), str):
                continue
            rm = find_architecture(args[key], base)
            if rm is None:
                est.unknown.append(args[key])
                continue
            width = WIDTH.get(args.get("dtype"), 2)  # "auto": bfloat16 on a GPU
            held_rm += width * rm.params(lm_head=False)
            length = min(args.get("max_length", 4096), recipe.data.max_prompt_tokens + rc.max_new_tokens)
            batch = args.get("batch_size", 8)
            peak_rm = max(peak_rm, batch * length * width * (2 * rm.hidden + 3 * rm.intermediate))
    if held_rm:
        est.held["reward models"] = held_rm
        est.peaks["reward scoring"] = peak_rm
    if rc.engine == "vllm_server" and not plan.server_gpus and not rc.servers:
        # no servers in the plan: the trainer starts its own on its first GPU, which vLLM fills to its share
        est.held["vLLM on the trainer GPU"] = VLLM_MEMORY_FRACTION * plan.gpu_memory * GB
    est.held["runtime"] = RUNTIME_OVERHEAD
    est.held = {name: b / GB for name, b in est.held.items()}
    est.peaks = {name: b / GB for name, b in est.peaks.items()}
    est.server /= GB
    return est


# ---------------------------------------------------------------------------------------------------------
# The recipe's own layout


def recipe_plan(recipe: Recipe, gpus: int | None = None, gpu_memory: float | None = None) -> Plan:
    """The plan on one node of `gpus` GPUs (default: the recipe's launch.gpus), its GPUs split between vLLM
    servers and trainer processes in the recipe's proportion; without a launch section, one trainer process."""
    launch, gpu_memory = recipe.launch, gpu_memory or DEFAULT_GPU_MEMORY
    if launch is None:
        return Plan(
            gpus=bool(gpus if gpus is not None else recipe.trainer.device == "cuda"),
            gpu_memory=gpu_memory,
            layout="one trainer process",
        )
    gpus = launch.gpus if gpus is None else gpus
    servers = split_servers(recipe, gpus)
    return Plan(
        procs_per_node=gpus - servers,
        server_gpus=servers,
        gpus=True,
        gpu_memory=gpu_memory,
        servers_asked=f"launch.vllm_gpus: {launch.vllm_gpus}",
        layout=describe_split(gpus, servers),
    )


def split_servers(recipe: Recipe, gpus: int) -> int:
    """vLLM server GPUs out of `gpus`, in the proportion launch.vllm_gpus : launch.gpus, at least one of each
    kind when the recipe has servers."""
    launch = recipe.launch
    if launch is None or not launch.vllm_gpus:
        return 0
    if gpus < 2:
        raise UserError(
            f"{recipe._source or 'recipe'}: launch.vllm_gpus: the recipe puts vLLM servers and the trainer on "
            f"separate GPUs, and {gpus} GPU{'s' if gpus != 1 else ''} cannot be split"
        )
    return min(max(round(gpus * launch.vllm_gpus / launch.gpus), 1), gpus - 1)


def describe_split(gpus: int, servers: int) -> str:
    trainer = f"{gpus - servers} trainer process{'es' if gpus - servers > 1 else ''}"
    if not servers:
        return f"{gpus} GPU{'s' if gpus > 1 else ''}: {trainer}"
    return f"{gpus} GPUs: {servers} vLLM server{'s' if servers > 1 else ''} (GPU {gpu_range(0, servers)}), {trainer} (GPU {gpu_range(servers, gpus)})"


def gpu_range(first: int, end: int) -> str:
    return str(first) if end - first == 1 else f"{first}-{end - 1}"


def plan_line(plan: Plan, estimate: Estimate | None) -> str:
    """The plan in one line: the layout, and the memory estimate on GPUs."""
    memory = f"; memory: {estimate.describe(plan.gpu_memory)}" if estimate else ""
    return f"plan: {plan.layout}{memory}"
