"""Reading a request body into one of :mod:`mm.serve.schemas`' models: JSON (images as base64) or multipart form
data (images as file parts, other fields as form fields), validated the same way. Every problem is a
:class:`~mm.serve.limits.RequestError` naming it: 415 for a content type that is neither, 400 for JSON that
does not parse (or nests deeper than any request needs) or an image that does not decode, 422 for fields of the
wrong type or value."""
from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .limits import Limits, RequestError, check_image_type, from_base64

PLURAL = {"text": "texts", "image": "images", "class": "classes", "template": "templates"}
# No request body nests deeper than 2 levels (an object of lists of strings); 32 leaves room and keeps a hostile
# body (thousands of "[") away from the recursive parts of the parser and the validator (RecursionError).
MAX_JSON_DEPTH = 32


def _options(annotation: Any) -> tuple[Any, ...]:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in _options(annotation))


def _form_list(annotation: Any) -> bool:
    """Whether form values of a field are gathered into a list: a list field that does not also take one string
    (``classes`` does: one field of comma-separated names)."""
    return _is_list(annotation) and str not in _options(annotation)


def validation_message(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())


async def read_body(request: Request, model: type[BaseModel], files: tuple[str, ...],
                    limits: Limits) -> tuple[Any, dict[str, list[bytes]]]:
    """(validated ``model``, {file field: [image bytes]}) of a JSON or multipart request. ``files`` are the
    model's fields that hold images: base64 strings in JSON, file parts in a form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        data, images = await _json(request, files)
    elif kind == "multipart/form-data":
        data, images = await _form(request, model, files, limits)
    else:
        raise RequestError(415, f"content type {kind or 'none'!r}: send application/json or multipart/form-data")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise RequestError(422, validation_message(e)) from None
    if kind == "application/json":
        for name in files:
            value = getattr(body, name)
            images[name] = [from_base64(v, f"{name}[{i}]") for i, v in enumerate(value)] \
                if isinstance(value, list) else [from_base64(value, name)] if value is not None else []
    return body, images


async def _json(request: Request, files: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    raw = await request.body()
    if not raw:
        raise RequestError(400, "empty body: send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:  # the C parser's own depth guard (about 1,000 levels on CPython)
        raise RequestError(400, f"body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise RequestError(400, f"body nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(data, dict):
        raise RequestError(422, f"body: expected a JSON object, got {type(data).__name__}")
    return data, {}


def json_depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests (a scalar 0, ``[]`` 1, ``{"a": [1]}`` 2), counted without recursion and only
    up to ``limit + 1``: deeper is reported as ``limit + 1``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            depth += 1
            if depth > limit:
                return depth
            deepest = max(deepest, depth)
            stack.extend((x, depth) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


async def _form(request: Request, model: type[BaseModel], files: tuple[str, ...],
                limits: Limits) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_texts + 32,
                              max_part_size=max(1 << 20, limits.max_text_chars * 4))
    data: dict[str, Any] = {}
    images: dict[str, list[bytes]] = {name: [] for name in files}
    fields = model.model_fields
    try:
        for name in dict.fromkeys(form.keys()):
            values = form.getlist(name)
            field = name if name in fields else PLURAL.get(name, name)  # `text` / `image` parts of lists
            if field in files:
                for v in values:
                    if not isinstance(v, UploadFile):
                        raise RequestError(422, f"{name}: send the image as a file part, not a text field")
                    check_image_type(v.content_type, name)
                    images[field].append(await v.read())
            elif any(isinstance(v, UploadFile) for v in values):
                raise RequestError(422, f"{name}: a file part where a text field was expected")
            elif field in fields and _form_list(fields[field].annotation):
                data.setdefault(field, []).extend(values)  # repeated fields, or one: a list
            else:  # one value; several are a list (valid only where the model takes one)
                data[field] = values[0] if len(values) == 1 else values
    finally:
        await form.close()
    for name in files:
        if len(images[name]) > 1 and not _is_list(fields[name].annotation):
            raise RequestError(422, f"{name}: one image expected, got {len(images[name])}")
    return data, images
