"""Depth for grounding (SIFThinker): depth maps of synthetic scenes, depth maps of real datasets read from a
folder, the GT depth inside a box, and the depth-consistency check behind the ``depth`` reward.

Convention: a depth map is ``float32 (H, W)`` aligned with the image, larger = farther (a distance, not a
disparity). Synthetic scenes put each shape at its own depth in [0.2, 0.9] (two decimals) on a background at 1.0,
drawn far to near (a nearer shape covers a farther one).

GT depth of a box (:func:`depth_in_box`): the 25th percentile of the depth map over the box's pixels, i.e. the
depth of the nearest quarter of the region. SIFThinker reads "the depth inside the box" without saying how; a
median would land on the background for a triangle (half its tight box is background), the near quarter is the
object's own depth for any shape filling at least a quarter of its box, on synthetic and on real scenes alike.
SIFThinker's r_depth: 1 when every written (box, depth) pair has ``|d - d_gt| / d_gt <= 0.1``, else 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

DEPTH_RANGE = (0.2, 0.9)
BACKGROUND_DEPTH = 1.0
DEPTH_PERCENTILE = 25.0
DEPTH_TOLERANCE = 0.1  # SIFThinker's T: relative error
DEPTH_SUFFIXES = (".npy", ".png", ".tif", ".tiff")


def _draw_mask(kind: str, x0: int, y0: int, d: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    from ivt_env.datasets.synthetic import _draw_shape

    m = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(m), kind, x0, y0, d, 255)
    return np.asarray(m) > 0


def render_depth(objects: Sequence[Any], places: Sequence[tuple[int, int, int]], depths: Sequence[float],
                 image_size: tuple[int, int]) -> np.ndarray:
    """Depth map ``float32 (H, W)`` of a synthetic scene: background 1.0, shapes drawn far to near."""
    W, H = image_size
    out = np.full((H, W), BACKGROUND_DEPTH, dtype=np.float32)
    for j in sorted(range(len(objects)), key=lambda j: -depths[j]):  # far first: near shapes cover them
        x0, y0, d = places[j]
        out[_draw_mask(objects[j].kind, x0, y0, d, (W, H))] = depths[j]
    return out


class SceneDepth:
    """``meta["load_depth"]`` of a synthetic scene (a class, so samples pickle for worker processes)."""

    def __init__(self, objects, places, depths, image_size):
        self.objects, self.places, self.depths, self.image_size = objects, places, list(depths), tuple(image_size)

    def __call__(self) -> np.ndarray:
        return render_depth(self.objects, self.places, self.depths, self.image_size)


def scene_depths(objects, places, targets: Sequence[int], cfg: Any, key: Sequence[int]) -> dict:
    """``depths`` (per object), ``gt_depths`` (per target, GT-box order) and ``load_depth`` of a synthetic scene,
    from their own random stream ``(key..., 7)``, so the scene's layout and expression never change with depth."""
    rng = np.random.default_rng([*[int(k) for k in key], 7])
    lo, hi = DEPTH_RANGE
    depths = [round(float(v), 2) for v in rng.uniform(lo, hi, size=len(objects))]
    return {"depths": depths, "gt_depths": [depths[j] for j in targets],
            "load_depth": SceneDepth(objects, places, depths, cfg.image_size)}


def depth_in_box(depth_map: np.ndarray, box_px: Sequence[float]) -> Optional[float]:
    """GT depth of a pixel box: the 25th percentile of ``depth_map`` over the pixels whose centre lies in the box
    (the pixel under the centre for a box thinner than a pixel); ``None`` outside the map."""
    from ivt_env.rendering import box_region

    region = box_region(box_px, depth_map.shape[0], depth_map.shape[1])
    if region is None:
        return None
    r1, r2, c1, c2 = region
    vals = np.asarray(depth_map[r1:r2, c1:c2], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return float(np.percentile(vals, DEPTH_PERCENTILE)) if vals.size else None


def depth_consistent(depth: float, gt: Optional[float], tol: float = DEPTH_TOLERANCE) -> bool:
    """SIFThinker's check of one (box, depth) pair: ``|d - d_gt| / d_gt <= tol`` (False without a positive GT)."""
    if gt is None or not gt > 0 or depth is None or not math.isfinite(depth):
        return False
    return abs(depth - gt) / gt <= tol + 1e-12


def check_depths(boxes_px: Sequence[Sequence[float]], depths: Sequence[Optional[float]],
                 depth_map: Optional[np.ndarray]) -> Optional[bool]:
    """Whether every (box, depth) pair a step wrote is consistent with ``depth_map``; ``None`` when the step wrote
    no depth (nothing to check) or there is no depth map."""
    pairs = [(b, d) for b, d in zip(boxes_px, depths) if d is not None]
    if not pairs or depth_map is None:
        return None
    return all(depth_consistent(d, depth_in_box(depth_map, b)) for b, d in pairs)


# ------------------------------------------------------------------------------------- real datasets: a folder
class FolderDepth:
    """``meta["load_depth"]`` of a real sample: the depth map in ``folder`` whose stem is the image's stem
    (``COCO_train2014_000000000009.jpg`` -> ``COCO_train2014_000000000009.npy`` / ``.png`` / ``.tif``). A 16-bit
    PNG / TIFF is read as is (divide by ``scale`` to get the unit wanted); ``.npy`` holds a 2-D float array."""

    def __init__(self, folder: str | Path, image_name: str, size: tuple[int, int], scale: float = 1.0):
        self.folder, self.stem, self.size, self.scale = Path(folder), Path(image_name).stem, tuple(size), float(scale)

    def path(self) -> Optional[Path]:
        for suffix in DEPTH_SUFFIXES:
            p = self.folder / (self.stem + suffix)
            if p.is_file():
                return p
        return None

    def __call__(self) -> np.ndarray:
        from ivt_env.datasets.base import DatasetError

        p = self.path()
        if p is None:
            raise DatasetError(f"no depth map for image {self.stem!r} in {self.folder} (expected {self.stem}"
                               f"{{{','.join(DEPTH_SUFFIXES)}}}, aligned with the image by file name)")
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im)
        arr = np.asarray(arr, dtype=np.float32)
        W, H = self.size
        if arr.ndim != 2 or arr.shape != (H, W):
            raise DatasetError(f"depth map {p}: shape {arr.shape}, expected ({H}, {W}) like its image")
        return arr / self.scale


def image_name(sample: Any) -> Optional[str]:
    """The image file name of a sample: ``meta["image_path"]`` / ``meta["file_name"]``, else the path (or key) of
    the file its loader reads (``ivt_env.datasets.images.ImageRef``)."""
    meta = sample.meta or {}
    name = meta.get("image_path") or meta.get("file_name")
    ref = getattr(sample.load_image, "ref", None)
    if not name and ref is not None:
        name = getattr(ref, "path", None) or getattr(ref, "key", None)
    return str(name) if name else None


def attach_depth_folder(dataset: Any, folder: str | Path, scale: float = 1.0, require: bool = True) -> Any:
    """Give every sample of a loaded real dataset a ``meta["load_depth"]`` reading ``folder`` (aligned by image
    file name, :func:`image_name`). The loader option ``load_dataset(..., depth_dir=folder)`` calls it.
    ``require``: fail now, naming the first image without a depth map, instead of at its first use. Returns the
    dataset."""
    from ivt_env.datasets.base import DatasetError

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"depth folder {folder} does not exist")
    for s in getattr(dataset, "_samples", None) or [dataset[i] for i in range(len(dataset))]:
        name = image_name(s)
        if not name:
            raise DatasetError(f"sample {s.sample_id!r}: no image file name to align a depth map by (meta "
                               "'image_path' / 'file_name', or an image read from a file)")
        loader = FolderDepth(folder, str(name), (s.width, s.height), scale)
        if require and loader.path() is None:
            raise DatasetError(f"depth folder {folder}: no depth map for {Path(str(name)).name} (sample "
                               f"{s.sample_id!r}); expected {loader.stem}{{{','.join(DEPTH_SUFFIXES)}}}")
        s.meta["load_depth"] = loader
    return dataset


# ------------------------------------------------------------------------------------- the observation space
from gymnasium import spaces as _spaces  # noqa: E402
from gymnasium.vector.utils import create_shared_memory, read_from_shared_memory, write_to_shared_memory  # noqa: E402


class DepthSpace(_spaces.Space):
    """``float32`` depth maps ``(H, W)`` with ``1 <= H <= max_height``, ``1 <= W <= max_width``, values >= 0
    (the env's optional ``depth`` observation). Batches like :class:`ivt_env.spaces.ImageSpace`: a tuple of native
    size maps per sub-env, shared memory as large as the bound for ``AsyncVectorEnv``."""

    def __init__(self, max_height: int, max_width: int, seed: Any = None):
        self.max_height, self.max_width = int(max_height), int(max_width)
        super().__init__(shape=None, dtype=np.float32, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        h = int(self.np_random.integers(1, self.max_height + 1))
        w = int(self.np_random.integers(1, self.max_width + 1))
        return self.np_random.uniform(0.0, 1.0, size=(h, w)).astype(np.float32)

    def contains(self, x: Any) -> bool:
        return (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
                and 1 <= x.shape[0] <= self.max_height and 1 <= x.shape[1] <= self.max_width
                and bool(np.all(x >= 0)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DepthSpace) and (self.max_height, self.max_width) == (other.max_height,
                                                                                       other.max_width)

    def __hash__(self) -> int:
        return hash((DepthSpace, self.max_height, self.max_width))

    def __repr__(self) -> str:
        return f"DepthSpace(max_height={self.max_height}, max_width={self.max_width})"


def _stride(space: DepthSpace) -> int:
    return 2 + space.max_height * space.max_width  # [h, w] as float32, then the map


@create_shared_memory.register(DepthSpace)
def _create_depth_shared_memory(space: DepthSpace, n: int = 1, ctx: Any = None):
    import multiprocessing as mp

    return (ctx or mp).Array(np.dtype(np.float32).char, n * _stride(space))


@read_from_shared_memory.register(DepthSpace)
def _read_depth_shared_memory(space: DepthSpace, shared_memory: Any, n: int = 1):
    from ivt_env.spaces import SharedBatch

    buf = np.frombuffer(shared_memory.get_obj(), dtype=np.float32).reshape(n, _stride(space))

    def read_one(i: int) -> np.ndarray:
        h, w = int(buf[i, 0]), int(buf[i, 1])
        return buf[i, 2 : 2 + h * w].reshape(h, w)

    return SharedBatch(read_one, n)


@write_to_shared_memory.register(DepthSpace)
def _write_depth_shared_memory(space: DepthSpace, index: int, value: np.ndarray, shared_memory: Any) -> None:
    if not space.contains(value):
        raise ValueError(f"depth map of shape {getattr(value, 'shape', None)} does not fit {space}")
    n = _stride(space)
    row = np.frombuffer(shared_memory.get_obj(), dtype=np.float32)[index * n : (index + 1) * n]
    h, w = value.shape
    row[:2] = (h, w)
    row[2 : 2 + h * w].reshape(h, w)[...] = value
