"""`python -m inference.compare --comments FILE`: every pane's reply for many comments, side by side.

The panes: the base model with the persona prompt, with the persona and the creator's most similar
past replies as earlier turns (when the adapter carries its training pairs), and the fine-tuned
adapter. Writes a Markdown or HTML table (each reply with its length, signature, clean-stop and
content markers) and, with ``--json``, one object per comment with one entry per pane: the reply,
its token count, time, whether it ended on the end-of-turn token and what a reader would reject it
for (inference.quality), followed by the content measures of each pane over all the comments.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from errors import exits_on_error
from inference.default_model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ROOT, hub_id
from inference.generate import PANE_NAMES, GenerationSettings, Pane, Reply, StreamingReplier
from inference.jsonl import Problem, jsonl_rows
from inference.loading import BACKENDS, QUANTIZATIONS
from inference.quality import flags
from prompts.render import is_signed

MAX_COMMENTS = 500


def read_comments(path: Path) -> list[str]:
    """One comment per line of a text file, or the ``comment`` field of each row of a .jsonl file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        comments = []
        for where, row in jsonl_rows(path, text):
            if isinstance(row, Problem):
                raise ValueError(f"{where}: {row}")
            if not isinstance(row, dict) or not isinstance(row.get("comment"), str):
                raise ValueError(f"{where}: field 'comment': missing or not text")
            comments.append(row["comment"])
    else:
        comments = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not comments:
        raise ValueError(f"{path}: no comments")
    if len(comments) > MAX_COMMENTS:
        raise ValueError(f"{path}: {len(comments)} comments; compare at most {MAX_COMMENTS} at a time")
    return comments


def pane_labels(
    base_model: str, adapter: str | None, replier: StreamingReplier, panes: Sequence[Pane] | None = None
) -> dict[str, str]:
    """Names for ``replier``'s panes (or ``panes``) that say which model each one is, what its
    prompt holds, and which engine runs it."""
    backend = replier.backend
    shown = replier.examples.k if replier.examples else 0
    base = f"{hub_id(base_model)} (embedded)" if base_model == DEFAULT_BASE_MODEL else base_model
    name = adapter or ""
    if adapter and Path(adapter).exists():
        path = Path(adapter).resolve()
        name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    labels = {
        "base": f"{base} · persona prompt · {backend}",
        "examples": f"{base} · persona + {shown} of your most similar replies · {backend}",
        "adapter": f"{name} · fine-tuned · {backend}",
        "adapter+examples": f"{name} · fine-tuned + {shown} of your most similar replies · {backend}",
    }
    return {pane: labels[pane] for pane in panes or replier.panes}


def reply_record(reply: Reply, signature: str | None) -> dict[str, Any]:
    return {
        "reply": reply.text,
        "tokens": len(reply.token_ids),
        "seconds": round(reply.seconds, 3),
        "stopped": reply.stopped,
        "words": len(reply.text.split()),
        "signature": is_signed(reply.text, signature),
        "flags": flags(reply.text, reply.stopped),
    }


def compare(
    replier: StreamingReplier,
    comments: list[str],
    settings: GenerationSettings,
    signature: str | None,
    panes: tuple[Pane, ...] | None = None,
) -> Iterator[dict[str, Any]]:
    """One row per comment, as each is done (llama.cpp decodes several comments at once)."""
    for comment, replies in zip(comments, replier.replies(comments, settings, panes)):
        yield {"comment": comment, **{r.pane: reply_record(r, signature) for r in replies}}


def summary(rows: list[dict[str, Any]], panes: tuple[Pane, ...]) -> dict[str, dict[str, float]]:
    """The share of each pane's replies that a reader would reject, by reason (no real replies
    here, so no chrF: training.evaluate has that on held-out pairs)."""
    reasons = ("loops", "talks like an AI", "cut at the token cap")
    return {
        pane: {reason: sum(reason in row[pane]["flags"] for row in rows) / len(rows) for reason in reasons}
        for pane in panes
    }


def _marks(record: dict[str, Any]) -> str:
    marks = [f"{record['words']} words", "signed" if record["signature"] else "no signature", *record["flags"]]
    return " · ".join(marks)


def to_markdown(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    def cell(text: str) -> str:
        return html.escape(text).replace("|", "\\|").replace("\n", "<br>")

    rows_md = []
    for row in rows:
        cells = [cell(row["comment"])] + [f"{cell(row[k]['reply'])}<br>*{_marks(row[k])}*" for k in labels if k in row]
        rows_md.append("| " + " | ".join(cells) + " |")
    header = "| comment | " + " | ".join(labels[k] for k in labels if k in rows[0]) + " |"
    return "\n".join([header, "|---" * (1 + sum(k in rows[0] for k in labels)) + "|", *rows_md]) + "\n"


def to_html(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    keys = [k for k in labels if rows and k in rows[0]]
    head = "".join(f"<th>{html.escape(labels[k])}</th>" for k in keys)
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{html.escape(row[k]['reply'])}<br><small>{html.escape(_marks(row[k]))}</small></td>" for k in keys
        )
        body.append(f"<tr><td>{html.escape(row['comment'])}</td>{cells}</tr>")
    return (
        '<table class="replytune-compare"><thead><tr><th>comment</th>'
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>\n"
    )


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    from inference.engines import load_replier

    args = _parser().parse_args(argv)
    try:
        comments = read_comments(args.comments)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    adapter = None if args.adapter.lower() == "none" else args.adapter
    replier = load_replier(args.base_model, adapter, args.quantization, backend=args.backend)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    panes = tuple(args.panes or replier.panes)
    rows = []
    from tqdm.auto import tqdm

    for row in tqdm(
        compare(replier, comments, settings, replier.renderer.persona.signature, panes),
        total=len(comments),
        desc="comparing",
    ):
        rows.append(row)
    labels = pane_labels(args.base_model, adapter, replier, panes)
    table = to_html(rows, labels) if args.out and args.out.suffix.lower() == ".html" else to_markdown(rows, labels)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
        print(f"table written to {args.out}")
    else:
        print(table)
    for pane, shares in summary(rows, panes).items():
        print(f"{PANE_NAMES[pane]}: " + ", ".join(f"{reason} {share:.0%}" for reason, share in shares.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"rows written to {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--comments",
        type=Path,
        required=True,
        help="a text file (one comment per line) or a .jsonl file with a 'comment' field",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the table here (.md or .html); default: Markdown on stdout"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="local folder or Hub id of the base model")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter folder or Hub id ('none': base only)")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="nf4",
        help="how the base is stored for the transformers backend: nf4 (4-bit), int8 or none",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="auto: llama.cpp on a CPU, transformers on a GPU"
    )
    parser.add_argument(
        "--panes",
        nargs="+",
        choices=list(PANE_NAMES),
        help="which panes to compare (default: every pane the adapter allows)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=GenerationSettings.max_new_tokens)
    return parser


if __name__ == "__main__":
    sys.exit(main())
