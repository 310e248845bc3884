"""Several processes: accelerate configs parse with the settings the code relies on; 2-process DDP on CPU
(accelerate_configs/cpu_ddp.yaml) trains the same adapter as 1 process at the same global batch and
writes one run folder; silent fallbacks are refused before launching."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_resume import losses, wait_for

from finetune.cli import main
from finetune.errors import InputError
from finetune.recipe.load import load_recipe
from finetune.run_folder import RunDir, read_sample_steps
from finetune.train.callbacks import HANG_AT_SAVE_ENV
from finetune.train.checkpoints import COMPLETE_MARKER
from finetune.train.launch import check_launch, read_accelerate_config

from conftest import REPO, SAMPLE_DATA

CONFIGS = REPO / "accelerate_configs"
FSDP_CONFIGS = ("fsdp.yaml", "fsdp_qlora.yaml", "multi_node.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_accelerate_config_parses_with_a_header_comment(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("# ") and "accelerate" in text.split("\n\n")[0] + text[:600]
    config = read_accelerate_config(str(CONFIGS / name))
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "FSDP")
    assert config["use_cpu"] is False  # use_cpu: true makes accelerate start a single process
    assert config["mixed_precision"] == "no"  # precision comes from the recipe


@pytest.mark.parametrize("name", FSDP_CONFIGS)
def test_fsdp_configs_shard_decoder_layers_as_the_code_expects(name):
    fsdp = read_accelerate_config(str(CONFIGS / name))["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FSDP2, full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # the model's own layer class: see below
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_activation_checkpointing"] is False  # the recipe's gradient checkpointing does it


def fsdp_shard_units(model, layer_class_names):
    """The modules accelerate's own FSDP2 wrap policy makes shard units of, for a TRANSFORMER_BASED_WRAP
    config naming `layer_class_names` (None: the key left out)."""
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = SimpleNamespace(
        auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=layer_class_names
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [module for module in model.modules() if policy(module)]


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_the_fsdp_configs_shard_every_decoder_layer_of_each_family(family, family_model_dir):
    """Left to accelerate, the shard units are exactly the decoder layers, under a LoRA wrapper too; naming
    LlamaDecoderLayer, as these configs once did, cannot even start a Mistral or Qwen2 model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(family_model_dir(family)), LoraConfig(r=2))
    layers = list(model.base_model.model.model.layers)
    assert fsdp_shard_units(model, None) == layers
    if family in ("mistral", "qwen2"):
        with pytest.raises(ValueError, match="Could not find the transformer layer class LlamaDecoderLayer"):
            fsdp_shard_units(model, ["LlamaDecoderLayer"])


def test_cpu_ddp_config_runs_two_cpu_processes():
    config = read_accelerate_config(str(CONFIGS / "cpu_ddp.yaml"))
    # accelerate starts processes with torchrun for MULTI_GPU only; MULTI_CPU would run one process
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2


def test_fsdp_without_cuda_is_refused_before_launching(write_recipe, tmp_path, capsys):
    recipe = write_recipe()
    code = main(["run", str(recipe), "--accelerate-config", str(CONFIGS / "fsdp.yaml")])
    assert code == 2
    assert "asks for FSDP, which needs CUDA GPUs and this run has none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fsdp_qlora_needs_storage_in_the_compute_dtype(write_recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the check that follows the GPU check
    config = read_accelerate_config(str(CONFIGS / "fsdp_qlora.yaml"))
    recipe = load_recipe(write_recipe(), ["quant.bits=4", "train.precision=bf16"])
    with pytest.raises(
        Exception, match="quant.storage_dtype: FSDP shards tensors of one dtype.*set quant.storage_dtype: bfloat16"
    ):
        check_launch(recipe, config, "fsdp_qlora.yaml")
    check_launch(
        recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"storage_dtype": "bfloat16"})}),
        config,
        "fsdp_qlora.yaml",
    )


@pytest.mark.parametrize("change", [{"use_cpu": True}, {"distributed_type": "MULTI_CPU"}])
def test_configs_that_would_run_one_process_are_refused(write_recipe, tmp_path, capsys, change):
    config = yaml.safe_load((CONFIGS / "cpu_ddp.yaml").read_text()) | change
    path = tmp_path / "one_process.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(write_recipe()), "--accelerate-config", str(path)]) == 2
    assert "accelerate starts one process, not 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_launch_into_a_non_empty_folder_is_refused_before_any_process_starts(write_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    config = str(CONFIGS / "cpu_ddp.yaml")
    assert main(["run", str(write_recipe(train={"use_cpu": True})), "--accelerate-config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("is not empty; pass --overwrite") == 1 and "ChildFailedError" not in err
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_only_the_main_process_checks_the_run_folder(tmp_path, monkeypatch):
    # Rank 0 may have begun writing (or emptying) the run folder before a slower rank claims it.
    (tmp_path / "recipe.yaml").write_text("written by rank 0")
    monkeypatch.setenv("RANK", "1")
    assert RunDir.claim(tmp_path, overwrite=False).path == tmp_path
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="is not empty"):
        RunDir.claim(tmp_path, overwrite=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_config(tmp_path_factory) -> Path:
    """accelerate_configs/cpu_ddp.yaml on a free port."""
    path = tmp_path_factory.mktemp("accelerate") / "cpu_ddp.yaml"
    path.write_text(
        yaml.safe_dump(yaml.safe_load((CONFIGS / "cpu_ddp.yaml").read_text()) | {"main_process_port": free_port()})
    )
    return path


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, ddp_config, tmp_path_factory) -> Path:
    """A 2-process DDP run on CPU of 6 steps, checkpoints at 3 and 6, trained through the CLI once per module: the
    reference of one process at the same global batch, and of a launched run that is killed and resumed."""
    folder = tmp_path_factory.mktemp("ddp")
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 256, "max_rows": 32},
        "train": {"max_steps": 6, "save_steps": 3, "micro_batch_size": 2, "grad_accum": 1, "use_cpu": True,
                  "lr": 1e-2, "gradient_checkpointing": False, "logging_steps": 1},
        "eval": {"samples": 1, "samples_every": 3},  # generated by the main process alone, while the other waits
        "output": {"dir": str(folder / "run"), "report": False, "trackers": []},
    }  # fmt: skip
    (folder / "ddp.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["run", str(folder / "ddp.yaml"), "--accelerate-config", str(ddp_config)]) == 0
    return folder / "run"


def recipe_of(run: Path, out: Path, path: Path) -> Path:
    """`run`'s recipe, written to `path` with output.dir `out`."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["output"]["dir"] = str(out)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_two_process_ddp_trains_like_one_process_at_the_same_global_batch(ddp_run, tmp_path):
    # the same recipe at one process with twice the micro-batch
    single = recipe_of(ddp_run, tmp_path / "single", tmp_path / "single.yaml")
    assert main(["run", str(single), "train.micro_batch_size=4"]) == 0

    two, one = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (ddp_run, tmp_path / "single"))
    assert two.keys() == one.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    records = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps))  # one process logged: no step twice
    assert json.loads((ddp_run / "summary.json").read_text())["steps"] == 6
    assert [record["step"] for record in read_sample_steps(RunDir(ddp_run))] == [3, 6]  # once each
    assert [p.name for p in ddp_run.parent.iterdir() if p.is_dir()] == [ddp_run.name]  # one run folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="what accelerate does with an FSDP config without CUDA")
def test_accelerate_turns_an_fsdp_launch_on_cpu_into_ddp_or_unsynchronised_processes(tiny_model_dir, tmp_path):
    # Why FSDP cannot be tested here and is refused on CPU: accelerate 1.15 (state.py, AcceleratorState) turns
    # ACCELERATE_USE_FSDP into DistributedType.FSDP only for MULTI_GPU and the other accelerator types; CPU
    # processes are MULTI_CPU (gloo) with use_cpu, and DistributedType.NO without it.
    config = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text()) | {"main_process_port": free_port()}
    config_path = tmp_path / "fsdp.yaml"
    config_path.write_text(yaml.safe_dump(config))
    seen = {}
    for device in ("cpu", "default"):
        out = tmp_path / device
        out.mkdir()
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path)]
        command += [str(REPO / "tests" / "accelerate_fsdp_probe.py"), str(tiny_model_dir), str(out), device]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        seen[device] = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    unsharded = {"is_fsdp_enabled": False, "sharded_parameters": 0}
    ddp = {"distributed_type": "MULTI_CPU", "world_size": 2, "wrapper": "DistributedDataParallel"}
    alone = {"distributed_type": "NO", "world_size": 1, "wrapper": "LlamaForCausalLM"}
    assert seen == {"cpu": [ddp | unsharded] * 2, "default": [alone | unsharded] * 2}


def test_a_process_launched_for_fsdp_on_cpu_stops_before_loading(write_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    assert main(["run", str(write_recipe(train={"use_cpu": True}))]) == 2
    assert "accelerate was asked for FSDP, which needs CUDA GPUs, and this process trains on CPU" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_adapter(ddp_run, ddp_config, tmp_path):
    resumed = tmp_path / "resumed"
    recipe = recipe_of(ddp_run, resumed, tmp_path / "resumed.yaml")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(recipe), "--accelerate-config", str(ddp_config)],
        cwd=REPO,
        env={**os.environ, HANG_AT_SAVE_ENV: "6"},  # checkpoint-6 is written but never marked complete
        start_new_session=True,  # its own process group: the launcher and both training processes die together
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = resumed / "checkpoints"
    wait_for(
        lambda: (checkpoints / "checkpoint-3" / COMPLETE_MARKER).is_file() and (checkpoints / "checkpoint-6").is_dir(),
        launcher,
    )
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert not (resumed / "summary.json").exists() and not (resumed / "adapter").exists()  # it never finished

    assert main(["run", str(recipe), "--accelerate-config", str(ddp_config), "--resume"]) == 0
    whole, again = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (ddp_run, resumed))
    assert whole.keys() == again.keys() and len(whole) > 0
    for name in whole:
        assert again[name].equal(whole[name]), name  # gloo all-reduce on CPU is deterministic
    assert losses(resumed) == losses(ddp_run) and sorted(losses(resumed)) == list(range(1, 7))
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 6
