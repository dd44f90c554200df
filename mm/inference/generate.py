"""Caption generation for CoCa models: greedy, beam search and sampling, batched, with a KV cache.

With the cache (default) every step feeds only the newest token through the text tower and the decoder;
self-attention keys/values of earlier positions are kept in preallocated buffers, and each image's
tokens are projected to cross-attention keys/values once (on the first step, before beams are
expanded) instead of once per generated token. ``use_cache=False`` recomputes the whole prefix every
step, as open_clip's ``CoCa.generate`` does; both give the same tokens (tested).

Logit processing, in order: repetition penalty (CTRL, Keskar et al. 2019: positive logits of tokens
already present are divided by the penalty, negative ones multiplied), no-repeat n-grams, the end token
forbidden before ``min_new_tokens``, the start token never generated; then, for sampling only,
temperature, top-k and top-p (nucleus). Beam search ranks finished hypotheses by
``sum log p / generated_length ** length_penalty``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import from_dict, to_dict, validate
from ..data.folder import load_image
from ..data.transforms import image_transform
from ..utils.nn import eval_mode

METHODS = ("greedy", "beam", "sample")


@dataclass
class GenerationConfig:
    method: str = "beam"  # greedy | beam | sample
    max_new_tokens: int | None = None  # default: up to the model's context length
    min_new_tokens: int = 0  # the end token is forbidden before this many new tokens
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: > 0 favours longer captions, < 0 shorter
    early_stopping: bool = True  # beam: stop an image at num_beams finished hypotheses
    temperature: float = 1.0  # sample
    top_k: int = 0  # sample: keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # sample: keep the smallest set with this much probability; 1 = all
    repetition_penalty: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    use_cache: bool = True  # KV cache (same tokens as without, faster)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.method not in METHODS:
            yield "method", f"must be one of {METHODS}, got {self.method!r}"
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            yield "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"
        for k in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            if getattr(self, k) < 0:
                yield k, f"must be >= 0, got {getattr(self, k)}"
        if self.num_beams < 1:
            yield "num_beams", f"must be >= 1, got {self.num_beams}"
        for k in ("temperature", "repetition_penalty"):
            if getattr(self, k) <= 0:
                yield k, f"must be > 0, got {getattr(self, k)}"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"


# ----------------------------------------------------------------------------------------------------
# Logit processing
# ----------------------------------------------------------------------------------------------------

def _repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = logits.gather(1, tokens)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, tokens, seen)


def _banned_ngram_tokens(row: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``row`` (HF's no_repeat_ngram_size)."""
    if len(row) < n:
        return []
    prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
    return [row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix]


def process_logits(logits: torch.Tensor, tokens: torch.Tensor, n_new: int, cfg: GenerationConfig,
                   *, sot_id: int, eot_id: int, banned: range | None = None) -> torch.Tensor:
    """Apply the rules shared by every method to next-token ``logits`` (N, V) (fp32) after ``tokens``
    (N, T), of which ``n_new`` were generated; ``banned`` ids are never generated (a LocCa model's box tokens
    in a caption)."""
    if banned is not None and len(banned):
        logits[:, banned.start:banned.stop] = float("-inf")
    if cfg.repetition_penalty != 1.0:
        logits = _repetition_penalty(logits, tokens, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        for i, row in enumerate(tokens.tolist()):
            repeats = _banned_ngram_tokens(row, cfg.no_repeat_ngram_size)
            if repeats:
                logits[i, repeats] = float("-inf")
    if n_new < cfg.min_new_tokens:
        logits[:, eot_id] = float("-inf")
    logits[:, sot_id] = float("-inf")
    return logits


def _sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already hold top_p: the top token always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# Model stepping: with or without the KV cache, same interface
# ----------------------------------------------------------------------------------------------------

class _Stepper:
    """Next-token logits for growing sequences of one batch of images."""

    def __init__(self, model, image_tokens: torch.Tensor, use_cache: bool, max_len: int):
        self.model = model
        self.image_tokens = image_tokens
        self.cache = model.new_decode_cache(max_len) if use_cache else None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) all tokens so far -> (N, V) fp32 logits for the next one."""
        if self.cache is None:
            return self.model.next_token_logits(tokens, self.image_tokens)[:, -1].float()
        done = self.model.text.transformer.cached_length(self.cache.text)
        new = tokens[:, done:]
        image_tokens = self.image_tokens if done == 0 else None
        return self.model.next_token_logits(new, image_tokens, self.cache)[:, -1].float()

    def expand(self, n: int) -> None:
        """Each row becomes n rows (beams)."""
        if self.cache is not None and self.model.text.transformer.cached_length(self.cache.text) > 0:
            self.cache.repeat_interleave(n)
        else:
            self.image_tokens = self.image_tokens.repeat_interleave(n, 0)

    def reorder(self, index: torch.Tensor) -> None:
        # beams never move between images, so the image tokens (uncached) stay where they are
        if self.cache is not None:
            self.cache.reorder(index)


# ----------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------

def _greedy_or_sample(stepper: _Stepper, tokens: torch.Tensor, max_new: int, cfg: GenerationConfig,
                      ids: dict[str, int], generator: torch.Generator | None) -> torch.Tensor:
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for step in range(max_new):
        logits = process_logits(stepper.logits(tokens), tokens, step, cfg, sot_id=ids["sot"], eot_id=ids["eot"],
                                banned=ids["banned"])
        nxt = _sample(logits, cfg, generator) if cfg.method == "sample" else logits.argmax(-1)
        nxt = nxt.masked_fill(done, ids["pad"])
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == ids["eot"]
        if bool(done.all()):
            break
    return tokens


def _beam_search(stepper: _Stepper, tokens: torch.Tensor, max_new: int, cfg: GenerationConfig,
                 ids: dict[str, int]) -> torch.Tensor:
    b, k, eot, pad = tokens.shape[0], cfg.num_beams, ids["eot"], ids["pad"]
    device = tokens.device
    # finished hypotheses per image: (score, token list), the best k kept
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b

    def add(i: int, score: float, seq: list[int]) -> None:
        hyps[i].append((score, seq))
        hyps[i].sort(key=lambda h: -h[0])
        del hyps[i][k:]

    # first step on one row per image; the beams start from its k best tokens
    logits = process_logits(stepper.logits(tokens), tokens, 0, cfg, sot_id=ids["sot"], eot_id=eot,
                            banned=ids["banned"])
    stepper.expand(k)
    tokens = tokens.repeat_interleave(k, 0)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    logp = F.log_softmax(logits, -1).repeat_interleave(k, 0)
    for step in range(max_new):
        if step > 0:
            logits = process_logits(stepper.logits(tokens), tokens, step, cfg, sot_id=ids["sot"], eot_id=eot,
                                    banned=ids["banned"])
            logp = F.log_softmax(logits, -1)
        v = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * v)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        rows, nxt, new_scores = [], [], []
        gen_len = step + 1
        for i in range(b):
            beams: list[tuple[int, int, float]] = []
            if not done[i]:
                for rank, (s, j) in enumerate(zip(top_scores[i], top_idx[i])):
                    src, tok = i * k + j // v, j % v
                    if s == float("-inf"):
                        break
                    if tok == eot:
                        if rank < k:  # an end token ranked below the k-th beam cannot be a best hypothesis
                            add(i, s / gen_len**cfg.length_penalty, tokens[src].tolist() + [eot])
                    else:
                        beams.append((src, tok, s))
                    if len(beams) == k:
                        break
                if len(hyps[i]) == k:
                    if cfg.early_stopping or not beams:
                        done[i] = True
                    else:  # stop when no running beam can beat the worst kept hypothesis
                        best_running = beams[0][2] / gen_len**cfg.length_penalty
                        done[i] = hyps[i][-1][0] >= best_running
            if done[i] or not beams:
                done[i] = True
                beams = []
            beams += [(i * k, pad, float("-inf"))] * (k - len(beams))  # fillers: -inf never continues
            for src, tok, s in beams:
                rows.append(src)
                nxt.append(tok)
                new_scores.append(s)
        if all(done):
            break
        index = torch.tensor(rows, device=device)
        tokens = torch.cat([tokens.index_select(0, index), torch.tensor(nxt, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device).view(b, k)
        stepper.reorder(index)
        if step == max_new - 1:  # out of budget: running beams become hypotheses too
            for i in range(b):
                if not done[i]:
                    for j in range(k):
                        s = float(scores[i, j])
                        if s != float("-inf"):
                            add(i, s / (step + 1) ** cfg.length_penalty, tokens[i * k + j].tolist())
    best = [max(h, key=lambda x: x[0])[1] if h else [] for h in hyps]
    length = max(len(s) for s in best)
    out = torch.full((b, length), pad, dtype=torch.long, device=device)
    for i, seq in enumerate(best):
        out[i, : len(seq)] = torch.tensor(seq, device=device)
    return out


@torch.no_grad()
def generate(model, images: torch.Tensor, cfg: GenerationConfig | None = None, *,
             prompt: torch.Tensor | None = None, generator: torch.Generator | None = None,
             **kwargs: Any) -> torch.Tensor:
    """Token ids (B, L) for preprocessed ``images`` (B, 3, H, W): the start token (or ``prompt``, (B, P)
    ids without padding, starting with the start token), the generated tokens and the end token, then
    padding (``pad_id``) to the longest row. Settings: a :class:`GenerationConfig` and/or its fields as
    keyword arguments (``method="sample", top_p=0.9``)."""
    if not hasattr(model, "next_token_logits"):
        raise TypeError(f"{type(model).__name__} has no captioning decoder; use a CoCa model (e.g. tiny-coca)")
    cfg = validate(from_dict(GenerationConfig, {**(to_dict(cfg) if cfg is not None else {}), **kwargs}))
    t = model.config.text
    dec = getattr(model.config, "decoder", None)
    loc = dec.loc_bins if dec is not None else 0  # box tokens are not words: never generated in a caption
    ids = {"sot": t.sot_id, "eot": t.eot_id, "pad": t.pad_id,
           "banned": range(t.vocab_size - loc, t.vocab_size) if loc else None}
    b = images.shape[0]
    if prompt is None:
        prompt = torch.full((b, 1), ids["sot"], dtype=torch.long, device=images.device)
    room = t.context_length - prompt.shape[1]
    max_new = room if cfg.max_new_tokens is None else cfg.max_new_tokens
    if max_new > room:
        raise ValueError(f"max_new_tokens {max_new} does not fit: the model's context is {t.context_length} "
                         f"tokens and the prompt has {prompt.shape[1]}")
    with eval_mode(model):  # restores every module's mode afterwards
        stepper = _Stepper(model, model.image_tokens(images), cfg.use_cache, prompt.shape[1] + max_new)
        if cfg.method == "beam":
            return _beam_search(stepper, prompt, max_new, cfg, ids)
        return _greedy_or_sample(stepper, prompt, max_new, cfg, ids, generator)


def _load_images(images, transform, device) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.to(device)
    return torch.stack([transform(load_image(im) if isinstance(im, (str, Path)) else im) for im in images]).to(device)


def caption(model, tok, images: torch.Tensor | Sequence[Any], *, batch_size: int = 64,
            device: torch.device | str | None = None, **kwargs: Any) -> list[str]:
    """Captions for ``images``: a preprocessed (B, 3, H, W) tensor, or PIL images / file paths (then the
    model's eval transform is applied). Generation settings as in :func:`generate` (``method="beam"``
    by default)."""
    device = device or next(model.parameters()).device
    transform = None if isinstance(images, torch.Tensor) else image_transform(model, train=False)
    eot = model.config.text.eot_id
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        x = _load_images(chunk, transform, device)
        for row in generate(model, x, **kwargs).tolist():
            row = row[: row.index(eot)] if eot in row else row
            out.append(tok.decode(row))
    return out
