"""Peak GPU memory of a recipe, from the model's shape alone: what fits before anything is loaded.

Pure arithmetic (no torch): `finetune plan` answers instantly. The parts, per GPU:

- base weights: 16/32-bit, or 4-bit (0.5 byte/param plus a float32 absmax per 64-value block; double
  quantization stores those as 8 bits plus a float32 per 256 of them) or 8-bit (1 byte/param plus a
  float32 scale per output row). Embeddings, norms and lm_head are never quantized, and peft's
  `prepare_model_for_kbit_training` turns them to float32.
- adapter weights: what the adapter kind's method counts (`model/methods/`): LoRA r x (in + out) per
  target module and layer (float32: peft upcasts 16-bit adapters); prompt/prefix tokens; one (IA)^3 vector
  per target and layer; every weight for full fine-tuning.
- gradients: one per trainable parameter, in its dtype.
- optimizer state: AdamW two moments in the parameter's dtype; 8-bit AdamW 2 bytes/param (tensors of
  4096+ values; smaller ones keep 32-bit moments); paged variants the same bytes, but they can move to
  CPU memory; SGD none.
- activations: what autograd keeps for the backward pass, per token and layer, from the hidden,
  intermediate, head and kv sizes (eager attention also keeps seq x seq scores per head), or with
  checkpointing each layer's input plus one layer recomputed; and the logits: with train.loss_chunk_mib
  one tile of them (finetune/train/loss.py), else whole (compute dtype, a float32 log-softmax and its
  gradient: batch x seq x vocab x 14 bytes in bf16, often the largest single tensor).
- overhead: the CUDA context (0.75 GiB, not seen by torch.cuda.max_memory_allocated) and 5% of the
  per-step tensors (activations, logits, gradients) for allocator fragmentation.

FSDP (world size N) divides weights, gradients and optimizer state by N and adds two layers' gathered
weights; activations are per GPU and not divided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from finetune.model.methods import method_of
from finetune.model.methods.lora import lora_targets
from finetune.recipe.checks import parse_memory_size as parse_size
from finetune.recipe.schema import FullSpec, LoraSpec, PromptSpec, Recipe

if TYPE_CHECKING:  # shapes come from model/shape.py through the callers: the planner reads no model
    from finetune.model.shape import ModelShape

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
FRAGMENTATION_SHARE = 0.05
NF4_BLOCK, NESTED_BLOCK, OPTIM_8BIT_BLOCK, OPTIM_8BIT_MIN_SIZE = 64, 256, 256, 4096
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    note: str = ""
    pageable: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    """The predicted peak per GPU, part by part."""

    parts: list[Part]
    micro_batch_size: int
    seq_len: int
    world_size: int
    gpu_memory: int | None = None
    suggestions: list[str] = field(default_factory=list)

    def part(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def pageable(self) -> int:
        return sum(p.bytes for p in self.parts if p.pageable)

    @property
    def states(self) -> int:
        """Weights + gradients + optimizer state: the part measurable without a GPU."""
        return sum(self.part(name) for name in ("base weights", "adapter weights", "gradients", "optimizer state"))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory


@dataclass(frozen=True)
class Setup:
    """The recipe's memory-relevant choices, resolved for a GPU run."""

    weight_bytes: int  # bytes per unquantized base weight
    compute_bytes: int  # bytes per activation value
    bits: int | None  # 4, 8 or None
    double_quant: bool
    kbit_prepared: bool  # quantized base + adapter: peft casts the unquantized weights to float32
    checkpointing: bool
    attention: str


def resolve_setup(recipe: Recipe) -> Setup:
    """auto dtypes resolve as on a bf16-capable GPU (what the plan is for)."""
    weight_bytes = DTYPE_BYTES.get(recipe.model.dtype, 2)
    precision = recipe.train.precision
    compute_bytes = 4 if precision == "fp32" or (precision == "auto" and recipe.model.dtype == "float32") else 2
    quant = recipe.quant
    return Setup(
        weight_bytes=weight_bytes,
        compute_bytes=compute_bytes,
        bits=quant.bits if quant else None,
        double_quant=bool(quant and quant.double_quant),
        kbit_prepared=quant is not None and not isinstance(recipe.adapter, FullSpec),
        checkpointing=recipe.gradient_checkpointing,
        attention=recipe.model.attn_implementation,
    )


def quantized_linear_bytes(in_features: int, out_features: int, bits: int, double_quant: bool) -> int:
    """Storage of one bitsandbytes linear weight with its quantization constants."""
    n = in_features * out_features
    if bits == 8:
        return n + 4 * out_features  # int8 values + a float32 scale per output row
    blocks = math.ceil(n / NF4_BLOCK)
    code = 16 * 4  # the 16-value NF4/FP4 code, float32
    if not double_quant:
        return n // 2 + 4 * blocks + code
    nested = math.ceil(blocks / NESTED_BLOCK)
    return n // 2 + blocks + 4 * nested + code + 256 * 4 + 4  # 8-bit absmax, its absmax, code, offset


def base_weight_bytes(shape: ModelShape, setup: Setup) -> int:
    plain_bytes = 4 if setup.kbit_prepared else setup.weight_bytes
    head = 0 if shape.tied_embeddings else shape.vocab_size * shape.hidden_size
    norms_and_biases = shape.num_layers * (2 * shape.hidden_size + shape.layer_bias_count()) + shape.hidden_size
    plain = shape.vocab_size * shape.hidden_size + head + norms_and_biases
    if setup.bits is None:
        linear = sum(i * o for i, o in shape.linear_shapes().values()) * setup.weight_bytes
    else:
        linear = sum(
            quantized_linear_bytes(i, o, setup.bits, setup.double_quant) for i, o in shape.linear_shapes().values()
        )
    return shape.num_layers * linear + plain * plain_bytes


def trainable_tensors(recipe: Recipe, shape: ModelShape, setup: Setup) -> list[tuple[int, int]]:
    """(values, bytes per value) of every trainable tensor, as the adapter kind's method counts them."""
    return method_of(recipe.adapter).trainable_tensors(recipe.adapter, shape, setup)


def optimizer_bytes(optimizer: str, tensors: list[tuple[int, int]]) -> int:
    """State bytes of the optimizer over the trainable tensors."""
    if optimizer == "sgd":
        return 0
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0
        for n, _ in tensors:
            small = n < OPTIM_8BIT_MIN_SIZE
            total += 8 * n if small else 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
        return total
    if optimizer == "paged_adamw_32bit":
        return sum(8 * n for n, _ in tensors)
    return sum(2 * n * size + 4 for n, size in tensors)  # two moments + a float32 step count per tensor


def layer_activation_bytes(recipe: Recipe, shape: ModelShape, setup: Setup, tokens: int, seq_len: int) -> int:
    """What autograd keeps for one decoder layer's backward, for `tokens` = batch x seq tokens."""
    b, h, i = setup.compute_bytes, shape.hidden_size, shape.intermediate_size
    norms = 2 * (4 + b) * h  # each RMSNorm keeps its float32 input and its output
    attention = (3 * shape.q_dim + 2 * shape.q_dim) * b  # q, k and v (repeated to all heads), output, o_proj input
    if setup.attention == "eager":
        attention += shape.num_heads * seq_len * (4 + b)  # float32 softmax and its cast copy, per head
    mlp = 4 * i * b  # gate, silu(gate), up, silu(gate) * up
    lora = 0
    if isinstance(recipe.adapter, LoraSpec) and recipe.adapter.dropout > 0:
        lora = sum(in_f * (b + 1) for in_f, _ in lora_targets(recipe.adapter, shape).values())  # dropout out + mask
    return tokens * (norms + attention + mlp + lora)


def activation_bytes(recipe: Recipe, shape: ModelShape, setup: Setup, micro_batch: int, seq_len: int) -> int:
    tokens = micro_batch * seq_len
    tokens += micro_batch * getattr(recipe.adapter, "num_virtual_tokens", 0) * isinstance(recipe.adapter, PromptSpec)
    layer = layer_activation_bytes(recipe, shape, setup, tokens, seq_len)
    if setup.checkpointing:
        layers = shape.num_layers * tokens * shape.hidden_size * setup.compute_bytes + layer
    else:
        layers = shape.num_layers * layer
    return layers


def logits_part(recipe: Recipe, shape: ModelShape, setup: Setup, micro_batch: int, seq_len: int) -> Part:
    """The loss's logits: whole, or finetune/train/loss.py's tiles (train.loss_chunk_mib)."""
    from finetune.train.loss import MiB, tile_shape

    tokens = micro_batch * seq_len
    whole = f"{micro_batch} x {seq_len} x {shape.vocab_size:,} vocab"
    if recipe.train.loss_chunk_mib is None or shape.vocab_size == 0:
        # logits in compute dtype, the float32 log-softmax kept for backward, and its float32 gradient
        return Part("logits", tokens * shape.vocab_size * (setup.compute_bytes + 4 + 4 + 4), whole)
    rows, width = tile_shape(recipe.train.loss_chunk_mib * MiB, shape.vocab_size)
    rows = min(rows, tokens)
    # a tile's matmul output in compute dtype, its float32 logits and their exponentials live at once
    tile = rows * width * (setup.compute_bytes + 4 + 4)
    return Part("logits", tile, f"{rows:,} x {width:,} tiles of {whole} (train.loss_chunk_mib)")


def plan_memory(
    recipe: Recipe,
    shape: ModelShape,
    *,
    world_size: int = 1,
    gpu_memory: int | None = None,
    micro_batch_size: int | None = None,
) -> MemoryPlan:
    """Predicted peak memory per GPU for `recipe` on a model of `shape`.

    Args:
        recipe: the validated recipe.
        shape: the model's sizes (`finetune.model.shape.read_shape`).
        world_size: GPUs; above 1, weights, gradients and optimizer state are sharded (FSDP).
        gpu_memory: bytes per GPU, to say whether it fits and what to change.
        micro_batch_size: in place of train.micro_batch_size (which may be `auto`).
    """
    setup = resolve_setup(recipe)
    configured = recipe.train.micro_batch_size
    micro = micro_batch_size or (configured if isinstance(configured, int) else 1)
    seq = recipe.data.max_seq_len
    tensors = trainable_tensors(recipe, shape, setup)
    adapter_bytes = 0 if isinstance(recipe.adapter, FullSpec) else sum(n * size for n, size in tensors)
    paged = recipe.train.optimizer.startswith("paged_")
    shard = world_size
    parts = [
        Part("base weights", base_weight_bytes(shape, setup) // shard, _weights_note(setup, shard)),
        Part("adapter weights", adapter_bytes // shard, f"{sum(n for n, _ in tensors):,} trainable params"),
        Part("gradients", sum(n * size for n, size in tensors) // shard),
        Part(
            "optimizer state",
            optimizer_bytes(recipe.train.optimizer, tensors) // shard,
            recipe.train.optimizer,
            pageable=paged,
        ),
        Part(
            "activations",
            activation_bytes(recipe, shape, setup, micro, seq),
            f"{'checkpointed' if setup.checkpointing else 'no checkpointing'}, {setup.attention}",
        ),
        logits_part(recipe, shape, setup, micro, seq),
    ]
    if shard > 1:
        layer_bytes = base_weight_bytes(_one_layer(shape), setup) - base_weight_bytes(_one_layer(shape, 0), setup)
        parts.append(Part("FSDP gathered layers", 2 * layer_bytes, "one layer in use, the next prefetched"))
    # Weights and optimizer state are allocated once, in large blocks; what is allocated and freed every
    # step (activations, logits, gradients) is what leaves holes in the caching allocator.
    churn = sum(p.bytes for p in parts if p.name in ("activations", "logits", "gradients"))
    parts.append(Part("allocator fragmentation", int(FRAGMENTATION_SHARE * churn), "5% of activations + gradients"))
    parts.append(Part("CUDA context", CUDA_CONTEXT_BYTES, "kernels, cuBLAS workspace"))
    plan = MemoryPlan(parts, micro, seq, world_size, gpu_memory)
    if gpu_memory is not None and not plan.fits:
        plan.suggestions.extend(suggest_changes(recipe, plan))
    return plan


def largest_micro_batch(recipe: Recipe, shape: ModelShape, *, world_size: int, gpu_memory: int) -> int:
    """The largest micro-batch (up to 1024) whose plan fits in `gpu_memory`; 0 when not even 1 does."""

    def fits(micro: int) -> bool:
        plan = plan_memory(recipe, shape, world_size=world_size, gpu_memory=gpu_memory, micro_batch_size=micro)
        return bool(plan.fits)

    low, high = 0, 1024  # the plan grows with the micro-batch, so bisect
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _one_layer(shape: ModelShape, layers: int = 1) -> ModelShape:
    from dataclasses import replace

    return replace(shape, num_layers=layers, vocab_size=0)


def _weights_note(setup: Setup, shard: int) -> str:
    kind = {4: "4-bit NF4" + (" double-quant" if setup.double_quant else ""), 8: "8-bit"}.get(setup.bits)
    note = kind or {2: "16-bit", 4: "32-bit"}[setup.weight_bytes]
    if setup.kbit_prepared:
        note += "; embeddings, norms, lm_head float32"
    return note + (f"; sharded over {shard} GPUs" if shard > 1 else "")


def suggest_changes(recipe: Recipe, plan: MemoryPlan) -> list[str]:
    """What would bring the plan under its GPU memory, cheapest change first."""
    hints = []
    if not recipe.gradient_checkpointing and recipe.adapter.allows_checkpointing:
        hints.append("train.gradient_checkpointing=true (activations drop to one layer's worth)")
    if plan.micro_batch_size > 1:
        hints.append(f"a smaller train.micro_batch_size (now {plan.micro_batch_size}) with a larger train.grad_accum")
    if recipe.quant is None and not isinstance(recipe.adapter, FullSpec):
        hints.append("quant.bits=4 (QLoRA: base weights at ~0.5 byte/param)")
    if (
        recipe.train.optimizer in ("adamw_torch", "adamw_torch_fused")
        and plan.part("optimizer state") > plan.total / 10
    ):
        hints.append("train.optimizer=paged_adamw_8bit (2 bytes/param of state, pageable to CPU)")
    if plan.pageable and plan.gpu_memory is not None and plan.total - plan.pageable <= plan.gpu_memory:
        hints.insert(0, "it fits if the paged optimizer state spills to CPU memory (slower steps under pressure)")
    hints.append("FSDP over more GPUs: finetune plan --world-size N (accelerate_configs/fsdp.yaml)")
    return hints


def format_size(n: int) -> str:
    """Bytes in GiB, or MiB below a tenth of a GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def format_plan(plan: MemoryPlan, title: str) -> str:
    """The plan as a table, with the verdict and what to change."""
    width = max(len(p.name) for p in plan.parts)
    lines = [title, ""]
    for p in plan.parts:
        note = f"  {p.note}" if p.note else ""
        lines.append(f"{p.name:<{width}}  {format_size(p.bytes):>10}{note}")
    lines.append(f"{'total per GPU':<{width}}  {format_size(plan.total):>10}")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does not fit"
        lines += ["", f"{verdict} in {plan.gpu_memory / GiB:.1f} GiB ({plan.total / plan.gpu_memory:.0%} of it)"]
        lines += [f"  - {hint}" for hint in plan.suggestions]
    return "\n".join(lines)


def plan_report(
    recipe: Recipe, recipe_path: str, shape: ModelShape, model: str, *, gpu_memory: str | None, world_size: int
) -> str:
    """`finetune plan`: the printed plan of a recipe.

    Args:
        recipe: the validated recipe.
        recipe_path: shown in the title.
        shape: the sizes of the model planned for (the recipe's, or a LLaMA-1 size).
        model: how the title names that model.
        gpu_memory: the --gpu-memory text (e.g. 24GiB); None: train.gpu_memory, if set.
        world_size: GPUs the model is sharded over.

    Raises:
        InputError: a bad size or world size.
    """
    from finetune.errors import InputError

    if world_size < 1:
        raise InputError(f"--world-size: must be at least 1 (got {world_size})")
    gpu_memory = gpu_memory or recipe.train.gpu_memory
    try:
        memory = parse_size(gpu_memory) if gpu_memory else None
    except ValueError as e:
        raise InputError(f"--gpu-memory: {e}") from None
    largest = largest_micro_batch(recipe, shape, world_size=world_size, gpu_memory=memory) if memory else None
    auto = recipe.train.micro_batch_size == "auto"
    micro = (largest or 1) if auto else None  # auto: the plan of what `finetune run` would choose
    plan = plan_memory(recipe, shape, world_size=world_size, gpu_memory=memory, micro_batch_size=micro)
    gpus = f", {world_size} GPUs (FSDP)" if world_size > 1 else ""
    chosen = " (auto)" if auto else ""
    title = f"{recipe_path}: {model}, micro-batch {plan.micro_batch_size}{chosen} x {plan.seq_len} tokens{gpus}"
    text = format_plan(plan, title)
    if largest is not None:
        text += f"\nlargest micro-batch that fits: {largest or 'none (not even 1)'}"
    return text
