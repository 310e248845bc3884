"""Tokenized data cached on disk, under a key that covers everything the tokens depend on.

The key hashes the source rows' fingerprint, the commits of hub datasets read, the whole tokenizer
(vocabulary, merges, normalizer, special tokens: its content, so a tokenizer commit that changes
nothing in it still hits), the chat template, every data setting, the split seed and the finetune
version, so a change to any of them is a miss. Entries are JSON: readable, and nothing in them runs
code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

from finetune import __version__
from finetune.data.tokenize import Sample
from finetune.recipe.schema import DataSpec
from finetune.run_folder import write_atomically

SAMPLE_FIELDS = fields(Sample)

CACHE_ENV = "FINETUNE_CACHE_DIR"
# Raised whenever the same rows and settings would give different samples; older entries then miss.
# 2: Goat rows are held out by problem. 3: a chat template's trained span ends at its end-of-turn token.
SAMPLES_REVISION = 3


def cache_dir() -> Path:
    """$FINETUNE_CACHE_DIR, else ~/.cache/finetune/data."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "finetune" / "data")


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + described + specials).encode()).hexdigest()


def cache_key(
    spec: DataSpec, source_sha256: str, tokenizer, template: str | None, seed: int, commits: tuple[str, ...] = ()
) -> str:
    parts = {
        "source": source_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "data": settings_of(spec),
        "seed": seed,
        "finetune": __version__,
        "revision": SAMPLES_REVISION,
    }
    if commits:  # only hub data has them: keys of local data stay as they were
        parts["hub_commits"] = list(commits)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def settings_of(spec: DataSpec) -> dict:
    """Every data setting but the hub revisions: the commits they resolved to are in the key instead, so a
    branch and the commit it points at share their entries."""
    settings = spec.model_dump(mode="json", exclude={"revision"})
    for source in settings["sources"] or []:
        source.pop("revision")
    return settings


def load(key: str) -> dict | None:
    """The cached payload for `key`, or None (absent or unreadable: the data is simply rebuilt)."""
    path = cache_dir() / f"{key}.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    payload["train"] = [Sample(**s) for s in payload["train"]]
    payload["eval"] = [Sample(**s) for s in payload["eval"]]
    return payload


def as_json(sample: Sample) -> dict:
    """A sample's fields as they are: `dataclasses.asdict` deep-copies every token id list, which cost more
    than tokenizing."""
    return {field.name: getattr(sample, field.name) for field in SAMPLE_FIELDS}


def store(key: str, payload: dict) -> None:
    """Write atomically; a cache that cannot be written is skipped, never an error."""
    folder = cache_dir()
    try:
        partial = folder / f"{key}.json.{os.getpid()}.partial"  # processes of one launch write alike
        samples = {split: [as_json(s) for s in payload[split]] for split in ("train", "eval")}
        text = json.dumps({**payload, **samples})
        write_atomically(folder / f"{key}.json", lambda path: path.write_text(text, encoding="utf-8"), partial=partial)
    except OSError:
        pass
