"""Load a run's trained model from its folder alone (or any model folder), and generate from it: greedy
batches for samples and exact match, sampled or greedy and streamed for `finetune generate`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError
from finetune.model.methods import method_of
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, read_trained_recipe


def load_trained(run_dir: Path, recipe: Recipe, *, device: str):
    """(model, tokenizer) of a finished run: adapter/ on the base it was saved against, loaded as the
    recipe says (dtype, quantization), or model/.

    Raises:
        InputError: the run has no trained artifact.
    """
    artifact = RunDir(run_dir).path / method_of(recipe.adapter).artifact_folder
    if not artifact.is_dir():
        raise InputError(f"{run_dir}: has no {artifact.name}/; did the run finish?")
    return load_folder(artifact, recipe, device=device)


def load_folder(folder: Path, recipe: Recipe | None, *, device: str):
    """(model, tokenizer) of a model folder or a PEFT adapter folder, in eval mode.

    Args:
        folder: holds config.json and weights, or adapter_config.json and the adapter.
        recipe: the run's recipe when known: it says how to load the base (dtype, quantization) and,
            for an adapter, which base; without it an adapter's base is its adapter_config's.
    """
    import json

    from transformers import AutoTokenizer

    from finetune.model.load import ensure_pad_token, load_model
    from finetune.recipe.schema import ModelSpec

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ensure_pad_token(tokenizer)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        # The run's resolved recipe names the base (its paths are absolute) and says how to load it; an
        # adapter folder without a recipe names its base in adapter_config.json.
        if recipe is not None:
            base = recipe.model
        else:
            saved_base = json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
            base = ModelSpec(name_or_path=saved_base)
        quant = recipe.quant if recipe is not None else None
        base_model = load_model(base, quant, device=device, tokenizer=tokenizer)
        try:
            model = PeftModel.from_pretrained(base_model, folder)
        except RuntimeError as e:  # tensors of another shape: the base is not the one trained on
            first = str(e).strip().splitlines()
            detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
            raise InputError(
                f"{folder}: the adapter does not fit the base model {base.name_or_path}: {detail}"
            ) from None
    else:
        spec = ModelSpec(name_or_path=str(folder))
        if recipe is not None:  # the run's dtype and attention, the folder's weights
            spec = recipe.model.model_copy(update={"name_or_path": str(folder), "tokenizer": None, "revision": None})
        model = load_model(spec, None, device=device, tokenizer=tokenizer)
    model.eval()
    return model, tokenizer


def load_target(target: Path, recipe: Recipe | None, *, device: str):
    """(model, tokenizer) of a run folder, an exported or merged folder, or any model folder.

    A folder with config.json or adapter_config.json is loaded as it is (with the recipe.yaml beside it,
    if any); a folder with only recipe.yaml is a run folder, whose adapter/ or model/ is loaded.

    Raises:
        InputError: the folder is neither.
    """
    if not target.is_dir():
        raise InputError(f"{target}: no such folder")
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        return load_folder(target, recipe, device=device)
    if recipe is not None:
        return load_trained(target, recipe, device=device)
    raise InputError(
        f"{target}: neither a run folder (recipe.yaml) nor a model folder (config.json or adapter_config.json)"
    )


def generate_greedy(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 32, label: str = "eval: answering"
) -> list[str]:
    """Greedy completions of `prompts`, tokenized as in training (BOS, then the prompt without special tokens)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    return generate_from_ids(
        model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size, label=label
    )


def generate_from_ids(
    model,
    tokenizer,
    encoded: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    label: str = "eval: answering",
):
    """Greedy completions (decoded) of prompts given as token ids, with a progress bar over batches named `label`.

    Batches are left-padded; the KV cache is always on (prefix-tuning cannot generate without it).
    """
    import torch

    from finetune.progress import progress

    completions = []
    for start in progress(range(0, len(encoded), batch_size), label=label, unit="batch"):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            **generation_kwargs(tokenizer, Sampling(max_new_tokens=max_new_tokens), stop_ids(model, tokenizer)),
        )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return completions


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy at temperature 0, else sampled with top-k and top-p."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raises InputError naming the first setting out of range."""
        if self.max_new_tokens <= 0:
            raise InputError(f"--max-new-tokens: must be greater than 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise InputError(f"--temperature: must be 0 (greedy) or more (got {self.temperature})")
        if self.top_k < 0:
            raise InputError(f"--top-k: must be 0 (off) or more (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p: must be greater than 0 and at most 1 (got {self.top_p})")


def stop_ids(model, tokenizer) -> list[int]:
    """Every id generation stops at: the EOS ids the model's generation config lists (Llama-3 lists
    `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`), the tokenizer's EOS, and the token its chat template
    ends a turn with (a base model's generation config may not list it)."""
    from finetune.data.templates import end_of_turn_token

    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(listed) if isinstance(listed, list | tuple) else [listed]
    end_of_turn = end_of_turn_token(tokenizer)
    ids += [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_kwargs(tokenizer, sampling: Sampling, stops: list[int]) -> dict:
    """`model.generate` arguments: stop at any of `stops`, pad with the pad token, always use the KV cache."""
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        use_cache=True,  # prefix-tuning cannot generate without it
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
    )
    if sampling.temperature == 0:
        return kwargs | {"do_sample": False}
    return kwargs | {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k or None,
        "top_p": sampling.top_p,
    }


def generate_one(model, tokenizer, ids: list[int], sampling: Sampling, *, streamer=None) -> list[int]:
    """The new token ids after the prompt `ids` (EOS included when the model stopped there).

    The seed is set before every prompt, so a prompt's sample does not depend on the prompts before it.
    """
    import torch
    from transformers import set_seed

    set_seed(sampling.seed)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=streamer,
            **generation_kwargs(tokenizer, sampling, stop_ids(model, tokenizer)),
        )
    return output[0, len(ids) :].tolist()


def generate(target: str | Path, rows: list[dict], sampling: Sampling, *, prompt_format: str | None, echo=print):
    """Answer each prompt row with the model of `target`, streaming the text; returns the new ids per row.

    Args:
        target: a run folder, an exported or merged folder, or any transformers model folder.
        rows: `{instruction, input}` rows (from `finetune.eval.prompts.read_prompts`).
        prompt_format: alpaca, goat, chat or raw; None: the run's data format (see `choose_format`).
        echo: prints the line before each answer when there are several prompts; None streams nothing.

    Raises:
        InputError: a bad setting, target or format.
    """
    from transformers import TextStreamer

    from finetune.eval.prompts import choose_format, prompt_ids
    from finetune.model.load import pick_device
    from finetune.progress import progress

    sampling.check()
    target = Path(target)
    recipe = read_trained_recipe(target) if (target / "recipe.yaml").is_file() else None
    model, tokenizer = load_target(target, recipe, device=pick_device(recipe.train.use_cpu if recipe else False))
    chosen = choose_format(prompt_format, recipe.data.formats if recipe else None, tokenizer)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if echo else None
    answers = []
    # a bar beside answers streamed to the same terminal would break their lines; there the [n/N] lines count
    shown = len(rows) > 1 and not (echo and sys.stdout.isatty())
    for number, row in enumerate(progress(rows, label="generate: answering", unit="prompt", when=shown), start=1):
        if echo and len(rows) > 1:
            echo(f"[{number}/{len(rows)}] {row['instruction']}")
        answers.append(generate_one(model, tokenizer, prompt_ids(tokenizer, chosen, row), sampling, streamer=streamer))
    return answers


@dataclass(frozen=True)
class SamplePrompt:
    """A sample's prompt (everything before its first trained token) and its reference (the trained span after)."""

    row: str
    prompt: list[int]
    reference: list[int]


def pick_sample_prompts(train, eval, n: int) -> tuple[str, list[SamplePrompt]]:
    """(where they come from, prompts) of the first `n` held-out samples with a trained span, or of the training
    samples when there is no eval split: the prompts of samples.json and of samples.jsonl alike.

    Works on token ids, so every data format (and chat template) is prompted exactly as in training.
    """
    source, samples = ("held-out rows", eval) if eval else ("training rows (no eval split)", train)
    picked = []
    for sample in (s for s in samples if any(s.completion_mask)):
        if len(picked) == n:
            break
        start = sample.completion_mask.index(1)
        end = start
        while end < len(sample.completion_mask) and sample.completion_mask[end]:
            end += 1
        picked.append(SamplePrompt(sample.row, sample.input_ids[:start], sample.input_ids[start:end]))
    return source, picked


def answer_sample_prompts(model, tokenizer, prompts: list[SamplePrompt], *, max_new_tokens: int = 96) -> list[dict]:
    """Greedy answers to `prompts`, next to the references: `{row, prompt, reference, generated}` each.

    At most 8 tokens longer than the longest reference, and at most `max_new_tokens`; one prompt at a time, so
    no answer depends on the padding of another. The caller puts the model in eval mode.
    """
    if not prompts:
        return []
    longest = min(max(len(p.reference) for p in prompts) + 8, max_new_tokens)
    generated = generate_from_ids(
        model,
        tokenizer,
        [p.prompt for p in prompts],
        max_new_tokens=longest,
        batch_size=1,
        label="eval: answering sample prompts",
    )
    return [
        {
            "row": p.row,
            "prompt": tokenizer.decode(p.prompt, skip_special_tokens=True),
            "reference": tokenizer.decode(p.reference, skip_special_tokens=True),
            "generated": text,
        }
        for p, text in zip(prompts, generated, strict=True)
    ]
