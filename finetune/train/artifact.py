"""The run's result in its folder: the trained adapter (or whole model) with its tokenizer, and samples.json."""

from __future__ import annotations

from pathlib import Path

from finetune.run_folder import RunDir, write_atomically


def save_artifact(model, tokenizer, target: Path, *, state_dict: dict | None = None) -> None:
    """Write the adapter (or whole model) and tokenizer under a temporary name, then rename: never half a folder.

    `state_dict`: the model's full state dict where the model itself holds shards (FSDP).
    """

    def fill(partial: Path) -> None:
        model.save_pretrained(partial, state_dict=state_dict)
        tokenizer.save_pretrained(partial)

    write_atomically(target, fill)


def write_samples(model, tokenizer, data, run_dir: RunDir, n: int) -> None:
    """samples.json: a few greedy generations next to their references, for report.html."""
    from finetune.eval.generate import answer_sample_prompts, pick_sample_prompts

    source, prompts = pick_sample_prompts(data.train, data.eval, n)
    model.eval()
    run_dir.write_json(run_dir.samples, {"source": source, "samples": answer_sample_prompts(model, tokenizer, prompts)})
