"""Damaged state: checkpoints that lost or truncated files, a torn metrics line, a disk that fills up.

Resume verifies the newest checkpoint against the manifest written with it and falls back to the newest
whole one with one warning line; nothing the run wrote before is deleted; a full disk ends in one line.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, read_metrics

from alphaalign.cli import main
from alphaalign.rl.checkpoint import MANIFEST, checkpoint_problem, latest_checkpoint

pytestmark = pytest.mark.slow  # every test resumes or copies a trained run


@pytest.fixture(scope="module")
def three_steps(tiny_policy, tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step (copied by each test)."""
    import yaml

    folder = tmp_path_factory.mktemp("three-steps")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_policy)},
                "data": {
                    "template": "none",
                    "train": [
                        {"path": str(ROOT / "recipes/data/demo/train_harmful.jsonl")},
                        {"path": str(ROOT / "recipes/data/demo/train_benign.jsonl")},
                    ],
                },
                "rollout": {"num_generations": 2, "max_new_tokens": 8},
                "rewards": [{"name": "alphaalign_safety"}],
                "trainer": {
                    "prompts_per_step": 2,
                    "max_steps": 3,
                    "save_every": 1,
                    "keep_last": 5,
                    "output_dir": str(folder / "run"),
                    "progress_bar": False,
                },
                "logging": {"wandb_mode": "disabled"},
            }
        )
    )
    assert main(["train", str(recipe)]) == 0
    return recipe, folder / "run"


@pytest.fixture
def run_copy(three_steps, tmp_path):
    recipe, run = three_steps
    shutil.copytree(run, tmp_path / "run")
    return recipe, tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # what happened to the newest checkpoint, and the file the warning must name
    "truncated weights": (lambda c: truncate(c / "policy" / "model.safetensors"), "policy/model.safetensors"),
    "truncated trainer state": (lambda c: truncate(c / "trainer_state.pt"), "trainer_state.pt"),
    "missing trainer state": (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt is missing"),
    "missing tokenizer file": (lambda c: (c / "policy" / "tokenizer.json").unlink(), "policy/tokenizer.json"),
    "truncated state.json": (lambda c: truncate(c / "state.json"), "state.json"),
    "truncated manifest": (lambda c: truncate(c / MANIFEST), MANIFEST),
    "no state.json": (lambda c: (c / "state.json").unlink(), "state.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_passes_over_a_damaged_newest_checkpoint_with_one_line(run_copy, capsys, damage):
    recipe, run = run_copy
    spoil, named = DAMAGE[damage]
    spoil(run / "checkpoints" / "step-000003")
    assert checkpoint_problem(run / "checkpoints" / "step-000003") is not None
    assert checkpoint_problem(run / "checkpoints" / "step-000002") is None

    assert main(["train", str(recipe), f"trainer.output_dir={run}", "trainer.max_steps=4"]) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "step-000003" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: using ") and named in warnings[0], out.err
    assert "step-000002, the newest complete checkpoint" in warnings[0]
    assert "resuming from" in out.out and "(step 2)" in out.out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # the damaged one was written again; nothing older was lost
        assert checkpoint_problem(run / "checkpoints" / f"step-{step:06d}") is None


def test_when_every_checkpoint_is_damaged_resume_stops_with_one_line_and_deletes_nothing(run_copy, capsys):
    recipe, run = run_copy
    for step in (1, 2, 3):
        truncate(run / "checkpoints" / f"step-{step:06d}" / "policy" / "model.safetensors")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    metrics = (run / "metrics.jsonl").read_bytes()
    assert main(["train", str(recipe), f"trainer.output_dir={run}", "trainer.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'checkpoints'}: no complete checkpoint"), err
    assert "step-000001 (policy/model.safetensors has" in err[0] and "trainer.resume_from: none" in err[0]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_an_explicit_damaged_checkpoint_is_refused_in_one_line(run_copy, capsys):
    recipe, run = run_copy
    (run / "checkpoints" / "step-000002" / "trainer_state.pt").unlink()
    chosen = run / "checkpoints" / "step-000002"
    args = [
        "train",
        str(recipe),
        f"trainer.output_dir={run}",
        "trainer.max_steps=4",
        f"trainer.resume_from={chosen}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: trainer.resume_from: {chosen} is not a complete checkpoint folder: "
        "trainer_state.pt is missing"
    ]


def test_a_checkpoint_without_a_manifest_missing_its_trainer_state_gets_the_right_diagnosis(run_copy, capsys):
    """Checkpoints written before manifests existed: a missing trainer_state.pt is not a DeepSpeed checkpoint."""
    recipe, run = run_copy
    for step in (1, 2, 3):
        (run / "checkpoints" / f"step-{step:06d}" / MANIFEST).unlink()
    (run / "checkpoints" / "step-000003" / "trainer_state.pt").unlink()
    assert latest_checkpoint(run).name == "step-000003"  # nothing to verify it by
    assert main(["train", str(recipe), f"trainer.output_dir={run}", "trainer.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == f"error: trainer.resume_from: {run / 'checkpoints' / 'step-000003'}: trainer_state.pt is missing"
    )
    assert "DeepSpeed" not in err[-1]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run_copy, capsys, tmp_path):
    recipe, run = run_copy
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(rows + '{"step": 4, "reward/mean": 0.2')  # the disk filled mid-line
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {run / 'metrics.jsonl'}:4: dropped a torn last line (an interrupted write)"]
    assert main(["train", str(recipe), f"trainer.output_dir={run}", "trainer.max_steps=4"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert "dropped a torn last line" in capsys.readouterr().err  # the resumed run said it too
    (run / "metrics.jsonl").write_text(rows.replace('"step": 2', '"step": 2, oops', 1))  # not at the end
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'metrics.jsonl'}:2: not a metrics row"), err


def _text_metric(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["reward/mean"] = "high"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


SAMPLE = {
    "step": 3,
    "prompt": "p",
    "label": "benign",
    "completion": "c",
    "reward": 0.5,
    "rewards": {"a": 0.5},
}
SAMPLE |= {"advantage": 0.0, "refused": False, "format_valid": True}
REPORT_DAMAGE = {  # a file the report reads, what is in it, and what the error line says
    "a metric that is text": (
        "metrics.jsonl",
        _text_metric,
        "metrics.jsonl (step 2): reward/mean: must be a number, got 'high'",
    ),
    "a rate that is text": (
        "eval_before.json",
        lambda p: p.write_text(
            '{"harmful_refusal_rate": "0.5", "benign_refusal_rate": 0.1, "format_valid_rate": 1}'
        ),
        "eval_before.json: harmful_refusal_rate: input should be a valid number (got '0.5')",
    ),
    "a list for an object": (
        "eval_after.json",
        lambda p: p.write_text("[]"),
        "eval_after.json: the file: input should be",
    ),
    "a sample without its reward": (
        "samples.jsonl",
        lambda p: p.write_text(json.dumps({k: v for k, v in SAMPLE.items() if k != "reward"}) + "\n"),
        "samples.jsonl (step 3): reward: field required",
    ),
}


def test_the_report_reads_the_shapes_a_run_writes(run_copy, tmp_path):
    """The control for the cases below: the same files, undamaged, give a report (NaN: no prompts of a label)."""
    _, run = run_copy
    rates = (
        '{"harmful_refusal_rate": 0.5, "benign_refusal_rate": NaN, "format_valid_rate": 1, "n_harmful": 2}'
    )
    (run / "eval_before.json").write_text(rates)
    (run / "eval_after.json").write_text(rates)
    (run / "samples.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "| p | benign | c | 0.500 | 0.500 |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("case", REPORT_DAMAGE)
def test_a_damaged_file_of_a_run_ends_the_report_in_one_line_naming_it(case, run_copy, capsys, tmp_path):
    """A run folder's files may be damaged, edited by hand or written by another version: the report names
    the file and the field instead of failing halfway with a traceback."""
    _, run = run_copy
    name, damage, says = REPORT_DAMAGE[case]
    damage(run / name)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / name.split()[0]}") and says in err[0], err


CHECK_AFTER = """
import json, sys
from pathlib import Path
from alphaalign.rl.checkpoint import checkpoint_problem
out = Path(sys.argv[1])
found = sorted((out / "checkpoints").glob("*"))
Path(sys.argv[2]).write_text(json.dumps({p.name: checkpoint_problem(p) for p in found}))
"""


def test_a_disk_that_fills_during_training_ends_in_one_line_naming_the_path(three_steps, tmp_path):
    """Checkpoints after every step on a file system with room for about four of them: the run stops with one
    line saying the disk is full and where; every checkpoint written before it stays whole, and the
    part-written one is gone."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare with user namespaces to mount a small file system")
    recipe, run = three_steps
    checkpoint_kib = sum(p.stat().st_size for p in (run / "checkpoints" / "step-000001").rglob("*")) // 1024
    disk, report = tmp_path / "disk", tmp_path / "checkpoints.json"
    disk.mkdir()
    out = disk / "run"
    train = [
        sys.executable,
        "-m",
        "alphaalign.cli",
        "train",
        str(recipe),
        f"trainer.output_dir={out}",
        "trainer.max_steps=12",
        "trainer.keep_last=12",
    ]
    check = [sys.executable, "-c", CHECK_AFTER, str(out), str(report)]
    script = (
        f"mount -t tmpfs -o size={int(checkpoint_kib * 4.5) + 64}k tmpfs {disk} && "
        f"{shlex.join(train)}; status=$?; {shlex.join(check)}; exit $status"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith(f"error: cannot write checkpoint {out}/checkpoints/step-"), err
    assert "no space left on device" in err[0] and "are intact" in err[0]
    problems = json.loads(report.read_text())
    assert len(problems) >= 2 and not any(name.startswith(".tmp") for name in problems), problems
    assert all(problem is None for problem in problems.values()), problems
