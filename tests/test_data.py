"""Loading and validation: every bad input is an error naming the file, line and field."""

from __future__ import annotations

import json

import pytest

from prompts.render import Persona, PromptRenderer
from tests.helpers import pairs_jsonl
from training.data import DataError, Pair, check_no_overlap, load_pairs, tokenize_pairs
from training.examples import remove_duplicates, split_pairs


def test_jsonl_loads_every_row_with_its_line(write):
    path = write("a.jsonl", pairs_jsonl(3) + "\n")
    pairs = load_pairs(path)
    assert [p.comment for p in pairs] == [f"Question number {i}: what is topic {i}?" for i in range(3)]
    assert pairs[2].where == f"{path}:3"


def test_shipped_data_is_valid_and_split_without_overlap():
    from inference.default_model import ROOT

    train = load_pairs(ROOT / "data" / "train.jsonl")
    held = load_pairs(ROOT / "data" / "heldout.jsonl")
    check_no_overlap(train, held)
    assert len(train) + len(held) >= 150
    assert 0.10 <= len(held) / (len(train) + len(held)) <= 0.15
    assert all(p.response.endswith("–Maya") for p in train + held)


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"comment": "hi", "response": "yo"}\n{"comment": "hi", "response": \n', r"b\.jsonl:2: invalid JSON"),
        ('{"comment": "hi"}\n', r"b\.jsonl:1: field 'response': missing"),
        ('{"comment": "hi", "response": null}\n', r"b\.jsonl:1: field 'response': missing"),
        ('{"comment": 42, "response": "ok"}\n', r"b\.jsonl:1: field 'comment': expected text, got int 42"),
        ('{"comment": "hi", "response": "   "}\n', r"b\.jsonl:1: field 'response': blank"),
        ('{"comment": "", "response": "ok"}\n', r"b\.jsonl:1: field 'comment': blank"),
        ('["hi", "ok"]\n', r"b\.jsonl:1: expected an object"),
        ("\n\n", r"no rows"),
    ],
)
def test_jsonl_errors_name_line_and_field(write, content, expected):
    with pytest.raises(DataError, match=expected):
        load_pairs(write("b.jsonl", content))


def test_all_problems_of_a_file_are_reported_together(write):
    content = '{"comment": "a"}\n{"comment": "b", "response": ""}\nnot json\n'
    with pytest.raises(DataError) as info:
        load_pairs(write("c.jsonl", content))
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "c.jsonl:1" in message and "c.jsonl:2" in message and "c.jsonl:3" in message


def test_undecodable_bytes_name_the_line(write):
    content = pairs_jsonl(2).encode() + b'{"comment": "caf\xe9", "response": "ok"}\n'
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid UTF-8 \(byte 0xe9"):
        load_pairs(write("d.jsonl", content))


def test_json_array_and_its_errors(write):
    rows = [{"comment": "a", "response": "b"}, {"comment": "c", "response": 3}]
    with pytest.raises(DataError, match=r"e\.json: item 2: field 'response': expected text"):
        load_pairs(write("e.json", json.dumps(rows)))
    with pytest.raises(DataError, match=r"f\.json:1: invalid JSON"):
        load_pairs(write("f.json", "[{"))
    with pytest.raises(DataError, match="expected a JSON array"):
        load_pairs(write("g.json", '{"comment": "a"}'))
    assert len(load_pairs(write("h.json", json.dumps(rows[:1])))) == 1


def test_csv_with_bom_quotes_commas_newlines_and_na_values(write):
    content = (
        "\ufeffcomment,response\r\n"
        '"Thanks, great video","You\'re welcome, glad it helped! –Maya"\r\n'
        '"Two\nlines","One reply –Maya"\n'
        "NA,null\n"
        "None,N/A\n"
    )
    pairs = load_pairs(write("i.csv", content))
    assert [(p.comment, p.response) for p in pairs] == [
        ("Thanks, great video", "You're welcome, glad it helped! –Maya"),
        ("Two\nlines", "One reply –Maya"),
        ("NA", "null"),
        ("None", "N/A"),
    ]
    assert pairs[1].where.endswith("i.csv:3")  # the quoted newline spans lines 3-4
    assert pairs[2].where.endswith("i.csv:5")


def test_csv_row_with_an_unquoted_comma_names_its_line(write):
    content = "comment,response\nThanks, great video,You're welcome\nok,fine\n"
    with pytest.raises(DataError, match=r"j\.csv:2: 3 fields, but the header has 2; quote any field"):
        load_pairs(write("j.csv", content))


def test_csv_row_with_too_few_fields_and_missing_header_column(write):
    with pytest.raises(DataError, match=r"k\.csv:3: 1 fields, but the header has 2"):
        load_pairs(write("k.csv", "comment,response\na,b\nlonely\n"))
    with pytest.raises(
        DataError,
        match=(
            r"l\.csv:1: header lacks column\(s\) response \(got comment, "
            r"notes\); name the comment and reply columns with --comment-field"
        ),
    ):
        load_pairs(write("l.csv", "comment,notes\na,b\n"))


def test_unknown_file_type_and_missing_file(write, tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_pairs(write("m.txt", "x"))
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "nope.jsonl")


def test_exact_duplicates_are_removed_and_reported(write):
    path = write("n.jsonl", pairs_jsonl(3) + pairs_jsonl(1))
    kept, removed = remove_duplicates(load_pairs(path))
    assert len(kept) == 3
    assert removed == [f"{path}:4 (repeats {path}:1)"]


def test_too_few_rows_to_split(write):
    pairs = load_pairs(write("o.jsonl", pairs_jsonl(5)))
    with pytest.raises(DataError, match="only 5 distinct comments; at least 10"):
        split_pairs(pairs, 0.2, seed=0)


def test_split_is_seeded_and_keeps_a_comment_on_one_side(write):
    rows = (
        pairs_jsonl(30)
        + json.dumps({"comment": "Question number 0: what is topic 0?", "response": "another reply"})
        + "\n"
    )
    pairs = load_pairs(write("p.jsonl", rows))
    train, evals = split_pairs(pairs, 0.2, seed=3)
    assert (train, evals) == split_pairs(pairs, 0.2, seed=3)
    assert len(evals) >= 6
    check_no_overlap(train, evals)
    assert len(train) + len(evals) == len(pairs)


def test_overlap_between_train_and_eval_files_is_an_error(write):
    train = load_pairs(write("q.jsonl", pairs_jsonl(3)))
    held = load_pairs(write("r.jsonl", pairs_jsonl(2, start=2)))
    with pytest.raises(DataError, match=r"r\.jsonl:1 \(also at .*q\.jsonl:3\)"):
        check_no_overlap(train, held)


def test_overlong_examples_are_counted_not_dropped(write, chatml_tokenizer):
    rows = pairs_jsonl(3) + json.dumps({"comment": "long " * 3000, "response": "ok –Maya"}) + "\n"
    pairs = load_pairs(write("s.jsonl", rows))
    examples, truncated = tokenize_pairs(pairs, PromptRenderer(chatml_tokenizer, Persona.from_file()), max_length=300)
    assert len(examples) == 4 and truncated == 1
    assert max(len(e.input_ids) for e in examples) == 300


def test_check_data_cli_prints_summary_and_fails_on_bad_data(write, capsys, default_model_dir):
    from training.run import main

    assert main(["--check-data"]) == 0
    out = capsys.readouterr().out
    assert "split: 225 train, 32 eval" in out and "tokens:" in out and "truncated: 0" in out

    bad = write("bad.jsonl", '{"comment": "hi", "response": ""}\n')
    assert main(["--check-data", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: field 'response': blank" in err
    assert "Traceback" not in err


def test_commenter_handles_are_replaced_in_jsonl_and_csv(write):
    jsonl = (
        json.dumps(
            {"comment": "@JohnDoe99 agreed with @jane.doe, thanks!", "response": "@JohnDoe99 glad it helped! –Maya"}
        )
        + "\n"
    )
    csv_text = 'comment,response\n"Hey @Bob_the_Builder, mail me at bob@example.com","Thanks @Bob_the_Builder! –Maya"\n'
    (a,) = load_pairs(write("t.jsonl", jsonl))
    (b,) = load_pairs(write("t.csv", csv_text))
    assert (a.comment, a.response) == ("@user agreed with @user, thanks!", "@user glad it helped! –Maya")
    assert (b.comment, b.response) == ("Hey @user, mail me at bob@example.com", "Thanks @user! –Maya")


def youtube_thread(text: str, replies: list[tuple[str, str]], channel: str = "UCmaya") -> dict:
    return {
        "kind": "youtube#commentThread",
        "snippet": {
            "channelId": channel,
            "topLevelComment": {
                "snippet": {
                    "textOriginal": text,
                    "authorDisplayName": "John Doe",
                    "authorChannelId": {"value": "UCjohn"},
                }
            },
        },
        "replies": {
            "comments": [
                {"snippet": {"textOriginal": t, "authorDisplayName": name, "authorChannelId": {"value": ch}}}
                for t, name, ch in [(t, "x", c) for t, c in replies]
            ]
        },
    }


def test_youtube_commentthreads_export_keeps_owner_replies_without_names(write):
    page = {
        "kind": "youtube#commentThreadListResponse",
        "items": [
            youtube_thread("@MayaCodes great video, John here", [("@JohnDoe thanks John! –Maya", "UCmaya")]),
            youtube_thread("No owner reply here", [("I agree", "UCother")]),
            youtube_thread(
                "Question?", [("Me too", "UCother"), ("Answer. –Maya", "UCmaya"), ("Later one –Maya", "UCmaya")]
            ),
        ],
    }
    pairs = load_pairs(write("export.json", json.dumps([page, {**page, "items": []}])))
    assert [(p.comment, p.response) for p in pairs] == [
        ("@user great video, John here", "@user thanks John! –Maya"),
        ("Question?", "Answer. –Maya"),
    ]
    assert all("John Doe" not in p.comment + p.response and "UCjohn" not in p.comment for p in pairs)
    broken = {"kind": "youtube#commentThreadListResponse", "items": [{"snippet": {"channelId": "UCmaya"}}]}
    with pytest.raises(DataError, match=r"page 1 thread 1: not a commentThread .*topLevelComment"):
        load_pairs(write("broken.json", json.dumps(broken)))


def test_dolly_rows_become_pairs_with_their_context(write):
    path = write(
        "dolly.jsonl",
        json.dumps(
            {
                "instruction": "Summarize this",
                "context": "PCA finds directions of variance.",
                "response": "It finds where data varies most.",
                "category": "summarization",
            }
        )
        + "\n"
        + json.dumps({"instruction": "What is k-means?", "context": "", "response": "A clustering method."})
        + "\n",
    )
    pairs = load_pairs(path)
    assert [(p.comment, p.response) for p in pairs] == [
        ("Summarize this\n\nPCA finds directions of variance.", "It finds where data varies most."),
        ("What is k-means?", "A clustering method."),
    ]


def test_dolly_row_without_response_names_the_field(write):
    path = write("dolly.jsonl", json.dumps({"instruction": "Explain PCA", "context": ""}) + "\n")
    with pytest.raises(DataError, match=r"dolly.jsonl:1: field 'response': missing"):
        load_pairs(path)


def test_guanaco_text_splits_into_turns_and_keeps_earlier_turns(write):
    single = "### Human: What is overfitting?### Assistant: Learning the noise instead of the signal."
    multi = (
        "### Human: Hi### Assistant: Hello!### Human: Explain "
        "dropout.### Assistant: It zeroes random units while training."
    )
    path = write("guanaco.jsonl", json.dumps({"text": single}) + "\n" + json.dumps({"text": multi}) + "\n")
    pairs = load_pairs(path)
    assert (pairs[0].comment, pairs[0].response) == (
        "What is overfitting?",
        "Learning the noise instead of the signal.",
    )
    assert pairs[1].comment == "### Human: Hi### Assistant: Hello!### Human: Explain dropout."
    assert pairs[1].response == "It zeroes random units while training."


def test_guanaco_text_without_an_assistant_turn_is_an_error(write):
    path = write("guanaco.csv", 'text\n"### Human: hello there"\n')
    with pytest.raises(
        DataError, match=r"guanaco.csv:2: field 'text': expected '### Human: ... ### Assistant: ...' turns"
    ):
        load_pairs(path)


@pytest.mark.parametrize(
    ("comment", "reply"),
    [
        ("Comment", "Response"),
        ("Comment", "Reply"),
        ("comment_text", "reply_text"),
        ("Comment Text", "Reply-Text"),
        ("text", "reply"),
        ("prompt", "completion"),
        ("input", "output"),
    ],
)
def test_common_column_names_are_mapped_and_the_mapping_is_reported(write, comment, reply):
    from training.data import read_pairs

    csv_path = write(
        "export.csv", f"{comment},{reply}\nGreat video!,Thanks! –Maya\nHow do I start?,Pick a small project. –Maya\n"
    )
    jsonl_path = write(
        "export.jsonl", json.dumps({comment: "Great video!", reply: "Thanks! –Maya", "author": "x"}) + "\n"
    )
    for path in (csv_path, jsonl_path):
        pairs, mappings = read_pairs(path)
        assert (pairs[0].comment, pairs[0].response) == ("Great video!", "Thanks! –Maya")
        assert mappings == [f"{path}: {comment} -> comment, {reply} -> response"]
    assert read_pairs(write("plain.jsonl", pairs_jsonl(2)))[1] == []  # comment/response need no mapping


def test_two_candidate_columns_are_an_error_that_says_how_to_choose(write):
    from training.data import read_pairs

    path = write("two.csv", "Text,Prompt,Reply\na,b,c –Maya\n")
    with pytest.raises(
        DataError,
        match=r"two\.csv:1: header: 2 fields could be the comment: Text, Prompt; choose one with --comment-field NAME",
    ):
        read_pairs(path)
    (pair,), _ = read_pairs(path, comment_field="Prompt")
    assert (pair.comment, pair.response) == ("b", "c –Maya")
    with pytest.raises(DataError, match=r"no field 'Question' \(--comment-field\); the fields are Text, Prompt, Reply"):
        read_pairs(path, comment_field="Question")
    jsonl = write("two.jsonl", json.dumps({"Text": "a", "Prompt": "b", "Reply": "c"}) + "\n")
    with pytest.raises(DataError, match=r"two\.jsonl:1: 2 fields could be the comment"):
        read_pairs(jsonl)


def test_a_mapped_field_is_named_as_the_file_names_it_in_errors(write):
    path = write("blank.csv", "Comment,Reply\nGreat video!,   \n")
    with pytest.raises(DataError, match=r"blank\.csv:2: field 'Reply': blank"):
        load_pairs(path)


def test_signature_is_appended_where_missing_and_checked_against_the_persona():
    from training.examples import add_signature, check_signature

    pairs = [Pair("a", "Thanks!", "f:1"), Pair("b", "Glad it helped –Maya", "f:2"), Pair("c", "Sure thing  ", "f:3")]
    signed, added = add_signature(pairs, " –Maya")
    assert [p.response for p in signed] == ["Thanks! –Maya", "Glad it helped –Maya", "Sure thing –Maya"] and added == 2
    assert [p.where for p in signed] == ["f:1", "f:2", "f:3"]
    check_signature(" –Maya", "–Maya", "persona.txt")
    with pytest.raises(DataError, match=r"--signature ' -Maya' is not the persona's signature '–Maya' \(persona.txt\)"):
        check_signature(" -Maya", "–Maya", "persona.txt")


def test_check_data_shows_the_mapping_signatures_and_too_little_data(write, capsys, default_model_dir):
    from training.run import main

    rows = "".join(f"Question {i}: how does part {i} work?,It works like part {i - 1}.\n" for i in range(1, 13))
    export = write("article.csv", "Comment,Response\n" + rows)
    assert main(["--check-data", "--data", str(export), "--eval-data", "none", "--signature", " –Maya"]) == 0
    out = capsys.readouterr().out
    assert f"columns: {export}: Comment -> comment, Response -> response" in out
    assert "signature: 12 repl(y/ies) got ' –Maya' appended" in out
    assert "warning: only 11 training rows" in out and "50" in out

    one = write("one.jsonl", pairs_jsonl(1))
    assert main(["--check-data", "--data", str(one)]) == 2
    err = capsys.readouterr().err
    assert f"{one}: 1 training row(s); at least 2 are needed to train" in err and "Traceback" not in err


def test_several_files_and_globs_merge_in_order_with_duplicates_across_them_removed(
    write, tmp_path, capsys, default_model_dir
):
    from training.run import main

    first = write("train.jsonl", pairs_jsonl(30))
    (tmp_path / "flywheel").mkdir()
    fly = tmp_path / "flywheel" / "pairs.jsonl"
    fly.write_text(pairs_jsonl(2, start=29))  # its first row repeats the last row of train.jsonl
    assert main(["--check-data", "--data", str(first), str(tmp_path / "fly*" / "*.jsonl"), "--eval-data", "none"]) == 0
    out = capsys.readouterr().out
    assert f"files: 2 merged in order ({first}, {fly})" in out
    assert "rows: 32 read, 1 exact duplicates removed" in out and f"{fly}:1 (repeats {first}:30)" in out

    fly.write_text(pairs_jsonl(1, start=40) + '{"comment": "hi", "response": "  "}\n')
    assert main(["--check-data", "--data", str(first), str(fly)]) == 2
    assert f"{fly}:2: field 'response': blank" in capsys.readouterr().err
    assert main(["--check-data", "--data", str(tmp_path / "nothing-*.jsonl")]) == 2
    assert "nothing-*.jsonl: no file matches this pattern" in capsys.readouterr().err
