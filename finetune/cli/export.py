"""`finetune export`: write what a run trained in a format other tools load."""

from __future__ import annotations

from finetune.artifacts.gguf_quantize import K_QUANTS  # names only: llama_cpp is imported when it quantizes
from finetune.cli.options import add_force_unlock, add_verb


def add(verbs) -> None:
    export = add_verb(
        verbs,
        "export",
        handle,
        "write what a run trained as a clean PEFT folder (adapter), GGUF (gguf) or a folder for Ollama (ollama)",
        recipe=False,
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", required=True, choices=list(FORMATS), help="what to write")
    export.add_argument(
        "--out",
        metavar="PATH",
        help="where to write (default RUN_DIR/export/adapter, RUN_DIR/model-TYPE.gguf, RUN_DIR/export/ollama)",
    )
    export.add_argument(
        "--type",
        choices=["f16", "q8_0", *K_QUANTS],
        default="f16",
        help="gguf, ollama: tensor type (default f16; the k-quants q4_k_m, q5_k_m, q6_k by llama.cpp, which needs "
        "the llama-cpp extra)",
    )
    export.add_argument(
        "--base",
        choices=["original", "dequantized"],
        default="original",
        help="gguf, ollama: the base weights a QLoRA adapter is merged into before conversion, as `finetune merge "
        "--base` (default original; dequantized: the 4-bit weights it trained against)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_force_unlock(export)


def handle(args) -> int:
    from finetune.quiet import quiet_libraries

    with quiet_libraries():
        return FORMATS[args.format](args)


def export_adapter(args) -> int:
    from finetune.artifacts.export import export_adapter

    result = export_adapter(args.run_dir, args.out, overwrite=args.overwrite, force_unlock=args.force_unlock)
    if result.whole_model:
        print("full fine-tuning run (adapter.kind: none): it has no adapter, so the whole model is exported")
    print(f"exported {len(result.files)} files to {result.path}: {', '.join(result.files)}")
    return 0


def export_converted(args) -> int:
    """gguf and ollama: the run's model, merged into --base where it has an adapter, converted to --type."""
    if args.format == "gguf":
        from finetune.artifacts.gguf import export_gguf as export
    else:
        from finetune.artifacts.ollama import export_ollama as export

    export(
        args.run_dir,
        out=args.out,
        quant_type=args.type,
        base_weights=args.base,
        overwrite=args.overwrite,
        force_unlock=args.force_unlock,
    )
    return 0


# --format of `finetune export` -> its handler; a new format is one entry here
FORMATS = {"adapter": export_adapter, "gguf": export_converted, "ollama": export_converted}
