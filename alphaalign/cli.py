"""The `alphaalign` command line: train and validate recipes, serve a recipe's policy with vLLM.

User mistakes end with one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alphaalign.errors import UserError


def validate(recipe_path: str, overrides: list[str]):
    """Check the recipe, its local data files and its reward names and arguments without loading a model."""
    from alphaalign.config import load_recipe
    from alphaalign.data import check_data

    recipe = load_recipe(recipe_path, overrides)
    check_data(recipe)
    check_rewards(recipe_path, recipe)
    check_output_dir(recipe_path, recipe.trainer.output_dir)
    model_path = recipe.model.name_or_path
    looks_local = model_path.startswith((".", "/", "~")) or Path(model_path).exists()
    if looks_local and recipe.model.build is None and not Path(model_path).expanduser().exists():
        raise UserError(f"{recipe_path}: model.name_or_path: no such folder: {model_path}")
    return recipe


def check_rewards(recipe_path: str, recipe) -> None:
    """Every reward name resolves and its args fit the function (nothing is loaded)."""
    from alphaalign.rewards import UnknownRewardError, check_reward_args, resolve_reward

    for i, spec in enumerate(recipe.rewards):
        try:
            check_reward_args(resolve_reward(spec.name), spec.args)
        except UnknownRewardError as exc:
            raise UserError(f"{recipe_path}: rewards.{i}.name: {exc}") from None
        except ValueError as exc:
            raise UserError(f"{recipe_path}: rewards.{i}.args: {exc}") from None


def check_output_dir(recipe_path: str, output_dir: str) -> None:
    """The output folder, or the nearest folder above it that exists, must be writable (nothing is created)."""
    path = Path(output_dir).expanduser().absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(
            f"{recipe_path}: trainer.output_dir: cannot write to {output_dir} ({path} is not a writable folder)"
        )


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
    from alphaalign.rl.trainer import train

    result = train(recipe)
    final = result["final"]
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
    recipe = validate(args.recipe, args.overrides)
    print(
        f"{args.recipe}: ok ({len(recipe.data.train)} train source(s), {len(recipe.rewards)} reward term(s))"
    )
    return 0


def cmd_score(args) -> int:
    """Score a JSONL file of completions with a recipe's reward terms (default: rule-based alphaalign_safety)."""
    from alphaalign.config import RewardSpec, load_recipe
    from alphaalign.rl.trainer import format_tags
    from alphaalign.scoring import DEFAULT_TAGS, format_summary, score_file, select_terms

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    if args.recipe:
        recipe = load_recipe(args.recipe)
        check_rewards(args.recipe, recipe)
        specs, tags = recipe.rewards, format_tags(recipe)
    else:
        specs, tags = [RewardSpec(name="alphaalign_safety")], DEFAULT_TAGS
    counts = score_file(args.input, args.output, select_terms(specs, only), tags)
    print(format_summary(counts, args.output), file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    """Run a vLLM server configured for the recipe in the foreground (replaces this process)."""
    recipe = validate(args.recipe, args.overrides)
    from alphaalign.demo.build import build_if_missing
    from alphaalign.rollout.vllm_launch import require_vllm, server_command, server_env

    require_vllm()
    build_if_missing(recipe)
    command = server_command(recipe, args.host, args.port)
    print(
        f"serving {recipe.model.name_or_path} on http://{args.host}:{args.port}", file=sys.stderr, flush=True
    )
    os.execve(command[0], command, server_env(recipe))


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
    from alphaalign import benchmarks
    from alphaalign.data import load_source
    from alphaalign.evaluation import EvalSettings, eval_judge, evaluate_benchmarks, format_summary_table

    if args.list:
        print(benchmarks.describe())
        return 0
    if args.out is None:
        raise UserError("--out is required")
    for flag, value in (
        ("--samples", args.samples),
        ("--limit", args.limit),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.temperature is not None and args.temperature <= 0:
        raise UserError(f"--temperature must be above 0 (sampling), got {args.temperature}")
    recipe = eval_recipe(args)
    print(f"evaluating {recipe.model.name_or_path} with the {recipe.rollout.engine} engine", flush=True)
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir: no such folder: {args.data_dir}")
    names = benchmarks.suite_benchmarks(args.suite) if args.suite else []
    sets = {name: benchmarks.load_benchmark(name, data_dir, args.limit) for name in names}
    for path in args.data:
        source = benchmarks.custom_source(path, args.prompt_field, args.label_field, args.label)
        sets[Path(path).stem] = load_source(source.model_copy(update={"max_rows": args.limit}), Path.cwd())
    if not sets:
        raise UserError("nothing to evaluate: give --suite or --data")
    settings = EvalSettings(
        samples=args.samples, max_new_tokens=args.max_new_tokens or recipe.rollout.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else recipe.rollout.temperature,
        template=args.template or recipe.data.template, limit=args.limit,
        seed=recipe.trainer.seed,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluate_benchmarks(recipe, sets, settings, eval_judge(recipe, args), out)
    print(format_summary_table(summary))
    print(f"responses and verdicts: {out}/<benchmark>/responses.jsonl; summary: {out / 'summary.json'}")
    if args.utility is not None:
        from alphaalign.utility import run_utility

        print(run_utility(recipe.model.name_or_path, args.utility or ["gsm8k", "mmlu"], out, args.limit))
    return 0


def cmd_report(args) -> int:
    from alphaalign.report import write_report

    folders = [Path(f) for f in args.runs]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    files = write_report(folders, Path(args.out))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphaalign", description="Safety alignment with RL on verifiable rewards."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in [("train", cmd_train, "train a policy with a recipe"),
                           ("validate", cmd_validate, "check a recipe, its data and rewards without loading models")]:  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument(
            "overrides", nargs="*", help="dotted overrides, values parsed as YAML: trainer.learning_rate=1e-6"
        )
        p.set_defaults(fn=fn)
    score = sub.add_parser("score", help="score completions in a JSONL file with a recipe's reward terms")
    score.add_argument("--input", required=True, help="JSONL rows with prompt, completion, optional label")
    score.add_argument("--output", required=True, help="JSONL: the input rows plus rewards, total, verdicts")
    score.add_argument("--recipe", help="use this recipe's rewards (default: rule-based alphaalign_safety)")
    score.add_argument("--only", help="comma-separated reward terms to compute (default: all)")
    score.set_defaults(fn=cmd_score)
    serve = sub.add_parser(
        "serve", help="start a vLLM server configured for a recipe (rollout.engine: vllm_server)"
    )
    serve.add_argument("recipe", help="recipe YAML file")
    serve.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
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
    ev.add_argument("--samples", type=int, default=1, help="responses per prompt (pass@k for k ≤ samples)")
    ev.add_argument("--max-new-tokens", type=int, help="default: the recipe's rollout.max_new_tokens")
    ev.add_argument("--temperature", type=float, help="default: the recipe's rollout.temperature")
    ev.add_argument("--limit", type=int, help="first N prompts of each benchmark")
    ev.add_argument("--refusal-classifier", help="judge refusals with this sequence-classification model (id or "
                    "path) instead of the rules; default: the recipe's alphaalign_safety refusal_classifier")  # fmt: skip
    ev.add_argument(
        "--refusal-label", help="the classifier's refusal label name or output index (default refusal)"
    )
    ev.add_argument("--refusal-threshold", type=float, help="P(refusal label) at which a response is a refusal "
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
