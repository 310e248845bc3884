"""Checks that involve more than one key, or the files a recipe names.

They run before any weight is loaded. Each names the key the user should change; `recipe/load.py`
turns the key into a file position. Paths are absolute by then (`recipe/paths.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetune.recipe.paths import LOCAL_DATA_SUFFIXES, looks_local
from finetune.recipe.schema import Recipe

__all__ = ["KeyProblem", "check_paths", "cross_check", "looks_local"]


@dataclass(frozen=True)
class KeyProblem:
    path: tuple[str, ...]
    message: str
    hint: str = ""


def check_paths(raw: dict) -> list[KeyProblem]:
    """Local files and folders the recipe names must exist. Works on the raw mapping, so these are
    reported together with schema errors elsewhere in the recipe."""
    section = lambda name: raw.get(name) if isinstance(raw.get(name), dict) else {}  # noqa: E731
    data = section("data")
    if isinstance(data.get("sources"), list):
        problems = _check_sources(data)
    elif "data" in raw:
        problems = _check_single_source(data)
    else:
        problems = []
    for key in ("name_or_path", "tokenizer"):
        value = section("model").get(key)
        if isinstance(value, str) and looks_local(value) and not Path(value).expanduser().is_dir():
            problems.append(
                KeyProblem(
                    ("model", key),
                    f"no such folder: {value}",
                    "give a local model folder or a hub id such as huggyllama/llama-7b",
                )
            )
    return problems


def cross_check(recipe: Recipe) -> list[KeyProblem]:
    """Combinations of keys that cannot work together."""
    problems = []
    train, data = recipe.train, recipe.data
    if train.warmup_ratio is not None and train.warmup_steps is not None:
        problems.append(KeyProblem(("train", "warmup_steps"), "set either warmup_steps or warmup_ratio, not both"))
    if train.min_lr is not None and train.lr_scheduler not in ("linear", "cosine"):
        problems.append(
            KeyProblem(("train", "min_lr"), f"applies to linear and cosine schedules, not {train.lr_scheduler}")
        )
    if train.min_lr is not None and train.min_lr >= train.lr:
        problems.append(KeyProblem(("train", "min_lr"), f"must be below train.lr ({train.lr:g})"))
    output = Path(recipe.output.dir).expanduser().resolve()
    if output in (Path("/"), Path.home().resolve()):
        problems.append(
            KeyProblem(
                ("output", "dir"),
                f"must not be {output}: a run folder is emptied by --overwrite",
                "choose a folder of its own, e.g. runs/NAME",
            )
        )
    problems += _check_batch_sizing(train)
    model = recipe.model
    if model.tokenizer_revision is not None and model.tokenizer in (None, model.name_or_path):
        problems.append(
            KeyProblem(
                ("model", "tokenizer_revision"),
                "applies to a separate model.tokenizer repo; this recipe reads the tokenizer from model.name_or_path",
                "use model.revision",
            )
        )
    if data.eval_path is not None and data.eval_fraction > 0:
        problems.append(KeyProblem(("data", "eval_fraction"), "set either eval_fraction or eval_path, not both"))
    if data.goat is not None and data.goat.div_divisor_digits > data.goat.div_dividend_digits:
        problems.append(
            KeyProblem(("data", "goat", "div_divisor_digits"), "must not exceed data.goat.div_dividend_digits")
        )
    if recipe.eval.exact_match and "goat" not in data.formats:
        problems.append(
            KeyProblem(
                ("eval", "exact_match"),
                f"scores Goat arithmetic answers; this recipe's data is {', '.join(data.formats)}",
                "remove it (eval loss is logged with data.eval_fraction or data.eval_path)",
            )
        )
    # what an adapter kind cannot train with is part of its meaning, held by its method (light: no peft import)
    from finetune.model.methods import method_of

    problems += method_of(recipe.adapter).check(recipe)
    return problems


def parse_memory_size(text: str) -> int:
    """'24GiB', '48GB', '80G', '1.5TiB' -> bytes (GB means 10^9; GiB and a bare G mean 2^30).

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([TGM]i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB)")
    unit = match[2].upper()
    power = "MGT".index(unit[0]) + 2
    factor = 1000**power if unit.endswith("B") and "I" not in unit else 1024**power
    return int(float(match[1]) * factor)


PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_fsdp(recipe: Recipe, precision: str) -> list[KeyProblem]:
    """What FSDP cannot shard: 8-bit weights, and 4-bit weights stored in a dtype other than the compute dtype.

    Args:
        recipe: the validated recipe.
        precision: the run's resolved precision (bf16, fp16 or fp32).
    """
    quant = recipe.quant
    if quant is None:
        return []
    if quant.bits == 8:
        return [
            KeyProblem(
                ("quant", "bits"),
                "FSDP cannot shard 8-bit (LLM.int8) weights",
                "use quant.bits: 4 with quant.storage_dtype set to the compute dtype",
            )
        ]
    compute = PRECISION_DTYPES[precision] if quant.compute_dtype == "auto" else quant.compute_dtype
    if quant.storage_dtype == compute:
        return []
    return [
        KeyProblem(
            ("quant", "storage_dtype"),
            f"FSDP shards tensors of one dtype: the 4-bit weights must be stored as the compute dtype {compute} "
            f"(bnb_4bit_quant_storage), not {quant.storage_dtype}",
            f"set quant.storage_dtype: {compute}",
        )
    ]


def _check_batch_sizing(train) -> list[KeyProblem]:
    problems = []
    if isinstance(train.micro_batch_size, int) and train.micro_batch_size <= 0:
        problems.append(
            KeyProblem(("train", "micro_batch_size"), f"must be greater than 0 or auto (got {train.micro_batch_size})")
        )
    if train.gpu_memory is not None:
        try:
            parse_memory_size(train.gpu_memory)
        except ValueError as e:
            problems.append(KeyProblem(("train", "gpu_memory"), str(e)))
    if train.tokens_per_update is not None and "grad_accum" in train.model_fields_set:
        problems.append(
            KeyProblem(
                ("train", "grad_accum"),
                "train.tokens_per_update sets grad_accum; set one of them, not both",
                "remove grad_accum (or tokens_per_update)",
            )
        )
    if train.gpu_memory is not None and train.micro_batch_size != "auto":
        problems.append(
            KeyProblem(
                ("train", "gpu_memory"),
                f"only sizes micro_batch_size: auto; this recipe fixes micro_batch_size: {train.micro_batch_size}",
                "set train.micro_batch_size: auto, or remove gpu_memory (finetune plan takes --gpu-memory)",
            )
        )
    return problems


def _check_single_source(data: dict) -> list[KeyProblem]:
    problems = []
    if data.get("path") is None and data.get("goat") is None:
        problems.append(
            KeyProblem(
                ("data", "path"),
                "required key is missing",
                "expected: a .json/.jsonl file, dataset folder or hub id (or data.goat to generate Goat rows)",
            )
        )
    if data.get("path") is not None and data.get("goat") is not None:
        problems.append(KeyProblem(("data", "goat"), "set either data.path or data.goat, not both"))
    if data.get("goat") is not None and data.get("format", "alpaca") != "goat":
        problems.append(KeyProblem(("data", "goat"), "generates Goat rows, so it needs data.format: goat"))
    for key in ("path", "eval_path"):
        value = data.get(key)
        if isinstance(value, str):
            problems += _check_data_source(key, value)
    return problems


def _check_sources(data: dict) -> list[KeyProblem]:
    problems = [
        KeyProblem(("data", key), "data.sources replaces it; set it on each source")
        for key in ("path", "goat", "format")
        if data.get(key) is not None
    ]
    if data.get("eval_path") is not None:
        problems.append(KeyProblem(("data", "eval_path"), "with data.sources, hold rows out with data.eval_fraction"))
    for i, source in enumerate(data["sources"]):
        if not isinstance(source, dict):
            continue
        if source.get("path") is None and source.get("goat") is None:
            problems.append(KeyProblem(("data", "sources", str(i)), "needs a path (or goat to generate rows)"))
        elif source.get("path") is not None and source.get("goat") is not None:
            problems.append(KeyProblem(("data", "sources", str(i), "goat"), "set either path or goat, not both"))
        elif source.get("goat") is not None and source.get("format", "alpaca") != "goat":
            problems.append(KeyProblem(("data", "sources", str(i), "goat"), "generates Goat rows: format: goat"))
        if isinstance(source.get("path"), str):
            problems += [
                KeyProblem(("data", "sources", str(i), "path"), p.message, p.hint)
                for p in _check_data_source("path", source["path"])
            ]
    return problems


def _check_data_source(key: str, value: str | None) -> list[KeyProblem]:
    if value is None or not looks_local(value):
        return []
    path = Path(value).expanduser()
    if not path.exists():
        return [KeyProblem(("data", key), f"no such file: {value}")]
    if path.is_file() and not value.endswith(LOCAL_DATA_SUFFIXES):
        return [KeyProblem(("data", key), f"unsupported file type: {value}", "use a .json or .jsonl file")]
    return []
