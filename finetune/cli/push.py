"""`finetune push`: upload a run's adapter, merged model or GGUF files to a hub repo."""

from __future__ import annotations

from finetune.cli.options import add_verb


def add(verbs) -> None:
    push = add_verb(
        verbs, "push", handle, "upload a run's adapter, merged model or GGUF file to a hub repo", recipe=False
    )
    push.add_argument("run_dir", metavar="RUN_DIR")
    push.add_argument("--repo-id", required=True, help="namespace/name; created if missing")
    what = push.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true", help="upload RUN_DIR/merged (from finetune merge)")
    what.add_argument(
        "--gguf", action="store_true", help="upload RUN_DIR/model-*.gguf (from finetune export --format gguf)"
    )
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if missing (default main)")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload nothing")


def handle(args) -> int:
    from finetune.artifacts.hub import push

    push(
        args.run_dir,
        args.repo_id,
        merged=args.merged,
        gguf=args.gguf,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
    )
    return 0
