"""Several data sets in one recipe: each with its own format, weighted, split on its own."""

from __future__ import annotations

from collections import Counter

import pytest

from finetune.data.build import build_datasets, weighted
from finetune.errors import RecipeError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import DataSpec, GoatSpec, SourceSpec

from conftest import REPO, SAMPLE_DATA

LIMA = str(REPO / "data" / "lima_sample.jsonl")


def origin(sample) -> str:
    return "goat" if sample.row.startswith("goat") else "lima" if "lima" in sample.row else "alpaca"


def test_three_formats_mix_with_weights_and_caps(tokenizer):
    spec = DataSpec(
        sources=[
            SourceSpec(format="alpaca", path=str(SAMPLE_DATA), max_rows=20),
            SourceSpec(format="lima", path=LIMA, max_rows=10, weight=2),
            SourceSpec(format="goat", goat=GoatSpec(n=40, ops=["add"]), weight=0.5),
        ],
        max_seq_len=4096,
    )
    data = build_datasets(spec, tokenizer, seed=0)
    assert Counter(origin(s) for s in data.train) == {"alpaca": 20, "lima": 20, "goat": 20}
    assert data.report.rows_read == 70
    assert data.report.source == f"{SAMPLE_DATA} + {LIMA} + goat generator (seed 0)"


def test_each_source_is_split_alone_and_weights_never_reach_eval(tokenizer):
    alpaca = SourceSpec(format="alpaca", path=str(SAMPLE_DATA), max_rows=40)
    alone = build_datasets(DataSpec(sources=[alpaca], eval_fraction=0.25), tokenizer, seed=3)
    mixed = build_datasets(
        DataSpec(
            sources=[alpaca, SourceSpec(format="lima", path=LIMA, weight=3)], eval_fraction=0.25, max_seq_len=4096
        ),
        tokenizer,
        seed=3,
    )
    assert [s.row for s in mixed.eval if origin(s) == "alpaca"] == [s.row for s in alone.eval]
    assert len([s for s in mixed.eval if origin(s) == "lima"]) == 13  # 25% of 50, not of 150
    assert not {s.row for s in mixed.eval} & {s.row for s in mixed.train}


def test_weighted_repeats_and_samples():
    items = list(range(10))
    assert weighted(items, 1.0, 0) == items
    assert weighted(items, 2.0, 0) == items + items
    half = weighted(items, 0.5, 0)
    assert len(half) == 5 and set(half) <= set(items) and half == weighted(items, 0.5, 0)
    assert Counter(weighted(items, 1.5, 0)).most_common(1)[0][1] == 2


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"sources": [{"path": str(SAMPLE_DATA)}], "format": None},
            "data.path: data.sources replaces it; set it on each source",
        ),
        (
            {"path": None, "format": None, "sources": [{"format": "alpaca"}]},
            "data.sources.0: needs a path (or goat to generate rows)",
        ),
        (
            {"path": None, "format": None, "sources": [{"path": "/no/such.json"}]},
            "data.sources.0.path: no such file: /no/such.json",
        ),
        (
            {"path": None, "format": None, "sources": [{"path": str(SAMPLE_DATA), "wieght": 2}]},
            "data.sources.0.wieght: unknown key",
        ),
    ],
)
def test_source_problems_are_located(data, expected, write_recipe):
    path = write_recipe(data=data)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    [problem] = [str(p) for p in raised.value.problems]
    assert expected in problem and problem.startswith(f"{path}:")


def test_a_mixed_recipe_trains(write_recipe, tmp_path):
    from finetune.cli import main

    sources = [
        {"format": "alpaca", "path": str(SAMPLE_DATA), "max_rows": 16},
        {"format": "lima", "path": LIMA, "max_rows": 8},
    ]
    path = write_recipe(data={"path": None, "format": None, "sources": sources, "max_seq_len": 512})
    assert main(["run", str(path), "train.max_steps=2"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
