"""`finetune merge`: fold an adapter into its base weights."""

from __future__ import annotations

from finetune.cli.options import add_force_unlock, add_verb


def add(verbs) -> None:
    merge = add_verb(
        verbs,
        "merge",
        handle,
        "fold a LoRA or IA3 run's adapter into its base weights: a plain transformers folder",
        recipe=False,
    )
    merge.add_argument("run_dir", metavar="RUN_DIR")
    merge.add_argument("--out", metavar="DIR", help="folder to write (default RUN_DIR/merged)")
    merge.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weight dtype (default the base checkpoint's: a bf16 base gives a bf16 merge)",
    )
    merge.add_argument(
        "--base",
        dest="base_weights",
        choices=["original", "dequantized"],
        default="original",
        help="base weights a QLoRA adapter is folded into: the checkpoint's 16-bit ones (default), or the 4-bit "
        "ones it trained against, dequantized, which keeps the model as trained",
    )
    merge.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to merge (default cpu)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_force_unlock(merge)
    merge.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing the merged model's logits with the adapter model's",
    )


def handle(args) -> int:
    from finetune.artifacts.merge import merge_run
    from finetune.quiet import quiet_libraries

    with quiet_libraries():
        merge_run(
            args.run_dir,
            out=args.out,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
            verify=args.verify,
            force_unlock=args.force_unlock,
            base_weights=args.base_weights,
        )
    return 0
