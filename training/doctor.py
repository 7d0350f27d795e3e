"""`python -m training.doctor`: checks the rendered training examples for the silent mistakes that
ruin small fine-tunes, before any training time is spent. Also run at the start of every
`python -m training.run` (skip with --no-doctor).

Each check looks at what the model will really see: the token ids and labels after the collator
that training uses (training.collate.TrainingCollator, packing a batch behind its shared prefix).

* the end-of-turn token is learned in every example (a pad = EOS collator masks it, and the model
  never learns to stop);
* exactly one BOS (a literal ``<s>`` plus the tokenizer's own doubles it);
* the label mask covers exactly the reply and its end of turn (loss on the prompt inflates the
  apparent gain); the share of learned tokens is reported;
* the prompt rendered for training is identical to what the app sends (the app loads the tokenizer
  afresh and reads the persona that travels with the adapter);
* the signature is written the same way in the persona and in the replies (an en dash in one and
  a hyphen in the other teaches the model two signatures).

That no held-out comment is also trained on is not checked here: training.examples refuses such data
before the doctor runs.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import ReplytuneError, exits_on_error
from prompts.render import IGNORE_INDEX, Example, Persona, PromptRenderer, is_signed
from training.data import Earlier, Pair, no_turns

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.examples import Prepared

DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212-~"
MAX_NAMED = 5


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"  [{'ok' if self.ok else 'FAIL'}] {self.check}: {self.detail}"


class DoctorError(ReplytuneError, RuntimeError):
    """The data doctor found problems; the message is its report."""


def _where(pairs: Sequence[Pair], indexes: list[int]) -> str:
    named = ", ".join(pairs[i].where for i in indexes[:MAX_NAMED])
    return named + (f" and {len(indexes) - MAX_NAMED} more" if len(indexes) > MAX_NAMED else "")


def collated_labels(examples: Sequence[Example], collate: Callable[[list[dict[str, Any]]], dict]) -> list[list[int]]:
    """Each example's labels as the loss receives them from the collator, aligned with its input ids
    (label t: the token learned at position t; padding cut off again).

    TrainingCollator hands ReplyTrainer ``shift_labels`` (the token each position predicts) and,
    with a shared prefix, packs the batch into one row whose ``segments`` say which example a
    position belongs to (-1: the prefix all share). A collator without ``shift_labels`` hands the
    model ``labels``, which a transformers model shifts itself."""
    out = []
    for start in range(0, len(examples), 16):
        chunk = examples[start : start + 16]
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in chunk])
        if "shift_labels" not in batch:
            out.extend(batch["labels"][i, : len(e.input_ids)].tolist() for i, e in enumerate(chunk))
            continue
        shift = batch["shift_labels"]
        for i, example in enumerate(chunk):
            if "segments" in batch:
                predicted = shift[0][(batch["segments"][0] == -1) | (batch["segments"][0] == i)]
            else:
                predicted = shift[i, : len(example.input_ids)]
            # Position t predicts token t + 1; nothing predicts the first token.
            out.append([IGNORE_INDEX, *predicted[:-1].tolist()])
    return out


def check_end_of_turn(
    pairs: Sequence[Pair], examples: Sequence[Example], labels: list[list[int]], end_of_turn_id: int
) -> Finding:
    missing = [
        i
        for i, (example, learned) in enumerate(zip(examples, labels))
        if not learned or learned[-1] != end_of_turn_id or example.input_ids[-1] != end_of_turn_id
    ]
    if missing:
        return Finding(
            "end of turn learned",
            False,
            f"{len(missing)} example(s) do not learn the end-of-turn token (id {end_of_turn_id}), so the model "
            f"never learns to stop; is the pad token equal to EOS in the collator? {_where(pairs, missing)}",
        )
    return Finding("end of turn learned", True, f"all {len(examples)} examples end on a learned end-of-turn token")


def check_bos(pairs: Sequence[Pair], examples: Sequence[Example], bos_id: int | None) -> Finding:
    if bos_id is None:
        return Finding("one BOS", True, "the tokenizer has no BOS token")
    doubled = [i for i, e in enumerate(examples) if e.input_ids[:2] == [bos_id, bos_id]]
    if doubled:
        return Finding(
            "one BOS",
            False,
            f"{len(doubled)} example(s) start with two BOS tokens (a literal BOS in the template plus "
            f"the tokenizer's own): {_where(pairs, doubled)}",
        )
    return Finding("one BOS", True, "no example starts with a doubled BOS")


def check_label_mask(
    pairs: Sequence[Pair],
    examples: Sequence[Example],
    labels: list[list[int]],
    renderer: PromptRenderer,
    earlier: Earlier,
) -> Finding:
    leaks, learned, total = [], 0, 0
    for i, (pair, example, label) in enumerate(zip(pairs, examples, labels)):
        prompt_len = len(renderer.prompt(pair.comment, earlier(pair.comment)).input_ids) - example.comment_tokens_cut
        expected = [IGNORE_INDEX] * prompt_len + example.input_ids[prompt_len:]
        if label != expected:
            leaks.append(i)
        learned += sum(t != IGNORE_INDEX for t in label)
        total += len(label)
    ratio = f"{learned} of {total} tokens learned ({learned / max(total, 1):.1%})"
    if leaks:
        return Finding(
            "loss on the reply only",
            False,
            f"{len(leaks)} example(s) learn tokens outside the reply (prompt or comment "
            f"in the loss inflates the apparent gain): {_where(pairs, leaks)}; {ratio}",
        )
    return Finding("loss on the reply only", True, ratio)


def check_app_prompt(
    pairs: Sequence[Pair], train: PromptRenderer, app: PromptRenderer, earlier: Earlier = no_turns
) -> Finding:
    """The app retrieves its earlier turns from the pairs the adapter folder carries, the training
    pairs: the same turns as ``earlier`` gives."""
    differ = [
        i
        for i, p in enumerate(pairs)
        if train.prompt(p.comment, earlier(p.comment)).input_ids != app.prompt(p.comment, earlier(p.comment)).input_ids
    ]
    if differ:
        sample = pairs[differ[0]].comment
        a, b = train.prompt(sample, earlier(sample)).text, app.prompt(sample, earlier(sample)).text
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return Finding(
            "training prompt = app prompt",
            False,
            f"{len(differ)} comment(s) are rendered differently by the app (from character {at}: training "
            f"{a[at : at + 40]!r} vs app {b[at : at + 40]!r}); train and serve with the same persona",
        )
    return Finding("training prompt = app prompt", True, "the app sends byte-identical prompts")


def check_signature(pairs: Sequence[Pair], signature: str | None) -> Finding:
    if not signature:
        return Finding("signature", True, "the persona asks for no signature")

    def norm(text: str) -> str:
        return re.sub(f"[{re.escape(DASHES)}]", "-", text)

    exact = [i for i, p in enumerate(pairs) if is_signed(p.response, signature)]
    variant = [
        i for i, p in enumerate(pairs) if i not in set(exact) and norm(p.response.rstrip()).endswith(norm(signature))
    ]
    if variant:
        found = Counter(pairs[i].response.rstrip()[-len(signature) :] for i in variant).most_common(1)[0][0]
        return Finding(
            "signature",
            False,
            f"the persona signs {signature!r} ({_codepoints(signature)}), but {len(variant)} repl(ies) sign "
            f"{found!r} ({_codepoints(found)}): {_where(pairs, variant)}; write it the same way everywhere",
        )
    return Finding(
        "signature", True, f"{len(exact)} of {len(pairs)} replies end with {signature!r}, written as in the persona"
    )


def _codepoints(text: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in text if not c.isalnum())


def show_example(renderer: PromptRenderer, example: Example, labels: list[int]) -> str:
    """One example token by token, learned tokens marked, so a person can see what is trained."""
    tokenizer = renderer.tokenizer
    parts = []
    for token, label in zip(example.input_ids, labels):
        text = tokenizer.decode([token]).replace("\n", "\\n")
        parts.append(f"[{text}]" if label != IGNORE_INDEX else text)
    return "".join(parts)


def diagnose(
    train_pairs: Sequence[Pair],
    train_examples: Sequence[Example],
    eval_pairs: Sequence[Pair],
    renderer: PromptRenderer,
    app_renderer: PromptRenderer,
    collate: Callable[[list[dict[str, Any]]], dict],
    earlier: Earlier = no_turns,
) -> tuple[list[Finding], str]:
    """All checks, and one example shown token by token (``earlier``: the pairs each prompt shows
    before its comment, as tokenize_pairs was given them)."""
    labels = collated_labels(train_examples, collate)
    findings = [
        check_end_of_turn(train_pairs, train_examples, labels, renderer.end_of_turn_id),
        check_bos(train_pairs, train_examples, renderer.tokenizer.bos_token_id),
        check_label_mask(train_pairs, train_examples, labels, renderer, earlier),
        check_app_prompt(list(train_pairs) + list(eval_pairs), renderer, app_renderer, earlier),
        check_signature(list(train_pairs) + list(eval_pairs), renderer.persona.signature),
    ]
    shortest = min(range(len(train_examples)), key=lambda i: len(train_examples[i].input_ids))
    return findings, show_example(renderer, train_examples[shortest], labels[shortest])


def format_report(findings: list[Finding], example: str) -> str:
    failed = sum(not f.ok for f in findings)
    head = "data doctor: " + ("all checks passed" if not failed else f"{failed} check(s) failed")
    return "\n".join(
        [head, *(f.line() for f in findings), "  one example, learned tokens in [brackets]:", "    " + example]
    )


def app_renderer(config: TrainConfig, persona: Persona) -> PromptRenderer:
    """The renderer the app will build for this run's adapter, as inference.engines.load_replier
    builds it: the base's tokenizer loaded afresh, and the persona as the adapter folder gives it
    back (written and read by inference.adapter_files, as training.run saves it)."""
    from inference.adapter_files import adapter_persona, write_persona
    from inference.loading import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="replytune-doctor-") as folder:
        write_persona(Path(folder), persona)
        saved = adapter_persona(folder)
    return PromptRenderer(load_tokenizer(config.base_model, config.trust_remote_code), saved)


def diagnose_prepared(prepared: Prepared) -> tuple[list[Finding], str]:
    """The checks on a run's prepared examples, batched as the trainer batches them (trainer.py's
    TrainingCollator, with the same shared prefix), against the prompt the app will send."""
    from training.collate import TrainingCollator

    collate = TrainingCollator(prepared.tokenizer.pad_token_id, prepared.shared_prefix())
    app = app_renderer(prepared.config, prepared.persona)
    return diagnose(
        prepared.train_pairs,
        prepared.train_examples,
        prepared.eval_pairs,
        prepared.renderer,
        app,
        collate,
        prepared.earlier,
    )


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    from training.config import load_config
    from training.examples import prepare_examples

    config, _ = load_config(argv)
    findings, example = diagnose_prepared(prepare_examples(config))
    print(format_report(findings, example))
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
