"""The `alphaalign` command line: the parser, and dispatch to the module that runs each command (its
`run(args)`, imported only when that command runs: `alphaalign --help` loads no torch).

User mistakes end with one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

from alphaalign.errors import UserError
from alphaalign.masking import mask_override, mask_text


def cmd_train(args) -> int:
    from alphaalign.validate import validate

    recipe = validate(args.recipe, args.overrides)
    if recipe.launch is not None and "WORLD_SIZE" not in os.environ:
        from alphaalign.launch import run_local

        # written for a GPU node: servers and a torchrun trainer as `alphaalign launch local` lays them out
        args.gpus = args.vllm_servers = args.output_dir = None
        args.gpu_memory, args.dry_run = None, False
        return run_local(args)
    from alphaalign.report import train_and_report

    return train_and_report(recipe)


def cmd_serve(args) -> int:
    from alphaalign.rollout.vllm_launch import serve
    from alphaalign.validate import validate

    return serve(validate(args.recipe, args.overrides), args.host, args.port)


RECIPE_HELP = "recipe YAML file, or the name of a shipped recipe (demo, alphaalign-qwen, ...)"


def finite_float(text: str) -> float:
    """argparse type of every float flag: inf and nan are refused (a NaN temperature samples garbage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (batch sizes, lengths, samples, rounds): at least 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of GPU counts: 0 (CPU) or more."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (CPU) or more, got {value}")
    return value


def port(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {value}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (torch's names for the devices the project runs on)."""
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


JUDGE_HELP = (
    "who judges refusals: rules, classifier, llm, a YAML file, or inline YAML such as "
    "'{type: llm, model: M, url: http://host:8000/v1, rubric: strongreject}' (docs/evaluation.md)"
)


class Parser(argparse.ArgumentParser):
    """argparse with mistakes in one line (no usage block), exit code 2 as argparse has it."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="alphaalign", description="Safety alignment with RL on verifiable rewards.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in [
        ("train", cmd_train, "train a policy with a recipe"),
        (
            "validate",
            "alphaalign.validate:run",
            "check a recipe, its data and rewards without loading models",
        ),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help=RECIPE_HELP)
        p.add_argument(
            "overrides", nargs="*", help="dotted overrides, values parsed as YAML: trainer.learning_rate=1e-6"
        )
        p.set_defaults(fn=fn)
        if name == "validate":
            p.add_argument(
                "--gpus",
                type=non_negative_int,
                help="check the plan on a node of this many GPUs (default: the "
                "recipe's launch.gpus, else one trainer process)",
            )
            add_gpu_memory_argument(p)
    score = sub.add_parser("score", help="score completions in a JSONL file with a recipe's reward terms")
    score.add_argument("--input", required=True, help="JSONL rows with prompt, completion, optional label")
    score.add_argument("--output", required=True, help="JSONL: the input rows plus rewards, total, verdicts")
    score.add_argument("--recipe", help="use this recipe's rewards (default: rule-based alphaalign_safety)")
    score.add_argument("--only", help="comma-separated reward terms to compute (default: all)")
    score.add_argument("--judge", help=JUDGE_HELP + "; default: the recipe's judge: block, else rules")
    score.set_defaults(fn="alphaalign.scoring:run")
    det = sub.add_parser(
        "eval-detector", help="a refusal judge's agreement with human labels (acc, P, R, F1 per group)"
    )
    det.add_argument(
        "data", help="labelled responses: JSONL, JSON, CSV or parquet (each may be gzipped: .jsonl.gz)"
    )
    det.add_argument("--judge", default="rules", help=JUDGE_HELP + "; default rules")
    det.add_argument("--response-field", default="response", help="the response's field (default response)")
    det.add_argument("--label-field", default="refused", help="0/1 refusal label field (default refused)")
    det.add_argument("--prompt-field", default="prompt", help="prompt field, for llm judges (default prompt)")
    det.add_argument(
        "--by",
        help="group the table by this field (dotted paths reach into objects, e.g. orig_label.tone; "
        "'' for none; default source where the rows have it); rows without the field form the group (none)",
    )
    det.add_argument("--errors", help="write the misclassified rows (with the judge's verdict) to this JSONL")
    det.add_argument("--json", help="write the table as JSON to this file")
    det.set_defaults(fn="alphaalign.judges.agreement:run")
    train_rm = sub.add_parser("train-rm", help="train a configurable safety reward model (CSRM)")
    train_rm.add_argument(
        "recipe",
        help="train-rm recipe YAML file (or a shipped one: rm/csrm-demo), or a first key=value to give "
        "the recipe inline",
    )
    train_rm.add_argument(
        "overrides", nargs="*", help="dotted overrides: training.epochs=3 data.pairs=[p.jsonl]"
    )
    train_rm.set_defaults(fn="alphaalign.rm.train:run")
    eval_rm = sub.add_parser(
        "eval-rm", help="F1, precision, recall and ECE of a CSRM on CoSApien/DynaBench files"
    )
    eval_rm.add_argument(
        "files", nargs="+", help="JSONL/JSON/CSV/parquet files in CoSApien or DynaBench format"
    )
    eval_rm.add_argument("--model", required=True, help="the CSRM: a folder from train-rm, or a hub id")
    eval_rm.add_argument("--format", choices=["auto", "cosapien", "dynabench"], default="auto")
    eval_rm.add_argument(
        "--threshold", type=finite_float, default=0.5, help="predict a violation when P(violation) >= this"
    )
    eval_rm.add_argument(
        "--temperature", type=finite_float, help="override the stored calibration temperature"
    )
    eval_rm.add_argument("--bias", type=finite_float, help="override the stored calibration bias")
    eval_rm.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    eval_rm.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    eval_rm.add_argument("--batch-size", type=positive_int, default=8)
    eval_rm.add_argument(
        "--max-length", type=positive_int, default=4096, help="tokens per chat, cut at the end"
    )
    eval_rm.add_argument("--output", help="also write the metrics as JSON here")
    eval_rm.set_defaults(fn="alphaalign.rm.agreement:run")
    serve = sub.add_parser(
        "serve", help="start a vLLM server configured for a recipe (rollout.engine: vllm_server)"
    )
    serve.add_argument("recipe", help=RECIPE_HELP)
    serve.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=port, default=8000)
    serve.set_defaults(fn=cmd_serve)

    ev = sub.add_parser(
        "eval", help="safety evaluation: refusal, ASR, over-refusal, pass@k (docs/evaluation.md)"
    )
    ev.add_argument(
        "--model",
        help="checkpoint folder, hub id, or a training output folder (its newest "
        "checkpoint); default: the --recipe's model",
    )
    ev.add_argument(
        "--recipe", help="take the engine, template, system prompt and format tags from this recipe"
    )
    ev.add_argument("overrides", nargs="*", help="dotted overrides of --recipe, as for train")
    ev.add_argument(
        "--suite", help="safety, jailbreak, overrefusal, all, or benchmark names (--list), comma-separated"
    )
    ev.add_argument(
        "--data-dir",
        help="read each benchmark from DIR/<name>.jsonl|csv|parquet (hub schema) "
        "instead of the hub; recipes/data/eval holds small offline copies",
    )
    ev.add_argument("--data", action="append", default=[], help="an extra local prompt file (repeatable)")
    ev.add_argument("--prompt-field", default="prompt", help="prompt field of --data files")
    ev.add_argument("--label-field", default="label", help="label field of --data files (harmful/benign)")
    ev.add_argument("--label", choices=["harmful", "benign"], help="one label for every --data row")
    ev.add_argument(
        "--template", help="alphaalign, none or a Jinja string (default: the recipe's, else alphaalign)"
    )
    ev.add_argument(
        "--samples", type=positive_int, default=1, help="responses per prompt (pass@k for k ≤ samples)"
    )
    ev.add_argument(
        "--max-new-tokens", type=positive_int, help="default: the recipe's rollout.max_new_tokens"
    )
    ev.add_argument("--temperature", type=finite_float, help="default: the recipe's rollout.temperature")
    ev.add_argument("--limit", type=positive_int, help="first N prompts of each benchmark")
    ev.add_argument(
        "--judge",
        help=JUDGE_HELP + "; default: the recipe's judge: block, else the V_r of its "
        "alphaalign_safety reward, else rules",
    )
    ev.add_argument(
        "--refusal-classifier",
        help="judge refusals with this sequence-classification model (id or "
        "path) instead of the rules; default: the recipe's alphaalign_safety refusal_classifier",
    )
    ev.add_argument(
        "--refusal-label", help="the classifier's refusal label name or output index (default refusal)"
    )
    ev.add_argument(
        "--refusal-threshold",
        type=finite_float,
        help="P(refusal label) at which a response is a refusal (default 0.5)",
    )
    ev.add_argument("--utility", nargs="*", help="lm-eval tasks on the same checkpoint (default gsm8k mmlu)")
    ev.add_argument("--out", help="output folder (required)")
    ev.add_argument(
        "--list", action="store_true", help="list the benchmarks, their hub ids and suites, and exit"
    )
    ev.set_defaults(fn="alphaalign.eval.safety:run")

    rep = sub.add_parser(
        "report", help="markdown + HTML report with plots for training runs and eval outputs"
    )
    rep.add_argument(
        "runs", nargs="+", help="training output folders and/or `alphaalign eval` output folders"
    )
    rep.add_argument("--out", required=True, help="output folder for report.md, report.html and PNGs")
    rep.set_defaults(fn="alphaalign.report:run")
    bench = sub.add_parser("bench", help="benchmark against trl's GRPOTrainer and the model-work floors")
    bench.add_argument("--workload", default="w1", choices=["w1", "tiny"], help="CPU workload (default: w1)")
    bench.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B's shape in bf16 on the GPU instead")
    bench.add_argument("--systems", nargs="+", help="systems to run (default: all that are installed)")
    bench.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; each runs every system once"
    )
    bench.add_argument(
        "--out",
        help="results JSON (default: bench/results.json, bench/results_gpu.json or, with --rewards-only, "
        "bench/rewards.json)",
    )
    bench.add_argument("--cache", default=".cache/bench", help="folder for the built models (reused)")
    bench.add_argument(
        "--no-rewards", action="store_true", help="skip the reward throughput and accuracy part"
    )
    bench.add_argument(
        "--rewards-only",
        action="store_true",
        help="only the reward throughput and accuracy part (seconds; no system is built or timed)",
    )
    bench.set_defaults(fn="alphaalign.perf.harness:run")
    add_launch_parsers(sub)
    return parser


def add_launch_parsers(sub) -> None:
    launch = sub.add_parser(
        "launch", help="run the trainer and its vLLM servers as a Slurm job or on this machine"
    )
    where = launch.add_subparsers(dest="where", required=True)
    slurm = where.add_parser(
        "slurm",
        help="write (and submit) an sbatch script: vLLM servers on the first nodes, torchrun trainer on the rest",
    )
    add_recipe_arguments(slurm)
    # launch's counts are checked with the layout they make (launch.check_layout)
    slurm.add_argument("--nodes", type=int, required=True, help="nodes in the job")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU nodes)")
    slurm.add_argument("--vllm-nodes", type=int, default=0, help="nodes that run vLLM servers (default 0)")
    slurm.add_argument(
        "--vllm-gpus", type=int, default=0, help="with --nodes 1 --vllm-nodes 1: GPUs of the node that serve"
    )
    add_gpu_memory_argument(slurm)
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--time", help="time limit, in Slurm's format (minutes, HH:MM:SS, D-HH:MM)")
    slurm.add_argument("--account", help="Slurm account")
    mode = slurm.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    mode.add_argument(
        "--submit", action="store_true", help="write the script into the output folder and sbatch it"
    )
    slurm.set_defaults(fn="alphaalign.launch:run_slurm")
    local = where.add_parser(
        "local", help="run vLLM servers and the torchrun trainer on this machine (rerun to resume)"
    )
    add_recipe_arguments(local)
    local.add_argument(
        "--gpus",
        type=int,
        help="GPUs of this machine to use (0: CPU; default: all GPUs visible "
        "for a recipe with a launch: section, else 0)",
    )
    local.add_argument(
        "--vllm-servers",
        type=int,
        help="vLLM servers to start, server i on GPU i (default: the "
        "recipe's launch.vllm_gpus share of the GPUs, else 0)",
    )
    add_gpu_memory_argument(local, "default: the first GPU's, else 80")
    local.add_argument("--dry-run", action="store_true", help="print the script, write and run nothing")
    local.set_defaults(fn="alphaalign.launch:run_local")


def add_gpu_memory_argument(parser, default: str = "default 80") -> None:
    parser.add_argument(
        "--gpu-memory",
        type=finite_float,
        metavar="GB",
        help=f"memory of one GPU in GB, for the plan's memory check ({default})",
    )


def add_recipe_arguments(parser) -> None:
    parser.add_argument("recipe", help=RECIPE_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the trainer and the servers")
    parser.add_argument("--output-dir", help="the run's output folder (default: trainer.output_dir)")


class _StdoutWhileRead:
    """stdout for a command whose reader may go away (`alphaalign eval-detector DATA | head`): the rest of what it
    prints is dropped, and it goes on to write its files (a --json or --errors written after the table) instead of
    ending in a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def _drop_the_rest(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # the unwritten buffer goes there too, at the next flush
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_the_rest()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_the_rest()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def command(fn):
    """A command's function: given, or named "module:function" (imported now)."""
    if callable(fn):
        return fn
    module, name = fn.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides written after options: `launch slurm r.yaml --nodes 2 a.b=1`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(map(mask_override, extra))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stdout, sys.stdout = sys.stdout, _StdoutWhileRead(sys.stdout)
    try:
        return command(args.fn)(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)  # errors may quote a URL or an override
        return 2
    except OSError as exc:  # a write deep in a library that no caller turned into a UserError
        from alphaalign.outputs import DISK_FULL

        if exc.errno not in DISK_FULL or args.debug:
            raise
        print(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
