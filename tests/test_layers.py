"""Shared blocks: each test compares against an independent reference computation."""
from __future__ import annotations

import math
import pathlib

import pytest
import torch

from mm.layers import (
    Attention,
    Block,
    Mlp,
    MoE,
    MoEConfig,
    RotaryEmbedding,
    RotaryEmbedding2D,
    SwiGLU,
    Transformer,
    TransformerConfig,
    apply_rope,
    make_attn_mask,
    sincos_2d,
)
from mm.layers.moe import expert_capacity


@pytest.fixture(autouse=True)
def fp64():
    """References in fp64 so tight tolerances are meaningful (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def naive_attention(q, k, v, allowed=None):
    """softmax(QK^T / sqrt(d) + mask) V with an explicit boolean mask (True = may attend)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def split_heads(t, h):
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


def reference_self_attention(attn: Attention, x, allowed=None):
    w, b = attn.qkv.weight, attn.qkv.bias
    d = x.shape[-1]
    q, k, v = (split_heads(x @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d], attn.heads) for i in range(3))
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = naive_attention(q, k, v, allowed).transpose(1, 2).reshape(x.shape)
    return o @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_attention_matches_naive(causal, padding, qk_norm):
    torch.manual_seed(0)
    b, t, d, h = 3, 7, 16, 4
    attn = Attention(d, h, qk_norm=qk_norm)
    x = torch.randn(b, t, d)
    lengths = torch.tensor([7, 4, 1])
    kpm = torch.arange(t)[None] < lengths[:, None] if padding else None
    mask, is_causal = make_attn_mask(t, t, causal=causal, key_padding_mask=kpm)
    got = attn(x, attn_mask=mask, is_causal=is_causal)
    allowed = torch.ones(b, 1, t, t, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(t, t).tril().bool()
    if padding:
        allowed &= kpm[:, None, None, :]
    ref = reference_self_attention(attn, x, allowed)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal, padding, t", [(False, False, 17), (True, False, 33), (False, True, 65),
                                                 (False, False, 200)])
def test_bf16_training_attention_on_the_cpu_equals_the_reference(causal, padding, t):
    """bf16 training on the CPU runs SDPA's math backend up to CPU_MATH_MAX_KEYS keys (faster there than the flash
    kernel's backward), the flash kernel beyond: both give the fp64 reference's outputs and gradients to bf16
    precision, masks included."""
    from mm.layers.attention import CPU_MATH_MAX_KEYS, _cpu_math_is_faster

    torch.manual_seed(0)
    b, d, h = 4, 32, 4
    attn = Attention(d, h).to(torch.float32)
    x = torch.randn(b, t, d, dtype=torch.float32)
    lengths = torch.tensor([t, t // 2, 3, 1])
    kpm = torch.arange(t)[None] < lengths[:, None] if padding else None
    mask, is_causal = make_attn_mask(t, t, causal=causal, key_padding_mask=kpm)
    q = torch.randn(b, h, t, d // h, dtype=torch.bfloat16, requires_grad=True)
    assert _cpu_math_is_faster(q, q) == (t <= CPU_MATH_MAX_KEYS)
    with torch.no_grad():
        assert not _cpu_math_is_faster(q, q)  # inference keeps the flash kernel
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        got = attn(xb, attn_mask=mask, is_causal=is_causal)
    got.float().square().sum().backward()
    allowed = torch.ones(b, 1, t, t, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(t, t).tril().bool()
    if padding:
        allowed &= kpm[:, None, None, :]
    ref_attn = Attention(d, h).to(torch.float64)
    ref_attn.load_state_dict(attn.state_dict())
    xr = x.double().requires_grad_()
    ref = reference_self_attention(ref_attn, xr, allowed)
    ref.square().sum().backward()
    torch.testing.assert_close(got.double(), ref, atol=0.03, rtol=0.03)
    torch.testing.assert_close(xb.grad.double(), xr.grad, atol=0.05 * xr.grad.abs().max().item(), rtol=0.05)


def test_causal_fast_path_equals_explicit_mask():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 9, 16)
    fast_mask, fast = make_attn_mask(9, 9, causal=True)
    assert fast and fast_mask is None
    explicit = torch.ones(9, 9).tril().bool()[None, None]
    torch.testing.assert_close(attn(x, is_causal=True), attn(x, attn_mask=explicit), atol=1e-12, rtol=0)


def test_cross_attention_matches_naive_with_context_padding():
    torch.manual_seed(0)
    d, kv_dim, h = 16, 12, 4
    attn = Attention(d, h, cross=True, kv_dim=kv_dim)
    x, ctx = torch.randn(2, 5, d), torch.randn(2, 6, kv_dim)
    ctx_valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    mask, _ = make_attn_mask(5, 6, key_padding_mask=ctx_valid)
    got = attn(x, ctx, attn_mask=mask)
    q = split_heads(attn.q(x), h)
    kv = ctx @ attn.kv.weight.T + attn.kv.bias
    k, v = split_heads(kv[..., :d], h), split_heads(kv[..., d:], h)
    ref = naive_attention(q, k, v, ctx_valid[:, None, None, :]).transpose(1, 2).reshape(2, 5, d)
    torch.testing.assert_close(got, attn.proj(ref), atol=1e-10, rtol=0)
    # the padded context positions really are ignored
    ctx2 = ctx.clone()
    ctx2[1, 2:] = torch.randn(4, kv_dim)
    torch.testing.assert_close(attn(x, ctx2, attn_mask=mask), got, atol=1e-12, rtol=0)


def test_causal_stack_ignores_future_tokens():
    torch.manual_seed(0)
    tr = Transformer(TransformerConfig(width=16, depth=3, heads=2)).eval()
    x = torch.randn(1, 8, 16)
    y, _ = tr(x, causal=True)
    for t in range(7):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(1, 7 - t, 16)
        y2, _ = tr(x2, causal=True)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=0)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


# ----------------------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("swiglu", [False, True])
def test_one_expert_moe_equals_mlp(swiglu):
    torch.manual_seed(0)
    d, hdim = 8, 32
    moe = MoE(d, hdim, MoEConfig(num_experts=1, top_k=1, capacity_factor=None, eval_capacity_factor=None),
              act="gelu", swiglu=swiglu)
    mlp = SwiGLU(d, hdim) if swiglu else Mlp(d, hdim, "gelu")
    with torch.no_grad():
        moe.b1.copy_(torch.randn_like(moe.b1))  # non-zero biases so they are compared too
        moe.b2.copy_(torch.randn_like(moe.b2))
        mlp.fc1.weight.copy_(moe.w1[0].T)
        mlp.fc1.bias.copy_(moe.b1[0])
        mlp.fc2.weight.copy_(moe.w2[0].T)
        mlp.fc2.bias.copy_(moe.b2[0])
    x = torch.randn(3, 5, d)
    for mode in (moe.train, moe.eval):
        mode()
        y, stats = moe(x)
        torch.testing.assert_close(y, mlp(x), atol=1e-12, rtol=0)
        assert stats.dropped_fraction.item() == 0.0


def reference_moe(moe: MoE, x: torch.Tensor, cap: int) -> tuple[torch.Tensor, int]:
    """Token-by-token reference: priority = all first choices (in token order) before second choices."""
    e, k = moe.cfg.num_experts, moe.cfg.top_k
    probs = (x.float() @ moe.router.weight.float().T).softmax(-1)  # the router runs in fp32
    gate, expert = probs.topk(k, -1)
    if k > 1 and moe.cfg.normalize_gates:
        gate = gate / gate.sum(-1, keepdim=True)
    gate = gate.to(x.dtype)
    fill = [0] * e
    out = torch.zeros_like(x)
    dropped = 0
    for c in range(k):
        for i in range(x.shape[0]):
            ex = int(expert[i, c])
            if fill[ex] >= cap:
                dropped += 1
                continue
            fill[ex] += 1
            h = x[i] @ moe.w1[ex] + moe.b1[ex]
            out[i] += gate[i, c] * (moe.act(h) @ moe.w2[ex] + moe.b2[ex])
    return out, dropped


@pytest.mark.parametrize("dispatch", ["padded", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("factor", [0.5, 1.0, None])
def test_moe_batched_dispatch_matches_token_loop(top_k, factor, dispatch):
    torch.manual_seed(1)
    # grouped_mm has no fp64 kernel: that path is checked in fp32 (against the same fp32 token loop)
    dtype, atol = (torch.float64, 1e-10) if dispatch == "padded" else (torch.float32, 1e-5)
    e, n, d = 4, 24, 8
    moe = MoE(d, 16, MoEConfig(num_experts=e, top_k=top_k, capacity_factor=factor, dispatch=dispatch)).train()
    moe.to(dtype)
    x = torch.randn(n, d, dtype=dtype)
    y, stats = moe(x)
    cap = expert_capacity(n, e, top_k, factor)
    ref, dropped = reference_moe(moe, x, cap)
    torch.testing.assert_close(y, ref, atol=atol, rtol=0)
    assert stats.dropped_fraction.item() == pytest.approx(dropped / (top_k * n))


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("cfg", [
    dict(top_k=2, capacity_factor=0.75),
    dict(top_k=1, capacity_factor=1.0, batch_priority=True),
    dict(top_k=2, capacity_factor=None),
])
def test_grouped_dispatch_equals_padded(cfg, swiglu):
    """The grouped GEMM path and the capacity-buffer path: same outputs, gradients and statistics, with
    drops, BPR, unlimited capacity, padding tokens and modality groups; also under bf16 autocast."""
    torch.manual_seed(5)
    d, hidden, e = 16, 24, 4
    models = {}
    for dispatch in ("padded", "grouped"):
        torch.manual_seed(6)
        models[dispatch] = MoE(d, hidden, MoEConfig(num_experts=e, dispatch=dispatch, **cfg), swiglu=swiglu).float().train()
    x = torch.randn(3, 10, d, dtype=torch.float32)
    member = torch.zeros(3, 10, 2, dtype=torch.bool)
    member[:, :6, 0] = True  # "images"
    member[:2, 6:9, 1] = True  # "texts"; the rest is padding
    runs = {}
    for name, moe in models.items():
        xi = x.clone().requires_grad_(True)
        y, stats = moe(xi, member)
        (y * torch.linspace(-1, 1, d)).sum().backward()
        runs[name] = (y, xi.grad, moe.w1.grad, moe.b2.grad, stats)
    (yp, gxp, gw1p, gb2p, sp), (yg, gxg, gw1g, gb2g, sg) = runs["padded"], runs["grouped"]
    assert sp.dropped_fraction.item() > 0 or cfg["capacity_factor"] is None or cfg["capacity_factor"] >= 1
    for a, b in ((yp, yg), (gxp, gxg), (gw1p, gw1g), (gb2p, gb2g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip([sp, *sp.groups], [sg, *sg.groups]):
        torch.testing.assert_close(a.load, b.load)
        torch.testing.assert_close(a.dropped_fraction, b.dropped_fraction)
        torch.testing.assert_close(a.aux_loss, b.aux_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yp, _ = models["padded"](x, member)
        yg, _ = models["grouped"](x, member)
    assert yp.dtype == yg.dtype == torch.bfloat16
    torch.testing.assert_close(yp.float(), yg.float(), atol=2e-2, rtol=2e-2)


def test_grouped_dispatch_backward_of_plain_sum():
    """grouped_mm's own backward rejects a stride-0 gradient (that of ``y.sum()``); the layer must not."""
    torch.manual_seed(7)
    moe = MoE(16, 32, MoEConfig(num_experts=4, top_k=2, dispatch="grouped")).float().train()
    x = torch.randn(20, 16, dtype=torch.float32, requires_grad=True)
    y, _ = moe(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and moe.w2.grad.abs().sum() > 0


def test_dropped_fraction_counts_over_capacity_tokens():
    torch.manual_seed(2)
    e, n, d = 4, 40, 8
    moe = MoE(d, 16, MoEConfig(num_experts=e, top_k=1, capacity_factor=0.5)).train()
    with torch.no_grad():  # skew the router so some experts overflow
        moe.router.weight[0] += 0.8
    x = torch.randn(n, d).abs()
    _, stats = moe(x)
    counts = torch.bincount((x.float() @ moe.router.weight.float().T).argmax(-1), minlength=e)
    cap = math.ceil(0.5 * n / e)
    over = (counts - cap).clamp_min(0).sum().item()
    assert over > 0
    assert stats.dropped_fraction.item() == pytest.approx(over / n)
    torch.testing.assert_close(stats.load, counts.float() / n)
    # dropped tokens pass through: their MoE output is exactly zero
    y, _ = moe(x)
    assert int((y.abs().sum(-1) == 0).sum()) == over


def test_load_balancing_loss_switch_normalisation():
    e = 4
    moe = MoE(e, 8, MoEConfig(num_experts=e, top_k=1, capacity_factor=None))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(e) * 5.0)
    # perfectly balanced: each expert gets the same number of tokens and, by symmetry, the same mean prob
    x = torch.eye(e).repeat(3, 1)
    _, stats = moe(x)
    assert stats.lb_loss.item() == pytest.approx(1.0, abs=1e-6)
    # a collapsed router: everything to expert 0; loss = E * sum(f * P) by the definition
    x0 = torch.zeros(12, e)
    x0[:, 0] = 1
    _, s0 = moe(x0)
    p = (x0 @ moe.router.weight.T).softmax(-1).mean(0)
    assert s0.lb_loss.item() == pytest.approx(e * p[0].item(), abs=1e-6)
    assert s0.lb_loss.item() > 3.0
    # z-loss definition
    logits = x0 @ moe.router.weight.T
    assert s0.z_loss.item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-6)


def test_moe_ignores_padding_tokens():
    torch.manual_seed(3)
    moe = MoE(6, 12, MoEConfig(num_experts=3, top_k=2, capacity_factor=None))
    x = torch.randn(2, 5, 6)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, stats = moe(x, valid)
    assert torch.all(y[0, 3:] == 0)
    y_real, _ = moe(x[valid].unsqueeze(0))
    torch.testing.assert_close(y[valid], y_real[0], atol=1e-12, rtol=0)
    assert stats.load.sum().item() == pytest.approx(1.0)


def test_moe_router_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(4)
    moe = MoE(8, 16, MoEConfig(num_experts=4, top_k=2, capacity_factor=None)).float()
    x = torch.randn(32, 8, dtype=torch.float32)
    _, ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = moe(x)
    assert stats.lb_loss.dtype == torch.float32
    torch.testing.assert_close(stats.load, ref.load)  # same routing decisions as fp32
    assert y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------------

def test_rope_1d_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 64)
    cos, sin = rope(64)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    base = score(3, 10)
    for s in (1, 5, 40):
        assert score(3 + s, 10 + s) == pytest.approx(base, abs=1e-5)  # fp32 tables
    assert abs(score(3, 11) - base) > 1e-3  # but it does depend on the offset
    assert abs(score(3, 3) - (q * k).sum().item()) < 1e-5  # zero offset: plain dot product


def test_rope_2d_scores_depend_only_on_relative_grid_offset():
    torch.manual_seed(0)
    g, hd = 6, 8
    rope = RotaryEmbedding2D(hd, g, prefix_tokens=1)
    cos, sin = rope()
    q, k = torch.randn(hd), torch.randn(hd)

    def score(a, b):  # a, b = (row, col)
        ia, ib = 1 + a[0] * g + a[1], 1 + b[0] * g + b[1]
        qa = apply_rope(q.view(1, 1, 1, hd), cos[ia:ia + 1], sin[ia:ia + 1])
        kb = apply_rope(k.view(1, 1, 1, hd), cos[ib:ib + 1], sin[ib:ib + 1])
        return (qa * kb).sum().item()

    base = score((0, 1), (2, 3))
    assert score((3, 2), (5, 4)) == pytest.approx(base, abs=1e-5)
    assert abs(score((0, 1), (3, 3)) - base) > 1e-4  # row offset matters
    assert abs(score((0, 1), (2, 4)) - base) > 1e-4  # column offset matters
    torch.testing.assert_close(cos[0], torch.ones(hd))  # class token is not rotated


def test_sincos_2d_is_position_dependent_and_matches_open_clip():
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    table = sincos_2d(32, 5, prefix_tokens=1)
    assert table.shape == (26, 32)
    assert torch.unique(table[1:], dim=0).shape[0] == 25  # every patch position distinct
    ref = torch.from_numpy(get_2d_sincos_pos_embed(32, 5, cls_token=True))
    torch.testing.assert_close(table.double(), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------

def test_grad_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    cfg = TransformerConfig(width=16, depth=2, heads=2, moe=MoEConfig(num_experts=2, top_k=1, every=2))
    tr = Transformer(cfg).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    y1, s1 = tr(x, causal=True)
    (y1.sum() + s1[0].aux_loss).backward()
    g1 = [p.grad.clone() for p in tr.parameters()]
    gx = x.grad.clone()
    tr.zero_grad()
    x.grad = None
    tr.grad_checkpointing = True
    y2, s2 = tr(x, causal=True)
    (y2.sum() + s2[0].aux_loss).backward()
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(x.grad, gx)
    for a, p in zip(g1, tr.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_moe_placed_every_n_blocks():
    cfg = TransformerConfig(width=8, depth=6, heads=2, moe=MoEConfig(num_experts=2, top_k=1, every=3))
    tr = Transformer(cfg)
    assert [b.is_moe for b in tr.blocks] == [False, False, True, False, False, True]
    _, stats = tr(torch.randn(1, 4, 8))
    assert len(stats) == 2


def test_cross_only_block_and_layer_scale_and_drop_path():
    torch.manual_seed(0)
    cfg = TransformerConfig(width=8, depth=1, heads=2, layer_scale=0.0, drop_path=0.5)
    blk = Block(cfg, self_attn=False, cross_dim=6, drop_path=0.5).eval()
    assert not hasattr(blk, "attn")
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    y, _ = blk(x, context=ctx)
    torch.testing.assert_close(y, x)  # LayerScale 0 zeroes both branches
    blk.train()
    with torch.no_grad():
        blk.ls_cross.gamma.fill_(1.0)
    torch.manual_seed(1)
    outs = {tuple(blk(x, context=ctx)[0][:, 0, 0].tolist()) for _ in range(20)}
    assert len(outs) > 1  # drop-path is stochastic in training


def test_one_attention_implementation_in_the_package():
    """Every attention call in mm goes through mm.layers.attention: no other file calls SDPA, builds
    softmax(QK^T) by hand or uses nn.MultiheadAttention."""
    root = pathlib.Path(__file__).resolve().parents[1] / "mm"
    offenders = []
    for f in root.rglob("*.py"):
        if f.name == "attention.py":
            continue
        src = f.read_text()
        # calls, not names: the interop module describes open_clip's MultiheadAttention layout in prose
        for pat in ("scaled_dot_product_attention(", "MultiheadAttention(", "flex_attention("):
            if pat in src:
                offenders.append(f"{f.relative_to(root)}: {pat}")
    assert not offenders, offenders


def test_moe_dense_twin_has_the_active_parameters_of_the_moe():
    """moe.dense_twin: the same places get one dense FFN whose weights equal the top-k experts' a token uses."""
    from mm.layers.block import make_ffn

    cfg = TransformerConfig(16, 4, 2, moe=MoEConfig(num_experts=8, top_k=2, every=2))
    twin = TransformerConfig(16, 4, 2, moe=MoEConfig(num_experts=8, top_k=2, every=2, dense_twin=True))
    for i in range(4):
        moe, dense = make_ffn(cfg, i), make_ffn(twin, i)
        if isinstance(moe, MoE):
            assert isinstance(dense, Mlp)
            active = 2 * (moe.w1[0].numel() + moe.b1[0].numel() + moe.w2[0].numel()) + moe.b2[0].numel()
            assert sum(p.numel() for p in dense.parameters()) == active
        else:
            assert type(dense) is type(moe)
