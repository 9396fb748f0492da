"""Reading uploads into memory, with limits checked while the bytes arrive.

Starlette's ``request.form()`` spools file parts larger than 1 MiB to a temporary file on
disk, and only knows the size once the whole body has arrived. Neither suits a service
that handles patient images: here the body is streamed through python-multipart's
low-level parser straight into memory, and the upload is refused (413) as soon as the
declared ``Content-Length`` or the bytes received pass the limit.

The kind of file is recognised from its first bytes (magic numbers), not from the name
or the declared content type, which browsers guess (``.dcm`` usually arrives as
``application/octet-stream``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from paligemma_xray.serve.errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Room for the multipart envelope and the small text fields on top of the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 4096
MAX_PARTS = 16

# python-multipart logs malformed bodies itself, as bare unprefixed lines ("Expected boundary
# character …"); each such body is answered with a 400 and its reason here, so its own
# warnings are noise in the server log.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass
class UploadedFile:
    """One file part, held in memory."""

    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class UploadForm:
    """The parsed form: the first file part named ``file`` and the text fields."""

    file: UploadedFile | None = None
    fields: dict[str, str] = field(default_factory=dict)


def _size(n: int) -> str:
    """``4096`` → ``4,096 bytes``; ``33554432`` → ``32.0 MiB`` (a small limit never reads 0.0 MiB)."""
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n:,} bytes"


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, "too_large", f"{what} is larger than the limit of {_size(limit)}")


class _FormCollector:
    """python-multipart callbacks that keep parts in memory and enforce the part limits."""

    def __init__(self, max_file_bytes: int):
        self.max_file_bytes = max_file_bytes
        self.form = UploadForm()
        self.parts = 0
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._name: str | None = None
        self._filename: str | None = None
        self._content_type: str | None = None
        self._buffer = bytearray()
        self._is_file = False
        self.ended = False  # the closing boundary was seen

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_end(self) -> None:
        self.ended = True

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(400, "bad_form", f"the form has more than {MAX_PARTS} parts")
        self._headers = {}
        self._buffer = bytearray()

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value).strip(b" \t")
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if name is None:
            raise ApiError(400, "bad_form", "a form part has no name in its Content-Disposition")
        # Header bytes arrive as latin-1 in the parser; browsers send UTF-8 names.
        self._name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._is_file = filename is not None
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        content_type = self._headers.get(b"content-type")
        self._content_type = content_type.decode("latin-1") if content_type else None
        encoding = self._headers.get(b"content-transfer-encoding", b"binary").lower()
        if encoding not in (b"binary", b"8bit", b"7bit"):
            raise ApiError(415, "unsupported_encoding", "form parts must be sent as binary, not encoded")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._buffer.extend(data[start:end])
        limit = self.max_file_bytes if self._is_file else MAX_FIELD_BYTES
        if len(self._buffer) > limit:
            what = "the uploaded file" if self._is_file else f"the form field {self._name!r}"
            raise too_large(limit, what)

    def on_part_end(self) -> None:
        if self._is_file:
            if self.form.file is not None:  # answering for one of two images would mislead
                raise ApiError(400, "bad_form", "the form has more than one file; send one image per request")
            if self._name != "file":
                raise ApiError(422, "missing_file", f"the file part is named {self._name!r}; name it 'file'")
            self.form.file = UploadedFile(self._filename, self._content_type, bytes(self._buffer))
        elif self._name is not None:
            try:
                self.form.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ApiError(400, "bad_form", f"the form field {self._name!r} is not UTF-8 text") from error
        self._buffer = bytearray()


async def read_form(request: Request, max_file_bytes: int) -> UploadForm:
    """Stream a ``multipart/form-data`` body into memory; raise :class:`ApiError` on misuse.

    415 when the body is not multipart, 413 as soon as the declared or received size passes
    ``max_file_bytes`` (plus room for the envelope), 400 when the multipart is malformed.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        shown = content_type.decode("latin-1") or "none"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data with a 'file' part (got Content-Type {shown})",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_form", "the multipart Content-Type has no boundary")
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError as error:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from error
        # Refuse before reading a byte: a client that announces 10 GB gets its answer now.
        if declared_bytes > max_body:
            raise too_large(max_file_bytes, "the upload")

    collector = _FormCollector(max_file_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except FormParserError as error:
        raise ApiError(400, "bad_form", f"malformed multipart header: {error}") from error
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                raise too_large(max_file_bytes, "the upload")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as error:
        raise ApiError(400, "bad_form", f"malformed multipart body: {error}") from error
    except ClientDisconnect as error:
        raise ApiError(400, "client_disconnected", "the client went away during the upload") from error
    if collector.parts == 0:
        raise ApiError(400, "bad_form", "the multipart body has no parts")
    if not collector.ended:
        raise ApiError(400, "bad_form", "the multipart body ended before its closing boundary")
    return collector.form


# -- recognising the file -----------------------------------------------------------------

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
)


def sniff_kind(data: bytes, filename: str | None = None, content_type: str | None = None) -> str | None:
    """The image kind from the first bytes, or None when it is not an image we read.

    DICOM files normally carry a 128-byte preamble and ``DICM``; some writers omit both and
    start with a group-0002/0008 element, which is only trusted when the name or declared
    type says DICOM too (two bytes alone match too much).
    """
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[128:132] == b"DICM":
        return "dicom"
    says_dicom = (filename or "").lower().endswith((".dcm", ".dicom")) or (content_type or "").lower() in (
        "application/dicom",
        "application/dicom+binary",
    )
    if says_dicom and data[:2] in (b"\x02\x00", b"\x08\x00"):
        return "dicom"
    return None
