"""`python -m inference.compare`: a table and JSON rows for many comments, from real models."""

from __future__ import annotations

import json

import pytest

from inference.compare import main, read_comments
from inference.retrieval import K_EXAMPLES


def test_compare_cli_writes_html_table_and_json_rows(tiny_model_dir, tiny_adapter_dir, tmp_path):
    comments = tmp_path / "comments.txt"
    comments.write_text("Great video!\n\n<b>bold</b> question?\n")
    out, rows_path = tmp_path / "table.html", tmp_path / "rows.json"
    code = main(
        [
            "--comments",
            str(comments),
            "--base-model",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_adapter_dir),
            "--quantization",
            "none",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
            "--json",
            str(rows_path),
        ]
    )
    assert code == 0
    rows = json.loads(rows_path.read_text())
    assert [r["comment"] for r in rows] == ["Great video!", "<b>bold</b> question?"]
    for row in rows:
        for pane in ("base", "examples", "adapter", "adapter+examples"):  # every pane by default
            assert set(row[pane]) == {"reply", "tokens", "seconds", "stopped", "words", "signature", "flags"}
            assert 0 < row[pane]["tokens"] <= 12
    table = out.read_text()
    assert table.count("<tr>") == 3 and "&lt;b&gt;bold&lt;/b&gt;" in table and "<b>bold" not in table
    assert f"persona + {K_EXAMPLES} of your most similar replies" in table  # the header says what each pane reads


def test_jsonl_comments_and_bad_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"comment": "a", "response": "x"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: field 'comment'"):
        read_comments(path)
    path.write_text('{"comment": "a"}\n')
    assert read_comments(path) == ["a"]
