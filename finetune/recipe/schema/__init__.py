"""The recipe: every key, its type, default, bounds and meaning.

This package is the reference documentation of the recipe format (`finetune schema` prints it as JSON
Schema): the top-level sections here, the adapter and data sections in their own modules, all importable from
here. Unknown keys are errors at every level. Checks that involve more than one key live in
`recipe/checks.py` so each problem can point at the key the user has to change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.recipe.schema.adapter import (
    ADAPTER_SPECS,
    AdapterSection,
    AdapterSpec,
    FullSpec,
    IA3Spec,
    LoraSpec,
    PrefixSpec,
    PromptSpec,
)
from finetune.recipe.schema.data import DataSpec, Format, GoatSpec, SourceSpec
from finetune.recipe.schema.section import DType, Section

__all__ = [
    "ADAPTER_SPECS",
    "AdapterSection",
    "AdapterSpec",
    "DataSpec",
    "DType",
    "EvalSpec",
    "Format",
    "FullSpec",
    "GoatSpec",
    "IA3Spec",
    "LoraSpec",
    "ModelSpec",
    "OutputSpec",
    "PrefixSpec",
    "PromptSpec",
    "QuantSpec",
    "Recipe",
    "Section",
    "SourceSpec",
    "TrainSpec",
]


class ModelSpec(Section):
    """The base model and how to load it."""

    name_or_path: str = Field(
        description="Hub id (e.g. huggyllama/llama-7b) or local folder holding config.json, weights and tokenizer."
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder; defaults to name_or_path.")
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit of name_or_path (and of tokenizer, unless tokenizer_revision is "
        "set) to load; null: the default branch. The commits read are recorded in the run folder's "
        "environment.json, and merge, export, eval and generate load those commits; ignored for local folders.",
    )
    tokenizer_revision: str | None = Field(
        None,
        description="Hub branch, tag or commit of a separate tokenizer repo (model.tokenizer); null: "
        "model.revision. Recorded and reloaded like model.revision.",
    )
    dtype: DType = Field(
        "auto",
        description="Weight dtype. auto: bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel. sdpa is exact and fast everywhere; flash_attention_2 needs its package."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Only for repositories you trust."
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Also load .bin/.pt weights. They are pickle files that can run code; safetensors only when off.",
    )


class QuantSpec(Section):
    """Load the base model quantized with bitsandbytes (QLoRA with bits: 4, LLM.int8 with bits: 8)."""

    bits: Literal[4, 8] = Field(description="4: NF4/FP4 storage (QLoRA). 8: LLM.int8.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA paper's choice.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: DType = Field(
        "auto", description="dtype of the matmuls on dequantized weights; auto follows the training precision."
    )
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="4-bit only: dtype of the tensors that hold packed 4-bit values (bnb_4bit_quant_storage); "
        "same bytes either way. FSDP shards the quantized weights only when this equals the compute dtype "
        "(bfloat16 for bf16 training).",
    )


class TrainSpec(Section):
    """The optimisation: what `SFTTrainer` is told."""

    epochs: float = Field(3, gt=0, description="Passes over the training rows (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int | Literal["auto"] = Field(
        4,
        description="Samples per device per forward pass. auto: the largest that the memory planner (finetune "
        "plan) says fits train.gpu_memory, or the GPU's memory when that is null; a CPU run needs train.gpu_memory. "
        "The chosen number is written into the run folder's recipe.yaml.",
    )
    grad_accum: int = Field(
        8, gt=0, description="Micro-batches per optimizer step; batch = micro_batch_size x grad_accum x devices."
    )
    tokens_per_update: int | None = Field(
        None,
        gt=0,
        description="Tokens per optimizer step (micro-batch x data.max_seq_len x grad_accum x devices); sets "
        "grad_accum to reach at least this many, so leave grad_accum out. Written into recipe.yaml as grad_accum.",
    )
    gpu_memory: str | None = Field(
        None,
        description="Memory per GPU (e.g. 24GiB, 80GB) that micro_batch_size: auto and finetune plan size for; "
        "null: the visible GPU's memory.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    min_lr: float | None = Field(
        None,
        ge=0,
        description="Learning rate at the end of a linear or cosine schedule (both end at 0 when null).",
    )
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a share of all steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in optimizer steps (excludes warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"
    ] = Field(
        "adamw_torch_fused",
        description="adamw_torch_fused: one fused AdamW kernel over all parameters, on CPU and GPU (adamw_torch "
        "loops over the parameters one by one on CPU). "
        "adamw_8bit keeps optimizer state in 8 bits (bitsandbytes, ~75% less state memory); paged_* "
        "also pages that state to CPU memory under GPU memory pressure (QLoRA; plain on CPU).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass: much less memory, about 30% slower. "
        "null: on, except for prefix-tuning, which cannot run with it.",
    )
    loss_chunk_mib: int | None = Field(
        32,
        gt=0,
        le=4096,
        description="Compute the loss from the last hidden states in float32 logits tiles of at most this many MiB "
        "(up to 8,192 vocabulary entries wide), recomputed in the backward pass, scoring only the labelled tokens: "
        "the tokens x vocabulary logits are never held whole (at Llama-3's 128K vocabulary they are a LoRA step's "
        "largest tensor). Equal in loss and gradients to the plain computation. null: TRL's own fused head (tiles "
        "of up to 4,096 tokens x 32,768 entries, prompt tokens scored too where Triton is missing).",
    )
    seed: int = Field(42, description="Seed for initialisation, data order and the eval split.")
    logging_steps: int = Field(10, gt=0, description="Log train loss and learning rate every N optimizer steps.")
    eval_steps: int = Field(200, gt=0, description="Compute eval loss every N optimizer steps (and at the end).")
    save_steps: int = Field(200, gt=0, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep only the newest N checkpoints; null keeps all.")
    use_cpu: bool = Field(False, description="Train on CPU even when a GPU is present.")


class OutputSpec(Section):
    """The run folder."""

    dir: str = Field(description="Run folder: recipe, environment, data report, metrics, checkpoints, adapter.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files to DIR/tensorboard.")
    report: bool = Field(
        True, description="Write DIR/report.html and DIR/plots/*.png at the end (finetune report DIR rebuilds them)."
    )


class EvalSpec(Section):
    """Task evaluation at the end of training (`finetune eval RUN_DIR` does the same on demand)."""

    exact_match: int = Field(
        0,
        ge=0,
        description="Goat data: answer this many held-out problems greedily after training and print exact match "
        "per operation x operand digit lengths; written to DIR/eval.json. 0 = off.",
    )
    batch_size: int = Field(32, gt=0, description="Prompts answered at once.")
    samples: int = Field(
        4,
        ge=0,
        description="Held-out prompts (training prompts if there is no eval split) answered greedily after "
        "training, shown next to their references in report.html; written to DIR/samples.json. 0 = off.",
    )


class Recipe(Section):
    """A fine-tuning run: base model, optional quantization, adapter, data, training, evaluation, output."""

    model: ModelSpec
    quant: QuantSpec | None = Field(None, description="Quantize the base model; omit for 16/32-bit weights.")
    adapter: AdapterSpec = Field(default_factory=LoraSpec, description="Adaptation method, chosen by adapter.kind.")
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: OutputSpec

    @property
    def gradient_checkpointing(self) -> bool:
        """train.gradient_checkpointing, with null resolved: on, except for prefix-tuning."""
        if self.train.gradient_checkpointing is not None:
            return self.train.gradient_checkpointing
        return self.adapter.allows_checkpointing

    @property
    def packing(self) -> str:
        """data.packing, with null resolved: padding_free, except for prefix and prompt tuning."""
        if self.data.packing is not None:
            return self.data.packing
        return "none" if self.adapter.prepends_virtual_tokens else "padding_free"
