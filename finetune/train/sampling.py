"""Samples during training (eval.samples_every): the eval.samples prompts answered every N optimizer steps,
one record per step in samples.jsonl, so report.html can show how the answers evolve.

Generating in the middle of training must leave training exactly as it was: the model goes to eval mode (no
dropout; gradient checkpointing applies only in training mode, so the KV cache can be used, which
prefix-tuning needs) and back to each module's own mode, without gradients, and with the RNG states restored
(greedy decoding draws nothing, but the dropout masks of the next steps must not depend on that staying so).
Only the main process generates: it holds the whole model (FSDP, which does not, is refused in
recipe/checks.py), and the others wait for it at the next step's gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from transformers import TrainerCallback

from finetune.eval.generate import SamplePrompt, answer_sample_prompts
from finetune.run_folder import write_text


class SampleGenerationsCallback(TrainerCallback):
    """Every `every` optimizer steps, answers `prompts` greedily and appends `{step, samples}` to `path`."""

    def __init__(self, prompts: list[SamplePrompt], path: Path, *, every: int):
        self.prompts = prompts
        self.path = path
        self.every = every

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or state.global_step % self.every:
            return
        with generating(model):
            samples = answer_sample_prompts(model, processing_class, self.prompts)
        append_record(self.path, {"step": state.global_step, "samples": samples})


@contextlib.contextmanager
def generating(model):
    """Eval mode and no gradients inside; every module's mode and the RNG states as they were afterwards."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    try:
        with preserved_rng(model), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def preserved_rng(model):
    """A context that puts the RNG states of the CPU and of the model's GPU back as they were on entry."""
    import torch

    gpus = [model.device.index or 0] if model.device.type == "cuda" else []
    return torch.random.fork_rng(devices=gpus, device_type="cuda")


def append_record(path: Path, record: dict) -> None:
    """Add one line to a JSON-lines file by rewriting it whole and renaming: a kill never leaves half a line."""
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text(path, before + json.dumps(record) + "\n")
