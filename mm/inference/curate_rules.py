"""Filtering a scored pool (``mm curate filter``): rules applied to the samples of an ``mm curate score`` output
(:mod:`mm.inference.curate`).

:func:`run_filter` applies rules (:data:`RULES`) in order to the samples still kept, each one's removals counted;
threshold rules are judged against the whole pool (``clip_score: {top: 0.3}`` is DataComp's top 30% of the pool),
deduplicating rules among the samples still kept. Writes ``keep.txt`` (the kept keys, one a line, in pool order),
``removed.tsv`` (each removed key and the rule that removed it) and ``report.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from ..config import ConfigError, from_dict, validate
from ..utils.io import write_json_atomic
from . import dedup
from .ann import check_embeddings
from .curate import SCORES_NAME, CurateError, read_scores
from .embed import INDEX_NAME, EmbedError, read_index

KEEP_NAME, REPORT_NAME, REMOVED_NAME = "keep.txt", "report.json", "removed.tsv"


class Pool:
    """A finished scoring run, read for filtering: per-sample columns (scores, sizes) in pool order, captions part
    by part, and its image and text embed outputs (row i of each is sample i)."""

    def __init__(self, scores_dir: str | Path):
        self.root = Path(scores_dir)
        self.index = read_scores(self.root)
        self.parts = self.index["parts"]
        self.count = int(self.index["count"])
        self.dirs = {"image": self.root / self.index["images"], "text": self.root / self.index["texts"]}
        self.embeds = {}
        for kind, d in self.dirs.items():
            try:
                self.embeds[kind] = check_embeddings(d) if self.count else read_index(d)
            except EmbedError as e:
                raise CurateError(str(e)) from None
            if self.embeds[kind]["count"] != self.count:
                raise CurateError(f"{d}: {self.embeds[kind]['count']} embeddings, {self.root / SCORES_NAME} "
                                  f"records {self.count} samples: the scoring output is inconsistent")

    def metas(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(first row, meta) of each part, in pool order."""
        offset = 0
        for p in self.parts:
            yield offset, json.loads((self.root / p["meta"]).read_text())
            offset += p["rows"]

    @cached_property
    def scores(self) -> np.ndarray:
        arrays = [np.load(self.root / p["scores"]) for p in self.parts]
        return np.concatenate(arrays).astype(np.float32) if arrays else np.zeros(0, np.float32)

    @cached_property
    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(widths, heights) of the decoded images."""
        w, h = [], []
        for _, meta in self.metas():
            w += meta["width"]
            h += meta["height"]
        return np.asarray(w, np.int64), np.asarray(h, np.int64)

    def caption_column(self, fn: Callable[[str], Any], dtype: Any) -> np.ndarray:
        """``fn(caption)`` of every sample, read part by part."""
        out = [np.asarray([fn(c) for c in meta["captions"]], dtype) for _, meta in self.metas()]
        return np.concatenate(out) if out else np.zeros(0, dtype)

    def embeddings(self, which: str) -> tuple[Path, list[dict[str, Any]]]:
        """(embed output directory, its parts) of ``which`` ("image" or "text")."""
        return self.dirs[which], self.embeds[which]["parts"]


# -- filtering: the rules -----------------------------------------------------------------------------
@dataclass
class Rule:
    """A filter rule: its fields are the recipe's keys for it; ``check()`` judges their values alone,
    ``prepare(pool)`` what needs the pool (files, packages, counts), both before any work; ``apply(pool, alive)``
    returns the rows it keeps (a subset of ``alive``) and what it wants reported."""

    name: ClassVar[str] = ""

    def check(self) -> Iterator[tuple[str, str]]:
        return iter(())

    def prepare(self, pool: Pool) -> None:
        pass

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError


@dataclass
class ClipScore(Rule):
    """DataComp's CLIP score filter: keep samples whose image-caption cosine under the scoring model is at least
    ``min`` (e.g. 0.28 for OpenAI's ViT-B/32), or the ``top`` fraction of the pool by that score (e.g. 0.3)."""

    name: ClassVar[str] = "clip_score"
    min: float | None = None  # keep cosine >= min (-1 to 1)
    top: float | None = None  # keep this fraction of the pool, best scores first (0 to 1); ties to the earlier row

    def check(self) -> Iterator[tuple[str, str]]:
        if (self.min is None) == (self.top is None):
            yield "min", "give min (a cosine threshold) or top (a fraction of the pool), one of them"
        if self.min is not None and not -1 <= self.min <= 1:
            yield "min", f"must be a cosine between -1 and 1, got {self.min}"
        if self.top is not None and not 0 < self.top <= 1:
            yield "top", f"must be a fraction in (0, 1], got {self.top}"

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        s = pool.scores
        if self.min is not None:
            return alive & (s >= self.min), {}
        k = int(round(self.top * len(s)))
        best = np.lexsort((np.arange(len(s)), -s))[:k]
        mask = np.zeros(len(s), bool)
        mask[best] = True
        return alive & mask, {"threshold": float(s[best[-1]]) if k else None}


@dataclass
class CaptionWords(Rule):
    """Caption length in words (whitespace-separated), e.g. DataComp's basic filter's "more than 2 words"."""

    name: ClassVar[str] = "caption_words"
    min: int = 0  # keep captions of at least this many words
    max: int | None = None  # and at most this many (null: no limit)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.min < 0:
            yield "min", f"must be >= 0, got {self.min}"
        if self.max is not None and self.max < max(self.min, 1):
            yield "max", f"must be >= min and >= 1, got {self.max} (min {self.min})"

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        n = pool.caption_column(lambda c: len(c.split()), np.int64)
        return alive & (n >= self.min) & (n <= (self.max if self.max is not None else n.max(initial=0))), {}


@dataclass
class CaptionDuplicates(Rule):
    """Exact duplicate captions: of the kept samples sharing a caption, the one with the best CLIP score stays
    (ties: the earlier one)."""

    name: ClassVar[str] = "caption_duplicates"
    normalize: bool = True  # compare captions lowercased, runs of whitespace as one space

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        def digest(c: str) -> bytes:
            return hashlib.blake2b((" ".join(c.lower().split()) if self.normalize else c).encode(),
                                   digest_size=16).digest()

        h = pool.caption_column(digest, "S16").view(np.uint64).reshape(-1, 2)  # 128-bit: collisions never matter
        rows = np.flatnonzero(alive)
        order = rows[np.lexsort((rows, -pool.scores[rows], h[rows, 1], h[rows, 0]))]
        first = np.ones(len(order), bool)
        first[1:] = np.any(h[order[1:]] != h[order[:-1]], axis=1)
        out = np.zeros_like(alive)
        out[order[first]] = True
        return out, {"groups": int(first.sum())}


@dataclass
class Language(Rule):
    """Caption language (DataComp's basic filter keeps English), identified by py3langid (langid.py's model, in
    the package: nothing is downloaded); an optional package: ``pip install py3langid``."""

    name: ClassVar[str] = "language"
    keep: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep
    min_prob: float = 0.0  # and only when the language's normalised probability is at least this (0 to 1)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.keep:
            yield "keep", "name at least one language (ISO 639-1 code, e.g. en)"
        if not 0 <= self.min_prob <= 1:
            yield "min_prob", f"must be a probability in [0, 1], got {self.min_prob}"

    def prepare(self, pool: Pool) -> None:
        self._identifier()

    @staticmethod
    def _identifier() -> Any:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise CurateError("language: caption language needs the py3langid package, which is not installed "
                              "(pip install py3langid)") from None
        return LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        ident, keep = self._identifier(), set(self.keep)

        def ok(caption: str) -> bool:
            lang, prob = ident.classify(caption)
            return lang in keep and prob >= self.min_prob

        return alive & pool.caption_column(ok, bool), {}


@dataclass
class ImageSize(Rule):
    """Image size in pixels (the decoded image's), e.g. DataComp's basic filter's shorter side >= 200."""

    name: ClassVar[str] = "image_size"
    min_side: int = 0  # keep images whose shorter side is at least this
    max_side: int | None = None  # and whose longer side is at most this (null: no limit)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.min_side < 0:
            yield "min_side", f"must be >= 0, got {self.min_side}"
        if self.max_side is not None and self.max_side < max(self.min_side, 1):
            yield "max_side", f"must be >= min_side and >= 1, got {self.max_side}"

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        w, h = pool.sizes
        ok = np.minimum(w, h) >= self.min_side
        if self.max_side is not None:
            ok &= np.maximum(w, h) <= self.max_side
        return alive & ok, {}


@dataclass
class AspectRatio(Rule):
    """Image aspect ratio, long side over short side, e.g. DataComp's basic filter's at most 3."""

    name: ClassVar[str] = "aspect_ratio"
    max: float = 3.0  # keep images whose long side is at most this many times the short side (>= 1)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.max >= 1:
            yield "max", f"must be >= 1 (long side over short side), got {self.max}"

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        w, h = pool.sizes
        return alive & (np.maximum(w, h) <= self.max * np.minimum(w, h)), {}


@dataclass
class ImageClusters(Rule):
    """DataComp's image-based filter: k-means of the pool's image embeddings; keep the samples in a cluster that
    is the nearest one of some embedding of ``target`` (an ``mm embed`` output or a scoring run of the same model:
    DataComp uses ImageNet's training images)."""

    name: ClassVar[str] = "image_clusters"
    target: str = ""  # an mm embed output, or a scoring output (its images), made by the same model
    clusters: int = 1000  # k-means clusters of the pool (DataComp: 100,000 for 12.8M samples)
    iters: int = 20  # k-means rounds
    seed: int = 0  # k-means initialisation and training sample

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.target:
            yield "target", "name the target set's embeddings (an mm embed output directory)"
        if self.clusters < 1:
            yield "clusters", f"must be >= 1, got {self.clusters}"
        if self.iters < 1:
            yield "iters", f"must be >= 1, got {self.iters}"

    def prepare(self, pool: Pool) -> None:
        self._target = target_embeddings(self.target, pool)
        if self.clusters > pool.count:
            raise CurateError(f"image_clusters.clusters: {self.clusters} clusters of a pool of {pool.count} samples "
                              "(at most one cluster per sample)")

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        d, parts = pool.embeddings("image")
        mask, stats = dedup.cluster_filter(d, parts, *self._target, self.clusters, iters=self.iters, seed=self.seed)
        return alive & mask, stats


@dataclass
class SemDeDup(Rule):
    """SemDeDup: k-means of the kept samples' embeddings; in each cluster, of every group of near-duplicates
    (cosine above 1 - eps) only the one least similar to the centroid stays."""

    name: ClassVar[str] = "semdedup"
    eps: float = 0.05  # near-duplicates: cosine > 1 - eps (0 to 1; larger removes more)
    clusters: int = 100  # k-means clusters (fewer when fewer samples are kept)
    embedding: str = "image"  # which embeddings: image (the paper's) or text
    iters: int = 20  # k-means rounds
    seed: int = 0  # k-means initialisation and training sample

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0 < self.eps < 1:
            yield "eps", f"must be in (0, 1) (near-duplicates: cosine > 1 - eps), got {self.eps}"
        if self.clusters < 1:
            yield "clusters", f"must be >= 1, got {self.clusters}"
        if self.embedding not in ("image", "text"):
            yield "embedding", f"must be image or text, got {self.embedding!r}"
        if self.iters < 1:
            yield "iters", f"must be >= 1, got {self.iters}"

    def apply(self, pool: Pool, alive: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        d, parts = pool.embeddings(self.embedding)
        gone, stats = dedup.semdedup(d, parts, np.flatnonzero(alive), self.eps, self.clusters, iters=self.iters,
                                     seed=self.seed)
        out = alive.copy()
        out[gone] = False
        return out, stats


RULES: dict[str, type[Rule]] = {r.name: r for r in (ClipScore, CaptionWords, CaptionDuplicates, Language,
                                                      ImageSize, AspectRatio, ImageClusters, SemDeDup)}


def target_embeddings(target: str | Path, pool: Pool) -> tuple[Path, list[dict[str, Any]]]:
    """(embed output, parts) of a target set: an ``mm embed`` output or a scoring run's images, embedded by the
    pool's model (same weights fingerprint, or the same recorded model where either lacks one)."""
    d = Path(target)
    if (d / SCORES_NAME).is_file():
        d = d / json.loads((d / SCORES_NAME).read_text())["images"]
    if not (d / INDEX_NAME).is_file():
        raise CurateError(f"image_clusters.target: {target} is not an mm embed output or a scoring run (no "
                          f"{INDEX_NAME} or {SCORES_NAME})")
    try:
        index = check_embeddings(d)
    except EmbedError as e:
        raise CurateError(f"image_clusters.target: {e}") from None
    mine, theirs = pool.index.get("model_fingerprint"), index.get("model_fingerprint")
    same = mine == theirs if mine and theirs else pool.index.get("model") == index.get("model")
    if index["embed_dim"] != pool.index["embed_dim"] or not same:
        raise CurateError(f"image_clusters.target: {target} was embedded by {index.get('model')}, the pool by "
                          f"{pool.index.get('model')} (weights differ): embed the target with the pool's model")
    return d, index["parts"]


def parse_rules(entries: list[Any], where: str, names: dict[str, str] | None = None) -> list[Rule]:
    """Rules from recipe entries: ``NAME``, ``{NAME: {key: value}}`` or ``{NAME: null}``. Errors (an unknown rule or
    key, a value out of range) raise CurateError naming ``where`` and the entry, or, for a ``"rule.key"`` in
    ``names``, the caller's name for it."""
    if not isinstance(entries, list) or not entries:
        raise CurateError(f"{where}: expected a list of rules, got {entries!r}")
    rules = []
    for i, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise CurateError(f"{where}, rule {i}: expected a rule name or one {{name: {{key: value}}}}, got {entry!r}")
        (name, params), = entry.items()
        if name not in RULES:
            raise CurateError(f"{where}, rule {i}: unknown rule {name!r} (rules: {', '.join(RULES)})")
        try:
            rule = from_dict(RULES[name], params if params is not None else {}, name)
            validate(rule, f"{name}.")
        except ConfigError as e:
            msg = str(e)
            for key, caller in (names or {}).items():
                if msg.startswith(f"{key}: "):
                    raise CurateError(f"{caller}: {msg[len(key) + 2:]}") from None
            raise CurateError(f"{where}, rule {i}: {msg}") from None
        rules.append(rule)
    return rules


def load_recipe(path: str | Path, what: str = "recipe") -> list[Rule]:
    """The rules of a YAML recipe: ``rules:`` a list of entries (:func:`parse_rules`), applied in order."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"{what}: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CurateError(f"{path}: not a YAML file ({e})") from None
    if not isinstance(data, dict) or set(data) != {"rules"}:
        raise CurateError(f"{path}: expected one key, rules: a list of rules (got {data!r:.80})")
    return parse_rules(data["rules"], str(path))


def _describe(rule: Rule) -> str:
    return " ".join(f"{f.name}={getattr(rule, f.name)}" for f in fields(rule)
                    if getattr(rule, f.name) != f.default and getattr(rule, f.name) not in (None, ""))


def run_filter(scores_dir: str | Path, rules: list[Rule], out_dir: str | Path) -> dict[str, Any]:
    """Apply ``rules`` in order to a scoring run's samples; write keep.txt, removed.tsv and report.json into
    ``out_dir``; returns the report (``steps``: each rule's removals, in order)."""
    pool = Pool(scores_dir)
    if pool.index.get("repeated_keys"):
        raise CurateError(f"{scores_dir}: sample keys repeat across its shards (e.g. "
                          f"{pool.index['repeated_key_example']!r}), so a list of kept keys could not tell them "
                          "apart: give every sample its own key")
    for rule in rules:  # files, packages and counts: before any work
        rule.prepare(pool)
    alive = np.ones(pool.count, bool)
    removed_by = np.full(pool.count, -1, np.int16)
    steps = []
    for i, rule in enumerate(rules):
        t0 = time.perf_counter()
        new, stats = rule.apply(pool, alive)
        removed_by[alive & ~new] = i
        steps.append({"rule": rule.name, "params": asdict(rule), "description": _describe(rule),
                      "removed": int(alive.sum() - new.sum()), "left": int(new.sum()),
                      "seconds": round(time.perf_counter() - t0, 3), **stats})
        alive = new
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / (KEEP_NAME + ".tmp"), "w", encoding="utf-8") as keep, \
            open(out / (REMOVED_NAME + ".tmp"), "w", encoding="utf-8") as gone:
        for offset, meta in pool.metas():
            for j, key in enumerate(meta["keys"]):
                r = removed_by[offset + j]
                if r < 0:
                    keep.write(f"{key}\n")
                else:
                    gone.write(f"{key}\t{rules[r].name}\n")
    os.replace(out / (KEEP_NAME + ".tmp"), out / KEEP_NAME)
    os.replace(out / (REMOVED_NAME + ".tmp"), out / REMOVED_NAME)
    report = {"scores": str(pool.root.resolve()), "model": pool.index.get("model"), "pool": pool.count,
              "kept": int(alive.sum()), "steps": steps, "keep": str((out / KEEP_NAME).resolve())}
    write_json_atomic(out / REPORT_NAME, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: each rule's removals and what is left, in order."""
    rows = [("rule", "removed", "left")] + [("pool", "", str(report["pool"]))]
    rows += [(f"{s['rule']} {s['description']}".strip(), str(s["removed"]), str(s["left"])) for s in report["steps"]]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>9}  {c:>9}" for a, b, c in rows]
    share = report["kept"] / report["pool"] if report["pool"] else 0.0
    return "\n".join(lines + [f"kept {report['kept']} of {report['pool']} ({100 * share:.1f}%): {report['keep']}"])
