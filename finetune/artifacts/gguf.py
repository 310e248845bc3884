"""`finetune export RUN_DIR --format gguf`: the merged model as one GGUF file that llama.cpp loads.

The `gguf` package only reads and writes the container; what goes in it is written here, following
llama.cpp's `convert_hf_to_gguf.py` for LLaMA: tensor names (`model.layers.N.self_attn.q_proj.weight` ->
`blk.N.attn_q.weight`), Q and K rows permuted from transformers' rotary layout (two halves) to the one
llama.cpp computes rotary embeddings in (interleaved pairs), `llama.*` hyper-parameters, and the
SentencePiece vocabulary with scores, token types (byte-fallback tokens typed BYTE) and special ids.
1-D tensors (norms) stay float32; 2-D tensors are f16, or q8_0 (blocks of 32 along a row; rows whose length
is not a multiple of 32 stay f16). Tensors are written one at a time, so memory holds one tensor.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from finetune.errors import InputError
from finetune.run_folder import RunDir, read_trained_recipe, write_atomically

Echo = Callable[[str], None]
TYPES = ("f16", "q8_0")
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
MODEL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
Q8_BLOCK = 32


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers LLaMA tensor; None for tensors llama.cpp does not load.

    >>> gguf_name("model.layers.3.self_attn.q_proj.weight")
    'blk.3.attn_q.weight'
    """
    module, _, kind = hf_name.rpartition(".")
    if module in MODEL_TENSORS:
        return f"{MODEL_TENSORS[module]}.{kind}"
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if layer and layer.group(2) in LAYER_TENSORS:
        return f"blk.{layer.group(1)}.{LAYER_TENSORS[layer.group(2)]}.{kind}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed by llama.cpp from rope.freq_base
    raise InputError(f"GGUF export: no llama.cpp name for tensor {hf_name}; only LLaMA models are supported")


def permute(weights, n_head: int):
    """transformers' rotary layout (each head's rows as two halves) -> llama.cpp's (interleaved pairs)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute(weights, n_head: int):
    """The inverse of `permute`: llama.cpp's Q/K rows back to transformers' layout."""
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def export_gguf(
    run_path: str | Path,
    *,
    out: str | Path | None = None,
    quant_type: str = "f16",
    overwrite: bool = False,
    force_unlock: bool = False,
    echo: Echo = print,
) -> Path:
    """Write a run's model as GGUF: LoRA runs are merged first (and checked), full runs are converted as they are.

    Args:
        run_path: the run folder.
        out: the .gguf file (default RUN_DIR/model-TYPE.gguf).
        quant_type: f16 or q8_0.
        overwrite: replace an existing `out`.
        force_unlock: take over a claim on `out` left by a process on another host (finetune/lock.py).

    Raises:
        InputError: a prefix/prompt run, a model that is not LLaMA, no SentencePiece tokenizer.model, `out` exists
            or is claimed by another command.
    """
    from finetune.lock import claim

    run_dir = RunDir(Path(run_path))
    recipe = read_trained_recipe(run_dir.path)
    target = Path(out) if out is not None else run_dir.path / f"model-{quant_type}.gguf"
    with claim(target, subject="--out", beside=True, force_unlock=force_unlock, echo=echo):
        return write_run_gguf(run_dir, recipe, target, quant_type, overwrite=overwrite, echo=echo)


def write_run_gguf(run_dir, recipe, target: Path, quant_type: str, *, overwrite: bool, echo: Echo) -> Path:
    """`export_gguf`, once `target` is claimed."""
    from finetune.artifacts.merge import check_mergeable, merge_run
    from finetune.artifacts.shards import checkpoint_dtype, list_shards

    if target.exists() and not overwrite:
        raise InputError(f"--out: {target} exists; pass --overwrite to replace it")
    if recipe.adapter.kind == "none":
        if not run_dir.model.is_dir():
            raise InputError(f"{run_dir.path}: has no model/; did the run finish?")
        write_gguf(run_dir.model, target, quant_type, echo)
        return target
    check_mergeable(run_dir, recipe)
    from finetune.artifacts.merge import base_folder

    # merged in the base checkpoint's own dtype: nothing is lost before the GGUF types are chosen
    dtype = str(checkpoint_dtype(list_shards(base_folder(recipe)))).removeprefix("torch.")
    with tempfile.TemporaryDirectory(dir=run_dir.path, prefix=".gguf-") as scratch:
        merged = merge_run(run_dir.path, out=Path(scratch) / "merged", dtype=dtype, echo=echo).path
        write_gguf(merged, target, quant_type, echo)
    return target


def write_gguf(folder: Path, target: Path, quant_type: str, echo: Echo) -> None:
    """Convert a transformers LLaMA folder (safetensors, config, tokenizer.model) into one GGUF file.

    Raises:
        InputError: not a LLaMA model, a rope scaling llama.cpp's LLaMA loader is not told here, no tokenizer.model.
    """
    import gguf

    from finetune.artifacts.shards import list_shards

    config = read_llama_config(folder)
    if not (folder / "tokenizer.model").is_file():
        raise InputError(
            f"{folder}: no tokenizer.model; GGUF export needs the SentencePiece model of a LLaMA tokenizer"
        )
    shards = list_shards(folder)
    plan = plan_tensors(shards, quant_type)

    def fill(partial: Path) -> None:
        writer = gguf.GGUFWriter(partial, "llama")
        try:
            add_hyperparameters(writer, config, folder.name, quant_type)
            add_vocabulary(writer, folder, config["vocab_size"])
            for item in plan:
                writer.add_tensor_info(item["name"], item["shape"], item["np_dtype"], item["nbytes"], item["raw_dtype"])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            write_tensors(writer, plan, config)
        finally:
            writer.close()

    write_atomically(target, fill)
    counts = {}
    for item in plan:
        counts[item["type_name"]] = counts.get(item["type_name"], 0) + 1
    shown = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    echo(f"GGUF ({quant_type}; {len(plan)} tensors: {shown}) written to {target} ({target.stat().st_size:,} bytes)")


def read_llama_config(folder: Path) -> dict:
    """config.json of a LLaMA folder, with rope theta and head size resolved.

    Raises:
        InputError: another architecture, biases, or a rope scaling this export does not write.
    """
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise InputError(f"{folder}: GGUF export supports LLaMA models; this one is {config.get('model_type')!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise InputError(f"{folder}: GGUF export of LLaMA models with attention or MLP biases is not supported")
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        raise InputError(f"{folder}: GGUF export supports plain rotary embeddings; this model uses {rope_type!r}")
    config["rope_theta"] = rope["rope_theta"]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config


def add_hyperparameters(writer, config: dict, name: str, quant_type: str) -> None:
    """The llama.* keys llama.cpp builds the graph from."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(config["head_dim"])
    if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant_type])


def add_vocabulary(writer, folder: Path, vocab_size: int) -> None:
    """SentencePiece pieces, scores and types, tokens added on top, padding rows, special ids and BOS use."""
    import gguf
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]  # rows no token uses, as llama.cpp fills them
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), _token_type(sp, i)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for i, added in tokenizer.added_tokens_decoder.items():
        if sp.vocab_size() <= i < vocab_size:
            tokens[i], scores[i] = added.content.encode("utf-8"), -1000.0
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(True)  # every sample was trained after a BOS (data/tokenize.py)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _token_type(sp, i: int):
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


def plan_tensors(shards, quant_type: str) -> list[dict]:
    """Every tensor to write, in order: HF and GGUF names, its shard, GGUF type, shape and size in bytes."""
    import gguf
    import numpy as np

    from finetune.artifacts.shards import tensor_infos

    plan = []
    for shard in shards:
        infos = tensor_infos(shard.path)
        for hf_name in shard.names:
            name = gguf_name(hf_name)
            if name is None:
                continue
            shape = tuple(infos[hf_name]["shape"])
            numel = int(np.prod(shape))
            if len(shape) == 1:
                kind = gguf.GGMLQuantizationType.F32
            elif quant_type == "q8_0" and shape[-1] % Q8_BLOCK == 0:
                kind = gguf.GGMLQuantizationType.Q8_0
            else:
                kind = gguf.GGMLQuantizationType.F16
            item = {"hf_name": hf_name, "name": name, "shard": shard.path, "type_name": kind.name, "shape": shape}
            if kind == gguf.GGMLQuantizationType.Q8_0:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
                item |= {"shape": byte_shape, "np_dtype": np.uint8, "raw_dtype": kind}
                item["nbytes"] = int(np.prod(byte_shape))
            else:
                np_dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
                item |= {"np_dtype": np_dtype, "raw_dtype": None, "nbytes": numel * np.dtype(np_dtype).itemsize}
            plan.append(item)
    return plan


def write_tensors(writer, plan: list[dict], config: dict) -> None:
    """Each tensor read from its shard, Q/K permuted, converted to its GGUF type and written, one at a time."""
    import gguf
    import numpy as np

    from finetune.artifacts.shards import ShardReader

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for item in plan:
        with ShardReader(item["shard"]) as reader:
            data = reader.get(item["hf_name"]).float().numpy()
        kind = item["name"].split(".")[-2]
        if kind in heads:
            data = permute(data, heads[kind])
        if item["raw_dtype"] is not None:
            data = gguf.quants.quantize(data, item["raw_dtype"])
        else:
            data = data.astype(item["np_dtype"])
        writer.write_tensor_data(np.ascontiguousarray(data))
