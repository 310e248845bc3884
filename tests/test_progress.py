"""Progress bars (finetune/progress.py) on a real pseudo-terminal: merge, GGUF export, tokenizing, exact match and
generate show a labelled bar that ends at its full count with a newline; FINETUNE_PROGRESS=0 and processes other
than the main one show nothing. What a pipe gets (no bar, no carriage return) is checked on the same commands in
tests/test_quiet.py; huggingface_hub's upload bars are held to the same rule here."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import tty
from contextlib import contextmanager
from pathlib import Path

import pytest

from finetune.data import tokenize
from finetune.data.formats.alpaca import to_conversation
from finetune.progress import progress

from conftest import REPO, SAMPLE_DATA

COLUMNS = 100


def open_terminal() -> tuple[int, int]:
    """(master, slave) of a pseudo-terminal 100 columns wide, raw: bytes arrive as written (no \\n -> \\r\\n)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    return master, slave


def read_terminal(master: int, *, until_closed: bool = False, timeout: float = 300) -> str:
    """What was written to the terminal so far (or, `until_closed`, until every writer has closed it)."""
    chunks = []
    while select.select([master], [], [], timeout if until_closed else 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            chunk = b""
        if not chunk:
            return b"".join(chunks).decode()
        chunks.append(chunk)
    assert not until_closed, f"the terminal's writers did not close it within {timeout} s"
    return b"".join(chunks).decode()


@pytest.fixture
def terminal(monkeypatch):
    """`with terminal() as written:` puts sys.stderr on a pseudo-terminal within the block (pytest resets
    sys.stderr when a test starts, so a fixture cannot); `written()` gives what reached it since the last call."""
    monkeypatch.delenv("FINETUNE_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    @contextmanager
    def stderr_on_a_terminal():
        master, slave = open_terminal()
        stream = open(slave, "w", encoding="utf-8", buffering=1)

        def written() -> str:
            stream.flush()
            return read_terminal(master)

        saved, sys.stderr = sys.stderr, stream
        try:
            yield written
        finally:
            sys.stderr = saved
            stream.close()
            os.close(master)

    return stderr_on_a_terminal


def finished_bars(text: str) -> list[str]:
    """The last state of each bar: a bar redraws its line after each carriage return and ends it with a newline."""
    assert text.endswith("\n"), repr(text)
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")[:-1]]


def assert_finished(bar: str, label: str, count: int, unit: str) -> None:
    assert bar.startswith(f"{label}: 100%|"), bar
    assert f"| {count}/{count} [" in bar and bar.endswith((f"{unit}/s]", f"s/{unit}]")), bar  # the rate, either way up


def test_merge_on_a_terminal_shows_a_bar_per_shard_and_keeps_stdout_as_it_was(tiny_run, tmp_path):
    from finetune.artifacts.shards import list_shards
    from finetune.run_folder import read_trained_recipe

    run = tiny_run("lora")
    [shard] = list_shards(Path(read_trained_recipe(run).model.name_or_path))
    master, slave = open_terminal()
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_PROGRESS", None)
    out = tmp_path / "merged"
    merge = [sys.executable, "-m", "finetune", "merge", str(run), "--out", str(out), "--no-verify"]
    with subprocess.Popen(merge, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env) as done:
        os.close(slave)
        stderr = read_terminal(master, until_closed=True)
        stdout = done.stdout.read().decode()
    os.close(master)
    assert done.returncode == 0, stderr
    [bar] = finished_bars(stderr)
    assert_finished(bar, "merge: folding model.safetensors", len(shard.names), "tensor")
    # stdout holds the lines merge prints anywhere, and nothing of the bar
    assert stdout.splitlines() == [
        "merged model.safetensors -> model.safetensors",
        f"merged model (float32, 1 shard) written to {out}",
    ]


def test_gguf_export_shows_the_tensors_written(terminal, tiny_model_dir, tmp_path):
    import gguf

    from finetune.artifacts.gguf import write_gguf

    with terminal() as written:
        write_gguf(tiny_model_dir, tmp_path / "m.gguf", "f16", echo=lambda _: None)
        [bar] = finished_bars(written())
    assert_finished(bar, "export gguf: writing tensors", len(gguf.GGUFReader(tmp_path / "m.gguf").tensors), "tensor")


def alpaca_conversations() -> list:
    rows = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))
    return [to_conversation(row, f"row {i}") for i, row in enumerate(rows, start=1)]


def test_tokenizing_shows_a_bar_only_for_a_set_larger_than_large_set(terminal, tokenizer, monkeypatch):
    conversations = alpaca_conversations()
    with terminal() as written:
        monkeypatch.setattr(tokenize, "LARGE_SET", len(conversations))
        tokenize.tokenize_conversations(conversations, tokenizer, 512, label="data: tokenizing train rows")
        assert written() == ""
        monkeypatch.setattr(tokenize, "LARGE_SET", len(conversations) - 1)
        tokenize.tokenize_conversations(conversations, tokenizer, 512, label="data: tokenizing train rows")
        [bar] = finished_bars(written())
    assert_finished(bar, "data: tokenizing train rows", len(conversations), "row")


def test_tokenizing_in_chunks_gives_the_ids_of_one_call(tokenizer, monkeypatch):
    conversations = alpaca_conversations()
    whole, _ = tokenize.tokenize_conversations(conversations, tokenizer, 512)
    monkeypatch.setattr(tokenize, "ENCODE_CHUNK", 3)  # chunks end inside conversations, not at their ends
    chunked, _ = tokenize.tokenize_conversations(conversations, tokenizer, 512)
    assert chunked == whole and len(whole) == len(conversations)


def test_exact_match_answers_show_a_bar_over_batches(terminal, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from finetune.eval.generate import generate_greedy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with terminal() as written:
        answers = generate_greedy(model, tokenizer, ["1 + 1 =", "2 + 2 =", "3 + 3 ="], max_new_tokens=2, batch_size=2)
        [bar] = finished_bars(written())
    assert len(answers) == 3
    assert_finished(bar, "eval: answering", 2, "batch")


def test_generate_shows_a_bar_over_prompts_unless_it_streams_answers_to_the_terminal(
    terminal, tiny_model_dir, monkeypatch
):
    from finetune.eval.generate import Sampling, generate

    rows = [{"instruction": "Name a color.", "input": ""}, {"instruction": "Name a fruit.", "input": ""}]
    with terminal() as written:
        generate(tiny_model_dir, rows, Sampling(max_new_tokens=2), prompt_format="raw")  # stdout: not the terminal
        [bar] = finished_bars(written())
        monkeypatch.setattr(sys, "stdout", sys.stderr)  # answers streamed to the terminal: its [n/N] lines count
        generate(tiny_model_dir, rows, Sampling(max_new_tokens=2), prompt_format="raw")
        shown = written()
    assert_finished(bar, "generate: answering", 2, "prompt")
    assert "[1/2] Name a color." in shown and "[2/2] Name a fruit." in shown
    assert "generate: answering" not in shown and "\r" not in shown


@pytest.mark.parametrize("setting", [{"FINETUNE_PROGRESS": "0"}, {"FINETUNE_PROGRESS": "off"}, {"RANK": "1"}])
def test_the_switch_and_processes_other_than_the_main_one_show_nothing(terminal, monkeypatch, setting):
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    with terminal() as written:
        assert list(progress(range(3), label="merge: folding model.safetensors")) == [0, 1, 2]
        assert written() == ""


def test_a_switch_set_to_anything_else_leaves_the_bars_on(terminal, monkeypatch):
    monkeypatch.setenv("FINETUNE_PROGRESS", "1")
    with terminal() as written:
        list(progress(range(3), label="merge: folding model.safetensors", unit="tensor"))
        [bar] = finished_bars(written())
    assert_finished(bar, "merge: folding model.safetensors", 3, "tensor")


# huggingface_hub's LFS upload bar, as `finetune push` streams a file, inside the gate push puts around it
UPLOAD = """
import sys
from contextlib import nullcontext
from huggingface_hub.utils import tqdm_stream_file
from finetune.quiet import hub_bars_where_progress_shows

gate = hub_bars_where_progress_shows() if sys.argv[2] == "gated" else nullcontext()
with gate, tqdm_stream_file(sys.argv[1]) as f:
    while f.read(100):
        pass
"""


def upload(path: Path, gate: str, stderr) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE_PROGRESS", "FINETUNE_PROGRESS"))}
    command = [sys.executable, "-c", UPLOAD, str(path), gate]
    return subprocess.Popen(command, stderr=stderr, env=env | {"PYTHONPATH": str(REPO)})


def test_hub_upload_bars_reach_a_terminal_but_never_a_pipe(tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"\0" * 1000)
    leaked = upload(weights, "open", subprocess.PIPE)  # what push's upload printed into logs before the gate
    gated = upload(weights, "gated", subprocess.PIPE)
    master, slave = open_terminal()
    on_terminal = upload(weights, "gated", slave)
    os.close(slave)
    shown = read_terminal(master, until_closed=True)
    os.close(master)
    assert "\r" in leaked.communicate(timeout=120)[1].decode()
    assert gated.communicate(timeout=120)[1] == b"" and on_terminal.wait(timeout=120) == 0
    assert finished_bars(shown)[-1].startswith("adapter_model.safetensors: 100%|")
