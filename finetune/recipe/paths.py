"""Where the paths of a recipe point: relative to the recipe file, or to the current directory for overrides.

A recipe can then be run from any directory, and the resolved recipe a run folder stores holds absolute
paths, so the folder describes itself wherever it is read from. Hub ids (`huggyllama/llama-7b`,
`tatsu-lab/alpaca`) are left as they are: a name is a path when it starts with `.`, `/` or `~`, ends
in `.json`/`.jsonl`, has more than one `/`, or names something that exists.
"""

from __future__ import annotations

from pathlib import Path

LOCAL_DATA_SUFFIXES = (".json", ".jsonl")

# (section, key) of every value that may be a local path; output.dir always is one
PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("data", "path"), ("data", "eval_path"))


def looks_local(name: str, base: Path | None = None) -> bool:
    """True when `name` is meant as a file or folder on this machine rather than a hub id."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(LOCAL_DATA_SUFFIXES)
        or name.count("/") > 1
        or (base or Path.cwd()).joinpath(Path(name).expanduser()).exists()
    )


def absolute(name: str, base: Path) -> str:
    return str((base / Path(name).expanduser()).resolve())


def resolve_paths(raw: dict, recipe_dir: Path, from_command_line: set[tuple[str, ...]]) -> None:
    """Make every local path of the raw recipe absolute, in place.

    Args:
        raw: the recipe mapping, overrides applied.
        recipe_dir: the folder of the recipe file: the base of the paths written in it.
        from_command_line: key paths set by overrides; paths in them (or under them) are relative to the
            current directory.
    """
    for key_path, container, key in _path_values(raw):
        set_on_command_line = any(key_path[:n] in from_command_line for n in range(1, len(key_path) + 1))
        base = Path.cwd() if set_on_command_line else recipe_dir
        value = container[key]
        if key_path == ("output", "dir") or looks_local(value, base):
            container[key] = absolute(value, base)


def _path_values(raw: dict):
    """(key path, the mapping holding it, key) of each string value that may be a path."""
    sections = {name: raw.get(name) for name in ("model", "data", "output")}
    for section, key in (*PATH_KEYS, ("output", "dir")):
        values = sections.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            yield (section, key), values, key
    data = sections["data"]
    sources = data.get("sources") if isinstance(data, dict) else None
    for i, source in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            yield ("data", "sources", str(i), "path"), source, "path"
