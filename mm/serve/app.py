"""The FastAPI application of ``mm serve``: the routes, their batchers, authentication, limits and metrics.

Request flow: the body is read within :class:`~mm.serve.limits.BodyLimit`; images are decoded and preprocessed
in a small thread pool (``decode_workers``), off the event loop; model work is submitted to the batcher of its
kind (image embeddings serve /v1/embed, image search and zero-shot alike), which runs it in the one model
thread; index searches (numpy) run in the decode pool. Every error a client can cause is a 4xx with a
message; a full queue is 503 with Retry-After, a request not done within ``timeout`` 504.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from ..config import ConfigError, from_dict, validate
from ..inference.generate import GenerationConfig
from .batcher import Batcher, QueueFull, Timeout
from .bodies import read_body
from .engine import DEFAULT_PROMPTS, CaptionJob, Engine, GroundJob
from .indexes import ExactUnavailable, ServedIndex, ShardUnavailable
from .limits import (
    BodyLimit,
    BodyTooLarge,
    Limits,
    RequestError,
    check_embedding,
    check_k,
    check_texts,
    decode_image,
)
from .metrics import Metrics
from .schemas import (
    CaptionRequest,
    CaptionResponse,
    EmbedRequest,
    EmbedResponse,
    GroundRequest,
    GroundResponse,
    SearchRequest,
    SearchResponse,
    ZeroShotRequest,
    ZeroShotResponse,
    multipart_doc,
)

log = logging.getLogger("mm.serve")
STATIC = Path(__file__).parent / "static"
MAX_BEAMS = 16
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' "
                                           "'unsafe-inline'; script-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
ENDPOINTS = ("/", "/app.js", "/healthz", "/metrics", "/v1/info", "/v1/embed", "/v1/zeroshot", "/v1/caption",
             "/v1/ground", "/v1/search", "/docs", "/openapi.json")


@dataclass(frozen=True)
class ServeSettings:
    """``mm serve``'s options beyond the model and the indexes (defaults: the command's)."""

    model: str = ""  # the --model spec, as shown by /v1/info
    api_key: str | None = None  # required as `Authorization: Bearer KEY` or `X-API-Key: KEY` when set
    max_batch: int = 32  # items per model call
    max_wait_ms: float = 10.0  # the longest the first item of a batch waits for more
    max_queue: int = 256  # items waiting per kind of model call; more: 503
    timeout: float = 60.0  # seconds a request may take; more: 504
    decode_workers: int = 2  # threads decoding and preprocessing images, and searching indexes
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (none: CORS off)
    limits: Limits = field(default_factory=Limits)


class Service:
    """The state behind the routes: the engine, the indexes, the batchers and the thread pools."""

    def __init__(self, engine: Engine, indexes: dict[str, ServedIndex], settings: ServeSettings, metrics: Metrics):
        self.engine, self.indexes, self.settings, self.metrics = engine, indexes, settings, metrics
        self.limits = settings.limits
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="mm-model")
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="mm-decode")
        self.batchers: dict[str, Batcher] = {}

    def start(self) -> None:
        s = self.settings
        runs: dict[str, Callable] = {"image": self.engine.embed_images, "text": self.engine.embed_texts,
                                     "classifier": self.engine.classifiers}
        if self.engine.can_caption:
            runs["caption"] = self.engine.captions
        if self.engine.can_ground:
            runs["ground"] = self.engine.ground
        for kind, run in runs.items():
            self.batchers[kind] = Batcher(kind, run, self.model_thread, max_batch=s.max_batch,
                                          max_wait=s.max_wait_ms / 1000, max_queue=s.max_queue, metrics=self.metrics,
                                          pending=lambda: self.metrics.api_in_flight)
            self.batchers[kind].start()

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.model_thread.shutdown(wait=True)
        self.pool.shutdown(wait=True)

    async def _model(self, kind: str, payloads: list[Any], deadline: float, key: Any = None) -> list[Any]:
        return await self.batchers[kind].submit(payloads, key, timeout=max(0.0, deadline - time.monotonic()))

    async def _off_loop(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _images(self, blobs: list[bytes], what: str, square: bool = False) -> list[Any]:
        """Decoded and preprocessed images, decoded in the pool (each one's errors name it); ``square``: for the
        decoder (:meth:`Engine.preprocess`)."""
        def one(i: int, data: bytes) -> Any:
            img = decode_image(data, self.limits, f"{what}[{i}]" if len(blobs) > 1 else what)
            return self.engine.preprocess(img, square)
        return await asyncio.gather(*(self._off_loop(one, i, b) for i, b in enumerate(blobs)))

    async def _image_and_size(self, blob: bytes, what: str) -> tuple[Any, tuple[int, int]]:
        """One image decoded and preprocessed in the pool, with its (width, height) as uploaded (upright)."""
        def one() -> tuple[Any, tuple[int, int]]:
            img = decode_image(blob, self.limits, what)
            return self.engine.preprocess(img, square=True), img.size
        return await self._off_loop(one)

    # -- routes ------------------------------------------------------------------------------------------
    async def embed(self, request: Request) -> Response:
        """Embed texts and/or images: L2-normalised vectors, as `encode_text` / `encode_image` give them."""
        deadline = time.monotonic() + self.settings.timeout
        body, files = await read_body(request, EmbedRequest, ("images",), self.limits)
        texts, blobs = check_texts(body.texts, self.limits), files["images"]
        if not texts and not blobs:
            raise RequestError(422, "nothing to embed: give texts and/or images")
        if len(blobs) > self.limits.max_images or len(texts) > self.limits.max_texts:
            raise RequestError(413, f"at most {self.limits.max_images} images and {self.limits.max_texts} texts "
                                    "per request")
        images = await self._images(blobs, "images")
        img_emb, txt_emb = await asyncio.gather(
            self._model("image", images, deadline) if images else _nothing(),
            self._model("text", texts, deadline) if texts else _nothing())
        return JSONResponse({"model": self.settings.model, "dim": self.engine.dim,
                             "images": [e.tolist() for e in img_emb], "texts": [e.tolist() for e in txt_emb]})

    async def zeroshot(self, request: Request) -> Response:
        """Zero-shot classify one image over class names (and prompt templates): labels, most probable first."""
        deadline = time.monotonic() + self.settings.timeout
        body, files = await read_body(request, ZeroShotRequest, ("image",), self.limits)
        classes = body.classes.split(",") if isinstance(body.classes, str) else body.classes
        classes = tuple(check_texts([c.strip() for c in classes], self.limits, "classes"))
        templates = tuple(check_texts(body.templates, self.limits, "templates")) if body.templates else None
        if templates and not all("{}" in t for t in templates):
            raise RequestError(422, "templates: each needs {} where the class name goes")
        per_class = len(templates) if templates else DEFAULT_PROMPTS
        if len(classes) > self.limits.max_classes or len(classes) * per_class > self.limits.max_prompts:
            raise RequestError(413, f"{len(classes)} classes x {per_class} templates: at "
                                    f"most {self.limits.max_classes} classes and {self.limits.max_prompts} prompts")
        if not 1 <= body.k <= self.limits.max_classes:
            raise RequestError(422, f"k: must be between 1 and {self.limits.max_classes}, got {body.k}")
        image = (await self._images(_one(files["image"], "image"), "image"))[0]
        try:
            (W,), (emb,) = await asyncio.gather(self._model("classifier", [(classes, templates)], deadline),
                                                self._model("image", [image], deadline))
        except ValueError as e:  # class names or templates zero_shot_classifier refuses
            raise RequestError(422, str(e)) from None
        top = Engine.top_classes(emb, W, body.k)
        return JSONResponse({"labels": [{"label": classes[i], "index": i, "prob": p} for i, p in top]})

    async def caption(self, request: Request) -> Response:
        """Caption one image (CoCa models), with generation settings as `mm caption` takes them."""
        deadline = time.monotonic() + self.settings.timeout
        if "caption" not in self.batchers:
            raise RequestError(400, f"{self.settings.model} has no captioning decoder: serve a CoCa model")
        body, files = await read_body(request, CaptionRequest, ("image",), self.limits)
        options = body.model_dump(exclude={"image", "seed", "k"})
        k = self.engine.k if body.k is None and self.engine.datastore is not None else (body.k or 0)
        if k < 0 or (k and self.engine.datastore is None):
            raise RequestError(422, f"k: {k} retrieved captions need a server started with a datastore (k >= 0)"
                               if k > 0 else f"k: must be >= 0, got {k}")
        room = self.engine.model.config.text.context_length - 1
        if options["num_beams"] > MAX_BEAMS or (options["max_new_tokens"] or 0) > room:
            raise RequestError(422, f"num_beams must be <= {MAX_BEAMS} and max_new_tokens <= {room}")
        try:
            config = validate(from_dict(GenerationConfig, options))
        except ConfigError as e:
            raise RequestError(422, str(e)) from None
        blob = _one(files["image"], "image")[0]

        def read() -> tuple[Any, Any]:
            img = decode_image(blob, self.limits, "image")
            return self.engine.preprocess(img, square=True), self.engine.preprocess_retrieval(img) if k else None
        image, retrieval_image = await self._off_loop(read)
        job = CaptionJob(image, config, body.seed if config.method == "sample" else None, k, retrieval_image)
        try:
            ((text, found),) = await self._model("caption", [job], deadline, key=job.key())
        except ValueError as e:  # the prompt and max_new_tokens do not fit the context together
            raise RequestError(422, str(e)) from None
        return JSONResponse({"caption": text, **({"retrieved": found} if k else {})})

    async def ground(self, request: Request) -> Response:
        """Find the box each text names in one image (LocCa models: a decoder with box tokens), as `mm ground` does:
        boxes in pixels of the image, with their scores."""
        deadline = time.monotonic() + self.settings.timeout
        if "ground" not in self.batchers:
            raise RequestError(400, f"{self.settings.model} cannot ground text: {self.engine.no_ground}")
        body, files = await read_body(request, GroundRequest, ("image",), self.limits)
        texts = check_texts([body.text] if isinstance(body.text, str) else body.text, self.limits, "text")
        if not texts:
            raise RequestError(422, "text: give at least one expression")
        if len(texts) > self.limits.max_texts:
            raise RequestError(413, f"{len(texts)} texts: at most {self.limits.max_texts} per request")
        image, size = await self._image_and_size(_one(files["image"], "image")[0], "image")
        boxes = await self._model("ground", [GroundJob(image, t, size) for t in texts], deadline)
        return JSONResponse({"boxes": boxes})

    async def search(self, request: Request) -> Response:
        """Search loaded indexes with a text or an image: ids and scores (and the image URL when the index
        knows its images), as `mm search` ranks them."""
        deadline = time.monotonic() + self.settings.timeout
        body, files = await read_body(request, SearchRequest, ("image",), self.limits)
        if (body.text is not None) + bool(files["image"]) + (body.embedding is not None) != 1:
            raise RequestError(422, "give one query: text, image, or embedding")
        if body.index is not None and body.index not in self.indexes:
            raise RequestError(404, f"no index named {body.index!r} (loaded: {', '.join(self.indexes) or 'none'})")
        if not self.indexes:
            raise RequestError(404, "no index is loaded (the server was started without one)")
        k = check_k(body.k, self.limits)
        if body.embedding is not None:
            emb = check_embedding(body.embedding, self.engine.dim)
        elif body.text is not None:
            (emb,) = await self._model("text", check_texts([body.text], self.limits, "text"), deadline)
        else:
            (emb,) = await self._model("image", await self._images(_one(files["image"], "image"), "image"), deadline)
        names = [body.index] if body.index else list(self.indexes)
        try:
            found = await asyncio.gather(*(self._off_loop(self.indexes[n].search, emb[None], k, body.exact)
                                           for n in names))
        except ShardUnavailable as e:
            raise RequestError(502, f"a shard of the index did not answer: {e}") from None
        except ExactUnavailable as e:
            raise RequestError(422, f"exact: {e}") from None
        query = body.text if body.text is not None else "image" if files["image"] else "embedding"
        return JSONResponse({"query": query, "k": k, "results": {n: hits[0] for n, hits in zip(names, found)}})

    async def index_image(self, name: str, id: str) -> Response:
        """The image an index made a result from (a search hit's `image` URL)."""
        index = self.indexes.get(name)
        found = await self._off_loop(index.image, id, self.limits.max_pixels) if index else None
        if found is None:
            raise RequestError(404, f"no image for id {id!r} in index {name!r}")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=3600",
                                                                "X-Content-Type-Options": "nosniff"})

    async def info(self) -> dict[str, Any]:
        """What is served: the model, its embedding width, whether it captions, the indexes, the limits."""
        return {"model": self.settings.model, "dim": self.engine.dim, "caption": self.engine.can_caption,
                "ground": self.engine.can_ground,
                "indexes": {n: i.describe() for n, i in self.indexes.items()}, "limits": self.limits.as_dict(),
                "max_batch": self.settings.max_batch}

    async def metrics_page(self) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _nothing() -> list[Any]:
    return []


def _one(blobs: list[bytes], what: str) -> list[bytes]:
    if not blobs:
        raise RequestError(422, f"{what}: required (a file part, or base64 in JSON)")
    return blobs[:1]


def _key_check(api_key: str | None) -> Callable:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY, or X-API-Key: KEY)",
                               {"WWW-Authenticate": "Bearer"})
    return check


class RequestMetrics:
    """ASGI middleware: count and time every answered request by endpoint (known routes, else "other")."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/indexes/image" if path.startswith("/v1/indexes/") else "other"
        status, t0, api = 500, time.perf_counter(), path.startswith("/v1/")
        self.metrics.in_flight += 1
        self.metrics.api_in_flight += api

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.api_in_flight -= api
            self.metrics.request(endpoint, status, time.perf_counter() - t0)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _handler(status: int, message: Callable[[Exception], str], headers: dict[str, str] | None = None) -> Callable:
    async def handle(request: Request, e: Exception) -> JSONResponse:
        return _error(status, message(e), headers)
    return handle


def _add_error_handlers(app: FastAPI, settings: ServeSettings) -> None:
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    async def http(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), e.headers)

    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("error answering %s %s", request.method, request.url.path, exc_info=e)
        return _error(500, f"internal error: {type(e).__name__}")

    retry = str(max(1, round(settings.max_wait_ms / 1000 + 1)))
    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(BodyTooLarge, _handler(413, str))
    app.add_exception_handler(QueueFull, _handler(503, lambda e: f"busy: {e}; retry later", {"Retry-After": retry}))
    app.add_exception_handler(Timeout, _handler(504, lambda e: f"timed out: {e}"))
    app.add_exception_handler(Exception, internal)


def create_app(engine: Engine, indexes: dict[str, ServedIndex], settings: ServeSettings) -> FastAPI:
    """The app serving ``engine``'s model and ``indexes``; batchers start and stop with the app's lifespan."""
    metrics = Metrics()
    service = Service(engine, indexes, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await service.stop()  # uvicorn calls this after in-flight requests are answered

    app = FastAPI(title="mm serve", version="1", lifespan=lifespan,
                  description="Embeddings, zero-shot classification, captions, referring boxes and search with one "
                              "mm model.")
    app.state.service = service
    auth = [Depends(_key_check(settings.api_key))]
    routes = [("/v1/embed", service.embed, EmbedResponse, EmbedRequest, {"images": True}),
              ("/v1/zeroshot", service.zeroshot, ZeroShotResponse, ZeroShotRequest, {"image": False}),
              ("/v1/caption", service.caption, CaptionResponse, CaptionRequest, {"image": False}),
              ("/v1/ground", service.ground, GroundResponse, GroundRequest, {"image": False}),
              ("/v1/search", service.search, SearchResponse, SearchRequest, {"image": False})]
    for path, fn, response, request, files in routes:
        app.add_api_route(path, fn, methods=["POST"], response_model=response, dependencies=auth,
                          openapi_extra=multipart_doc(request, files))
    app.add_api_route("/v1/indexes/{name}/image", service.index_image, methods=["GET"], dependencies=auth,
                      response_class=Response)
    app.add_api_route("/v1/info", service.info, methods=["GET"], dependencies=auth)
    app.add_api_route("/metrics", service.metrics_page, methods=["GET"], dependencies=auth,
                      response_class=PlainTextResponse)
    app.add_api_route("/healthz", _healthz, methods=["GET"])
    page, script = (STATIC / "index.html").read_bytes(), (STATIC / "app.js").read_bytes()

    async def index() -> Response:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    async def app_js() -> Response:
        return Response(script, media_type="text/javascript", headers=PAGE_HEADERS)
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/app.js", app_js, methods=["GET"], include_in_schema=False)
    _add_error_handlers(app, settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts refusals of the body limit too
    return app


async def _healthz() -> dict[str, str]:
    """Liveness: answers while the server runs (no key needed)."""
    return {"status": "ok"}

