"""Safety benchmarks: where each one lives on the Hugging Face hub, its schema, and the suites that group them.

Every benchmark is a `DataSource` (the same type recipes use for data): its hub id, config, split, prompt field
and either a fixed label (every prompt harmful, or every prompt benign) or the field holding a per-row label.
`load_benchmark(name, data_dir)` reads the hub copy, or `<data_dir>/<name>.{jsonl,csv,parquet}` written in the
same schema (what the tests and the offline demo use). Hub ids, configs and field names are as their dataset
cards gave them when this was written; docs/evaluation.md lists the ones that could not be checked offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alphaalign.config import DataSource
from alphaalign.data import Example, load_source
from alphaalign.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".csv", ".parquet", ".json")


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: DataSource  # the hub copy
    measures: str  # one line: what a refusal on it means


def _hub(hf_id, split, config=None, prompt="prompt", label=None, label_field="label") -> DataSource:
    return DataSource(
        hf_id=hf_id, hf_config=config, split=split, prompt_field=prompt, label=label, label_field=label_field
    )


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark(
            "strongreject",
            _hub("walledai/StrongREJECT", "train", label="harmful"),
            "313 forbidden prompts; refusal wanted (ASR = answered share)",
        ),
        Benchmark(
            "advbench",
            _hub("walledai/AdvBench", "train", label="harmful"),
            "520 harmful behaviours (prompt, target); refusal wanted",
        ),
        Benchmark(
            "harmbench",
            _hub("walledai/HarmBench", "train", config="standard", label="harmful"),
            "200 standard harmful behaviours (prompt, category); refusal wanted",
        ),
        Benchmark(
            "wildguardtest",
            _hub("allenai/wildguardmix", "test", config="wildguardtest", label_field="prompt_harm_label"),
            "1725 vanilla and adversarial prompts labelled harmful/unharmful: ASR and over-refusal",
        ),
        Benchmark(
            "jailbreaktrigger",
            _hub("TrustLLM/TrustLLM-dataset", "jailbreak", config="safety", label="harmful"),
            "1400 harmful prompts wrapped in 13 jailbreak methods (TrustLLM); refusal wanted",
        ),
        Benchmark(
            "xstest",
            _hub("walledai/XSTest", "test"),
            "250 safe prompts that look unsafe and 200 unsafe contrasts (label safe/unsafe)",
        ),
        Benchmark(
            "coconot_contrast",
            _hub("allenai/coconot", "test", config="contrast", label="benign"),
            "379 benign contrast prompts that should be answered: over-refusal",
        ),
        Benchmark(
            "coconot_original",
            _hub("allenai/coconot", "test", config="original", label="harmful"),
            "1001 requests a model should not comply with (noncompliance categories)",
        ),
        Benchmark(
            "orbench_hard",
            _hub("bench-llm/or-bench", "train", config="or-bench-hard-1k", label="benign"),
            "1319 seemingly toxic but benign prompts: over-refusal",
        ),
        Benchmark(
            "orbench_toxic",
            _hub("bench-llm/or-bench", "train", config="or-bench-toxic", label="harmful"),
            "655 toxic prompts, the OR-Bench control set; refusal wanted",
        ),
    ]
}

SUITES = {
    "safety": ["strongreject", "advbench", "harmbench"],
    "jailbreak": ["wildguardtest", "jailbreaktrigger"],
    "overrefusal": ["xstest", "coconot_contrast", "orbench_hard"],
}
SUITES["all"] = [name for suite in ("safety", "jailbreak", "overrefusal") for name in SUITES[suite]]


def describe() -> str:
    """One line per benchmark: name, suites, where it lives on the hub, what it measures."""
    lines = []
    for name, bench in BENCHMARKS.items():
        suites = ",".join(s for s in ("safety", "jailbreak", "overrefusal") if name in SUITES[s]) or "-"
        src = bench.source
        hub = f"{src.hf_id} ({src.hf_config or '-'}, {src.split})"
        lines.append(f"{name:<18}{suites:<13}{hub:<52}{bench.measures}")
    return "\n".join(lines)


def suite_benchmarks(spec: str) -> list[str]:
    """The benchmarks of a comma-separated list of suites and benchmark names, in order, each once."""
    names = []
    for item in spec.split(","):
        if item not in SUITES and item not in BENCHMARKS:
            raise UserError(
                f"--suite: unknown suite or benchmark {item!r}; suites: {', '.join(SUITES)}; "
                "benchmarks: alphaalign eval --list"
            )
        names += SUITES.get(item, [item])
    return list(dict.fromkeys(names))


def local_file(name: str, data_dir: Path) -> Path:
    """`<data_dir>/<name>` with the first suffix that exists."""
    for suffix in LOCAL_SUFFIXES:
        path = data_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    raise UserError(f"--data-dir: no {name}{{{','.join(LOCAL_SUFFIXES)}}} in {data_dir}")


def load_benchmark(name: str, data_dir: Path | None = None, limit: int | None = None) -> list[Example]:
    """The benchmark's prompts from the hub, or from a local file in the hub schema when `data_dir` is set."""
    source = BENCHMARKS[name].source
    if data_dir is not None:
        source = source.model_copy(update={"hf_id": None, "path": str(local_file(name, data_dir))})
    return load_source(source.model_copy(update={"max_rows": limit}), Path.cwd())


def custom_source(path: str, prompt_field: str, label_field: str, label: str | None) -> DataSource:
    """A local file with its own field mapping (`alphaalign eval --data FILE`)."""
    if not Path(path).is_file():
        raise UserError(f"--data: file not found: {path}")
    return DataSource(path=path, prompt_field=prompt_field, label_field=label_field, label=label)
