"""Tokenizers of the tiny family models, trained locally on the project's own text.

Each family's tokenizer kind is reproduced, not its vocabulary: LLaMA-1/2 and Mistral use a SentencePiece
BPE with byte fallback; Llama-3 a byte-level BPE in tokenizer.json with Llama-3's split regex (digits
grouped by up to three), special tokens and no <unk> or pad; Qwen2 a byte-level BPE with single-digit
splits, no BOS, `<|endoftext|>` as pad. The chat templates are the ones the published checkpoints ship.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

# The pre-tokenizer regexes of Llama-3's tokenizer.json and Qwen2's: they differ in digits (\p{N}{1,3}
# against \p{N}), which is what Goat's digit-split check is about.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Llama-3.1's first special tokens in their published order (ids 128000..128011 there); the tiny model
# keeps a few reserved ones, as the real one keeps 248.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{n}|>" for n in range(3, 8)),
]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Mistral-7B-Instruct-v0.1's template: BOS written by the template, `[INST] ... [/INST]`, each answer
# closed by EOS.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)


def published_chat_template(name: str) -> str:
    """A chat template as its checkpoint ships it; TRL keeps them byte-identical (llama3_1, qwen2_5)."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """A LLaMA-style SentencePiece BPE model (byte fallback, digits split, <unk>=0 <s>=1 </s>=2, no pad)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same corpus gives the same vocabulary
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int, out: Path, *, chat_template: str | None = None):
    """Train a SentencePiece model and save it as a LLaMA tokenizer (tokenizer.model + tokenizer.json) in `out`."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.model").write_bytes(train_sentencepiece(texts, vocab_size))
        # from_pretrained on a folder, not LlamaTokenizer(vocab_file=...): the latter silently builds a
        # 3-token vocabulary in transformers 5.
        tokenizer = LlamaTokenizer.from_pretrained(scratch, add_bos_token=True, add_eos_token=False)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out)
        # Keep the SentencePiece model too: converters (GGUF) read the vocabulary from it.
        shutil.copy(Path(scratch) / "tokenizer.model", out / "tokenizer.model")
    return tokenizer


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, split_regex: str, *, nfc: bool = False):
    """A `tokenizers.Tokenizer`: regex split, then GPT-2 byte-to-unicode mapping, then a BPE trained on `texts`.

    No <unk>: every byte has a token, so nothing is unknown. Special tokens are added by the caller after
    the learned vocabulary, where the published checkpoints keep them.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(ignore_merges=True))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tokenizer.train_from_iterator([t for t in texts if t.strip()], trainer=trainer)
    return tokenizer


def llama3_tokenizer(texts: Iterable[str], vocab_size: int, out: Path):
    """A Llama-3.1-style tokenizer saved to `out`: BOS prepended by the post-processor, EOS `<|end_of_text|>`,
    no pad and no <unk>, Llama-3.1's chat template (which writes `bos_token` itself)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    # Llama-3's vocabulary holds every number of up to three digits; the numbers 0..999 in the corpus
    # teach the tiny one the commonest digit pairs and triples, so that it groups digits as Llama-3 does.
    numbers = " ".join(str(n) for n in range(1000))
    backend = train_byte_level_bpe([*texts, numbers], vocab_size - len(LLAMA3_SPECIALS), LLAMA3_SPLIT)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
    )
    tokenizer.chat_template = published_chat_template("llama3_1")
    tokenizer.save_pretrained(out)
    return tokenizer


def qwen2_tokenizer(texts: Iterable[str], vocab_size: int, out: Path):
    """A Qwen2.5-Instruct-style tokenizer saved to `out`: no BOS, `<|endoftext|>` as pad, `<|im_end|>` as EOS,
    no <unk>, the ChatML template Qwen2.5 ships."""
    from transformers import AddedToken, Qwen2Tokenizer

    backend = train_byte_level_bpe(texts, vocab_size - len(QWEN2_SPECIALS), QWEN2_SPLIT, nfc=True)
    vocab = backend.get_vocab(with_added_tokens=False)
    # Specials right after the learned vocabulary, in Qwen2.5's order (151643, 151644, 151645 there).
    vocab.update({token: len(vocab) + n for n, token in enumerate(QWEN2_SPECIALS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=_merges(backend),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        split_special_tokens=False,
        model_max_length=131072,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(token, special=True) for token in QWEN2_SPECIALS]}
    )
    tokenizer.chat_template = published_chat_template("qwen2_5")
    tokenizer.save_pretrained(out)
    return tokenizer


def _merges(backend) -> list[tuple[str, str]]:
    """The merges of a trained `tokenizers.Tokenizer` with a BPE model, in rank order (read from its JSON form)."""
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
