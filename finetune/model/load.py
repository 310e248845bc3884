"""Load the base model and its tokenizer from a hub id or a local folder.

Pad token: never a new one, so the vocabulary and the embedding matrix keep the base's shape and the
saved adapter holds adapter weights only (a new `<pad>` row would put embed_tokens and lm_head, 2 GB
for Llama-3.1-8B, into the adapter, which then no longer loads on the untouched base). In order:
the tokenizer's own pad; a reserved token the model ships for it (Llama-3.1's
`<|finetune_right_pad_id|>`, Llama-3's `<|reserved_special_token_N|>`, Qwen's `<|endoftext|>`); `<unk>`
(what alpaca-lora does); else EOS. EOS is safe too: labels come from each sample's completion mask
and padded positions get label -100 by position, never by id, so the EOS a sample ends with is still
trained (tests/test_model_load.py proves it).

A hub id is fetched into huggingface_hub's cache first (`finetune.hub_files`) and loaded from its
snapshot folder: the tokenizer's files alone for the data steps, the weights only when the model loads,
at the tokenizer's commit when both come from one repo.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from finetune.errors import InputError
from finetune.hub_files import Snapshot, download
from finetune.recipe.checks import looks_local
from finetune.recipe.schema import ModelSpec, QuantSpec

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
# what a tokenizer (and AutoConfig) reads from a hub repo; weights are fetched only to load the model
TOKENIZER_PATTERNS = ["*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
# transformers loads a repo's top level only: subfolders (original/, onnx/, ...) are never fetched
SUBFOLDERS = ["*/*"]


def pick_device(use_cpu: bool = False) -> str:
    """'cuda' when a GPU is visible and not refused, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def resolve_dtype(name: str, device: str):
    """A recipe dtype name -> torch.dtype; `auto` picks the best the device computes in."""
    import torch

    if name != "auto":
        return getattr(torch, DTYPES[name])
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def fetch_tokenizer(spec: ModelSpec) -> Snapshot | None:
    """The tokenizer's files when it is a hub id (None for a local folder): at `spec.tokenizer_revision` for a
    separate tokenizer repo that names one, else at `spec.revision`.

    Raises:
        InputError: the hub refused or cannot be reached and the files are not cached.
    """
    name = spec.tokenizer or spec.name_or_path
    if looks_local(name):
        return None
    key = "model.tokenizer" if spec.tokenizer else "model.name_or_path"
    patterns = TOKENIZER_PATTERNS + _code_patterns(spec)
    revision = spec.tokenizer_revision if spec.tokenizer and spec.tokenizer_revision else spec.revision
    return download(name, key=key, revision=revision, patterns=patterns, ignore=SUBFOLDERS)


def fetch_model(spec: ModelSpec, tokenizer_files: Snapshot | None = None) -> Snapshot | None:
    """The model's config and weights when it is a hub id (None for a local folder), at the commit of
    `tokenizer_files` when that is the same repo, so both match even if the branch moved in between.

    Only the weights transformers loads are fetched: the shards model.safetensors.index.json names, else
    model.safetensors (a repo may also hold the same weights in another layout, e.g. consolidated.safetensors).

    Raises:
        InputError: the hub refused, the files are not cached while offline, or the repo has no weights.
    """
    if looks_local(spec.name_or_path):
        return None
    same_repo = tokenizer_files is not None and tokenizer_files.repo_id == spec.name_or_path
    key, patterns = "model.name_or_path", TOKENIZER_PATTERNS + _code_patterns(spec)
    revision = tokenizer_files.commit if same_repo else spec.revision
    config = download(spec.name_or_path, key=key, revision=revision, patterns=patterns, ignore=SUBFOLDERS)
    weights = _indexed_shards(spec.name_or_path, config.folder) or ["model.safetensors"]
    weights += ["*.bin", "*.pt"] if spec.allow_pickle_weights else []
    files = download(spec.name_or_path, key=key, revision=config.commit, patterns=patterns + weights, ignore=SUBFOLDERS)
    if not any(files.folder.glob("*.safetensors")) and not (spec.allow_pickle_weights and _pickled(files.folder)):
        raise InputError(
            f"model.name_or_path: {spec.name_or_path} has no weights in safetensors files (*.safetensors) at "
            f"commit {files.commit}; pickled weights (*.bin, *.pt) load only with model.allow_pickle_weights: "
            "true, if you trust them"
        )
    return replace(files, revision=spec.revision)


def _indexed_shards(name: str, folder: Path) -> list[str]:
    """The shard files model.safetensors.index.json names (none without an index)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise InputError(f"model.name_or_path: {name}: {index.name} has no readable weight_map ({e!r})") from None


def _code_patterns(spec: ModelSpec) -> list[str]:
    return ["*.py"] if spec.trust_remote_code else []


def load_tokenizer(spec: ModelSpec, files: Snapshot | None = None):
    """The tokenizer of `spec.tokenizer` (or the model), with a pad token from its own vocabulary.

    Args:
        spec: the recipe's `model` section.
        files: the tokenizer's hub files from `fetch_tokenizer`; fetched here when None and it is a hub id.

    Raises:
        InputError: the folder or hub id has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    name = spec.tokenizer or spec.name_or_path
    files = files or fetch_tokenizer(spec)
    source = str(files.folder) if files else resolve_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        key = "model.tokenizer" if spec.tokenizer else "model.name_or_path"
        shown = name if files else source
        raise InputError(f"{key}: cannot load a tokenizer from {shown!r}: {_first_line(e)}") from None
    if files:
        tokenizer.name_or_path = name  # the hub id, not this machine's cache folder
    ensure_pad_token(tokenizer)
    return tokenizer


# Tokens some tokenizers ship unused for padding, in the order they are preferred.
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>")


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token from its own vocabulary (see the module docstring for the order)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is not None:
        return
    pad = reserved_pad(tokenizer.get_vocab())
    if pad is None:
        pad = tokenizer.unk_token if tokenizer.unk_token_id is not None else tokenizer.eos_token
    tokenizer.pad_token = pad


def reserved_pad(vocab: dict[str, int]) -> str | None:
    """A token the vocabulary holds for padding or reserves unused, or None."""
    for token in RESERVED_PADS:
        if token in vocab:
            return token
    reserved = [token for token in vocab if token.startswith("<|reserved_special_token_") and token.endswith("|>")]
    return min(reserved, key=vocab.__getitem__) if reserved else None


def attention_implementation(spec: ModelSpec) -> str:
    """The name transformers loads the model's attention by: sdpa is sdpa run per sample on packed rows."""
    if spec.attn_implementation != "sdpa":
        return spec.attn_implementation
    from finetune.model.attention import register_packed_sdpa

    return register_packed_sdpa()


def load_model(spec: ModelSpec, quant: QuantSpec | None, *, device: str, tokenizer=None, files: Snapshot | None = None):
    """The base causal LM, in the recipe's dtype, quantized when `quant` is set.

    Args:
        spec: the recipe's `model` section.
        quant: the recipe's `quant` section, or None for unquantized weights.
        device: 'cuda' or 'cpu' (from `pick_device`); quantized weights are placed there at load time.
        tokenizer: when given, the model's pad token id is set from it.
        files: the model's hub files from `fetch_model`; fetched here when None and it is a hub id.

    Raises:
        InputError: the folder has no config or (allowed) weights, the hub id cannot be reached, or the
            tokenizer has tokens the model has no embedding row for.
    """
    from transformers import AutoModelForCausalLM

    from finetune.model.quantize import build_bnb_config

    files = files or fetch_model(spec)
    source = str(files.folder) if files else resolve_source(spec.name_or_path)
    if quant is not None and quant.bits == 4 and device == "cpu":
        _check_4bit_cpu_shapes(spec, source)
    _check_local_weights(spec)
    dtype = resolve_dtype(spec.dtype, device)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attention_implementation(spec),
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=None if spec.allow_pickle_weights else True,
    )
    if quant is not None:
        compute_dtype = dtype if quant.compute_dtype == "auto" else resolve_dtype(quant.compute_dtype, device)
        kwargs["quantization_config"] = build_bnb_config(quant, compute_dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise InputError(f"model.name_or_path: cannot load {spec.name_or_path!r}: {_first_line(e)}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(remote_code_message(spec.name_or_path)) from None
        raise InputError(f"model.name_or_path: cannot load {spec.name_or_path!r}: {_first_line(e)}") from None
    if files:  # saved adapters name their base by hub id, not by this machine's cache folder
        model.name_or_path = model.config._name_or_path = spec.name_or_path
    if tokenizer is not None:
        _check_vocabulary_fits(model, tokenizer, spec)
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def remote_code_message(name: str) -> str:
    return (
        f"model.name_or_path: {name} ships its own Python code (auto_map in config.json), which runs when the "
        "model loads; set model.trust_remote_code: true only if you trust it"
    )


def resolve_source(name: str) -> str:
    """An absolute path for a local folder (so the saved adapter finds its base from anywhere), else the hub id."""
    return str(Path(name).expanduser().resolve()) if looks_local(name) else name


def _check_vocabulary_fits(model, tokenizer, spec: ModelSpec) -> None:
    """The embeddings never grow: a token without a row is a tokenizer that does not belong to the model."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        key = "model.tokenizer" if spec.tokenizer else "model.name_or_path"
        raise InputError(
            f"{key}: the tokenizer has {len(tokenizer)} tokens but {spec.name_or_path} has {rows} embedding rows; "
            "use the tokenizer the model was trained with"
        )


def _check_local_weights(spec: ModelSpec) -> None:
    if not looks_local(spec.name_or_path):
        return
    folder = Path(spec.name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise InputError(f"model.name_or_path: {folder} has no config.json; is it a transformers model folder?")
    if any(folder.glob("*.safetensors")):
        return
    pickled = _pickled(folder)
    if pickled and not spec.allow_pickle_weights:
        raise InputError(
            f"model.name_or_path: {folder} has only pickled weights ({', '.join(pickled[:3])}); pickle files can run "
            "code when loaded. Convert them to safetensors, or set model.allow_pickle_weights: true if you trust them."
        )
    if not pickled:
        raise InputError(f"model.name_or_path: {folder} has no weights (*.safetensors)")


def _pickled(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))


def _check_4bit_cpu_shapes(spec: ModelSpec, source: str) -> None:
    """bitsandbytes' 4-bit CPU kernel fails in eval/no-grad forwards on Linear inputs not a multiple of 64."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise InputError(remote_code_message(spec.name_or_path)) from None
        raise InputError(
            f"model.name_or_path: cannot read the config of {spec.name_or_path!r}: {_first_line(e)}"
        ) from None
    sizes = {key: getattr(config, key, None) for key in ("hidden_size", "intermediate_size")}
    odd = {key: size for key, size in sizes.items() if isinstance(size, int) and size % 64}
    if odd:
        shown = ", ".join(f"{key}={size}" for key, size in odd.items())
        raise InputError(
            f"quant.bits: 4-bit weights on CPU need Linear input sizes that are multiples of 64 (bitsandbytes' CPU "
            f"kernel); {spec.name_or_path} has {shown}. Train on a GPU, use quant.bits: 8, or remove quant."
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__
