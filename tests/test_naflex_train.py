"""NaFlex training data: patches cut in the loader workers at each image's aspect ratio, the token-budget schedule,
exact resume of the variable-length stream, and the config errors raised before any work."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import assert_same_run, sigterm_when, two_gloo_ranks
from mm.config import ConfigError
from mm.data.aspect import generate_aspect
from mm.data.decode import SampleDecoder
from mm.data.naflex import TokenBudget
from mm.data.transforms import NaFlexTransform, image_transform, naflex_size, stack_images
from mm.data.wds import Collate, ShardStream, make_loader
from mm.models import get_preset
from mm.models.patches import Patches
from mm.train.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[1]
SEQ_LENS = (16, 36, 64)


@pytest.fixture(scope="module")
def aspect_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aspect")
    generate_aspect(out, n_train=300, n_test=60, long_side=64, samples_per_shard=100, verbose=False)
    return out


def test_naflex_size_fits_the_budget_and_keeps_the_aspect_ratio():
    rng = random.Random(0)
    for _ in range(300):
        h, w, patch, n = rng.randint(1, 900), rng.randint(1, 900), rng.choice([4, 8, 14, 16]), rng.randint(1, 600)
        th, tw = naflex_size(h, w, patch, n)
        rows, cols = th // patch, tw // patch
        assert th % patch == 0 and tw % patch == 0 and rows >= 1 and cols >= 1
        assert rows * cols <= n or (rows == 1 or cols == 1)  # one patch a side can exceed a tiny budget
        if rows > 2 and cols > 2:  # rounding up to whole patches moves the aspect ratio by at most a patch a side
            assert (rows - 1) / cols <= h / w <= rows / (cols - 1)
        if rows * cols <= n:  # the largest such size: one more step of the scale would not fit
            assert (rows + 1) * cols > n or (cols + 1) * rows > n or th >= 100 * h or tw >= 100 * w
    with pytest.raises(ValueError, match="no area"):
        naflex_size(0, 10, 8, 64)
    with pytest.raises(ValueError, match="holds no image"):
        naflex_size(10, 10, 8, 0)


def test_the_transform_cuts_patches_at_the_image_aspect_ratio():
    """Evaluation: a 4:1 image becomes a 4:1 grid of the image's own pixels (resized), channels last per patch."""
    cfg = get_preset("tiny-clip")  # patch 4
    t = image_transform(cfg, seq_len=64)
    img = Image.fromarray(torch.randint(0, 256, (16, 64, 3), dtype=torch.uint8).numpy())
    patches, grid, n = t(img)
    assert grid == (4, 16) and n == 64 and patches.shape == (64, 4 * 4 * 3)
    x = torch.from_numpy(np.array(img)).float().div(255)  # (16, 64, 3)
    mean, std = torch.tensor(cfg.vision.image_mean), torch.tensor(cfg.vision.image_std)
    first = ((x[:4, :4] - mean) / std).reshape(-1)  # the top-left patch, (row, col, channel)
    torch.testing.assert_close(patches[0], first)
    with pytest.raises(ValueError, match="no area"):
        t(Image.new("RGB", (0, 5)))


def test_token_budget_is_a_function_of_the_batch_index():
    b = TokenBudget(SEQ_LENS, 1000, seed=5)
    plan = [b.at(i) for i in range(200)]
    assert plan == [TokenBudget(SEQ_LENS, 1000, seed=5).at(i) for i in range(200)]  # any process, any time
    assert {n for _, n in plan} == set(SEQ_LENS) and all(size == 1000 // n for size, n in plan)
    assert plan != [TokenBudget(SEQ_LENS, 1000, seed=6).at(i) for i in range(200)]
    with pytest.raises(ValueError, match="smaller than one image"):
        TokenBudget((64, 256), 200)


def _stream(urls, first_batch=0, start=None, workers=2):
    cfg = get_preset("tiny-clip")
    decoder = SampleDecoder(image_transform(cfg, train=True, seq_len=max(SEQ_LENS), scale=(0.5, 1.0)),
                            image_keys=["jpg"])
    return ShardStream(urls, decoder, Collate(), 8, seed=1, shuffle_buffer=20, train=True, start=start,
                       rotation=first_batch % workers, budget=TokenBudget(SEQ_LENS, 512, seed=1),
                       first_batch=first_batch)


def test_the_stream_follows_the_schedule_and_resumes_exactly(aspect_shards):
    """Batches of budget // length images padded to the drawn length, grids at each image's aspect ratio; a stream
    restarted from the positions after batch 5 gives batches 5.. exactly (keys, pixels, grids)."""
    urls = [str(p) for p in sorted(aspect_shards.glob("train-*.tar*"))]
    budget = TokenBudget(SEQ_LENS, 512, seed=1)
    full, positions = [], {}
    for i, b in zip(range(9), make_loader(_stream(urls), 2)):
        p = b["images"]
        assert isinstance(p, Patches) and b["meta"]["index"] == i
        size, n = budget.at(i)
        assert p.shape[:2] == (size, n) and len(b["keys"]) == size
        assert (p.lengths() <= n).all() and torch.equal(p.valid.sum(1), p.lengths())
        full.append(b)
        if i == 4:
            positions = {b2["meta"]["worker"]: (b2["meta"]["epoch"], b2["meta"]["pos"]) for b2 in full[-2:]}
    grids = torch.cat([b["images"].shapes for b in full]).float()
    aspects = grids[:, 1] / grids[:, 0]
    assert aspects.min() < 0.5 and aspects.max() > 2  # tall and wide grids: the images' own shapes
    resumed = [b for _, b in zip(range(4), make_loader(_stream(urls, first_batch=5, start=positions), 2))]
    for a, b in zip(full[5:], resumed):
        assert a["keys"] == b["keys"] and a["meta"]["index"] == b["meta"]["index"]
        assert torch.equal(a["images"].pixels, b["images"].pixels)
        assert torch.equal(a["images"].shapes, b["images"].shapes)


def test_batches_pad_to_the_sequence_length():
    """One tensor shape per sequence length (a compiled graph each), however long the batch's images are."""
    t = NaFlexTransform(8, 20, (0.5,) * 3, (0.5,) * 3)
    sizes = [(120, 40), (40, 40), (40, 160)]
    p = stack_images([t(Image.new("RGB", size)) for size in sizes])
    want = [(h // 8) * (w // 8) for h, w in (naflex_size(h, w, 8, 20) for w, h in sizes)]
    assert p.shape[1] == 20 and p.lengths().tolist() == want and p.padded
    assert p.shapes[0, 1] > p.shapes[0, 0] and p.shapes[2, 0] > p.shapes[2, 1]  # wide stays wide, tall stays tall


@pytest.mark.parametrize("override, key", [
    ("data.naflex.seq_lens=[0, 64]", "data.naflex.seq_lens"),
    ("data.naflex.seq_lens=[]", "data.naflex.seq_lens"),
    ("data.naflex.max_tokens=100", "data.naflex.max_tokens"),
    ("data.naflex.crop_ratio=[2, 1]", "data.naflex.crop_ratio"),
    ("data.decode=device", "data.decode"),
    ("model=tiny-siglip2", "data.naflex"),  # a convolutional stem
    ("model=tiny-limoe", "data.naflex"),  # one tower
])
def test_bad_naflex_settings_fail_before_any_work(aspect_shards, tmp_path, override, key):
    base = ["model=tiny-clip", f"data.train={aspect_shards}/train-000000.tar.gz", "data.naflex.max_tokens=1024",
            f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_run_config(None, [*base, override])
    assert not (tmp_path / "run").exists()


# -- whole runs -----------------------------------------------------------------------------------------------------

def _config(tmp_path: Path, shards: Path, out: str, steps: int = 6, **train) -> Path:
    cfg = {"model": "tiny-clip",
           "data": {"train": f"{shards}/train-{{000000..000002}}.tar.gz", "workers": 2, "shuffle_buffer": 16,
                    "crop_scale": [0.6, 1.0], "naflex": {"seq_lens": list(SEQ_LENS), "max_tokens": 384}},
           "train": {"steps": steps, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 0, "log_every": 1, "seed": 3,
                     **train},
           "output_dir": str(tmp_path / out)}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SMALL = ["model.vision.transformer.depth=2", "model.text.transformer.depth=2"]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train(config: Path, *overrides: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), *SMALL, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_naflex_run_logs_tokens_and_padding(aspect_shards, tmp_path):
    _train(_config(tmp_path, aspect_shards, "run", steps=3))
    recs = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["padding"] < 0.5 for r in recs)
    final = [r for r in _records(tmp_path / "run") if r.get("final")][0]
    assert len(final["batch_shapes_sha256"]) == 1


@pytest.mark.slow
def test_naflex_run_stops_on_sigterm_and_resumes_exactly(aspect_shards, tmp_path):
    """A SIGTERM after step 3 of 6, mid-epoch: the resumed run takes the same batches (schedule hash), the same
    losses and ends with the same weights as an uninterrupted run, bit for bit."""
    _train(_config(tmp_path, aspect_shards, "full"))
    cfg = _config(tmp_path, aspect_shards, "split")
    sigterm_when([sys.executable, str(ROOT / "train.py"), str(cfg), *SMALL], tmp_path / "split" / "metrics.jsonl",
                 '"step": 3', ROOT)
    _train(cfg)
    assert_same_run(tmp_path / "full", tmp_path / "split", 6)
    fa, fb = ([r for r in _records(tmp_path / n) if r.get("final")][-1] for n in ("full", "split"))
    assert fa["batch_shapes_sha256"] == fb["batch_shapes_sha256"]


@pytest.mark.slow
def test_two_ranks_take_the_same_schedule(aspect_shards, tmp_path):
    cmd = two_gloo_ranks(str(ROOT / "train.py"), str(_config(tmp_path, aspect_shards, "ddp", steps=4)), *SMALL)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(tmp_path / "ddp")
    assert recs[0]["world_size"] == 2
    final = [r for r in recs if r.get("final")][0]
    assert len(final["batch_shapes_sha256"]) == 2 and len(set(final["batch_shapes_sha256"])) == 1
    assert len(set(final["param_sha256"])) == 1


@pytest.mark.slow
def test_gradient_caching_of_patch_batches_equals_the_plain_step(aspect_shards, tmp_path):
    """Chunks of a NaFlex batch (each trimmed to its rows' longest image) give the plain step's losses."""
    _train(_config(tmp_path, aspect_shards, "plain", steps=3))
    _train(_config(tmp_path, aspect_shards, "cached", steps=3, grad_cache_chunk=3))
    a = [r["loss"] for r in _records(tmp_path / "plain") if "loss" in r]
    b = [r["loss"] for r in _records(tmp_path / "cached") if "loss" in r]
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 2e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


def test_a_live_teacher_is_refused_with_naflex(aspect_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        load_run_config(None, ["model=tiny-clip", f"data.train={aspect_shards}/train-000000.tar.gz",
                               "data.naflex.max_tokens=1024", "distill.teacher=tiny-clip",
                               f"output_dir={tmp_path / 'run'}"])


def test_an_image_with_a_zero_side_is_skipped_counted_and_named(tmp_path):
    """A PNG declaring a 0-pixel width among good samples: the NaFlex stream skips it with its reason and name, the
    batch fills from the next samples; the transform called directly names the problem."""
    import struct
    import zlib

    from conftest import colour_samples, write_tar

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    empty = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0))
             + chunk(b"IDAT", zlib.compress(b"\x00" * 5)) + chunk(b"IEND", b""))
    samples = colour_samples(6)
    samples.insert(2, ("zero-width", {"png": empty, "txt": b"nothing"}))
    url = str(write_tar(tmp_path / "train-000000.tar", samples))
    cfg = get_preset("tiny-clip")
    decoder = SampleDecoder(image_transform(cfg, train=True, seq_len=16), image_keys=["jpg", "png"])
    stream = ShardStream([url], decoder, Collate(), 4, train=True, budget=TokenBudget((16,), 64))
    batch = next(iter(stream))
    assert len(batch["keys"]) == 4 and "zero-width" not in batch["keys"]
    assert batch["meta"]["skipped"] == {"undecodable image": 1}
    assert any("zero-width" in line for line in batch["meta"]["bad"])
    with pytest.raises(ValueError, match="0x5 pixels has no area"):
        image_transform(cfg, seq_len=16)(Image.new("RGB", (0, 5)))
