"""A served SSD without Ray: one HTTP request's body -> detections as JSON, its limits, and the
model that follows a registry alias.

``ssd.distributed.serve_app`` is the thin Ray Serve glue around :class:`Endpoint`; everything that
decides what a client gets back lives here, so that it is tested without Ray:

* a request body is read only up to ``max_body_bytes``: a larger ``Content-Length`` is refused
  before a byte of the body is read (HTTP 413), a body without one (chunked) is cut off as soon as
  it passes the limit (413);
* the body must be an encoded image (JPEG, PNG, WebP, GIF, BMP, ...): it is decoded as
  ``pipelines/predict.py`` decodes files (``ssd.serving.to_image_tensor``, torchvision, RGB, no
  EXIF rotation; formats torchvision cannot read by Pillow), so detections equal predict.py's on
  the same image. Not an image: HTTP 400 with a one-line reason. An image of more than
  ``max_pixels`` pixels is refused (413) from its header, before it is decoded;
* the answer is predict.py's record of one image (``detections.json``'s ``images[i]`` without the
  file fields)::

      {"model": {"reference": "models:/ssd-voc@champion", "name": "ssd-voc", "version": "3"},
       "width": 500, "height": 375,
       "detections": [{"label": 12, "class_name": "dog", "score": 0.91,
                       "box": [x1, y1, x2, y2]}, ...]}   # pixels of the posted image, by score

* :class:`ModelWatcher` holds the served model. For a ``models:/NAME@ALIAS`` reference it looks the
  alias up every ``reload_seconds`` and loads the version it names when that changes; a version
  that fails to load is logged and the model already loaded keeps serving (retried after
  ``RETRY_FACTOR`` periods). Other references (a version, a checkpoint folder) are loaded once.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MIB = 2**20
#: defaults of ``pipelines/serve.py`` (and of ``EndpointSettings``)
DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000; a decoded RGB image of that size is 120 MB
DEFAULT_RELOAD_SECONDS = 30.0
#: a version that failed to load is tried again after this many polling periods
RETRY_FACTOR = 10


class Rejected(Exception):
    """A request the endpoint refuses: ``status`` is the HTTP status, ``reason`` one line."""

    def __init__(self, status: int, reason: str) -> None:
        reason = " ".join(str(reason).split())  # one line, whatever the cause's text
        super().__init__(reason)
        self.status = status
        self.reason = reason[:300]

    def payload(self) -> dict[str, Any]:
        return {"error": self.reason}


@dataclass(frozen=True)
class EndpointSettings:
    """What every replica needs (it is shipped to them as is).

    Attributes:
        model: a model reference (``ssd.registry``): ``models:/NAME@ALIAS`` (followed),
            ``models:/NAME/VERSION``, ``runs:/...`` or a checkpoint folder (loaded once).
        tracking_uri: the MLflow server of a ``models:/`` or ``runs:/`` reference.
        max_body_bytes: the largest request body accepted.
        max_pixels: the largest image (width x height) accepted.
        reload_seconds: how often the alias is looked up.
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when the replica sees a GPU).
    """

    model: str
    tracking_uri: str | None = None
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * MIB)
    max_pixels: int = DEFAULT_MAX_PIXELS
    reload_seconds: float = DEFAULT_RELOAD_SECONDS
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "reload_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")


# ------------------------------------------------------------------------------------------
# The request body


def declared_length(value: str | None, limit: int) -> int | None:
    """The ``Content-Length`` header checked against ``limit`` bytes before the body is read.

    Returns None when the header is absent (a chunked body: :func:`read_body` enforces the limit).
    Raises ``Rejected`` 400 for a value that is not a byte count, 413 for one over ``limit``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise Rejected(400, f"Content-Length {value!r} is not a byte count")
    length = int(text)
    if length > limit:
        raise Rejected(413, f"body of {length} bytes exceeds the limit of {limit} bytes (--max-body-mb)")
    return length


async def read_body(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """The body from its chunks, refused (``Rejected`` 413) as soon as it passes ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body exceeds the limit of {limit} bytes (--max-body-mb)")
        if chunk:
            parts.append(chunk)
    return b"".join(parts)


def _header_size(body: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) from the image header (Pillow reads no pixels), None if Pillow cannot tell.
    An image past Pillow's own decompression-bomb limit is refused (413) here."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as image:
            return image.size
    except Image.DecompressionBombError as err:
        raise Rejected(413, f"image exceeds the limit of {max_pixels} pixels (--max-pixels): {err}") from None
    except Exception:  # noqa: BLE001 - any parse error: not an image Pillow knows, torchvision decides
        return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise Rejected(413, f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
                            f"{max_pixels} pixels (--max-pixels)")


def decode_body(body: bytes, max_pixels: int) -> Tensor:
    """An encoded image -> uint8 (3, H, W) RGB tensor, decoded as ``pipelines/predict.py`` decodes
    files: ``ssd.serving.to_image_tensor`` (torchvision), else Pillow (BMP, TIFF, ...).

    Raises ``Rejected``: 400 for an empty body or one that is not an image, 413 for an image of
    more than ``max_pixels`` pixels (from its header when Pillow can read it: before decoding).
    """
    from ssd.serving import to_image_tensor

    if not body:
        raise Rejected(400, "empty body: POST the bytes of an image file (JPEG, PNG, ...)")
    size = _header_size(body, max_pixels)
    if size is not None:
        _check_pixels(*size, max_pixels)
    try:
        image = to_image_tensor(body)
    except (ValueError, TypeError) as err:
        if size is None:  # neither torchvision nor Pillow knows it
            detail = str(err).split(": ", 2)[-1]
            raise Rejected(400, f"the body is not an image ({len(body)} bytes starting {body[:8]!r}: "
                                f"{detail})") from None
        image = _decode_with_pillow(body)
    _check_pixels(image.shape[2], image.shape[1], max_pixels)  # formats Pillow could not size
    return image


def _decode_with_pillow(body: bytes) -> Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise Rejected(400, f"the body is not a readable image ({err})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------
# The model and its alias


@dataclass(frozen=True)
class ModelInfo:
    """Which model answers: the reference served and the registered version it resolved to
    (``name``/``version`` None for a checkpoint folder)."""

    reference: str
    name: str | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "name": self.name, "version": self.version}


@dataclass
class LoadedModel:
    """A ``ssd.serving.Detector`` and what it is."""

    detector: Any
    info: ModelInfo
    loaded_at: float = field(default_factory=time.time)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(reference: str, tracking_uri: str | None, device: str, *, served_as: str | None = None) -> LoadedModel:
    """Download (registry references) and build the model of ``reference``.

    Args:
        reference: what to load; for a followed alias, the version it named
            (``models:/NAME/VERSION``), so that a move in between cannot mix two versions.
        served_as: the reference the endpoint was started with (default ``reference``).
    Raises:
        ssd.registry.ModelReferenceError, OSError, ValueError, RuntimeError: it cannot be loaded.
    """
    from ssd.registry import resolve_model
    from ssd.serving import Detector

    with tempfile.TemporaryDirectory(prefix="ssd-serve-") as tmp:
        resolved = resolve_model(reference, tracking_uri, dst=tmp)
        detector = Detector.from_checkpoint(resolved.checkpoint, device=pick_device(device))
    return LoadedModel(detector, ModelInfo(served_as or reference, resolved.name, resolved.version))


def alias_version(reference: str, tracking_uri: str | None) -> str:
    """The version a ``models:/NAME@ALIAS`` reference names now (``ssd.registry``)."""
    from ssd.registry import registered_version

    return registered_version(reference, tracking_uri)


class ModelWatcher:
    """The served model; follows a registry alias.

    Args:
        settings: the endpoint's settings (``model``, ``tracking_uri``, ``reload_seconds``,
            ``device``).
        lookup: ``reference -> version`` the alias names now (default :func:`alias_version`).
        load: ``(reference, served_as) -> LoadedModel`` (default :func:`load_model`).
        clock: seconds, monotonic (tests pass a fake one).
        log: where reloads (INFO) and failures (WARNING) are logged (Serve's replica logger in a
            replica; this module's by default).
    The first load happens here, and an error in it propagates (the replica fails to start).
    """

    def __init__(
        self,
        settings: EndpointSettings,
        *,
        lookup: Callable[[str], str] | None = None,
        load: Callable[[str, str], LoadedModel] | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
    ) -> None:
        from ssd.registry import parse_registered

        self.settings = settings
        self._lookup = lookup or (lambda ref: alias_version(ref, settings.tracking_uri))
        self._load = load or (lambda ref, served_as: load_model(ref, settings.tracking_uri, settings.device,
                                                                served_as=served_as))
        self._clock = clock
        self._log = log
        parsed = parse_registered(settings.model)
        #: NAME when the reference is an alias to follow, else None
        self.followed_name = parsed[0] if parsed is not None and parsed[2] is not None else None
        self._failed: dict[str, float] = {}  # version -> when it failed to load
        self._poll_lock = threading.Lock()
        if self.followed_name:
            version = self._lookup(settings.model)
            self.current = self._load(self._version_reference(version), settings.model)
        else:
            self.current = self._load(settings.model, settings.model)
        self._next_poll = self._clock() + settings.reload_seconds

    @property
    def follows_alias(self) -> bool:
        return self.followed_name is not None

    def _version_reference(self, version: str) -> str:
        return f"models:/{self.followed_name}/{version}"

    def poll(self) -> bool:
        """If a period has passed: look the alias up and load the version it names when it
        changed. Returns True when a new model now serves. Never raises: a failed lookup or
        load is logged and the current model stays."""
        if not self.follows_alias or self._clock() < self._next_poll:
            return False
        with self._poll_lock:  # one reload at a time, whoever calls
            now = self._clock()
            if now < self._next_poll:
                return False
            self._next_poll = now + self.settings.reload_seconds
            return self._check(now)

    def _check(self, now: float) -> bool:
        served = self.current.info.version
        try:
            version = str(self._lookup(self.settings.model))
        except Exception as err:  # noqa: BLE001 - registry down, alias deleted: keep serving
            self._log.warning("%s: cannot look the alias up (%s); still serving version %s",
                           self.settings.model, _one_line(err), served)
            return False
        if version == served:
            return False
        failed_at = self._failed.get(version)
        if failed_at is not None and now - failed_at < RETRY_FACTOR * self.settings.reload_seconds:
            return False
        try:
            loaded = self._load(self._version_reference(version), self.settings.model)
        except Exception as err:  # noqa: BLE001 - any failure keeps the model that works
            self._failed[version] = now
            self._log.warning("%s moved to version %s, which cannot be loaded (%s); still serving version %s "
                           "(next try in %g s)", self.settings.model, version, _one_line(err), served,
                           RETRY_FACTOR * self.settings.reload_seconds)
            return False
        self._failed.pop(version, None)
        self.current = loaded  # one assignment: a request uses the old or the new model, whole
        self._log.info("%s moved: now serving version %s (was %s)", self.settings.model, version, served)
        return True


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# ------------------------------------------------------------------------------------------
# The endpoint


def detection_record(det: dict[str, Tensor], classes: list[str], width: int, height: int,
                     info: ModelInfo) -> dict[str, Any]:
    """One image's answer (see the module docstring) from ``Detector.predict_tensors`` output:
    ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), ``labels`` (K,) in 1..C."""
    detections = [
        {"label": int(label), "class_name": classes[label - 1], "score": float(score), "box": box}
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
    ]
    return {"model": info.to_dict(), "width": int(width), "height": int(height), "detections": detections}


class Endpoint:
    """What one replica does with a request (the Serve glue passes headers and the body stream).

    Args:
        settings: the limits and the model.
        watcher: the served model (default: a :class:`ModelWatcher` of ``settings``, which loads it).
    """

    def __init__(self, settings: EndpointSettings, watcher: ModelWatcher | None = None) -> None:
        self.settings = settings
        self.watcher = watcher or ModelWatcher(settings)
        # one forward at a time per replica: concurrent forwards would only share its CPUs (or
        # GPU) and make every request slower; decoding runs outside the lock
        self._forward = threading.Lock()

    def info(self) -> dict[str, Any]:
        """The health/info answer: the model serving now and the limits."""
        model = self.watcher.current
        return {"status": "ok", "model": model.info.to_dict(), "classes": list(model.detector.classes),
                "input_size": model.detector.size, "device": str(model.detector.device),
                "max_body_bytes": self.settings.max_body_bytes, "max_pixels": self.settings.max_pixels,
                "follows_alias": self.watcher.follows_alias, "reload_seconds": self.settings.reload_seconds}

    def detect(self, body: bytes) -> dict[str, Any]:
        """An encoded image -> its answer (blocking; ``Rejected`` for a bad body)."""
        image = decode_body(body, self.settings.max_pixels)
        model = self.watcher.current  # the same model for the whole request
        with self._forward:
            det = model.detector.predict_tensors([image], batch_size=1)[0]
        height, width = image.shape[1:]
        return detection_record(det, model.detector.classes, width, height, model.info)

    async def handle_post(self, content_length: str | None, chunks: AsyncIterable[bytes]) -> tuple[int, dict]:
        """(HTTP status, JSON payload) of a POST: limits first, then the detections. Decoding and
        the forward run in a thread, so the replica's event loop keeps answering."""
        try:
            declared_length(content_length, self.settings.max_body_bytes)
            body = await read_body(chunks, self.settings.max_body_bytes)
            return 200, await asyncio.to_thread(self.detect, body)
        except Rejected as err:
            return err.status, err.payload()


def settings_from_args(args: dict[str, Any]) -> EndpointSettings:
    """``EndpointSettings`` from a mapping of ``pipelines/serve.py``'s option names (what a
    RayService's ``serveConfigV2`` passes as ``args``): ``model`` (required), ``mlflow_uri``,
    ``max_body_mb``, ``max_pixels``, ``reload_seconds``, ``device``. Unknown keys are an error."""
    known = {"model", "mlflow_uri", "max_body_mb", "max_pixels", "reload_seconds", "device"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown endpoint option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not args.get("model"):
        raise ValueError("the endpoint needs model (a model reference such as models:/NAME@champion)")
    values = {"model": str(args["model"]), "tracking_uri": args.get("mlflow_uri"),
              "max_body_bytes": int(float(args.get("max_body_mb", DEFAULT_MAX_BODY_MB)) * MIB),
              "max_pixels": int(args.get("max_pixels", DEFAULT_MAX_PIXELS)),
              "reload_seconds": float(args.get("reload_seconds", DEFAULT_RELOAD_SECONDS)),
              "device": str(args.get("device", "auto"))}
    return EndpointSettings(**values)

