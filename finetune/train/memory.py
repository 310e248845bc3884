"""Bytes a live model and optimizer really hold, counted the way `train/plan.py` predicts them.

Used to check the planner against torch's tensors: every parameter, its quantization constants
(bitsandbytes' `quant_state` / int8 scales), every gradient and every optimizer-state tensor, each
storage counted once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeasuredStates:
    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.base_weights + self.adapter_weights + self.gradients + self.optimizer_state


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quantization_tensors(param) -> list:
    """The tensors that bitsandbytes keeps beside a quantized weight to dequantize it."""
    state = getattr(param, "quant_state", None)
    if state is not None:  # 4-bit: absmax, the code, and for double quantization the nested state and offset
        tensors = [state.absmax, state.code]
        if getattr(state, "nested", False):
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return [t for t in tensors if t is not None]
    scales = getattr(param, "SCB", None)  # 8-bit: one scale per output row
    return [scales] if scales is not None else []


def measure_states(model, optimizer=None, *, full_finetune: bool = False) -> MeasuredStates:
    """Bytes of weights (frozen base vs trainable adapter), gradients and optimizer state.

    Args:
        model: after a backward pass, so that gradients exist.
        optimizer: after a step, so that its state exists.
        full_finetune: trainable weights are the base weights themselves, not an adapter.
    """
    seen: set[int] = set()

    def once(tensor) -> int:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return tensor_bytes(tensor)

    base = adapter = gradients = 0
    for param in model.parameters():
        size = once(param) + sum(once(t) for t in quantization_tensors(param))
        if param.requires_grad and not full_finetune:
            adapter += size
        else:
            base += size
        if param.grad is not None:
            gradients += once(param.grad)
    for module in model.modules():  # an 8-bit layer's forward moves the scales from the weight to its state
        scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is not None and hasattr(scales, "untyped_storage"):
            base += once(scales)
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(once(value) for value in per_param.values() if hasattr(value, "untyped_storage"))
    return MeasuredStates(base, adapter, gradients, state)


def measure_training_step(model, optimizer_name: str, input_ids, *, full_finetune: bool = False) -> MeasuredStates:
    """One forward, backward and optimizer step on `input_ids` (labels = inputs), then `measure_states`.

    Args:
        model: a model wrapped for training (`finetune.model.adapters.wrap_adapter`).
        optimizer_name: train.optimizer; the optimizer the Trainer would build for it.
        input_ids: a (batch, seq) tensor on the model's device.
        full_finetune: adapter.kind: none.
    """
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer = build_optimizer(optimizer_name, [p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    return measure_states(model, optimizer, full_finetune=full_finetune)


def build_optimizer(name: str, params: list):
    """The optimizer class TrainingArguments' `optim` names, with default hyper-parameters."""
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=1e-3, fused=name == "adamw_torch_fused")
    import bitsandbytes as bnb

    optimizers = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return optimizers[name](params, lr=1e-3)
