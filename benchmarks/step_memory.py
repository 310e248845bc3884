"""Peak memory of one training step per adaptation method on the same model and data, with and without
gradient checkpointing: the process's peak RSS, the tensors resident before a step (weights, buffers,
gradients, optimizer state) and the peak of the tensors allocated during the step on top of them
(activations, gradients, optimizer temporaries).

    python benchmarks/step_memory.py                  # the proportioned model (3.5M parameters), 4 steps
    python benchmarks/step_memory.py --model tiny     # data/tiny-llama instead
    python benchmarks/step_memory.py --quick          # data/tiny-llama, 2 steps, LoRA only (the test's smoke run)

Each configuration trains in its own process (`finetune.pipeline.run` on recipes/quickstart.yaml with the
method's keys as overrides, no eval, no report), so peak RSS is that configuration's alone. Every step but
the first is measured and the step with the highest peak is reported: the first step also creates the
optimizer state, which later steps find resident. On CPU torch keeps no allocation peak, so a step runs under
torch.profiler and its peak is the running total of the allocator's raw records; on CUDA it is
torch.cuda.max_memory_allocated. Prefix-tuning cannot train with gradient checkpointing (the recipe check
refuses it): that row reads n/a. The largest single allocation shows when one buffer decides the peak.
Writes the table into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from child import run_child
from models import model_folder
from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
MiB = 2**20
METHODS = {
    "lora": [],
    "qlora nf4": ["quant.bits=4", "quant.type=nf4"],
    "full": ["adapter={kind: none}"],
    "prefix": ["adapter={kind: prefix, num_virtual_tokens: 16}"],
}
# --quick: both LoRA rows, and the refused prefix row, which needs no training
QUICK = (("lora", False), ("lora", True), ("prefix", True))
BASELINE = ("lora", False)  # the configuration the ratio line divides by


def peak_live_bytes(records: list[tuple[int, int]]) -> int:
    """The highest running total of (time, +bytes allocated / -bytes freed) records, taken in time order."""
    live = peak = 0
    for _, nbytes in sorted(records, key=lambda record: record[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def allocation_records(profiler) -> list[tuple[int, int]]:
    """(start ns, signed bytes) of every CPU allocator record in a finished torch.profiler.profile.

    Only the raw "[memory]" records: an op's cpu_memory_usage also counts the allocations of the ops it
    calls, so summing it over all events counts nested allocations more than once. A free of a block
    allocated before the profiler started has no record, so the total is what the window allocated.
    """
    from torch.autograd import DeviceType

    events = profiler.profiler.kineto_results.events()
    return [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]


def resident_tensor_bytes(model, optimizer) -> int:
    """Bytes of the model's weights, buffers and gradients and the optimizer's state, each storage once."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class StepMeter:
    """Measures the windows between start() and stop(): tensors resident at the start, peak allocated within."""

    def __init__(self):
        self.steps: list[dict] = []  # per window: resident bytes, peak bytes, largest allocation (None on CUDA)
        self._profiler = None
        self._resident = None

    @property
    def running(self) -> bool:
        return self._resident is not None

    def start(self, model, optimizer) -> None:
        import torch

        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._resident = torch.cuda.memory_allocated()
            return
        self._resident = resident_tensor_bytes(model, optimizer)
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()

    def stop(self) -> None:
        import torch

        if self._profiler is None:
            torch.cuda.synchronize()
            peak, largest = torch.cuda.max_memory_allocated() - self._resident, None
        else:
            self._profiler.stop()
            records = allocation_records(self._profiler)
            peak, largest = peak_live_bytes(records), max((n for _, n in records), default=0)
            self._profiler = None
        self.steps.append({"resident": self._resident, "peak": peak, "largest": largest})
        self._resident = None


def step_meter_callback(meter: StepMeter, first_step: int):
    """A TrainerCallback running `meter` around every optimizer step from `first_step` (0-based) on.

    A step runs from on_step_begin (batch already fetched) through forward, backward and the optimizer step to
    on_step_end. transformers is imported here, not at the top: it takes seconds, and the parent needs none of it.
    """
    from transformers import TrainerCallback

    class MeasureSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step >= first_step:
                meter.start(model, optimizer)

        def on_step_end(self, args, state, control, **kwargs):
            if meter.running:
                meter.stop()

    return MeasureSteps()


def child(overrides: list[str]) -> None:
    """Train once in this process with the step meter attached and print the figures as JSON."""
    import finetune.train.trainer as trainer_module
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

    meter = StepMeter()
    build_trainer = trainer_module.build_trainer

    # pipeline.run takes no callbacks; it imports build_trainer when it runs, so wrapping the module's function
    # attaches the meter to the very trainer a run builds.
    def build_metered_trainer(*args, callbacks=(), **kwargs):
        return build_trainer(*args, callbacks=[*callbacks, step_meter_callback(meter, first_step=1)], **kwargs)

    trainer_module.build_trainer = build_metered_trainer
    result = run(load_recipe(RECIPE, overrides), echo=lambda _: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    worst = max(meter.steps, key=lambda step: step["resident"] + step["peak"])
    figures = {
        "trainable_params": result.summary["trainable_params"],
        "peak_rss_mib": peak_kib / 1024,
        "resident_mib": worst["resident"] / MiB,
        "step_peak_mib": worst["peak"] / MiB,
        "largest_allocation_mib": None if worst["largest"] is None else worst["largest"] / MiB,
        "measured_steps": len(meter.steps),
    }
    print(json.dumps(figures))


def overrides_for(method: str, checkpointing: bool, model: Path, steps: int, out: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        *METHODS[method],
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        f"train.max_steps={steps}",
        "train.save_steps=100000",
        "data.eval_fraction=0",  # memory of training steps only: no eval pass before or after
        "data.cache=false",
        "eval.samples=0",
        "output.report=false",
        "output.trackers=[]",
        f"output.dir={out}",
    ]


def refusal(overrides: list[str]) -> str | None:
    """Why the recipe check refuses these overrides, or None when it accepts them."""
    from finetune.errors import RecipeError
    from finetune.recipe.load import load_recipe

    try:
        load_recipe(RECIPE, overrides)
    except RecipeError as error:
        return error.problems[0].message
    return None


def measure(overrides: list[str]) -> dict:
    return run_child(__file__, overrides)


def tensor_peak(figures: dict) -> float:
    return figures["resident_mib"] + figures["step_peak_mib"]


def switch(checkpointing: bool) -> str:
    return "on" if checkpointing else "off"


def table_row(method: str, checkpointing: bool, figures: dict | None) -> str:
    if figures is None:
        return f"| {method} | {switch(checkpointing)} | n/a | n/a | n/a | n/a | n/a | n/a |"
    largest = figures["largest_allocation_mib"]
    cells = [
        method,
        switch(checkpointing),
        f"{figures['trainable_params']:,}",
        f"{figures['peak_rss_mib']:.0f}",
        f"{figures['resident_mib']:.1f}",
        f"{figures['step_peak_mib']:.1f}",
        f"{tensor_peak(figures):.1f}",
        "-" if largest is None else f"{largest:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def ratio_lines(measured: dict[tuple[str, bool], dict | None], refused: dict[tuple[str, bool], str]) -> list[str]:
    """Each configuration's tensor peak against the baseline's, and what checkpointing saves per method."""
    base = tensor_peak(measured[BASELINE])
    relative = ", ".join(
        f"{method}{' + checkpointing' if on else ''} {tensor_peak(figures) / base:.2f}x"
        for (method, on), figures in measured.items()
        if figures is not None
    )
    savings = []
    for method in dict.fromkeys(method for method, _ in measured):
        off, on = measured.get((method, False)), measured.get((method, True))
        saving = "n/a" if off is None or on is None else f"{1 - on['step_peak_mib'] / off['step_peak_mib']:.0%}"
        savings.append(f"{method} {saving}")
    lines = [
        f"- tensor peak relative to {BASELINE[0]} without checkpointing: {relative}",
        f"- gradient checkpointing's saving on the step's peak allocation: {', '.join(savings)}",
    ]
    for (method, on), why in refused.items():
        lines.append(f"- {method} with checkpointing {switch(on)}: n/a, the recipe refuses it: {why}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="data/tiny-llama, 2 steps, LoRA only")
    parser.add_argument("--model", choices=("proportioned", "tiny"), default="proportioned")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (at least 2)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    model_name, steps = ("tiny", 2) if args.quick else (args.model, max(2, args.steps))
    configurations = QUICK if args.quick else tuple((method, on) for method in METHODS for on in (False, True))

    measured, refused = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        model = model_folder(model_name, Path(scratch))
        for method, checkpointing in configurations:
            out = Path(scratch) / f"{method.replace(' ', '_')}-{switch(checkpointing)}"
            overrides = overrides_for(method, checkpointing, model, steps, out)
            why = refusal(overrides)
            if why is not None:
                refused[(method, checkpointing)] = why
            measured[(method, checkpointing)] = None if why else measure(overrides)
    rows = [
        "| method | gradient checkpointing | trainable params | peak RSS MiB | tensors resident before the step MiB "
        "| peak allocated during the step MiB | tensor peak MiB (resident + step) | largest single allocation MiB |",
        "|---|---|---|---|---|---|---|---|",
        *(table_row(method, on, figures) for (method, on), figures in measured.items()),
    ]
    table = "\n".join(rows) + "\n\n" + "\n".join(ratio_lines(measured, refused))
    print(table)
    model_label = "data/tiny-llama" if model_name == "tiny" else "3.5M-parameter proportioned LLaMA"
    header = (
        f"## step_memory (one training step's peak memory per method, {model_label}, micro-batch 8, "
        f"highest of {f'steps 2-{steps}' if steps > 2 else 'step 2'}; `python benchmarks/step_memory.py`)\n\n"
        f"{machine_line('torch', 'transformers', 'peft', 'trl', 'bitsandbytes')}\n\n"
    )
    write_section(args.results, "step_memory", header + table + "\n")


if __name__ == "__main__":
    main()
