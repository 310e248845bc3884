"""The vocabulary of a GGUF file, in the two forms llama.cpp's tokenizers read.

SentencePiece (LLaMA-1/2, Mistral): `tokenizer.ggml.model` `llama`, every piece with its score and type
(byte-fallback pieces typed BYTE), read from tokenizer.model.

Byte-level BPE (Llama-3.x, Qwen2/2.5): `tokenizer.ggml.model` `gpt2`, the tokens as tokenizer.json spells them
(bytes mapped to printable characters), their types, the merges in rank order, and `tokenizer.ggml.pre`, the
name of the pre-tokenizer llama.cpp splits text with before merging. llama.cpp's converter recognizes a
pre-tokenizer by hashing how a released model tokenizes a test text, which only works for the released
vocabularies; here it is recognized by what the hash stands for, the split expression in tokenizer.json:
Llama-3 groups up to 3 digits (`llama-bpe`), Qwen2 splits every digit (`qwen2`). Any other split is refused,
since llama.cpp would tokenize differently from the model's training.

Both carry the special ids (bos, eos, eot: the token the chat template ends a turn with, unk, pad), whether
a BOS starts every sequence (the project's samples start with BOS exactly when the tokenizer has one) and the
chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError

# the pre-tokenizer Split expressions of the released tokenizers -> llama.cpp's tokenizer.ggml.pre
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SENTENCEPIECE = "tokenizer.model"


@dataclass(frozen=True)
class VocabKind:
    model: str  # tokenizer.ggml.model: llama (SentencePiece) or gpt2 (byte-level BPE)
    pre: str  # tokenizer.ggml.pre


def vocabulary_kind(folder: Path, *, has_sentencepiece: bool) -> VocabKind:
    """How the tokenizer saved in `folder` is written to GGUF.

    Args:
        folder: a folder with the run's tokenizer (tokenizer.json).
        has_sentencepiece: whether a tokenizer.model is available for it.

    Raises:
        InputError: a BPE pre-tokenizer llama.cpp has no name for, or neither kind of vocabulary.
    """
    spec = _read_tokenizer_json(folder)
    if spec is not None and _is_byte_level_bpe(spec):
        split = _split_expression(spec)
        if split not in PRE_TOKENIZERS:
            raise InputError(
                f"{folder / 'tokenizer.json'}: GGUF export knows the byte-level BPE pre-tokenizers of Llama-3 "
                f"(llama-bpe) and Qwen2 (qwen2); this one splits text with the expression {split}, which llama.cpp "
                "would not reproduce"
            )
        return VocabKind("gpt2", PRE_TOKENIZERS[split])
    if has_sentencepiece:
        return VocabKind("llama", "default")
    raise InputError(
        f"{folder}: GGUF export needs a SentencePiece {SENTENCEPIECE} or a byte-level BPE tokenizer.json; "
        "this tokenizer has neither"
    )


def _read_tokenizer_json(folder: Path) -> dict | None:
    path = folder / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _pre_tokenizers(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level_bpe(spec: dict) -> bool:
    return spec.get("model", {}).get("type") == "BPE" and any(
        p.get("type") == "ByteLevel" for p in _pre_tokenizers(spec)
    )


def _split_expression(spec: dict) -> str | None:
    for pre in _pre_tokenizers(spec):
        if pre.get("type") == "Split":
            return pre.get("pattern", {}).get("Regex")
    return None


def add_vocabulary(writer, folder: Path, kind: VocabKind, config, *, sentencepiece: Path | None = None) -> None:
    """Tokens, types (and scores or merges), special ids, BOS use and chat template of `folder`'s tokenizer.

    Rows of the embedding matrix (config.vocab_size) that no token uses are named `[PADi]` and typed UNUSED,
    as llama.cpp's converter fills them. A tokenizer without BOS (Qwen) gets config.json's bos_token_id, as
    the converter writes it: llama.cpp would otherwise assume id 11; it never adds it (add_bos false).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if kind.model == "llama":
        _add_sentencepiece(writer, sentencepiece or folder / SENTENCEPIECE, tokenizer, config.vocab_size)
    else:
        _add_byte_level_bpe(writer, folder, tokenizer, kind, config.vocab_size)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
    for add, token_id in (
        (writer.add_bos_token_id, bos),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_eot_token_id, end_of_turn_id(tokenizer)),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)  # as data/tokenize.py built every sample
    writer.add_add_eos_token(False)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _add_sentencepiece(writer, model_file: Path, tokenizer, vocab_size: int) -> None:
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_file))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), _piece_type(sp, i)
    for i, added in tokenizer.added_tokens_decoder.items():
        if sp.vocab_size() <= i < vocab_size:
            tokens[i], scores[i] = added.content.encode("utf-8"), -1000.0
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _piece_type(sp, i: int):
    import gguf

    if sp.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.IsControl(i):
        return gguf.TokenType.CONTROL
    if sp.IsUnused(i):
        return gguf.TokenType.UNUSED
    if sp.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _add_byte_level_bpe(writer, folder: Path, tokenizer, kind: VocabKind, vocab_size: int) -> None:
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise InputError(f"{folder}: token id {max(by_id)} has no row in the {vocab_size}-row embedding matrix")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if _is_control(added[i]) else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(kind.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(_read_tokenizer_json(folder)))


def _is_control(added) -> bool:
    # llama.cpp's converter also treats <|...|> as control: some tokenizers leave such tokens unmarked
    return added.special or (added.content.startswith("<|") and added.content.endswith("|>"))


def bpe_merges(spec: dict) -> list[str]:
    """tokenizer.json's merges as llama.cpp reads them: "left right", a space inside a part written as U+0120.

    >>> bpe_merges({"model": {"merges": [["Ġ", "t"], "h e"]}})
    ['Ġ t', 'h e']
    """
    merges = []
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in (left, right)))
    return merges


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the special token the chat template closes an answer with (data/templates.py finds it, as
    training masks by it); None without one."""
    from finetune.data.templates import end_of_turn_token

    token = end_of_turn_token(tokenizer)
    return tokenizer.convert_tokens_to_ids(token) if token else None
