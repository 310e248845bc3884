"""The next-token loss from the last hidden states, a few tokens at a time, never the whole logits.

A LoRA step's largest tensor is often the float32 logits, tokens x vocabulary: 4 GiB for 8,192 tokens at
Llama-3's 128,256 entries, and the plain loss keeps a log-softmax and a gradient of the same size beside
them. TRL 1.16's SFTTrainer already runs its own fused head (trl.trainer.utils.add_fused_lm_head), but in
fixed tiles of up to 4,096 tokens x 32,768 vocabulary entries (512 MiB in float32, allocated whole even
for a 1,024-entry vocabulary), several tile-sized temporaries at once, and on devices without Triton it
scores the prompt positions whose labels are ignored too.

`ChunkedNextTokenLoss` scores only the labelled positions, in float32 tiles of tokens x up to 8,192
vocabulary entries no larger than a byte budget, folded into a running log-sum-exp (the online softmax),
keeps per token only that log-sum-exp, and recomputes each tile in the backward pass, where it turns it
into its gradient in place. `add_chunked_lm_head` puts it behind
the same `fused_lm_head=True` call that SFTTrainer.compute_loss makes, so the trainer is configured,
not subclassed; every other call (generation, merge checks) runs the model's own forward.
"""

from __future__ import annotations

import functools
import types

MiB = 2**20
# Vocabulary entries per tile: wide enough for an efficient matmul, narrow enough that a tile of many
# tokens fits a small budget (the weight is read once per token chunk, so tokens per tile matter most)
VOCAB_SLICE = 8192


def tile_shape(budget_bytes: int, vocab: int) -> tuple[int, int]:
    """(tokens, vocabulary entries) of one float32 logits tile within the budget, each at least one."""
    width = min(vocab, VOCAB_SLICE)
    return max(1, budget_bytes // (4 * width)), width


def _tile_logits(hidden, weight, bias, start: int, end: int):
    """float32 logits of `hidden` against vocabulary entries [start, end); the matmul runs in the weight's dtype,
    as lm_head would."""
    import torch

    logits = torch.mm(hidden, weight[start:end].t())
    if bias is not None:
        logits += bias[start:end]
    return logits.float()


def _target_columns(targets, start: int, end: int):
    """(rows whose target lies in [start, end), its column in that tile)."""
    inside = (targets >= start) & (targets < end)
    return inside.nonzero().flatten(), targets[inside] - start


@functools.cache
def _loss_function():
    """The autograd Function, defined on first use so that importing this module does not import torch."""
    import torch

    def fold_tiles(hidden, weight, bias, targets, width):
        """Log-sum-exp, target logit, entropy and argmax of one token chunk, one vocabulary tile at a time.

        Running sums are kept relative to the running maximum m: sum_exp = sum e^(z - m), sum_exp_z =
        sum e^(z - m) z, both rescaled when m grows (the online softmax).
        """
        rows = hidden.shape[0]
        running_max = hidden.new_full((rows,), float("-inf"), dtype=torch.float32)
        sum_exp = torch.zeros_like(running_max)
        sum_exp_z = torch.zeros_like(running_max)
        target_logit = torch.zeros_like(running_max)
        best = torch.full_like(running_max, float("-inf"))
        best_index = torch.zeros(rows, dtype=torch.long, device=hidden.device)
        for start in range(0, weight.shape[0], width):
            end = min(start + width, weight.shape[0])
            z = _tile_logits(hidden, weight, bias, start, end)
            at, column = _target_columns(targets, start, end)
            target_logit[at] = z[at, column]
            tile_max, tile_index = z.max(-1)
            # strictly greater: the first maximum wins a tie, as argmax over the whole row would
            better = tile_max > best
            best = torch.where(better, tile_max, best)
            best_index = torch.where(better, tile_index + start, best_index)
            new_max = torch.maximum(running_max, tile_max)
            rescale = torch.exp(running_max - new_max)
            e = z.sub(new_max[:, None]).exp_()
            tile_sum = e.sum(-1)
            # sum e z as a batched dot product, without a third tile-sized tensor
            tile_sum_z = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).flatten()
            sum_exp = sum_exp * rescale + tile_sum
            sum_exp_z = sum_exp_z * rescale + tile_sum_z
            running_max = new_max
            del z, e
        log_z = running_max + sum_exp.log()
        entropy = log_z - sum_exp_z / sum_exp
        return target_logit - log_z, log_z, entropy, best_index == targets

    class ChunkedNextTokenLoss(torch.autograd.Function):
        """(log p(target), entropy, target is the top-1) per token of `hidden @ weight.T + bias`.

        Only the log-probabilities carry a gradient; entropy and top-1 feed TRL's logged metrics. hidden is
        [N, H] (labelled positions only), weight [V, H], targets [N] with no ignored entries.
        """

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, tokens, width):
            parts = []
            with torch.no_grad():
                for start in range(0, hidden.shape[0], tokens):
                    end = start + tokens
                    parts.append(fold_tiles(hidden[start:end], weight, bias, targets[start:end], width))
            log_probs, log_z, entropy, is_top1 = (torch.cat(column) for column in zip(*parts, strict=True))
            ctx.save_for_backward(hidden, weight, bias, targets, log_z)
            ctx.tile = (tokens, width)
            ctx.mark_non_differentiable(entropy, is_top1)
            return log_probs, entropy, is_top1

        @staticmethod
        def backward(ctx, grad_log_probs, _grad_entropy, _grad_top1):
            hidden, weight, bias, targets, log_z = ctx.saved_tensors
            tokens, width = ctx.tile
            need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
            # accumulated over tiles in float32, whatever the dtype of the inputs
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            for t0 in range(0, hidden.shape[0], tokens):
                t1 = min(t0 + tokens, hidden.shape[0])
                chunk, grad = hidden[t0:t1], grad_log_probs[t0:t1].float()
                for v0 in range(0, weight.shape[0], width):
                    v1 = min(v0 + width, weight.shape[0])
                    # d log p_t / dz_j = 1[j = t] - p_j, built in the recomputed logits' own storage
                    grad_z = _tile_logits(chunk, weight, bias, v0, v1)
                    grad_z.sub_(log_z[t0:t1, None]).exp_().mul_(-grad[:, None])
                    at, column = _target_columns(targets[t0:t1], v0, v1)
                    grad_z[at, column] += grad[at]
                    if need_hidden:
                        grad_hidden[t0:t1].addmm_(grad_z, weight[v0:v1].float())
                    if need_weight:
                        grad_weight[v0:v1].addmm_(grad_z.t(), chunk.float())
                    if need_bias:
                        grad_bias[v0:v1] += grad_z.sum(0)
                    del grad_z
            grads = (grad_hidden, grad_weight, grad_bias)
            cast = (g if g is None else g.to(x.dtype) for g, x in zip(grads, (hidden, weight, bias), strict=True))
            return (*cast, None, None, None)

    return ChunkedNextTokenLoss


def chunked_next_token_log_probs(hidden, weight, bias, targets, budget_bytes: int):
    """(log p(target), entropy, is_top1) per row of `hidden` [N, H] against `targets` [N], chunk by chunk.

    Under autocast the matmuls run in the autocast dtype, as the model's lm_head would, and everything
    after them in float32.
    """
    import torch

    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # once, not once per chunk
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return _loss_function().apply(hidden, weight, bias, targets, *tile_shape(budget_bytes, weight.shape[0]))


def supports_chunked_loss(config) -> bool:
    """Whether the model's logits are a plain projection: no softcapping or scaling, which only TRL's head knows."""
    text = config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return all(getattr(text, name, None) is None for name in scaled)


def add_chunked_lm_head(model, budget_mib: int) -> None:
    """Serve `model(..., labels=labels, fused_lm_head=True)`, SFTTrainer's loss call, with the chunked loss.

    Call after SFTTrainer has added its own fused head to `model` (the base model under PEFT): any other call
    still goes to the forward found here. The backbone and head are looked up per call, as PEFT and FSDP
    replace them after this runs. Returns TRL's `FusedCausalLMOutput`, so compute_loss and its logged metrics
    read it as they read TRL's own.
    """
    import torch
    from torch.distributed.tensor import DTensor
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward
    budget = budget_mib * MiB

    # the model's own signature: generate() checks its keyword arguments against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or kwargs.get("output_router_logits"):  # MoE auxiliary losses: TRL's head has them
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            extra = {key: value for key, value in extra.items() if value is not None}
            return trl_forward(*args, fused_lm_head=fused_lm_head, **extra, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards the head; it is gathered only around its own forward
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        shift_labels = shift_labels.to(weight.device)
        mask = shift_labels != -100
        log_probs, entropy, is_top1 = chunked_next_token_log_probs(
            hidden.to(weight.device)[mask], weight, bias, shift_labels[mask], budget
        )
        # masked_scatter keeps a micro-batch with no labelled token connected to the graph: its loss is a zero
        # that backward() accepts
        log_probs, entropy, is_top1 = (
            torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)
            for x in (log_probs, entropy, is_top1)
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask
        )

    model.forward = types.MethodType(forward, model)
