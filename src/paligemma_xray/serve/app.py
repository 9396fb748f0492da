"""The HTTP service: FastAPI app around one detector and one batching queue.

Endpoints (OpenAPI schema at ``/openapi.json``, browsable at ``/docs``):

- ``POST /v1/detect`` — multipart upload (``file``: JPEG/PNG/… or DICOM; optional
  ``prompt``, ``threshold``, ``preview``, as form fields or query parameters) → boxes in
  pixels, labels, scores, image size, model id and timing. ``?format=dicom-sr`` (DICOM
  uploads): the DICOM SR instead (``application/dicom``, see :mod:`.dicom`). Any other
  query parameter, or a field given both ways with different values: 422.
- ``GET /v1/model`` — model id, limits and batching counters.
- ``GET /healthz`` — liveness and the same counters (never needs the API key).
- ``GET /`` — the browser page (one self-contained HTML file).

User mistakes get a 4xx with ``{"error": code, "detail": message}``; a 500 means a bug.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from paligemma_xray import __version__
from paligemma_xray.draw import fit, jpeg_data_uri, mask_png_data_uri
from paligemma_xray.errors import ConfigError, ImageLoadError
from paligemma_xray.locations import DEFAULT_PROMPT, Detections
from paligemma_xray.serve.batching import BatchingQueue, QueueClosedError, QueueFullError
from paligemma_xray.serve.dicom import check_sr_input, parse_format, sr_response
from paligemma_xray.serve.errors import ApiError
from paligemma_xray.serve.settings import ServeConfig
from paligemma_xray.serve.uploads import read_form, sniff_kind

if TYPE_CHECKING:  # the service runs any DetectorLike; torch loads only with a real model
    from paligemma_xray.infer.detector import DetectorLike

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 256
PREVIEW_MAX_SIDE = 1024


# -- response schemas (they are the OpenAPI documentation) -----------------------------------


class Box(BaseModel):
    box: tuple[float, float, float, float] = Field(
        description="x1, y1, x2, y2 in pixels of the uploaded image"
    )
    label: str = Field(description="the label the model wrote")
    class_id: int = Field(description="index in the prompt's class list; -1 when not in it")
    score: float | None = Field(description="confidence in (0, 1] from the decoder's token probabilities")
    probability: float | None = Field(
        None, description="calibrated P(true positive) for the score (None: the model has no calibration)"
    )
    mask: dict[str, Any] | None = Field(
        None,
        description="the object's mask (a segment prompt's <seg> codes, decoded with the server's\n"
        "--seg-vae) as COCO RLE over the whole image: {size: [height, width], counts}",
    )
    mask_png: str | None = Field(
        None, description="the same mask as a data:image/png URL the size of the image (for the page)"
    )


class ImageInfo(BaseModel):
    width: int
    height: int
    filename: str | None
    kind: str = Field(description="jpeg, png, dicom, …")


class Timing(BaseModel):
    read_ms: float = Field(description="receiving and parsing the upload")
    decode_ms: float = Field(description="decoding the image")
    queue_ms: float = Field(description="waiting for a batch and the model")
    model_ms: float = Field(description="the model call (shared by the whole batch)")
    total_ms: float
    batch_size: int = Field(description="images in the model call this request was part of")


class DetectResponse(BaseModel):
    model_id: str
    prompt: str
    threshold: float | None
    image: ImageInfo
    detections: list[Box]
    count: int
    image_probability: float | None = Field(
        None, description="calibrated P(the image shows a fracture) (None: the model has no calibration)"
    )
    operating_threshold: float | None = Field(
        None, description="score threshold of the operating point saved with the model (the page's default)"
    )
    parse_issues: dict[str, int]
    timing: Timing
    preview: str | None = Field(None, description="data: URL of the decoded image (when preview=true)")


class ErrorResponse(BaseModel):
    error: str
    detail: str


# The body is read by hand (see uploads.py), so the form is described here for the schema.
_DETECT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG, GIF, BMP, TIFF, WebP or DICOM (with pixel data)",
                        },
                        "prompt": {
                            "type": "string",
                            "default": DEFAULT_PROMPT,
                            "maxLength": MAX_PROMPT_CHARS,
                        },
                        "threshold": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": "drop detections scoring below this (default: keep all)",
                        },
                        "preview": {
                            "type": "boolean",
                            "default": False,
                            "description": "return the decoded image as a data: URL (for DICOM in a browser)",
                        },
                    },
                }
            }
        },
    }
}

# The form's fields may also come as query parameters (``?threshold=0.9``), as may the
# output ``format``; any other query parameter is refused (422), never silently ignored.
_FIELD_PARAMETERS = ("prompt", "threshold", "preview")
DETECT_QUERY = ("format", *_FIELD_PARAMETERS)
_DETECT_BODY["parameters"] = [
    {
        "name": "format",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["json", "dicom-sr"], "default": "json"},
        "description": "json (default) or dicom-sr: a DICOM SR of the detections (DICOM uploads only)",
    },
    *(
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": _DETECT_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"][
                name
            ],
            "description": f"the form field {name!r}, given in the query instead; both with different "
            "values: 422. Any other query parameter: 422",
        }
        for name in _FIELD_PARAMETERS
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed form",
        408: "the upload took longer than the server's upload timeout",
        401: "missing or wrong API key",
        413: "upload too large",
        415: "not an image or DICOM file, or not multipart",
        422: "undecodable image, DICOM without pixels, or a bad field",
        503: "queue full (see Retry-After) or shutting down",
    }.items()
}


# -- helpers ------------------------------------------------------------------------------


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": error.code, "detail": error.message}, status_code=error.status, headers=error.headers
    )


def _provided_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check_key(request: Request, expected: str | None) -> None:
    if not expected:
        return
    given = _provided_key(request)
    # Constant-time comparison; the key itself never appears in a message or a log.
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "this server needs an API key: send it as X-API-Key or Authorization: Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _check_query(request: Request) -> None:
    """Refuse query parameters ``/v1/detect`` does not know (422), rather than ignore them."""
    unknown = sorted(set(request.query_params) - set(DETECT_QUERY))
    if unknown:
        raise ApiError(
            422,
            "bad_field",
            f"unknown query parameter {unknown[0][:40]!r}; /v1/detect takes {', '.join(DETECT_QUERY)}",
        )


def _field(request: Request, fields: dict[str, str], name: str) -> str | None:
    """A form field, or the query parameter of the same name; given both ways, they must agree."""
    in_query, in_form = request.query_params.get(name), fields.get(name)
    if in_query is not None and in_form is not None and in_query.strip() != in_form.strip():
        raise ApiError(
            422,
            "bad_field",
            f"{name} given twice with different values: {in_query[:40]!r} in the query, "
            f"{in_form[:40]!r} in the form",
        )
    return in_form if in_form is not None else in_query


def _parse_threshold(raw: str | None) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError as error:
        raise ApiError(
            422, "bad_field", f"threshold must be a number between 0 and 1, got {raw[:40]!r}"
        ) from error
    if not 0.0 <= value <= 1.0:
        raise ApiError(422, "bad_field", f"threshold must be between 0 and 1, got {value}")
    return value


def _parse_prompt(raw: str | None) -> str:
    prompt = (raw or "").strip() or DEFAULT_PROMPT
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(422, "bad_field", f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    if any(ch in prompt for ch in "\n\r\x00"):
        # A newline ends the prefix in PaliGemma's prompt format; let nobody inject a suffix.
        raise ApiError(422, "bad_field", "prompt must be one line of text")
    return prompt


def _parse_bool(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


def _decode(data: bytes, name: str | None) -> Image.Image:
    """Bytes to an RGB image through the project's loader; user errors become ApiError."""
    from paligemma_xray.data import load_image  # the data layer; imported here to keep startup light

    try:
        return load_image(data, name=name)
    except ImageLoadError as error:  # also covers decompression bombs and DICOM without pixels
        raise ApiError(
            422, "undecodable", f"the file could not be read as an image: {error.message}"
        ) from error


def _preview(image: Image.Image) -> str:
    return jpeg_data_uri(fit(image, PREVIEW_MAX_SIDE)[0], quality=90)


def _boxes(detections: Detections, threshold: float | None, calibration: Any = None) -> list[Box]:
    boxes: list[Box] = []
    scores = detections.score
    described = calibration.describe(detections) if calibration is not None else None
    for i in range(len(detections)):
        score = None if scores is None else float(scores[i])
        if threshold is not None and score is not None and score < threshold:
            continue
        x1, y1, x2, y2 = (round(float(v), 2) for v in detections.xyxy[i])
        mask = None if detections.masks is None else detections.masks[i]
        boxes.append(
            Box(
                box=(x1, y1, x2, y2),
                label=detections.class_name[i],
                class_id=int(detections.class_id[i]),
                score=None if score is None else round(score, 5),
                probability=None if described is None else described["box_probability"][i],
                mask=mask,
                mask_png=None if mask is None else mask_png_data_uri(mask),
            )
        )
    return boxes


def _page_html() -> str:
    """The browser page, its prompt field filled with :data:`DEFAULT_PROMPT`."""
    page = resources.files("paligemma_xray.serve").joinpath("page.html").read_text(encoding="utf-8")
    return page.replace("{{DEFAULT_PROMPT}}", html.escape(DEFAULT_PROMPT, quote=True))


# The page is self-contained; the policy makes the browser refuse anything from elsewhere.
_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


# -- the app ------------------------------------------------------------------------------


def create_app(detector: DetectorLike, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``detector``; the batching queue lives with the app's lifespan."""
    config = config or ServeConfig()
    model_id = str(detector.model_id)
    max_new_tokens = config.max_new_tokens
    calibration = detector.calibration  # saved with the model, if any
    operating = None if calibration is None else calibration.threshold

    def run_batch(images: list[Image.Image], prompt: str) -> list[Detections]:
        kwargs: dict[str, Any] = {"batch_size": len(images)}
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        return detector.detect(images, prompt=prompt, **kwargs)

    queue: BatchingQueue[Detections] = BatchingQueue(
        run_batch, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000.0, capacity=config.queue
    )
    page = _page_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        log.info("serving %s with %r", model_id, config)
        try:
            yield
        finally:
            await queue.stop()

    # FastAPIOffline: /docs and /redoc load Swagger UI / ReDoc from files in that package,
    # not from a CDN, so the API documentation works on a network without internet access.
    app = FastAPIOffline(
        title="paligemma-xray",
        version=__version__,
        description="Bone-fracture detection on X-ray images with a fine-tuned PaliGemma model.",
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.config = config
    app.state.detector = detector

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(
            {"error": code, "detail": str(error.detail)},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "bad_request", "detail": str(error.errors())[:500]}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        # Not a user mistake: keep the traceback in the server log, not in the response.
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal", "detail": "internal server error; see the server log"}, 500)

    def stats() -> dict[str, Any]:
        return queue.snapshot()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Liveness and batching counters")
    async def healthz() -> JSONResponse:
        ok = queue.running
        # Unauthenticated: the model's name, never its path on the server's disk.
        body = {
            "status": "ok" if ok else "unavailable",
            "model_id": public_model_id(model_id),
            "batching": stats(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/model", summary="The model, the limits and the batching counters", responses=_ERRORS)
    async def model_info(request: Request) -> dict[str, Any]:
        _check_key(request, config.api_key)
        return {
            "model_id": model_id,
            "dtype": detector.dtype,
            "version": __version__,
            "default_prompt": DEFAULT_PROMPT,
            "max_new_tokens": max_new_tokens,
            "limits": {
                "max_upload_bytes": config.max_upload_bytes,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "queue": config.queue,
            },
            "auth": bool(config.api_key),
            "threshold": operating,
            "operating_point": None if calibration is None else calibration.operating_point,
            "calibrated": calibration is not None,
            "batching": stats(),
        }

    @app.post(
        "/v1/detect",
        summary="Detect fractures on one uploaded X-ray (image or DICOM)",
        response_model=DetectResponse,
        responses=_ERRORS,
        openapi_extra=_DETECT_BODY,
    )
    async def detect(request: Request) -> Any:
        started = time.perf_counter()
        _check_key(request, config.api_key)
        _check_query(request)
        output = parse_format(request.query_params.get("format"))
        try:
            # Bounded: a slow or stalled upload must not hold a connection and its memory forever.
            form = await asyncio.wait_for(
                read_form(request, config.max_upload_bytes), config.upload_timeout_s
            )
        except asyncio.TimeoutError as error:  # not the builtin on Python 3.10
            raise ApiError(
                408, "upload_timeout", f"the upload did not arrive within {config.upload_timeout_s:g} s"
            ) from error
        prompt = _parse_prompt(_field(request, form.fields, "prompt"))
        threshold = _parse_threshold(_field(request, form.fields, "threshold"))
        want_preview = _parse_bool(_field(request, form.fields, "preview"))
        upload = form.file
        if upload is None:
            raise ApiError(422, "missing_file", "the form needs a file part named 'file'")
        if not upload.data:
            raise ApiError(422, "empty_file", "the uploaded file is empty")
        kind = sniff_kind(upload.data, upload.filename, upload.content_type)
        if kind is None:
            raise ApiError(
                415,
                "not_an_image",
                "the file is not an image or a DICOM file "
                "(expected JPEG, PNG, GIF, BMP, TIFF, WebP or DICOM)",
            )
        check_sr_input(output, kind)
        read_done = time.perf_counter()
        image = await run_in_threadpool(_decode, upload.data, upload.filename)
        decode_done = time.perf_counter()
        try:
            detections, info = await queue.submit(image, prompt)
        except QueueFullError as error:
            raise ApiError(
                503, "busy", str(error), headers={"Retry-After": str(error.retry_after_s)}
            ) from error
        except QueueClosedError as error:
            raise ApiError(503, "unavailable", str(error), headers={"Retry-After": "5"}) from error
        except ConfigError as error:  # a <seg> answer and no --seg-vae on the server
            raise ApiError(422, "no_mask_decoder", str(error)) from error
        if output == "dicom-sr":
            return await run_in_threadpool(
                sr_response, detector, upload.data, upload.filename, kind, detections, prompt, threshold
            )
        preview = await run_in_threadpool(_preview, image) if want_preview else None
        boxes = _boxes(detections, threshold, calibration)
        finished = time.perf_counter()
        return DetectResponse(
            model_id=model_id,
            prompt=prompt,
            threshold=threshold,
            image=ImageInfo(width=image.width, height=image.height, filename=upload.filename, kind=kind),
            detections=boxes,
            count=len(boxes),
            image_probability=None if calibration is None else calibration.image_probability(detections),
            operating_threshold=operating,
            parse_issues={k: int(v) for k, v in detections.parse_issues.items()},
            timing=Timing(
                read_ms=round((read_done - started) * 1000, 3),
                decode_ms=round((decode_done - read_done) * 1000, 3),
                queue_ms=round(info.queue_s * 1000, 3),
                model_ms=round(info.model_s * 1000, 3),
                total_ms=round((finished - started) * 1000, 3),
                batch_size=info.batch_size,
            ),
            preview=preview,
        )

    return app


def public_model_id(model_id: str) -> str:
    """What anyone may see of the model: its last path component (``/srv/models/r1`` → ``r1``)."""
    name = model_id.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return name or model_id
