"""One timing window and one token count for every trainer a benchmark compares.

The window runs from on_step_begin of the first optimizer step to on_step_end of the last, so evaluation,
checkpoints and saving (which the Trainer does after on_step_end) fall outside it for every setup alike.
Tokens are counted from the training batches themselves:

  processed  every position of input_ids, padding included
  real       positions that are not padding: attention_mask's ones where the batch has a mask; a
             padding-free or packed batch (one row, position ids, no mask) has no padding at all
  trained    positions whose next-token label is not -100 (the loss tokens)
"""

from __future__ import annotations

import time


class CountingCollator:
    """Wraps a collator; while `counting`, adds up processed, real and trained tokens of every batch."""

    def __init__(self, collate):
        self.collate, self.counting = collate, False
        self.processed = self.real = self.trained = 0

    def __call__(self, features):
        batch = self.collate(features)
        if self.counting:
            input_ids, labels = batch["input_ids"], batch["labels"]
            mask = batch.get("attention_mask")
            self.processed += input_ids.numel()
            self.real += input_ids.numel() if mask is None else int(mask.sum())
            self.trained += int((labels[:, 1:] != -100).sum())
        return batch


def instrument(trainer) -> dict:
    """Attach the window and the counter to `trainer` (before train()); returns the figures it fills in.

    The figures are complete once training ends: seconds of the window, steps in it, and the token counts.
    """
    from transformers import TrainerCallback

    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    figures: dict = {}

    class TrainWindow(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            counter.counting = True  # batches are collated as the training loop asks for them

        def on_step_begin(self, args, state, control, **kwargs):
            figures.setdefault("started", time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            figures["ended"], figures["steps"] = time.perf_counter(), state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            counter.counting = False
            figures["train_s"] = figures.pop("ended") - figures.pop("started")
            figures.update(processed_tokens=counter.processed, real_tokens=counter.real, trained_tokens=counter.trained)

    trainer.add_callback(TrainWindow())
    return figures
