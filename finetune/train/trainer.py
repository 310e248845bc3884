"""Recipe -> the one `SFTConfig` and `SFTTrainer` of a run. No subclass: behaviour is added with callbacks."""

from __future__ import annotations

from finetune.errors import InputError
from finetune.recipe.schema import Recipe, TrainSpec
from finetune.run_folder import RunDir


def mixed_precision(spec: TrainSpec, device: str) -> str:
    """'bf16', 'fp16' or 'fp32' for this device.

    Half-precision autocast needs a GPU here; SFTConfig's bf16 default fails on CPU, so auto picks fp32 there.

    Raises:
        InputError: half precision was asked for on a CPU run.
    """
    import torch

    if spec.precision == "auto":
        if device != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if spec.precision != "fp32" and device != "cuda":
        raise InputError(f"train.precision: {spec.precision} needs a GPU; this run is on CPU (use auto or fp32)")
    return spec.precision


def warmup(spec: TrainSpec) -> float:
    """Warmup in the form TrainingArguments takes: whole steps, or a ratio in [0, 1)."""
    if spec.warmup_steps is not None:
        return spec.warmup_steps
    return spec.warmup_ratio or 0


def schedule(spec: TrainSpec) -> tuple[str, dict]:
    """(scheduler name, kwargs) for TrainingArguments; a floor (min_lr) needs a different scheduler."""
    if spec.min_lr is None:
        return spec.lr_scheduler, {}
    if spec.lr_scheduler == "linear":  # polynomial decay of power 1 is linear, and it ends at lr_end
        return "polynomial", {"lr_end": spec.min_lr, "power": 1.0}
    return "cosine_with_min_lr", {"min_lr": spec.min_lr}


def build_sft_config(recipe: Recipe, run: RunDir, *, device: str, has_eval: bool):
    """Every training argument of the run, from the recipe only."""
    from trl import SFTConfig

    from finetune.train.trackers import tracker_integrations

    train = recipe.train
    precision = mixed_precision(train, device)
    scheduler, scheduler_kwargs = schedule(train)
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=warmup(train),
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        # transformers 5 calls gradient checkpointing "activation checkpointing"; the recipe keeps the familiar name.
        activation_checkpointing=recipe.gradient_checkpointing,
        # Non-reentrant checkpointing computes adapter gradients even though every base weight is frozen.
        activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,  # the starting loss, so a falling curve can be seen
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # every token through the model, padding included; TRL's num_tokens counts the real ones, and the
        # two together give the padding share
        include_num_input_tokens_seen="all",
        # W&B and MLflow through transformers' integrations, into the runs train/trackers.py has started;
        # metrics.jsonl and TensorBoard are attached in build_trainer, so that both write into the run folder
        report_to=tracker_integrations(recipe.output.trackers) or "none",
        run_name=run.path.name,
        # Our samples are tokenized, masked and truncated already; TRL turns completion_mask into labels.
        # max_length is only the row length of bfd packing; otherwise TRL would re-truncate for nothing.
        max_length=recipe.data.max_seq_len if recipe.packing == "bfd" else None,
        completion_only_loss=True,
        # Both packed modes rely on position ids restarting at 0 for each sample: every attention keeps
        # samples apart by them (verified per sample in tests/test_train_packing.py).
        packing=recipe.packing == "bfd",
        packing_strategy="bfd",
        padding_free=recipe.packing == "padding_free",
        dataloader_num_workers=0,
    )


def to_hf_dataset(samples):
    """Tokenized samples -> the columns SFTTrainer recognises as already processed."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [s.input_ids for s in samples], "completion_mask": [s.completion_mask for s in samples]}
    )


def build_trainer(
    model, tokenizer, train_samples, eval_samples, recipe: Recipe, run: RunDir, *, device: str, callbacks=()
):
    """The run's `SFTTrainer`, with metrics.jsonl, complete-checkpoint markers, (optionally) samples.jsonl, the
    trackers of output.trackers, and `callbacks`."""
    from trl import SFTTrainer

    from finetune.train.callbacks import CompleteCheckpointCallback
    from finetune.train.metrics import MetricsFileCallback

    callbacks = [MetricsFileCallback(run.metrics), CompleteCheckpointCallback(run.checkpoints), *callbacks]
    if recipe.eval.samples_every:
        from finetune.eval.generate import pick_sample_prompts
        from finetune.train.sampling import SampleGenerationsCallback

        _, prompts = pick_sample_prompts(train_samples, eval_samples, recipe.eval.samples)
        callbacks.append(SampleGenerationsCallback(prompts, run.sample_steps, every=recipe.eval.samples_every))
    if "tensorboard" in recipe.output.trackers:
        from transformers.integrations import TensorBoardCallback

        # Not through report_to: the Trainer would make it write under checkpoints/runs/DATE (transformers 5
        # has no logging_dir argument; only the process-wide TENSORBOARD_LOGGING_DIR moves it). The callback
        # reopens its writer for the eval after training; the attribute (rather than a writer passed in)
        # keeps that second writer in the run folder too.
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(run.tensorboard)
        callbacks.append(tensorboard)
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(recipe, run, device=device, has_eval=bool(eval_samples)),
        train_dataset=to_hf_dataset(train_samples),
        eval_dataset=to_hf_dataset(eval_samples) if eval_samples else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    use_chunked_loss(trainer, recipe.train.loss_chunk_mib)
    return trainer


def use_chunked_loss(trainer, budget_mib: int | None) -> None:
    """Serve the loss SFTTrainer asks for (`fused_lm_head=True`) with finetune/train/loss.py's tiles.

    SFTTrainer has by now put its own fused head on the (base) model; ours replaces it for that call only.
    """
    from peft import PeftModel

    from finetune.train.loss import add_chunked_lm_head, supports_chunked_loss

    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    if budget_mib is not None and supports_chunked_loss(model.config):
        add_chunked_lm_head(model, budget_mib)
