"""Bad and unusual records: unreadable images, degenerate boxes, colour modes, EXIF orientation, size mismatch."""

import logging

import numpy as np
import pytest
from PIL import Image

from ivt_env.datasets import DatasetError, ListDataset, load_dataset
from ivt_env.datasets.images import FileImage, clean_box, decode_rgb, orient_box, to_rgb

from . import fixtures as fx


def box_in_pixels(img: np.ndarray):
    """Box of the fixture's object found in the pixels: far from the background colour (works in grey too)."""
    lum = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    bg = float(np.array(fx.BACKGROUND) @ np.array([0.299, 0.587, 0.114]))
    ys, xs = np.nonzero(np.abs(lum - bg) > 30)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    return fx.write_refl4(str(tmp_path_factory.mktemp("bad")), images="folder", bad=True)


def test_bad_records_skipped_and_counted(bad_root, caplog):
    with caplog.at_level(logging.WARNING, logger="ivt_env.datasets"):
        ds = load_dataset("refl4", "test", data_root=bad_root)
    # REFL4_BAD_ROWS: 2 unreadable (garbage bytes, missing file), 1 zero-area, 1 outside, 1 size mismatch
    assert ds.bad_counts == {"unreadable image": 2, "zero-area box": 1, "box outside image": 1,
                             "image size mismatch": 1}
    assert ds.num_bad == 5
    assert "dropped 5 bad records" in caplog.text
    # 2 clean rows + 8 kept odd rows (partial box, L, RGBA, CMYK, P, I;16, EXIF 6, EXIF 3)
    assert len(ds) == 10
    assert ds.fixed_counts["clipped box"] == 1 and ds.fixed_counts["EXIF-oriented image"] == 2
    for mode in ("L", "RGBA", "CMYK", "P", "I;16"):
        assert ds.fixed_counts[f"converted {mode} to RGB"] == 1
    ids = set(ds.sample_ids)
    assert {"refl4-200", "refl4-201", "refl4-202", "refl4-203", "refl4-212"}.isdisjoint(ids)


def test_kept_odd_records_decode_to_rgb_with_consistent_boxes(bad_root):
    ds = load_dataset("refl4", "test", data_root=bad_root)
    by_id = {s.sample_id: s for s in ds}
    # partly outside: [50, 40, 20, 20] in 64x48 -> clipped to the image
    assert by_id["refl4-204"].gt_box == (50.0, 40.0, 64.0, 48.0)
    for sid in ("refl4-205", "refl4-206", "refl4-207", "refl4-208", "refl4-209"):
        s = by_id[sid]
        img = s.load_image()
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        assert box_in_pixels(img) == (8, 8, 24, 24) == tuple(int(v) for v in s.gt_box)
    # RGBA is composited, not dropped to black: the background keeps its colour
    assert np.abs(by_id["refl4-206"].load_image()[40, 60].astype(int) - fx.BACKGROUND).max() <= 2


def test_exif_rotated_images_and_boxes_agree(bad_root):
    ds = load_dataset("refl4", "test", data_root=bad_root)
    by_id = {s.sample_id: s for s in ds}
    # stored 64x48 with box (8, 10, 24, 30); orientation 6 = rotate 90 clockwise: (x, y) -> (48 - y, x)
    s6 = by_id["refl4-210"]
    assert (s6.width, s6.height) == (48, 64)
    assert s6.gt_box == (18.0, 8.0, 38.0, 24.0)
    img = s6.load_image()
    assert img.shape == (64, 48, 3)
    assert box_in_pixels(img) == (18, 8, 38, 24)
    assert s6.meta["exif_orientation"] == 6
    # orientation 3 = rotate 180: (x, y) -> (64 - x, 48 - y)
    s3 = by_id["refl4-211"]
    assert (s3.width, s3.height) == (64, 48) and s3.gt_box == (40.0, 18.0, 56.0, 38.0)
    assert box_in_pixels(s3.load_image()) == (40, 18, 56, 38)


def test_on_bad_sample_raise_names_the_record(bad_root):
    with pytest.raises(DatasetError, match=r"refl4-200 \(image .*bad_garbage\.jpg\): unreadable image"):
        load_dataset("refl4", "test", data_root=bad_root, on_bad_sample="raise")
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_dataset("refl4", "test", data_root=bad_root, on_bad_sample="ignore")


def test_without_image_checks_problems_surface_at_load_time(bad_root):
    ds = load_dataset("refl4", "test", data_root=bad_root, check_images=False)
    by_id = {s.sample_id: s for s in ds}
    assert "refl4-200" in by_id and "refl4-212" in by_id  # not detectable without opening the image
    assert ds.bad_counts == {"zero-area box": 1, "box outside image": 1}
    with pytest.raises(DatasetError, match=r"refl4-200: cannot read image .*bad_garbage\.jpg"):
        by_id["refl4-200"].load_image()
    with pytest.raises(DatasetError, match=r"64x48 upright, the annotation says 100x100.*check_images"):
        by_id["refl4-212"].load_image()
    with pytest.raises(DatasetError, match="EXIF orientation 3"):  # 180 degrees keeps the size: still caught
        by_id["refl4-211"].load_image()


def test_default_and_full_checks_catch_truncated_files(tmp_path, caplog):
    root = fx.write_refl4(str(tmp_path))
    path = tmp_path / "refl4" / "images" / "objects365_v2_00007001.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: data.find(b"\xff\xda") + 30])  # header up to the scan start intact, pixels cut
    for check in (True, "full"):  # the default check reads the file's end too: no JPEG end marker -> decoded
        with caplog.at_level(logging.WARNING, logger="ivt_env.datasets"):
            ds = load_dataset("refl4", "test", data_root=root, check_images=check)
        assert ds.bad_counts == {"unreadable image": 1} and ds.sample_ids == ["refl4-100"]
        assert "refl4-101" in caplog.text and "objects365_v2_00007001.jpg" in caplog.text and "truncated" in caplog.text
    # a whole JPEG padded after its end marker (some cameras do) still passes the default check
    path.write_bytes(data + b"\0" * 10000)
    assert len(load_dataset("refl4", "test", data_root=root)) == 2


def _one_record_dataset(tmp_path, expression="the red box", *, size=(64, 48), **kwargs):
    from ivt_env.datasets.records import RawRecord, RecordDataset

    p = tmp_path / "one.jpg"
    p.write_bytes(fx.image_bytes(*size, (8, 8, 24, 24)))
    rec = RawRecord("rec-1", expression, (8, 8, 24, 24), FileImage(str(p)), *size)
    return RecordDataset([rec], "one", "test", **kwargs)


def test_caption_length_limit_is_an_option(tmp_path, caplog):
    long = "a red box " * 5000  # 50,000 characters: the env's observation space holds 4,096
    with caplog.at_level(logging.WARNING, logger="ivt_env.datasets"):
        ds = _one_record_dataset(tmp_path, long)
    assert len(ds) == 0 and ds.bad_counts == {"expression too long": 1}
    assert "rec-1" in caplog.text and "50000 characters, max_expression_chars=4096" in caplog.text
    with pytest.raises(DatasetError, match=r"bad record rec-1 .*expression too long: 50000 characters"):
        _one_record_dataset(tmp_path, long, on_bad_sample="raise")
    assert len(_one_record_dataset(tmp_path, "x" * 4096)) == 1  # the bound itself is fine
    assert _one_record_dataset(tmp_path, "x" * 100, max_expression_chars=99).bad_counts == {"expression too long": 1}


def test_raise_on_empty_caption_names_the_record(tmp_path):
    import pyarrow.parquet as pq

    root = fx.write_refl4(str(tmp_path))
    path = tmp_path / "refl4" / "ref-l4-test.parquet"
    cols = pq.read_table(path).to_pydict()
    cols["caption"][1] = "   "
    import pyarrow as pa

    pq.write_table(pa.Table.from_pydict(cols), path)
    with pytest.raises(DatasetError, match=r"'empty expression': 1 \(e\.g\. refl4-101 \(image .*objects365_v2_00007001"
                                           r"\.jpg\)\)"):
        load_dataset("refl4", "test", data_root=root, on_bad_sample="raise")
    ds = load_dataset("refl4", "test", data_root=root)
    assert ds.bad_counts == {"empty expression": 1}
    assert ds.bad_examples["empty expression"][0].startswith("refl4-101 (image ")


def test_skip_report_names_the_missing_file(bad_root, caplog):
    with caplog.at_level(logging.WARNING, logger="ivt_env.datasets"):
        ds = load_dataset("refl4", "test", data_root=bad_root)
    line = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(line) == 1
    assert "refl4-201" in line[0] and "bad_missing.jpg" in line[0] and "image file not found" in line[0]
    assert any("bad_missing.jpg" in e for e in ds.bad_examples["unreadable image"])


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR only: PIL reads the size from it without any pixel data (a cheap 'bomb')."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_decompression_bomb_is_named_and_the_limit_is_an_option(tmp_path, caplog):
    from ivt_env.datasets.records import RawRecord, RecordDataset

    p = tmp_path / "huge.png"
    p.write_bytes(_png_header(20000, 10000))  # 200 megapixels > PIL's 178,956,970
    rec = RawRecord("huge-1", "the red box", (8, 8, 24, 24), FileImage(str(p)), 20000, 10000)
    with caplog.at_level(logging.WARNING, logger="ivt_env.datasets"):
        ds = RecordDataset([rec], "one", "test")
    assert ds.bad_counts == {"image over pixel limit": 1}
    assert "huge-1" in caplog.text and "200,000,000 pixels is over the decompression-bomb limit of 178,956,970" \
        in caplog.text and "max_image_pixels" in caplog.text
    # the option: a lower limit drops a small image, and loading obeys the same limit
    assert _one_record_dataset(tmp_path, max_image_pixels=1000).bad_counts == {"image over pixel limit": 1}
    ok = _one_record_dataset(tmp_path, max_image_pixels=64 * 48)
    assert len(ok) == 1 and ok[0].load_image().shape == (48, 64, 3)
    lazy = _one_record_dataset(tmp_path, check_images=False, max_image_pixels=1000)
    with pytest.raises(DatasetError, match=r"rec-1: cannot read image .*one\.jpg: 64x48 = 3,072 pixels is over"):
        lazy[0].load_image()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_box_matches_pil_exif_transpose(tmp_path, orientation):
    # independent route: write a JPEG with the tag, let PIL transpose it, find the box in the pixels
    w, h, box = 64, 48, (8, 10, 24, 30)
    p = tmp_path / f"o{orientation}.jpg"
    p.write_bytes(fx.image_bytes(w, h, box, orientation=orientation))
    img, o = decode_rgb(FileImage(str(p)))
    assert o == orientation
    assert box_in_pixels(img) == tuple(int(v) for v in orient_box(box, w, h, orientation))


def test_clean_box_cases():
    assert clean_box((1, 2, 3, 4), 10, 10) == ((1.0, 2.0, 3.0, 4.0), "")
    assert clean_box((-5, 2, 3, 14), 10, 10) == ((0.0, 2.0, 3.0, 10.0), "clipped box")
    assert clean_box((3, 2, 3, 4), 10, 10) == (None, "zero-area box")
    assert clean_box((5, 2, 3, 4), 10, 10) == (None, "zero-area box")
    assert clean_box((12, 2, 15, 4), 10, 10) == (None, "box outside image")
    assert clean_box((float("nan"), 2, 3, 4), 10, 10) == (None, "non-finite box")
    assert clean_box(("a", 2, 3, 4), 10, 10) == (None, "malformed box")


def test_to_rgb_modes():
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 255))).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


def test_list_dataset_rejects_duplicate_ids():
    s = load_dataset("synthetic", "val")[0]
    with pytest.raises(DatasetError, match="duplicate sample id"):
        ListDataset([s, s], name="x", split="test")
    ds = ListDataset([s], name="x", split="test")
    assert ds.index_of(s.sample_id) == 0 and len(ds) == 1 and ds.num_bad == 0
