"""The chunked loss (finetune/train/loss.py) equals the plain logits + cross-entropy in value and gradients,
and the trainer's loss call uses it without ever holding the whole logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import finetune.train.loss as chunked_loss
from finetune.data.build import build_datasets
from finetune.model.adapters import wrap_adapter
from finetune.model.load import load_model, load_tokenizer
from finetune.recipe.load import load_recipe
from finetune.run_folder import RunDir
from finetune.train.loss import chunked_next_token_log_probs, tile_shape
from finetune.train.trainer import build_trainer


def plain_log_probs(hidden, weight, bias, targets):
    """The reference: whole logits, log-softmax, the target's entry."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


def gradients(log_probs_fn, hidden, weight, bias, targets, upstream):
    """Value and gradients of sum(upstream * log p(target)) with respect to hidden, weight and bias."""
    inputs = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    value = (log_probs_fn(*inputs, targets) * upstream).sum()
    value.backward()
    return value.detach(), [t.grad for t in inputs]


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Tiles of 16 vocabulary entries, so a 101-entry vocabulary takes 7 tiles (the last one partial)."""
    monkeypatch.setattr(chunked_loss, "VOCAB_SLICE", 16)


@pytest.mark.parametrize("tokens_per_tile", [5, 37, 1000])
def test_chunked_log_probs_equal_the_plain_computation(narrow_tiles, tokens_per_tile):
    torch.manual_seed(0)
    n, hidden_size, vocab = 37, 24, 101
    hidden, weight, bias = torch.randn(n, hidden_size), torch.randn(vocab, hidden_size), torch.randn(vocab)
    targets = torch.randint(0, vocab, (n,))
    targets[:3] = torch.tensor([0, vocab - 1, 16])  # the first and last entries and a tile's first column
    upstream = torch.randn(n)
    budget = tokens_per_tile * 16 * 4
    assert tile_shape(budget, vocab) == (tokens_per_tile, 16)

    def chunked(h, w, b, t):
        return chunked_next_token_log_probs(h, w, b, t, budget)[0]

    value, grads = gradients(chunked, hidden, weight, bias, targets, upstream)
    expected_value, expected_grads = gradients(plain_log_probs, hidden, weight, bias, targets, upstream)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)

    # The tolerance is far below what a plausible mistake moves: scoring the neighbouring token instead
    _, wrong_grads = gradients(plain_log_probs, hidden, weight, bias, (targets + 1) % vocab, upstream)
    assert (wrong_grads[0] - expected_grads[0]).abs().max() > 1000 * (grads[0] - expected_grads[0]).abs().max()


def test_entropy_and_top1_match_the_whole_distribution(narrow_tiles):
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 8), torch.randn(101, 8) * 3
    logits = hidden @ weight.T
    targets = logits.argmax(-1)
    targets[::2] = torch.randint(0, 101, (20,))  # half top-1 by construction, half (mostly) not
    _, entropy, is_top1 = chunked_next_token_log_probs(hidden, weight, None, targets, 7 * 16 * 4)
    probabilities = logits.softmax(-1)
    torch.testing.assert_close(entropy, -(probabilities * probabilities.log()).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
    assert 0 < is_top1.sum() < 40


@pytest.fixture
def small_tiles(monkeypatch):
    """train.loss_chunk_mib: 1 means 32 KiB here: tiles of 64 tokens x 128 vocabulary entries on the tiny model
    (vocabulary 512), so one batch takes several tiles along both axes."""
    monkeypatch.setattr(chunked_loss, "VOCAB_SLICE", 128)
    monkeypatch.setattr(chunked_loss, "MiB", 64 * 128 * 4)


def lora_trainer(write_recipe, run: Path, loss_chunk_mib: int | None):
    """(LoRA model, its SFTTrainer, the first padded training batch) on the tiny model."""
    budget = "null" if loss_chunk_mib is None else loss_chunk_mib  # write_recipe drops keys given as None
    recipe = load_recipe(write_recipe(f"{run.name}.yaml", data={"packing": "none"}), [f"train.loss_chunk_mib={budget}"])
    assert recipe.train.loss_chunk_mib == loss_chunk_mib
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=0)
    model = load_model(recipe.model, None, device="cpu", tokenizer=tokenizer)
    model = wrap_adapter(
        model, recipe.adapter, gradient_checkpointing=False, tokenizer_source=recipe.model.name_or_path
    )
    trainer = build_trainer(model, tokenizer, data.train, [], recipe, RunDir(run), device="cpu")
    return model, trainer, next(iter(trainer.get_train_dataloader()))


def test_trainer_loss_and_adapter_gradients_equal_transformers_loss(small_tiles, write_recipe, tmp_path):
    """Through SFTTrainer.compute_loss: the loss and every LoRA gradient equal the model's own loss (whole
    logits, transformers' ForCausalLMLoss) on the same padded batch."""
    model, trainer, batch = lora_trainer(write_recipe, tmp_path / "run", 1)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert tile_shape(chunked_loss.MiB, model.config.vocab_size) == (64, 128)
    assert tokens > 2 * 64  # the batch's labelled tokens take several tiles
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA starts with B = 0, which leaves A without gradient: start from a trained-like B
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    chunked, chunked_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    plain, plain_grads = loss_and_grads(lambda: model(**batch).loss)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_trainer_loss_never_allocates_the_whole_logits(small_tiles, write_recipe, tmp_path):
    """No allocation of a chunked training step reaches the whole logits' size; with train.loss_chunk_mib: null
    (TRL's own head) the same step allocates at least that much at once, so the measurement can tell."""
    largest = {}
    for budget in (1, None):
        model, trainer, batch = lora_trainer(write_recipe, tmp_path / f"run-{budget}", budget)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.compute_loss(model, dict(batch)).backward()
        events = prof.profiler.kineto_results.events()
        largest[budget] = max(e.nbytes() for e in events if e.name() == "[memory]")
        whole_logits = batch["input_ids"].numel() * model.config.vocab_size * 4
    assert largest[1] < whole_logits <= largest[None]
