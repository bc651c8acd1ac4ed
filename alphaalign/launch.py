"""Launchers: the trainer and its vLLM servers as one Slurm job (`alphaalign launch slurm`) or on one
machine (`alphaalign launch local`).

The Slurm job script is rendered from the template launch_templates/slurm.sbatch.j2: servers on the first
nodes, the trainer under torchrun on the others, ports derived from the job id, per-role logs in the run's
output folder, and `--requeue` with automatic resume. docs/launch.md explains the layout and how it scales.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from alphaalign import templates
from alphaalign.config import Recipe
from alphaalign.errors import UserError
from alphaalign.plan import (
    DEFAULT_GPU_MEMORY,
    GB,
    Plan,
    check_plan,
    describe_split,
    gpu_range,
    plan_line,
    split_servers,
)
from alphaalign.resources import package_path
from alphaalign.rollout.vllm_launch import free_port

TEMPLATE_DIR = package_path("launch_templates")
PORT_STRIDE = 32  # ports reserved per job: the rendezvous, then one per server on a node
SAFE_VALUE = re.compile(r"[\w.,:@/+=-]+")  # what may go into an #SBATCH line unquoted
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")


@dataclass(frozen=True)
class SlurmLayout:
    """Which node runs what. With one node and one vLLM node, the server and the trainer share the node."""

    nodes: int
    gpus_per_node: int
    vllm_nodes: int
    vllm_gpus: int = 0  # on a shared node: GPUs 0..vllm_gpus-1 serve, the rest train

    @property
    def shared_node(self) -> bool:
        return self.nodes == 1 and self.vllm_nodes == 1

    @property
    def trainer_nodes(self) -> int:
        return 1 if self.shared_node else self.nodes - self.vllm_nodes

    @property
    def servers_per_node(self) -> int:
        """One server per GPU (one per node without GPUs)."""
        if self.shared_node and self.gpus_per_node:
            return self.vllm_gpus
        return self.gpus_per_node or 1

    @property
    def trainer_procs(self) -> int:
        """torchrun processes per trainer node: one per GPU it owns, one on CPU."""
        if self.shared_node and self.gpus_per_node:
            return self.gpus_per_node - self.vllm_gpus
        return self.gpus_per_node or 1

    @property
    def trainer_gpus(self) -> str:
        """CUDA_VISIBLE_DEVICES for the trainer on a shared GPU node; empty when it owns its nodes."""
        if self.shared_node and self.gpus_per_node:
            return ",".join(str(i) for i in range(self.vllm_gpus, self.gpus_per_node))
        return ""


def check_layout(layout: SlurmLayout) -> None:
    n, g, m, v = layout.nodes, layout.gpus_per_node, layout.vllm_nodes, layout.vllm_gpus
    if n < 1:
        raise UserError(f"--nodes: must be at least 1 (got {n})")
    if g < 0:
        raise UserError(f"--gpus-per-node: must be 0 (CPU) or more (got {g})")
    if m < 0 or (m >= n and not layout.shared_node):
        raise UserError(
            f"--vllm-nodes: must be at least 0 and less than --nodes {n}, or 1 with --nodes 1 (got {m})"
        )
    if layout.shared_node and g and not 0 < v < g:
        raise UserError(
            f"--vllm-gpus: with one node shared by servers and trainer, give 1..{g - 1} GPUs to the servers (got {v})"
        )
    if v and not (layout.shared_node and g):
        raise UserError("--vllm-gpus: only for --nodes 1 --vllm-nodes 1 with GPUs (the node is split)")
    if layout.servers_per_node >= PORT_STRIDE:
        raise UserError(f"--gpus-per-node: at most {PORT_STRIDE - 1} servers per node (got {g})")


def check_recipe_for_launch(recipe_path: str, recipe: Recipe) -> None:
    """What a launched run needs from its recipe beyond `alphaalign validate` and the plan check."""
    if recipe.trainer.resume_from != "auto":
        raise UserError(
            f"{recipe_path}: trainer.resume_from: must be 'auto' for a launched run, so that a requeued or "
            f"restarted job resumes from its newest checkpoint (got {recipe.trainer.resume_from!r})"
        )


def slurm_plan(layout: SlurmLayout, gpu_memory: float | None) -> Plan:
    """The plan check's view of a Slurm layout."""
    servers = layout.vllm_nodes * layout.servers_per_node
    n, g = layout.nodes, layout.gpus_per_node
    nodes = f"{n} node{'s' if n > 1 else ''}"
    where = f"{nodes} x {g} GPU{'s' if g > 1 else ''}" if g else f"{n} CPU node{'s' if n > 1 else ''}"
    if layout.shared_node and g:
        where += f" (GPU {gpu_range(0, layout.vllm_gpus)}: vLLM servers)"
    elif layout.vllm_nodes:
        where += f" ({layout.vllm_nodes} with {servers} vLLM server{'s' if servers > 1 else ''})"
    procs = layout.trainer_procs
    trainer = f"trainer {layout.trainer_nodes} node{'s' if layout.trainer_nodes > 1 else ''} x {procs} process{'es' if procs > 1 else ''}"
    return Plan(
        trainer_nodes=layout.trainer_nodes,
        procs_per_node=procs,
        server_gpus=servers,
        gpus=g > 0,
        gpu_memory=gpu_memory or DEFAULT_GPU_MEMORY,
        servers_asked=f"--vllm-nodes {layout.vllm_nodes}",
        layout=f"{where}, {trainer}",
    )


def check_sbatch_value(flag: str, value: str | None, pattern: re.Pattern = SAFE_VALUE) -> None:
    if value is not None and not pattern.fullmatch(value):
        raise UserError(f"{flag}: {value!r} is not a valid value here")


def render(
    template: str, recipe_path: str, recipe: Recipe, overrides: list[str], run_dir: Path, **values
) -> str:
    """Render a template from launch_templates/ with what every launcher needs: the recipe, its overrides (the
    run's output folder appended), the folders, this Python, and the servers' start timeout."""
    env = templates.environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(template).render(
        workdir=Path.cwd(),
        run_dir=shlex.quote(str(run_dir)),
        log_dir=run_dir / "logs",
        python=shlex.quote(sys.executable),
        recipe=shlex.quote(str(recipe._source or Path(recipe_path).resolve())),
        overrides=" ".join(shlex.quote(o) for o in [*overrides, f"trainer.output_dir={run_dir}"]),
        server_start_timeout=int(recipe.rollout.server_start_timeout),
        **values,
    )


def render_slurm(
    recipe_path: str,
    recipe: Recipe,
    overrides: list[str],
    layout: SlurmLayout,
    run_dir: Path,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
) -> str:
    """The sbatch script for this recipe and layout (arguments already checked)."""
    return render(
        "slurm.sbatch.j2",
        recipe_path,
        recipe,
        overrides,
        run_dir,
        job_name=f"alphaalign-{Path(recipe_path).stem}",
        nodes=layout.nodes,
        gpus_per_node=layout.gpus_per_node,
        vllm_nodes=layout.vllm_nodes,
        shared_node=layout.shared_node,
        trainer_nodes=layout.trainer_nodes,
        servers_per_node=layout.servers_per_node,
        trainer_procs=layout.trainer_procs,
        trainer_gpus=layout.trainer_gpus,
        partition=partition,
        account=account,
        time=time,
        port_stride=PORT_STRIDE,
    )


@dataclass(frozen=True)
class LocalLayout:
    """One machine: `servers` vLLM servers (server i on GPU i), the trainer on the remaining GPUs."""

    gpus: int
    servers: int

    @property
    def trainer_procs(self) -> int:
        return self.gpus - self.servers if self.gpus else 1

    @property
    def trainer_gpus(self) -> str:
        return ",".join(str(i) for i in range(self.servers, self.gpus))


def check_local_layout(layout: LocalLayout) -> None:
    if layout.gpus < 0:
        raise UserError(f"--gpus: must be 0 (CPU) or more (got {layout.gpus})")
    if layout.servers < 0 or (layout.gpus and layout.servers >= layout.gpus):
        raise UserError(
            f"--vllm-servers: must be at least 0{f' and less than --gpus {layout.gpus}' if layout.gpus else ''}"
            f" (got {layout.servers})"
        )


def local_layout(
    recipe_path: str, recipe: Recipe, gpus: int | None, servers: int | None, gpu_memory: float | None
) -> tuple[LocalLayout, float]:
    """The layout of `launch local` (and of `alphaalign train` for a recipe with a launch: section) and the
    memory of one GPU. Left out, --gpus is every GPU torch sees for a recipe written for a GPU node, one GPU
    (or the CPU) otherwise; --vllm-servers the recipe's share of them; --gpu-memory the first GPU's."""
    if gpus is None:
        import torch

        visible = torch.cuda.device_count()
        if visible and gpu_memory is None:
            gpu_memory = torch.cuda.get_device_properties(0).total_memory / GB
        if recipe.launch is not None and not visible:
            launch = recipe.launch
            raise UserError(
                f"{recipe_path}: launch: written for a node of {launch.gpus} GPUs of {DEFAULT_GPU_MEMORY:g} GB "
                f"({describe_split(launch.gpus, launch.vllm_gpus)}) and no CUDA GPU is visible here; on CPU, "
                "rehearse it with `python -m pytest tests/integration/test_rehearsal.py` (a local Slurm: "
                "launch/ci/slurm_setup.sh, as root) or run the CPU demo with `make train`"
            )
        gpus = visible if recipe.launch is not None else min(visible, 1)
    if servers is None:
        servers = split_servers(recipe, gpus) if gpus else 0
    return LocalLayout(gpus, servers), gpu_memory or DEFAULT_GPU_MEMORY


def local_plan(layout: LocalLayout, gpu_memory: float) -> Plan:
    """The plan check's view of a one-machine layout."""
    if layout.gpus:
        where = describe_split(layout.gpus, layout.servers)
    else:
        where = f"CPU: {layout.servers} vLLM server(s), 1 trainer process"
    return Plan(
        procs_per_node=layout.trainer_procs,
        server_gpus=layout.servers,
        gpus=layout.gpus > 0,
        gpu_memory=gpu_memory,
        servers_asked=f"--vllm-servers {layout.servers}",
        layout=where,
    )


def free_ports(count: int) -> list[int]:
    """`count` different ports that are free now on 127.0.0.1."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def render_local(
    recipe_path: str, recipe: Recipe, overrides: list[str], layout: LocalLayout, run_dir: Path
) -> str:
    """The bash script that runs the servers and the trainer on this machine."""
    return render(
        "local.sh.j2",
        recipe_path,
        recipe,
        overrides,
        run_dir,
        servers=layout.servers,
        server_ports=free_ports(layout.servers),
        gpus=layout.gpus,
        trainer_procs=layout.trainer_procs,
        trainer_gpus=layout.trainer_gpus,
    )


def check_run_dir(run_dir: Path) -> None:
    if not SAFE_VALUE.fullmatch(str(run_dir)) or not SAFE_VALUE.fullmatch(str(Path.cwd())):
        raise UserError(
            f"--output-dir: {run_dir} (and the current folder {Path.cwd()}) must not contain spaces or "
            "shell characters: they go into the launch script's #SBATCH lines and paths"
        )


def submit(script: str, run_dir: Path) -> tuple[str, Path]:
    """Write the script into the run's folder and submit it; returns (job id, script path)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("--submit: sbatch is not on PATH (use --dry-run to print the script instead)")
    path = write_script(script, run_dir)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--submit: sbatch refused {path}: {reason}")
    return done.stdout.strip().split(";")[0], path


def write_script(script: str, run_dir: Path, name: str = "slurm.sbatch") -> Path:
    """Write `<run_dir>/<name>`; the logs folder must exist before Slurm opens the job's output file."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(script)
    return path


def run_slurm(args) -> int:
    """`alphaalign launch slurm`: check the layout and the recipe, then print, write or submit the script."""
    layout = SlurmLayout(args.nodes, args.gpus_per_node, args.vllm_nodes, args.vllm_gpus)
    check_layout(layout)
    check_sbatch_value("--partition", args.partition)
    check_sbatch_value("--account", args.account)
    check_sbatch_value("--time", args.time, SLURM_TIME)
    recipe, run_dir = validate_for_launch(args)
    check_recipe_for_launch(args.recipe, recipe)
    estimate = check_plan(args.recipe, recipe, slurm_plan(layout, args.gpu_memory))
    check_run_dir(run_dir)
    script = render_slurm(
        args.recipe, recipe, args.overrides, layout, run_dir, args.partition, args.time, args.account
    )
    line = plan_line(slurm_plan(layout, args.gpu_memory), estimate)
    if args.dry_run:
        print(script, end="")
        print(line, file=sys.stderr)
    elif args.submit:
        print(line)
        job_id, path = submit(script, run_dir)
        print(f"submitted job {job_id}: script {path}, logs in {run_dir / 'logs'}")
    else:
        print(line)
        path = write_script(script, run_dir)
        print(f"wrote {path}; submit it with: sbatch {path}")
    return 0


def run_local(args) -> int:
    """`alphaalign launch local`: check the layout and the recipe, then run the script here."""
    recipe, run_dir = validate_for_launch(args)
    layout, gpu_memory = local_layout(args.recipe, recipe, args.gpus, args.vllm_servers, args.gpu_memory)
    check_local_layout(layout)
    check_recipe_for_launch(args.recipe, recipe)
    plan = local_plan(layout, gpu_memory)
    estimate = check_plan(args.recipe, recipe, plan)
    check_run_dir(run_dir)
    script = render_local(args.recipe, recipe, args.overrides, layout, run_dir)
    if args.dry_run:
        print(script, end="")
        print(plan_line(plan, estimate), file=sys.stderr)
        return 0
    print(plan_line(plan, estimate), flush=True)
    if layout.servers:  # the servers would each die at start, after the trainer waited for them
        from alphaalign.rollout.vllm_launch import require_vllm

        require_vllm()
    path = write_script(script, run_dir, "local.sh")
    print(f"running {path}", flush=True)
    return subprocess.run(["bash", str(path)]).returncode


def validate_for_launch(args):
    """The recipe with --output-dir applied, and the run's output folder as an absolute path."""
    from alphaalign.validate import validate

    extra = [f"trainer.output_dir={args.output_dir}"] if args.output_dir else []
    recipe = validate(args.recipe, [*args.overrides, *extra])
    return recipe, Path(recipe.trainer.output_dir).expanduser().absolute()
