"""GGUF k-quants (q4_k_m, q5_k_m, q6_k) by llama.cpp's own quantizer, through llama-cpp-python.

The `gguf` package writes f16 and q8_0 itself (artifacts/gguf.py) but has no k-quant encoder, and the
`_M` mixes are llama.cpp's choice per tensor (Q6_K for the output head and half of the attn_v and
ffn_down matrices, the named type elsewhere), so the f16 file is written first and handed to
`llama_model_quantize`, exactly what `llama-quantize model-f16.gguf out.gguf Q4_K_M` does.

k-quants pack rows in super-blocks of 256 values: a matrix whose rows are not a multiple of 256 long
(models with a hidden size of 64 or 128) gets another type from llama.cpp (Q5_0 for Q4_K, Q5_1 for Q5_K,
Q8_0 for Q6_K, F16 where 32 does not divide the row either); the export says how many matrices that concerned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError, InputError

# --type -> the name of llama.cpp's `llama_ftype` for it (an attribute of the llama_cpp module)
K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
K_BLOCK = 256
INSTALL = (
    "pip install 'finetune[llama-cpp]' (it builds llama.cpp from source; for a build that runs on other CPUs "
    'too, set CMAKE_ARGS="-DGGML_NATIVE=OFF")'
)


def require_quantizer(quant_type: str):
    """The llama_cpp module, when `quant_type` needs it and it loads; None for the types `gguf` writes.

    Raises:
        InputError: llama-cpp-python is not installed, or its library does not load.
    """
    if quant_type not in K_QUANTS:
        return None
    try:
        import llama_cpp
    except (ImportError, OSError) as error:  # not installed, or a build whose shared library cannot load
        raise InputError(
            f"--type {quant_type}: needs llama.cpp's quantizer, which cannot be loaded ({error}); {INSTALL}"
        ) from None
    return llama_cpp


def quantize_gguf(source: Path, target: Path, quant_type: str) -> None:
    """Quantize the f16 GGUF file `source` into `target` (a path that does not exist yet) with llama.cpp.

    Raises:
        FinetuneError: llama.cpp reports a failure.
    """
    import logging

    llama_cpp = require_quantizer(quant_type)
    # llama-cpp-python prints llama.cpp's log lines at its logger's level: one line per tensor here
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, K_QUANTS[quant_type])
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    finally:
        logger.setLevel(level)
    if status != 0 or not target.is_file():
        raise FinetuneError(f"llama.cpp could not quantize {source} to {quant_type} (status {status})")


def describe_types(path: Path, quant_type: str, echo: Callable[[str], None]) -> dict[str, int]:
    """Count the tensor types llama.cpp chose, and say how many matrices did not get a k-quant type."""
    import gguf

    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    matrices, other = 0, {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
        if len(tensor.shape) == 2:
            matrices += 1
            if not name.endswith("_K"):
                other[name] = other.get(name, 0) + 1
    if other:
        shown = ", ".join(f"{n} {name}" for name, n in sorted(other.items()))
        echo(
            f"{sum(other.values())} of {matrices} matrices are not {quant_type} ({shown}): llama.cpp k-quantizes "
            f"rows whose length is a multiple of {K_BLOCK} only"
        )
    return counts
