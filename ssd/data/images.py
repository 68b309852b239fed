"""Image bytes for shards: keep baseline RGB JPEGs as they are, convert everything else.

A shard stores each image as JPEG. Re-encoding a JPEG loses quality and costs time, so the
original bytes are kept whenever they are a baseline (SOF0) JPEG with three colour components,
which every JPEG decoder reads the same way. Progressive JPEGs, grayscale (1 component) and
CMYK/YCCK (4 components), PNGs and others are decoded with Pillow, converted to RGB and
re-encoded at a fixed quality (deterministic: same input, same bytes). Pixels are kept as stored:
no EXIF rotation is applied, because VOC and COCO annotate the stored pixel grid.

Every image is fully decoded once here, so a truncated or corrupt file is caught at conversion
time with its path, not in a training worker.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import Image

#: quality of re-encoded images (libjpeg's scale; 95 keeps artefacts far below annotation noise)
REENCODE_QUALITY = 95

# Start-of-frame markers: SOF0 is baseline; SOF1..SOF15 (except DHT/JPG/DAC) are other codings.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


_MODE_NAMES = {"L": "grayscale JPEG", "CMYK": "CMYK JPEG"}


class ImageError(Exception):
    """The file is not a readable image; the message says why."""


@dataclass(frozen=True)
class PreparedImage:
    """JPEG bytes ready for a shard, with the image's size and whether it was re-encoded."""

    data: bytes
    width: int
    height: int
    reencoded: bool
    reason: str = ""  # why it was re-encoded ("progressive", "grayscale JPEG", "PNG", ...)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """Parse a JPEG's start-of-frame header without decoding it.

    Returns ``(sof_marker, components, height, width)``, or None when ``data`` is not a JPEG or no
    frame header is found before the scan data.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 10 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return marker, data[pos + 9], height, width
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def prepare_image(data: bytes) -> PreparedImage:
    """Validate ``data`` (an encoded image) and return the JPEG bytes a shard should hold.

    Raises:
        ImageError: the bytes do not decode completely (truncated, corrupt, not an image).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: truncated data raises here
            image_format = image.format or "unknown"
            frame = jpeg_frame(data) if image_format == "JPEG" else None
            if frame is not None and frame[0] == 0xC0 and frame[1] == 3 and image.mode == "RGB":
                return PreparedImage(data, image.width, image.height, reencoded=False)
            if frame is None:
                reason = image_format
            elif frame[0] != 0xC0:
                reason = "progressive" if frame[0] == 0xC2 else f"SOF{frame[0] - 0xC0}"
            else:
                reason = _MODE_NAMES.get(image.mode, f"{image.mode} JPEG")
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, struct.error) as err:  # PIL's decode errors
        raise ImageError(f"cannot decode image: {err}") from err
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return PreparedImage(out.getvalue(), rgb.width, rgb.height, reencoded=True, reason=reason)
