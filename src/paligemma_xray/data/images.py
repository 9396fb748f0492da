"""One image loader for everyone: files or bytes in, an 8-bit RGB ``PIL.Image`` out.

Handles what radiographs arrive as: JPEG, PNG (8- and 16-bit), grayscale, RGBA/LA/P with
transparency (composited on black, the background of a radiograph), CMYK, EXIF
orientation, and DICOM through pydicom. Every failure is an
:class:`~paligemma_xray.errors.ImageLoadError` naming the file.

DICOM pixels go through the display pipeline of the standard (PS3.4 N.2): stored values →
modality LUT (rescale slope/intercept or a LUT) → VOI LUT, or else the window
center/width (LINEAR, LINEAR_EXACT or SIGMOID), or else the full range of the values →
inverted for MONOCHROME1 (where low values are white) → 8 bits. Multi-frame objects give
their first frame; enhanced objects read rescale and window from the functional groups.

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("L", (4, 3), 200).save(buf, format="PNG")
    >>> image = load_image(buf.getvalue(), name="tiny.png")
    >>> image.mode, image.size, image.getpixel((0, 0))
    ('RGB', (4, 3), (200, 200, 200))
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from paligemma_xray.errors import ImageLoadError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO


def is_dicom(data: bytes, name: str | Path | None = None) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble) or a ``.dcm`` name."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return name is not None and Path(str(name)).suffix.lower() in DICOM_SUFFIXES


def _read(source: ImageSource, name: str | Path | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), str(name) if name is not None else "<bytes>"
    if isinstance(source, (str, Path)):
        path = Path(source)
        label = str(name) if name is not None else str(path)
        try:
            return path.read_bytes(), label
        except FileNotFoundError:
            raise ImageLoadError("image file not found", path=label) from None
        except IsADirectoryError:
            raise ImageLoadError("is a folder, not an image file", path=label) from None
        except OSError as error:
            raise ImageLoadError(f"cannot read image file: {error.strerror or error}", path=label) from None
    if hasattr(source, "read"):
        label = str(name) if name is not None else str(getattr(source, "name", "<stream>"))
        try:
            return bytes(source.read()), label
        except OSError as error:
            raise ImageLoadError(f"cannot read image stream: {error}", path=label) from None
    raise TypeError(f"load_image takes a path, bytes or a binary file, not {type(source).__name__}")


def load_image(path_or_bytes: ImageSource, *, name: str | Path | None = None) -> Image.Image:
    """Decode an image or DICOM file to an 8-bit RGB ``PIL.Image``.

    Args:
        path_or_bytes: a path, the file's bytes, or a binary file object.
        name: what error messages call the input (defaults to the path, or ``<bytes>``).

    Raises:
        ImageLoadError: missing, unreadable, truncated or unsupported file, a DICOM
            without pixel data, or an image larger than ``PIL.Image.MAX_IMAGE_PIXELS``
            (a decompression bomb).
    """
    data, label = _read(path_or_bytes, name)
    if not data:
        raise ImageLoadError("empty file", path=label)
    if is_dicom(data, label):
        return _load_dicom(data, label)
    try:
        return _load_pil(data, label)
    except ImageLoadError as error:
        # DICOM written without the Part 10 preamble (older exports): try it as a last resort.
        image = _try_raw_dicom(data, label)
        if image is None:
            raise error from None
        return image


# --------------------------------------------------------------------------------------------
# Ordinary image formats


def _load_pil(data: bytes, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; treat that as an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(
            f"image too large, refused as a possible decompression bomb ({error})", path=label
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError("not a readable image (unknown or unsupported format)", path=label) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"cannot decode image: {error}", path=label) from None
    return _to_rgb(_upright(image), label)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return image


def _stretch(array: np.ndarray) -> np.ndarray:
    """Map the value range of a high-bit-depth array onto 0..255."""
    values = array.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(array.shape, np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        # A flat image: keep its level relative to the type's range instead of inventing contrast.
        top = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else max(hi, 1.0)
        return np.full(array.shape, np.uint8(np.clip(round(hi / top * 255), 0, 255)))
    scaled = (np.nan_to_num(values, nan=lo) - lo) / (hi - lo)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and 32-bit grayscale: radiographs often use only 10-12 of the bits, so map
        # the range actually used (a full-range 16-bit image maps exactly as value / 257).
        array = np.asarray(image)
        if mode == "I" and array.size and array.min() >= 0 and array.max() <= 255:
            return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
        return Image.fromarray(_stretch(array), mode="L").convert("RGB")
    if mode == "P" or mode == "PA":
        image = (
            image.convert("RGBA") if ("transparency" in image.info or mode == "PA") else image.convert("RGB")
        )
        mode = image.mode
    if mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode in ("1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"unsupported image mode {mode!r}: {error}", path=label) from None


# --------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(data: bytes):
    """The parsed DICOM data set, or the reason it could not be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), force=True), None
    except (
        InvalidDicomError,
        OSError,
        ValueError,
        EOFError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as error:
        return None, error


def _try_raw_dicom(data: bytes, label: str) -> Image.Image | None:
    ds, _ = _read_dicom(data)
    if ds is None:
        return None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return None
    if "Rows" not in ds or "Columns" not in ds:
        return None
    return _dicom_to_image(ds, label)


def _other_format(data: bytes) -> str | None:
    """The image format (``PNG``, ``JPEG``, …) PIL recognises in ``data``, if any."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _load_dicom(data: bytes, label: str) -> Image.Image:
    if data[128:132] != b"DICM" and (other := _other_format(data)) is not None:
        # A .dcm name on another image (a PNG renamed .dcm): pydicom would parse noise.
        raise ImageLoadError(
            f"not a DICOM file: the content is a {other} image (named like DICOM); "
            f"give it its own extension (.{other.lower().replace('jpeg', 'jpg')})",
            path=label,
        )
    ds, error = _read_dicom(data)
    if ds is None:
        raise ImageLoadError(f"not a readable DICOM file: {error}", path=label)
    return _dicom_to_image(ds, label)


def _functional_attr(ds: Any, sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced multi-frame object: first frame's group, else shared group."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        item = seq[0].get(sequence)
        if item and keyword in item[0]:
            return item[0].get(keyword)
    return None


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DICOM number."""
    if value is None:
        raise ValueError("missing value")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _dicom_to_image(ds: Any, label: str) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageLoadError("DICOM file has no pixel data (a report or structured document?)", path=label)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageLoadError("DICOM file has pixel data but no Rows/Columns", path=label) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and rows * columns > limit:
        raise ImageLoadError(
            f"DICOM image of {columns}x{rows} pixels exceeds the limit of {limit} (decompression bomb guard)",
            path=label,
        )
    try:
        frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        frames = 1  # a malformed count (seen: "1A"); decode as a single frame
    try:
        # Only the first frame of a multi-frame object is decoded.
        array = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as error:
        raise ImageLoadError(f"cannot decode DICOM pixel data: {error}", path=label) from None
    if frames > 1 and array.ndim == 4:
        array = array[0]

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR" and samples == 1:
        try:
            array = apply_color_lut(array, ds)
        except (AttributeError, ValueError, TypeError, KeyError, IndexError) as error:
            raise ImageLoadError(f"invalid palette colour lookup table: {error}", path=label) from None
        if array.dtype != np.uint8:
            # Palette entries are 16-bit intensities: scale the full 16-bit range, not the image's.
            array = np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        samples = 3
    if samples > 1 or array.ndim == 3:
        # Colour DICOM: pydicom already converted YBR to RGB; only the bit depth is left.
        rgb = array if array.dtype == np.uint8 else _stretch(array)
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB")

    view = _display_view(ds)
    try:
        values = apply_modality_lut(array, view).astype(np.float64)
    except (AttributeError, ValueError, TypeError, KeyError, IndexError) as error:
        raise ImageLoadError(f"invalid modality LUT or rescale: {error}", path=label) from None
    try:
        unit = _voi(values, view, apply_voi)
    except (AttributeError, ValueError, TypeError, KeyError, IndexError) as error:
        raise ImageLoadError(f"invalid VOI LUT or window: {error}", path=label) from None
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # low values are white in MONOCHROME1: bright bone stays bright
    gray = np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _display_view(ds: Any) -> Any:
    """``ds`` with rescale and window copied up from enhanced functional groups, where absent."""
    import copy

    wanted = {
        "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
        "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
    }
    found: dict[str, Any] = {}
    for sequence, keywords in wanted.items():
        for keyword in keywords:
            if keyword not in ds:
                value = _functional_attr(ds, sequence, keyword)
                if value is not None:
                    found[keyword] = value
    if not found:
        return ds
    view = copy.copy(ds)  # shallow: the pixel data is shared, not copied
    for keyword, value in found.items():
        setattr(view, keyword, value)
    return view


def _voi(values: np.ndarray, ds: Any, apply_voi: Any) -> np.ndarray:
    """The VOI stage mapped to 0..1: VOI LUT, else window center/width, else the full range."""
    seq = ds.get("VOILUTSequence")
    if seq and "LUTData" in seq[0]:
        # A LUT is indexed by integers; modality output is integral wherever a LUT is used.
        lut_out = apply_voi(np.round(values).astype(np.int64), ds, index=0).astype(np.float64)
        lut = _lut_values(seq[0])
        lo, hi = float(lut.min()), float(lut.max())
        if hi - lo < 1e-12:
            return np.zeros_like(lut_out)
        return np.clip((lut_out - lo) / (hi - lo), 0, 1)
    window = _window(ds)
    if window is not None:
        center, width, function = window
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -500, 500)))
        if function == "LINEAR_EXACT":
            return np.clip((values - center) / width + 0.5, 0, 1)
        if width == 1:
            return (values >= center - 0.5).astype(np.float64)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0, 1)


def _window(ds: Any) -> tuple[float, float, str] | None:
    """The first window (center, width, function), or None where absent or unusable.

    A zero or negative width is a broken header seen in the wild; the full range of the
    values is a better display than refusing the image.
    """
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (ValueError, TypeError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    minimum = 1.0 if function not in ("SIGMOID", "LINEAR_EXACT") else 1e-9
    if not (np.isfinite(center) and np.isfinite(width)) or width < minimum:
        return None
    return center, width, function


def _lut_values(item: Any) -> np.ndarray:
    """The entries of a VOI LUT item, whether stored as numbers (US) or raw words (OW)."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        return np.frombuffer(bytes(data), dtype="<u2" if bits > 8 else "u1").astype(np.float64)
    return np.asarray(
        data if isinstance(data, (list, tuple)) or hasattr(data, "__len__") else [data], dtype=np.float64
    ).ravel()
