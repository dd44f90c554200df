"""mm.quantize: int8 layers against their float arithmetic, embeddings of a quantized tiny model close to fp32,
and mm embed --quantize."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import colour_image
from torch import nn

import mm
from mm.cli import main
from mm.inference.quantize import (
    DynamicInt8Linear,
    Int8WeightLinear,
    QuantizeError,
    quantize,
    quantize_per_channel,
)


def test_per_channel_quantization_rounds_each_weight_to_its_channels_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 24) * torch.logspace(-2, 1, 16)[:, None]  # channels of very different ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q.abs().amax(1), torch.full((16,), 127, dtype=torch.int8))  # each channel uses its range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linears_compute_their_quantized_arithmetic():
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    x = torch.randn(2, 5, 24)
    q, scale = quantize_per_channel(lin.weight)
    weight_only = Int8WeightLinear(lin)
    assert torch.allclose(weight_only(x), F.linear(x, q.float() * scale[:, None], lin.bias), atol=1e-5)
    assert weight_only(x.bfloat16()).dtype == torch.bfloat16
    # dynamic: each row quantized with its own scale, then the same dequantized product
    xs = x.reshape(-1, 24).abs().amax(1, keepdim=True) / 127
    xq = torch.round(x.reshape(-1, 24) / xs).clamp(-127, 127)
    want = F.linear(xq * xs, q.float() * scale[:, None], lin.bias).reshape(2, 5, 16)
    assert torch.allclose(DynamicInt8Linear(lin)(x), want, atol=1e-5)


def synthetic_batch(model, n: int = 8):
    """Preprocessed noisy colour squares and captions (the suite never reads real data)."""
    from conftest import COLOURS

    pre, tok = mm.image_transform(model, train=False), mm.get_tokenizer(model)
    images = torch.stack([pre(colour_image(COLOURS[i % 4], 48, seed=i)) for i in range(n)])
    tokens = tok([f"a {COLOURS[i % 4]} square number {i}" for i in range(n)])
    return images, tokens


@pytest.mark.parametrize("mode, backend", [("int8", "auto"), ("int8", "mm"), ("int8-weight", "auto")])
def test_quantized_tiny_model_embeddings_match_fp32(model, mode, backend):
    images, tokens = synthetic_batch(model)
    q = quantize(model, mode, backend=backend)
    assert q.quantization == mode and q is not model
    with torch.no_grad():
        for enc in ("encode_image", "encode_text"):
            x = images if enc == "encode_image" else tokens
            ref, got = getattr(model, enc)(x, normalize=True), getattr(q, enc)(x, normalize=True)
            cos = F.cosine_similarity(ref, got, dim=-1)
            assert cos.min() >= 0.99, (mode, backend, enc, cos.min().item())
            assert not torch.equal(ref, got)  # really quantized
    linears = [m for m in q.modules() if type(m) is nn.Linear]
    assert not linears  # every Linear was replaced
    assert [type(m) for m in model.modules() if type(m) is nn.Linear]  # the original is untouched


def test_routers_stay_float_and_bad_requests_are_errors():
    torch.manual_seed(0)
    moe = mm.create_model("tiny-moe").eval()
    q = quantize(moe, "int8-weight")
    routers = [m for n, m in q.named_modules() if n.endswith(".router")]
    assert routers and all(type(r) is nn.Linear for r in routers)
    with pytest.raises(QuantizeError, match="unknown quantization mode 'int4'"):
        quantize(moe, "int4")
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(q, "int8")
    with pytest.raises(QuantizeError, match="runs on the CPU"):
        quantize(mm.create_model("tiny-clip").to("meta"), "int8")
    same = quantize(moe, "int8-weight", inplace=True)
    weights = [b for n, b in moe.named_buffers() if n.endswith("fc1.weight")]
    assert same is moe and weights and all(b.dtype == torch.int8 for b in weights)


def test_embed_quantize_int8(model_dir, model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, c in enumerate(["red", "green", "blue", "yellow"] * 2):
        colour_image(c, 48, seed=i).save(folder / f"{i}.jpg", quality=95)
    args = ["embed", "--model", str(model_dir), "--images", str(folder), "--workers", "0", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "fp32")]) == 0
    assert main(args + ["--out", str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    from mm.inference.embed import load_index

    ref, ids = load_index(tmp_path / "fp32")
    got, ids8 = load_index(tmp_path / "int8")
    assert ids == ids8 and (ref * got).sum(1).min() >= 0.99 and not np.array_equal(ref, got)
    assert json.loads((tmp_path / "int8" / "plan.json").read_text())["quantize"] == "int8"
    capsys.readouterr()
    # an output directory made with another quantization is refused before any work
    assert main(args + ["--out", str(tmp_path / "int8")]) == 2
    assert "different quantize" in capsys.readouterr().err
