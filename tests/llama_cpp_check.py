"""Reading GGUF files back and running them in llama.cpp against transformers, for the GGUF tests."""

from __future__ import annotations

import numpy as np
import torch

from conftest import require

# digits, punctuation, spaces and a newline: where the pre-tokenizers of the families differ
TEXT = "Below is an instruction.\n\n### Instruction:\nAdd 123 and 4567, then   name 3 colors!\n\n### Response:\n"
LOGITS, TOKENS = "logits differ by more than 1%", "tokenizes the text differently"


def field(reader, key):
    return reader.fields[key].contents()


def llama_cpp_comparison(path, merged_dir) -> dict:
    """Run `TEXT` through llama.cpp and transformers (float32); assert that llama.cpp tokenizes it the same way,
    that its logits are within 1% of the largest logit, and that it picks the same next token wherever the
    reference's top two are further apart than that difference. Returns the figures."""
    try:
        import llama_cpp
    except ImportError as error:  # not installed, or a build that cannot load
        require(False, f"llama_cpp cannot be imported ({error}); pip install -e .[gguf-test]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        reference = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(TEXT.encode(), add_bos=tokenizer.bos_token_id is not None, special=False)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    diff, scale = float(np.abs(logits - reference).max()), float(np.abs(reference).max())
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * diff
    agree = logits.argmax(-1) == reference.argmax(-1)
    figures = {"tokens": len(ids), "max_diff": diff, "max_logit": scale, "argmax_agreement": float(agree.mean())}
    assert tokens == ids, f"llama.cpp tokenizes the text differently: {tokens} against {ids}"
    assert diff <= 0.01 * scale, f"logits differ by more than 1% of the largest: {figures}"
    assert agree[decided].all(), f"llama.cpp picks another next token: {figures}"
    return figures
