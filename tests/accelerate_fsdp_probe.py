"""One process launched by `accelerate launch` with an FSDP config (tests/test_train_distributed.py): says
what the Trainer makes of it on this machine, one line per process.

    accelerate launch --config_file FSDP_CONFIG tests/accelerate_fsdp_probe.py MODEL_DIR OUT_DIR cpu|default
"""

from __future__ import annotations

import json
import os
import sys


def main(model_dir: str, out_dir: str, device: str) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out_dir, use_cpu=device == "cpu", report_to=[])
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args)
    prepared = trainer.accelerator.prepare_model(trainer.model)
    seen = {
        "distributed_type": str(trainer.accelerator.state.distributed_type.value),
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "world_size": args.world_size,
        "wrapper": type(prepared).__name__,
        "sharded_parameters": sum(type(p).__name__ == "DTensor" for p in prepared.parameters()),
    }
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
