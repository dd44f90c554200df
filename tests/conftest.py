"""Shared fixtures: small webdataset shards made on the fly (the suite never reads ../shared)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def colour_image(colour: str, size: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(RGB[colour])[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """samples: [(key, {ext: bytes})] written as KEY.EXT members in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def colour_samples(n: int, start: int = 0, size: int = 40) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for i in range(start, start + n):
        c = COLOURS[i % len(COLOURS)]
        out.append((f"s{i:05d}", {"jpg": jpeg_bytes(colour_image(c, size, seed=i)),
                                  "txt": f"a {c} square number {i}".encode(),
                                  "cls": str(i % len(COLOURS)).encode()}))
    return out


def make_colour_shards(d: Path, shards: int = 3, per_shard: int = 16,
                       templates: tuple[str, ...] = ("a {} square", "a photo of something {}")) -> Path:
    """``shards`` training shards of ``per_shard`` noisy colour squares (captions, labels), a test shard of
    ``per_shard`` more, and info.json with the 4 classes and ``templates``, in directory ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        write_tar(d / f"train-{s:04d}.tar", colour_samples(per_shard, start=per_shard * s))
    write_tar(d / "test-0000.tar", colour_samples(per_shard, start=1000))
    (d / "info.json").write_text(json.dumps({"classes": ["red", "green", "blue", "yellow"],
                                             "templates": list(templates)}))
    return d


@pytest.fixture
def colour_shards(tmp_path):
    """3 shards x 16 samples of noisy colour squares with captions and labels, plus info.json."""
    return make_colour_shards(tmp_path / "shards")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny-clip saved with mm.save_pretrained (what the commands take as --model)."""
    import torch

    import mm

    torch.manual_seed(0)
    return mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def model(model_dir):
    import mm

    return mm.load_pretrained(model_dir).eval()


def write_wds(d: Path, samples: list[dict[str, bytes]], *, shards: int = 2, classes: list[str] | None = None,
              templates: list[str] | None = None, dataset_type: str | None = None, split: str = "test") -> Path:
    """clip_benchmark's layout: split/nshards.txt, split/0.tar.., classnames.txt, templates, dataset_type.txt."""
    (d / split).mkdir(parents=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        write_tar(d / split / f"{s}.tar", [(f"s{i:04d}", m) for i, m in enumerate(samples) if i // per == s])
    (d / split / "nshards.txt").write_text(f"{shards}\n")
    if classes is not None:
        (d / "classnames.txt").write_text("\n".join(classes) + "\n")
    if templates is not None:
        (d / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type is not None:
        (d / "dataset_type.txt").write_text(dataset_type + "\n")
    return d


def sigterm_when(cmd: list[str], log: Path, marker: str, cwd: Path, timeout: float = 300) -> str:
    """Start a training command, send it SIGTERM once ``marker`` appears in its metrics log ``log``, and return its
    output after it exits (it must exit 0, saying it stopped by signal)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.is_file() and marker in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "stopped by signal" in out, out[-3000:]
    return out


def assert_same_run(full: Path, split: Path, steps: int, keys: tuple[str, ...] = ("loss",)) -> None:
    """Two training runs (one uninterrupted, one stopped and resumed) logged the same ``keys`` at steps 1..``steps``
    and ended with the same weights, bit for bit."""
    import json

    import torch
    from safetensors.torch import load_file

    a, b = ({r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
            for run in (full, split))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s][k] == b[s][k] for s in a for k in keys)
    wa, wb = (load_file(str(run / "final" / "model.safetensors")) for run in (full, split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def two_gloo_ranks(*args: str) -> list[str]:
    """``accelerate launch`` of ``args`` (a script and its arguments) as 2 CPU processes on a free loopback port (the
    script builds Accelerator(cpu=True) without CUDA, so --multi_gpu forms two gloo ranks); run with
    CUDA_VISIBLE_DEVICES empty."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), *args]


def mm_in_process(*args: object) -> "subprocess.CompletedProcess[str]":
    """``mm ARGS`` run in this process (``mm.cli.main``: the command's own parser, error guard and exit code), its
    stdout and stderr captured: what a subprocess gives, without a fresh interpreter's seconds of imports."""
    import contextlib
    import io
    import subprocess

    from mm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors exit 2
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([str(a) for a in args], code, out.getvalue(), err.getvalue())
