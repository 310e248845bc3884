"""Broken inputs, tried for real: each gives its exit code and one exact message, no traceback, and
leaves an existing run folder as it was.

The inputs live in tests/bad_inputs/ (each breaks good.yaml, or the data and model it names, in one
place). A case is one entry of CASES; `{bad}` is that folder, `{run}` a finished run folder that every
command must leave untouched, `{copy}` a copy of it that the case's `setup` breaks first. A message
starting with `re:` is a regular expression (for the parts that are library wording); the rest are exact.
Hub cases name repos of the suite's hub server (tests/hub_repos.py), reached through the case's `env`
(`{hub}` is the server's URL), without a token.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.lock import Holder, claim_file

from conftest import REPO
from hub_repos import GATED_ID, MODEL_ID, PICKLED_ID, PRIVATE_ID, serve_test_repos
from hub_server import HubServer

BAD = Path(__file__).resolve().parent / "bad_inputs"
GOOD = "good.yaml"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    exit_code: int
    message: str
    setup: Callable[[Path], None] | None = None  # breaks {copy}, a copy of the finished run
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the case ({hub}: the hub's URL)


def edit_yaml(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(copy: Path) -> None:
        data = yaml.safe_load((copy / name).read_text())
        change(data)
        (copy / name).write_text(yaml.safe_dump(data, sort_keys=False))

    return setup


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(copy: Path) -> None:
        data = json.loads((copy / name).read_text())
        change(data)
        (copy / name).write_text(json.dumps(data))

    return setup


def remove(name: str) -> Callable[[Path], None]:
    return lambda copy: shutil.rmtree(copy / name)


def validate(*overrides: str, recipe: str = GOOD) -> tuple[str, ...]:
    return ("validate", recipe, *overrides)


def run_over(*overrides: str, recipe: str = GOOD) -> tuple[str, ...]:
    """`finetune run` with the finished run as output.dir and --overwrite: a failure must not touch it."""
    return ("run", recipe, *overrides, "output.dir={run}", "--overwrite")


def claimed(where: str = "", *, beside: bool = False, host: str | None = None) -> Callable[[Path], None]:
    """A claim on {copy}/`where` held by a process that runs (pid 1) on this host, or on `host`."""

    def setup(copy: Path) -> None:
        holder = Holder(
            pid=1,
            host=host or socket.gethostname(),
            command="finetune run good.yaml",
            started="2026-01-01 00:00:00 UTC",
            token="0" * 16,
        )
        file = claim_file(copy / where, beside=beside)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(asdict(holder)))

    return setup


HELD = "pid 1 on {host} (finetune run good.yaml, since 2026-01-01 00:00:00 UTC)"
WAIT = "wait for it to end, or stop it first"
NO_FOLDER = "give a local model folder or a hub id such as huggyllama/llama-7b"
HUB = (("HF_ENDPOINT", "{hub}"),)
LOGIN = "log in with `hf auth login` or set HF_TOKEN"
# a byte-level BPE pre-tokenizer that splits at whitespace only: none of the released ones llama.cpp names
WHITESPACE_SPLIT_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
TINY = str(REPO / "data" / "tiny-llama")
# numbers every message: each user turn is opened with other text, which a Go template cannot write
NUMBERED_TURNS_TEMPLATE = (
    "{% for m in messages %}{{ 'Turn ' ~ loop.index ~ ' ' ~ m['role'] ~ ': ' ~ m['content'] ~ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Turn {{ messages | length + 1 }} assistant:{% endif %}"
)


def chat_run_with_template(template: str) -> Callable[[Path], None]:
    """The finished run as a LIMA run whose tokenizer saved `template`, the chat template it trained with."""
    lima = edit_yaml(
        "recipe.yaml",
        lambda r: r["data"].update(format="lima", goat=None, path=str(REPO / "data" / "lima_sample.jsonl")),
    )

    def setup(copy: Path) -> None:
        lima(copy)
        (copy / "adapter" / "chat_template.jinja").write_text(template)

    return setup


CASES = [
    # --- YAML itself
    Case("yaml-indent", validate(recipe="yaml_indent.yaml"), 2,
         "error: yaml_indent.yaml:3:2: YAML syntax error: this line is indented differently from the keys above it"),
    Case("yaml-tab", validate(recipe="yaml_tab.yaml"), 2,
         "error: yaml_tab.yaml:2:1: YAML syntax error: a tab character; indent with spaces"),
    Case("yaml-unclosed-quote", validate(recipe="yaml_unclosed_quote.yaml"), 2,
         "error: yaml_unclosed_quote.yaml:2:1: YAML syntax error: found unexpected end of stream"),
    Case("yaml-python-tag", validate(recipe="yaml_python_tag.yaml"), 2,
         "error: yaml_python_tag.yaml:2:17: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not "
         "allowed: a recipe holds plain values (strings, numbers, lists, mappings)"),
    Case("yaml-empty", validate(recipe="empty.yaml"), 2, "error: empty.yaml: the recipe is empty"),
    Case("yaml-list", validate(recipe="list.yaml"), 2,
         "error: list.yaml:1:1: the recipe must be a mapping of sections (model:, data:, ...)"),
    Case("yaml-duplicate-key", validate(recipe="duplicate_key.yaml"), 2,
         "error: duplicate_key.yaml:5:3: data.path: duplicate key; the earlier one would be ignored"),
    Case("recipe-not-utf8", validate(recipe="recipe_latin1.yaml"), 2,
         "re:error: recipe_latin1.yaml: cannot read the recipe \\(UnicodeDecodeError: 'utf-8' codec can't decode "
         "byte 0xe9 in position \\d+: invalid continuation byte\\)"),
    Case("recipe-missing", validate(recipe="no_such.yaml"), 2,
         "error: no_such.yaml: cannot read the recipe (FileNotFoundError: [Errno 2] No such file or directory: "
         "'no_such.yaml')"),
    # --- keys of older versions, and output.trackers
    Case("old-tensorboard-key", validate("output.tensorboard=false"), 2,
         "error: command line: output.tensorboard=false: replaced by output.trackers, a list; use "
         "output.trackers: [] instead (the list may also name wandb and mlflow)"),
    Case("unknown-tracker", validate("output.trackers=[tensorboard, comet]"), 2,
         "error: command line: output.trackers=[tensorboard, comet]: output.trackers.1: must be one of "
         "'tensorboard', 'wandb' or 'mlflow' (got 'comet')"),
    Case("repeated-tracker", validate("output.trackers=[wandb, wandb]"), 2,
         "error: command line: output.trackers=[wandb, wandb]: names wandb more than once"),
    # --- unknown keys, at every level
    Case("unknown-section", validate("trian.lr=1"), 2,
         "error: command line: trian.lr=1: unknown key; did you mean 'train'?"),
    Case("unknown-model-key", validate("model.revison=main"), 2,
         "error: command line: model.revison=main: unknown key; did you mean 'revision'?"),
    Case("unknown-lora-key", validate("adapter.rank=8"), 2,
         "error: command line: adapter.rank=8: unknown key; valid keys: kind, r, alpha, dropout, target_modules, "
         "modules_to_save, bias, use_rslora, use_dora"),
    Case("key-of-another-adapter", validate("adapter.num_virtual_tokens=8"), 2,
         "error: command line: adapter.num_virtual_tokens=8: unknown key; it is a key of adapter.kind: prefix; "
         "this kind takes: kind, r, alpha, dropout, target_modules, modules_to_save, bias, use_rslora, use_dora"),
    Case("unknown-quant-key", validate("quant.bits=4", "quant.kind=nf4"), 2,
         "error: command line: quant.kind=nf4: unknown key; "
         "valid keys: bits, type, double_quant, compute_dtype, storage_dtype"),
    Case("unknown-goat-key", validate("data.path=null", "data.format=goat", "data.goat.digits=3"), 2,
         "error: command line: data.goat.digits=3: unknown key; did you mean 'add_sub_digits'?"),
    Case("unknown-source-key", validate("data.path=null", "data.sources=[{path: rows_empty.json, wieght: 2}]"), 2,
         "error: command line: data.sources=[{path: rows_empty.json, wieght: 2}]: data.sources.0.wieght: unknown key; "
         "did you mean 'weight'?"),
    Case("unknown-output-key", validate("output.directory=x"), 2,
         "error: command line: output.directory=x: unknown key; did you mean 'dir'?"),
    # --- wrong types and out-of-range values
    Case("epochs-not-a-number", validate("train.epochs=three"), 2,
         "error: command line: train.epochs=three: expected a number (got 'three')"),
    Case("target-modules-number", validate("adapter.target_modules=5"), 2,
         "error: command line: adapter.target_modules=5: expected a list, or one of 'all-linear' (got 5)"),
    Case("section-is-a-string", validate("eval=everything"), 2,
         "error: command line: eval=everything: expected a section (a mapping of keys) (got 'everything')"),
    Case("rank-zero", validate("adapter.r=0"), 2,
         "error: command line: adapter.r=0: must be greater than 0 (got 0)"),
    Case("dropout-above-one", validate("adapter.dropout=1.5"), 2,
         "error: command line: adapter.dropout=1.5: must be less than 1.0 (got 1.5)"),
    Case("eval-fraction-one", validate("data.eval_fraction=1"), 2,
         "error: command line: data.eval_fraction=1: must be less than 1.0 (got 1)"),
    Case("loss-chunk-zero", validate("train.loss_chunk_mib=0"), 2,
         "error: command line: train.loss_chunk_mib=0: must be greater than 0 (got 0)"),
    Case("loss-chunk-above-4096", validate("train.loss_chunk_mib=8000"), 2,
         "error: command line: train.loss_chunk_mib=8000: must be at most 4096 (got 8000)"),
    Case("negative-lr", validate("train.lr=-1e-4"), 2,
         "error: command line: train.lr=-1e-4: must be greater than 0.0 (got '-1e-4')"),
    Case("quant-bits-3", validate("quant.bits=3"), 2,
         "error: command line: quant.bits=3: must be one of 4 or 8 (got 3)"),
    Case("adapter-kind-typo", validate("adapter={kind: lorra}"), 2,
         "error: command line: adapter={kind: lorra}: adapter.kind: must be one of 'lora', 'prefix', 'prompt', "
         "'ia3', 'none' (got 'lorra'); did you mean 'lora'?"),
    Case("missing-model", validate("model=null"), 2,
         "re:error: command line: model=null: expected a section \\(a mapping of keys\\) \\(got None\\)"),
    Case("override-without-value", ("validate", GOOD, "train.lr"), 2,
         "error: command line: train.lr: expected key=value, e.g. train.max_steps=10"),
    Case("override-into-a-value", validate("train.lr.peak=1"), 2,
         "error: command line: train.lr.peak=1: expected a number"),
    # --- contradictory keys
    Case("prefix-with-checkpointing", validate("adapter={kind: prefix}", "train.gradient_checkpointing=true"), 2,
         "error: command line: train.gradient_checkpointing=true: adapter.kind: prefix cannot train with gradient "
         "checkpointing: checkpointed decoder layers drop the prefix key/values; set train.gradient_checkpointing: "
         "false (or leave it out; it is then off for prefix-tuning)"),
    Case("full-fine-tuning-quantized", validate("adapter={kind: none}", "quant.bits=4"), 2,
         "error: command line: quant.bits=4: adapter.kind: none (full fine-tuning) cannot train quantized weights; "
         "remove the quant section, or train an adapter (adapter.kind: lora is QLoRA)"),
    Case("dora-on-8-bit", validate("adapter.use_dora=true", "quant.bits=8"), 2,
         "error: command line: adapter.use_dora=true: DoRA is not supported on an 8-bit base by peft; use "
         "quant.bits: 4"),
    Case("ia3-quantized", validate("adapter={kind: ia3}", "quant.bits=4"), 2,
         "error: command line: quant.bits=4: adapter.kind: ia3 cannot train on a quantized base: the trainer keeps a "
         "quantized model's adapter in bfloat16, where its scales (near 1) cannot take steps below 1/128; remove the "
         "quant section (ia3 trains few values; the base stays frozen in 16 bits)"),
    Case("ia3-feedforward-not-a-target", validate("adapter={kind: ia3, target_modules: [q_proj], "
                                                  "feedforward_modules: [down_proj]}"), 2,
         "error: command line: adapter={kind: ia3, target_modules: [q_proj], feedforward_modules: [down_proj]}: "
         "adapter.feedforward_modules: down_proj is not in adapter.target_modules; list only target modules here, "
         "or add them to adapter.target_modules"),
    Case("warmup-twice", validate("train.warmup_steps=5", "train.warmup_ratio=0.1"), 2,
         "error: command line: train.warmup_steps=5: set either warmup_steps or warmup_ratio, not both"),
    Case("tokenizer-revision-without-tokenizer-repo", validate("model.tokenizer_revision=main"), 2,
         "error: command line: model.tokenizer_revision=main: applies to a separate model.tokenizer repo; this "
         "recipe reads the tokenizer from model.name_or_path; use model.revision"),
    Case("exact-match-on-alpaca", validate("eval.exact_match=10"), 2,
         "error: command line: eval.exact_match=10: scores Goat arithmetic answers; this recipe's data is alpaca; "
         "remove it (eval loss is logged with data.eval_fraction or data.eval_path)"),
    Case("samples-every-without-samples", validate("eval.samples_every=2"), 2,
         "error: command line: eval.samples_every=2: answers the eval.samples prompts during training, and "
         "eval.samples is 0; set eval.samples to the number of prompts to follow (e.g. 4), or remove samples_every"),
    Case("output-dir-root", validate("output.dir=/"), 2,
         "error: command line: output.dir=/: must not be /: a run folder is emptied by --overwrite; choose a folder "
         "of its own, e.g. runs/NAME"),
    Case("output-dir-under-a-file", ("run", GOOD, f"output.dir={TINY}/config.json/run"), 2,
         f"error: output.dir: {TINY}/config.json/run cannot be written ({TINY}/config.json: Not a directory)"),
    Case("bf16-on-cpu", run_over("train.precision=bf16"), 2,
         "error: train.precision: bf16 needs a GPU; this run is on CPU (use auto or fp32)"),
    Case("4-bit-on-cpu-odd-sizes", run_over("model.name_or_path=model_odd_sizes", f"model.tokenizer={TINY}",
                                           "quant.bits=4"), 2,
         "error: quant.bits: 4-bit weights on CPU need Linear input sizes that are multiples of 64 (bitsandbytes' "
         "CPU kernel); {bad}/model_odd_sizes has hidden_size=96, intermediate_size=200. Train on a GPU, use "
         "quant.bits: 8, or remove quant."),
    # --- missing files
    Case("data-file-missing", validate("data.path=no_such.json"), 2,
         "error: command line: data.path=no_such.json: no such file: {bad}/no_such.json"),
    Case("data-file-type", validate("data.path=rows.csv"), 2,
         "error: command line: data.path=rows.csv: unsupported file type: {bad}/rows.csv; use a .json or .jsonl "
         "file"),
    Case("model-folder-missing", validate("model.name_or_path=./no_such_model"), 2,
         "error: command line: model.name_or_path=./no_such_model: no such folder: {bad}/no_such_model; "
         + NO_FOLDER),
    # --- data sets
    Case("data-empty-list", run_over("data.path=rows_empty.json"), 2,
         "error: {bad}/rows_empty.json: no rows"),
    Case("data-empty-jsonl", run_over("data.path=rows_empty.jsonl"), 2,
         "error: {bad}/rows_empty.jsonl: no rows"),
    Case("data-broken-json", run_over("data.path=rows_broken.json"), 2,
         "error: {bad}/rows_broken.json:3:1: invalid JSON: Expecting ',' delimiter"),
    Case("data-bad-jsonl-line", run_over("data.path=rows_bad_line.jsonl"), 2,
         "error: {bad}/rows_bad_line.jsonl:3:21: invalid JSON: Expecting ',' delimiter"),
    Case("data-not-utf8", run_over("data.path=rows_latin1.jsonl"), 2,
         "error: {bad}/rows_latin1.jsonl:1: not UTF-8 (byte 0xe9 at offset 20)"),
    Case("data-row-missing-output", run_over("data.path=rows_missing_output.json"), 2,
         "error: {bad}/rows_missing_output.json: row 2: 'output' is missing"),
    Case("data-row-wrong-type", run_over("data.path=rows_wrong_type.json"), 2,
         "re:error: {bad}/rows_wrong_type.json: row 1: 'output' .*"),
    Case("data-rows-not-objects", run_over("data.path=rows_not_objects.json"), 2,
         "{bad}/rows_not_objects.json: row 2: expected an object with 'instruction' and 'output', got int"),
    Case("sharegpt-unknown-role", run_over("data.format=sharegpt", "data.path=rows_sharegpt_unknown_role.jsonl"), 2,
         "error: {bad}/rows_sharegpt_unknown_role.jsonl:2: turn 2 is from 'bot': expected human, gpt or system "
         "(or user, assistant)"),
    Case("sharegpt-empty", run_over("data.format=sharegpt", "data.path=rows_sharegpt_empty.jsonl"), 2,
         "error: {bad}/rows_sharegpt_empty.jsonl:2: 'conversations' must be a non-empty list of {from, value} turns"),
    Case("sharegpt-not-alternating", run_over("data.format=sharegpt", "data.path=rows_sharegpt_not_alternating.jsonl"),
         2, "error: {bad}/rows_sharegpt_not_alternating.jsonl:2: turn 2 is from 'user', expected 'assistant' (turns "
         "must alternate)"),
    Case("sharegpt-empty-turn", run_over("data.format=sharegpt", "data.path=rows_sharegpt_empty_turn.jsonl"), 2,
         "error: {bad}/rows_sharegpt_empty_turn.jsonl:2: turn 2 (assistant) is empty"),
    Case("data-response-truncated-away", run_over("data.path=rows_prompt_too_long.json"), 2,
         "error: {bad}/rows_prompt_too_long.json: no training sample left after data.overlong=truncate, "
         "data.max_seq_len=128, data.min_tokens=0 and data.dedup=none"),
    Case("data-overlong-error", ("data", "stats", GOOD, "data.path=rows_prompt_too_long.json",
                                 "data.overlong=error"), 2,
         "{bad}/rows_prompt_too_long.json: row 2: 867 tokens, longer than data.max_seq_len=128"),
    Case("preview-bad-row", ("preview", GOOD, "data.path=rows_missing_output.json"), 2,
         "error: {bad}/rows_missing_output.json: row 2: 'output' is missing"),
    Case("goat-unknown-op", ("data", "goat", "--out", "{run}/goat.jsonl", "--ops", "add,pow"), 2,
         "error: --ops: unknown operation(s) ['pow']; choose from add, sub, mul, div"),
    Case("goat-zero-rows", ("data", "goat", "--out", "{run}/goat.jsonl", "--n", "0"), 2,
         "error: --n: must be greater than 0 (got 0)"),
    Case("tiny-model-no-corpus", ("tiny-model", "{run}/tiny", "--corpus", "no_such.jsonl"), 2,
         "re:error: no_such.jsonl: .*"),
    # --- model folders
    Case("model-without-weights", run_over("model.name_or_path=model_no_weights", f"model.tokenizer={TINY}"), 2,
         "error: model.name_or_path: {bad}/model_no_weights has no weights (*.safetensors)"),
    Case("model-pickle-only", run_over("model.name_or_path=model_pickle_only", f"model.tokenizer={TINY}"), 2,
         "error: model.name_or_path: {bad}/model_pickle_only has only pickled weights (pytorch_model.bin); pickle "
         "files can run code when loaded. Convert them to safetensors, or set model.allow_pickle_weights: true if "
         "you trust them."),
    Case("model-without-tokenizer", run_over("model.name_or_path=model_no_tokenizer"), 2,
         "re:error: model.name_or_path: cannot load a tokenizer from '{bad}/model_no_tokenizer': .*"),
    Case("model-remote-code", run_over("model.name_or_path=model_remote_code", f"model.tokenizer={TINY}"), 2,
         "re:error: model.name_or_path: {bad}/model_remote_code ships its own Python code .*"),
    # --- hub repos (nothing is written: the run folder stays as it was)
    Case("hub-unknown-repo", run_over("model.name_or_path=test-org/no-such-model"), 2,
         "error: model.name_or_path: test-org/no-such-model: no such model repo, or it is private or gated and no "
         f"token is set: {LOGIN}", env=HUB),
    Case("hub-private-repo-without-token", run_over(f"model.name_or_path={PRIVATE_ID}"), 2,
         f"error: model.name_or_path: {PRIVATE_ID}: no such model repo, or it is private or gated and no token is "
         f"set: {LOGIN}", env=HUB),
    Case("hub-gated-repo-without-token", run_over(f"model.name_or_path={GATED_ID}"), 2,
         f"error: model.name_or_path: {GATED_ID}: a gated model: accept its conditions on the hub's page for "
         f"{GATED_ID}, then {LOGIN}", env=HUB),
    Case("hub-unknown-revision", run_over(f"model.name_or_path={MODEL_ID}", "model.revision=no-such-branch"), 2,
         f"error: model.name_or_path: {MODEL_ID} (revision no-such-branch): no revision 'no-such-branch' (a branch, "
         "tag or commit) in the model repo", env=HUB),
    Case("hub-data-unknown-revision", run_over("data.path=test-org/alpaca-sample", "data.revision=v9"), 2,
         "error: data.path: test-org/alpaca-sample (revision v9): no revision 'v9' (a branch, tag or commit) in the "
         "dataset repo", env=HUB),
    Case("hub-unknown-dataset", run_over("data.path=test-org/no-such-data"), 2,
         "error: data.path: test-org/no-such-data: no such dataset repo, or it is private or gated and no token is "
         f"set: {LOGIN}", env=HUB),
    Case("hub-data-unknown-split", run_over("data.path=test-org/alpaca-sample", "data.split=validation"), 2,
         "re:error: test-org/alpaca-sample: cannot load dataset \\(split 'validation'\\): ValueError: .*validation.*",
         env=HUB),
    Case("hub-offline-not-cached", run_over("model.name_or_path=test-org/never-downloaded"), 2,
         "error: model.name_or_path: test-org/never-downloaded: offline (HF_HUB_OFFLINE=1), and not in the local "
         "cache; run once online or give a local folder", env=(*HUB, ("HF_HUB_OFFLINE", "1"))),
    Case("hub-unreachable-not-cached", run_over("model.name_or_path=test-org/never-downloaded"), 2,
         "error: model.name_or_path: test-org/never-downloaded: cannot reach the hub at http://127.0.0.1:9, and not "
         "in the local cache; run once online or give a local folder", env=(("HF_ENDPOINT", "http://127.0.0.1:9"),)),
    Case("hub-repo-without-safetensors", run_over(f"model.name_or_path={PICKLED_ID}"), 2,
         f"re:error: model\\.name_or_path: {PICKLED_ID} has no weights in safetensors files \\(\\*\\.safetensors\\) at "
         "commit [0-9a-f]{40}; pickled weights \\(\\*\\.bin, \\*\\.pt\\) load only with "
         "model\\.allow_pickle_weights: true, if you trust them", env=HUB),
    # --- run folders
    Case("eval-not-a-run-folder", ("eval", "."), 2, "error: .: not a run folder (no recipe.yaml)"),
    Case("report-not-a-run-folder", ("report", "."), 2, "error: .: not a run folder (no recipe.yaml)"),
    Case("compare-not-a-run-folder", ("compare", "{run}", "."), 2, "error: .: not a run folder (no recipe.yaml)"),
    Case("runs-no-folder", ("runs", "no_such_folder"), 2, "error: no_such_folder: no such folder"),
    Case("run-folder-without-resume", ("run", "{run}"), 2,
         "error: {run} is a folder: give a recipe file, or add --resume to continue a run folder"),
    Case("resume-with-other-training", ("run", "{copy}", "--resume", "train.lr=0.5", "adapter.r=2"), 2,
         "error: --resume: the recipe differs from {copy}/recipe.yaml in adapter.r, train.lr; a resumed run must "
         "train as the interrupted one did (start a new run in another output.dir to change them)",
         setup=lambda copy: (copy / "summary.json").unlink()),
    Case("resume-over-overwrite", ("run", "{run}", "--resume", "--overwrite"), 2,
         "error: --resume continues a run folder and --overwrite empties it; give one of them"),
    Case("resume-finished-run", ("run", "{run}", "--resume"), 2,
         "error: {run}: the run has finished; there is nothing to resume"),
    Case("eval-incompatible-version", ("eval", "{copy}"), 2,
         "error: {copy}/environment.json: run_format 99: the folder was written by an incompatible version of "
         "finetune (this version reads run_format 1)",
         setup=edit_json("environment.json", lambda env: env.update(run_format=99))),
    Case("resume-incompatible-version", ("run", "{copy}", "--resume"), 2,
         "error: {copy}/environment.json: run_format 99: the folder was written by an incompatible version of "
         "finetune (this version reads run_format 1)",
         setup=edit_json("environment.json", lambda env: env.update(run_format=99))),
    Case("eval-run-without-adapter", ("eval", "{copy}"), 2,
         "error: {copy}: has no adapter/; did the run finish?", setup=remove("adapter")),
    Case("eval-broken-run-recipe", ("eval", "{copy}"), 2,
         "error: {copy}/recipe.yaml:1:1: the recipe must be a mapping of sections (model:, data:, ...)",
         setup=lambda copy: (copy / "recipe.yaml").write_text("[broken]\n")),
    # --- folders another command writes (finetune/lock.py)
    Case("run-into-a-claimed-folder", ("run", GOOD, "output.dir={copy}", "--overwrite"), 2,
         f"error: output.dir: {{copy}} is in use by {HELD}; {WAIT}", setup=claimed()),
    Case("resume-a-claimed-folder", ("run", "{copy}", "--resume"), 2,
         f"error: output.dir: {{copy}} is in use by {HELD}; {WAIT}", setup=claimed()),
    Case("resume-a-folder-claimed-on-another-host", ("run", "{copy}", "--resume"), 2,
         "error: output.dir: {copy} is claimed by pid 1 on gpu-node-7 (finetune run good.yaml, since 2026-01-01 "
         "00:00:00 UTC), a process on another machine that this one cannot check; if it has ended, pass "
         "--force-unlock to take the claim over", setup=claimed(host="gpu-node-7")),
    Case("merge-into-a-claimed-folder", ("merge", "{copy}"), 2,
         f"error: --out: {{copy}}/merged is in use by {HELD}; {WAIT}", setup=claimed("merged", beside=True)),
    Case("merge-dequantized-16-bit-run", ("merge", "{run}", "--base", "dequantized"), 2,
         "error: --base dequantized: {run} trained on a 16-bit base (its recipe has no quant section), so there are "
         "no quantized weights to dequantize; merge with --base original"),
    Case("merge-dequantized-8-bit-run", ("merge", "{copy}", "--base", "dequantized"), 2,
         "error: --base dequantized: {copy} trained on an 8-bit (LLM.int8) base, whose matmuls also round their "
         "inputs to int8, so no 16-bit weights reproduce it; merge with --base original",
         setup=edit_yaml("recipe.yaml", lambda r: r.update(quant={"bits": 8}))),
    Case("export-gguf-dequantized-16-bit-run", ("export", "{run}", "--format", "gguf", "--base", "dequantized"), 2,
         "error: --base dequantized: {run} trained on a 16-bit base (its recipe has no quant section), so there are "
         "no quantized weights to dequantize; merge with --base original"),
    Case("export-into-a-claimed-folder", ("export", "{copy}", "--format", "adapter"), 2,
         f"error: --out: {{copy}}/export/adapter is in use by {HELD}; {WAIT}",
         setup=claimed("export/adapter", beside=True)),
    Case("report-of-a-claimed-folder", ("report", "{copy}"), 2, f"error: {{copy}} is in use by {HELD}; {WAIT}",
         setup=claimed()),
    Case("eval-of-a-claimed-folder", ("eval", "{copy}"), 2, f"error: {{copy}} is in use by {HELD}; {WAIT}",
         setup=claimed()),
    # --- GGUF export: refused before anything is merged, naming the run folder
    Case("gguf-unsupported-architecture", ("export", "{copy}", "--format", "gguf"), 2,
         "error: {copy}: GGUF export writes the model types llama, mistral, qwen2 (Llama-1/2/3.x, Mistral, "
         "Qwen2/2.5); this model is 'gemma' (GemmaForCausalLM)",
         setup=edit_yaml("recipe.yaml", lambda r: r["model"].update(name_or_path=str(BAD / "model_gemma")))),
    Case("gguf-unsupported-rope-scaling", ("export", "{copy}", "--format", "gguf"), 2,
         "error: {copy}: GGUF export writes the rope scalings default, linear, llama3; this model uses 'yarn'",
         setup=edit_yaml("recipe.yaml", lambda r: r["model"].update(name_or_path=str(BAD / "model_rope_yarn")))),
    Case("gguf-unknown-pre-tokenizer", ("export", "{copy}", "--format", "gguf"), 2,
         "error: {copy}/adapter/tokenizer.json: GGUF export knows the byte-level BPE pre-tokenizers of Llama-3 "
         "(llama-bpe) and Qwen2 (qwen2); this one splits text with the expression \\s+, which llama.cpp would "
         "not reproduce",
         setup=edit_json("adapter/tokenizer.json", lambda t: t.update(pre_tokenizer=WHITESPACE_SPLIT_PRE_TOKENIZER))),
    # --- Ollama export: a chat template no Modelfile TEMPLATE reproduces, refused before anything is merged
    Case("ollama-untranslatable-chat-template", ("export", "{copy}", "--format", "ollama"), 2,
         "error: {copy}/adapter/chat_template.jinja: the chat template cannot be written as an Ollama TEMPLATE: "
         "the first user turn is opened differently from the others; export --format gguf and write the "
         "Modelfile's TEMPLATE by hand", setup=chat_run_with_template(NUMBERED_TURNS_TEMPLATE)),
    Case("ollama-several-prompt-formats", ("export", "{copy}", "--format", "ollama"), 2,
         "error: data.sources: the run trained on several prompt formats (alpaca, goat) and a Modelfile has one "
         "TEMPLATE; export --format gguf and write the Modelfile by hand",
         setup=edit_yaml("recipe.yaml", lambda r: r["data"].update(goat=None, sources=[
             {"format": "goat", "goat": r["data"]["goat"]},
             {"format": "alpaca", "path": str(REPO / "data" / "alpaca_sample.json")}]))),
    Case("eval-base-changed-shape", ("eval", "{copy}"), 2,
         "re:error: {copy}/adapter: the adapter does not fit the base model "
         f"{REPO / 'data' / 'tiny-llama-4layer'}: .*",
         setup=edit_yaml("recipe.yaml", lambda r: r["model"].update(name_or_path=str(REPO / "data" /
                                                                                     "tiny-llama-4layer")))),
    # --- finetune eval --tasks (lm-evaluation-harness; the task files are in lm_eval_tasks/)
    Case("eval-task-options-without-tasks", ("eval", "{run}", "--limit", "5", "--model", "merged"), 2,
         "error: --limit, --model: only with --tasks (lm-evaluation-harness tasks)"),
    Case("eval-tasks-with-goat-n", ("eval", "{run}", "--tasks", "goat_choice", "--n", "20"), 2,
         "error: --n: the number of Goat problems, not read with --tasks; give --limit N instead"),
    Case("eval-tasks-limit-zero", ("eval", "{run}", "--tasks", "goat_choice", "--limit", "0"), 2,
         "error: --limit: must be greater than 0 (got 0)"),
    Case("eval-tasks-no-include-folder", ("eval", "{run}", "--tasks", "goat_choice", "--include-path", "no_such"), 2,
         "error: --include-path: no_such: no such folder"),
    Case("eval-tasks-without-merged-model",
         ("eval", "{run}", "--tasks", "goat_choice", "--include-path", "lm_eval_tasks", "--model", "merged"), 2,
         "error: {run}: has no merged model (merged/config.json); write it with `finetune merge {run}` first, or "
         "evaluate the adapter with --model adapter"),
    Case("eval-tasks-unknown-name", ("eval", "{run}", "--tasks", "goat_choise", "--include-path", "lm_eval_tasks"), 2,
         "error: --tasks: no task named 'goat_choise' in lm_eval's catalogue or lm_eval_tasks (did you mean "
         "'goat_choice'?); `lm-eval ls tasks` lists the catalogue's names, and --include-path DIR adds the task YAML "
         "files of a folder"),
    Case("eval-tasks-of-a-claimed-folder",
         ("eval", "{copy}", "--tasks", "goat_choice", "--include-path", "lm_eval_tasks"), 2,
         f"error: {{copy}} is in use by {HELD}; {WAIT}", setup=claimed()),
    Case("eval-tasks-missing-rows",
         ("eval", "{run}", "--tasks", "goat_choice_no_rows", "--include-path", "lm_eval_tasks"), 2,
         "re:error: {bad}/lm_eval_tasks/goat_choice_no_rows.yaml: task 'goat_choice_no_rows' cannot be built: "
         "FileNotFoundError: .*no_such_rows.jsonl.*"),
]  # fmt: skip


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


FAKE_TOKEN = "hf_FakeTokenThatMustNeverBeWritten0123456789"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """(folder, output) of a finished Goat run on the shipped tiny model (eval needs Goat data), trained with
    a hub token in the environment."""
    run = tmp_path_factory.mktemp("finished") / "run"
    args = [
        "run",
        str(BAD / GOOD),
        "data.path=null",
        "data.format=goat",
        "data.goat={n: 40, ops: [add], add_sub_digits: 2}",
        "data.eval_fraction=0.2",
        f"output.dir={run}",
    ]
    output = io.StringIO()
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            assert main(args) == 0
    finally:
        os.environ.pop("HF_TOKEN") if previous is None else os.environ.update(HF_TOKEN=previous)
    return run, output.getvalue()


@pytest.fixture(scope="module")
def finished_run(finished) -> Path:
    return finished[0]


def test_a_hub_token_is_never_written(finished):
    run, output = finished
    assert "run folder:" in output and FAKE_TOKEN not in output
    files = [path for path in run.rglob("*") if path.is_file()]
    assert len(files) > 10 and (run / "environment.json") in files
    assert [path for path in files if FAKE_TOKEN.encode() in path.read_bytes()] == []


def expected_message(case: Case, places: dict[str, str]) -> re.Pattern:
    pattern = case.message[3:] if case.message.startswith("re:") else re.escape(case.message)
    for name, value in places.items():
        pattern = pattern.replace("{" + name + "}", re.escape(value)).replace("\\{" + name + "\\}", re.escape(value))
    return re.compile(pattern)


@pytest.fixture(scope="module")
def hub():
    server = serve_test_repos(HubServer())
    yield server
    server.close()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_broken_input_gives_its_message(case, request, tmp_path, monkeypatch, capsys):
    needs_run = case.setup or any("{run}" in arg or "{copy}" in arg for arg in case.args)
    finished_run = request.getfixturevalue("finished_run") if needs_run else tmp_path / "no-run"
    for name, value in case.env:
        monkeypatch.setenv(name, value.replace("{hub}", request.getfixturevalue("hub").url))
    monkeypatch.chdir(BAD)
    copy = tmp_path / "copy"
    if case.setup:
        shutil.copytree(finished_run, copy)
        case.setup(copy)
    places = {"bad": str(BAD), "run": str(finished_run), "copy": str(copy), "host": socket.gethostname()}
    args = list(case.args)
    for name, value in places.items():
        args = [arg.replace("{" + name + "}", value) for arg in args]
    before = {folder: folder_hash(folder) for folder in (finished_run, copy, BAD) if folder.exists()}
    capsys.readouterr()

    assert main(args) == case.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1] if err.strip() else ""
    assert expected_message(case, places).fullmatch(message), message
    assert {folder: folder_hash(folder) for folder in before} == before
    assert not (BAD / "never-written").exists()
    assert not (BAD / "model_remote_code" / "EXECUTED").exists()  # the folder's code never ran
