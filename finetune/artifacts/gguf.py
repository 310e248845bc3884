"""`finetune export RUN_DIR --format gguf`: the merged model as one GGUF file that llama.cpp loads.

The `gguf` package only reads and writes the container; what goes in it follows llama.cpp's
`convert_hf_to_gguf.py`: the architecture, tensor names, Q/K layout and hyper-parameters of each family
(`artifacts/gguf_arch.py`), the SentencePiece or byte-level BPE vocabulary (`artifacts/gguf_vocab.py`).
A run whose model or tokenizer cannot be written is refused before anything is merged.
1-D tensors (norms, biases) stay float32; 2-D tensors are f16, or q8_0 (blocks of 32 along a row; rows whose
length is not a multiple of 32 stay f16). Tensors are written one at a time, so memory holds one tensor.
The k-quants (q4_k_m, q5_k_m, q6_k) are llama.cpp's: the f16 file is written to a temporary folder and quantized
from there (artifacts/gguf_quantize.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from finetune.artifacts.gguf_arch import ROPE_FREQS, gguf_name
from finetune.artifacts.gguf_quantize import K_QUANTS, describe_types, quantize_gguf, require_quantizer
from finetune.artifacts.gguf_vocab import SENTENCEPIECE
from finetune.errors import InputError
from finetune.run_folder import RunDir, read_trained_recipe, write_atomically

Echo = Callable[[str], None]
TYPES = ("f16", "q8_0", *K_QUANTS)
Q8_BLOCK = 32


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
    base_weights: str = "original",
    overwrite: bool = False,
    force_unlock: bool = False,
    echo: Echo = print,
) -> Path:
    """Write a run's model as GGUF: LoRA runs are merged first (and checked), full runs are converted as they are.

    Args:
        run_path: the run folder.
        out: the .gguf file (default RUN_DIR/model-TYPE.gguf).
        quant_type: f16, q8_0 (written here), q4_k_m, q5_k_m or q6_k (by llama.cpp, from the f16 file).
        base_weights: what the adapter is merged into, as `merge_run`'s: "original" or (4-bit runs) "dequantized".
        overwrite: replace an existing `out`.
        force_unlock: take over a claim on `out` left by a process on another host (finetune/lock.py).

    Raises:
        InputError: a prefix/prompt run, a model family or tokenizer llama.cpp's conventions are not written for
            here, a k-quant without llama-cpp-python (all before any merge), `out` exists or is claimed by
            another command.
    """
    from finetune.lock import claim

    run_dir = RunDir(Path(run_path))
    recipe = read_trained_recipe(run_dir.path)
    target = Path(out) if out is not None else run_dir.path / f"model-{quant_type}.gguf"
    with claim(target, subject="--out", beside=True, force_unlock=force_unlock, echo=echo):
        return write_run_gguf(
            run_dir, recipe, target, quant_type, base_weights=base_weights, overwrite=overwrite, echo=echo
        )


def write_run_gguf(
    run_dir, recipe, target: Path, quant_type: str, *, base_weights: str = "original", overwrite: bool, echo: Echo
) -> Path:
    """`export_gguf`, once `target` is claimed."""
    from finetune.artifacts.dequantize import check_base_weights
    from finetune.artifacts.merge import check_mergeable, merge_run

    if target.exists() and not overwrite:
        raise InputError(f"--out: {target} exists; pass --overwrite to replace it")
    require_quantizer(quant_type)
    check_base_weights(run_dir.path, recipe, base_weights)
    if recipe.adapter.kind == "none":
        if not run_dir.model.is_dir():
            raise InputError(f"{run_dir.path}: has no model/; did the run finish?")
        sentencepiece = sentencepiece_model(recipe, run_dir.model)
        with tempfile.TemporaryDirectory(dir=run_dir.path, prefix=".gguf-") as scratch:
            convert(
                run_dir.model, target, quant_type, echo, Path(scratch), where=run_dir.path, sentencepiece=sentencepiece
            )
        return target
    check_mergeable(run_dir, recipe)
    check_run_exportable(run_dir, recipe)
    with tempfile.TemporaryDirectory(dir=run_dir.path, prefix=".gguf-") as scratch:
        # in the base checkpoint's own dtype (merge's default): nothing is lost before the GGUF types are chosen
        merged = merge_run(run_dir.path, out=Path(scratch) / "merged", base_weights=base_weights, echo=echo).path
        convert(merged, target, quant_type, echo, Path(scratch), where=run_dir.path)
    return target


def convert(
    folder: Path, target: Path, quant_type: str, echo: Echo, scratch: Path, *, where: Path, sentencepiece=None
) -> None:
    """`write_gguf`, or for a k-quant: the f16 file in `scratch` (removed with it), quantized by llama.cpp."""
    if quant_type not in K_QUANTS:
        write_gguf(folder, target, quant_type, echo, where=where, sentencepiece=sentencepiece)
        return
    f16 = scratch / "model-f16.gguf"
    write_gguf(folder, f16, "f16", echo, where=where, sentencepiece=sentencepiece, report=False)
    write_atomically(target, lambda partial: quantize_gguf(f16, partial, quant_type))
    counts = describe_types(target, quant_type, echo)
    shown = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    echo(
        f"GGUF ({quant_type} by llama.cpp from f16 of {f16.stat().st_size:,} bytes; {sum(counts.values())} tensors: "
        f"{shown}) written to {target} ({target.stat().st_size:,} bytes)"
    )


def check_run_exportable(run_dir, recipe) -> None:
    """Refuse, naming the run folder, a base whose family or tokenizer GGUF export does not write; reads only
    config.json and the run's tokenizer files, so it answers before any weight is loaded or merged.

    Raises:
        InputError: an unsupported architecture or rope scaling, or a tokenizer llama.cpp would not reproduce.
    """
    from transformers import AutoConfig

    from finetune.artifacts.gguf_arch import family_of
    from finetune.artifacts.gguf_vocab import vocabulary_kind
    from finetune.model.load import resolve_source
    from finetune.recipe.checks import looks_local

    spec = recipe.model
    try:
        config = AutoConfig.from_pretrained(
            resolve_source(spec.name_or_path), revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(
            f"{run_dir.path}: cannot read the config of the base model {spec.name_or_path} ({str(e).splitlines()[0]})"
        ) from e
    family_of(config, run_dir.path)
    # a hub base's tokenizer.model arrives with its snapshot; write_gguf checks again after the merge
    on_hub = not looks_local(spec.name_or_path) or not looks_local(spec.tokenizer or spec.name_or_path)
    has_sentencepiece = on_hub or sentencepiece_model(recipe, run_dir.adapter) is not None
    vocabulary_kind(run_dir.adapter, has_sentencepiece=has_sentencepiece)


def sentencepiece_model(recipe, run_folder: Path) -> Path | None:
    """The tokenizer.model of a run's tokenizer, which transformers 5 no longer saves with it: in `run_folder`
    (the run's adapter/ or model/), the recipe's local tokenizer folder, or its local base folder."""
    from finetune.recipe.checks import looks_local

    spec = recipe.model
    names = [name for name in (spec.tokenizer, spec.name_or_path) if name and looks_local(name)]
    folders = [run_folder, *(Path(name).expanduser() for name in names)]
    return next((folder / SENTENCEPIECE for folder in folders if (folder / SENTENCEPIECE).is_file()), None)


def write_gguf(
    folder: Path,
    target: Path,
    quant_type: str,
    echo: Echo,
    *,
    where: Path | None = None,
    sentencepiece: Path | None = None,
    report: bool = True,
) -> None:
    """Convert a transformers folder (safetensors, config, tokenizer) of a supported family into one GGUF file.

    Args:
        where: the folder named in errors (the run folder), default `folder`.
        sentencepiece: the tokenizer's SentencePiece model, default `folder`/tokenizer.model if there is one.
        report: echo what was written (off for an intermediate file).

    Raises:
        InputError: an unsupported family, rope scaling or tokenizer.
    """
    import gguf
    from transformers import AutoConfig

    from finetune.artifacts.gguf_arch import add_hyperparameters, family_of, sliding_window_note
    from finetune.artifacts.gguf_vocab import add_vocabulary, vocabulary_kind
    from finetune.artifacts.shards import list_shards

    config = AutoConfig.from_pretrained(folder)
    family = family_of(config, where or folder)
    if sentencepiece is None and (folder / SENTENCEPIECE).is_file():
        sentencepiece = folder / SENTENCEPIECE
    kind = vocabulary_kind(folder, has_sentencepiece=sentencepiece is not None)
    plan = plan_tensors(list_shards(folder), quant_type, config)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

    def fill(partial: Path) -> None:
        writer = gguf.GGUFWriter(partial, family.arch)
        try:
            add_hyperparameters(writer, config, folder.name, file_types[quant_type])
            add_vocabulary(writer, folder, kind, config, sentencepiece=sentencepiece)
            for item in plan:
                writer.add_tensor_info(item["name"], item["shape"], item["np_dtype"], item["nbytes"], item["raw_dtype"])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            write_tensors(writer, plan, config, family.permute_qk)
        finally:
            writer.close()

    write_atomically(target, fill)
    if note := sliding_window_note(config):
        echo(note)
    if not report:
        return
    counts = {}
    for item in plan:
        counts[item["type_name"]] = counts.get(item["type_name"], 0) + 1
    shown = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    echo(
        f"GGUF ({family.arch}, {kind.model} vocabulary, {quant_type}; {len(plan)} tensors: {shown}) written to "
        f"{target} ({target.stat().st_size:,} bytes)"
    )


def plan_tensors(shards, quant_type: str, config) -> list[dict]:
    """Every tensor to write, in order: HF and GGUF names, its source, GGUF type, shape and size in bytes.

    A tensor's source is its shard, or `data` for one computed here (llama3 rope factors).
    """
    import numpy as np

    from finetune.artifacts.gguf_arch import llama3_rope_factors
    from finetune.artifacts.shards import tensor_infos

    plan = []
    for shard in shards:
        infos = tensor_infos(shard.path)
        for hf_name in shard.names:
            name = gguf_name(hf_name)
            if name is not None:
                entry = _tensor_entry(name, tuple(infos[hf_name]["shape"]), quant_type)
                plan.append(entry | {"hf_name": hf_name, "shard": shard.path})
    factors = llama3_rope_factors(config)
    if factors is not None:
        data = np.array(factors, dtype=np.float32)
        plan.append(_tensor_entry(ROPE_FREQS, data.shape, quant_type) | {"data": data})
    return plan


def _tensor_entry(name: str, shape: tuple[int, ...], quant_type: str) -> dict:
    import gguf
    import numpy as np

    numel = int(np.prod(shape))
    if len(shape) == 1:
        kind = gguf.GGMLQuantizationType.F32
    elif quant_type == "q8_0" and shape[-1] % Q8_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
    else:
        kind = gguf.GGMLQuantizationType.F16
    item = {"name": name, "type_name": kind.name, "shape": shape}
    if kind == gguf.GGMLQuantizationType.Q8_0:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        return item | {"shape": byte_shape, "np_dtype": np.uint8, "raw_dtype": kind, "nbytes": int(np.prod(byte_shape))}
    np_dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
    return item | {"np_dtype": np_dtype, "raw_dtype": None, "nbytes": numel * np.dtype(np_dtype).itemsize}


def write_tensors(writer, plan: list[dict], config, permute_qk: bool) -> None:
    """Each tensor read from its shard, Q/K permuted where the family needs it, converted and written, one at a time."""
    import gguf
    import numpy as np

    from finetune.artifacts.shards import ShardReader
    from finetune.progress import progress

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads or config.num_attention_heads}
    for item in progress(plan, label="export gguf: writing tensors", unit="tensor"):
        if "data" in item:
            data = item["data"]
        else:
            with ShardReader(item["shard"]) as reader:
                data = reader.get(item["hf_name"]).float().numpy()
        kind = item["name"].split(".")[-2]
        if permute_qk and kind in heads:
            data = permute(data, heads[kind])
        if item["raw_dtype"] is not None:
            data = gguf.quants.quantize(data, item["raw_dtype"])
        else:
            data = data.astype(item["np_dtype"])
        writer.write_tensor_data(np.ascontiguousarray(data))
