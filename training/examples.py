"""The examples of a run: its data read, validated, signed, de-duplicated and split, then rendered
by the one prompt renderer; what the doctor checks and the trainer uses (both import it from here)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from prompts.render import Example, Persona, PromptRenderer, renderer_for
from training.config import TrainConfig
from training.data import (
    DataSummary,
    Pair,
    add_signature,
    check_enough_rows,
    check_no_overlap,
    check_signature,
    expand_sources,
    read_pairs,
    remove_duplicates,
    split_pairs,
    summarize_tokens,
    tokenize_pairs,
)


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

    def shared_prefix(self) -> int:
        """The tokens a training batch computes once for all its rows (training.collate.shared_prefix_length)."""
        from training.estimate import model_widths, read_model_config
        from training.collate import shared_prefix_length

        from inference.internals.transformers import attention_known

        if self.seq2seq or not attention_known():
            return 0
        hidden = model_widths(read_model_config(self.config.base_model))[0]
        return shared_prefix_length(self.train_examples + self.eval_examples, self.config.batch_size, hidden)


def prepare_examples(config: TrainConfig) -> Prepared:
    from inference.loading import is_seq2seq, load_tokenizer

    persona = Persona.from_file(config.persona)
    summary = DataSummary()
    train_pairs, eval_pairs = load_data(config, summary, persona)
    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    seq2seq = is_seq2seq(config.base_model, config.trust_remote_code)
    renderer = renderer_for(tokenizer, persona, seq2seq)
    train_examples, cut = tokenize_pairs(train_pairs, renderer, config.max_length)
    summarize_tokens(summary, train_examples, cut)
    eval_examples, cut = tokenize_pairs(eval_pairs, renderer, config.max_length)
    summarize_tokens(summary, eval_examples, cut)
    return Prepared(config, persona, tokenizer, renderer, train_pairs, eval_pairs, train_examples, eval_examples, summary, seq2seq)
