"""`alphaalign report`: tables and plots for training runs and `alphaalign eval` results, side by side.

A folder given to the report is a training run (metrics.jsonl, eval_before.json, eval_after.json, and
samples.jsonl, whose latest step's completions are shown) or an eval output (summary.json), or both. The report is report.md with PNGs beside it, and report.html with the same
PNGs embedded, so that one file can be mailed around.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pydantic
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from alphaalign import parsing
from alphaalign.errors import UserError
from alphaalign.http_client import describe
from alphaalign.outputs import check_output

HELD_OUT = "held-out (data.eval)"
RULES = "rules (refusal verifier V_r)"

# The shapes of the files the report reads, checked when they are read: a damaged or foreign file is one line
# naming the file and the field, not a traceback halfway through the report. Other fields are kept.
Rate = StrictFloat  # an int is a float too; NaN where a rate has no responses (json writes NaN)


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class HeldOutEval(_Shape):
    """eval_before.json / eval_after.json of a training run."""

    harmful_refusal_rate: Rate
    benign_refusal_rate: Rate
    format_valid_rate: Rate


class BenchmarkMetrics(_Shape):
    harmful_refusal_rate: Rate
    over_refusal_rate: Rate
    format_valid_rate: Rate
    attack_success_rate: Rate | None = None
    n_unparseable: StrictInt = 0

    @pydantic.model_validator(mode="after")
    def _rates_at_k(self):
        for key, value in (self.model_extra or {}).items():
            if key.startswith(("pass@", "all_safe@")) and (
                not key.split("@")[1].isdigit()
                or isinstance(value, bool)
                or not isinstance(value, int | float)
            ):
                raise ValueError(f"{key}: must be a number under a key pass@K or all_safe@K, got {value!r}")
        return self


class EvalSummary(_Shape):
    """summary.json of `alphaalign eval`."""

    judge: StrictStr = RULES
    asr_from: StrictStr = "1 - refusal rate"
    benchmarks: dict[str, BenchmarkMetrics] = {}


class MetricsRow(_Shape):
    """A row of metrics.jsonl: its step, and numbers."""

    step: StrictInt

    @pydantic.model_validator(mode="after")
    def _numbers(self):
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key}: must be a number, got {value!r}")
        return self


class Sample(_Shape):
    """A row of samples.jsonl."""

    prompt: StrictStr
    label: StrictStr
    completion: StrictStr
    reward: Rate | None
    rewards: dict[str, Rate | None]
    advantage: Rate
    refused: StrictBool
    format_valid: StrictBool


def _checked(shape: type[BaseModel], value, where: str):
    """`value` as read, once it has `shape`; a UserError naming `where` and the field otherwise."""
    try:
        shape.model_validate(value)
    except pydantic.ValidationError as exc:
        raise UserError(f"{where}: {describe(exc, 'the file')}") from None
    return value


@dataclass
class Run:
    name: str
    steps: list[dict] = field(default_factory=list)  # metrics.jsonl rows
    before: dict | None = None  # eval_before.json
    after: dict | None = None  # eval_after.json
    summary: dict | None = None  # an `alphaalign eval` summary.json
    samples: list[dict] = field(default_factory=list)  # samples.jsonl rows of its latest step


def _read_json(path: Path):
    try:
        return parsing.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def load_run(folder: Path) -> Run:
    run = Run(folder.resolve().name)
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        from alphaalign.rl.logger import read_metrics

        run.steps = [_checked(MetricsRow, r, f"{metrics} (step {r['step']})") for r in read_metrics(metrics)]
    if (folder / "samples.jsonl").exists():
        from alphaalign.rl.logger import read_metrics

        rows = read_metrics(folder / "samples.jsonl", "samples")
        latest = [r for r in rows if r["step"] == rows[-1]["step"]] if rows else []
        run.samples = [_checked(Sample, r, f"{folder / 'samples.jsonl'} (step {r['step']})") for r in latest]
    for attr, name, shape in (
        ("before", "eval_before.json", HeldOutEval),
        ("after", "eval_after.json", HeldOutEval),
        ("summary", "summary.json", EvalSummary),
    ):
        if (folder / name).exists():
            setattr(run, attr, _checked(shape, _read_json(folder / name), str(folder / name)))
    if not (run.steps or run.before or run.summary):
        raise UserError(f"{folder}: neither a training run (metrics.jsonl) nor an eval output (summary.json)")
    return run


def unique_names(runs: list[Run], folders: list[Path]) -> None:
    """Runs with the same folder name are told apart by their parent folder."""
    names = [r.name for r in runs]
    for run, folder in zip(runs, folders, strict=True):
        if names.count(run.name) > 1:
            run.name = f"{folder.resolve().parent.name}/{run.name}"


# ---------------------------------------------------------------------------------------------------------
# The series the plots and tables show


def eval_points(run: Run) -> list[tuple[int, float, float]]:
    """(step, harmful refusal, over-refusal) on the held-out set: before RL (step 0), every in-training
    evaluation (eval/*), and after RL (the last step)."""
    points = []
    if run.before:
        points.append((0, run.before["harmful_refusal_rate"], run.before["benign_refusal_rate"]))
    for row in run.steps:
        if "eval/harmful_refusal_rate" in row:
            points.append((row["step"], row["eval/harmful_refusal_rate"], row["eval/benign_refusal_rate"]))
    if run.after and run.steps:
        last = run.steps[-1]["step"]
        if not points or points[-1][0] != last:
            points.append((last, run.after["harmful_refusal_rate"], run.after["benign_refusal_rate"]))
    return points


def training_panels(runs: list[Run]) -> list[str]:
    """The metrics.jsonl keys to plot over steps: the total reward, each reward term when there are several
    (a single term has the total's shape), KL and completion length."""
    keys = {k for run in runs for row in run.steps for k in row}
    terms = sorted(k for k in keys if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean")
    kl = sorted(k for k in keys if k.startswith("kl/"))
    return [
        k
        for k in ["reward/mean", *(terms if len(terms) > 1 else []), *kl, "completion/length_mean"]
        if k in keys
    ]


def panel_title(key: str) -> str:
    """A readable title for a metrics.jsonl key."""
    if key == "reward/mean":
        return "reward (mean over the step's rollouts)"
    if key.startswith("reward/"):
        return f"reward term {key.split('/')[1]} (mean)"
    if key.startswith("kl/"):
        return f"KL to the reference ({key.split('/')[1].removesuffix('_mean')} estimator)"
    if key == "completion/length_mean":
        return "completion length (tokens, mean)"
    return key


def benchmark_table(runs: list[Run]) -> dict[str, dict[str, dict]]:
    """{benchmark: {column label: metrics}} over every run: held-out before/after and eval summaries."""
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        for when, result in (("before RL", run.before), ("after RL", run.after)):
            if result:
                table.setdefault(HELD_OUT, {})[f"{run.name} {when}"] = {
                    "harmful_refusal_rate": result["harmful_refusal_rate"],
                    "over_refusal_rate": result["benign_refusal_rate"],
                    "format_valid_rate": result["format_valid_rate"],
                    "judge": RULES,  # in-training evaluation uses the rule-based V_r
                }
        summary = run.summary or {}
        judge = {
            "judge": summary.get("judge", RULES),
            "asr_from": summary.get("asr_from", "1 - refusal rate"),
        }
        for bench, metrics in summary.get("benchmarks", {}).items():
            table.setdefault(bench, {})[run.name] = {**metrics, **judge}
    return table


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)

HARMFUL_COLOUR, BENIGN_COLOUR = "tab:red", "tab:blue"
RUN_STYLES = [("-", "o"), ("--", "^"), (":", "D"), ("-.", "v")]  # line style and marker of run i


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def _curve(ax, run: Run, key: str, window: int, color: str, linestyle: str, label: str) -> None:
    """One metric over steps: each step's value faint, the running mean of `window` steps on top."""
    xs = [r["step"] for r in run.steps if key in r]
    ys = [r[key] for r in run.steps if key in r]
    if xs:
        ax.plot(xs, ys, color=color, linestyle=linestyle, alpha=0.2, linewidth=0.8)
        ax.plot(xs, _smooth(ys, window), color=color, linestyle=linestyle, linewidth=1.6, label=label)


def plot_training(runs: list[Run], path: Path) -> bool:
    runs = [run for run in runs if run.steps or run.before]  # training runs only, not eval outputs
    panels = training_panels(runs)
    has_rates = any(eval_points(r) for r in runs) or any(
        "rollout/harmful_refusal_rate" in row for r in runs for row in r.steps
    )
    count = len(panels) + has_rates
    if not count:
        return False
    plt = _pyplot()
    window = max(1, max(len(r.steps) for r in runs) // 15)
    cols = 2 if count == 4 else min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows + 0.4), squeeze=False)
    flat = list(axes.flat)
    for ax, key in zip(flat, panels, strict=False):
        for i, run in enumerate(runs):
            _curve(ax, run, key, window, f"C{i}", "-", run.name)
        ax.set_title(panel_title(key))
        ax.set_xlabel("step")
    if len(runs) > 1:
        flat[0].legend(fontsize=7)
    if has_rates:
        ax = flat[len(panels)]
        for i, run in enumerate(runs):
            line, marker = RUN_STYLES[i % len(RUN_STYLES)]
            prefix = f"{run.name}: " if len(runs) > 1 else ""
            _curve(
                ax,
                run,
                "rollout/harmful_refusal_rate",
                window,
                HARMFUL_COLOUR,
                line,
                f"{prefix}harmful refusal, rollouts",
            )
            _curve(
                ax,
                run,
                "rollout/benign_refusal_rate",
                window,
                BENIGN_COLOUR,
                line,
                f"{prefix}over-refusal, rollouts",
            )
            if eval_points(run):
                steps, harmful, benign = zip(*eval_points(run), strict=True)
                ax.plot(
                    steps,
                    harmful,
                    marker,
                    color=HARMFUL_COLOUR,
                    markeredgecolor="black",
                    label=f"{prefix}harmful refusal, held-out",
                )
                ax.plot(
                    steps,
                    benign,
                    marker,
                    color=BENIGN_COLOUR,
                    markeredgecolor="black",
                    label=f"{prefix}over-refusal, held-out",
                )
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("refusal rates (harmful: higher is better)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in flat[count:]:
        ax.set_visible(False)
    smoothing = f"thin: each step; thick: running mean of {window} steps" if window > 1 else "each step"
    fig.suptitle(f"training ({smoothing})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_tradeoff(runs: list[Run], path: Path) -> bool:
    """Harmful refusal vs over-refusal at each held-out evaluation, one path per run coloured by step."""
    shown = [(i, run, eval_points(run)) for i, run in enumerate(runs) if eval_points(run)]
    if not shown:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    last_step = max(p[0] for _, _, points in shown for p in points)
    labelled: list[tuple[float, float]] = []

    def point_out(text, b, h, color, offset):  # a label away from the crowd, with a leader line
        ax.annotate(
            text,
            (b, h),
            textcoords="offset points",
            xytext=offset,
            fontsize=8,
            color=color,
            arrowprops={"arrowstyle": "-", "color": color, "alpha": 0.6},
        )
        labelled.append((b, h))

    def step_label(step, b, h, color):  # skipped where it would crowd an earlier label; the colour tells
        if all(abs(b - x) + abs(h - y) > 0.07 for x, y in labelled):
            ax.annotate(
                str(step), (b, h), textcoords="offset points", xytext=(7, -4), fontsize=8, color=color
            )
            labelled.append((b, h))

    for i, run, points in shown:
        steps, harmful, benign = zip(*points, strict=True)
        color = f"C{i}"
        ax.plot(benign, harmful, "-", color=color, alpha=0.5, label=run.name)
        dots = ax.scatter(
            benign, harmful, c=steps, cmap="viridis", vmin=0, vmax=last_step, edgecolors=color, s=45, zorder=3
        )
        ax.scatter(
            benign[-1], harmful[-1], s=160, facecolors="none", edgecolors=color, linewidths=2, zorder=4
        )
        point_out("before RL" if run.before else f"step {steps[0]}", benign[0], harmful[0], color, (12, 10))
        if len(points) > 1:  # pointed at from the open space below and to the right
            text = f"after RL (step {steps[-1]})" if run.after else f"step {steps[-1]}"
            point_out(text, benign[-1], harmful[-1], color, (40, -40 - 14 * i))
        for s, h, b in points[1:-1]:
            step_label(s, b, h, color)
    fig.colorbar(dots, ax=ax, label="step", fraction=0.05, pad=0.02)
    ax.scatter([0], [1], marker="*", s=240, facecolors="none", edgecolors="black", zorder=5, label="ideal")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("over-refusal rate on benign prompts (lower is better)")
    ax.set_ylabel("refusal rate on harmful prompts (higher is better)")
    ax.set_title("held-out trade-off at each evaluation (ringed: the last)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_benchmarks(table: dict[str, dict[str, dict]], path: Path) -> bool:
    """Bars per benchmark, one per run or eval output that has the rate; each series keeps its colour."""
    if not table:
        return False
    plt = _pyplot()
    series = list(dict.fromkeys(label for columns in table.values() for label in columns))
    colour = {label: f"C{j}" for j, label in enumerate(series)}
    panels = [
        ("harmful_refusal_rate", "refusal rate on harmful prompts (higher is better; ASR = 1 − this)"),
        ("over_refusal_rate", "over-refusal rate on benign prompts (lower is better)"),
    ]
    widest = max(len(columns) for columns in table.values())
    width = 0.8 / widest
    fig, axes = plt.subplots(2, 1, figsize=(min(18, max(6.5, len(table) * (0.5 + 0.45 * widest) + 2.5)), 7.5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        benches = [b for b in table if any(not math.isnan(m.get(key, math.nan)) for m in table[b].values())]
        in_legend = set()
        for i, bench in enumerate(benches):
            present = [
                (lab, m[key]) for lab, m in table[bench].items() if not math.isnan(m.get(key, math.nan))
            ]
            for j, (lab, value) in enumerate(present):
                x = i + (j - (len(present) - 1) / 2) * width
                ax.bar(x, value, width, color=colour[lab], label=None if lab in in_legend else lab)
                in_legend.add(lab)
                ax.annotate(f"{value:.0%}", (x, value), ha="center", va="bottom", fontsize=7)
        rotate = len(benches) > 4
        ax.set_xticks(
            range(len(benches)),
            [b.replace(" (", "\n(") for b in benches],
            fontsize=8,
            rotation=20 if rotate else 0,
            ha="right" if rotate else "center",
        )
        ax.set_xlim(-0.6, len(benches) - 0.4)
        ax.set_ylim(0, 1.12)
        ax.set_title(title)
        if in_legend:  # a panel whose rate no series has (NaN everywhere) is left without a legend
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# Tables and the two documents


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def run_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        if not run.steps:
            continue
        last = run.steps[-1]
        b, a = run.before or {}, run.after or {}
        rows.append(
            [
                run.name,
                str(last["step"]),
                f"{last.get('reward/mean', float('nan')):.3f}",
                f"{_pct(b.get('harmful_refusal_rate'))} → {_pct(a.get('harmful_refusal_rate'))}",
                f"{_pct(b.get('benign_refusal_rate'))} → {_pct(a.get('benign_refusal_rate'))}",
                f"{_pct(b.get('format_valid_rate'))} → {_pct(a.get('format_valid_rate'))}",
            ]
        )
    return rows


RUN_HEADER = [
    "run",
    "steps",
    "final reward",
    "harmful refusal (before → after)",
    "over-refusal (before → after)",
    "format validity (before → after)",
]
BENCH_HEADER = [
    "benchmark",
    "model / run",
    "harmful refusal",
    "ASR",
    "over-refusal",
    "format valid",
    "pass@k",
    "judged by (ASR from)",
]


def benchmark_rows(table: dict[str, dict[str, dict]]) -> list[list[str]]:
    rows = []
    for bench, columns in table.items():
        for label, m in columns.items():
            ks = sorted((int(k[5:]) for k in m if k.startswith("pass@")), reverse=True)
            at_k = (
                f"pass@{ks[0]} {_pct(m[f'pass@{ks[0]}'])}, all_safe@{ks[0]} {_pct(m[f'all_safe@{ks[0]}'])}"
                if ks
                else "—"
            )
            asr = m.get("attack_success_rate", 1 - m["harmful_refusal_rate"])
            judge = m["judge"] + (f" ({m['asr_from']})" if "asr_from" in m else "")
            if m.get("n_unparseable"):
                judge += f"; {m['n_unparseable']} unparseable repl{'y' if m['n_unparseable'] == 1 else 'ies'} left out"
            rows.append(
                [
                    bench,
                    label,
                    _pct(m["harmful_refusal_rate"]),
                    _pct(asr),
                    _pct(m["over_refusal_rate"]),
                    _pct(m["format_valid_rate"]),
                    at_k,
                    judge,
                ]
            )
    return rows


SAMPLE_TEXT_CHARS = 400  # of a prompt or completion shown in a table cell


def _short(text: str) -> str:
    return text if len(text) <= SAMPLE_TEXT_CHARS else text[:SAMPLE_TEXT_CHARS] + " …"


def _value(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def sample_sections(runs: list[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per run with samples: its latest samples.jsonl step, one row per completion."""
    sections = []
    for run in runs:
        if not run.samples:
            continue
        terms = list(run.samples[0]["rewards"])
        header = ["prompt", "label", "completion", "reward", *terms, "advantage", "refused", "format valid"]
        rows = [
            [
                _short(s["prompt"]),
                s["label"],
                _short(s["completion"]),
                _value(s["reward"]),
                *(_value(s["rewards"].get(t)) for t in terms),
                f"{s['advantage']:.3f}",
                "yes" if s["refused"] else "no",
                "yes" if s["format_valid"] else "no",
            ]
            for s in run.samples
        ]
        title = (
            f"Latest samples (step {run.samples[0]['step']}, {run.name}; samples.jsonl has every logged step)"
        )
        sections.append((title, header, rows))
    return sections


def _md_cell(text: str) -> str:
    """A cell's text on one markdown table line: pipes escaped, line breaks as <br>."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


FIGURES = [
    ("training.png", "Training curves", plot_training),
    ("tradeoff.png", "Harmful refusal vs over-refusal", plot_tradeoff),
]


def write_report(folders: list[Path], out: Path) -> list[Path]:
    """Write report.md, report.html and the PNGs into `out`; returns the files written."""
    runs = [load_run(f) for f in folders]
    unique_names(runs, folders)
    out.mkdir(parents=True, exist_ok=True)
    table = benchmark_table(runs)
    figures = [(name, title) for name, title, plot in FIGURES if plot(runs, out / name)]
    if plot_benchmarks(table, out / "benchmarks.png"):
        figures.append(("benchmarks.png", "Refusal and over-refusal per benchmark"))
    sections = []  # (title, header, rows)
    if run_rows(runs):
        sections.append(("Training runs (held-out set: before → after RL)", RUN_HEADER, run_rows(runs)))
    if table:
        sections.append(("Per benchmark", BENCH_HEADER, benchmark_rows(table)))

    title = "alphaalign report: " + ", ".join(r.name for r in runs)
    md = [f"# {title}", ""]
    page = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        STYLE,
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, header, rows in sections:
        md += [f"## {heading}", "", markdown_table(header, rows), ""]
        page += [f"<h2>{html.escape(heading)}</h2>", html_table(header, rows)]
    for name, heading in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        md += [f"## {heading}", "", f"![{heading}]({name})", ""]
        page += [
            f"<h2>{html.escape(heading)}</h2>",
            f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>",
        ]
    for heading, header, rows in sample_sections(runs):  # after the figures: long rows of text
        md += [f"## {heading}", "", markdown_table(header, rows), ""]
        page += [f"<h2>{html.escape(heading)}</h2>", html_table(header, rows)]
    md.append(
        "Each row names the judge of its refusals and what its ASR is computed from (1 − harmful refusal rate, "
        "or an LLM judge's harm score). See docs/evaluation.md."
    )
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text("\n".join(page) + "\n")
    return [out / "report.md", out / "report.html", *(out / name for name, _ in figures)]


STYLE = (
    "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>"
)


def format_eval_table(before: dict, after: dict) -> str:
    rows = [
        ("harmful refusal rate", "harmful_refusal_rate", "higher is better"),
        ("benign over-refusal rate", "benign_refusal_rate", "lower is better"),
        ("format validity", "format_valid_rate", "higher is better"),
    ]
    n = f"held-out prompts: {after['n_harmful']} harmful, {after['n_benign']} benign (responses sampled)"
    lines = [n, f"{'metric':<26}{'before RL':>10}{'after RL':>10}", "-" * 46]
    lines += [f"{name:<26}{before[key]:>10.1%}{after[key]:>10.1%}   {hint}" for name, key, hint in rows]
    return "\n".join(lines)


def train_and_report(recipe) -> int:
    """`alphaalign train` in this process: train, then print the summary and write the run's report."""
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
        report = Path(recipe.trainer.output_dir) / "report"
        write_report([Path(recipe.trainer.output_dir)], report)
        print(f"report: {report / 'report.html'} (and report.md)")
    return 0


def run(args) -> int:
    """`alphaalign report`: one report over training runs and eval outputs."""
    folders = [Path(f) for f in args.runs]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    check_output(args.out, "--out", folder=True)
    files = write_report(folders, Path(args.out))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
