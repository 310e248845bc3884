"""Attention for packed rows at the cost of the samples in them, not of the row.

A padding-free (or bfd-packed) micro-batch is one row of several samples, each with position ids from 0.
transformers' sdpa keeps the samples apart with a block-causal mask over the whole row: correct, but a
mask forces sdpa off its causal kernels and every query is scored against every key of the row, so the
attention cost grows with the square of the row instead of the sum of squares of the samples. Flash
attention's varlen kernel avoids that on a GPU only. `packed_sdpa` runs sdpa causally on each sample's
slice of the row instead, on any device, and hands every other input (padded batches, a cache, prefix
tokens) to transformers' own sdpa unchanged.
"""

from __future__ import annotations

from itertools import pairwise

PACKED_SDPA = "finetune_packed_sdpa"


def sample_bounds(position_ids) -> list[int] | None:
    """Where each sample of a one-row batch starts (and the row ends), or None for a row of one sample.

    A sample starts wherever the position id does not follow on by one: the same rule as transformers'
    `find_packed_sequence_indices`.
    """
    positions = position_ids[0]
    starts = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    return [0, *starts.tolist(), positions.numel()]


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa per sample of a packed row; transformers' sdpa for anything else."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed_row = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]  # no cache, no prefix tokens
        and kwargs.get("position_bias") is None
    )
    bounds = sample_bounds(position_ids) if packed_row else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)  # each sample is causal on its own
    # One split per tensor, not a slice per sample: a slice's backward writes a whole row of zeros.
    lengths = [b - a for a, b in pairwise(bounds)]
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(outputs, dim=1), None  # sdpa_attention_forward returns (batch, tokens, heads, head_dim)


def register_packed_sdpa() -> str:
    """Make `PACKED_SDPA` an attention implementation transformers can load a model with; returns its name.

    Its masks are sdpa's, so the inputs it hands on to sdpa get exactly the mask they would have had.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
