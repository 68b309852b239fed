"""Image preparation for shards: which bytes are kept, which re-encoded, which rejected."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from ssd.data.images import ImageError, jpeg_frame, prepare_image


def _encode(mode: str, fmt: str = "JPEG", size=(40, 30), **save) -> bytes:
    # smooth colour gradients: JPEG keeps them well, so pixel comparisons can be tight
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    array = np.stack([xs * 255 // size[0], ys * 255 // size[1], (xs + ys) * 127 // sum(size)], axis=-1).astype(np.uint8)
    image = Image.fromarray(array).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def test_baseline_rgb_jpeg_is_kept_byte_for_byte():
    data = _encode("RGB", quality=90)
    assert jpeg_frame(data)[:2] == (0xC0, 3)
    prepared = prepare_image(data)
    assert prepared.data is data and not prepared.reencoded
    assert (prepared.width, prepared.height) == (40, 30)


@pytest.mark.parametrize(
    ("mode", "save", "reason"),
    [
        ("L", {}, "grayscale JPEG"),
        ("CMYK", {}, "CMYK JPEG"),
        ("RGB", {"progressive": True}, "progressive"),
    ],
)
def test_other_jpegs_are_reencoded_as_baseline_rgb(mode, save, reason):
    data = _encode(mode, **save)
    prepared = prepare_image(data)
    assert prepared.reencoded and prepared.reason == reason
    assert jpeg_frame(prepared.data)[:2] == (0xC0, 3)
    decoded = decode_jpeg(torch.frombuffer(bytearray(prepared.data), dtype=torch.uint8))
    assert decoded.shape == (3, 30, 40)
    # pixels survive the conversion (up to JPEG loss): compare with Pillow's own RGB conversion
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    assert np.abs(decoded.permute(1, 2, 0).numpy().astype(np.float32) - reference).mean() < 3


def test_png_is_reencoded():
    prepared = prepare_image(_encode("RGBA", fmt="PNG"))
    assert prepared.reencoded and prepared.reason == "PNG"
    assert Image.open(io.BytesIO(prepared.data)).mode == "RGB"


def test_reencoding_is_deterministic():
    data = _encode("L")
    assert prepare_image(data).data == prepare_image(data).data


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_unreadable_bytes_raise_image_error(data):
    if data is None:  # a JPEG cut in half: header fine, scan data truncated
        full = _encode("RGB", size=(200, 150))
        data = full[: len(full) // 2]
    with pytest.raises(ImageError, match="cannot decode image"):
        prepare_image(data)


def test_jpeg_frame_reads_size_without_decoding():
    data = _encode("RGB", size=(123, 45))
    marker, components, height, width = jpeg_frame(data)
    assert (marker, components, height, width) == (0xC0, 3, 45, 123)
    assert jpeg_frame(b"\x89PNG....") is None
