"""packed_sdpa: a packed row gives every sample the outputs and gradients it has alone; other inputs get sdpa's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.model.attention import register_packed_sdpa, sample_bounds

LENGTHS = [37, 5, 64, 1, 20]


def load(tiny_model_dir, attention: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)


def samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 200, (n,), generator=generator) for n in LENGTHS]


def test_sample_bounds_follow_position_ids():
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    assert sample_bounds(positions) == [0, 37, 42, 106, 107, 127]
    assert sample_bounds(torch.arange(9)[None]) is None


def test_packed_row_matches_each_sample_alone_in_outputs_and_gradients(tiny_model_dir):
    packed_model, solo_model = load(tiny_model_dir, register_packed_sdpa()), load(tiny_model_dir, "sdpa")
    ids = samples()
    row, positions = torch.cat(ids)[None], torch.cat([torch.arange(len(i)) for i in ids])[None]

    packed = packed_model(input_ids=row, position_ids=positions, use_cache=False).logits
    solo = torch.cat([solo_model(input_ids=i[None], use_cache=False).logits for i in ids], dim=1)
    torch.testing.assert_close(packed, solo, rtol=1e-5, atol=1e-5)

    packed.square().mean().backward()
    solo.square().mean().backward()
    for (name, a), b in zip(packed_model.named_parameters(), solo_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batches_and_generation_are_plain_sdpa(tiny_model_dir, padding_side):
    packed_model, sdpa_model = load(tiny_model_dir, register_packed_sdpa()), load(tiny_model_dir, "sdpa")
    ids = samples()[:3]
    longest = max(len(i) for i in ids)
    batch = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, sample in enumerate(ids):
        span = slice(0, len(sample)) if padding_side == "right" else slice(longest - len(sample), longest)
        batch[row, span], mask[row, span] = sample, 1
    with torch.no_grad():
        ours = packed_model(input_ids=batch, attention_mask=mask).logits
        theirs = sdpa_model(input_ids=batch, attention_mask=mask).logits
    assert torch.equal(ours[mask.bool()], theirs[mask.bool()])
    if padding_side == "left":
        generate = dict(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(packed_model.generate(**generate), sdpa_model.generate(**generate))
