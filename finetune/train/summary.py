"""summary.json: what a finished run reached, or how far a stopped one got and why."""

from __future__ import annotations

from pathlib import Path


def summarize(state, artifact: Path, trainable: int, total: int, wall_time: float) -> dict:
    """summary.json of a finished run, from the Trainer's state (its log history holds every logged step)."""
    from finetune.train.metrics import peak_memory

    history = state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), 0)
    # the last step is always logged (MetricsFileCallback), so its record counts every token of the run
    real_tokens = next((int(entry["num_tokens"]) for entry in reversed(history) if "num_tokens" in entry), 0)
    processed = state.num_input_tokens_seen
    return {
        "status": "finished",
        "steps": state.global_step,
        "epochs": state.epoch,
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_seen": real_tokens,  # non-padding tokens through the model
        "tokens_processed": processed,  # padding included
        "padding_share": round(1 - real_tokens / processed, 4) if processed else None,
        "tokens_per_s": round(real_tokens / runtime, 1) if runtime else None,
        "train_runtime_s": round(runtime, 2),
        "peak_rss_mib": peak_memory()["peak_rss_mib"],
        "trainable_params": trainable,
        "total_params": total,
        "wall_time_s": round(wall_time, 2),
        "artifact": str(artifact),
    }


def stopped_summary(error: BaseException, state, wall_time: float) -> dict:
    """summary.json of a run that did not finish: how far it got and why it stopped."""
    return {
        "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
        "error": f"{type(error).__name__}: {error}",
        "steps": state.global_step,
        "wall_time_s": round(wall_time, 2),
    }
