"""Data sources, templates and the prompt stream."""

import json
from collections import Counter

import pytest
from helpers import DEMO_DATA

from alphaalign.config import DataSource
from alphaalign.data import Example, PromptStream, chat_messages, compile_template, load_source
from alphaalign.errors import UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def test_jsonl_rows_labels_and_columns(tmp_path):
    write(tmp_path, "d.jsonl", '{"q": "a", "y": "unsafe", "topic": "x"}\n\n{"q": "b", "y": false}\n')
    rows = load_source(DataSource(path="d.jsonl", prompt_field="q", label_field="y"), tmp_path)
    assert [(r.prompt, r.label) for r in rows] == [("a", "harmful"), ("b", "benign")]
    assert rows[0].columns == {"topic": "x"}


def test_jsonl_strings_may_hold_unicode_line_breaks(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped in a string, and json.dumps(ensure_ascii=False) writes them
    so: they are not line ends of a JSON Lines file."""
    rows = [{"prompt": f"one{sep}two", "label": "benign"} for sep in ("\u2028", "\u2029", "\x85")]
    write(tmp_path, "d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [r.prompt for r in load_source(DataSource(path="d.jsonl"), tmp_path)] == [
        r["prompt"] for r in rows
    ]


def test_gzipped_files_read_as_their_inner_format(tmp_path):
    import gzip

    write(
        tmp_path,
        "d.jsonl.gz",
        gzip.compress(b'{"prompt": "a", "label": "harmful"}\r\n{"prompt": "b", "label": "benign"}\n'),
    )
    write(tmp_path, "d.csv.gz", gzip.compress('\ufeffprompt,label\n"one\r\ntwo",benign\n'.encode()))
    assert [(r.prompt, r.label) for r in load_source(DataSource(path="d.jsonl.gz"), tmp_path)] == [
        ("a", "harmful"),
        ("b", "benign"),
    ]
    assert [r.prompt for r in load_source(DataSource(path="d.csv.gz"), tmp_path)] == ["one\ntwo"]
    write(tmp_path, "bad.jsonl.gz", b"not gzip")
    with pytest.raises(UserError, match=r"bad.jsonl.gz: cannot read \(BadGzipFile\)"):
        load_source(DataSource(path="bad.jsonl.gz"), tmp_path)


def test_csv_and_fixed_label(tmp_path):
    write(tmp_path, "d.csv", "instruction,context\nbake bread,\nwrite a poem,x\n")
    rows = load_source(DataSource(path="d.csv", prompt_field="instruction", label="benign"), tmp_path)
    assert [r.label for r in rows] == ["benign", "benign"] and rows[1].columns == {"context": "x"}


def test_csv_fields_keep_their_line_breaks_and_any_length(tmp_path):
    """A quoted field may hold newlines (most prompt sets have multi-line prompts) and Unicode line breaks, and
    be longer than csv's default limit of 128 KiB; error lines count the lines a quoted field spans."""
    long = "x" * 300_000
    write(
        tmp_path, "d.csv", f'prompt,label\n"one\ntwo",benign\na\u2028b,benign\n"{long}",harmful\n\nc,maybe\n'
    )
    with pytest.raises(UserError, match=r"d.csv:7: label field 'label' is 'maybe'"):
        load_source(DataSource(path="d.csv"), tmp_path)
    write(tmp_path, "d.csv", f'\nprompt,label\n"one\ntwo",benign\na\u2028b,benign\n"{long}",harmful\n')
    rows = load_source(DataSource(path="d.csv"), tmp_path)
    assert [(r.prompt, r.label) for r in rows] == [
        ("one\ntwo", "benign"),
        ("a\u2028b", "benign"),
        (long, "harmful"),
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "d.jsonl",
            '{"prompt": "a", "label": "harmful"}\n{"prompt": "b", "label": \n',
            r"d.jsonl:2: invalid JSON",
        ),
        (
            "d.jsonl",
            '{"prompt": "a", "label": "harmful"}\n{"text": "b", "label": "benign"}\n',
            r"d.jsonl:2: missing or empty prompt field 'prompt'",
        ),
        ("d.jsonl", '{"prompt": "a", "label": "maybe"}\n', r"d.jsonl:1: label field 'label' is 'maybe'"),
        ("d.jsonl", "\n\n", r"d.jsonl: no rows"),
        ("d.jsonl", b"\x00\x01\x02binary", r"d.jsonl: binary data"),
        ("d.jsonl", b"\xff\xfe\xfa", r"d.jsonl: not a UTF-8 text file"),
        ("d.json", '{"prompt": "a"}', r"d.json: expected a JSON list"),
        ("d.jsonl", "[1, 2]\n", r"d.jsonl:1: a row must be an object"),
        (
            "d.csv",
            'prompt,label\n"a\nb",harmful\n\nHello, world,benign\n',
            r"d.csv:5: the header names 2 columns, this row has 3 \(a comma in a field that is not quoted\?\)",
        ),
        (
            "d.csv",
            "prompt,label,prompt\na,benign,b\n",
            r"d.csv:1: the header names column 'prompt' more than once",
        ),
    ],
)
def test_data_errors_name_file_and_line(tmp_path, name, content, message):
    write(tmp_path, name, content)
    with pytest.raises(UserError, match=message) as err:
        load_source(DataSource(path=name), tmp_path)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_source(DataSource(path="nope.jsonl"), tmp_path)


def test_templates():
    example = Example("How do I bake bread?", "benign", {"topic": "food"})
    alpha = chat_messages(example, compile_template("alphaalign"), None)
    assert alpha[-1]["role"] == "user"
    assert "<safety_reasoning>" in alpha[-1]["content"] and alpha[-1]["content"].endswith(
        "How do I bake bread?"
    )
    assert chat_messages(example, compile_template("none"), "be nice") == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "How do I bake bread?"},
    ]
    custom = chat_messages(example, compile_template("[{{ topic }}] {{ prompt }}"), None)
    assert custom[-1]["content"] == "[food] How do I bake bread?"
    with pytest.raises(UserError, match=r"^data.template: a custom template must use \{\{ prompt \}\}"):
        compile_template("no placeholder here")


def test_templates_ask_for_the_recipes_format():
    from alphaalign.config import FormatConfig

    example = Example("How do I bake bread?", "benign")
    own = FormatConfig(reasoning_tag="think", answer_tag="final", canned_refusal="No.")
    text = chat_messages(example, compile_template("alphaalign", answer_format=own), None)[-1]["content"]
    assert "between <think> and </think>" in text and "between <final> and </final>" in text
    assert "must be exactly No." in text and "safety_reasoning" not in text and "boxed" not in text
    default = chat_messages(example, compile_template("alphaalign"), None)[-1]["content"]
    assert "between <safety_reasoning> and </safety_reasoning>" in default and "\\boxed{Sorry" in default
    custom = compile_template("Reply in <{{ answer_tag }}>: {{ prompt }}", answer_format=own)
    assert chat_messages(example, custom, None)[-1]["content"] == "Reply in <final>: How do I bake bread?"


def test_prompt_stream_is_deterministic_resumable_and_weighted():
    a = [Example(f"a{i}", "harmful") for i in range(10)]
    b = [Example(f"b{i}", "benign") for i in range(10)]
    first = PromptStream([a, b], [3.0, 1.0], seed=1)
    drawn = first.take(400)
    again = PromptStream([a, b], [3.0, 1.0], seed=1)
    again.skip_to(250)
    assert again.take(150) == drawn[250:]
    for start in range(0, 400, 4):  # weights 3:1 are met exactly in every window of 4 draws
        assert Counter(ex.prompt[0] for ex in drawn[start : start + 4]) == {"a": 3, "b": 1}
    balanced = PromptStream([a, b], [1.0, 1.0], seed=0).take(6)
    assert [ex.label for ex in balanced] == ["harmful", "benign"] * 3
    # within a source, every example appears once per epoch
    only_a = PromptStream([a], [1.0], seed=2).take(20)
    assert sorted(ex.prompt for ex in only_a[:10]) == sorted(ex.prompt for ex in a)
    assert only_a[:10] != only_a[10:20]  # reshuffled each epoch


def test_demo_data_is_labelled_and_split():
    train = [
        json.loads(x)
        for name in ("train_harmful", "train_benign")
        for x in (DEMO_DATA / f"{name}.jsonl").read_text().splitlines()
    ]
    heldout = [json.loads(x) for x in (DEMO_DATA / "heldout.jsonl").read_text().splitlines()]
    assert {r["label"] for r in train} == {r["label"] for r in heldout} == {"harmful", "benign"}
    assert not {r["prompt"].lower() for r in train} & {r["prompt"].lower() for r in heldout}


def test_committed_demo_data_is_what_the_generator_writes(tmp_path):
    from alphaalign.demo.prompts import write_demo_prompts

    write_demo_prompts(tmp_path)
    for name in ("train_harmful.jsonl", "train_benign.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_text() == (DEMO_DATA / name).read_text()
