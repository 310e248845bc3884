"""`finetune generate`: answer prompts with a run or a model folder."""

from __future__ import annotations

from finetune.cli.options import add_verb


def add(verbs) -> None:
    gen = add_verb(verbs, "generate", handle, "answer prompts with a trained run or a model folder", recipe=False)
    gen.add_argument("target", metavar="RUN_DIR|MODEL_DIR", help="a run folder, an exported or merged folder")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (the instruction)")
    source.add_argument("--file", help="one prompt per line: text, or JSON with instruction and optional input")
    gen.add_argument(
        "--format",
        choices=["alpaca", "goat", "chat", "raw"],
        help="prompt template (default: the run's data format; for a folder without recipe.yaml, chat when "
        "the tokenizer has a chat template, else raw)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=256, help="default 256; stops earlier at EOS")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    gen.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (default 50; 0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass (default 1)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, set before each prompt (default 0)")


def handle(args) -> int:
    from finetune.eval.generate import Sampling, generate
    from finetune.eval.prompts import read_prompts
    from finetune.quiet import quiet_libraries

    rows = read_prompts(args.prompt, args.file)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    with quiet_libraries():
        generate(args.target, rows, sampling, prompt_format=args.format)
    return 0
