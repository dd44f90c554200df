"""Tests for mm.losses and mm.dist against naive reference formulas and open_clip.

References below are written out by hand (explicit loops), never via mm code.
The distributed test spawns 2 gloo processes on CPU and checks the documented
DDP convention: local-feature gradients are W x the single-process gradient,
loss values / logit_scale / logit_bias gradients match (ClipLoss non-local) or
match on average over ranks (ClipLoss local_loss, SigLipLoss).
"""

from __future__ import annotations

import datetime
import math
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import mm.utils.dist as mmdist
from mm.losses import ClipLoss, CocaLoss, SigLipLoss, make_loss

WORLD = 2
B_LOCAL = 4
DIM = 16
SEED = 1234


# --------------------------------------------------------------------------- helpers


def out_of(img, txt, scale, bias=None, aux=None):
    return SimpleNamespace(image_emb=img, text_emb=txt, logit_scale=scale, logit_bias=bias,
                           caption_logits=None, aux_loss=aux)


def global_batch(n=WORLD * B_LOCAL, d=DIM, dtype=torch.float64, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    # correlate pairs a bit so the loss is not trivially uniform
    txt = F.normalize(txt + 0.5 * img, dim=-1)
    scale = torch.tensor(10.0, dtype=dtype)
    bias = torch.tensor(-5.0, dtype=dtype)
    return img, txt, scale, bias


def leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def ref_clip(img, txt, scale, bias=None):
    """Mean over rows of CE(image->text) and CE(text->image), explicit loops."""
    n = img.shape[0]
    b = 0.0 if bias is None else bias
    logits = [[scale * (img[i] * txt[j]).sum() + b for j in range(n)] for i in range(n)]
    i2t = 0.0
    t2i = 0.0
    for i in range(n):
        row = torch.stack([logits[i][j] for j in range(n)])
        col = torch.stack([logits[j][i] for j in range(n)])
        i2t = i2t - (logits[i][i] - torch.log(torch.exp(row).sum()))
        t2i = t2i - (logits[i][i] - torch.log(torch.exp(col).sum()))
    return (i2t / n + t2i / n) / 2


def ref_clip_rows(img, txt, scale, rows):
    """ClipLoss local_loss reference for the given rows: local images vs all texts
    and local texts vs all images, averaged over the local rows."""
    n = img.shape[0]
    i2t = 0.0
    t2i = 0.0
    for i in rows:
        li = torch.stack([scale * (img[i] * txt[j]).sum() for j in range(n)])
        lt = torch.stack([scale * (txt[i] * img[j]).sum() for j in range(n)])
        i2t = i2t - (li[i] - torch.log(torch.exp(li).sum()))
        t2i = t2i - (lt[i] - torch.log(torch.exp(lt).sum()))
    return (i2t + t2i) / (2 * len(rows))


def ref_siglip(img, txt, scale, bias, rows=None):
    """-sum over pairs (i in rows, all j) of log(sigmoid(y_ij * z_ij)) / len(rows)."""
    n = img.shape[0]
    rows = range(n) if rows is None else rows
    total = 0.0
    for i in rows:
        for j in range(n):
            y = 1.0 if i == j else -1.0
            z = scale * (img[i] * txt[j]).sum() + (0.0 if bias is None else bias)
            total = total - torch.log(torch.sigmoid(y * z))
    return total / len(rows)


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# --------------------------------------------------------------------------- single process


def test_dist_helpers_single_process():
    assert not mmdist.is_dist()
    assert mmdist.rank() == 0
    assert mmdist.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert mmdist.all_gather_with_grad(x) is x
    assert mmdist.all_gather_no_grad(x) is x


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_matches_naive_reference(with_bias):
    img, txt, scale, bias = global_batch()
    ins = leaf(img, txt, scale, bias)
    got = ClipLoss()(out_of(*ins[:3], ins[3] if with_bias else None))
    assert set(got) == {"loss", "contrastive_loss"}
    assert got["loss"].dtype == torch.float64
    refs = leaf(img, txt, scale, bias)
    ref = ref_clip(*refs[:3], refs[3] if with_bias else None)
    torch.testing.assert_close(got["loss"], ref, rtol=1e-12, atol=1e-12)
    n = 4 if with_bias else 3
    for g, r in zip(grads(got["loss"], ins[:n]), grads(ref, refs[:n])):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_siglip_matches_naive_reference(with_bias):
    img, txt, scale, bias = global_batch()
    ins = leaf(img, txt, scale, bias)
    got = SigLipLoss()(out_of(*ins[:3], ins[3] if with_bias else None))
    refs = leaf(img, txt, scale, bias)
    ref = ref_siglip(*refs[:3], refs[3] if with_bias else None)
    torch.testing.assert_close(got["contrastive_loss"], ref, rtol=1e-12, atol=1e-12)
    n = 4 if with_bias else 3
    gs, rs = grads(got["loss"], ins[:n]), grads(ref, refs[:n])
    for g, r in zip(gs, rs):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    if with_bias:
        assert rs[3].abs() > 1e-3  # the bias gradient is actually exercised


def test_clip_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt, scale, bias = global_batch(n=32, d=64, dtype=torch.float32)
    for b in (None, bias):
        ins = leaf(img, txt, scale)
        got = ClipLoss()(out_of(*ins, b))["loss"]
        refs = leaf(img, txt, scale)
        ref = open_clip_loss.ClipLoss()(*refs, logit_bias=b)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads(got, ins), grads(ref, refs)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_siglip_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt, scale, bias = global_batch(n=32, d=64, dtype=torch.float32)
    ins = leaf(img, txt, scale, bias)
    got = SigLipLoss()(out_of(*ins))["loss"]
    refs = leaf(img, txt, scale, bias)
    ref = open_clip_loss.SigLipLoss()(*refs)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads(got, ins), grads(ref, refs)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_aux_loss_added_with_weight(kind):
    img, txt, scale, bias = global_batch()
    aux = torch.tensor(0.75, dtype=torch.float64, requires_grad=True)
    loss_fn = make_loss(kind, aux_weight=0.3)
    got = loss_fn(out_of(img, txt, scale, bias, aux=aux))
    assert set(got) == {"loss", "contrastive_loss", "aux_loss"}
    torch.testing.assert_close(got["loss"], got["contrastive_loss"] + 0.3 * 0.75)
    assert got["aux_loss"] is aux
    (g,) = torch.autograd.grad(got["loss"], aux)
    assert g.item() == pytest.approx(0.3)
    no_aux = loss_fn(out_of(img, txt, scale, bias))
    assert "aux_loss" not in no_aux
    torch.testing.assert_close(no_aux["loss"], got["contrastive_loss"])


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_bf16_features_computed_in_fp32(cls):
    img, txt, scale, bias = global_batch(n=32, d=64, dtype=torch.float32)
    exact = cls()(out_of(img.bfloat16().float(), txt.bfloat16().float(), scale, bias))["loss"]
    got = cls()(out_of(img.bfloat16(), txt.bfloat16(), scale.bfloat16(), bias.bfloat16()))["loss"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


def test_clip_labels_cached():
    loss_fn = ClipLoss()
    a = loss_fn.labels(torch.device("cpu"), 8)
    assert loss_fn.labels(torch.device("cpu"), 8) is a
    assert torch.equal(a, torch.arange(8))
    assert torch.equal(loss_fn.labels(torch.device("cpu"), 4, 4), torch.arange(4, 8))


def test_make_loss():
    assert isinstance(make_loss("clip", local_loss=True), ClipLoss)
    assert make_loss("clip", local_loss=True).local_loss
    assert isinstance(make_loss("siglip"), SigLipLoss)
    assert isinstance(make_loss("coca"), CocaLoss)
    with pytest.raises(ValueError, match=r"'infonce'.*clip.*coca.*siglip"):
        make_loss("infonce")


def test_missing_embeddings_raise():
    img, txt, scale, _ = global_batch()
    with pytest.raises(ValueError):
        ClipLoss()(out_of(img, None, scale))


# --------------------------------------------------------------------------- distributed


def _dist_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert mmdist.is_dist()
        assert mmdist.world_size() == WORLD
        assert mmdist.rank() == rank
        img, txt, scale, bias = global_batch()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        res = {}

        # raw helpers: gathered values, and the with-grad backward sums over ranks
        x = torch.arange(6, dtype=torch.float64).reshape(3, 2).add(10 * rank).requires_grad_(True)
        y = mmdist.all_gather_with_grad(x)
        w = torch.arange(12, dtype=torch.float64).reshape(6, 2) * (rank + 1)
        (gx,) = torch.autograd.grad((y * w).sum(), x)
        y2 = mmdist.all_gather_no_grad(x)
        (gx2,) = torch.autograd.grad((y2 * w).sum(), x)
        res["helpers"] = (y.detach(), gx, y2.detach(), gx2)

        cases = {
            "clip": (ClipLoss(), False),
            "clip_local": (ClipLoss(local_loss=True), False),
            "clip_nograd": (ClipLoss(gather_with_grad=False), False),
            "siglip": (SigLipLoss(), True),
        }
        for name, (loss_fn, use_bias) in cases.items():
            i, t, s, b = leaf(img[sl], txt[sl], scale, bias)
            ins = [i, t, s] + ([b] if use_bias else [])
            loss = loss_fn(out_of(i, t, s, b if use_bias else None))["loss"]
            res[name] = (loss.detach(), [g.detach() for g in torch.autograd.grad(loss, ins)])
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    img, txt, scale, bias = global_batch()
    sls = [slice(r * B_LOCAL, (r + 1) * B_LOCAL) for r in range(WORLD)]
    close = dict(rtol=1e-10, atol=1e-12)

    # helpers
    x_all = torch.cat([torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r for r in range(WORLD)])
    w_sum = sum(torch.arange(12, dtype=torch.float64).reshape(6, 2) * (r + 1) for r in range(WORLD))
    for r in range(WORLD):
        y, gx, y2, gx2 = res[r]["helpers"]
        torch.testing.assert_close(y, x_all)
        torch.testing.assert_close(y2, x_all)
        torch.testing.assert_close(gx, w_sum[3 * r:3 * r + 3])  # summed over ranks
        w_r = torch.arange(12, dtype=torch.float64).reshape(6, 2) * (r + 1)
        torch.testing.assert_close(gx2, w_r[3 * r:3 * r + 3])  # only this rank's loss

    # single-process references over the whole global batch (fp64, naive formulas)
    ri, rt, rs = leaf(img, txt, scale)
    L = ref_clip(ri, rt, rs)
    dI, dT, dS = grads(L, [ri, rt, rs])

    # ClipLoss(local_loss=False): same value and scale grad on every rank, features get W x grad
    for name, factor in (("clip", WORLD), ("clip_nograd", 1)):
        for r in range(WORLD):
            loss, (gi, gt, gs) = res[r][name]
            torch.testing.assert_close(loss, L.detach(), **close)
            torch.testing.assert_close(gi, factor * dI[sls[r]], **close)
            torch.testing.assert_close(gt, factor * dT[sls[r]], **close)
            torch.testing.assert_close(gs, dS, **close)

    # ClipLoss(local_loss=True): per-rank value is the rows' share; averages match
    for r in range(WORLD):
        loss, (gi, gt, _) = res[r]["clip_local"]
        torch.testing.assert_close(loss, ref_clip_rows(img, txt, scale, range(sls[r].start, sls[r].stop)), **close)
        torch.testing.assert_close(gi, WORLD * dI[sls[r]], **close)
        torch.testing.assert_close(gt, WORLD * dT[sls[r]], **close)
    torch.testing.assert_close(sum(res[r]["clip_local"][0] for r in range(WORLD)) / WORLD, L.detach(), **close)
    torch.testing.assert_close(sum(res[r]["clip_local"][1][2] for r in range(WORLD)) / WORLD, dS, **close)
    assert not torch.allclose(res[0]["clip_local"][0], res[1]["clip_local"][0])

    # SigLipLoss: averages of value and scale/bias grads match, features get W x grad
    ri, rt, rs, rb = leaf(img, txt, scale, bias)
    S = ref_siglip(ri, rt, rs, rb)
    sI, sT, sS, sB = grads(S, [ri, rt, rs, rb])
    for r in range(WORLD):
        loss, (gi, gt, _, _) = res[r]["siglip"]
        torch.testing.assert_close(loss, ref_siglip(img, txt, scale, bias, rows=range(sls[r].start, sls[r].stop)),
                                   **close)
        torch.testing.assert_close(gi, WORLD * sI[sls[r]], **close)
        torch.testing.assert_close(gt, WORLD * sT[sls[r]], **close)
    losses = [res[r]["siglip"][0] for r in range(WORLD)]
    scale_grads = [res[r]["siglip"][1][2] for r in range(WORLD)]
    bias_grads = [res[r]["siglip"][1][3] for r in range(WORLD)]
    torch.testing.assert_close(sum(losses) / WORLD, S.detach(), **close)
    torch.testing.assert_close(sum(scale_grads) / WORLD, sS, **close)
    torch.testing.assert_close(sum(bias_grads) / WORLD, sB, **close)
    assert math.isfinite(S.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [1 << 20, 3000])  # one block, or blocks of 3 rows and a remainder
def test_caption_loss_equals_cross_entropy(dtype, smoothing, block_elements, monkeypatch):
    """caption_loss (TokenCrossEntropy: the gradient made in the forward, block by block) gives F.cross_entropy's
    value and gradient in fp32 (ignored labels, label smoothing, a scaled loss), to the logits' precision."""
    from mm.losses import TokenCrossEntropy, caption_loss

    monkeypatch.setitem(TokenCrossEntropy.BLOCK_ELEMENTS, "cpu", block_elements)
    torch.manual_seed(0)
    x = (torch.randn(50, 997, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, 997, (50,))
    y[::6] = -100
    y[1] = 5  # a confident row (p = 0.999): its gradient p - 1 = -0.001 must not be lost to bf16 rounding of p
    with torch.no_grad():
        x[1] = 0
        x[1, 5] = math.log(0.999 * 996 / 0.001)
    ref = F.cross_entropy(x.float(), y, ignore_index=-100, label_smoothing=smoothing)
    (want,) = torch.autograd.grad(2.5 * ref, x)
    got = caption_loss(x, y, smoothing)
    (grad,) = torch.autograd.grad(2.5 * got, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if dtype == torch.float32:
        # fp32 rounding differs between the two ways of computing the same gradient (and across CPUs), so both are
        # measured against the float64 gradient: ours is at least as accurate as F.cross_entropy's, up to half again
        x64 = x.detach().double().requires_grad_()
        (exact,) = torch.autograd.grad(2.5 * F.cross_entropy(x64, y, ignore_index=-100, label_smoothing=smoothing), x64)
        ours, theirs = (grad.double() - exact).abs().max(), (want.double() - exact).abs().max()
        assert theirs < 1e-6 and ours <= 1.5 * theirs, (ours, theirs)
    else:  # both rounded from fp32 to bf16: at most one unit in the last place apart
        torch.testing.assert_close(grad.float(), want.float(), atol=1e-9, rtol=2 ** -7)
    assert (grad[::6] == 0).all()  # ignored rows get no gradient
    assert want[1, 5] != 0 and torch.isclose(grad[1, 5].float(), want[1, 5].float(), rtol=2 ** -7)


def test_caption_loss_without_grad_and_a_second_backward():
    from mm.losses import caption_loss

    x, y = torch.randn(8, 30), torch.randint(0, 30, (8,))
    with torch.no_grad():
        assert torch.allclose(caption_loss(x, y), F.cross_entropy(x, y))
    x.requires_grad_()
    loss = caption_loss(x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
