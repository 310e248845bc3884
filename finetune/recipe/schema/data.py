"""The data section: where training rows come from and how they become tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.recipe.schema.section import Section


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
