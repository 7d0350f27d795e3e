"""The attention a CPU trains with: eager attention's arithmetic in fewer and smaller passes.

On a CPU, training uses the plain softmax(QK^T)V path (torch's flash-attention backward was 22% of
a step at replytune's ~200-token lengths). transformers' eager version of it copies each key and
value head once per query head that shares it, softmaxes the (batch, heads, query, key) scores in
float32 and keeps that float32 copy for the backward pass. Here:

- the query heads of a group become extra rows against their one key/value head: no copies;
- the scale multiplies the queries (head-wide) rather than the scores (key-length-wide); for
  64-wide heads it is 1/8, a power of two, so the products are the same;
- the softmax reads and writes the compute dtype: torch's CPU kernel works in float32 inside
  either way, and its bfloat16 output differs from the float32-then-rounded one in a few
  probabilities per million, by one unit in the last place.

A default step (batch 4 x 181 tokens) went from 1.39 to 1.2 s, a default epoch 5-8% faster, and
each layer keeps 4 bytes per head and query-key pair less for the backward pass, plus no copies of
the keys and values: an unchecked default run peaks 0.28 GiB lower (bench/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch

GROUPED = "replytune_grouped"
# Model types whose eager attention is exactly softmax(QK^T * scale + mask) V, with dropout on the
# probabilities: no logit soft-capping, no attention sinks. Others train with transformers' eager.
PLAIN_ATTENTION = frozenset({"llama", "mistral", "qwen2"})


def training_attention(config) -> str:
    """The attention implementation a CPU trains the model of ``config`` with."""
    if getattr(config, "model_type", None) not in PLAIN_ATTENTION:
        return "eager"
    _register()
    return GROUPED


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)  # an additive mask, as eager attention takes


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-interface signature: query (batch, heads, q, d), key and value
    (batch, kv_heads, k, d), an additive mask (batch, 1, q, k); returns (batch, q, heads, d) and the
    probabilities (batch, heads, q, k). A packed row (``segment_index`` among the keyword arguments,
    see packed_attention) is computed segment by segment."""
    if "segment_index" in kwargs:
        return packed_attention(
            module,
            query,
            key,
            value,
            scaling,
            dropout,
            kwargs["packed_prefix"],
            kwargs["segment_index"],
            kwargs["segment_valid"],
            kwargs["segment_mask"],
        )
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query head h reads key/value head h // group, as repeat_kv arranges
    query = (query * scaling).reshape(batch, kv_heads, group * q_len, dim)
    scores = query @ key.transpose(2, 3)
    if attention_mask is not None:
        scores = (scores.view(batch, kv_heads, group, q_len, -1) + attention_mask[:, :, None]).view(
            batch, kv_heads, group * q_len, -1
        )
    probs = torch.nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
    out = (probs @ value).view(batch, heads, q_len, dim).transpose(1, 2).contiguous()
    return out, probs.view(batch, heads, q_len, -1)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    dropout: float,
    prefix: int,
    index: torch.Tensor,
    valid: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    """Attention of one packed row (training.collate.TrainingCollator): the shared prefix, then each
    example's own tokens, which see the prefix and their own earlier tokens only.

    Computed as the prefix's causal attention plus, for the B examples together, their tokens
    against the prefix's keys and their own: B x S x (P + S) scores for B examples of S own tokens
    after a P-token prefix, instead of (P + B x S)^2 over the whole row, so the packed row costs no
    more attention than padded rows do and the prefix's saving holds at any length. ``index``
    (B, S) holds each example's positions in the row (padding where ``valid`` is False); ``mask``
    (B, 1, S, P + S) is additive, the same for every layer (ReplyTrainer builds it once per batch).
    The output keeps the row's order, since the valid entries of ``index``, read row by row, are
    the positions after the prefix in turn.
    """
    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    batch, own = index.shape
    causal = torch.full((prefix, prefix), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device).triu_(1)
    head, _ = grouped_attention(
        module, query[:, :, :prefix], key[:, :, :prefix], value[:, :, :prefix], causal[None, None], scaling, dropout
    )

    def segments(states: torch.Tensor, n_heads: int) -> torch.Tensor:  # (1, h, T, d) -> (B, h, S, d)
        return states[0].index_select(1, index.flatten()).view(n_heads, batch, own, dim).transpose(0, 1)

    def with_prefix(states: torch.Tensor) -> torch.Tensor:
        return torch.cat([states[:, :, :prefix].expand(batch, -1, -1, -1), segments(states, kv_heads)], dim=2)

    tail, _ = grouped_attention(
        module, segments(query, heads), with_prefix(key), with_prefix(value), mask, scaling, dropout
    )
    return torch.cat([head[0], tail[valid]], dim=0)[None], None
