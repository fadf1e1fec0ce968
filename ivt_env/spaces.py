"""Gymnasium spaces for observations whose size varies: RGB images of any size and free text.

Batching in vector envs (``gymnasium.make_vec``, Sync and Async): both spaces batch the way Gymnasium batches its
own dynamic spaces (``Text``, ``Graph``): the batched space is a ``Tuple`` of copies, and a batched observation is a
``tuple`` with one native-size image (or string) per sub-env; nothing is padded or resized. For
``AsyncVectorEnv(shared_memory=True)`` (the default) each sub-env gets a shared buffer as large as the space's size
bound (``max_height x max_width x 3`` bytes, plus a header with the real size), and the parent reads it through a
view object that materialises the tuple on ``deepcopy`` (the vector env deep-copies by default, ``copy=True``).
Gymnasium's own ``Text`` shared memory reads strings once at construction and never again, and only knows the
space's charset, so :class:`FreeText` registers its own.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import create_shared_memory, read_from_shared_memory, write_to_shared_memory

PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


class ImageSpace(spaces.Space[np.ndarray]):
    """``uint8`` RGB images ``(H, W, 3)`` with ``min_side <= H <= max_height`` and ``min_side <= W <= max_width``.

    ``sample()`` draws a size uniformly within the bounds and uniform random pixels.
    """

    def __init__(self, max_height: int, max_width: int, min_side: int = 1, seed: Any = None):
        if not (1 <= int(min_side) <= min(int(max_height), int(max_width))):
            raise ValueError(f"ImageSpace needs 1 <= min_side <= max sides, got {min_side}, {max_height}x{max_width}")
        self.max_height, self.max_width, self.min_side = int(max_height), int(max_width), int(min_side)
        super().__init__(shape=None, dtype=np.uint8, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        if mask is not None or probability is not None:
            raise ValueError("ImageSpace.sample takes no mask or probability")
        h = int(self.np_random.integers(self.min_side, self.max_height + 1))
        w = int(self.np_random.integers(self.min_side, self.max_width + 1))
        return self.np_random.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    def contains(self, x: Any) -> bool:
        return (
            isinstance(x, np.ndarray)
            and x.dtype == np.uint8
            and x.ndim == 3
            and x.shape[2] == 3
            and self.min_side <= x.shape[0] <= self.max_height
            and self.min_side <= x.shape[1] <= self.max_width
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSpace) and (self.max_height, self.max_width, self.min_side) == (
            other.max_height,
            other.max_width,
            other.min_side,
        )

    def __hash__(self) -> int:
        return hash((ImageSpace, self.max_height, self.max_width, self.min_side))

    def __repr__(self) -> str:
        return f"ImageSpace(max_height={self.max_height}, max_width={self.max_width}, min_side={self.min_side})"

    def to_jsonable(self, sample_n: Sequence[np.ndarray]) -> list:
        return [np.asarray(x).tolist() for x in sample_n]

    def from_jsonable(self, sample_n: Sequence[list]) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.uint8) for x in sample_n]


class FreeText(spaces.Text):
    """Any Python string with ``min_length <= len <= max_length`` (any Unicode character).

    ``spaces.Text.contains`` rejects characters outside its charset, but referring expressions and model outputs
    hold arbitrary Unicode. ``charset`` only drives ``sample()`` (printable ASCII by default).
    """

    def __init__(self, max_length: int, *, min_length: int = 0, charset: str = PRINTABLE, seed: Any = None):
        super().__init__(max_length, min_length=min_length, charset=charset, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FreeText) and super().__eq__(other)

    def __hash__(self) -> int:
        return hash((FreeText, self.min_length, self.max_length))

    def __repr__(self) -> str:
        return f"FreeText(min_length={self.min_length}, max_length={self.max_length})"


class SharedBatch(Sequence):
    """Read-through view of one space's shared buffers for all sub-envs; ``deepcopy`` gives a plain ``tuple``.

    ``AsyncVectorEnv`` reads shared memory once at construction and then returns the same object after every
    step, so the values must be read lazily here, not at construction.
    """

    def __init__(self, read_one, n: int):
        self._read_one, self._n = read_one, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(self._n)))
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._read_one(i % self._n)

    def __deepcopy__(self, memo) -> tuple:
        return tuple(np.array(x) if isinstance(x, np.ndarray) else x for x in self)

    def __repr__(self) -> str:
        return f"SharedBatch({tuple(self)!r})"


# --- ImageSpace in shared memory: per sub-env [h, w] as int64 header, then max_h * max_w * 3 bytes.
def _image_stride(space: ImageSpace) -> int:
    return 16 + space.max_height * space.max_width * 3


@create_shared_memory.register(ImageSpace)
def _create_image_shared_memory(space: ImageSpace, n: int = 1, ctx: Any = None):
    import multiprocessing as mp

    return (ctx or mp).Array(np.dtype(np.uint8).char, n * _image_stride(space))


@read_from_shared_memory.register(ImageSpace)
def _read_image_shared_memory(space: ImageSpace, shared_memory: Any, n: int = 1) -> SharedBatch:
    buf = np.frombuffer(shared_memory.get_obj(), dtype=np.uint8).reshape(n, _image_stride(space))

    def read_one(i: int) -> np.ndarray:
        h, w = (int(v) for v in buf[i, :16].view(np.int64))
        return buf[i, 16 : 16 + h * w * 3].reshape(h, w, 3)

    return SharedBatch(read_one, n)


@write_to_shared_memory.register(ImageSpace)
def _write_image_shared_memory(space: ImageSpace, index: int, value: np.ndarray, shared_memory: Any) -> None:
    if not space.contains(value):
        raise ValueError(f"image of shape {getattr(value, 'shape', None)} does not fit {space}")
    stride = _image_stride(space)
    row = np.frombuffer(shared_memory.get_obj(), dtype=np.uint8)[index * stride : (index + 1) * stride]
    h, w = value.shape[:2]
    row[:16].view(np.int64)[:] = (h, w)
    row[16 : 16 + h * w * 3].reshape(h, w, 3)[...] = value


# --- FreeText in shared memory: per sub-env [length] then max_length Unicode code points (int32, UTF-32).
@create_shared_memory.register(FreeText)
def _create_text_shared_memory(space: FreeText, n: int = 1, ctx: Any = None):
    import multiprocessing as mp

    return (ctx or mp).Array(np.dtype(np.int32).char, n * (space.max_length + 1))


@read_from_shared_memory.register(FreeText)
def _read_text_shared_memory(space: FreeText, shared_memory: Any, n: int = 1) -> SharedBatch:
    buf = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape(n, space.max_length + 1)

    def read_one(i: int) -> str:
        length = int(buf[i, 0])
        return buf[i, 1 : 1 + length].tobytes().decode("utf-32-le", "surrogatepass")

    return SharedBatch(read_one, n)


@write_to_shared_memory.register(FreeText)
def _write_text_shared_memory(space: FreeText, index: int, value: str, shared_memory: Any) -> None:
    if not space.contains(value):
        raise ValueError(f"text of length {len(value) if isinstance(value, str) else '?'} does not fit {space}")
    row = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape(-1, space.max_length + 1)[index]
    codes = np.frombuffer(value.encode("utf-32-le", "surrogatepass"), dtype=np.int32)
    row[0] = len(codes)
    row[1 : 1 + len(codes)] = codes
