"""`finetune export RUN_DIR --format ollama`: a folder that `ollama create NAME -f DIR/Modelfile` turns into a
model that is prompted as the run trained.

The folder holds the run's GGUF file (artifacts/gguf.py: merged, any --type) and a Modelfile: FROM that
file, the TEMPLATE of the prompt the run trained on (artifacts/ollama_template.py), the SYSTEM message
its chat template writes when a conversation has none, a stop for every end-of-turn and EOS token of the
tokenizer and generation config, and the sampling defaults of `finetune generate` (greedy), with the
context the run trained with (data.max_seq_len). A chat template no Modelfile TEMPLATE reproduces is
refused before anything is merged; the folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, claim_folder, read_trained_recipe, write_folder

Echo = Callable[[str], None]
MODELFILE = "Modelfile"


def export_ollama(
    run_path: str | Path,
    *,
    out: str | Path | None = None,
    quant_type: str = "f16",
    base_weights: str = "original",
    overwrite: bool = False,
    force_unlock: bool = False,
    echo: Echo = print,
) -> Path:
    """Write the run's GGUF file and its Modelfile to the folder `out` (default RUN_DIR/export/ollama); the
    adapter is merged into `base_weights` as `export_gguf` does.

    Raises:
        InputError: the run's prompt cannot be written as a TEMPLATE (several prompt formats, a chat template
            no layout reproduces), or any refusal of the GGUF export; all before anything is merged. `out` is
            not empty without `overwrite`, or is claimed by another command.
    """
    from finetune.artifacts.dequantize import check_base_weights
    from finetune.artifacts.gguf import write_run_gguf
    from finetune.artifacts.gguf_quantize import require_quantizer
    from finetune.lock import claim

    run_dir = RunDir(Path(run_path))
    recipe = read_trained_recipe(run_dir.path)
    target = Path(out) if out is not None else run_dir.path / "export" / "ollama"
    gguf_file = f"model-{quant_type}.gguf"
    modelfile = modelfile_text(run_dir, recipe, gguf_file, echo)
    require_quantizer(quant_type)
    check_base_weights(run_dir.path, recipe, base_weights)
    with claim(target, subject="--out", beside=True, force_unlock=force_unlock, echo=echo):
        claim_folder(target, overwrite=overwrite, key="--out", protect=run_dir)

        def fill(folder: Path) -> None:
            # the GGUF is written into the partial folder; its lines name it where it will be once renamed
            def echo_final(line: str) -> None:
                echo(line.replace(str(folder), str(target)))

            write_run_gguf(
                run_dir,
                recipe,
                folder / gguf_file,
                quant_type,
                base_weights=base_weights,
                overwrite=False,
                echo=echo_final,
            )
            (folder / MODELFILE).write_text(modelfile, encoding="utf-8")

        write_folder(target, fill)
    echo(f"Ollama folder written to {target}: {gguf_file}, {MODELFILE}; ollama create NAME -f {target / MODELFILE}")
    return target


def modelfile_text(run_dir: RunDir, recipe: Recipe, gguf_file: str, echo: Echo) -> str:
    """The Modelfile of a run whose GGUF file is `gguf_file` beside it; reads the run's tokenizer only.

    Raises:
        InputError: the run has no artifact, trained on several prompt formats, or with a chat template no
            Modelfile TEMPLATE reproduces.
    """
    from finetune.data.formats import CHAT, FORMATS, prompt_format
    from finetune.eval.generate import Sampling  # `finetune generate`'s defaults, which the Modelfile repeats

    tokenizer, artifact = run_tokenizer(run_dir, recipe)
    formats = sorted({prompt_format(name) for name in recipe.data.formats})
    if len(formats) > 1:
        raise InputError(
            f"data.sources: the run trained on several prompt formats ({', '.join(formats)}) and a Modelfile has "
            "one TEMPLATE; export --format gguf and write the Modelfile by hand"
        )
    system, end_of_turn = None, None
    if formats[0] == CHAT:
        # the run saved the template it trained with in its tokenizer; the recipe's key names where it came from
        where = "data.chat_template" if recipe.data.chat_template else f"{artifact}/chat_template.jinja"
        template, system, end_of_turn = chat_template_parts(tokenizer, where, echo)
    else:
        from finetune.artifacts.ollama_template import prompt_go_template

        template = prompt_go_template(FORMATS[formats[0]].format_prompt)
    sampling = Sampling()
    parameters = [
        ("temperature", sampling.temperature),
        ("top_k", sampling.top_k),
        ("top_p", sampling.top_p),
        ("repeat_penalty", 1),  # generate applies none; Ollama's default is 1.1
        ("num_predict", sampling.max_new_tokens),
        ("num_ctx", recipe.data.max_seq_len),
    ]
    stops = stop_tokens(tokenizer, generation_eos_ids(recipe, artifact), end_of_turn)
    lines = [
        f"# {run_dir.path.name}, trained with finetune; load it with: ollama create NAME -f {MODELFILE}",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template}"""',
        *([f'SYSTEM """{system}"""'] if system else []),
        *(f"PARAMETER {name} {number(value)}" for name, value in parameters),
        *(f'PARAMETER stop "{stop}"' for stop in stops),
    ]
    return "\n".join(lines) + "\n"


def run_tokenizer(run_dir: RunDir, recipe: Recipe):
    """(tokenizer, folder) of the run's trained artifact: its tokenizer holds the chat template trained with.

    Raises:
        InputError: the run has no finished artifact.
    """
    from transformers import AutoTokenizer

    from finetune.model.methods import method_of

    artifact = run_dir.path / method_of(recipe.adapter).artifact_folder
    if not artifact.is_dir():
        raise InputError(f"{run_dir.path}: has no {artifact.name}/; did the run finish?")
    return AutoTokenizer.from_pretrained(artifact), artifact


def chat_template_parts(tokenizer, where: str, echo: Echo) -> tuple[str, str | None, str | None]:
    """(TEMPLATE, default SYSTEM, end-of-turn token) for the chat template of `tokenizer` (lima's when it has
    none, as training used).

    Raises:
        InputError: naming `where` (the recipe key or file of the template), when no Modelfile TEMPLATE
            reproduces the chat template.
    """
    from finetune.artifacts.ollama_template import Untranslatable, chat_go_template, read_layout
    from finetune.data.templates import end_of_turn_token, resolve_chat_template

    _, template = resolve_chat_template(None, tokenizer)

    def render(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )

    try:
        layout = read_layout(render, tokenizer.bos_token)
    except Untranslatable as error:
        raise InputError(
            f"{where}: the chat template cannot be written as an Ollama TEMPLATE: {error}; export --format gguf "
            "and write the Modelfile's TEMPLATE by hand"
        ) from None
    if layout.writes_bos != (tokenizer.bos_token_id is not None):
        echo(
            "note: the chat template does not begin with BOS but llama.cpp adds it (the tokenizer has one), so "
            "Ollama's prompts begin with one token more than the training text"
        )
    return chat_go_template(layout), layout.default_system, end_of_turn_token(tokenizer, template)


def generation_eos_ids(recipe: Recipe, artifact: Path) -> list[int]:
    """The EOS ids of the generation config (Llama-3 lists three): the whole model's, else the base's."""
    from transformers import GenerationConfig

    from finetune.model.load import resolve_source

    spec = recipe.model
    source = artifact if (artifact / "generation_config.json").is_file() else resolve_source(spec.name_or_path)
    try:
        config = GenerationConfig.from_pretrained(source, revision=None if source == artifact else spec.revision)
    except OSError:  # a base without generation_config.json: the tokenizer's EOS stands alone
        return []
    listed = config.eos_token_id
    return list(listed) if isinstance(listed, list | tuple) else [] if listed is None else [listed]


def stop_tokens(tokenizer, eos_ids: list[int], end_of_turn: str | None) -> list[str]:
    """Every token generation stops at, as `finetune generate` stops: the generation config's EOS ids, the
    tokenizer's EOS and the chat template's end-of-turn token."""
    ids = [*eos_ids, tokenizer.eos_token_id]
    names = [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None] + [end_of_turn]
    return [name for name in dict.fromkeys(names) if name]


def number(value: float) -> str:
    """0.0 -> 0, 1.0 -> 1, 0.9 -> 0.9: how Modelfiles write parameters."""
    return str(int(value)) if float(value).is_integer() else str(value)
