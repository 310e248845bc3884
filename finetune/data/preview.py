"""Show samples as the model sees them: the exact token ids, with the masked span marked."""

from __future__ import annotations

from itertools import groupby

from finetune.data.tokenize import Sample

MASK_OPEN, MASK_CLOSE = "[MASKED]", "[/MASKED]"
DIM, RESET = "\033[2m", "\033[0m"


def spans(sample: Sample, tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) runs of the sample, decoded so that their concatenation is the full text."""
    runs, start = [], 0
    previous_text = ""
    for trained, group in groupby(sample.completion_mask):
        start += len(list(group))
        text = tokenizer.decode(sample.input_ids[:start], skip_special_tokens=False)
        runs.append((text[len(previous_text) :], bool(trained)))
        previous_text = text
    return runs


def render_sample(sample: Sample, tokenizer, number: int, color: bool = False) -> str:
    """A human-readable block: a header with token counts, then the text with masked runs marked."""
    trained = sample.trained_tokens
    header = (
        f"--- sample {number} ({sample.row}): {len(sample.input_ids)} tokens, "
        f"{len(sample.input_ids) - trained} masked, {trained} trained"
        + (", truncated" if sample.truncated else "")
        + " ---"
    )
    body = []
    for text, is_trained in spans(sample, tokenizer):
        if is_trained:
            body.append(text)
        elif color:
            body.append(f"{DIM}{MASK_OPEN}{text}{MASK_CLOSE}{RESET}")
        else:
            body.append(f"{MASK_OPEN}{text}{MASK_CLOSE}")
    return header + "\n" + "".join(body)


def sample_record(sample: Sample, tokenizer) -> dict:
    """One JSON-ready record: ids, labels (-100 where masked), the decoded text and counts."""
    return {
        "row": sample.row,
        "input_ids": sample.input_ids,
        "labels": [t if m else -100 for t, m in zip(sample.input_ids, sample.completion_mask, strict=True)],
        "text": tokenizer.decode(sample.input_ids, skip_special_tokens=False),
        "tokens": len(sample.input_ids),
        "trained_tokens": sample.trained_tokens,
        "truncated": sample.truncated,
    }
