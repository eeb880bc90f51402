"""Image and mask decoding: every storage format gives the documented arrays, every bad file a DataError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.data.classes import ClassTable
from semiseg.data.decode import (
    ColorMask,
    IndexMask,
    ThresholdMask,
    choose_mask_format,
    image_size,
    read_image,
)
from semiseg.errors import DataError

BIN = ClassTable.binary("polyp")
THREE = ClassTable(("a", "b", "c"), ((0, 0, 0), (255, 0, 0), (0, 0, 255)))


def ellipse(h: int = 61, w: int = 83) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (((yy - 30) ** 2 / 400 + (xx - 40) ** 2 / 900) < 1).astype(np.uint8)


def write_png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 48-bit RGB), big-endian samples as the spec says."""
    h, w = a.shape[:2]
    color_type = 2 if a.ndim == 3 else 0
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- images
def test_rgb_png_round_trip(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)
    assert image_size(tmp_path / "x.png") == (7, 9)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    a[..., 3] = 0  # fully transparent: the colours must still be returned as stored
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), a[..., :3])


def test_grayscale_and_one_bit_replicated(tmp_path: Path) -> None:
    g = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    Image.fromarray(g).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (5, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    Image.fromarray(ellipse().astype(bool)).save(tmp_path / "b.png")
    out = read_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out[..., 1], ellipse() * 255)


def test_16bit_grey_and_rgb_scaled_by_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    g = rng.integers(0, 65536, (4, 5)).astype(np.uint16)
    write_png16(tmp_path / "g16.png", g)
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[..., 2], (g >> 8).astype(np.uint8))
    rgb = rng.integers(0, 65536, (4, 5, 3)).astype(np.uint16)
    write_png16(tmp_path / "rgb16.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), (rgb >> 8).astype(np.uint8))


def test_palette_and_cmyk(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (253 * 3))
    im.save(tmp_path / "p.png")
    expect = np.array([[[10, 20, 30], [200, 100, 50]], [[0, 255, 0], [200, 100, 50]]], np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expect)
    cmyk = np.array([[[10, 20, 30, 0]]], np.uint8)  # K = 0: RGB = 255 - CMY
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (1, 1, 3)
    assert np.abs(out.astype(int) - [245, 235, 225]).max() <= 3


def test_truncated_corrupt_and_missing_images(tmp_path: Path) -> None:
    a = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(a).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    for name in ("cut.jpg", "junk.png", "cut.png", "missing.jpg"):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
    with pytest.raises(DataError, match="cannot decode"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match="junk"):
        image_size(tmp_path / "junk.png")


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("quality", [50, 90])
def test_threshold_recovers_jpeg_binary_mask(tmp_path: Path, mode: str, quality: int) -> None:
    m = ellipse()
    path = tmp_path / "m.jpg"
    Image.fromarray(m * 255).convert(mode).save(path, quality=quality)
    raw = np.asarray(Image.open(path))
    assert len(np.unique(raw)) > 2  # the file really carries compression noise
    out = ThresholdMask(BIN)(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, m)


def test_threshold_uses_channel_mean(tmp_path: Path) -> None:
    # means: (200+100+90)/3 = 130 -> 1, (200+50+50)/3 = 100 -> 0, 128 exactly -> 1, 127 -> 0
    a = np.array([[[200, 100, 90], [200, 50, 50], [128, 128, 128], [127, 127, 127]]], np.uint8)
    Image.fromarray(a).save(tmp_path / "m.png")
    np.testing.assert_array_equal(ThresholdMask(BIN)(tmp_path / "m.png"), [[1, 0, 1, 0]])
    np.testing.assert_array_equal(ThresholdMask(BIN, threshold=101)(tmp_path / "m.png"), [[1, 0, 1, 1]])
    with pytest.raises(DataError, match="binary"):
        ThresholdMask(THREE)


def test_index_png_with_void(tmp_path: Path) -> None:
    a = np.array([[0, 1, 2], [255, 2, 0]], np.uint8)
    Image.fromarray(a).save(tmp_path / "m.png")
    np.testing.assert_array_equal(IndexMask(THREE)(tmp_path / "m.png"), a)
    # CamVid style: value 2 is the dataset's void -> 255
    two = ClassTable(("a", "b"))
    np.testing.assert_array_equal(IndexMask(two, void_values=(2, 255))(tmp_path / "m.png"),
                                  [[0, 1, 255], [255, 255, 0]])


def test_palette_png_keeps_indices(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 255]], np.uint8)
    im = Image.fromarray(idx, "P")
    pal = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192]
    im.putpalette(pal)
    im.save(tmp_path / "voc.png")
    assert Image.open(tmp_path / "voc.png").mode == "P"
    np.testing.assert_array_equal(IndexMask(THREE)(tmp_path / "voc.png"), idx)


def test_one_bit_png(tmp_path: Path) -> None:
    m = ellipse()
    Image.fromarray(m.astype(bool)).save(tmp_path / "v.png")
    assert Image.open(tmp_path / "v.png").mode == "1"
    np.testing.assert_array_equal(IndexMask(BIN)(tmp_path / "v.png"), m)
    np.testing.assert_array_equal(ThresholdMask(BIN)(tmp_path / "v.png"), m)


def test_values_outside_table_rejected_naming_file_and_values(tmp_path: Path) -> None:
    a = np.array([[0, 1, 2, 3], [5, 5, 255, 0]], np.uint8)
    Image.fromarray(a).save(tmp_path / "bad mask.png")
    with pytest.raises(DataError, match=r"bad mask\.png.*values 3, 5 outside"):
        IndexMask(THREE)(tmp_path / "bad mask.png")


def test_mapping_unmapped_to_void(tmp_path: Path) -> None:
    a = np.array([[7, 8, 0], [26, 33, 1]], np.uint8)
    Image.fromarray(a).save(tmp_path / "ids.png")
    table = ClassTable(tuple(f"c{i}" for i in range(19)))
    dec = IndexMask(table, void_values=(), mapping={7: 0, 8: 1, 26: 13, 33: 18})
    np.testing.assert_array_equal(dec(tmp_path / "ids.png"), [[0, 1, 255], [13, 18, 255]])


def test_16bit_index_mask(tmp_path: Path) -> None:
    write_png16(tmp_path / "ok.png", np.array([[0, 1], [2, 1]], np.uint16))
    np.testing.assert_array_equal(IndexMask(THREE)(tmp_path / "ok.png"), [[0, 1], [2, 1]])
    write_png16(tmp_path / "big.png", np.array([[0, 300], [2, 1]], np.uint16))
    with pytest.raises(DataError, match="big.png.*300"):
        IndexMask(THREE)(tmp_path / "big.png")


def test_index_mask_rejects_colour_file(tmp_path: Path) -> None:
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DataError, match="colour-coded"):
        IndexMask(THREE)(tmp_path / "c.png")


def test_color_mask_table_void_and_unknown(tmp_path: Path) -> None:
    a = np.zeros((2, 4, 3), np.uint8)
    a[0, 1] = (255, 0, 0)
    a[1, 2] = (0, 0, 255)
    a[1, 3] = (9, 9, 9)
    Image.fromarray(a).save(tmp_path / "c.png")
    dec = ColorMask(THREE, void_colors=[(9, 9, 9)])
    np.testing.assert_array_equal(dec(tmp_path / "c.png"), [[0, 1, 0, 0], [0, 0, 2, 255]])
    a[0, 2:] = (1, 2, 3)
    Image.fromarray(a).save(tmp_path / "u.png")
    with pytest.raises(DataError, match=r"u\.png.*\(1, 2, 3\) in 2 pixels"):
        dec(tmp_path / "u.png")
    with pytest.raises(DataError, match="colours"):
        ColorMask(ClassTable(("a", "b")))


def test_corrupt_mask_names_file(tmp_path: Path) -> None:
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for dec in (ThresholdMask(BIN), IndexMask(BIN), ColorMask(THREE)):
        with pytest.raises(DataError, match=r"m\.png"):
            dec(tmp_path / "m.png")


def test_auto_rule(tmp_path: Path) -> None:
    m = ellipse()
    Image.fromarray(m * 255).convert("RGB").save(tmp_path / "j.jpg")
    Image.fromarray(m.astype(bool)).save(tmp_path / "one.png")
    Image.fromarray(m * 255).save(tmp_path / "bw.png")
    Image.fromarray(np.stack([m * 255] * 3, axis=2)).save(tmp_path / "bw_rgb.png")
    Image.fromarray(m).save(tmp_path / "idx01.png")
    Image.fromarray(m * 3).save(tmp_path / "idx.png")
    Image.fromarray(m, "P").save(tmp_path / "pal.png")
    Image.fromarray(np.stack([m * 255, m * 0, m * 0], axis=2)).save(tmp_path / "col.png")
    expected = {"j.jpg": "threshold", "one.png": "index", "bw.png": "threshold", "bw_rgb.png": "threshold",
                "idx01.png": "index", "idx.png": "index", "pal.png": "index", "col.png": "color"}
    assert {k: choose_mask_format(tmp_path / k) for k in expected} == expected


def test_cache_keys_follow_parameters() -> None:
    assert ThresholdMask(BIN).cache_key == ThresholdMask(BIN, 128).cache_key != ThresholdMask(BIN, 100).cache_key
    assert IndexMask(THREE).cache_key != IndexMask(THREE, void_values=(2,)).cache_key
    assert IndexMask(THREE, mapping={1: 2, 0: 1}).cache_key == IndexMask(THREE, mapping={0: 1, 1: 2}).cache_key
    assert ColorMask(THREE).cache_key != ColorMask(THREE, void_colors=[(9, 9, 9)]).cache_key
