"""From upstream annotation records to :class:`Sample` s: box clean-up, image checks, bad-record policy, counts.

Two stages, so a subset (the Mix benchmark) only pays for the images it uses:
1. a loader turns its files into :class:`RawRecord` s (annotations only, cheap);
2. :func:`build_samples` checks each record's box and (``check_images``) its image header, maps the box through
   EXIF orientation (see :mod:`.images`) and drops or raises on bad records (``on_bad_sample``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from .base import MAX_EXPRESSION_CHARS, DatasetError, ListDataset, Sample
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_ERRORS,
    SWAPS_AXES,
    ImageInfo,
    ImageRef,
    ImageTooLarge,
    clean_box,
    decode_rgb,
    orient_box,
    probe,
)

log = logging.getLogger(__name__)

ON_BAD = ("skip", "raise")
#: Records named per reason in reports (the count covers all of them).
EXAMPLES_PER_REASON = 3


class BadRecords(Counter):
    """Dropped records counted by reason, plus the first few of each reason (id, file, detail) so that a report
    can name them: ``bad.note("empty expression", "refl4-7", "/data/refl4/images/x.jpg")``. Used as a Counter
    everywhere else (``bad["reason"] += 1`` still counts, without an example)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list[str]] = {}

    def note(self, reason: str, record_id: str, where: str = "", detail: str = "") -> None:
        self[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append(describe_record(record_id, where, detail))

    def merge(self, other: Counter, prefix: str = "") -> None:
        for reason, n in other.items():
            self[prefix + reason] += n
        for reason, ex in getattr(other, "examples", {}).items():
            mine = self.examples.setdefault(prefix + reason, [])
            mine.extend(ex[: max(0, EXAMPLES_PER_REASON - len(mine))])

    def summary(self) -> str:
        """``"reason": n (e.g. id (file): detail; ...)`` for every reason, in one line."""
        parts = []
        for reason, n in self.items():
            ex = self.examples.get(reason)
            parts.append(f"{reason!r}: {n}" + (f" (e.g. {'; '.join(ex)})" if ex else ""))
        return "{" + ", ".join(parts) + "}"


def describe_record(record_id: str, where: str = "", detail: str = "") -> str:
    return f"{record_id}" + (f" ({where})" if where else "") + (f": {detail}" if detail else "")


@dataclass
class RawRecord:
    """One upstream example before checks. ``box`` is ``xyxy`` pixels in the annotated frame; ``width``/``height``
    the annotated image size (None when the upstream file has none: read from the image header)."""

    sample_id: str
    expression: str
    box: tuple
    image: ImageRef
    width: Optional[int] = None
    height: Optional[int] = None
    meta: dict = field(default_factory=dict)


def _check_on_bad(on_bad_sample: str) -> None:
    if on_bad_sample not in ON_BAD:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD}, got {on_bad_sample!r}")


class _Loader:
    """Sample.load_image for one record: decode upright RGB and check it has the size the sample promised."""

    def __init__(self, ref: ImageRef, sample_id: str, width: int, height: int, orientation: Optional[int],
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self.ref, self.sample_id, self.width, self.height, self.orientation = ref, sample_id, width, height, orientation
        self.max_pixels = max_pixels

    def __setstate__(self, state):  # loaders pickled before max_pixels existed
        self.__dict__.update(state)
        self.__dict__.setdefault("max_pixels", DEFAULT_MAX_IMAGE_PIXELS)

    def __call__(self):
        try:
            arr, orientation = decode_rgb(self.ref, self.max_pixels)
        except IMAGE_ERRORS as e:
            raise DatasetError(f"sample {self.sample_id}: cannot read image {self.ref.describe()}: {e}") from e
        if self.orientation is None and orientation != 1:
            raise DatasetError(
                f"sample {self.sample_id}: image {self.ref.describe()} has EXIF orientation {orientation}, so its box "
                "must be rotated with it; the dataset was built with check_images=False: rebuild with it on"
            )
        if arr.shape[:2] != (self.height, self.width):
            hint = "" if self.orientation is not None else " (built with check_images=False: rebuild with it on)"
            raise DatasetError(
                f"sample {self.sample_id}: image {self.ref.describe()} is {arr.shape[1]}x{arr.shape[0]} upright, "
                f"the annotation says {self.width}x{self.height}{hint}"
            )
        return arr


def build_samples(
    records: Iterable[RawRecord],
    *,
    source: str,
    on_bad_sample: str = "skip",
    check_images: Union[bool, str] = True,
    want: Optional[int] = None,
    bad_counts: Optional[Counter] = None,
    fixed_counts: Optional[Counter] = None,
    progress: Optional[bool] = None,
    total: Optional[int] = None,
    max_expression_chars: int = MAX_EXPRESSION_CHARS,
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Sample]:
    """Check ``records`` in order and return good samples (at most ``want``; stops early once reached).

    ``check_images``: True reads each image's header once (size, EXIF orientation, readability) and the end of
    the file (a JPEG/PNG without its end marker is decoded in full: catches files cut short); "full" decodes every
    image's pixels; False trusts the annotation's size and checks at load time.
    ``max_expression_chars``: longer expressions are dropped ("expression too long"; the env refuses them).
    ``max_image_pixels``: images with more pixels are dropped ("image over pixel limit"; None: no limit).
    Dropped records are counted by reason in ``bad_counts`` (a :class:`BadRecords` also keeps the first few ids
    and files of each reason); repairs (clipped box, EXIF rotation, non-RGB mode) in ``fixed_counts``.
    """
    _check_on_bad(on_bad_sample)
    bad = bad_counts if bad_counts is not None else BadRecords()
    fixed = fixed_counts if fixed_counts is not None else Counter()
    infos: dict[str, Union[ImageInfo, tuple[str, str]]] = {}
    out: list[Sample] = []
    if progress is None:
        progress = (total or 0) > 5000 and bool(check_images)
    it = records
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(records, total=total, desc=f"checking {source}", unit="rec")

    def reject(rec: RawRecord, reason: str, detail: str = "") -> None:
        if on_bad_sample == "raise":
            raise DatasetError(
                f"{source}: bad record {rec.sample_id} (image {rec.image.describe()}): {reason}"
                + (f": {detail}" if detail else "")
                + " (pass on_bad_sample='skip' to drop such records)"
            )
        if isinstance(bad, BadRecords):
            bad.note(reason, rec.sample_id, f"image {rec.image.describe()}", detail)
        else:
            bad[reason] += 1

    for rec in it:
        if want is not None and len(out) >= want:
            break
        if len(rec.expression) > max_expression_chars:
            reject(rec, "expression too long", f"{len(rec.expression)} characters, max_expression_chars="
                   f"{max_expression_chars}")
            continue
        orientation: Optional[int] = None
        if check_images or rec.width is None or rec.height is None:
            key = rec.image.key
            if key not in infos:
                try:
                    infos[key] = probe(rec.image, full=(check_images == "full"), max_pixels=max_image_pixels)
                except ImageTooLarge as e:
                    infos[key] = ("image over pixel limit", str(e))
                except IMAGE_ERRORS as e:
                    infos[key] = ("unreadable image", f"{type(e).__name__}: {e}")
            info = infos[key]
            if isinstance(info, tuple):
                reject(rec, *info)
                continue
            ann_w = rec.width if rec.width is not None else info.raw_width
            ann_h = rec.height if rec.height is not None else info.raw_height
            up_w, up_h = info.upright_size
            if (ann_w, ann_h) == (info.raw_width, info.raw_height):
                orientation = info.orientation  # annotation in the stored frame: rotate the box with the image
            elif (ann_w, ann_h) == (up_w, up_h):
                orientation = 1  # annotation already in the upright frame
            else:
                reject(rec, "image size mismatch", f"annotation {ann_w}x{ann_h}, image {info.raw_width}x{info.raw_height}")
                continue
            if info.mode != "RGB":
                fixed[f"converted {info.mode} to RGB"] += 1
        else:
            ann_w, ann_h = int(rec.width), int(rec.height)
        if ann_w <= 0 or ann_h <= 0:
            reject(rec, "invalid image size", f"{ann_w}x{ann_h}")
            continue
        box, note = clean_box(rec.box, ann_w, ann_h)
        if box is None:
            reject(rec, note, f"box {list(rec.box)} in a {ann_w}x{ann_h} image")
            continue
        if note:
            fixed[note] += 1
        width, height = int(ann_w), int(ann_h)
        if orientation is not None and orientation != 1:
            box = orient_box(box, ann_w, ann_h, orientation)
            if orientation in SWAPS_AXES:
                width, height = height, width
            fixed["EXIF-oriented image"] += 1
        meta = dict(rec.meta)
        if orientation is not None and orientation != 1:
            meta["exif_orientation"] = orientation
        out.append(
            Sample(
                sample_id=rec.sample_id,
                expression=rec.expression,
                gt_box=tuple(float(v) for v in box),
                width=width,
                height=height,
                source=source,
                load_image=_Loader(rec.image, rec.sample_id, width, height, orientation, max_image_pixels),
                meta=meta,
            )
        )
    return out


class RecordDataset(ListDataset):
    """A :class:`ListDataset` built from upstream records, with ``bad_counts`` (dropped, by reason) and
    ``fixed_counts`` (repaired, by kind); one log line summarises both."""

    def __init__(
        self,
        records: list[RawRecord],
        name: str,
        split: str,
        *,
        on_bad_sample: str = "skip",
        check_images: Union[bool, str] = True,
        bad_counts: Optional[Counter] = None,
        limit: Optional[int] = None,
        progress: Optional[bool] = None,
        where: str = "",
        max_expression_chars: int = MAX_EXPRESSION_CHARS,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        bad = BadRecords()
        bad.merge(bad_counts or Counter())
        _check_on_bad(on_bad_sample)
        if bad and on_bad_sample == "raise":
            raise DatasetError(
                f"{name}/{split}: bad records in the annotations: {bad.summary()} ({where}); "
                "pass on_bad_sample='skip' to drop them"
            )
        fixed: Counter = Counter()
        samples = build_samples(
            records,
            source=name,
            on_bad_sample=on_bad_sample,
            check_images=check_images,
            want=limit,
            bad_counts=bad,
            fixed_counts=fixed,
            progress=progress,
            total=len(records),
            max_expression_chars=max_expression_chars,
            max_image_pixels=max_image_pixels,
        )
        super().__init__(samples, name=name, split=split, bad_counts=bad)
        self.fixed_counts = dict(fixed)
        self.bad_examples = {k: list(v) for k, v in bad.examples.items()}
        self.where = where
        if bad:
            log.warning("%s/%s: dropped %d bad records %s (%s)", name, split, sum(bad.values()), bad.summary(), where)
        if fixed:
            log.info("%s/%s: repaired %s", name, split, dict(fixed))


def data_root(data_root: Optional[Union[str, os.PathLike]], name: str) -> str:
    """The data root from the argument, else ``$IVT_DATA``; a clear error when neither is set or it is missing."""
    root = data_root if data_root is not None else os.environ.get("IVT_DATA")
    if not root:
        raise DatasetError(
            f"{name}: no data root: pass data_root=DIR (env kwarg data_root) or set IVT_DATA=DIR; "
            f"`python -m ivt_env.datasets download {name} --root DIR` fetches it where the Hugging Face Hub is reachable"
        )
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{name}: data root {root!r} is not a directory (from {'argument' if data_root else 'IVT_DATA'})")
    return root
