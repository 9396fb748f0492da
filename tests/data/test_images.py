"""load_image: every format a radiograph arrives in, polarity kept, bad files named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dicom_builder import write_dicom as _dicom
from PIL import Image
from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

from paligemma_xray.data import load_image
from paligemma_xray.errors import ImageLoadError


def _phantom(low: int, high: int, shape=(32, 48)) -> np.ndarray:
    """Background at ``low``, a vertical 'bone' band (columns 16..31) at ``high``."""
    arr = np.full(shape, low, dtype=np.uint16)
    arr[:, 16:32] = high
    return arr


def _bone_vs_background(image: Image.Image) -> tuple[float, float]:
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    return gray[:, 16:32].mean(), np.concatenate([gray[:, :16], gray[:, 32:]], axis=1).mean()


def _png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


# --- ordinary formats -------------------------------------------------------------------------


def test_grayscale_png_becomes_rgb_with_same_values():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    image = load_image(_png_bytes(gray))
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.array_equal(np.asarray(image)[..., 0], np.asarray(gray))


def test_16bit_png_keeps_bright_bone_bright_and_uses_the_full_range(tmp_path):
    # 12-bit data in a 16-bit PNG, as DICOM converters write it.
    path = tmp_path / "sixteen.png"
    Image.fromarray(_phantom(400, 3600).astype(np.int32)).convert("I;16").save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = load_image(path)
    bone, background = _bone_vs_background(image)
    assert bone == 255 and background == 0


def test_full_range_16bit_png_maps_like_value_over_257(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)
    got = np.asarray(load_image(path))[..., 0].astype(int)
    assert np.abs(got - np.round(ramp / 257)).max() <= 1


def test_rgba_is_composited_on_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    image = load_image(_png_bytes(Image.fromarray(rgba, mode="RGBA")))
    arr = np.asarray(image)
    assert (arr[:2] == 200).all() and (arr[2:] == 0).all()


def test_cmyk_jpeg_loads_as_rgb():
    cmyk = Image.new("CMYK", (10, 6), (0, 0, 0, 0))  # no ink: white
    image = load_image(_png_bytes(cmyk, format="JPEG"))
    assert image.mode == "RGB" and image.size == (10, 6)
    assert np.asarray(image).mean() > 240


def test_exif_orientation_is_applied():
    base = Image.new("RGB", (40, 20), (0, 0, 0))
    base.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    image = load_image(_png_bytes(base, format="JPEG", exif=exif, quality=95))
    assert image.size == (20, 40)
    arr = np.asarray(image.convert("L"), dtype=float)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # left stripe is now on top


def test_decompression_bomb_is_refused(monkeypatch):
    data = _png_bytes(Image.new("L", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="decompression bomb") as info:
        load_image(data, name="huge.png")
    assert "huge.png" in str(info.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"this is not an image at all" * 10, "not a readable image"),
        (None, "cannot decode"),  # truncated JPEG
    ],
)
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, content, reason):
    if content is None:
        content = _png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)), format="JPEG")[:200]
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file_and_folder_raise_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match="not found") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


# --- DICOM ------------------------------------------------------------------------------------


def test_dicom_monochrome2_bright_bone_stays_bright(tmp_path):
    path = _dicom(tmp_path / "m2.dcm", _phantom(300, 3000))
    bone, background = _bone_vs_background(load_image(path))
    assert bone == 255 and background == 0


def test_dicom_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    # In MONOCHROME1, low stored values are white: the bone is stored LOW.
    path = _dicom(tmp_path / "m1.dcm", _phantom(3000, 300), photometric="MONOCHROME1")
    bone, background = _bone_vs_background(load_image(path))
    assert bone > 200 and background < 50


def test_dicom_detected_by_preamble_without_extension(tmp_path):
    path = _dicom(tmp_path / "image_without_suffix", _phantom(300, 3000))
    assert load_image(path.read_bytes()).size == (48, 32)


def test_dicom_rescale_then_window_center_width(tmp_path):
    # CT-like: stored + intercept -1024. Window 40/400 maps [-160, 240] HU onto black..white.
    stored = np.zeros((4, 4), np.uint16)
    stored[0, :] = 1024 - 160 - 50  # -210 HU: below the window, black
    stored[1, :] = 1024 + 40  # 40 HU: the window center, mid grey
    stored[2, :] = 1024 + 400  # 400 HU: above the window, white
    path = _dicom(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    rows = np.asarray(load_image(path))[..., 0][:, 0]
    assert rows[0] == 0 and rows[2] == 255
    assert abs(int(rows[1]) - 128) <= 1


def test_dicom_rescale_slope_changes_nothing_in_polarity(tmp_path):
    path = _dicom(tmp_path / "slope.dcm", _phantom(100, 1000), RescaleSlope=2.5, RescaleIntercept=-300)
    bone, background = _bone_vs_background(load_image(path))
    assert bone == 255 and background == 0


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value, bits
    # An inverting LUT: a VOI LUT is applied as given, before any photometric inversion.
    item.add_new(0x00283006, "US", [int(v) for v in np.linspace(65535, 0, 4096)])  # LUT Data
    path = _dicom(tmp_path / "voi.dcm", _phantom(300, 3000), VOILUTSequence=Sequence([item]))
    bone, background = _bone_vs_background(load_image(path))
    assert bone < background


def test_dicom_16bit_signed_pixels(tmp_path):
    pixels = _phantom(0, 0).astype(np.int16)
    pixels[:] = -1000
    pixels[:, 16:32] = 20000
    path = _dicom(tmp_path / "signed.dcm", pixels, bits=16)
    bone, background = _bone_vs_background(load_image(path))
    assert bone == 255 and background == 0


def test_dicom_multiframe_gives_the_first_frame(tmp_path):
    frames = np.stack([_phantom(300, 3000), _phantom(3000, 300)])
    path = _dicom(tmp_path / "multi.dcm", frames)
    bone, background = _bone_vs_background(load_image(path))
    assert bone > background


def test_dicom_compressed_rle(tmp_path):
    path = tmp_path / "rle.dcm"
    _dicom(path, _phantom(300, 3000))
    from pydicom import dcmread

    ds = dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path)
    bone, background = _bone_vs_background(load_image(path))
    assert bone == 255 and background == 0


def test_dicom_without_pixel_data_is_an_image_load_error(tmp_path):
    path = _dicom(tmp_path / "report.dcm", None, PatientName="Nobody")
    with pytest.raises(ImageLoadError, match="no pixel data") as info:
        load_image(path)
    assert "report.dcm" in str(info.value)


def test_dicom_bomb_guard(tmp_path, monkeypatch):
    path = _dicom(tmp_path / "big.dcm", _phantom(300, 3000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("name", ["ct", "mr", "rgb_color", "jpeg2k", "palette_color"])
def test_dicom_files_written_elsewhere_load(name):
    """pydicom's bundled example files: real scanners' output, other encoders."""
    ds = getattr(examples, name)
    image = load_image(ds.filename)
    assert image.mode == "RGB" and image.size == (int(ds.Columns), int(ds.Rows))
    assert np.asarray(image).std() > 5  # not blank


def test_a_png_renamed_dcm_is_called_not_dicom(tmp_path):
    path = tmp_path / "knee.dcm"
    path.write_bytes(_png_bytes(Image.new("L", (16, 16), 100)))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)  # used to say "DICOM file has no pixel data"
    assert message.startswith(f"{path}: not a DICOM file: the content is a PNG image") and ".png" in message
