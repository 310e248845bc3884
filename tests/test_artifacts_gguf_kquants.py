"""finetune export --format gguf --type q4_k_m|q5_k_m|q6_k: llama.cpp's k-quants of a LoRA run on a tiny LLaMA whose
rows are 256 wide (k-quant super-blocks), their tensor types and sizes, and (all need llama.cpp) how often
llama.cpp picks transformers' next token with them; an export with scrambled attention picks it far less.
Without llama-cpp-python the types are refused before anything is merged."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.artifacts import gguf_arch
from finetune.artifacts.gguf import convert, write_gguf
from finetune.artifacts.gguf_arch import Family
from finetune.artifacts.gguf_quantize import quantize_gguf
from finetune.cli import main
from finetune.data.formats.alpaca import format_prompt

from conftest import SAMPLE_DATA, require
from llama_cpp_check import field

pytestmark = pytest.mark.slow
TYPES = ("f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
# file type, the k-quant of most matrices, and Q6_K where the _M mix spends more bits (output head, some attn_v
# and ffn_down)
K_QUANT_TYPES = {"q4_k_m": (15, {"Q4_K", "Q6_K"}), "q5_k_m": (17, {"Q5_K", "Q6_K"}), "q6_k": (18, {"Q6_K"})}
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Add 123 and 4567."]


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as error:  # not installed, or a build that cannot load
        require(False, f"llama_cpp cannot be imported ({error}); pip install -e .[gguf-test]")
    return llama_cpp


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory, tiny_run):
    """(run folder with merged/, {type: GGUF file}) of a LoRA run on a tiny LLaMA of hidden size 256."""
    from finetune.model.tiny import TinyShape, build_tiny_llama

    llama_cpp_module()
    rows = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))
    texts = [value for row in rows for value in row.values() if value]
    shape = TinyShape(vocab_size=512, hidden_size=256, intermediate_size=512)
    base = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-256"), texts, seed=0, shape=shape)
    run_dir = tiny_run("wide", model={"name_or_path": str(base)})
    assert main(["merge", str(run_dir), "--no-verify"]) == 0
    assert main(["export", str(run_dir), "--format", "gguf", "--type", "q4_k_m"]) == 0
    files = {kind: run_dir / f"model-{kind}.gguf" for kind in TYPES}
    for kind in TYPES[:2] + TYPES[3:]:  # what the export does after its merge, once merged
        convert(run_dir / "merged", files[kind], kind, lambda _: None, tmp_path_factory.mktemp(kind), where=run_dir)
    return run_dir, files


@pytest.mark.gguf
def test_k_quants_hold_k_quant_matrices_and_are_smaller(wide_export):
    import gguf

    run_dir, files = wide_export
    sizes = {kind: path.stat().st_size for kind, path in files.items()}
    print("sizes (bytes):", sizes)
    assert sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"] < sizes["q8_0"] < sizes["f16"]
    for kind, (file_type, types) in K_QUANT_TYPES.items():
        reader = gguf.GGUFReader(files[kind])
        assert field(reader, "general.file_type") == file_type
        matrices = [t for t in reader.tensors if len(t.shape) == 2]
        assert {t.tensor_type.name for t in matrices} == types  # every matrix a k-quant, each of the mix
        assert all(t.tensor_type.name == "F32" for t in reader.tensors if len(t.shape) == 1)
    assert not list(run_dir.glob(".gguf-*"))  # the f16 file quantized from is gone


@functools.cache
def references(merged_dir) -> list[tuple[list[int], np.ndarray]]:
    """(prompt ids, transformers' next token at each position) for each of PROMPTS."""
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    found = []
    for prompt in PROMPTS:
        ids = [tokenizer.bos_token_id, *tokenizer(format_prompt(prompt), add_special_tokens=False).input_ids]
        with torch.no_grad():
            found.append((ids, model(torch.tensor([ids])).logits[0].numpy().argmax(-1)))
    return found


def agreement(path, merged_dir) -> float:
    """The share of prompt positions where llama.cpp's next token (the file at `path`) is transformers'."""
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    same = []
    try:
        for ids, reference in references(merged_dir):
            llm.reset()
            llm.eval(ids)
            same += list(np.array(llm.scores[: len(ids)]).argmax(-1) == reference)
        answer = llm(format_prompt(PROMPTS[0]), max_tokens=8, temperature=0.0)
        assert answer["usage"]["completion_tokens"] > 0  # it generates
    finally:
        llm.close()
    return float(np.mean(same))


@pytest.mark.gguf
def test_llama_cpp_runs_the_k_quants_near_transformers_and_a_broken_one_far(wide_export, monkeypatch, tmp_path):
    """Next-token agreement with transformers: reported per type, not required to be 100% for 4 bits; a q4_k_m
    of the same model with Q/K rows left unpermuted (llama.cpp rotates the wrong pairs) agrees far less."""
    run_dir, files = wide_export
    found = {kind: agreement(path, run_dir / "merged") for kind, path in files.items()}
    print("next-token agreement with transformers:", {kind: f"{share:.0%}" for kind, share in found.items()})
    monkeypatch.setitem(gguf_arch.FAMILIES, "llama", Family("llama", permute_qk=False))
    write_gguf(run_dir / "merged", tmp_path / "broken-f16.gguf", "f16", echo=lambda _: None)
    quantize_gguf(tmp_path / "broken-f16.gguf", tmp_path / "broken-q4_k_m.gguf", "q4_k_m")
    broken = agreement(tmp_path / "broken-q4_k_m.gguf", run_dir / "merged")
    print(f"broken q4_k_m: {broken:.0%}")
    assert found["f16"] >= 0.95
    assert min(found["q4_k_m"], found["q5_k_m"], found["q6_k"]) > broken + 0.15


@pytest.mark.gguf
def test_a_narrow_model_says_which_matrices_llama_cpp_kept_in_other_types(tiny_model_dir, tmp_path):
    """Rows of 64 (the suite's tiny LLaMA) are no multiple of 256: llama.cpp writes Q5_0 instead, and says so."""
    import gguf

    llama_cpp_module()
    out, said = tmp_path / "narrow.gguf", []
    convert(tiny_model_dir, out, "q4_k_m", said.append, tmp_path, where=tiny_model_dir)
    matrices = [t for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2]
    other = [t for t in matrices if not t.tensor_type.name.endswith("_K")]
    assert other, "every matrix got a k-quant type"
    assert any(line.startswith(f"{len(other)} of {len(matrices)} matrices are not q4_k_m") for line in said)


def test_k_quants_without_llama_cpp_are_refused_before_any_merge(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir = tiny_run("lora")
    before = sorted(path.name for path in run_dir.iterdir())
    capsys.readouterr()  # what training printed
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    for export_format in ("gguf", "ollama"):
        args = ["export", str(run_dir), "--format", export_format, "--type", "q5_k_m"]
        assert main([*args, "--out", str(tmp_path / export_format)]) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("error: --type q5_k_m: needs llama.cpp's quantizer, which cannot be loaded")
        assert message.endswith("pip install 'finetune[llama-cpp]' (it builds llama.cpp from source; for a build "
                                'that runs on other CPUs too, set CMAKE_ARGS="-DGGML_NATIVE=OFF")')  # fmt: skip
    assert sorted(path.name for path in run_dir.iterdir()) == before
    assert list(tmp_path.iterdir()) == []
