"""Block-sparse attention: flex_attention == the dense SDPA reference under the same mask, the pattern is
the documented one (checked by perturbing tokens and against a loop-built mask), full coverage == ordinary
attention, cached decoding == whole-sequence, and config errors name their key."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as fa

import mm
from mm.config import ConfigError
from mm.layers import Attention, SparseAttentionConfig, Transformer, TransformerConfig
from mm.layers.sparse import (
    SparsePattern,
    block_layout,
    computed_fraction,
    dense_mask,
    make_mask_mod,
)

CPU = torch.device("cpu")
PATTERNS = {
    "window": {"window": 1, "global_tokens": 0},
    "window+global": {"window": 1, "global_tokens": 3},
    "window+global+random": {"window": 0, "global_tokens": 1, "random_blocks": 2},
}


@pytest.fixture(autouse=True)
def quiet_eager_flex():
    """Eager flex_attention warns once that it is not compiled; that is the intended CPU path here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.fixture
def force_flex(monkeypatch):
    """SparsePattern hands BlockMasks to CUDA only (elsewhere the mask goes through SDPA); these tests run
    flex_attention's eager CPU path instead."""
    monkeypatch.setattr(SparsePattern, "use_flex",
                        lambda self, q_len, k_len, device: self.cfg.backend == "flex" and q_len == k_len)


@pytest.fixture
def flex_cpu_backward(force_flex, monkeypatch):
    """torch 2.14's flex_attention refuses CPU inputs that require grad (a device check before any work);
    its eager backward is plain autograd math, so the check is bypassed to compare gradients on the CPU.
    The compiled CUDA kernels are compared in test_cuda_compiled_flex_matches_dense."""
    if not hasattr(fa, "_validate_device"):
        pytest.skip("torch moved flex_attention's device check")
    monkeypatch.setattr(fa, "_validate_device", lambda q, k, v: None)


def sparse_cfg(backend: str = "flex", block_size: int = 16, **kw) -> SparseAttentionConfig:
    return SparseAttentionConfig(block_size=block_size, backend=backend, **kw)


def layer_mask(cfg: SparseAttentionConfig, t: int, causal: bool = False):
    """One layer's mask of the kind ``cfg.backend`` names, a BlockMask on the CPU too."""
    return SparsePattern(cfg, 1).build(0, t, t, causal=causal, key_padding_mask=None, device=CPU,
                                       flex=cfg.backend == "flex")


def naive_allowed(cfg, layout, q_len, k_len, causal, key_valid=None):
    """The documented rule, one (query, key) pair at a time: (B or 1, 1, q_len, k_len) bool."""
    rows = key_valid.shape[0] if key_valid is not None else 1
    lay, bs, g = layout.tolist(), cfg.block_size, cfg.global_tokens
    out = [[[False] * k_len for _ in range(q_len)] for _ in range(rows)]
    for b in range(rows):
        for i in range(q_len):
            q = i + k_len - q_len
            for k in range(k_len):
                ok = lay[q // bs][k // bs] or q < g or k < g
                ok = ok and (not causal or k <= q) and (key_valid is None or bool(key_valid[b, k]))
                out[b][i][k] = ok or k == q
    return torch.tensor(out)[:, None]


def assert_grad_close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """fp32 gradients of a whole model: entries up to ~1e2 are sums over every position, so the error is
    measured relative to the tensor's largest entry."""
    assert (a is None) == (b is None), name
    if a is None:  # a parameter the loss does not reach (the ViT's projection for its tokens)
        return
    scale = b.abs().max().clamp(min=1.0)
    torch.testing.assert_close(a / scale, b / scale, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------
# 1. flex == dense SDPA under the same mask
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [197, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_flex_equals_dense_attention_layer(pattern, causal, t, flex_cpu_backward):
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(2, t, 64, requires_grad=True)
    outs, grads = [], []
    for backend in ("flex", "dense"):
        mask = layer_mask(sparse_cfg(backend, **PATTERNS[pattern]), t, causal)
        assert isinstance(mask, fa.BlockMask) == (backend == "flex")
        y = attn(x, attn_mask=mask)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, t)[:, None]).sum(), [x, *attn.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    # parameter gradients are sums over all B * T positions: fp32 rounding grows with them
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def _pair(backend_kw: dict, **overrides):
    """The same tiny model twice (same weights), once per backend."""
    models = []
    for backend in ("flex", "dense"):
        sp = dict(block_size=16, backend=backend, **backend_kw)
        torch.manual_seed(0)
        models.append(mm.create_model("tiny-clip", vision__transformer__sparse_attention=sp,
                                      text__transformer__sparse_attention=sp, **overrides))
    models[1].load_state_dict(models[0].state_dict())
    return models


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_flex_equals_dense_vit(pattern, flex_cpu_backward):
    """A whole ViT at 56 px / patch 4: 197 tokens, not a multiple of the block size; outputs and every
    parameter's gradient."""
    flex, dense = _pair(PATTERNS[pattern], vision__image_size=56)
    images = torch.randn(2, 3, 56, 56)
    w = torch.randn(196, 1)
    res = []
    for m in (flex, dense):
        tokens = m.vision(images).tokens
        assert tokens.shape[1] == 196
        (tokens * w).sum().backward()
        res.append((tokens, {n: p.grad for n, p in m.vision.named_parameters()}))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-5, rtol=1e-5)
    for n, g in res[0][1].items():
        assert_grad_close(g, res[1][1][n], n)


def _captions(b: int, t: int, lengths: list[int], eot_id: int) -> torch.Tensor:
    tokens = torch.randint(1, 1000, (b, t))
    for row, n in enumerate(lengths):
        tokens[row, n] = eot_id
        tokens[row, n + 1:] = 0
    return tokens


@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_dense_text_tower(causal, flex_cpu_backward):
    """Causal (no padding mask) and bidirectional (key padding mask ANDed with the pattern: a per-sample
    BlockMask) text towers, 77 tokens."""
    flex, dense = _pair(PATTERNS["window+global+random"], text__context_length=77, text__causal=causal)
    tokens = _captions(3, 77, [5, 40, 76], flex.config.text.eot_id)
    w = torch.randn(77, 1)
    res = []
    for m in (flex, dense):
        out = m.text(tokens)
        (out.emb.sum() + (out.tokens * w).sum()).backward()
        res.append((out.tokens, {n: p.grad for n, p in m.text.named_parameters()}))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-5, rtol=1e-5)
    for n, g in res[0][1].items():
        assert_grad_close(g, res[1][1][n], n)


def test_flex_block_tables_match_the_mask():
    """What flex_attention's kernels skip: a tile is computed iff the token mask has a True in it, and
    the fraction of tiles computed shrinks with the window."""
    for causal in (False, True):
        for kw in PATTERNS.values():
            cfg = sparse_cfg(**kw)
            bm = layer_mask(cfg, 197, causal)
            dense = layer_mask(sparse_cfg("dense", **kw), 197, causal)[0, 0]
            padded = torch.zeros(208, 208, dtype=torch.bool)  # 13 blocks of 16
            padded[:197, :197] = dense
            tiles = padded.view(13, 16, 13, 16).any(3).any(1)
            assert torch.equal(bm.to_dense()[0, 0].bool(), tiles)
    narrow = computed_fraction(layer_mask(sparse_cfg(window=0, global_tokens=0), 1024))
    wide = computed_fraction(layer_mask(sparse_cfg(window=4, global_tokens=0), 1024))
    assert narrow == pytest.approx(1 / 64) and wide == pytest.approx((64 * 9 - 2 * 10) / 64**2)


# ---------------------------------------------------------------------------------------------------
# 2. the pattern is what it says
# ---------------------------------------------------------------------------------------------------

def _changed_queries(cfg: SparseAttentionConfig, t: int, token: int, causal: bool = False) -> set[int]:
    """Queries whose output moves when key/value ``token`` is perturbed (one layer, no grad)."""
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(1, t, 64)
    x2 = x.clone()
    x2[0, token] += 3.0
    with torch.no_grad():
        mask = layer_mask(cfg, t, causal)
        d = (attn(x, attn_mask=mask) - attn(x2, attn_mask=mask)).abs().amax(-1)[0]
    assert ((d < 1e-6) | (d > 1e-3)).all(), "a query is neither unaffected nor clearly affected"
    return set(torch.nonzero(d > 1e-3).flatten().tolist())


@pytest.mark.parametrize("backend", ["flex", "dense"])
def test_pattern_by_perturbation(backend):
    blk = lambda b: set(range(16 * b, 16 * b + 16))
    t = 80  # 5 blocks
    # own block only: perturbing token 40 (block 2) moves exactly block 2
    assert _changed_queries(sparse_cfg(backend, window=0, global_tokens=0), t, 40) == blk(2)
    # window 1: blocks 1..3
    assert _changed_queries(sparse_cfg(backend, window=1, global_tokens=0), t, 40) == blk(1) | blk(2) | blk(3)
    # global tokens see everything ...
    g = sparse_cfg(backend, window=0, global_tokens=3)
    assert _changed_queries(g, t, 70) == {0, 1, 2} | blk(4)
    # ... and are seen by everything
    assert _changed_queries(g, t, 1) == set(range(t))
    # causal, window 1: positions from 40 on, in block 2 and the next one
    assert _changed_queries(sparse_cfg(backend, window=1, global_tokens=0), t, 40, causal=True) == \
        set(range(40, 64))


def test_dense_mask_equals_rule_built_by_hand():
    """The mask both backends use equals the rule written as a loop: window, global tokens, random
    blocks, causality, key padding and a KV-cache offset (queries = last positions of the keys)."""
    key_valid = torch.ones(2, 45, dtype=torch.bool)
    key_valid[1, 30:] = False
    for causal in (False, True):
        for kw in PATTERNS.values():
            cfg = sparse_cfg("dense", block_size=8, **kw)
            layout = block_layout(cfg, 6, layer_idx=2, causal=causal)
            for q_len, kv in ((45, None), (45, key_valid), (7, None)):
                mod = make_mask_mod(cfg, layout, causal=causal, q_offset=45 - q_len, key_valid=kv)
                got = dense_mask(mod, q_len, 45, kv.shape[0] if kv is not None else None, CPU)
                assert torch.equal(got, naive_allowed(cfg, layout, q_len, 45, causal, kv))


def test_random_blocks_deterministic_per_seed_and_layer():
    cfg = sparse_cfg(window=1, global_tokens=16, random_blocks=3)
    layouts = [block_layout(cfg, 32, layer, causal=False) for layer in range(4)]
    assert all(torch.equal(lay, block_layout(cfg, 32, i, causal=False)) for i, lay in enumerate(layouts))
    assert len({tuple(lay.flatten().tolist()) for lay in layouts}) == 4  # every layer its own draw
    other_seed = sparse_cfg(window=1, global_tokens=16, random_blocks=3, seed=1)
    assert not torch.equal(block_layout(other_seed, 32, 0, causal=False), layouts[0])
    band = (torch.arange(32)[:, None] - torch.arange(32)[None, :]).abs() <= 1
    extra = layouts[0] & ~band
    assert (extra.sum(1) == 3).all()  # exactly random_blocks more key blocks per query block ...
    assert not extra[:, 0].any()  # ... never the block holding only global tokens
    # causal: random blocks only from the past, and a prefix of the sequence draws the same blocks
    causal = [block_layout(cfg, n, 1, causal=True) for n in (32, 20)]
    past_only = causal[0] & ~band
    assert torch.equal(past_only, past_only.tril(-1)) and (past_only.sum(1)[5:] == 3).all()
    assert torch.equal(causal[0][:20, :20], causal[1])
    # the Transformer hands each layer its own mask, the same on every call (step, rank)
    pattern = SparsePattern(sparse_cfg("dense", random_blocks=2, window=0), depth=3)
    first = pattern.masks(128, 128, causal=False, key_padding_mask=None, device=CPU)
    again = pattern.masks(128, 128, causal=False, key_padding_mask=None, device=CPU)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_each_block_gets_its_layers_mask():
    """The stack builds the masks once per forward and block i attends with layer i's mask."""
    cfg = TransformerConfig(64, 3, 4, sparse_attention=sparse_cfg("dense", window=0, random_blocks=2))
    tr = Transformer(cfg)
    seen = []
    for blk in tr.blocks:
        blk.attn.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["attn_mask"]), with_kwargs=True)
    tr(torch.randn(1, 128, 64))
    expected = tr.sparse.masks(128, 128, causal=False, key_padding_mask=None, device=CPU)
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_cached_decoding_equals_whole_sequence(force_flex):
    """A causal sparse stack decoded in chunks through its KV cache (dense masks with a query offset)
    gives the whole-sequence (flex) outputs."""
    cfg = TransformerConfig(64, 2, 4, sparse_attention=sparse_cfg(window=1, global_tokens=2, random_blocks=1))
    torch.manual_seed(0)
    tr = Transformer(cfg).eval()
    x = torch.randn(2, 70, 64)
    with torch.no_grad():
        whole, _ = tr(x, causal=True)
        cache = tr.new_cache(70)
        parts = [tr(x[:, a:b], causal=True, cache=cache)[0] for a, b in ((0, 20), (20, 21), (21, 50), (50, 70))]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 3. a pattern that covers everything is ordinary attention
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["flex", "dense"])
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "padding"])
def test_full_cover_equals_dense_attention(mode, backend, force_flex):
    torch.manual_seed(0)
    plain = Transformer(TransformerConfig(64, 2, 4))
    sparse = Transformer(TransformerConfig(64, 2, 4, sparse_attention=sparse_cfg(backend, window=5, global_tokens=0)))
    sparse.load_state_dict(plain.state_dict())
    x = torch.randn(2, 90, 64)  # 6 blocks: a window of 5 covers every pair
    kpm = torch.ones(2, 90, dtype=torch.bool)
    kpm[1, 33:] = False
    kw = {"causal": mode == "causal", "key_padding_mask": kpm if mode == "padding" else None}
    with torch.no_grad():
        a, _ = plain(x, **kw)
        b, _ = sparse(x, **kw)
    # padding queries differ by design (they also see themselves); real tokens never see them
    real = kpm if mode == "padding" else torch.ones_like(kpm)
    torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# training on the CPU, config errors
# ---------------------------------------------------------------------------------------------------

def test_flex_config_off_cuda_runs_the_mask_through_sdpa():
    """Off CUDA (and with a KV cache) a flex config gets boolean masks: torch 2.14's eager flex_attention
    has no CPU backward and no block skipping. A flex model trains on the CPU with the dense backend's
    gradients."""
    pattern = SparsePattern(sparse_cfg(), 2)
    assert pattern.use_flex(64, 64, torch.device("cuda")) and not pattern.use_flex(64, 64, CPU)
    assert not pattern.use_flex(1, 64, torch.device("cuda"))
    assert all(isinstance(m, torch.Tensor) for m in pattern.masks(64, 64, causal=True, key_padding_mask=None,
                                                                   device=CPU))
    flex, dense = _pair(PATTERNS["window+global+random"], vision__image_size=56)
    images = torch.randn(2, 3, 56, 56)
    tokens = _captions(2, 32, [6, 20], flex.config.text.eot_id)
    for m in (flex, dense):
        m.train()
        out = m(images, tokens)
        (out.image_emb @ out.text_emb.T).sum().backward()
    for (n, p), q in zip(flex.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("override, key", [
    ({"vision__transformer__sparse_attention__block_size": 0}, "vision.transformer.sparse_attention.block_size"),
    ({"vision__transformer__sparse_attention__block_size": 24}, "vision.transformer.sparse_attention.block_size"),
    ({"text__transformer__sparse_attention__backend": "bigbird"}, "text.transformer.sparse_attention.backend"),
    ({"text__transformer__sparse_attention__window": -1}, "text.transformer.sparse_attention.window"),
    ({"vision__transformer__sparse_attention__global_tokens": -2},
     "vision.transformer.sparse_attention.global_tokens"),
    ({"vision__transformer__sparse_attention__random_blocks": -1},
     "vision.transformer.sparse_attention.random_blocks"),
    ({"text__transformer__heads": 16, "text__transformer__sparse_attention__backend": "flex"},
     "text.transformer.sparse_attention.backend"),
    ({"vision__transformer__sparse_attention__block_sizes": 64}, "vision.transformer.sparse_attention.block_sizes"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        mm.create_model("tiny-clip", **override)


def test_dense_backend_accepts_any_block_size_and_small_heads():
    m = mm.create_model("tiny-clip", text__transformer__heads=16,
                        text__transformer__sparse_attention={"backend": "dense", "block_size": 10})
    assert m.text.transformer.sparse.cfg.block_size == 10
    assert mm.create_model("tiny-clip").vision.transformer.sparse is None


# ---------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels (run where a GPU is present)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled flex_attention kernels")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_compiled_flex_matches_dense(causal):
    """The compiled (block-skipping) forward and backward kernels against SDPA with the same mask, at a
    ragged length; fp32 without TF32, tolerance for a different summation order over ~1k keys."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    attn = Attention(256, 4).to(dev)
    x = torch.randn(2, 1031, 256, device=dev, requires_grad=True)
    res = []
    for backend in ("flex", "dense"):
        cfg = sparse_cfg(backend, block_size=64, window=1, global_tokens=1, random_blocks=2)
        mask = SparsePattern(cfg, 1).masks(1031, 1031, causal=causal, key_padding_mask=None, device=dev)[0]
        y = attn(x, attn_mask=mask)
        res.append((y, torch.autograd.grad(y.square().sum(), [x, *attn.parameters()])))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
