"""Request and response bodies of ``mm serve``'s API (pydantic): they validate JSON requests and multipart
fields alike, and are what ``/docs`` shows. Images travel as multipart file parts or, in JSON, as base64
(optionally a ``data:image/...;base64,`` URL)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Strict):
    texts: list[str] = Field(default=[], description="texts to embed")
    images: list[str] = Field(default=[], description="base64 images to embed (multipart: file parts `images`)")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    images: list[list[float]] = Field(description="one L2-normalised vector per image, in request order")
    texts: list[list[float]] = Field(description="one L2-normalised vector per text, in request order")


class ZeroShotRequest(_Strict):
    image: str | None = Field(default=None, description="base64 image, required (multipart: file part `image`)")
    classes: list[str] | str = Field(description="class names: a list, or one string of comma-separated names")
    templates: list[str] | None = Field(default=None, description="prompt templates with {} for the class name "
                                                                  "(default: OpenAI's 80 ImageNet prompts)")
    k: int = Field(default=5, description="labels returned (at most the number of classes)")


class Label(BaseModel):
    label: str
    index: int
    prob: float


class ZeroShotResponse(BaseModel):
    labels: list[Label] = Field(description="most probable first")


class CaptionRequest(_Strict):
    image: str | None = Field(default=None, description="base64 image, required (multipart: file part `image`)")
    method: str = Field(default="beam", description="beam | greedy | sample")
    num_beams: int = 4
    max_new_tokens: int | None = Field(default=None, description="default: up to the model's context length")
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = Field(default=0, description="sampling seed (method=sample)")
    k: int | None = Field(default=None, description="retrieved captions the decoder reads first (a server started "
                          "with a datastore; default: the server's k; 0: none)")


class CaptionResponse(BaseModel):
    caption: str
    retrieved: list[str] | None = Field(default=None, description="the captions read first (with a datastore)")


class GroundRequest(_Strict):
    image: str | None = Field(default=None, description="base64 image, required (multipart: file part `image`)")
    text: list[str] | str = Field(description="the referring expression(s) to find in the image: one string, or a "
                                              "list (multipart: the field `text`, once or repeated)")


class GroundedBox(BaseModel):
    text: str
    box: list[float] = Field(description="[x0, y0, x1, y1] in pixels of the image (x1, y1: right and bottom edges)")
    score: float = Field(description="mean log-probability of the four box tokens among the box tokens (0: certain)")


class GroundResponse(BaseModel):
    boxes: list[GroundedBox] = Field(description="one per text, in request order")


class SearchRequest(_Strict):
    text: str | None = Field(default=None, description="a text query (or an image: base64 here, multipart `image`)")
    image: str | None = None
    embedding: list[float] | None = Field(default=None, description="a query embedding (the served model's width; "
                                          "normalised here), instead of a text or an image")
    index: str | None = Field(default=None, description="an index name (default: every loaded index)")
    k: int = Field(default=10, description="results per index")
    exact: bool = Field(default=False, description="an approximate index (`mm index build`): search its embeddings "
                        "exactly instead")


class Hit(BaseModel):
    rank: int
    id: str
    score: float
    image: str | None = Field(default=None, description="URL of the indexed image, when the index knows it")


class SearchResponse(BaseModel):
    query: str
    k: int
    results: dict[str, list[Hit]] = Field(description="index name -> hits, best first")


def multipart_doc(model: type[BaseModel], files: dict[str, bool]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for an endpoint that takes ``model`` as JSON or its fields as multipart form data,
    with ``files`` (name -> several allowed) as file parts instead of base64."""
    schema = model.model_json_schema()
    form = {"type": "object", "properties": {}}
    for name, prop in schema.get("properties", {}).items():
        if name in files:
            one = {"type": "string", "format": "binary"}
            form["properties"][name] = {"type": "array", "items": one} if files[name] else one
        else:
            form["properties"][name] = {k: v for k, v in prop.items() if k != "anyOf"} or {"type": "string"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": form}}}}
