"""Fine-tune LLaMA-family models from one YAML recipe."""

import logging

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, bitsandbytes warns at import (peft imports it) that the `kernels` package is
# missing. That package downloads kernels from a hub at run time, so we do without it by design, and the
# warning would only bury our own messages (it is printed before a bad recipe's one-line error).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
