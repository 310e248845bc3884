"""One process of the FSDP2 check (tests/test_train_fsdp.py): our PEFT-wrapped tiny LLaMA sharded with
torch's `fully_shard` on a gloo CPU mesh, trained a few steps, its adapter gathered to rank 0.

    python tests/fsdp_worker.py MODEL_DIR OUT_FILE RANK WORLD_SIZE PORT
"""

from __future__ import annotations

import sys

STEPS, BATCH, SEQ, LR = 3, 4, 32, 1e-2


def build_model(model_dir: str):
    """The tiny LLaMA with a LoRA adapter (no dropout) exactly as `finetune run` wraps it, seeded."""
    import torch

    from finetune.model.adapters import wrap_adapter
    from finetune.model.load import load_model
    from finetune.recipe.schema import LoraSpec, ModelSpec

    torch.manual_seed(0)
    model = load_model(ModelSpec(name_or_path=model_dir, dtype="float32"), None, device="cpu")
    spec = LoraSpec(r=8, alpha=16, dropout=0.0)
    return wrap_adapter(model, spec, gradient_checkpointing=False, tokenizer_source=model_dir)


def batches():
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 500, (BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def train(model, rank: int = 0, world_size: int = 1) -> None:
    """AdamW steps on the same global batches; each rank takes its rows (all rows are full length, so the
    mean of the ranks' mean losses, which FSDP's gradient averaging computes, is the global mean)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for ids in batches():
        rows = ids.chunk(world_size)[rank]
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter_state(state_dict: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in state_dict.items() if "lora_" in name}


def main(model_dir: str, out: str, rank: int, world_size: int, port: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = build_model(model_dir)
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = sum(1 for p in model.parameters() if type(p).__name__ == "DTensor")
        train(model, rank, world_size)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # every rank takes part; rank 0 gets it all
        if rank == 0:
            torch.save({"adapter": adapter_state(state), "sharded_params": sharded}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    model_dir, out, rank, world_size, port = sys.argv[1:]
    main(model_dir, out, int(rank), int(world_size), int(port))
