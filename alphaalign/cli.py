"""The `alphaalign` command line: train and validate recipes, serve a recipe's policy with vLLM, benchmark,
launch runs on Slurm or on this machine.

User mistakes end with one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from alphaalign.errors import UserError
from alphaalign.masking import mask_override, mask_text
from alphaalign.outputs import check_output, writing


def validate(recipe_path: str, overrides: list[str]):
    """Check the recipe, its local data files and its reward names and arguments without loading a model."""
    from alphaalign.config import load_recipe
    from alphaalign.data import check_data

    recipe = load_recipe(recipe_path, overrides)
    columns = check_data(recipe)
    check_rewards(recipe_path, recipe)
    check_column_clashes(recipe_path, recipe, columns)
    check_output(recipe.trainer.output_dir, f"{recipe_path}: trainer.output_dir", folder=True)
    if recipe.trainer.deepspeed is not None:
        from alphaalign.rl.zero import read_config

        read_config(recipe)
    model_path = recipe.model.name_or_path
    looks_local = model_path.startswith((".", "/", "~")) or Path(model_path).exists()
    if looks_local and recipe.model.build is None and not Path(model_path).expanduser().exists():
        raise UserError(f"{recipe_path}: model.name_or_path: no such folder: {model_path}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun the first process says it
        for warning in recipe.warnings():
            print(f"warning: {recipe_path}: {warning}", file=sys.stderr)
    return recipe


def check_rewards(recipe_path: str, recipe) -> None:
    """Every reward name resolves and its args fit the function (nothing is loaded)."""
    from alphaalign.rewards import UnknownRewardError, check_reward_args, resolve_reward

    for i, spec in enumerate(recipe.rewards):
        try:
            check_reward_args(resolve_reward(spec.name), spec.args, f"{recipe_path}: rewards.{i}.args")
        except UnknownRewardError as exc:
            raise UserError(f"{recipe_path}: rewards.{i}.name: {exc}") from None
        except ValueError as exc:
            raise UserError(f"{recipe_path}: rewards.{i}.args: {exc}") from None


def check_column_clashes(recipe_path: str, recipe, columns: dict) -> None:
    """No training data column takes the name of a reward's argument (the rewards get both as keywords)."""
    from alphaalign.rewards.registry import column_clash
    from alphaalign.rewards.stack import RewardStack, clash_message

    stack = RewardStack(recipe.rewards, recipe.format)  # the args as bound, the format's tags included
    for key, (path, names) in columns.items():
        if not key.startswith("data.train."):  # held-out prompts are not scored by the rewards
            continue
        for k, spec in enumerate(recipe.rewards):
            if (clash := column_clash(stack.bare[k], stack.args[k], names)) is not None:
                raise UserError(f"{recipe_path}: {key}: {path}: {clash_message(clash, k, spec.name)}")


def format_eval_table(before: dict, after: dict) -> str:
    rows = [("harmful refusal rate", "harmful_refusal_rate", "higher is better"),
            ("benign over-refusal rate", "benign_refusal_rate", "lower is better"),
            ("format validity", "format_valid_rate", "higher is better")]  # fmt: skip
    n = f"held-out prompts: {after['n_harmful']} harmful, {after['n_benign']} benign (responses sampled)"
    lines = [n, f"{'metric':<26}{'before RL':>10}{'after RL':>10}", "-" * 46]
    lines += [f"{name:<26}{before[key]:>10.1%}{after[key]:>10.1%}   {hint}" for name, key, hint in rows]
    return "\n".join(lines)


def cmd_train(args) -> int:
    recipe = validate(args.recipe, args.overrides)
    if recipe.launch is not None and "WORLD_SIZE" not in os.environ:
        # written for a GPU node: servers and a torchrun trainer as `alphaalign launch local` lays them out
        args.gpus = args.vllm_servers = args.output_dir = None
        args.gpu_memory, args.dry_run = None, False
        return cmd_launch_local(args)
    return train_and_report(recipe)


def train_and_report(recipe) -> int:
    from alphaalign.rl.trainer import train

    result = train(recipe)
    final = result["final"]
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process reports
        return 0
    if final:
        print(
            f"finished step {final['step']}: reward {final['reward/mean']:.3f}, outputs in {recipe.trainer.output_dir}"
        )
    if "after" in result:
        print(format_eval_table(result["before"], result["after"]))
    if (Path(recipe.trainer.output_dir) / "metrics.jsonl").exists():  # also when a finished run is rerun
        from alphaalign.report import write_report

        report = Path(recipe.trainer.output_dir) / "report"
        write_report([Path(recipe.trainer.output_dir)], report)
        print(f"report: {report / 'report.html'} (and report.md)")
    return 0


def cmd_validate(args) -> int:
    from alphaalign.plan import check_plan, plan_line, recipe_plan

    recipe = validate(args.recipe, args.overrides)
    plan = recipe_plan(recipe, args.gpus, args.gpu_memory)
    estimate = check_plan(args.recipe, recipe, plan)
    print(
        f"{args.recipe}: ok ({len(recipe.data.train)} train source(s), {len(recipe.rewards)} reward term(s))"
    )
    print(plan_line(plan, estimate))
    return 0


def cmd_score(args) -> int:
    """Score a JSONL file of completions with a recipe's reward terms (default: rule-based alphaalign_safety)."""
    from alphaalign.config import FormatConfig, RewardSpec, load_recipe
    from alphaalign.judges import RulesJudge, judge_from_option, open_judge
    from alphaalign.scoring import format_summary, score_file, select_terms

    check_output(args.output, "--output", folder=False)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    judge, where = RulesJudge(), "--judge"
    if args.recipe:
        recipe = load_recipe(args.recipe)
        check_rewards(args.recipe, recipe)
        specs, answer_format, judge = recipe.rewards, recipe.format, recipe.judge
        where = f"{args.recipe}: judge"
    else:
        specs, answer_format = [RewardSpec(name="alphaalign_safety")], FormatConfig()
    if args.judge:
        judge, where = judge_from_option(args.judge), "--judge"
    terms = select_terms(specs, only)
    with open_judge(judge, where, Path(args.output).parent) as opened:
        counts = score_file(args.input, args.output, terms, answer_format, judge=opened)
    print(format_summary(counts, args.output), file=sys.stderr)
    return 0


def cmd_eval_detector(args) -> int:
    from alphaalign.judges.agreement import run

    return run(args)


def cmd_train_rm(args) -> int:
    """Train and calibrate a CSRM from a train-rm recipe (or from dotted keys alone)."""
    from alphaalign.config import load_recipe
    from alphaalign.rm.recipe import RewardModelRecipe
    from alphaalign.rm.train import train_rm

    recipe_path, overrides = args.recipe, args.overrides
    if "=" in recipe_path:  # no recipe file: the arguments are the recipe
        recipe_path, overrides = None, [args.recipe, *overrides]
    train_rm(load_recipe(recipe_path, overrides, schema=RewardModelRecipe))
    return 0


def cmd_eval_rm(args) -> int:
    """F1, precision, recall and ECE of a CSRM on CoSApien- and DynaBench-format files."""
    import json

    from alphaalign.rm.agreement import evaluate_rm, format_table

    if args.output:  # before the model runs: a path that cannot be written would lose the metrics
        check_output(args.output, "--output", folder=False)
    results = evaluate_rm(
        args.model, args.files, args.format, args.threshold, args.temperature, args.bias, args.dtype,
        args.device, args.batch_size, args.max_length,
    )  # fmt: skip
    print(format_table(results))
    if args.output:
        with writing(args.output, "the metrics"):
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_serve(args) -> int:
    """Run a vLLM server configured for the recipe in the foreground (replaces this process)."""
    recipe = validate(args.recipe, args.overrides)
    from alphaalign.demo.build import build_if_missing
    from alphaalign.rollout.vllm_launch import require_vllm, server_command, server_env

    require_vllm()
    build_if_missing(recipe)
    command, env = server_command(recipe, args.host, args.port), server_env(recipe)
    print(
        f"serving {recipe.model.name_or_path} on http://{args.host}:{args.port}", file=sys.stderr, flush=True
    )
    os.execve(command[0], command, env)


def eval_model(model: str) -> str:
    """--model as given or, for a training output folder, the policy of its newest complete checkpoint."""
    from alphaalign.rl.checkpoint import latest_checkpoint

    if not (Path(model) / "checkpoints").is_dir():
        return model
    latest = latest_checkpoint(model)
    if latest is None:
        raise UserError(f"--model: {model} is a training output folder without a complete checkpoint")
    return str(latest / "policy")


def eval_recipe(args):
    """The recipe `alphaalign eval` runs with: --recipe (engine, sampling, template, tags) or the defaults, its
    model replaced by --model when given."""
    from alphaalign.config import Recipe, load_recipe
    from alphaalign.demo.build import build_if_missing

    if args.model is None and not args.recipe:
        raise UserError("give --model, or --recipe to evaluate the recipe's own model")
    if args.recipe:
        model = [f"model.name_or_path={eval_model(args.model)}"] if args.model else []
        recipe = load_recipe(args.recipe, [*model, *args.overrides])
        build_if_missing(recipe)
        return recipe
    if args.overrides:
        raise UserError("overrides need --recipe")
    return Recipe.model_validate({"model": {"name_or_path": eval_model(args.model)},
                                  "data": {"train": [{"path": "-"}]},
                                  "rewards": [{"name": "alphaalign_safety"}]})  # fmt: skip


def cmd_eval(args) -> int:
    from alphaalign.data import check_template, load_source, template_key
    from alphaalign.eval import suites
    from alphaalign.eval.safety import EvalSettings, eval_judge, evaluate_benchmarks, format_summary_table
    from alphaalign.judges import check_environment

    if args.list:
        print(suites.describe())
        return 0
    if args.out is None:
        raise UserError("--out is required")
    out = check_output(args.out, "--out", folder=True)
    if args.temperature is not None and args.temperature <= 0:
        raise UserError(f"--temperature must be above 0 (sampling), got {args.temperature}")
    recipe = eval_recipe(args)
    judge, judge_where = eval_judge(recipe, args)
    check_environment(judge, judge_where)  # before any generation
    print(f"evaluating {recipe.model.name_or_path} with the {recipe.rollout.engine} engine", flush=True)
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir: no such folder: {args.data_dir}")
    names = suites.suite_benchmarks(args.suite) if args.suite else []
    sets = {name: suites.load_benchmark(name, data_dir, args.limit) for name in names}
    for path in args.data:
        source = suites.custom_source(path, args.prompt_field, args.label_field, args.label)
        sets[Path(path).stem] = load_source(source.model_copy(update={"max_rows": args.limit}), Path.cwd())
    if not sets:
        raise UserError("nothing to evaluate: give --suite or --data")
    settings = EvalSettings(
        samples=args.samples, max_new_tokens=args.max_new_tokens or recipe.rollout.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else recipe.rollout.temperature,
        template=args.template or recipe.data.template, limit=args.limit,
        seed=recipe.trainer.seed,
    )  # fmt: skip
    template_where = "--template" if args.template else template_key(recipe)
    samples = [examples[0] for examples in sets.values() if examples]
    check_template(settings.template, template_where, samples, recipe.format)
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluate_benchmarks(recipe, sets, settings, judge, out, judge_where, template_where)
    print(format_summary_table(summary))
    print(f"responses and verdicts: {out}/<benchmark>/responses.jsonl; summary: {out / 'summary.json'}")
    if args.utility is not None:
        from alphaalign.eval.utility import run_utility

        print(run_utility(recipe.model.name_or_path, args.utility or ["gsm8k", "mmlu"], out, args.limit))
    return 0


def cmd_report(args) -> int:
    from alphaalign.report import write_report

    folders = [Path(f) for f in args.runs]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    check_output(args.out, "--out", folder=True)
    files = write_report(folders, Path(args.out))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_bench(args) -> int:
    """Time trl's GRPOTrainer, alphaalign and the model-work floors side by side; see docs/benchmarks.md."""
    from alphaalign.perf.harness import default_systems, format_table, run_bench

    workload, device = ("qwen2.5-1.5b", "cuda") if args.gpu else (args.workload, "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA device is visible to torch")
    out = check_output(args.out or ("bench/results_gpu.json" if args.gpu else "bench/results.json"), "--out",
                       folder=False)  # fmt: skip
    check_output(args.cache, "--cache", folder=True)
    result = run_bench(workload, device, args.systems or default_systems(workload), args.rounds, out, Path(args.cache),
                       rewards=not args.no_rewards)  # fmt: skip
    print(format_table(result))
    print(f"results in {out}")
    return 0


def cmd_launch_slurm(args) -> int:
    from alphaalign import launch
    from alphaalign.plan import check_plan, plan_line

    layout = launch.SlurmLayout(args.nodes, args.gpus_per_node, args.vllm_nodes, args.vllm_gpus)
    launch.check_layout(layout)
    launch.check_sbatch_value("--partition", args.partition)
    launch.check_sbatch_value("--account", args.account)
    launch.check_sbatch_value("--time", args.time, launch.SLURM_TIME)
    recipe, run_dir = validate_for_launch(args)
    launch.check_recipe_for_launch(args.recipe, recipe)
    estimate = check_plan(args.recipe, recipe, launch.slurm_plan(layout, args.gpu_memory))
    launch.check_run_dir(run_dir)
    script = launch.render_slurm(
        args.recipe, recipe, args.overrides, layout, run_dir, args.partition, args.time, args.account
    )
    plan_line = plan_line(launch.slurm_plan(layout, args.gpu_memory), estimate)
    if args.dry_run:
        print(script, end="")
        print(plan_line, file=sys.stderr)
    elif args.submit:
        print(plan_line)
        job_id, path = launch.submit(script, run_dir)
        print(f"submitted job {job_id}: script {path}, logs in {run_dir / 'logs'}")
    else:
        print(plan_line)
        path = launch.write_script(script, run_dir)
        print(f"wrote {path}; submit it with: sbatch {path}")
    return 0


def cmd_launch_local(args) -> int:
    from alphaalign import launch
    from alphaalign.plan import check_plan, plan_line

    recipe, run_dir = validate_for_launch(args)
    layout, gpu_memory = launch.local_layout(
        args.recipe, recipe, args.gpus, args.vllm_servers, args.gpu_memory
    )
    launch.check_local_layout(layout)
    launch.check_recipe_for_launch(args.recipe, recipe)
    plan = launch.local_plan(layout, gpu_memory)
    estimate = check_plan(args.recipe, recipe, plan)
    launch.check_run_dir(run_dir)
    script = launch.render_local(args.recipe, recipe, args.overrides, layout, run_dir)
    if args.dry_run:
        print(script, end="")
        print(plan_line(plan, estimate), file=sys.stderr)
        return 0
    print(plan_line(plan, estimate), flush=True)
    if layout.servers:  # the servers would each die at start, after the trainer waited for them
        from alphaalign.rollout.vllm_launch import require_vllm

        require_vllm()
    path = launch.write_script(script, run_dir, "local.sh")
    print(f"running {path}", flush=True)
    return subprocess.run(["bash", str(path)]).returncode


def validate_for_launch(args):
    """The recipe with --output-dir applied, and the run's output folder as an absolute path."""
    extra = [f"trainer.output_dir={args.output_dir}"] if args.output_dir else []
    recipe = validate(args.recipe, [*args.overrides, *extra])
    return recipe, Path(recipe.trainer.output_dir).expanduser().absolute()


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
    for name, fn, text in [("train", cmd_train, "train a policy with a recipe"),
                           ("validate", cmd_validate, "check a recipe, its data and rewards without loading models")]:  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help=RECIPE_HELP)
        p.add_argument(
            "overrides", nargs="*", help="dotted overrides, values parsed as YAML: trainer.learning_rate=1e-6"
        )
        p.set_defaults(fn=fn)
        if name == "validate":
            p.add_argument("--gpus", type=non_negative_int, help="check the plan on a node of this many GPUs (default: the "
                           "recipe's launch.gpus, else one trainer process)")  # fmt: skip
            add_gpu_memory_argument(p)
    score = sub.add_parser("score", help="score completions in a JSONL file with a recipe's reward terms")
    score.add_argument("--input", required=True, help="JSONL rows with prompt, completion, optional label")
    score.add_argument("--output", required=True, help="JSONL: the input rows plus rewards, total, verdicts")
    score.add_argument("--recipe", help="use this recipe's rewards (default: rule-based alphaalign_safety)")
    score.add_argument("--only", help="comma-separated reward terms to compute (default: all)")
    score.add_argument("--judge", help=JUDGE_HELP + "; default: the recipe's judge: block, else rules")
    score.set_defaults(fn=cmd_score)
    det = sub.add_parser("eval-detector", help="a refusal judge's agreement with human labels (acc, P, R, F1 "
                         "per group)")  # fmt: skip
    det.add_argument("data", help="labelled responses: JSONL, JSON, CSV or parquet")
    det.add_argument("--judge", default="rules", help=JUDGE_HELP + "; default rules")
    det.add_argument("--response-field", default="response", help="the response's field (default response)")
    det.add_argument("--label-field", default="refused", help="0/1 refusal label field (default refused)")
    det.add_argument("--prompt-field", default="prompt", help="prompt field, for llm judges (default prompt)")
    det.add_argument("--by", default="source", help="group the table by this field (dotted paths reach into "
                     "objects, e.g. orig_label.tone; '' for none; default source)")  # fmt: skip
    det.add_argument("--errors", help="write the misclassified rows (with the judge's verdict) to this JSONL")
    det.add_argument("--json", help="write the table as JSON to this file")
    det.set_defaults(fn=cmd_eval_detector)
    train_rm = sub.add_parser("train-rm", help="train a configurable safety reward model (CSRM)")
    train_rm.add_argument(
        "recipe",
        help="train-rm recipe YAML file (or a shipped one: rm/csrm-demo), or a first key=value to give "
        "the recipe inline",
    )
    train_rm.add_argument(
        "overrides", nargs="*", help="dotted overrides: training.epochs=3 data.pairs=[p.jsonl]"
    )
    train_rm.set_defaults(fn=cmd_train_rm)
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
    eval_rm.set_defaults(fn=cmd_eval_rm)
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
    ev.add_argument("--model", help="checkpoint folder, hub id, or a training output folder (its newest "
                    "checkpoint); default: the --recipe's model")  # fmt: skip
    ev.add_argument(
        "--recipe", help="take the engine, template, system prompt and format tags from this recipe"
    )
    ev.add_argument("overrides", nargs="*", help="dotted overrides of --recipe, as for train")
    ev.add_argument("--suite", help="safety, jailbreak, overrefusal, all, or benchmark names (--list), "
                    "comma-separated")  # fmt: skip
    ev.add_argument("--data-dir", help="read each benchmark from DIR/<name>.jsonl|csv|parquet (hub schema) "
                    "instead of the hub; recipes/data/eval holds small offline copies")  # fmt: skip
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
    ev.add_argument("--judge", help=JUDGE_HELP + "; default: the recipe's judge: block, else the V_r of its "
                    "alphaalign_safety reward, else rules")  # fmt: skip
    ev.add_argument("--refusal-classifier", help="judge refusals with this sequence-classification model (id or "
                    "path) instead of the rules; default: the recipe's alphaalign_safety refusal_classifier")  # fmt: skip
    ev.add_argument(
        "--refusal-label", help="the classifier's refusal label name or output index (default refusal)"
    )
    ev.add_argument("--refusal-threshold", type=finite_float, help="P(refusal label) at which a response is a refusal "
                    "(default 0.5)")  # fmt: skip
    ev.add_argument("--utility", nargs="*", help="lm-eval tasks on the same checkpoint (default gsm8k mmlu)")
    ev.add_argument("--out", help="output folder (required)")
    ev.add_argument(
        "--list", action="store_true", help="list the benchmarks, their hub ids and suites, and exit"
    )
    ev.set_defaults(fn=cmd_eval)

    rep = sub.add_parser(
        "report", help="markdown + HTML report with plots for training runs and eval outputs"
    )
    rep.add_argument(
        "runs", nargs="+", help="training output folders and/or `alphaalign eval` output folders"
    )
    rep.add_argument("--out", required=True, help="output folder for report.md, report.html and PNGs")
    rep.set_defaults(fn=cmd_report)
    bench = sub.add_parser("bench", help="benchmark against trl's GRPOTrainer and the model-work floors")
    bench.add_argument("--workload", default="w1", choices=["w1", "tiny"], help="CPU workload (default: w1)")
    bench.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B's shape in bf16 on the GPU instead")
    bench.add_argument("--systems", nargs="+", help="systems to run (default: all that are installed)")
    bench.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; each runs every system once"
    )
    bench.add_argument("--out", help="results JSON (default: bench/results.json, or bench/results_gpu.json)")
    bench.add_argument("--cache", default=".cache/bench", help="folder for the built models (reused)")
    bench.add_argument(
        "--no-rewards", action="store_true", help="skip the reward throughput and accuracy part"
    )
    bench.set_defaults(fn=cmd_bench)
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
    slurm.set_defaults(fn=cmd_launch_slurm)
    local = where.add_parser(
        "local", help="run vLLM servers and the torchrun trainer on this machine (rerun to resume)"
    )
    add_recipe_arguments(local)
    local.add_argument("--gpus", type=int, help="GPUs of this machine to use (0: CPU; default: all GPUs visible "
                       "for a recipe with a launch: section, else 0)")  # fmt: skip
    local.add_argument("--vllm-servers", type=int, help="vLLM servers to start, server i on GPU i (default: the "
                       "recipe's launch.vllm_gpus share of the GPUs, else 0)")  # fmt: skip
    add_gpu_memory_argument(local, "default: the first GPU's, else 80")
    local.add_argument("--dry-run", action="store_true", help="print the script, write and run nothing")
    local.set_defaults(fn=cmd_launch_local)


def add_gpu_memory_argument(parser, default: str = "default 80") -> None:
    parser.add_argument("--gpu-memory", type=finite_float, metavar="GB",
                        help=f"memory of one GPU in GB, for the plan's memory check ({default})")  # fmt: skip


def add_recipe_arguments(parser) -> None:
    parser.add_argument("recipe", help=RECIPE_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the trainer and the servers")
    parser.add_argument("--output-dir", help="the run's output folder (default: trainer.output_dir)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides written after options: `launch slurm r.yaml --nodes 2 a.b=1`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(map(mask_override, extra))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
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


if __name__ == "__main__":
    sys.exit(main())
