"""The experiment trackers of a run (output.trackers): TensorBoard, Weights & Biases, MLflow.

transformers' own integrations log the metrics: trainer.py names wandb and mlflow in `report_to` (and
attaches TensorBoardCallback itself, for its folder). This module prepares what they log into. It starts
the W&B and MLflow runs before training, so that WandbCallback and MLflowCallback log into the active run
instead of starting their own (both do so by design): named after the run folder, the resolved recipe as
their config, the run folder's absolute path among it, their files in the run folder unless the user's
environment says otherwise. It records those runs in trackers.json, continues the same runs on --resume,
and ends them. Only the main process does any of this, and the integrations log from that process alone.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from finetune.errors import InputError, Interrupted
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, is_main_process, read_json

# tracker -> (module it needs, the extra that installs it); TensorBoard is a dependency of finetune itself
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
DEFAULT_PROJECT = "finetune"  # W&B project and MLflow experiment, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
RUN_FOLDER_KEY = "run_folder"  # W&B config key and (prefixed) MLflow tag holding the run folder's path

Echo = Callable[[str], None]


def check_tracker_packages(trackers: list[str]) -> None:
    """Raises InputError for a tracker whose package cannot be imported, naming the extra that installs it.

    Run before any model loads: a missing package would otherwise fail the Trainer after minutes of loading.
    """
    import importlib

    for name in trackers:
        if name not in TRACKER_PACKAGES:
            continue
        module, extra = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise InputError(
                f"output.trackers: {name} needs the {module} package: pip install 'finetune[{extra}]'"
            ) from None


def tracker_integrations(trackers: list[str]) -> list[str]:
    """The `report_to` names: the trackers transformers attaches itself (TensorBoard is attached by trainer.py)."""
    return [name for name in trackers if name in TRACKER_PACKAGES]


@contextlib.contextmanager
def tracking(recipe: Recipe, run_dir: RunDir, *, resumed_from: str | None, echo: Echo) -> Iterator[None]:
    """Around training: the W&B and MLflow runs of output.trackers, started (or, resuming, continued from
    trackers.json), recorded in trackers.json, and ended as training ends (failed if it raised)."""
    names = tracker_integrations(recipe.output.trackers)
    if not names or not is_main_process():
        yield
        return
    previous = read_json(run_dir.trackers) if resumed_from else {}
    starters = {"wandb": WandbRun, "mlflow": MlflowRun}
    with contextlib.ExitStack() as stack:
        runs = {}
        for name in names:
            runs[name] = starters[name](recipe, run_dir, previous.get(name), resumed_from)
            stack.push(runs[name].end)
        record = {name: run.record for name, run in runs.items()}
        # a tracker dropped on resume keeps its entry: the runs it names still hold the first steps
        run_dir.write_json(run_dir.trackers, previous | record)
        for name, entry in record.items():
            where = f"at {entry['url']}" if entry["url"] else f"in {entry['local']}"
            continued = (previous.get(name) or {}).get("id")
            if continued and continued != entry["id"]:
                echo(f"{name}: run {continued} of {run_dir.trackers.name} cannot be continued here; a new run follows")
            echo(f"{name}: run {entry['id']} {where}")
        yield


def flat_recipe(recipe: Recipe) -> dict:
    """The resolved recipe as one level of dotted keys (`train.lr`), as trackers show a run's config."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", recipe.model_dump(mode="json"))
    return flat


def outcome(error: type[BaseException] | None) -> str:
    """finished / interrupted / failed, from the exception (if any) that ended training."""
    if error is None:
        return "finished"
    return "interrupted" if issubclass(error, (Interrupted, KeyboardInterrupt)) else "failed"


class WandbRun:
    """A Weights & Biases run for the run folder: offline files in RUN/wandb unless the user can upload."""

    EXIT_CODES = {"finished": 0, "interrupted": 130, "failed": 1}

    def __init__(self, recipe: Recipe, run_dir: RunDir, previous: dict | None, resumed_from: str | None):
        import wandb

        options = {"project": os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), "name": run_dir.path.name}
        if "WANDB_DIR" not in os.environ:
            options["dir"] = str(run_dir.path)
        if "WANDB_MODE" not in os.environ and not wandb_logged_in():
            options["mode"] = "offline"  # nothing to upload with, and nothing to wait for: `wandb sync` later
        if previous:
            options |= {"id": previous["id"], "resume": "allow"}
        self.run = wandb.init(**options)
        # set after init: a resumed run's config may already hold these keys (allow_val_change)
        config = flat_recipe(recipe) | {RUN_FOLDER_KEY: str(run_dir.path.absolute())}
        if resumed_from:
            config["resumed_from"] = resumed_from
        self.run.config.update(config, allow_val_change=True)
        # the files folder of a W&B run is uploaded with it (wandb.save would symlink, and warn about it)
        shutil.copyfile(run_dir.recipe, Path(self.run.dir) / run_dir.recipe.name)
        offline = self.run.offline
        local = str(Path(self.run.dir).parent.absolute())
        self.record = {
            "id": self.run.id,
            "project": self.run.project,
            "mode": "offline" if offline else "online",
            "local": local,
            # each attempt of a resumed offline run is its own folder; `wandb sync` uploads them in order
            "attempts": [*(previous or {}).get("attempts", []), local],
            "url": None if offline else self.run.url,
        }

    def end(self, error_type, error, traceback) -> None:
        self.run.finish(exit_code=self.EXIT_CODES[outcome(error_type)])


def wandb_logged_in() -> bool:
    """The user can upload to W&B: an API key or identity token in the environment, or a netrc entry for the
    W&B host (what `wandb login` writes). Read locally; nothing is contacted."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MlflowRun:
    """An MLflow run for the run folder: in a file store at RUN/mlruns unless MLFLOW_TRACKING_URI is set."""

    STATUSES = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, recipe: Recipe, run_dir: RunDir, previous: dict | None, resumed_from: str | None):
        import mlflow

        self.mlflow = mlflow
        self.local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.path / "mlruns").absolute().as_uri()
        self.allowed_file_store = self.local and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
        if self.allowed_file_store:
            # mlflow 3 refuses its file store unless told otherwise; the alternative, sqlite, needs
            # sqlalchemy, which mlflow-skinny leaves out
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        if self.local:
            mlflow.set_tracking_uri(uri)  # MLflowCallback logs through the global tracking URI
        try:
            self.record = self._start(recipe, run_dir, uri, previous, resumed_from)
        except BaseException:
            self._restore()
            raise

    def _start(self, recipe: Recipe, run_dir: RunDir, uri: str, previous: dict | None, resumed_from: str | None):
        """Start (or continue) the run; its entry of trackers.json."""
        from mlflow import MlflowClient

        mlflow = self.mlflow
        client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        # the same store: the same tracking URI, or the local store of this folder (which may have moved)
        same_store = previous and (previous.get("tracking_uri") == uri or (previous.get("local") and self.local))
        run_id = previous["id"] if same_store else None
        if run_id and not _run_exists(client, run_id):
            run_id = None  # its store was removed: a new run, which `tracking` points out
        tags = {f"finetune.{RUN_FOLDER_KEY}": str(run_dir.path.absolute())}
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
            mlflow.set_tags(tags | {"finetune.resumed_from": resumed_from})
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.path.name, tags=tags)
            mlflow.log_params(flat_recipe(recipe))
            mlflow.log_artifact(str(run_dir.recipe))
        info = self.run.info
        web = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
        return {
            "id": info.run_id,
            "experiment_id": info.experiment_id,
            "tracking_uri": uri,
            "local": str((run_dir.path / "mlruns").absolute()) if self.local else None,
            "url": f"{web}/#/experiments/{info.experiment_id}/runs/{info.run_id}" if web else None,
        }

    def end(self, error_type, error, traceback) -> None:
        try:
            self.mlflow.end_run(status=self.STATUSES[outcome(error_type)])
        finally:
            self._restore()

    def _restore(self) -> None:
        """Undo the process-wide settings made for the local store, so that a later run is not logged there."""
        if self.local:
            self.mlflow.set_tracking_uri(None)  # it had also set MLFLOW_TRACKING_URI, for this process
        if self.allowed_file_store:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
