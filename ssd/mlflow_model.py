"""MLflow glue for trained models: the pyfunc wrapper and ``log_ssd_model`` (log + register).

Kept apart from ``ssd.tracking`` on purpose: ``import mlflow.pyfunc`` alone costs about 1.2 s
(pandas, the model flavours), which every training process would pay at start-up for nothing.
Import this module only where models are logged or loaded.

The pyfunc model rebuilds the network from the checkpoint directory (config + weights-only state
dict, ``ssd.checkpoint``) and wraps :class:`ssd.serving.Detector`; the ``ssd`` package travels
with the model (``code_paths``), so ``mlflow.pyfunc.load_model`` works where this repository is
not installed. It is logged as a "model from code" (a three-line entry file), so the pyfunc holds
no pickled Python object. Its input is a DataFrame with an ``image`` column (paths, encoded bytes or
(H, W, 3) uint8 arrays), a list of such images, or a numpy image (H, W, 3) / batch (N, H, W, 3);
its output is one row per detection (:data:`ssd.serving.COLUMNS`), boxes in original pixels.
The model has an output schema and a ``batch_size`` parameter but no input schema: MLflow's
schema enforcement would refuse mixed path / bytes / array inputs. Load with
``model_config={"device": "cuda"}`` to run on a GPU (default CPU).

A ``torch_model`` (``mlflow.pytorch`` flavour, ``serialization_format="pickle"``: the default
``pt2`` export fails on SSD) is logged beside it for raw-output access.
Loading it unpickles Python objects, so load it only from a registry you trust; prefer the
pyfunc, which holds no pickle. (MLflow says so on every log; that warning is dropped here.)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from ssd.checkpoint import inference_copy
from ssd.serving import COLUMNS, Detector

# MLflow's console extras when models are logged or loaded: per-file progress bars and "View run
# ... at" links (the run's own summary names the run); a user's explicit setting wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

#: Distributions the served model needs, pinned to the versions installed where it is logged.
REQUIREMENTS: tuple[str, ...] = (
    "torch", "torchvision", "numpy", "pillow", "pyyaml", "pycocotools", "mlflow",
)

_DTYPES = {"image": "int64", "label": "int64", "score": "float64",
           "x1": "float64", "y1": "float64", "x2": "float64", "y2": "float64"}


def pinned_requirements() -> list[str]:
    """``name==version`` for :data:`REQUIREMENTS` as installed here.

    A local version label (``2.14.1+cu130``) is dropped: ``torch==2.14.1`` matches every local
    build of 2.14.1, so the CPU or CUDA build of the serving machine can satisfy it.
    """
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def detections_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Detection rows (``Detector.predict``) -> DataFrame with :data:`COLUMNS` (typed, possibly
    empty)."""
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype(_DTYPES)


def images_from_input(model_input: Any) -> list[Any]:
    """The pyfunc input -> a list of images for ``Detector.predict``.

    Accepts a DataFrame with an ``image`` column (row i is image i, whatever the index), a
    Series, a dict with an ``image`` entry, a list / tuple of images, one (H, W, 3) uint8 array,
    an (N, H, W, 3) uint8 batch, or a single path / bytes value.
    """
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(
                f"the input DataFrame needs an 'image' column, got columns {list(model_input.columns)}"
            )
        return list(model_input["image"])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise ValueError(f"the input dict needs an 'image' key, got {sorted(model_input)}")
        return images_from_input(model_input["image"])
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object and model_input.ndim == 1:
            return list(model_input)
        if model_input.ndim == 3:
            return [model_input]
        if model_input.ndim == 4:
            return list(model_input)
        raise TypeError(
            "a numpy input must be one (H, W, 3) image or an (N, H, W, 3) batch, got shape "
            f"{model_input.shape}"
        )
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    if isinstance(model_input, (str, Path, bytes, bytearray)):
        return [model_input]
    raise TypeError(
        f"unsupported model input {type(model_input).__name__}: pass a DataFrame with an 'image' "
        "column, a list of images, or a numpy image / batch"
    )


class SSDPyfuncModel(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` wrapper of :class:`ssd.serving.Detector`.

    Artifacts: ``checkpoint``, a ``save_checkpoint`` directory. ``model_config`` (at load):
    ``device`` (default ``"cpu"``). Params (at predict): ``batch_size`` (default 16).
    """

    def __init__(self) -> None:
        self.detector: Detector | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        device = (context.model_config or {}).get("device", "cpu")
        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"], device=device)

    # The hint is pd.DataFrame because MLflow 3.17 skips type-hint validation for it (any other
    # hint but list[...] draws a warning); lists and arrays pass through unchanged as well.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Detections as a DataFrame with columns image (position in the input), label (1..C),
        class_name, score, x1, y1, x2, y2 (float pixels of the original image); no rows when
        nothing is detected."""
        if self.detector is None:
            raise RuntimeError("the model has no detector: load it with mlflow.pyfunc.load_model")
        batch_size = int((params or {}).get("batch_size", 16))
        return detections_frame(self.detector.predict(images_from_input(model_input), batch_size))


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"image": "long", "label": "long", "class_name": "string"}
    outputs = Schema([ColSpec(kinds.get(name, "double"), name) for name in COLUMNS])
    return ModelSignature(inputs=None, outputs=outputs,
                          params=ParamSchema([ParamSpec("batch_size", "long", 16)]))


#: The pyfunc's "model from code" file (MLflow runs it at load time, with the logged ``ssd``
#: package on ``sys.path``): no pickled Python object in the pyfunc model.
_ENTRY_POINT = """\
import mlflow.models

from ssd.mlflow_model import SSDPyfuncModel

mlflow.models.set_model(SSDPyfuncModel())
"""


def _copy_package(dest: Path) -> Path:
    """A clean copy of the ``ssd`` package (no caches) under ``dest``, for ``code_paths``."""
    import ssd

    target = dest / "ssd"
    shutil.copytree(Path(ssd.__file__).parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


class _DropPickleWarning(logging.Filter):
    """Drops mlflow.pytorch's warning that pickled models can run code on load (only that one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Saving pytorch model by Pickle or CloudPickle")

    def install(self) -> None:
        target = logging.getLogger("mlflow.pytorch")
        if self not in target.filters:
            target.addFilter(self)


_PICKLE_WARNING = _DropPickleWarning()


def log_ssd_model(
    run_id: str,
    tracking_uri: str,
    checkpoint_dir: str | Path,
    *,
    register_as: str | None = None,
    version_tags: dict[str, str] | None = None,
    torch_flavour: bool = True,
) -> dict[str, Any]:
    """Log a checkpoint as MLflow models inside an existing run, and optionally register it.

    Logs ``model`` (pyfunc, :class:`SSDPyfuncModel`, the checkpoint directory as its artifact)
    and, if ``torch_flavour``, ``torch_model`` (``mlflow.pytorch``, pickled module). Both carry
    the ``ssd`` package as ``code_paths`` and pip requirements pinned to this environment.

    The run's status is left as it was (the caller ends the run): ``mlflow.start_run(run_id)``
    sets it to RUNNING and leaving its context would set FINISHED, so the run is ended with its
    previous status instead; MLflow then stamps an end time, which the caller's own end
    overwrites. The process-wide tracking URI is ``tracking_uri`` meanwhile and restored after.
    Raises on any failure (the caller decides whether that is fatal); the run's status is
    restored then too. An active fluent run in this process must be ``run_id`` itself (it is
    then used and left active) or none.

    Args:
        run_id: the run to log into (it must exist and not be deleted).
        tracking_uri: the tracking (and registry) server.
        checkpoint_dir: a ``save_checkpoint`` directory.
        register_as: registered model name; a new version of it is created from the pyfunc.
        version_tags: tags for the new version (data_hash, prior_spec, parent_model, ...);
            ``run_id`` is added.
        torch_flavour: also log the ``mlflow.pytorch`` flavour.
    Returns:
        ``{"model_uri", "torch_model_uri", "registered_name", "version"}``; the last three are
        None when not logged / not registered.
    """
    checkpoint_dir = Path(checkpoint_dir)
    detector = Detector.from_checkpoint(checkpoint_dir)  # a broken checkpoint fails before logging
    with _tracking_uri(tracking_uri):
        result = _log(detector, run_id, tracking_uri, checkpoint_dir, torch_flavour)
        if register_as:
            result["registered_name"] = register_as
            result["version"] = _register(result["model_uri"], register_as, run_id, version_tags)
    return result


def register_ssd_model(
    tracking_uri: str,
    model_uri: str,
    name: str,
    run_id: str,
    version_tags: dict[str, str] | None = None,
) -> str:
    """Register a model logged by :func:`log_ssd_model` (its ``model_uri``) as a new version of
    ``name``, with ``version_tags`` plus ``run_id``; the version number. The second half of
    ``log_ssd_model(..., register_as=name)``, for callers that retry the two halves apart."""
    with _tracking_uri(tracking_uri):
        return _register(model_uri, name, run_id, version_tags)


@contextlib.contextmanager
def _tracking_uri(tracking_uri: str) -> Iterator[None]:
    # mlflow.register_model and the fluent logging API take the process-wide URI.
    # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI to this process, which would
    # redirect a later ``resolve_tracking_uri()``: restore both afterwards (public API only:
    # set_tracking_uri(X) always leaves the variable at X, so it tells the previous state).
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both


#: what ``mlflow.register_model`` prints on stderr on success; the caller reports the version itself
_REGISTER_CHATTER = re.compile(r"^(Successfully registered model '.*'\.|Created version '\d+' of model '.*'\.|"
                               r"Registered model '.*' already exists\. Creating a new version of this model\.\.\.)$")


def _register(model_uri: str, name: str, run_id: str, version_tags: dict[str, str] | None) -> str:
    tags = {**(version_tags or {}), "run_id": run_id}
    printed = io.StringIO()
    waiting = logging.getLogger("mlflow.store.model_registry.abstract_store")  # "Waiting up to 300 s ..."
    level = waiting.level
    waiting.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(printed):
            version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    finally:
        waiting.setLevel(level)
        # anything else it printed (a warning) still reaches the user
        rest = [line for line in printed.getvalue().splitlines() if line and not _REGISTER_CHATTER.match(line)]
        if rest:
            print("\n".join(rest), file=sys.stderr, flush=True)
    return str(version.version)


def _log(
    detector: Detector,
    run_id: str,
    tracking_uri: str,
    checkpoint_dir: Path,
    torch_flavour: bool,
) -> dict[str, Any]:
    import mlflow.pytorch

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    status = client.get_run(run_id).info.status
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError(
            f"another MLflow run ({active.info.run_id}) is active in this process; end it "
            f"before logging the model into run {run_id}"
        )
    requirements = pinned_requirements()
    metadata = {"classes": detector.classes, "image_size": detector.size,
                "arch": detector.cfg.model.arch}
    result: dict[str, Any] = {"model_uri": None, "torch_model_uri": None,
                              "registered_name": None, "version": None}
    with tempfile.TemporaryDirectory(prefix="ssd-model-") as tmp:
        code = str(_copy_package(Path(tmp)))
        entry = Path(tmp) / "ssd_pyfunc_model.py"
        entry.write_text(_ENTRY_POINT)
        if active is None:
            mlflow.start_run(run_id=run_id)  # sets the run RUNNING
        try:
            with warnings.catch_warnings():
                # Deliberately no input example / input schema (see the module docstring).
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(entry),
                    # without training.pt: the optimizer state is as large as the model again
                    artifacts={"checkpoint": str(inference_copy(checkpoint_dir, Path(tmp) / "checkpoint"))},
                    code_paths=[code],
                    pip_requirements=requirements,
                    signature=_signature(),
                    metadata=metadata,
                )
            result["model_uri"] = info.model_uri
            if torch_flavour:
                # The pickled flavour is deliberate (torch.export cannot trace SSD; the pyfunc is the
                # safe primary model): MLflow's warning about pickles is said once, in the docs.
                _PICKLE_WARNING.install()
                torch_info = mlflow.pytorch.log_model(
                    detector.model,
                    name="torch_model",
                    serialization_format="pickle",
                    code_paths=[code],
                    pip_requirements=requirements,
                    metadata=metadata,
                )
                result["torch_model_uri"] = torch_info.model_uri
        finally:
            if active is None:
                # Pops the fluent run, ending it with its previous status instead of FINISHED
                # (what leaving ``with mlflow.start_run(...)`` would set).
                mlflow.end_run(status=status)
    return result
