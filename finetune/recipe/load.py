"""YAML recipe + `a.b.c=value` overrides -> a validated `Recipe`, or every problem at once.

Each problem points at the place to fix: `FILE:LINE:COL` for keys in the file (PyYAML keeps a mark on
every node), `command line` for overrides.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import Problem, RecipeError
from finetune.recipe.checks import check_paths, cross_check
from finetune.recipe.paths import resolve_paths
from finetune.recipe.renamed import refuse_old_keys, upgrade_record
from finetune.recipe.schema import ADAPTER_SPECS, Recipe

KeyPath = tuple[str, ...]


@dataclass
class Origins:
    """Where each key of the raw recipe came from, so a problem can be reported there."""

    file: str
    key_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    value_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    overrides: dict[KeyPath, str] = field(default_factory=dict)

    def locate(self, path: KeyPath, *, at_value: bool = True) -> tuple[str, str]:
        """(where, subject) for the key at `path`, or for its closest located ancestor."""
        marks = self.value_marks if at_value else self.key_marks
        if path not in self.overrides and path not in marks:
            for item_path, item in self.overrides.items():
                if item_path[: len(path)] == path:  # only the command line has keys under this one
                    return "command line", item
        for n in range(len(path), -1, -1):  # an override replaces what the file had under its key
            if path[:n] in self.overrides:
                item = self.overrides[path[:n]]
                return "command line", item if n == len(path) else f"{item}: {'.'.join(path)}"
        for n in range(len(path), -1, -1):
            prefix = path[:n]
            mark = marks.get(prefix) or self.key_marks.get(prefix)
            if mark is not None:
                line, col = mark
                return f"{self.file}:{line}:{col}", ".".join(path)
        return self.file, ".".join(path)


def load_recipe(
    path: str | Path, overrides: list[str] = (), *, check_files: bool = True, record: bool = False
) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings; values are parsed as YAML (`3`, `true`, `[a, b]`).
        check_files: require the local files and folders the recipe names to exist (off for the record
            of a finished run, whose relative paths may be read from another directory).
        record: `path` is a run folder's recipe.yaml: keys an older version wrote are read in their current
            form (recipe/renamed.py); in any other recipe they are refused, saying what replaces them.

    Raises:
        RecipeError: with every problem found, each located in the file or on the command line.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([Problem(path, "", f"cannot read the recipe ({e.__class__.__name__}: {e})")]) from None
    origins = Origins(file=path)
    raw, problems = parse_yaml(text, origins)
    if raw is None:
        raise RecipeError(problems)
    if record:
        upgrade_record(raw)
    problems += apply_overrides(raw, overrides, origins)
    key_problems = refuse_old_keys(raw)
    resolve_paths(raw, Path(path).absolute().parent, set(origins.overrides))
    recipe, schema_problems = validate(raw, origins)
    problems += schema_problems
    key_problems += (check_paths(raw) if check_files else []) + (cross_check(recipe) if recipe is not None else [])
    problems += [Problem(*origins.locate(p.path), p.message, p.hint) for p in key_problems]
    if problems:
        raise RecipeError(sorted(problems, key=_reading_order))
    return recipe


def _reading_order(problem: Problem) -> tuple[bool, int, int]:
    """File problems top to bottom, then command-line problems in the order given."""
    position = re.search(r":(\d+):(\d+)$", problem.where)
    line, col = (int(position[1]), int(position[2])) if position else (0, 0)
    return (problem.where == "command line", line, col)


def parse_yaml(text: str, origins: Origins) -> tuple[dict | None, list[Problem]]:
    """YAML text -> plain dict, recording the line and column of every key and value."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, [Problem(origins.file, "", "the recipe is empty")]
        problems = _record_marks(node, (), origins)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{origins.file}:{mark.line + 1}:{mark.column + 1}" if mark else origins.file
        return None, [Problem(where, "", _plain_yaml_problem(e.problem or e.context))]
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        return None, [
            Problem(f"{origins.file}:1:1", "", "the recipe must be a mapping of sections (model:, data:, ...)")
        ]
    return data, problems


def _plain_yaml_problem(problem: str) -> str:
    """PyYAML's parser words, where they say little to a reader, in plain ones."""
    if "could not determine a constructor for the tag" in problem:  # safe loading: no Python objects
        tag = problem.rsplit(" ", 1)[-1]
        return f"YAML tag {tag} is not allowed: a recipe holds plain values (strings, numbers, lists, mappings)"
    if "expected <block end>" in problem:
        problem = "this line is indented differently from the keys above it"
    elif "'\\t'" in problem:
        problem = "a tab character; indent with spaces"
    return f"YAML syntax error: {problem}"


def _record_marks(node: yaml.Node, path: KeyPath, origins: Origins) -> list[Problem]:
    problems = []
    origins.value_marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            key_path = path + (key,)
            line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key in seen:
                problems.append(
                    Problem(
                        f"{origins.file}:{line}:{col}",
                        ".".join(key_path),
                        "duplicate key; the earlier one would be ignored",
                    )
                )
            seen.add(key)
            origins.key_marks[key_path] = (line, col)
            problems += _record_marks(value_node, key_path, origins)
    elif isinstance(node, yaml.SequenceNode):  # list items are located by index, as pydantic names them
        for index, item in enumerate(node.value):
            item_path = path + (str(index),)
            origins.key_marks[item_path] = (item.start_mark.line + 1, item.start_mark.column + 1)
            problems += _record_marks(item, item_path, origins)
    return problems


def apply_overrides(raw: dict, overrides: list[str], origins: Origins) -> list[Problem]:
    """Set each `a.b.c=value` into `raw`, typing the value as YAML would."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem("command line", item, "expected key=value, e.g. train.max_steps=10"))
            continue
        path = tuple(key.strip().split("."))
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problems.append(Problem("command line", item, f"value is not valid YAML ({e.__class__.__name__})"))
            continue
        target = raw
        for i, part in enumerate(path[:-1]):
            child = target.setdefault(part, {})
            if child is None:
                child = target[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem("command line", item, f"{'.'.join(path[: i + 1])} is not a section"))
                break
            target = child
        else:
            target[path[-1]] = value
            origins.overrides[path] = item
    return problems


def validate(raw: dict, origins: Origins) -> tuple[Recipe | None, list[Problem]]:
    """Run the schema; translate pydantic's errors into located, plain-worded problems."""
    try:
        return Recipe.model_validate(raw), []
    except ValidationError as e:
        by_key: dict[tuple, list[Problem]] = {}
        for err in e.errors():
            if _is_union_member(err):
                err = {**err, "loc": err["loc"][:-1]}
            by_key.setdefault(tuple(err["loc"]), []).append(_problem_from_pydantic(err, origins))
        return None, [_merge_alternatives(problems) for problems in by_key.values()]


def _is_union_member(err: dict) -> bool:
    """A value that fits none of a union's types gets one error per type, located under the type's name."""
    return len(err["loc"]) > 1 and isinstance(err["loc"][-1], str) and err["loc"][-1].startswith(("list[", "literal["))


def _merge_alternatives(problems: list[Problem]) -> Problem:
    """One problem for a value that fits none of a key's alternatives: `expected a list, or one of ... (got 5)`."""
    if len(problems) == 1:
        return problems[0]
    got = re.search(r" \(got .*\)$", problems[0].message)
    words = [
        re.sub(r" \(got .*\)$", "", p.message).removeprefix("expected ").removeprefix("must be ") for p in problems
    ]
    return Problem(problems[0].where, problems[0].subject, "expected " + ", or ".join(words) + (got[0] if got else ""))


def _problem_from_pydantic(err: dict, origins: Origins) -> Problem:
    kind = err["type"]
    path, section = _key_and_section(tuple(str(p) for p in err["loc"]))
    if kind == "union_tag_invalid":  # adapter.kind names no method
        path, section = path + ("kind",), ADAPTER_SPECS["lora"]
        choices = list(ADAPTER_SPECS)
        where, subject = origins.locate(path)
        message = f"must be one of {', '.join(repr(c) for c in choices)} (got {err['ctx']['tag']!r})"
        return Problem(where, subject, message, _did_you_mean(err["ctx"]["tag"], choices))
    if kind == "extra_forbidden":
        where, subject = origins.locate(path, at_value=False)
        return Problem(where, subject, "unknown key", _suggest_key(section, path[-1]))
    if kind == "missing":
        where, _ = origins.locate(path[:-1])
        description = _field(section, path[-1]).description if _field(section, path[-1]) else ""
        return Problem(
            where, ".".join(path), "required key is missing", f"expected: {description}" if description else ""
        )
    where, subject = origins.locate(path)
    hint = ""
    if kind == "literal_error" and isinstance(err.get("input"), str) and _field(section, path[-1]):
        choices = [str(c) for c in getattr(_field(section, path[-1]).annotation, "__args__", ())]
        hint = _did_you_mean(err["input"], choices)
    return Problem(where, subject, _plain_message(err), hint)


def _key_and_section(loc: KeyPath) -> tuple[KeyPath, type[BaseModel] | None]:
    """Pydantic's error location -> (the recipe key path, the schema class owning its last key).

    The adapter union puts its tag in the location (`adapter.prefix.num_virtual_tokens`); the user wrote
    `adapter.num_virtual_tokens`, and the tag says which class's keys to suggest from.
    """
    path: list[str] = []
    model: type[BaseModel] | None = Recipe
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        path.append(part)
        if not parts:
            break
        if part.isdigit():  # a list item has the keys of the list's element type
            continue
        if model is Recipe and part == "adapter" and parts[0] in ADAPTER_SPECS:
            model = ADAPTER_SPECS[parts.pop(0)]
            if not parts:
                break
        else:
            info = model.model_fields.get(part) if model else None
            model = _model_in(info.annotation) if info else None
    return tuple(path), model


def _plain_message(err: dict) -> str:
    kind, ctx, given = err["type"], err.get("ctx", {}), err.get("input")
    got = f" (got {given!r})" if not isinstance(given, (dict, list)) else ""
    bounds = {
        "greater_than": "must be greater than {gt}",
        "greater_than_equal": "must be at least {ge}",
        "less_than": "must be less than {lt}",
        "less_than_equal": "must be at most {le}",
    }
    if kind in bounds:
        return bounds[kind].format(**ctx) + got
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    expected = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "string": "a string",
        "list": "a list",
        "model": "a section (a mapping of keys)",
        "dict": "a mapping",
    }
    for prefix, words in expected.items():
        if kind.startswith(prefix + "_"):
            return f"expected {words}{got}"
    return err["msg"] + got


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


def _field(section: type[BaseModel] | None, key: str):
    return section.model_fields.get(key) if section else None


def _did_you_mean(given: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def _suggest_key(section: type[BaseModel] | None, key: str) -> str:
    if section is None:
        return ""
    valid = list(section.model_fields)
    # a key that holds a valid one, or is held by one (directory, dir), before a merely similar spelling
    close = [name for name in valid if len(name) >= 3 and len(key) >= 3 and (key in name or name in key)][:1]
    close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    owners = [kind for kind, spec in ADAPTER_SPECS.items() if key in spec.model_fields and spec is not section]
    if section in ADAPTER_SPECS.values() and owners:
        return f"it is a key of adapter.kind: {owners[0]}; this kind takes: " + ", ".join(valid)
    return "valid keys: " + ", ".join(valid)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as YAML, in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
