"""`finetune tiny-model`: a tiny random model and tokenizer to try recipes on."""

from __future__ import annotations

from finetune.cli.options import add_verb


def add(verbs) -> None:
    tiny = add_verb(
        verbs, "tiny-model", handle, "build a tiny random model + tokenizer to try recipes on", recipe=False
    )
    tiny.add_argument("out", metavar="OUT", help="folder to write")
    from finetune.model.tiny import FAMILIES  # names only: the builders import torch when called

    tiny.add_argument(
        "--family",
        choices=FAMILIES,
        default="llama",
        help="llama (LLaMA-1/2, SentencePiece), llama3 (Llama-3.1, byte-level BPE), mistral, qwen2 (Qwen2.5, "
        "ChatML) (default llama)",
    )
    tiny.add_argument("--corpus", required=True, help="JSON/JSONL rows whose text trains the tokenizer")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64 (default 128)")
    tiny.add_argument("--intermediate-size", type=int, default=256, help="a multiple of 64 (default 256)")
    tiny.add_argument("--init-std", type=float, default=0.1, help="std of the random weights (default 0.1)")


def handle(args) -> int:
    from finetune.data.sources import read_rows
    from finetune.model.tiny import TinyShape, build_tiny
    from finetune.quiet import quiet_libraries

    rows = read_rows(args.corpus).rows
    texts = [value for row in rows for value in row.values() if isinstance(value, str)]
    shape = TinyShape(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        initializer_range=args.init_std,
    )
    with quiet_libraries():
        out = build_tiny(args.family, args.out, texts, seed=args.seed, shape=shape)
    print(f"tiny {args.family} model written to {out}")
    return 0
