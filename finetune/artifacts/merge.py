"""`finetune merge RUN_DIR`: a LoRA or (IA)^3 run's adapter folded into its base weights, as a plain transformers
folder.

Shard by shard: each safetensors file of the base is read on its own, every tensor it holds is merged
with its update (read by the adapter kind's method, `model/methods/`) and written out before the next is
read (see `artifacts/shards.py`), so peak memory is the adapter plus a tensor or two, under one base shard,
where peft's `merge_and_unload` holds the whole model. The output keeps the base's sharding, with an index
when there is more than one file, plus config.json (dtype set), generation_config.json, the run's
tokenizer and its card (README.md: how to load and serve the folder). Weights keep the base checkpoint's
dtype unless told otherwise, so a bf16 base gives a bf16 merge. It is written to `OUT.partial`, checked (see
`artifacts/verify.py`), and only then renamed to OUT: a merge that fails leaves nothing that looks usable.

A QLoRA run merges into its original 16-bit base weights by default, or with `base_weights="dequantized"`
(`--base dequantized`) into the 4-bit weights it trained against, dequantized (`artifacts/dequantize.py`).
The dequantized merge also holds the run's base quantized in memory (about a quarter of its 16-bit size)
while it streams. Either way the check measures the merged model against both the quantized model as
trained and the adapter on the 16-bit base, and merge.json in the merged folder keeps both figures.

A base with tied embeddings (Qwen2.5 up to 3B, Llama-3.2) saves no lm_head.weight: its output head is
the embedding matrix. The merged folder stays tied when the adapter changes neither; when it changes one
(LoRA on embed_tokens, or either in modules_to_save), the adapter model's input embedding and output head
differ, so both are written and config.json says `tie_word_embeddings: false`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import InputError
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, claim_folder, read_trained_recipe, write_folder, write_json

if TYPE_CHECKING:
    from finetune.artifacts.verify import MergeCheck

Echo = Callable[[str], None]
TOKENIZER_FILES = ("tokenizer.model",)  # the SentencePiece model transformers 5 no longer saves; GGUF needs it
HEAD = "lm_head.weight"
RECORD = "merge.json"  # how the folder was merged and how far it is from the models it came from


@dataclass(frozen=True)
class MergeResult:
    path: Path
    dtype: str
    shards: int
    base_weights: str  # original or dequantized
    check: MergeCheck | None  # None with verify off

    @property
    def max_diff(self) -> float | None:
        """Merged vs reference logits (see `MergeCheck.reference`); None with verify off."""
        return self.check.max_diff if self.check else None

    @property
    def tolerance(self) -> float | None:
        return self.check.tolerance if self.check else None


def merge_run(
    run_path: str | Path,
    *,
    out: str | Path | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    verify: bool = True,
    force_unlock: bool = False,
    base_weights: str = "original",
    echo: Echo = print,
) -> MergeResult:
    """Merge a LoRA (or QLoRA) or (IA)^3 run's adapter into its base model and write the result to `out`.

    Args:
        run_path: the run folder; its recipe.yaml names the base, its adapter/ holds the adapter.
        out: folder to write (default RUN_DIR/merged).
        dtype: bfloat16, float16 or float32; default the dtype the base checkpoint stores its weights in.
        device: where the merge arithmetic (and the check) runs: cpu or cuda.
        overwrite: replace a non-empty `out`.
        verify: compare the merged model's logits with the adapter model's before keeping the result.
        force_unlock: take over a claim on `out` left by a process on another host (finetune/lock.py).
        base_weights: "original" merges into the base checkpoint's weights; "dequantized" (4-bit runs only)
            into the quantized weights the adapter trained against, dequantized.

    Raises:
        InputError: a kind that cannot merge, no adapter, "dequantized" for a run without a 4-bit base, `out`
            not empty or claimed by another command, base weights not found.
        FinetuneError: the merged logits differ from the reference model's by more than the tolerance.
    """
    from finetune.artifacts.dequantize import check_base_weights
    from finetune.lock import claim

    run_dir = RunDir(Path(run_path))
    recipe = read_trained_recipe(run_dir.path)
    check_mergeable(run_dir, recipe)
    check_base_weights(run_dir.path, recipe, base_weights)
    target = Path(out) if out is not None else run_dir.path / "merged"
    with claim(target, subject="--out", beside=True, force_unlock=force_unlock, echo=echo):
        return write_merge(
            run_dir,
            recipe,
            target,
            overwrite=overwrite,
            dtype=dtype,
            device=device,
            verify=verify,
            base_weights=base_weights,
            echo=echo,
        )


def write_merge(
    run_dir: RunDir,
    recipe: Recipe,
    target: Path,
    *,
    overwrite: bool,
    dtype: str | None,
    device: str,
    verify: bool,
    base_weights: str = "original",
    echo: Echo,
) -> MergeResult:
    """`merge_run`, once `target` is claimed."""
    claim_folder(target, overwrite=overwrite, key="--out")
    base = base_folder(recipe)
    dtype_name = dtype or checkpoint_dtype_name(base)
    dequantize = base_weights == "dequantized"
    if recipe.quant is not None and not dequantize:
        echo(
            f"note: this run trained on a {recipe.quant.bits}-bit quantized base; the adapter is merged into the "
            "16-bit base weights, so the merged model differs from the quantized model it trained with by the "
            "base's quantization error"
            + ("" if recipe.quant.bits == 8 else " (--base dequantized merges into the 4-bit weights it trained on)")
        )

    def fill(partial: Path) -> MergeResult:
        from finetune.artifacts.card import write_card

        shards, untied = write_merged(
            recipe, run_dir.adapter, base, partial, dtype_name, device, echo, dequantize=dequantize
        )
        write_tokenizer_and_config(recipe, run_dir.adapter, base, partial, dtype_name, untied=untied)
        # the card's serving commands name the folder as it will be once renamed into place
        write_card(run_dir.path, partial / "README.md", library="transformers", served=target.resolve())
        check = None
        if verify:
            from finetune.artifacts.verify import check_merged

            check = check_merged(partial, run_dir.adapter, recipe, dtype_name, device, echo, base_weights=base_weights)
        result = MergeResult(target, dtype_name, shards, base_weights, check)
        write_json(partial / RECORD, merge_record(recipe, result))
        return result

    result = write_folder(target, fill)
    echo(f"merged model ({dtype_name}, {result.shards} shard{'s' if result.shards > 1 else ''}) written to {target}")
    return result


def merge_record(recipe: Recipe, result: MergeResult) -> dict:
    """What merge.json keeps: the merge's choices and, when checked, its logit errors against each model."""
    return {
        "base": recipe.model.name_or_path,
        "base_weights": result.base_weights,
        "quant": recipe.quant.model_dump() if recipe.quant is not None else None,
        "dtype": result.dtype,
        "check": result.check.record() if result.check is not None else None,
    }


def check_mergeable(run_dir: RunDir, recipe: Recipe) -> None:
    """Only kinds whose method can fold its update into the base weights merge (checked before any download).

    Raises:
        InputError: a kind that cannot merge (full fine-tuning, prefix or prompt tuning), or no adapter/.
    """
    from finetune.model.methods import method_of

    method = method_of(recipe.adapter)
    if method.read_merge is None:
        raise InputError(method.merge_refusal.format(run=run_dir.path, artifact=run_dir.model))
    if not (run_dir.adapter / "adapter_config.json").is_file():
        raise InputError(f"{run_dir.path}: has no adapter/adapter_config.json; did the run finish?")


def checkpoint_dtype_name(base: Path) -> str:
    """bfloat16, float16 or float32: how the base checkpoint stores its floating tensors."""
    from finetune.artifacts.shards import checkpoint_dtype, list_shards

    return str(checkpoint_dtype(list_shards(base))).removeprefix("torch.")


def base_folder(recipe: Recipe) -> Path:
    """The local folder of the base model: the recipe's folder, or the hub snapshot (downloaded if missing)."""
    from finetune.recipe.checks import looks_local

    name = recipe.model.name_or_path
    if looks_local(name):
        return Path(name).expanduser().resolve()
    from finetune.model.load import fetch_model

    return fetch_model(recipe.model).folder


def write_merged(
    recipe: Recipe,
    adapter_dir: Path,
    base: Path,
    out: Path,
    dtype_name: str,
    device: str,
    echo: Echo,
    *,
    dequantize: bool = False,
) -> tuple[int, bool]:
    """Stream every base shard through the adapter (read by the adapter kind's method) into `out`; with
    `dequantize`, each 4-bit Linear's weight is the run's quantized one, dequantized, instead of the shard's.

    Returns:
        (shards written, whether a tied output head was written as a tensor of its own).

    Raises:
        InputError: the adapter changes a tensor the base checkpoint does not have.
    """
    import torch

    from finetune.artifacts.shards import (
        ShardReader,
        ShardWriter,
        list_shards,
        safetensors_dtype,
        shard_names,
        write_index,
    )
    from finetune.model.methods import method_of
    from finetune.progress import progress

    adapter = method_of(recipe.adapter).read_merge(adapter_dir, device=device)
    shards = list_shards(base)
    embedding = untied_head_source(adapter, shards)
    present = {name for shard in shards for name in shard.names} | ({HEAD} if embedding else set())
    missing = adapter.targets - present
    if missing:
        raise InputError(f"{adapter_dir}: the base in {base} has no tensor {sorted(missing)[0]}; is it the right base?")
    dequantized = load_dequantized(recipe, base, present, device, echo) if dequantize else None
    dtype = getattr(torch, dtype_name)
    weight_map, total = {}, 0
    for shard, name in zip(shards, shard_names(len(shards)), strict=True):
        # the tied head is written beside the embedding it was read from
        sources = {key: key for key in shard.names} | ({HEAD: embedding} if embedding in shard.names else {})
        with ShardReader(shard.path) as reader:
            layout = {key: _merged_layout(adapter, reader, key, source, dtype) for key, source in sources.items()}
            with ShardWriter(out / name, {k: (s, safetensors_dtype(d)) for k, (s, d) in layout.items()}) as writer:
                # one bar per shard, closed before the shard's line is printed
                for key, source in progress(sources.items(), label=f"merge: folding {name}", unit="tensor"):
                    trained_on = dequantized is not None and source in dequantized
                    weight = dequantized.weight(source) if trained_on else reader.get(source)
                    tensor = adapter.apply(key, weight.to(device))
                    writer.write(key, tensor.to(layout[key][1]))
                    del tensor, weight  # before the next tensor is read
            total += writer.total_size
        weight_map |= dict.fromkeys(sources, name)
        echo(f"merged {shard.path.name} -> {name}")
    write_index(out, weight_map, total)
    if embedding:
        echo(f"the adapter changes the tied {embedding} or {HEAD}: both are written, untied")
    return len(shards), embedding is not None


def load_dequantized(recipe: Recipe, base: Path, present: set[str], device: str, echo: Echo):
    """The run's quantized base (`artifacts/dequantize.py`), whose 4-bit weights must all be checkpoint tensors.

    Raises:
        InputError: a quantized weight the checkpoint has no tensor of (a base whose names transformers maps).
    """
    from finetune.artifacts.dequantize import load_dequantized_base

    dequantized = load_dequantized_base(recipe, device)
    unmatched = dequantized.names - present
    if unmatched:
        raise InputError(
            f"--base dequantized: the quantized model's weight {sorted(unmatched)[0]} has no tensor of that name in "
            f"{base}; merge with --base original"
        )
    echo(f"dequantizing the run's {len(dequantized.names)} {recipe.quant.bits}-bit Linear weights into the merge")
    return dequantized


def untied_head_source(adapter, shards) -> str | None:
    """The embedding tensor a tied output head must be written from, when the adapter unties the two; else None.

    A checkpoint without lm_head.weight ties its head to the embedding (transformers saves a tied tensor once).
    """
    names = {name for shard in shards for name in shard.names}
    embedding = next((name for name in sorted(names) if name.endswith("embed_tokens.weight")), None)
    if HEAD in names or embedding is None:
        return None
    return embedding if {HEAD, embedding} & adapter.targets else None


def _merged_layout(adapter, reader, key: str, source: str, dtype) -> tuple[tuple[int, ...], object]:
    """(shape, dtype) of merged tensor `key`, read from base tensor `source`: a replaced tensor may have a new
    shape (embeddings resized for added tokens); floating tensors take the output dtype, integer buffers keep
    theirs."""
    shape = tuple(adapter.replaced[key].shape) if key in adapter.replaced else reader.shape(source)
    stored = reader.dtype(source)
    return shape, dtype if stored.is_floating_point else stored


def write_tokenizer_and_config(
    recipe: Recipe, adapter_dir: Path, base: Path, out: Path, dtype_name: str, *, untied: bool
) -> None:
    """config.json (dtype, pad token, vocabulary size as merged, untied head), generation config, the run's
    tokenizer; everything else in the base's config (rope scaling, sliding window, biases) is carried as is."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from finetune.artifacts.shards import list_shards
    from finetune.model.load import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tokenizer.save_pretrained(out)
    tokenizer_source = Path(resolve_source(recipe.model.tokenizer or recipe.model.name_or_path))
    for name in TOKENIZER_FILES:
        for folder in (adapter_dir, tokenizer_source, base):
            if (folder / name).is_file():
                shutil.copy(folder / name, out / name)
                break
    config = AutoConfig.from_pretrained(base, trust_remote_code=recipe.model.trust_remote_code)
    config.dtype = dtype_name
    config.pad_token_id = tokenizer.pad_token_id
    if untied:
        config.tie_word_embeddings = False
    embeddings = _embedding_rows(list_shards(out))
    if embeddings is not None and getattr(config, "vocab_size", embeddings) != embeddings:
        config.vocab_size = embeddings
    config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)


def _embedding_rows(shards) -> int | None:
    from finetune.artifacts.shards import tensor_infos

    for shard in shards:
        for name, info in tensor_infos(shard.path).items():
            if name.endswith("embed_tokens.weight"):
                return info["shape"][0]
    return None
