"""The examples of a run: its data read, validated, signed, de-duplicated and split, then rendered
by the one prompt renderer; what the doctor checks and the trainer uses (both import it from here)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.retrieval import ExampleBank
from prompts.render import IGNORE_INDEX, Example, Persona, PromptRenderer, is_signed, renderer_for
from training.config import TrainConfig
from training.data import DataError, Pair, check_no_overlap, comment_key, read_pairs, tokenize_pairs

MIN_ROWS_TO_SPLIT = 10
MIN_TRAIN_ROWS = 2  # fewer cannot train at all
RECOMMENDED_TRAIN_ROWS = 50  # what the original article trained on; fewer is a warning


@dataclass
class DataSummary:
    rows: int = 0
    duplicates_removed: list[str] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    tokens: int = 0
    reply_tokens: int = 0
    truncated: int = 0
    longest: int = 0
    subset: str = ""
    files: list[str] = field(default_factory=list)  # the training files, globs expanded
    columns: list[str] = field(default_factory=list)  # "file: Comment -> comment, Reply -> response"
    signatures_added: int = 0
    signature: str = ""
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"rows: {self.rows} read, {len(self.duplicates_removed)} exact duplicates removed",
            f"split: {self.train_rows} train, {self.eval_rows} eval",
        ]
        if len(self.files) > 1:
            out.append(f"files: {len(self.files)} merged in order ({', '.join(self.files)})")
        out += [f"columns: {mapping}" for mapping in self.columns]
        if self.signature:
            out.append(
                f"signature: {self.signatures_added} repl(y/ies) got {self.signature!r} "
                "appended (--signature); the others already ended with it"
            )
        out += [f"warning: {w}" for w in self.warnings]
        if self.subset:
            out.append(f"subset: {self.subset}")
        if self.duplicates_removed:
            shown = ", ".join(self.duplicates_removed[:5]) + (" ..." if len(self.duplicates_removed) > 5 else "")
            out.append(f"duplicates removed at: {shown}")
        if self.tokens:
            out.append(
                f"tokens: {self.tokens} in all, {self.reply_tokens} learned (reply + end of turn, "
                f"{self.reply_tokens / self.tokens:.0%}), longest example {self.longest}"
            )
            out.append(f"truncated: {self.truncated} example(s) had their comment cut to fit max_length")
        return out


def expand_sources(sources: list[str]) -> list[str]:
    """Files in the order given, each glob replaced by the files it matches (sorted); a Hub id as it is."""
    import glob

    expanded = []
    for source in sources:
        if any(c in source for c in "*?[") and not Path(source).exists():
            matches = sorted(glob.glob(source))
            if not matches:
                raise DataError(f"{source}: no file matches this pattern")
            expanded += matches
        else:
            expanded.append(source)
    return expanded


def add_signature(pairs: list[Pair], signature: str) -> tuple[list[Pair], int]:
    """Every reply that does not already end with ``signature`` gets it appended (the original
    article added " -ShawGPT" to every reply in code); nothing else changes. Returns the pairs and
    how many were signed."""
    signed = [
        p if is_signed(p.response, signature) else Pair(p.comment, p.response.rstrip() + signature, p.where)
        for p in pairs
    ]
    return signed, sum(a is not b for a, b in zip(pairs, signed))


def check_signature(signature: str, persona_signature: str | None, persona_source: str) -> None:
    """--signature must be written with the very characters the persona asks for (an en dash is not a hyphen)."""
    if persona_signature is not None and signature.strip() != persona_signature:
        raise DataError(
            f"--signature {signature!r} is not the persona's signature {persona_signature!r} ({persona_source}); "
            "use the same characters in both, or edit the persona"
        )


def check_enough_rows(train: list[Pair], source: str, summary: DataSummary) -> None:
    if len(train) < MIN_TRAIN_ROWS:
        raise DataError(
            f"{source}: {len(train)} training row(s); at least {MIN_TRAIN_ROWS} are "
            f"needed to train (the original article trained on {RECOMMENDED_TRAIN_ROWS})"
        )
    if len(train) < RECOMMENDED_TRAIN_ROWS:
        summary.warnings.append(
            f"only {len(train)} training rows; a voice is learned from about {RECOMMENDED_TRAIN_ROWS} or more "
            "(the original article's count): expect a weak adapter"
        )


def remove_duplicates(pairs: list[Pair]) -> tuple[list[Pair], list[str]]:
    """Drop exact repeats of a (comment, reply) pair; returns the kept pairs and where the repeats were."""
    seen: dict[tuple[str, str], str] = {}
    kept, removed = [], []
    for pair in pairs:
        key = (comment_key(pair.comment), pair.response.strip())
        if key in seen:
            removed.append(f"{pair.where} (repeats {seen[key]})")
        else:
            seen[key] = pair.where
            kept.append(pair)
    return kept, removed


def split_pairs(pairs: list[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded split by comment: every reply to the same comment lands on the same side."""
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(comment_key(pair.comment), []).append(pair)
    if len(groups) < MIN_ROWS_TO_SPLIT:
        raise DataError(
            f"{pairs[0].where.rsplit(':', 1)[0] if pairs else 'data'}: only {len(groups)} distinct comments; "
            f"at least {MIN_ROWS_TO_SPLIT} are needed to hold some out for evaluation (or pass --eval-data)"
        )
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * eval_fraction))
    held = set(keys[:n_eval])
    train = [p for k in keys if k not in held for p in groups[k]]
    evals = [p for k in keys if k in held for p in groups[k]]
    return train, evals


def summarize_tokens(summary: DataSummary, examples: list[Example], truncated: int) -> None:
    summary.tokens += sum(len(e.input_ids) for e in examples)
    summary.reply_tokens += sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    summary.truncated += truncated
    summary.longest = max([summary.longest, *(len(e.input_ids) for e in examples)])


def load_data(config: TrainConfig, summary: DataSummary, persona: Persona):
    """Read, validate, sign, de-duplicate and split the data; returns (train pairs, eval pairs)."""
    fields = (config.comment_field, config.response_field)
    summary.files = expand_sources(config.data)
    pairs = []
    for source in summary.files:  # each file keeps its own names in every message and mapping
        rows, columns = read_pairs(source, *fields)
        pairs += rows
        summary.columns += columns
    if config.signature:
        check_signature(config.signature, persona.signature, persona.source)
        pairs, summary.signatures_added = add_signature(pairs, config.signature)
        summary.signature = config.signature
    pairs, summary.duplicates_removed = remove_duplicates(pairs)
    summary.rows = len(pairs) + len(summary.duplicates_removed)
    if config.max_rows is not None and config.max_rows < len(pairs):
        # A seeded sample, in file order: the same subset every run with the same --seed.
        keep = sorted(random.Random(config.seed).sample(range(len(pairs)), config.max_rows))
        summary.subset = f"{config.max_rows} of {len(pairs)} rows (--max-rows, seed {config.seed})"
        pairs = [pairs[i] for i in keep]
    if config.eval_data:
        evals, columns = read_pairs(config.eval_data, *fields)
        summary.columns += columns
        if config.signature:
            evals, signed = add_signature(evals, config.signature)
            summary.signatures_added += signed
        evals, removed = remove_duplicates(evals)
        summary.rows += len(evals) + len(removed)
        summary.duplicates_removed += removed
        train = pairs
    else:
        train, evals = split_pairs(pairs, config.eval_fraction, config.seed)
    check_no_overlap(train, evals)
    check_enough_rows(train, ", ".join(summary.files), summary)
    summary.train_rows, summary.eval_rows = len(train), len(evals)
    return train, evals


@dataclass
class Prepared:
    """The data of a run, validated and rendered once: what the doctor checks and the trainer uses."""

    config: TrainConfig
    persona: Persona
    tokenizer: Any
    renderer: PromptRenderer
    train_pairs: list[Pair]
    eval_pairs: list[Pair]
    train_examples: list[Example]
    eval_examples: list[Example]
    summary: DataSummary

    seq2seq: bool
    turns: ExampleBank | None = None  # the pairs shown as earlier turns (config.examples_in_prompt)

    def earlier(self, comment: str) -> list[tuple[str, str]]:
        """The creator's pairs a training prompt shows before ``comment``: the most similar others."""
        return self.turns.similar(comment) if self.turns is not None else []

    def shared_prefix(self) -> int:
        """The tokens a training batch computes once for all its rows (training.collate.shared_prefix_length)."""
        import torch

        from inference.internals.transformers import attention_known
        from training.architecture import linear_packing, model_widths, read_model_config
        from training.collate import shared_prefix_length

        if self.seq2seq or not attention_known():
            return 0
        model_config = read_model_config(self.config.base_model)
        examples = self.train_examples + self.eval_examples
        on_cpu = not torch.cuda.is_available()
        return shared_prefix_length(
            examples, self.config.batch_size, model_widths(model_config)[0], linear_packing(model_config, on_cpu)
        )

    def largest_batch(self, prefix: int) -> tuple[int, int]:
        """(tokens of the longest packed row, learned tokens of the batch with the most) that any
        batch of the training examples can make: the sums over the ``batch_size`` largest. Batches
        are grouped by length but never all of the longest, so this is far below ``batch_size``
        copies of the longest example at realistic lengths, and still an upper bound."""
        k = self.config.batch_size
        own = sorted((len(e.input_ids) - prefix for e in self.train_examples), reverse=True)[:k]
        learned = sorted((sum(label != IGNORE_INDEX for label in e.labels) for e in self.train_examples), reverse=True)[
            :k
        ]
        return prefix + sum(own), sum(learned)


def prepare_examples(config: TrainConfig) -> Prepared:
    from inference.loading import is_seq2seq, load_tokenizer

    persona = Persona.from_file(config.persona)
    summary = DataSummary()
    train_pairs, eval_pairs = load_data(config, summary, persona)
    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    seq2seq = is_seq2seq(config.base_model, config.trust_remote_code)
    renderer = renderer_for(tokenizer, persona, seq2seq)
    # Earlier turns come from the training pairs only, for the held-out comments too: what the
    # adapter folder's examples.jsonl holds and the app retrieves from.
    pairs = [(p.comment, p.response) for p in train_pairs]
    turns = ExampleBank(pairs, config.examples_in_prompt) if config.examples_in_prompt else None
    prepared = Prepared(config, persona, tokenizer, renderer, train_pairs, eval_pairs, [], [], summary, seq2seq, turns)
    prepared.train_examples, cut = tokenize_pairs(train_pairs, renderer, config.max_length, prepared.earlier)
    summarize_tokens(summary, prepared.train_examples, cut)
    prepared.eval_examples, cut = tokenize_pairs(eval_pairs, renderer, config.max_length, prepared.earlier)
    summarize_tokens(summary, prepared.eval_examples, cut)
    return prepared
