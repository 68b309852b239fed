"""Inference on raw images: decode, resize + normalise as evaluation does, batch, detect.

No Ray and no MLflow here: :class:`Detector` is what the MLflow pyfunc model
(``ssd.mlflow_model``) wraps, and what a script or a service can use directly::

    detector = Detector.from_checkpoint("runs/exp/checkpoints/best")
    rows = detector.predict(["a.jpg", open("b.png", "rb").read(), array_hwc_uint8])
    # [{"image": 0, "label": 3, "class_name": "dog", "score": 0.91,
    #   "x1": 12.0, "y1": 40.5, "x2": 200.1, "y2": 310.0}, ...]

Preprocessing and prediction are exactly the evaluation's (``ssd.evaluation.inference``): every
image is a uint8 (3, H, W) RGB tensor, warped to (3, S, S) by ``eval_transform(cfg)``, batched,
and run by ``BatchPredictor`` (normalised on the device with ``cfg.augment``'s mean and std,
decoded by the model's own box coding). ``cfg.postprocess`` turns the
outputs into detections whose boxes are xyxy in pixels of the ORIGINAL image (not the S x S
network input). Encoded images are decoded with ``torchvision.io.decode_image`` in RGB mode
(grey and RGBA become RGB); EXIF orientation is not applied, as in the training data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_image

from ssd.checkpoint import load_checkpoint, unwrap
from ssd.config import Config
from ssd.evaluation.inference import BatchPredictor, eval_transform

#: What :meth:`Detector.predict` accepts per image: a file path, encoded bytes (JPEG, PNG, ...),
#: an (H, W, 3) uint8 RGB array, or a (3, H, W) uint8 RGB tensor.
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | Tensor

#: The keys of a detection row, in order (also the pyfunc model's output columns).
COLUMNS: tuple[str, ...] = ("image", "label", "class_name", "score", "x1", "y1", "x2", "y2")


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"file {os.fspath(item)!r}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"{len(item)} bytes"
    if isinstance(item, (np.ndarray, Tensor)):
        return f"{type(item).__name__} {item.dtype} {tuple(item.shape)}"
    return type(item).__name__


def to_image_tensor(item: ImageInput, index: int = 0) -> Tensor:
    """One input image -> uint8 (3, H, W) RGB tensor on the CPU.

    Args:
        item: a path (str or ``os.PathLike``) to an encoded image, encoded bytes, an (H, W, 3)
            uint8 RGB ``np.ndarray``, or a (3, H, W) uint8 RGB ``torch.Tensor``.
        index: the item's position in the caller's input, named in error messages.
    Raises:
        TypeError: an unsupported type, dtype or shape (the message names ``index``).
        ValueError: a file that cannot be read or bytes that cannot be decoded (idem).
    """
    if isinstance(item, (str, os.PathLike)):
        try:
            data = Path(item).read_bytes()
        except OSError as err:
            raise ValueError(f"image {index}: cannot read {_describe(item)}: {err}") from err
        return _decode(data, index, _describe(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(bytes(item), index, _describe(item))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise TypeError(
                f"image {index}: an array must be (H, W, 3) uint8 RGB, got {_describe(item)}"
            )
        return torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1).contiguous()
    if isinstance(item, Tensor):
        if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] != 3:
            raise TypeError(
                f"image {index}: a tensor must be (3, H, W) uint8 RGB, got {_describe(item)}"
            )
        return item.detach().cpu()
    raise TypeError(
        f"image {index}: unsupported input type {type(item).__name__}; expected a path, encoded "
        "bytes, an (H, W, 3) uint8 numpy array or a (3, H, W) uint8 tensor"
    )


def _decode(data: bytes, index: int, what: str) -> Tensor:
    if not data:
        raise ValueError(f"image {index}: cannot decode {what}: empty")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"image {index}: cannot decode {what} as an image: {err}") from err


class Detector:
    """A trained SSD ready for inference on raw images.

    Args:
        model: the SSD (plain, or wrapped in DDP / ``torch.compile``); it is moved to ``device``
            and put in eval mode. Returns (loc (B, P, 4), logits (B, P, C + 1)).
        cfg: the run's resolved config: ``priors`` (input size S and priors), ``augment`` (mean,
            std), ``postprocess`` (thresholds, NMS) and ``train.channels_last``.
        classes: the C class names; label ``k`` (1..C) is ``classes[k - 1]``.
        device: where the network runs; detections come back on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        classes: Sequence[str],
        device: str | torch.device = "cpu",
    ) -> None:
        if len(classes) != cfg.model.num_classes - 1:
            raise ValueError(
                f"{len(classes)} class names for a model with model.num_classes="
                f"{cfg.model.num_classes} (which counts the background): expected "
                f"{cfg.model.num_classes - 1}"
            )
        self.cfg = cfg
        self.classes = list(classes)
        self.device = torch.device(device)
        self.size = cfg.priors.image_size
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = unwrap(model).to(self.device, memory_format=self.memory_format).eval()
        # The evaluation transform (resize only; uint8 out, normalised on the device).
        self.transform = eval_transform(cfg)
        self.predictor = BatchPredictor(self.model, cfg, self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Detector:
        """Rebuild the model from a ``save_checkpoint`` directory (config + weights-only state).

        ``model.backbone_weights`` is ignored: the checkpoint holds every weight, and the
        pretrained backbone's path or URL need not exist where the model is served.
        """
        checkpoint = load_checkpoint(path, map_location="cpu")
        cfg = checkpoint.config
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
        from ssd.models import build_model  # the architectures are needed only here

        model = build_model(cfg)
        model.load_state_dict(checkpoint.model)
        return cls(model, cfg, checkpoint.classes, device)

    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """uint8 (3, H_i, W_i) images -> (the resized batch (B, 3, S, S) uint8, the original
        sizes (B, 2) int64 (height, width))."""
        empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
        resized = [self.transform(image, empty)[0] for image in images]
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
        return torch.stack(resized), sizes

    def predict_tensors(self, images: Sequence[Tensor], batch_size: int = 16) -> list[dict[str, Tensor]]:
        """Detections for uint8 (3, H_i, W_i) RGB tensors, ``batch_size`` images per forward.

        Returns:
            one dict per image, on the CPU: ``boxes`` (K, 4) float32 xyxy in pixels of that
            image, ``scores`` (K,) descending, ``labels`` (K,) int64 in 1..C.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[dict[str, Tensor]] = []
        for start in range(0, len(images), batch_size):
            out += self._predict_batch(list(images[start:start + batch_size]))
        return out

    def _predict_batch(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        batch, sizes = self.preprocess(images)
        detections = self.predictor(batch, image_sizes=sizes.to(self.device))
        return [{k: v.cpu() for k, v in det.items()} for det in detections]

    def iter_detections(
        self, images: Sequence[ImageInput], batch_size: int = 16
    ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(input index, detections as :meth:`predict_tensors` gives them) per input, decoding
        only ``batch_size`` inputs at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(images), batch_size):
            chunk = [to_image_tensor(item, start + i)
                     for i, item in enumerate(images[start:start + batch_size])]
            yield from enumerate(self._predict_batch(chunk), start)

    def predict(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[dict[str, Any]]:
        """Detect objects in raw images.

        Args:
            images: per image a path, encoded bytes, an (H, W, 3) uint8 RGB array or a
                (3, H, W) uint8 RGB tensor (sizes may differ).
            batch_size: images per forward pass.
        Returns:
            one row per detection, images in input order and each image's rows by descending
            score: ``{"image": index in images, "label": 1..C, "class_name": str, "score": float,
            "x1", "y1", "x2", "y2": float pixels of the original image}``.
        Raises:
            TypeError / ValueError naming the index of an input that is unsupported or
            unreadable.
        """
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Tensor)):
            raise TypeError(
                f"images must be a sequence of images, got a single {type(images).__name__}; "
                "wrap it in a list"
            )
        rows: list[dict[str, Any]] = []
        for index, det in self.iter_detections(images, batch_size):
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                         det["labels"].tolist()):
                rows.append({
                    "image": index, "label": int(label), "class_name": self.classes[label - 1],
                    "score": float(score),
                    "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                })
        return rows
