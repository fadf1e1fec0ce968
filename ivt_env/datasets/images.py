"""Image sources, decoding to RGB, EXIF orientation, and box clean-up shared by the real-data loaders.

Box frames (the rule every loader follows):
- Upstream boxes are given in the frame of the image's STORED pixel array (COCO convention: the ``width`` /
  ``height`` in the annotations are those of the stored pixels, before any EXIF rotation).
- Images are always returned upright, i.e. after :func:`PIL.ImageOps.exif_transpose`. When that rotates or flips the
  image, the box is mapped with the same transform (:func:`orient_box`) and ``Sample.width/height`` are those of the
  upright image. If the annotated size already equals the upright size (rotated 90 degrees), the annotation is taken to
  be in the upright frame and is left as is.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


ORIENTATION_TAG = 0x0112
#: EXIF orientations whose upright image has width and height swapped.
SWAPS_AXES = {5, 6, 7, 8}
#: Errors PIL raises on unreadable / truncated / hostile image data.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)
#: Largest image (width x height) the loaders open by default: PIL's own decompression-bomb error threshold
#: (2 x ``Image.MAX_IMAGE_PIXELS`` = 178,956,970 pixels). ``max_image_pixels`` (dataset kwarg) changes it.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
#: Bytes at the end of a file searched for the format's end marker (cameras may pad a JPEG after its EOI).
_TAIL_BYTES = 4096
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLarge(ValueError):
    """An image over the pixel limit (decompression-bomb guard); the message gives its size and the option."""


class ImageRef:
    """Where an image's encoded bytes live. ``key`` identifies the image (probe cache); ``describe`` names it in errors."""

    key: str

    def open(self):  # -> file-like or path accepted by Image.open
        raise NotImplementedError

    def describe(self) -> str:
        return self.key


@dataclass(frozen=True)
class FileImage(ImageRef):
    path: str

    @property
    def key(self) -> str:
        return self.path

    def open(self):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"image file not found: {self.path}")
        return self.path


class BytesImage(ImageRef):
    """Encoded bytes fetched on demand (e.g. one cell of a parquet column) by ``getter()``."""

    def __init__(self, key: str, getter: Callable[[], bytes], where: str):
        self.key, self._getter, self._where = key, getter, where

    def open(self):
        data = self._getter()
        if not data:
            raise ValueError("empty image bytes")
        return io.BytesIO(data)

    def describe(self) -> str:
        return self._where


@dataclass
class ImageInfo:
    """Header facts: stored (raw) size, EXIF orientation and colour mode."""

    raw_width: int
    raw_height: int
    orientation: int
    mode: str

    @property
    def upright_size(self) -> tuple[int, int]:
        if self.orientation in SWAPS_AXES:
            return self.raw_height, self.raw_width
        return self.raw_width, self.raw_height


def _orientation(img: Image.Image) -> int:
    try:
        o = int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: PIL's exif_transpose would ignore it too
        return 1
    return o if 1 <= o <= 8 else 1


def _open(ref: ImageRef, max_pixels: Optional[int]) -> Image.Image:
    """``Image.open`` with our own pixel limit in place of PIL's global one, so the limit is an option and an image
    over it is reported as such (PIL's DecompressionBombError would read as just another unreadable file).
    ``max_pixels=None`` or 0 disables the check."""
    src = ref.open()
    with _PIL_LIMIT_LOCK:  # PIL reads its limit from a module global at open time
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(src)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if max_pixels and img.width * img.height > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the decompression-bomb limit of "
            f"{int(max_pixels):,} pixels (pass max_image_pixels=N to allow it)"
        )
    return img


def _tail_has_end_marker(ref: ImageRef, fmt: Optional[str]) -> bool:
    """True when the file's last bytes hold its format's end marker (JPEG EOI, PNG IEND), or the format has none
    we know. A file cut after its header fails this cheap test (one seek, one small read)."""
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return True
    src = ref.open()
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            tail = f.read()
    else:
        src.seek(0, os.SEEK_END)
        src.seek(max(0, src.tell() - _TAIL_BYTES))
        tail = src.read()
    return marker in tail


def probe(ref: ImageRef, full: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> ImageInfo:
    """Read the header and check the file is whole, or with ``full`` decode all pixels. Raises IMAGE_ERRORS
    (:class:`ImageTooLarge` over ``max_pixels``).

    Without ``full``, a JPEG or PNG whose last bytes lack the format's end marker (a file cut short) is decoded in
    full to decide: a truncated file raises, a file merely padded after its marker passes."""
    with _open(ref, max_pixels) as img:
        if full:
            img.load()
        info = ImageInfo(img.width, img.height, _orientation(img), img.mode)
        fmt = img.format
    if not full and not _tail_has_end_marker(ref, fmt):
        with _open(ref, max_pixels) as img:
            img.load()
    return info


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (what a viewer shows); 16-bit/float greys are
    scaled to 8 bits; CMYK, palette, L, 1, YCbCr go through PIL's converters."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(ref: ImageRef, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, int]:
    """Decode, apply EXIF orientation, convert to RGB: (``uint8 (H, W, 3)`` upright, the EXIF orientation)."""
    with _open(ref, max_pixels) as img:
        img.load()
        orientation = _orientation(img)
        up = ImageOps.exif_transpose(img)
        return np.asarray(to_rgb(up), dtype=np.uint8).copy(), orientation


def orient_box(box, raw_w: float, raw_h: float, orientation: int) -> tuple[float, float, float, float]:
    """Map an ``xyxy`` box from the stored frame to the upright frame of EXIF ``orientation`` (PIL's
    exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 cw, 7 transverse, 8 rotate 90 ccw)."""
    x1, y1, x2, y2 = box
    w, h = raw_w, raw_h

    def pt(x, y):
        return {
            1: (x, y),
            2: (w - x, y),
            3: (w - x, h - y),
            4: (x, h - y),
            5: (y, x),
            6: (h - y, x),
            7: (h - y, w - x),
            8: (y, w - x),
        }[orientation]

    (ax, ay), (bx, by) = pt(x1, y1), pt(x2, y2)
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


def xywh_to_xyxy(b) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in b)
    return (x, y, x + w, y + h)


def clean_box(box, width: float, height: float) -> tuple[Optional[tuple[float, float, float, float]], str]:
    """Validate an ``xyxy`` pixel box against the image: returns (box or None, note).

    note is "" (fine), "clipped box" (partly outside: clipped to the image), or why it was dropped:
    "non-finite box", "zero-area box" (x2 <= x1 or y2 <= y1 as given), "box outside image" (empty after clipping).
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, "malformed box"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, "non-finite box"
    if x2 <= x1 or y2 <= y1:
        return None, "zero-area box"
    c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if c[2] <= c[0] or c[3] <= c[1]:
        return None, "box outside image"
    if c != (x1, y1, x2, y2):
        return c, "clipped box"
    return c, ""


class RowGroupCache:
    """Lazy access to one binary column of a parquet file, a few row groups kept in memory (LRU).

    Keeps memory flat for parquet files holding GBs of images: only ``max_groups`` row groups are decoded at once.
    """

    def __init__(self, path: str, column: str, max_groups: int = 4):
        import pyarrow.parquet as pq

        self.path, self.column, self.max_groups = path, column, max_groups
        self._pf = pq.ParquetFile(path)
        md = self._pf.metadata
        self._starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self._cache: "OrderedDict[int, list]" = OrderedDict()

    def get(self, row: int) -> bytes:
        g = int(np.searchsorted(self._starts, row, side="right") - 1)
        if g not in self._cache:
            table = self._pf.read_row_group(g, columns=[self.column])
            self._cache[g] = table.column(self.column).to_pylist()
            if len(self._cache) > self.max_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(g)
        return image_cell_bytes(self._cache[g][row - self._starts[g]])

    def __getstate__(self):  # picklable for AsyncVectorEnv workers: reopen the file there
        return {"path": self.path, "column": self.column, "max_groups": self.max_groups}

    def __setstate__(self, state):
        self.__init__(state["path"], state["column"], state["max_groups"])


def image_cell_bytes(cell: Union[bytes, dict, None]) -> bytes:
    """A Hugging Face ``Image`` cell is ``{"bytes": ..., "path": ...}``; plain binary columns are bytes."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if cell is None:
        return b""
    return bytes(cell)
