"""Batches for training: padded rows, or one packed row that computes the shared prompt prefix once."""

from __future__ import annotations

import os
from typing import Any

import torch

from prompts.render import IGNORE_INDEX, Example
from training.attention import GROUPED


class ReplyCollator:
    """Pads a batch to its longest example; padding is masked from attention and from the loss.

    Labels come from the renderer (prompt already masked), so padding never touches the end-of-turn
    token even when the pad id equals the EOS id. transformers' DataCollatorForSeq2Seq does the same
    on a right-padding tokenizer, but pads on whichever side the tokenizer's config says, and the
    configs of models shipped for batched generation say left: a causal LM's training rows would
    then sit at shifted positions. This one always pads on the right.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Labels are padded to their own width: for a causal LM they are as long as the inputs, for
        # a seq2seq model they are the decoder's targets.
        width = max(len(r["input_ids"]) for r in rows)
        label_width = max(len(r["labels"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), label_width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_row_length(prefix: int, batch_size: int, length: int) -> int:
    """Tokens of one packed row: the shared prefix once, then each example's own tokens."""
    return prefix + batch_size * (length - prefix)


def shared_prefix_length(
    examples: list[Example], batch_size: int, hidden_size: int, linear_attention: bool = False
) -> int:
    """How many leading tokens a batch computes once for all its examples (0: each row computes its own).

    Every example opens with the same chat template and persona: 143 of the default data's ~181
    tokens. Within a step the weights are the same for every row, so those positions' activations
    are too: a batch packs into one row, the shared prefix once, then each example's own tokens,
    which attend to the prefix and to their own earlier tokens only, at the positions they have in
    the example. Logits, loss and gradients are the same as with padded rows (the prefix's gradient
    is the sum of the rows' contributions, as before), for about 2.5x fewer token computations on
    the default data. One thing differs: LoRA dropout on a prefix position draws one mask for the
    batch rather than one per row (same expectation, rows correlated at those positions).

    The prefix stops before the first position that predicts a learned token, since a shared
    position has one hidden state. With ``linear_attention`` (training.attention.packed_attention,
    the CPU's) the row's attention is computed example by example, never more scores than padded
    rows, so a prefix always pays. Otherwise the row's attention covers all of it, with more scores
    than the padded rows have: it is used when it costs less for a batch of the longest examples,
    counting a token's layer work (~24 hidden^2 FLOPs) as 6 hidden attention scores (4 hidden
    FLOPs each).
    """
    if batch_size < 2 or not examples:
        return 0
    prefix = len(os.path.commonprefix([e.input_ids for e in examples]))  # noqa: RUF071 (lists of token ids, not paths)
    first_learned = min(
        next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels)) for e in examples
    )
    prefix = min(prefix, first_learned - 1, min(len(e.input_ids) for e in examples) - 1)
    if linear_attention:
        return max(prefix, 0)
    longest = max(len(e.input_ids) for e in examples)
    packed = packed_row_length(prefix, batch_size, longest)
    scores_per_token = 6 * hidden_size
    packed_cost = packed + packed**2 / scores_per_token
    padded_cost = batch_size * (longest + longest**2 / scores_per_token)
    return prefix if prefix > 0 and packed_cost < padded_cost else 0


class TrainingCollator(ReplyCollator):
    """Batches for ReplyTrainer's causal-LM loss: ``shift_labels``, the token each position predicts
    (IGNORE_INDEX where none is learned; the Trainer counts the learned tokens from it), and where
    the output head is needed, found here on the CPU (selecting on a GPU with a boolean mask would
    make the host wait for the GPU once per forward pass): ``head_positions``, the sequence
    positions where some row learns a token (the model's ``logits_to_keep``), ``learned_positions``,
    the learned ones among the (rows x head_positions) logits, and ``learned_labels``, their tokens.

    With ``prefix`` (see shared_prefix_length) a batch is packed into one row: the prefix, then each
    example's remaining tokens, with ``position_ids`` and ``segments`` (-1 on the prefix, the row's
    index on its own tokens) from which ReplyTrainer builds the attention mask.
    """

    def __init__(self, pad_token_id: int, prefix: int = 0) -> None:
        super().__init__(pad_token_id)
        self.prefix = prefix

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.prefix:
            batch = self._packed(rows)
        else:
            batch = super().__call__(rows)
            labels = batch["labels"]
            batch["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        shift = batch["shift_labels"]
        learned = shift != IGNORE_INDEX
        columns = learned.any(0)
        batch["head_positions"] = columns.nonzero().squeeze(1)
        batch["learned_positions"] = learned[:, columns].flatten().nonzero().squeeze(1)
        batch["learned_labels"] = shift[learned]
        return batch

    def _packed(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        p = self.prefix
        ids, labels, shift, positions, segments = (
            [rows[0]["input_ids"][:p]],
            [[IGNORE_INDEX] * p],
            [[IGNORE_INDEX] * p],
            [range(p)],
            [[-1] * p],
        )
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids.append(r["input_ids"][p:])
            labels.append(r["labels"][p:])
            shift.append([*r["labels"][p + 1 :], IGNORE_INDEX])  # the last token predicts nothing
            positions.append(range(p, n))
            segments.append([i] * (n - p))
        row = lambda parts: torch.tensor([[x for part in parts for x in part]], dtype=torch.long)  # noqa: E731
        own = [len(r["input_ids"]) - p for r in rows]
        # Where each example's own tokens sit in the row, padded to the longest (training.attention.packed_attention).
        starts = torch.tensor([p + sum(own[:i]) for i in range(len(rows))])
        width = torch.arange(max(own))
        valid = width[None, :] < torch.tensor(own)[:, None]
        index = torch.where(valid, starts[:, None] + width[None, :], 0)
        # What each example's token sees beyond the prefix: its own keys up to itself, not padding.
        sees = torch.ones(len(width), len(width), dtype=torch.bool).tril_()[None] & valid[:, None, :]
        return {
            "input_ids": row(ids),
            "labels": row(labels),
            "shift_labels": row(shift),
            "position_ids": row(positions),
            "segments": row(segments),
            "packed_prefix": torch.tensor(p),
            "segment_index": index,
            "segment_valid": valid,
            "segment_sees": sees,
        }


def shared_prefix_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (1, 1, T, T) attention mask of a packed batch (TrainingCollator): a token sees the shared
    prefix and the earlier tokens of its own example. Boolean for SDPA; additive for eager-style
    attention, as transformers builds them."""
    segment = segments[0]
    allowed = torch.ones(segment.numel(), segment.numel(), dtype=torch.bool, device=segment.device).tril_()
    allowed &= (segment[None, :] < 0) | (segment[None, :] == segment[:, None])
    if implementation == "sdpa":
        return allowed[None, None]
    if implementation not in ("eager", GROUPED):
        raise NotImplementedError(f"packed batches need eager or sdpa attention, not {implementation}")
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )[None, None]


def segment_attention_mask(sees: torch.Tensor, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive (B, 1, S, prefix + S) mask of training.attention.packed_attention, built once per
    batch for every layer: each example's tokens see the whole prefix, and of their own keys those
    ``sees`` (B, S, S) allows."""
    mask = torch.zeros(sees.shape[0], 1, sees.shape[1], prefix + sees.shape[2], dtype=dtype, device=sees.device)
    mask[:, 0, :, prefix:].masked_fill_(~sees, torch.finfo(dtype).min)
    return mask
