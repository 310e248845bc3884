"""The recipe: every key, its type, default, bounds and meaning.

This module is the reference documentation of the recipe format (`finetune schema` prints it as JSON
Schema). Unknown keys are errors at every level. Checks that involve more than one key live in
`recipe/checks.py` so each problem can point at the key the user has to change.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

DType = Literal["auto", "bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    """The base model and how to load it."""

    name_or_path: str = Field(
        description="Hub id (e.g. huggyllama/llama-7b) or local folder holding config.json, weights and tokenizer."
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder; defaults to name_or_path.")
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit of name_or_path (and of tokenizer) to load; null: the default "
        "branch. The commits read are recorded in the run folder's environment.json; ignored for local folders.",
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


class AdapterSection(Section):
    """What the recipe's other defaults need to know of an adapter kind (its meaning is in model/methods/)."""

    # Virtual tokens are prepended once per row, so packing several samples into a row would leave all
    # but the first without them: such kinds train padded rows by default.
    prepends_virtual_tokens: ClassVar[bool] = False
    # Checkpointed decoder layers drop a prefix's key/values: such kinds train without it by default.
    allows_checkpointing: ClassVar[bool] = True


class LoraSpec(AdapterSection):
    """A LoRA adapter (peft). With `quant` set this is QLoRA."""

    kind: Literal["lora"] = Field("lora", description="Adaptation method.")
    r: int = Field(16, gt=0, description="Rank of the update. Higher = more capacity and memory.")
    alpha: float = Field(
        32, gt=0, description="Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear for every linear layer "
        "but the output head.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter "
        "(e.g. [embed_tokens, lm_head] after adding tokens).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r) (rsLoRA).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): slower, sometimes better at low rank.")


class PrefixSpec(AdapterSection):
    """Prefix-tuning (peft): trained key/value vectors prepended at every layer; the base stays frozen."""

    prepends_virtual_tokens: ClassVar[bool] = True
    allows_checkpointing: ClassVar[bool] = False

    kind: Literal["prefix"]
    num_virtual_tokens: int = Field(30, gt=0, description="Prefix length in positions, at every layer.")
    prefix_projection: bool = Field(
        False,
        description="Train the prefix through a 2-layer MLP (the paper's reparameterisation) instead of directly.",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden size of that MLP (prefix_projection only); defaults to the model's hidden size."
    )


class PromptSpec(AdapterSection):
    """Prompt tuning (peft): trained embeddings prepended to the input; the base stays frozen."""

    prepends_virtual_tokens: ClassVar[bool] = True

    kind: Literal["prompt"]
    num_virtual_tokens: int = Field(20, gt=0, description="Soft-prompt length in tokens.")
    init_text: str | None = Field(
        None,
        description="Initialise the soft prompt from the embeddings of this text (repeated or cut to length); "
        "random when null.",
    )


class IA3Spec(AdapterSection):
    """(IA)^3 (peft): trained vectors that rescale the outputs of attention projections and the inputs of
    feed-forward projections; the base stays frozen, and `finetune merge` folds the vectors into it."""

    kind: Literal["ia3"]
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        min_length=1,
        description="Linear modules to rescale; the default is peft's for LLaMA (keys, values, the MLP's output).",
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Those of target_modules whose input (not output) is rescaled, as the (IA)^3 paper does for "
        "the feed-forward layer; must be a subset of target_modules.",
    )


class FullSpec(AdapterSection):
    """Full fine-tuning: every weight of the model trains; the run folder holds a whole model."""

    kind: Literal["none"]


ADAPTER_SPECS: dict[str, type[AdapterSection]] = {
    "lora": LoraSpec,
    "prefix": PrefixSpec,
    "prompt": PromptSpec,
    "ia3": IA3Spec,
    "none": FullSpec,
}


def _adapter_kind(value) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", "lora")  # LoRA when the kind is left out
    return getattr(value, "kind", None)


AdapterSpec = Annotated[
    Annotated[LoraSpec, Tag("lora")]
    | Annotated[PrefixSpec, Tag("prefix")]
    | Annotated[PromptSpec, Tag("prompt")]
    | Annotated[IA3Spec, Tag("ia3")]
    | Annotated[FullSpec, Tag("none")],
    Discriminator(_adapter_kind),
]


class GoatSpec(Section):
    """Generate Goat arithmetic rows instead of reading a file (data.format: goat)."""

    n: int = Field(50_000, gt=0, description="Rows to generate; the operations take turns.")
    seed: int = Field(0, description="Generator seed: the same seed gives the same rows.")
    ops: list[Literal["add", "sub", "mul", "div"]] = Field(
        default_factory=lambda: ["add", "sub", "mul", "div"], min_length=1, description="Operations to include."
    )
    add_sub_digits: int = Field(
        16, gt=0, description="Longest operand of additions, subtractions and multiplications by one digit, in digits."
    )
    mul_digits: int = Field(5, ge=2, description="Longest factor of multi-digit multiplications (chain of thought).")
    div_dividend_digits: int = Field(8, gt=0, description="Longest dividend of divisions.")
    div_divisor_digits: int = Field(5, gt=0, description="Longest divisor of divisions.")


Format = Literal["alpaca", "goat", "lima", "sharegpt"]


class SourceSpec(Section):
    """One of several data sets mixed in a recipe (data.sources); the data section's other keys apply to all."""

    format: Format = Field("alpaca", description="Dataset adapter for this source's rows.")
    path: str | None = Field(None, description="File, dataset folder or hub id, as data.path.")
    goat: GoatSpec | None = Field(None, description="Generate Goat rows in place of a path (format: goat).")
    split: str = Field("train", description="Split to read from a hub dataset or dataset folder.")
    revision: str | None = Field(
        None, description="Hub branch, tag or commit of a hub dataset path (default: its default branch)."
    )
    max_rows: int | None = Field(None, gt=0, description="Use at most the first N rows of this source.")
    weight: float = Field(
        1.0,
        gt=0,
        description="Share in the mix: this source's training rows are repeated by the whole part and sampled "
        "(seeded) by the fraction, e.g. 2 = twice, 0.5 = a random half. Held-out rows are not weighted.",
    )


class DataSpec(Section):
    """Where the training rows come from and how they become tokens."""

    format: Format = Field(
        "alpaca",
        description="Dataset adapter that turns a row into prompt and response. alpaca: instruction/input/output "
        "in Stanford Alpaca's template. goat: Goat arithmetic rows, `{instruction}\\nAnswer: {output}`. lima: "
        "conversations (LIMA's `conversations` list or `messages`) through a chat template. sharegpt: "
        "`conversations` of {from: human|gpt|system, value} turns through a chat template.",
    )
    chat_template: str | None = Field(
        None,
        description="chat formats (lima, sharegpt) only: the tokenizer's own template when null (lima when it has "
        "none), a name (lima, chatml), or a Jinja string. Saved with the trained tokenizer.",
    )
    train_on: Literal["all_assistant_turns", "last_turn"] = Field(
        "all_assistant_turns",
        description="chat formats (lima, sharegpt) only: which assistant turns are trained; user turns never are.",
    )
    path: str | None = Field(
        None,
        description="Local .json (a list of rows, or JSON lines) or .jsonl file, a local dataset folder, or a "
        "datasets hub id (e.g. tatsu-lab/alpaca). Relative paths are relative to the recipe file "
        "(to the current directory when set on the command line). "
        "Required unless data.goat generates the rows.",
    )
    goat: GoatSpec | None = Field(None, description="Generate Goat rows in place of data.path (format: goat).")
    split: str = Field("train", description="Split to read from a hub dataset or dataset folder.")
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit of data.path (and data.eval_path) when it is a hub dataset id; "
        "null: the default branch. The commit read is recorded in the run folder's data.json; ignored for "
        "local files.",
    )
    sources: list[SourceSpec] | None = Field(
        None,
        min_length=1,
        description="Several data sets in one run, each with its own format and path (or goat); replaces "
        "data.format, data.path and data.goat. One chat template serves every chat-format source.",
    )
    eval_path: str | None = Field(None, description="Held-out rows in the same format; excludes eval_fraction.")
    eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of rows held out for eval loss, chosen with train.seed. 0 = no eval. Goat rows are held "
        "out by problem: every phrasing of a held-out problem is held out.",
    )
    dedup: Literal["none", "exact", "normalized"] = Field(
        "none",
        description="Drop repeated samples (prompt + response text). exact: identical text. normalized: equal "
        "after lower-casing and removing punctuation and extra whitespace. Eval rows that repeat a training row "
        "are dropped too, so the eval split never holds training data.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A row the adapter cannot read (missing field, wrong type, turns that do not alternate). "
        "error: stop and name every such row. skip: leave them out, print how many, list them in data.json.",
    )
    cache: bool = Field(
        True,
        description="Reuse tokenized data from $FINETUNE_CACHE_DIR (default ~/.cache/finetune/data), keyed on the "
        "rows, tokenizer, chat template and every data setting.",
    )
    min_tokens: int = Field(0, ge=0, description="Drop samples shorter than this many tokens (0 keeps all).")
    require_digit_split: bool = Field(
        False,
        description="goat only: stop when the tokenizer merges digits (one digit per token is what makes arithmetic "
        "learnable); when false that is only a warning.",
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of the source (quick trials).")
    max_seq_len: int = Field(512, gt=1, description="Longest sample in tokens, prompt + response + EOS.")
    packing: Literal["none", "bfd", "padding_free"] | None = Field(
        None,
        description="How samples share a forward pass. none: padded batches. padding_free: each micro-batch is "
        "concatenated into one row with per-sample position ids, no padding. bfd: samples are first packed "
        "best-fit-decreasing into rows of max_seq_len tokens, then run padding-free. Samples never attend to "
        "each other in either mode. null: padding_free, except for prefix and prompt tuning (none), whose "
        "virtual tokens belong to a row, not to each sample in it.",
    )
    train_on_prompt: bool = Field(
        False, description="Also compute the loss on prompt tokens. Off: only the response and EOS are learned."
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Samples longer than max_seq_len. truncate: cut the end of the response (and its EOS); a row "
        "whose prompt alone fills max_seq_len keeps no response token, so it is dropped and reported. drop: skip "
        "the row and report it. error: stop and name the row.",
    )

    @property
    def formats(self) -> list[str]:
        """The dataset formats this data reads: data.format, or those of data.sources."""
        return sorted({source.format for source in self.sources} if self.sources else {self.format})


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
