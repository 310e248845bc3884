"""The model card (README.md) of an exported or pushed run, written from the run folder alone.

The YAML front matter is what the hub indexes: `library_name` (peft for an adapter, transformers for a
whole model, gguf for llama.cpp files), `base_model` only when the base is a hub id (a local path means
nothing to a reader of the hub), tags, and the hub datasets the run read. The body holds the method, the
key hyper-parameters, the final metrics and the full resolved recipe, so the card reproduces the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml

from finetune.model.methods import method_of, run_method_name
from finetune.recipe.checks import looks_local
from finetune.recipe.schema import Recipe

Library = Literal["peft", "transformers", "gguf"]


def write_card(
    run_path: Path, target: Path, *, library: Library, files: list[str] = (), served: Path | None = None
) -> None:
    """Write the model card of the run at `run_path` to `target` (a README.md).

    Args:
        files: the GGUF files the card describes (library gguf).
        served: the local folder a whole model's serving commands name (None: a hub repo, THIS_REPO).

    Raises:
        InputError: `run_path` is not a run folder, or its recipe no longer loads.
    """
    target.write_text(model_card(run_path, library=library, files=files, served=served), encoding="utf-8")


def model_card(run_path: Path, *, library: Library, files: list[str] = (), served: Path | None = None) -> str:
    """The README.md text: front matter, then method, hyper-parameters, metrics and the recipe.

    Raises:
        InputError: `run_path` is not a run folder, or its recipe no longer loads.
    """
    from finetune.run_folder import read_recipe, read_run

    recipe = read_recipe(run_path)
    run = read_run(run_path)
    recipe_text = run_path.joinpath("recipe.yaml").read_text(encoding="utf-8")
    body = [
        f"# {run.name}",
        "",
        describe(recipe, run_method_name(run.recipe), library),
        "",
        "## Hyper-parameters",
        "",
        *table(hyper_parameters(recipe)),
        "",
        "## Final metrics",
        "",
        *table(final_metrics(run.summary, run.exact_match)),
        "",
        "## Use",
        "",
        gguf_usage(recipe, files) if library == "gguf" else usage(recipe, library),
        "",
        *([serving(recipe, served), ""] if library == "transformers" else []),
        "## Recipe",
        "",
        f"The resolved recipe, every default filled in (also `recipe.yaml` in this folder), trained with "
        f"finetune {toolkit_version(run_path)}:",
        "",
        "```yaml",
        recipe_text.rstrip("\n"),
        "```",
        "",
    ]
    return front_matter(recipe, library) + "\n".join(body)


def front_matter(recipe: Recipe, library: Library) -> str:
    """The card's YAML header between `---` lines."""
    meta: dict = {"library_name": library}
    if is_hub_id(recipe.model.name_or_path):
        meta["base_model"] = recipe.model.name_or_path
    meta["tags"] = ["finetune", *method_tags(recipe), *recipe.data.formats, *(["gguf"] if library == "gguf" else [])]
    datasets = hub_datasets(recipe)
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def is_hub_id(name: str | None) -> bool:
    return name is not None and not looks_local(name)


def method_tags(recipe: Recipe) -> list[str]:
    """Tags naming the method, as its adapter kind's method gives them (e.g. lora + qlora, ia3, prefix-tuning)."""
    return method_of(recipe.adapter).tags(recipe.adapter, recipe.quant.bits if recipe.quant else None)


def hub_datasets(recipe: Recipe) -> list[str]:
    """The data sets the run read from the hub (local files and generated rows are not listed)."""
    data = recipe.data
    paths = [source.path for source in data.sources] if data.sources else [data.path]
    paths.append(data.eval_path)
    return list(dict.fromkeys(path for path in paths if is_hub_id(path)))


def describe(recipe: Recipe, method: str, library: Library) -> str:
    base = recipe.model.name_or_path
    base_text = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}` (a local folder)"
    what = {"peft": "A PEFT adapter", "transformers": "A whole model", "gguf": "A whole model in GGUF"}[library]
    if recipe.adapter.kind == "none":
        how = "fully fine-tuned from"
    elif library != "peft":
        how = "with the adapter merged into the weights of"
    else:
        how = "for"
    return f"{what} ({method}) {how} {base_text}, trained on {', '.join(recipe.data.formats)} data with `finetune`."


def hyper_parameters(recipe: Recipe) -> list[tuple[str, object]]:
    """The keys that decide the result most, as (name, value) rows; the recipe below has every key."""
    adapter = recipe.adapter.model_dump()
    adapter.pop("kind")
    train = recipe.train
    rows = [("adapter.kind", recipe.adapter.kind), *((f"adapter.{k}", v) for k, v in adapter.items())]
    if recipe.quant is not None:
        rows += [(f"quant.{k}", v) for k, v in recipe.quant.model_dump().items()]
    rows += [
        ("train.lr", train.lr),
        ("train.lr_scheduler", train.lr_scheduler),
        ("train.epochs" if train.max_steps is None else "train.max_steps", train.max_steps or train.epochs),
        ("train.micro_batch_size x grad_accum", f"{train.micro_batch_size} x {train.grad_accum}"),
        ("train.optimizer", train.optimizer),
        ("train.weight_decay", train.weight_decay),
        ("train.seed", train.seed),
        ("data.max_seq_len", recipe.data.max_seq_len),
    ]
    return rows


def final_metrics(summary: dict, exact_match: float | None) -> list[tuple[str, object]]:
    """What the run ended with, from summary.json and eval.json."""
    rows = [
        ("status", summary.get("status", "unknown")),
        ("steps", summary.get("steps")),
        ("first train loss", _round(summary.get("first_train_loss"))),
        ("last train loss", _round(summary.get("last_train_loss"))),
        ("eval loss", _round(summary.get("eval_loss"))),
        ("exact match (held-out problems)", f"{exact_match:.1%}" if exact_match is not None else None),
        ("tokens seen (padding excluded)", summary.get("tokens_seen")),
        ("trainable parameters", summary.get("trainable_params")),
        ("wall time (s)", summary.get("wall_time_s")),
    ]
    return [(name, value) for name, value in rows if value is not None]


def usage(recipe: Recipe, library: Library) -> str:
    base = recipe.model.name_or_path if is_hub_id(recipe.model.name_or_path) else "BASE_MODEL_FOLDER"
    if library == "transformers":
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("THIS_REPO_OR_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_REPO_OR_FOLDER")',
        ]
    else:
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "THIS_REPO_OR_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_REPO_OR_FOLDER")',
        ]
    return "\n".join(["```python", *code, "```"])


def serving(recipe: Recipe, folder: Path | None) -> str:
    """How vLLM and text-generation-inference serve the whole model: the local `folder`, or this hub repo."""
    from finetune.data.formats import uses_chat_template

    chat = uses_chat_template(recipe.data.formats)
    model = str(folder) if folder is not None else "THIS_REPO"
    vllm = f"vllm serve {model}"
    if chat and folder is not None:  # the template the run trained with (saved with its tokenizer), named outright
        vllm += f" --chat-template {folder / 'chat_template.jinja'}"
    mount = f"-v {folder}:/data " if folder is not None else ""
    lines = [
        "## Serve",
        "",
        "With [vLLM](https://docs.vllm.ai) (an OpenAI-compatible server on port 8000) or "
        "[text-generation-inference](https://huggingface.co/docs/text-generation-inference) (port 8080):",
        "",
        "```bash",
        vllm,
        f"docker run --gpus all --shm-size 1g -p 8080:80 {mount}ghcr.io/huggingface/text-generation-inference "
        f"--model-id {'/data' if folder is not None else model}",
        "```",
        "",
    ]
    prompt = example_prompt(recipe)
    if chat:
        lines.append("Their chat endpoints (`/v1/chat/completions`) apply the chat template the run trained with.")
    elif prompt:
        lines.append(
            "The run trained on prompts, not chats: send the prompt it trained with to the completions endpoint "
            f"(`/v1/completions`, or TGI's `/generate`), e.g. {json.dumps(prompt)}."
        )
    return "\n".join(lines).rstrip("\n")


def gguf_usage(recipe: Recipe, files: list[str]) -> str:
    """How llama.cpp runs the GGUF files, prompted with the template the run trained with."""
    name = files[0] if files else "MODEL.gguf"
    prompt = example_prompt(recipe)
    ask = f"-e -p {json.dumps(prompt)}" if prompt else "-cnv"  # -e: the prompt's \n are newlines
    lines = [
        f"With [llama.cpp](https://github.com/ggml-org/llama.cpp), from this repo ({', '.join(files) or name}):",
        "",
        "```bash",
        f"llama-cli --hf-repo THIS_REPO --hf-file {name} -n 256 {ask}",
        f"llama-cli -m {name} -n 256 {ask}   # a downloaded file",
        f"llama-server -m {name}   # an OpenAI-compatible server on port 8080",
        "```",
    ]
    if prompt:
        lines += ["", f"The prompt is the template the model was trained with ({', '.join(recipe.data.formats)})."]
    return "\n".join(lines)


def example_prompt(recipe: Recipe) -> str | None:
    """A prompt in the run's training template (None for conversations, which llama.cpp's chat mode renders,
    and for a mix of formats)."""
    from finetune.data.formats import FORMATS

    formats = recipe.data.formats
    format_prompt = FORMATS[formats[0]].format_prompt if len(formats) == 1 else None
    return format_prompt("Give three tips for staying healthy.", "") if format_prompt else None


def table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| key | value |", "|---|---|", *(f"| {name} | {_cell(value)} |" for name, value in rows)]


def toolkit_version(run_path: Path) -> str:
    """The finetune version the run was trained with (environment.json), else this one."""
    from finetune import __version__

    environment = run_path / "environment.json"
    if environment.is_file():
        trained = json.loads(environment.read_text(encoding="utf-8")).get("packages", {}).get("finetune")
        if trained:
            return trained
    return __version__


def _cell(value: object) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text.replace("|", "\\|")


def _round(value: float | None) -> float | None:
    return round(value, 4) if isinstance(value, float) else value


def read_front_matter(card: str) -> dict:
    """The YAML header of a card (empty when it has none).

    >>> read_front_matter("---\\nlibrary_name: peft\\n---\\n# x")
    {'library_name': 'peft'}
    """
    if not card.startswith("---\n"):
        return {}
    header, _, _ = card[4:].partition("\n---")
    return yaml.safe_load(header) or {}
