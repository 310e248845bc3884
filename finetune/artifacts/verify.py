"""Check a merged folder against the adapter model it came from, on a few samples of the run's training data.

The models are loaded one after the other, never together, so the check needs the memory of one model,
not two. For a quantized (QLoRA) run merged into the original weights the reference is the adapter on the
16-bit base, which is exactly what was merged; a dequantized merge (`--base dequantized`) is held to the
quantized model the run trained, which is what it promises. Either way a quantized run's merge is also
measured against the other model, so both errors are printed and kept in merge.json.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError, InputError
from finetune.recipe.schema import Recipe

# max |merged - adapter| allowed, as a share of the largest adapter logit (at least 1): float32 differs only
# by the order of the sums; 16-bit weights are rounded once after the merge.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# ...and as a share of how far the adapter moves the base's logits: a merge that dropped the update (or
# scaled it by 1/2 or 2) is off by 50% to 100% of that, whatever the dtype; rounding alone stays well under.
EFFECT_SHARE = 0.2
# (as the check line names it, as sentences name it, whose logits the adapter moves) for each kind of merge:
# into the original weights (held to the adapter model), or dequantized (held to the quantized model)
REFERENCES = {
    False: ("adapter", "adapter model", "base's"),
    True: ("quantized model", "quantized model", "quantized base's"),
}
FALLBACK_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes it."


@dataclass(frozen=True)
class MergeCheck:
    """The check's figures: the merge's error against the model it must reproduce, and against each model."""

    reference: str  # the model the merge is held to: "adapter model" or (--base dequantized) "quantized model"
    max_diff: float  # max |merged - reference| logit difference
    tolerance: float
    effect: float  # how far the adapter moves the reference's base logits
    vs_16bit: float  # max |merged - adapter on the 16-bit base|
    vs_quantized: float | None  # max |merged - adapter on the quantized base, as trained|; None: not quantized
    samples: int
    tokens: int

    def record(self) -> dict:
        """merge.json's `check`: every figure, the two distances named for the models they measure to."""
        return {
            "reference": self.reference,
            "max_logit_difference": self.max_diff,
            "tolerance": self.tolerance,
            "adapter_effect": self.effect,
            "max_logit_difference_vs_quantized_model": self.vs_quantized,
            "max_logit_difference_vs_adapter_on_16bit_base": self.vs_16bit,
            "samples": self.samples,
            "tokens": self.tokens,
        }


def check_merged(
    merged: Path,
    adapter_dir: Path,
    recipe: Recipe,
    dtype_name: str,
    device: str,
    echo,
    *,
    base_weights: str = "original",
) -> MergeCheck:
    """Compare the merged model's logits with the adapter model's, and print the figures.

    A merge into the original weights is held to the adapter on the 16-bit base; a dequantized merge
    (`base_weights="dequantized"`) to the quantized model the run trained. For a quantized run the distance to
    the other one is measured and printed too, so the user sees both errors whichever merge they chose.

    Raises:
        FinetuneError: the difference is above the tolerance for `dtype_name` (or for the coarser dtype the
            quantized model computes in).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    prompts = sample_ids(recipe, tokenizer, echo)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, dtype_name)).to(device)
    merged_logits = logits_of(model, prompts)
    del model
    gc.collect()
    sixteen = adapter_and_base_logits(load_adapter_model(recipe, adapter_dir, dtype_name, device, tokenizer), prompts)
    dequantized = base_weights == "dequantized"
    quantized = quantized_logits(recipe, adapter_dir, device, tokenizer, prompts, echo, required=dequantized)

    adapter_logits, base_logits = quantized if dequantized else sixteen
    # the quantized model computes in its own dtype (bfloat16 on a GPU): its rounding is allowed for too
    rounding_dtype = coarser(dtype_name, compute_dtype_name(recipe, device)) if dequantized else dtype_name
    diff = largest_difference(merged_logits, adapter_logits)
    effect = largest_difference(adapter_logits, base_logits)
    tolerance = merge_tolerance(rounding_dtype, adapter_logits, effect)
    tokens = sum(len(ids) for ids in prompts)
    short, reference, base = REFERENCES[dequantized]
    echo(
        f"check: {len(prompts)} training samples ({tokens} tokens): max |merged - {short}| logit difference "
        f"{diff:.3g} (tolerance {tolerance:.3g} for {rounding_dtype}); the adapter moves the {base} logits by up to "
        f"{effect:.3g}"
    )
    vs_16bit = largest_difference(merged_logits, sixteen[0])
    vs_quantized = largest_difference(merged_logits, quantized[0]) if quantized else None
    if vs_quantized is not None:
        echo(
            f"check: max logit difference of the merged model vs the quantized model as trained {vs_quantized:.3g}, "
            f"vs the adapter on the 16-bit base {vs_16bit:.3g}"
        )
    if effect == 0:
        echo("warning: the adapter does not change the base model's logits (were its B matrices ever trained?)")
    if not diff <= tolerance:  # NaN fails too
        raise FinetuneError(
            f"merge check failed: the merged model's logits differ from the {reference}'s by {diff:.3g}, "
            f"above the {rounding_dtype} tolerance {tolerance:.3g} ({diff / effect if effect else float('inf'):.0%} "
            f"of how far the adapter moves the {base} logits, {effect:.3g}); nothing was written. Try --dtype "
            "float32, or pass --no-verify to write the merged weights unchecked"
        )
    return MergeCheck(reference, diff, tolerance, effect, vs_16bit, vs_quantized, len(prompts), tokens)


def adapter_and_base_logits(model, prompts: list[list[int]]) -> tuple[list, list]:
    """(logits with the adapter, logits of the base under it) of a peft model, which is then let go."""
    adapter = logits_of(model, prompts)
    with model.disable_adapter():
        base = logits_of(model, prompts)
    del model
    gc.collect()
    return adapter, base


def quantized_logits(recipe: Recipe, adapter_dir: Path, device: str, tokenizer, prompts, echo, *, required: bool):
    """`adapter_and_base_logits` of the run's adapter on its base quantized as it trained; None for a run
    without `quant`, or (unless `required`) when the quantized model cannot be loaded here, which is said.

    Raises:
        InputError: `required` and the quantized model cannot be loaded (e.g. 4-bit on CPU with odd sizes).
    """
    if recipe.quant is None:
        return None
    from peft import PeftModel

    from finetune.model.load import load_model

    try:
        base = load_model(recipe.model, recipe.quant, device=device, tokenizer=tokenizer)
    except InputError as error:
        if required:
            raise
        echo(f"check: the quantized model is not compared ({str(error).splitlines()[0]})")
        return None
    return adapter_and_base_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), prompts)


def compute_dtype_name(recipe: Recipe, device: str) -> str:
    """The dtype the run's quantized matmuls compute in (quant.compute_dtype, `auto`: the model's dtype)."""
    from finetune.model.load import resolve_dtype

    name = recipe.quant.compute_dtype if recipe.quant.compute_dtype != "auto" else recipe.model.dtype
    return str(resolve_dtype(name, device)).removeprefix("torch.")


def coarser(dtype_name: str, other: str) -> str:
    """Of two dtype names, the one whose rounding the tolerance allows more for."""
    return max(dtype_name, other, key=RELATIVE_TOLERANCE.__getitem__)


def largest_difference(logits: list, reference: list) -> float:
    """max |logits - reference| over all samples and positions (NaN when either holds one)."""
    return max((a - b).abs().max().item() for a, b in zip(logits, reference, strict=True))


def merge_tolerance(dtype_name: str, adapter_logits: list, effect: float) -> float:
    """The largest merged-vs-adapter difference a right merge shows in `dtype_name`.

    Rounding bounds it by a share of the logits' size; the adapter's own effect bounds it too, so that a
    merge without the update (off by `effect`) fails even where rounding alone would allow that much. An
    adapter that changes nothing (`effect` 0) has nothing to drop: rounding alone bounds it then.
    """
    scale = max(a.abs().max().item() for a in adapter_logits)
    rounding = RELATIVE_TOLERANCE[dtype_name] * max(1.0, scale)
    return min(rounding, EFFECT_SHARE * effect) if effect > 0 else rounding


def load_adapter_model(recipe: Recipe, adapter_dir: Path, dtype_name: str, device: str, tokenizer):
    """The run's adapter on its base, loaded in `dtype_name` and never quantized."""
    from peft import PeftModel

    from finetune.model.load import load_model

    spec = recipe.model.model_copy(update={"dtype": dtype_name})
    model = PeftModel.from_pretrained(load_model(spec, None, device=device, tokenizer=tokenizer), adapter_dir)
    return model.eval()


def logits_of(model, prompts: list[list[int]]) -> list:
    """Float32 logits of each prompt, one at a time (no padding to get wrong)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in prompts]


def sample_ids(recipe: Recipe, tokenizer, echo: Callable[[str], None], n: int = 3, max_tokens: int = 64):
    """Token ids of the first `n` training samples (cut to `max_tokens`), built as training built them.

    Falls back to a fixed prompt, and says so, when the run's data can no longer be read. Samples are built
    without a length limit (a prompt longer than data.max_seq_len would drop its row) and cut afterwards.
    """
    from finetune.data.build import build_datasets, sources_of

    sources = [
        source.model_copy(
            update={"max_rows": 2 * n, "goat": source.goat.model_copy(update={"n": 2 * n}) if source.goat else None}
        )
        for source in sources_of(recipe.data)
    ]
    data = recipe.data.model_copy(
        update={
            "sources": sources,
            "eval_path": None,
            "max_seq_len": 1_000_000,
            "overlong": "truncate",
            "eval_fraction": 0.0,
            "cache": False,
            "dedup": "none",
            "min_tokens": 0,
            "on_bad_row": "skip",
        }
    )
    try:
        samples = build_datasets(data, tokenizer, recipe.train.seed).train[:n]
    except InputError as error:
        echo(f"check: no sample from the run's data ({str(error).splitlines()[0]}); checking on a fixed prompt")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [bos + tokenizer(FALLBACK_PROMPT, add_special_tokens=False).input_ids]
    return [sample.input_ids[:max_tokens] for sample in samples]
