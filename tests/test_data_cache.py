"""The tokenized-data cache: hits only when nothing the tokens depend on has changed."""

from __future__ import annotations

import json

import pytest

from finetune.data import cache
from finetune.data.build import build_datasets
from finetune.recipe.schema import DataSpec

from conftest import SAMPLE_DATA


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def build(spec, tokenizer, seed=0):
    return build_datasets(spec, tokenizer, seed)


def test_second_build_is_a_hit_with_identical_samples(fresh_cache, tokenizer):
    spec = DataSpec(path=str(SAMPLE_DATA), eval_fraction=0.1)
    first, second = build(spec, tokenizer), build(spec, tokenizer)
    assert (first.report.cache, second.report.cache) == ("miss", "hit")
    assert (second.train, second.eval) == (first.train, first.eval)
    assert second.report.fingerprint == first.report.fingerprint
    assert len(list(fresh_cache.glob("*.json"))) == 1


def test_any_change_the_tokens_depend_on_is_a_miss(fresh_cache, tokenizer, tmp_path):
    spec = DataSpec(path=str(SAMPLE_DATA))
    build(spec, tokenizer)
    assert build(spec.model_copy(update={"max_seq_len": 128}), tokenizer).report.cache == "miss"
    assert build(spec, tokenizer, seed=1).report.cache == "miss"
    rows = json.loads(SAMPLE_DATA.read_text())
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([{**rows[0], "output": "Different."}, *rows[1:]]))
    assert build(spec.model_copy(update={"path": str(changed)}), tokenizer).report.cache == "miss"


def test_a_changed_tokenizer_or_template_is_a_miss(fresh_cache, tokenizer, tmp_path, tiny_model_dir):
    from finetune.model.load import load_tokenizer
    from finetune.recipe.schema import ModelSpec

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversations": ["Hi?", "Hello."]}) + "\n")
    spec = DataSpec(format="lima", path=str(chat), chat_template="lima")
    build(spec, tokenizer)
    assert build(spec, tokenizer).report.cache == "hit"
    assert build(spec.model_copy(update={"chat_template": "chatml"}), tokenizer).report.cache == "miss"
    other = load_tokenizer(ModelSpec(name_or_path=str(tiny_model_dir)))
    other.add_tokens(["<extra>"])
    assert build(spec, other).report.cache == "miss"


def test_cache_off_writes_nothing_and_a_corrupt_entry_is_rebuilt(fresh_cache, tokenizer):
    spec = DataSpec(path=str(SAMPLE_DATA))
    assert build(spec.model_copy(update={"cache": False}), tokenizer).report.cache == "off"
    assert not fresh_cache.exists()
    build(spec, tokenizer)
    [entry] = fresh_cache.glob("*.json")
    entry.write_text("{not json")
    assert build(spec, tokenizer).report.cache == "miss"
