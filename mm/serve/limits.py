"""What ``mm serve`` accepts from a request, and the one way an uploaded image becomes pixels.

Everything a client sends is bounded before it costs memory or model time: the body (``BodyLimit``, an ASGI
middleware: a declared ``Content-Length`` over the limit is refused before a byte is read, a chunked body the
moment it passes it), the pixels of an image (read from its header, before decoding: decompression bombs never
decode), the image formats PIL may open (no plugin that runs an external program, such as EPS), the number of
items, texts' length, ``k``, classes and prompts. Each refusal is a :class:`RequestError` with an HTTP status
and a message saying what was wrong; nothing a client sends can make the server answer 500.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..data.decode import to_rgb

# formats PIL may open for an upload: what browsers and cameras produce; PIL's other readers (EPS runs
# Ghostscript, and many rarely used parsers) are never reached by a request
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_TYPES = ("image/", "application/octet-stream")  # declared content types of an image upload


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx, or 503 when busy) and a message for its sender."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    """Per-request bounds (``mm serve``'s options; the defaults are its defaults)."""

    max_body_bytes: int = 10 * 2**20  # a whole request body
    max_pixels: int = 25_000_000  # width x height of one image, read from its header before decoding
    max_images: int = 16  # images in one /v1/embed request
    max_texts: int = 128  # texts in one /v1/embed request
    max_text_chars: int = 2000  # one text (the tokenizer keeps the model's context length of it anyway)
    max_k: int = 100  # search results per index
    max_classes: int = 1000  # zero-shot class names
    max_prompts: int = 4096  # zero-shot classes x templates (each prompt is one text encoded)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Upload bytes -> upright RGB PIL image; RequestError 400 (empty, undecodable, truncated, not one of
    :data:`IMAGE_FORMATS`) or 413 (more than ``limits.max_pixels`` pixels, refused from the header)."""
    if not data:
        raise RequestError(400, f"{what}: empty upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            w, h = img.size
            if w * h > limits.max_pixels:
                raise RequestError(413, f"{what}: {w}x{h} pixels is more than the limit of {limits.max_pixels}")
            img.load()  # a truncated or corrupt file fails here
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"{what}: {e}") from None
    except Image.UnidentifiedImageError:
        raise RequestError(400, f"{what}: not an image of a known format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise RequestError(400, f"{what}: the image cannot be decoded ({type(e).__name__}: {e})") from None
    try:
        img = ImageOps.exif_transpose(img)  # as mm.data.decode does: photos stand upright
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        pass
    return to_rgb(img)


def check_image_type(content_type: str | None, what: str = "image") -> None:
    """A multipart file part's declared type must be an image (or unspecified / octet-stream)."""
    if content_type and not content_type.lower().startswith(IMAGE_TYPES):
        raise RequestError(415, f"{what}: content type {content_type!r} is not an image")


def from_base64(text: Any, what: str = "image") -> bytes:
    """A JSON image: base64, optionally as a data URL (``data:image/png;base64,...``)."""
    if not isinstance(text, str) or not text:
        raise RequestError(422, f"{what}: expected a base64 string")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64") or not head[5:].lower().startswith(IMAGE_TYPES):
            raise RequestError(415, f"{what}: a data URL must be data:image/...;base64,")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{what}: not valid base64 ({e})") from None


def check_texts(texts: list[str], limits: Limits, what: str = "texts") -> list[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise RequestError(422, f"{what}[{i}]: expected a non-empty string")
        if len(t) > limits.max_text_chars:
            raise RequestError(413, f"{what}[{i}]: {len(t)} characters is more than the limit of "
                                    f"{limits.max_text_chars}")
    return texts


def check_embedding(values: list[float], dim: int) -> np.ndarray:
    """A query embedding as a unit float32 row; 422 when its width is not the model's or it is not finite / zero."""
    x = np.asarray(values, np.float32)
    if x.shape != (dim,):
        raise RequestError(422, f"embedding: {len(values)} values, the served model's embeddings have {dim}")
    norm = float(np.linalg.norm(x))
    if not np.isfinite(norm) or norm == 0:
        raise RequestError(422, "embedding: must be finite and not all zero")
    return x / norm


def check_k(k: Any, limits: Limits) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise RequestError(422, f"k: expected an integer, got {k!r}") from None
    if not 1 <= k <= limits.max_k:
        raise RequestError(422, f"k: must be between 1 and {limits.max_k}, got {k}")
    return k


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the limit (turned into a 413 by the app)."""


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` are refused with 413. A declared Content-Length over
    the limit is answered at once; the body of such a request is read and dropped (up to ``drain_bytes``) so
    that the client, still sending, gets the answer rather than a reset connection. A body without a length is
    counted as it streams and refused (``BodyTooLarge``) when it passes the limit."""

    def __init__(self, app: Any, max_bytes: int, drain_bytes: int = 256 * 2**20):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            if declared <= self.drain_bytes:
                more = True
                while more:
                    message = await receive()
                    more = message.get("more_body", False) and message["type"] == "http.request"
            return await _send_json(send, 413, f"request body of {declared} bytes is more than the limit of "
                                               f"{self.max_bytes}")
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(f"request body is more than the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


async def _send_json(send: Any, status: int, message: str) -> None:
    import json

    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
