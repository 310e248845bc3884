"""The merged folder's card says how vLLM and text-generation-inference serve it: the commands name the folder
`finetune merge` wrote (and, for a chat run, the chat template it trained with), or a full run's export, and
a hub repo's card names the repo."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from finetune.artifacts.card import model_card
from finetune.cli import main

from conftest import REPO

pytestmark = pytest.mark.slow


def serve_commands(card: str) -> tuple[list[str], list[str]]:
    """(vllm serve arguments, docker run arguments) of the card's Serve section."""
    section = card.split("## Serve", 1)[1].split("\n## ", 1)[0]
    vllm = re.search(r"^vllm serve (.+)$", section, re.M).group(1).split()
    docker = re.search(r"^docker run (.+)$", section, re.M).group(1).split()
    return vllm, docker


def merged_card(run_dir: Path, out: Path) -> str:
    assert main(["merge", str(run_dir), "--out", str(out), "--no-verify"]) == 0
    return (out / "README.md").read_text()


def test_a_merged_folders_card_serves_that_folder(tiny_run, tmp_path):
    out = tmp_path / "merged"
    vllm, docker = serve_commands(merged_card(tiny_run("lora"), out))
    assert vllm == [str(out.resolve())]  # an Alpaca run: no chat template to name
    assert AutoConfig.from_pretrained(vllm[0]).model_type == "llama"  # what the command names is the model
    mount = docker[docker.index("-v") + 1]
    assert mount == f"{out.resolve()}:/data" and docker[docker.index("--model-id") + 1] == "/data"
    card = (out / "README.md").read_text()
    assert "completions endpoint" in card and "### Instruction:" in card  # the prompt it trained with


def test_a_chat_runs_card_names_the_chat_template_it_trained_with(tiny_run, tmp_path):
    run_dir = tiny_run("ollama-lima", data={"format": "lima", "path": str(REPO / "data" / "lima_sample.jsonl")})
    out = tmp_path / "merged"
    vllm, _ = serve_commands(merged_card(run_dir, out))
    assert vllm[:2] == [str(out.resolve()), "--chat-template"]
    template = Path(vllm[2])
    assert template == out.resolve() / "chat_template.jinja"
    assert template.read_text() == AutoTokenizer.from_pretrained(run_dir / "adapter").chat_template


def test_a_hub_repos_card_serves_the_repo(tiny_run):
    vllm, docker = serve_commands(model_card(tiny_run("lora"), library="transformers"))
    assert vllm == ["THIS_REPO"] and "-v" not in docker
    assert docker[docker.index("--model-id") + 1] == "THIS_REPO"
    assert "## Serve" not in model_card(tiny_run("lora"), library="peft")  # an adapter is not served alone


def test_a_full_runs_export_card_serves_the_export_folder(tiny_run, tmp_path):
    run_dir, out = tiny_run("full", adapter={"kind": "none"}), tmp_path / "model"
    assert main(["export", str(run_dir), "--format", "adapter", "--out", str(out)]) == 0
    vllm, docker = serve_commands((out / "README.md").read_text())
    assert vllm == [str(out.resolve())] and (out / "config.json").is_file()
    assert docker[docker.index("-v") + 1] == f"{out.resolve()}:/data"
