"""The adapter section: one spec per adapter.kind, told apart by that key (LoRA when it is left out)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Discriminator, Field, Tag

from finetune.recipe.schema.section import Section


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
