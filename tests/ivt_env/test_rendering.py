"""The overlay checked at the pixels: inside reddened, outline solid, outside untouched, nothing for bad boxes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivt_env.rendering import Overlay, OverlayStyle, box_region, draw_box, tint

H, W = 80, 100
GREY = 100


def grey(h=H, w=W, v=GREY):
    return np.full((h, w, 3), v, dtype=np.uint8)


def test_default_style():
    s = OverlayStyle()
    assert s.color == (255, 0, 0) and s.alpha == 0.35 and s.outline_width is None
    assert s.width_for(480, 640) == 2 and s.width_for(1080, 1920) == 4 and s.width_for(128, 128) == 1
    assert OverlayStyle(outline_width=7).width_for(10, 10) == 7


def test_fill_outline_and_outside_at_the_pixels():
    img = grey()
    out = draw_box(img, (10, 20, 50, 60))  # columns 10..49, rows 20..59
    assert out.dtype == np.uint8 and out.shape == img.shape and out is not img
    assert np.array_equal(img, grey()), "the input must not change"
    # hand-computed fill, alpha = 90/256: R = (100 * 166 + 255 * 90 + 128) >> 8 = 154, G = B = 16728 >> 8 = 65
    inner = out[21:59, 11:49]
    assert (inner[..., 0] == 154).all() and (inner[..., 1] == 65).all() and (inner[..., 2] == 65).all()
    # and it is the plain alpha blend up to rounding: 0.65 * 100 + 0.35 * 255 = 154.25, 0.65 * 100 = 65
    assert abs(154 - (0.65 * GREY + 0.35 * 255)) < 1 and abs(65 - 0.65 * GREY) < 1
    # outline: 1 px (min side 80 / 240 rounds to 0 -> at least 1), solid red on all four sides
    red = np.array([255, 0, 0], np.uint8)
    for edge in (out[20, 10:50], out[59, 10:50], out[20:60, 10], out[20:60, 49]):
        assert (edge == red).all()
    # everything outside the box is untouched
    mask = np.zeros((H, W), bool)
    mask[20:60, 10:50] = True
    assert (out[~mask] == GREY).all()


def test_fractional_box_uses_pixel_centres():
    # columns c with centre c + 0.5 in [10.4, 20.6): c = 10..20; rows r with r + 0.5 in [5.5, 9.4): r = 5..8
    assert box_region((10.4, 5.5, 20.6, 9.4), H, W) == (5, 9, 10, 21)
    # thinner than a pixel: the pixel holding the centre
    assert box_region((30.1, 40.2, 30.3, 40.4), H, W) == (40, 41, 30, 31)


@pytest.mark.parametrize(
    "box", [None, (float("nan"), 0, 10, 10), (10, 10, 10, 20), (20, 10, 10, 20), (200, 200, 300, 300), "bad", (1, 2)]
)
def test_invalid_or_outside_boxes_draw_nothing(box):
    img = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = draw_box(img, box)
    assert np.array_equal(out, img) and out is not img


def test_box_is_clipped_to_the_image():
    out = draw_box(grey(), (-20, -20, 30, 40), OverlayStyle(outline_width=0))
    assert box_region((-20, -20, 30, 40), H, W) == (0, 40, 0, 30)
    assert (out[:40, :30, 0] == 154).all()
    assert (out[40:, :] == GREY).all() and (out[:, 30:] == GREY).all()


def test_custom_style():
    img = grey()
    # alpha 0: the fill changes nothing, only the (green, 3 px) outline shows
    out = draw_box(img, (10, 10, 60, 60), OverlayStyle(color=(0, 255, 0), alpha=0.0, outline_width=3))
    assert (out[13:57, 13:57] == GREY).all()
    assert (out[10:13, 10:60] == [0, 255, 0]).all() and (out[10:60, 57:60] == [0, 255, 0]).all()
    assert (out[9, :] == GREY).all() and (out[:, 60] == GREY).all()
    # alpha 1: the fill is the colour; separate outline colour
    out = draw_box(img, (10, 10, 60, 60), OverlayStyle(color=(0, 0, 255), alpha=1.0, outline_color=(1, 2, 3)))
    assert (out[12:58, 12:58] == [0, 0, 255]).all() and (out[10, 10:60] == [1, 2, 3]).all()


def test_outline_wider_than_box_fills_it():
    out = draw_box(grey(), (10, 10, 13, 12), OverlayStyle(outline_width=5))
    assert (out[10:12, 10:13] == [255, 0, 0]).all()
    assert (out[12, 10:13] == GREY).all() and (out[10:12, 13] == GREY).all()


def test_style_validation_and_coercion():
    with pytest.raises(ValueError):
        OverlayStyle(alpha=1.5)
    with pytest.raises(ValueError):
        OverlayStyle(color=(300, 0, 0))
    with pytest.raises(ValueError):
        OverlayStyle(outline_width=-1)
    assert OverlayStyle.coerce({"alpha": 0.5}).alpha == 0.5
    assert OverlayStyle.coerce(None) == OverlayStyle()
    with pytest.raises(TypeError):
        OverlayStyle.coerce(3)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3)), [1]])
def test_bad_image_raises(bad):
    with pytest.raises(ValueError, match="uint8 RGB"):
        draw_box(bad, (0, 0, 2, 2))


def test_tint_matches_the_lookup_table_for_every_value():
    img = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), -1)[..., 0]  # (256, 3)
    img = np.repeat(img[:, None, :], 3, axis=1).astype(np.uint8)  # (256, 3, 3) all values in every channel
    for style in (OverlayStyle(), OverlayStyle(color=(10, 200, 77), alpha=0.8), OverlayStyle(alpha=1.0)):
        lut = style.lut()
        got = tint(img, style)
        for c in range(3):
            assert np.array_equal(got[..., c], lut[c][img[..., c]])
    # the table is the alpha blend up to one level
    v = np.arange(256)
    assert np.abs(OverlayStyle().lut()[0].astype(float) - (0.65 * v + 0.35 * 255)).max() <= 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 60),
    st.integers(1, 60),
    st.tuples(*[st.floats(-20, 80, allow_nan=False)] * 4),
    st.integers(0, 2**31 - 1),
)
def test_overlay_draw_equals_draw_box(h, w, box, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    style = OverlayStyle(alpha=0.35, outline_width=seed % 4)
    ov = Overlay(img, style)
    assert np.array_equal(ov.draw(box), draw_box(img, box, style))
    assert np.array_equal(ov.image, img)
