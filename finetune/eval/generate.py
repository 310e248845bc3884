"""Load a run's trained model from its folder alone, and generate from it."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import Recipe


def read_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run folder was trained with.

    Raises:
        InputError: the folder is not a run folder, or one written by an incompatible version.
    """
    from finetune.train.run_dir import RunDir, check_run_format

    if not (run_dir / "recipe.yaml").is_file():
        raise InputError(f"{run_dir}: not a run folder (no recipe.yaml)")
    check_run_format(RunDir(run_dir))
    return load_recipe(run_dir / "recipe.yaml")


def load_trained(run_dir: Path, recipe: Recipe, *, device: str):
    """(model, tokenizer) of a finished run: the base named in its recipe plus adapter/, or model/.

    Raises:
        InputError: the run has no trained artifact.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model.load import ensure_pad_token, load_model
    from finetune.train.run_dir import RunDir

    artifact = RunDir(run_dir).artifact(recipe.adapter.kind)
    if not artifact.is_dir():
        raise InputError(f"{run_dir}: has no {artifact.name}/; did the run finish?")
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    ensure_pad_token(tokenizer)
    if recipe.adapter.kind == "none":
        model = AutoModelForCausalLM.from_pretrained(artifact, dtype="auto").to(device)
    else:
        from peft import PeftModel

        base = load_model(recipe.model, recipe.quant, device=device, tokenizer=tokenizer)
        try:
            model = PeftModel.from_pretrained(base, artifact)
        except RuntimeError as e:  # tensors of another shape: the recipe's base is not the one trained on
            first = str(e).strip().splitlines()
            detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
            raise InputError(
                f"{artifact}: the adapter does not fit the base model {recipe.model.name_or_path}: {detail}"
            ) from None
    model.eval()
    return model, tokenizer


def generate_greedy(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts`, tokenized as in training (BOS, then the prompt without special tokens)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    return generate_from_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size)


def generate_from_ids(model, tokenizer, encoded: list[list[int]], *, max_new_tokens: int, batch_size: int = 32):
    """Greedy completions (decoded) of prompts given as token ids.

    Batches are left-padded; the KV cache is always on (prefix-tuning cannot generate without it).
    """
    import torch

    completions = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return completions


def sample_generations(model, tokenizer, samples, *, n: int = 4, max_new_tokens: int = 96) -> list[dict]:
    """Greedy answers to the prompts of the first `n` samples, next to the responses they were trained on.

    Works on token ids, so every data format (and chat template) is prompted exactly as in training: the
    prompt is everything before the first trained token, the reference the trained span that follows.
    """
    picked = [s for s in samples if any(s.completion_mask)][:n]
    prompts, references = [], []
    for sample in picked:
        start = sample.completion_mask.index(1)
        end = start
        while end < len(sample.completion_mask) and sample.completion_mask[end]:
            end += 1
        prompts.append(sample.input_ids[:start])
        references.append(sample.input_ids[start:end])
    if not picked:
        return []
    model.eval()
    longest = min(max(len(ids) for ids in references) + 8, max_new_tokens)
    generated = generate_from_ids(model, tokenizer, prompts, max_new_tokens=longest, batch_size=1)
    return [
        {
            "row": sample.row,
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
            "reference": tokenizer.decode(reference, skip_special_tokens=True),
            "generated": text,
        }
        for sample, prompt, reference, text in zip(picked, prompts, references, generated, strict=True)
    ]
