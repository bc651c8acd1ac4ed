"""`alphaalign eval-rm`: metric arithmetic, how each file format maps to (configuration, conversation, label),
and real runs of the tiny CSRM."""

import json
import shutil

import pytest
import torch
from helpers import ALTERNATING_TEMPLATE, CSRM_CALIBRATION, ROOT, reference_chat_logits, with_chat_template

from alphaalign.cli import main
from alphaalign.errors import UserError
from alphaalign.rewards.csrm import Calibration, expected_calibration_error
from alphaalign.rm.agreement import classification_metrics, evaluate_rm, read_examples, transcript_turns

CSRM_DATA = ROOT / "recipes" / "data" / "csrm"


def test_classification_metrics_by_hand():
    got = classification_metrics([True, True, False, False, True], [True, False, True, False, True])
    assert got == {
        "tp": 2,
        "fp": 1,
        "fn": 1,
        "tn": 1,
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
        "accuracy": pytest.approx(3 / 5),
    }
    skewed = classification_metrics([True, False, False, False], [True, True, True, False])
    assert (skewed["precision"], skewed["recall"], skewed["f1"]) == pytest.approx((1.0, 1 / 3, 0.5))
    none_predicted = classification_metrics([False, False], [True, False])
    assert (none_predicted["precision"], none_predicted["recall"], none_predicted["f1"]) == (0.0, 0.0, 0.0)


def test_transcripts_become_alternating_turns():
    text = "User: Hi\nthere\nAgent: Hello.\n'User': Refund?\nuser: Now!\nAssistant: Done."
    assert transcript_turns(text, "f:1") == [
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Refund?\nNow!"},
        {"role": "assistant", "content": "Done."},
    ]
    with pytest.raises(UserError, match="f:1: transcript has no line starting with 'User:' or 'Agent:'"):
        transcript_turns("Customer: hi", "f:1")


def test_cosapien_rows_map_to_a_prompt_level_label(tmp_path):
    rows = [{"prompt": "p", "scenario": "s", "type": t} for t in ("allowed", "Disallowed", "partial", "safe")]
    rows.append({"prompt": "p", "scenario": "s", "type": "allowed", "response": "r"})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, examples = read_examples(tmp_path / "c.jsonl")
    assert fmt == "cosapien"
    assert [ex.violation for ex in examples] == [False, True, True, False, False]
    assert examples[0].chat == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    assert examples[4].chat[-1] == {"role": "assistant", "content": "r"}


def test_dynabench_rows_map_fail_to_a_violation():
    fmt, examples = read_examples(CSRM_DATA / "dynabench_demo.jsonl")
    rows = [json.loads(line) for line in (CSRM_DATA / "dynabench_demo.jsonl").read_text().splitlines()]
    assert fmt == "dynabench" and len(examples) == len(rows) == 16
    assert [ex.violation for ex in examples] == ["FAIL" in r["label"] for r in rows]
    assert examples[-1].violation is False  # "<answer>PASS</answer>"
    assert examples[0].chat[0] == {"role": "system", "content": rows[0]["policy"]}
    assert [t["role"] for t in examples[6].chat] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "p", "scenario": "s", "type": "borderline"},
            "type must be one of disallowed, partial, allowed, safe",
        ),
        (
            {"policy": "p", "transcript": "User: a", "label": "MAYBE"},
            "label must be PASS or FAIL, got 'MAYBE'",
        ),
        ({"policy": "p", "transcript": "", "label": "PASS"}, "'transcript' must be a non-empty string"),
        (
            {"question": "q"},
            r"unknown format; expected the columns \(prompt, scenario, type\) or \(policy, transcript, label\)",
        ),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, row, message):
    (tmp_path / "e.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"e.jsonl:1: {message}"):
        read_examples(tmp_path / "e.jsonl")


def test_eval_rm_metrics_match_the_models_own_probabilities(tiny_csrm, tmp_path, capsys):
    """Bias near the median logit, so that the tiny random CSRM predicts both classes."""
    files = [CSRM_DATA / "cosapien_demo.jsonl", CSRM_DATA / "dynabench_demo.jsonl"]
    chats = [[ex.chat for ex in read_examples(f)[1]] for f in files]
    logits = [reference_chat_logits(tiny_csrm, c) for c in chats]
    middle = torch.cat(logits).sort().values[15:17]
    calibration = Calibration(2.0, float(middle.mean()))  # halfway between two logits: no ties at p = 0.5
    results = evaluate_rm(
        str(tiny_csrm), [str(f) for f in files], temperature=2.0, bias=calibration.bias, device="cpu"
    )
    for f, z, got in zip(files, logits, results, strict=True):
        actual = [ex.violation for ex in read_examples(f)[1]]
        p_violation = 1 - calibration.probability(z)
        want = classification_metrics((p_violation >= 0.5).tolist(), actual)
        assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)
        assert got["ece"] == pytest.approx(
            expected_calibration_error(p_violation, torch.tensor(actual)), abs=1e-5
        )
        assert got["n"] == 16 and got["violations"] == sum(actual)
    assert 0 < sum(r["tp"] + r["fp"] for r in results) < 32  # both classes predicted

    out = tmp_path / "m.json"
    args = ["eval-rm", "--model", str(tiny_csrm), "--device", "cpu", *map(str, files), "--output", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "cosapien_demo.jsonl" in table and "positive class: violation" in table
    stored = json.loads(out.read_text())  # the stored calibration (temperature 2, bias 0.25) this time
    assert [r["format"] for r in stored] == ["cosapien", "dynabench"]
    z = logits[1]
    p_violation = 1 - Calibration(**CSRM_CALIBRATION).probability(z)
    actual = [ex.violation for ex in read_examples(files[1])[1]]
    assert stored[1]["f1"] == pytest.approx(
        classification_metrics((p_violation >= 0.5).tolist(), actual)["f1"]
    )


def test_eval_rm_errors_are_one_line(tiny_csrm, tmp_path, capsys):
    base = ["eval-rm", "--model", str(tiny_csrm), "--device", "cpu"]
    for args, message in [
        ([str(tmp_path / "nope.jsonl")], "nope.jsonl: data file not found"),
        (
            ["--threshold", "1.5", str(CSRM_DATA / "cosapien_demo.jsonl")],
            "--threshold must be between 0 and 1",
        ),
        (["--model", str(tmp_path), str(CSRM_DATA / "cosapien_demo.jsonl")], "has no csrm_calibration.json"),
    ]:
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_chat_the_models_template_refuses_is_named_by_its_file_and_line(tiny_csrm, tmp_path, capsys):
    """A support transcript may open with the agent's greeting; a template that wants user/assistant turns in
    turn (Llama-2's, Mistral's) refuses that chat. It is the model's answer about this row, not a crash."""
    strict = with_chat_template(tiny_csrm, tmp_path / "strict", ALTERNATING_TEMPLATE)
    rows = [
        {"policy": "Be kind.", "transcript": "User: hi\nAgent: hello", "label": "PASS"},
        {"policy": "Be kind.", "transcript": "Agent: Welcome! How can I help?\nUser: hi", "label": "PASS"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval-rm", "--model", str(strict), "--device", "cpu", str(data)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after transformers' progress bar
        f"error: {data}:2: the chat template of '{strict}' refuses a chat of roles [system, assistant, user] "
        "(Conversation roles must alternate user/assistant/user/assistant/...)"
    )
    data.write_text(json.dumps(rows[0]) + "\n")
    assert main(["eval-rm", "--model", str(strict), "--device", "cpu", str(data)]) == 0


def test_every_file_is_read_before_any_is_scored(tiny_csrm, tmp_path, capsys):
    """A mistake in the last file is reported before the model scores the first one (with a large CSRM, minutes).
    The model here cannot even load, so an error about the data proves that nothing was scored."""
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_csrm, weightless)
    (weightless / "model.safetensors").unlink()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "scenario": "s", "type": "maybe"}) + "\n")
    args = ["eval-rm", "--model", str(weightless), "--device", "cpu", str(CSRM_DATA / "cosapien_demo.jsonl")]
    assert main([*args, str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}:1: type must be one of")
    assert main(args) == 2
    assert "cannot load sequence-classification model" in capsys.readouterr().err
