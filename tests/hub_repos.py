"""The repos the test hub serves, laid out as their real counterparts are, and the environment a client
process needs to reach it.

- a model repo as LLaMA checkpoints are published: bf16 weights in two safetensors shards with
  model.safetensors.index.json, config.json (dtype bfloat16), generation_config.json, tokenizer.json,
  tokenizer.model and tokenizer_config.json (the shipped tiny LLaMA, converted);
- an Alpaca-format dataset repo as tatsu-lab/alpaca is: README.md with dataset_info, and
  data/train-00000-of-00001-<hash>.parquet (the project's own 120 sample rows);
- a LIMA-format dataset repo as GAIR/lima is: train.jsonl and test.jsonl at the top, and the loading
  script the hub still holds (lima.py, never downloaded);
- the same model private, and gated, and a repo with pickled weights only (pytorch_model.bin).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from hub_server import TOKEN, HubServer

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "data" / "tiny-llama"
SAMPLE_ROWS = REPO / "data" / "alpaca_sample.json"
MODEL_ID = "test-org/tiny-llama"
ALPACA_ID = "test-org/alpaca-sample"
LIMA_ID = "test-org/lima-sample"
PRIVATE_ID = "test-org/private-llama"
GATED_ID = "test-org/gated-llama"
PICKLED_ID = "test-org/pickled-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def model_files(folder: Path = TINY_LLAMA, shards: int = 2) -> dict[str, bytes]:
    """A model folder's files as a hub repo holds a LLaMA: bf16 weights in `shards` shards with an index."""
    import torch
    from safetensors.torch import load_file, save

    tensors = {name: t.to(torch.bfloat16) for name, t in sorted(load_file(folder / "model.safetensors").items())}
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    files, weight_map = {}, {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i * per_shard : (i + 1) * per_shard]}
        files[shard] = save(part, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    config = json.loads((folder / "config.json").read_text()) | {"dtype": "bfloat16"}
    files["config.json"] = json.dumps(config, indent=2).encode()
    for name in ("generation_config.json", *TOKENIZER_FILES):
        files[name] = (folder / name).read_bytes()
    return files


def alpaca_files(rows: list[dict]) -> dict[str, bytes]:
    """Alpaca rows as tatsu-lab/alpaca lays them out: one parquet file under data/ and a dataset card."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({key: [row.get(key, "") for row in rows] for key in ("instruction", "input", "output")})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    card = (
        "---\nlicense: cc-by-nc-4.0\ndataset_info:\n  features:\n  - name: instruction\n    dtype: string\n"
        "  - name: input\n    dtype: string\n  - name: output\n    dtype: string\n  splits:\n  - name: train\n"
        f"    num_bytes: {table.nbytes}\n    num_examples: {len(rows)}\n  download_size: {buffer.tell()}\n"
        f"  dataset_size: {table.nbytes}\n---\n# Alpaca-format sample\n"
    )
    return {"README.md": card.encode(), "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": buffer.getvalue()}


def lima_files(conversations: list[list[str]]) -> dict[str, bytes]:
    """Conversations as GAIR/lima lays them out: JSON lines per split at the top, beside its loading script."""
    lines = [json.dumps({"conversations": turns, "source": "test"}) for turns in conversations]
    return {
        "README.md": b"---\nlicense: other\n---\n# LIMA-format sample\n",
        "train.jsonl": "\n".join(lines[1:]).encode() + b"\n",
        "test.jsonl": lines[0].encode() + b"\n",
        "lima.py": b"raise SystemExit('a loading script must never run')\n",
    }


def sample_rows() -> list[dict]:
    return json.loads(SAMPLE_ROWS.read_text(encoding="utf-8"))


def serve_test_repos(hub: HubServer) -> HubServer:
    """The model (public, private and gated), the pickled one and the two dataset repos, one commit on main each."""
    files = model_files()
    for repo_id, access in ((MODEL_ID, {}), (PRIVATE_ID, {"private": True}), (GATED_ID, {"gated": True})):
        hub.add_repo(repo_id, **access)
        hub.commit(repo_id, files, message="Upload a tiny LLaMA")
    hub.add_repo(PICKLED_ID)
    pickled = {name: files[name] for name in ("config.json", *TOKENIZER_FILES)}
    hub.commit(PICKLED_ID, pickled | {"pytorch_model.bin": b"PK\x03\x04 pickled weights"}, message="Upload")
    hub.add_repo(ALPACA_ID, type="dataset")
    hub.commit(ALPACA_ID, alpaca_files(sample_rows()), type="dataset", message="Upload the rows")
    rows = sample_rows()[:12]
    conversations = [[row["instruction"], row["output"], "And again?", row["output"]] for row in rows]
    hub.add_repo(LIMA_ID, type="dataset")
    hub.commit(LIMA_ID, lima_files(conversations), type="dataset", message="Upload the conversations")
    return hub


def client_env(hub: HubServer, home: Path, *, token: str | None = TOKEN, offline: bool = False) -> dict[str, str]:
    """The environment of a client process: this hub, its own HF_HOME, no Xet (the server has none), no
    proxy, and the token only when asked for."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGING")) and "PROXY" not in k.upper()
    }
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1"}
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return env | ({"HF_TOKEN": token} if token else {}) | ({"HF_HUB_OFFLINE": "1"} if offline else {})
