"""What the notebooks share: where they work, the built-in data set, and the small CoCa model that notebook 01
trains and 02-04 and 08 reuse (each trains it first if it is not there yet, so any notebook runs on its own); the built-in
scenes (boxes, referring expressions, shape maps) of notebook 07.

Environment:
  MM_NOTEBOOK_DIR    working folder (default: runs/notebooks in the repository)
  MM_NOTEBOOK_QUICK  1: tiny settings, seconds per notebook (the test suite); the numbers are then near chance
"""
from __future__ import annotations

import json
import os
import shlex
import warnings
from pathlib import Path
from typing import Any

import matplotlib

import mm.cli

# small PNGs: the notebooks are stored with their figures (make notebooks), read on code hosts
matplotlib.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72})
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in a kernel without ipywidgets
warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # emoji in an untrained model's captions

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("MM_NOTEBOOK_DIR") or REPO / "runs" / "notebooks").resolve()
QUICK = os.environ.get("MM_NOTEBOOK_QUICK", "") not in ("", "0")
DATA = WORK / "data"  # the built-in shapes set (mm shards builtin)
COCA_RUN = WORK / "coca"  # notebook 01's run; its final/ is the model of 02-04 and 08

SCENES = WORK / "scenes"  # the built-in scenes (mm shards builtin --scenes): notebook 07

# (quick, full): data set size and the CoCa run
N_TRAIN, N_TEST, PER_SHARD = (1000, 200, 250) if QUICK else (20000, 2000, 1000)  # full: `make run`'s set
# the scenes: full is data/siglip2.yaml's set (mm shards builtin data/scenes --scenes)
N_SCENES_TRAIN, N_SCENES_TEST, SCENES_PER_SHARD = (600, 100, 300) if QUICK else (20000, 2000, 1000)


def mm_cli(*args: Any) -> None:
    """Run an ``mm`` command in this process, as ``mm ARGS`` would in a shell (its output shows below the
    cell); raise if it fails."""
    args = [str(a) for a in args]
    print("$ mm " + " ".join(shlex.quote(a) for a in args), flush=True)
    code = mm.cli.main(args)
    if code:
        raise RuntimeError(f"mm {args[0]} failed with exit code {code}")


def train_shards() -> str:
    return f"{DATA}/train-{{000000..{N_TRAIN // PER_SHARD - 1:06d}}}.tar.gz"


def test_shard() -> str:
    return f"{DATA}/test-000000.tar.gz"


def test_shards() -> str:
    """Every held-out shard (the zero-shot evaluation's)."""
    return f"{DATA}/test-{{000000..{max(N_TEST // PER_SHARD, 1) - 1:06d}}}.tar.gz"


def builtin_data() -> Path:
    """The built-in data set in WORK/data, drawn on first use."""
    if not (DATA / "info.json").is_file():
        mm_cli("shards", "builtin", DATA, "--n-train", N_TRAIN, "--n-test", N_TEST, "--samples-per-shard", PER_SHARD)
    return DATA


def classes() -> list[str]:
    return json.loads((builtin_data() / "info.json").read_text())["classes"]


def coca_train_args() -> list[str]:
    """The ``mm train`` command line of notebook 01: ``make run``'s recipe (data/builtin.yaml) on this folder's
    copy of the built-in set, evaluated as it goes; quick mode: a dozen small steps."""
    args = ["train", REPO / "data" / "builtin.yaml", f"data.train={train_shards()}",
            f"eval.zeroshot.shards={test_shards()}", f"eval.captioning.shards={test_shard()}",
            f"output_dir={COCA_RUN}"]
    if QUICK:
        args += ["data.batch_size=16", "data.workers=1", "data.shuffle_buffer=500", "train.steps=12",
                 "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=0", "eval.every=6",
                 "eval.every_max_samples=50", "eval.zeroshot.max_samples=100", "eval.captioning.max_samples=8",
                 "eval.captioning.show=3", "eval.captioning.generation.num_beams=2"]
    return [str(a) for a in args]


def trained_coca() -> Path:
    """notebook 01's model directory (COCA_RUN/final), trained first if missing."""
    if not (COCA_RUN / "final" / "config.json").is_file():
        builtin_data()
        mm_cli(*coca_train_args())
    return COCA_RUN / "final"


def samples(shard: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of a shard as {"key", "image" (PIL), "caption", "label"}."""
    from mm.data.decode import decode_image
    from mm.data.wds import iter_shard

    out = []
    for s in iter_shard(shard, warn=print):
        out.append({"key": s["__key__"], "image": decode_image(s["jpg"], 10**8), "caption": s["txt"].decode(),
                    "label": int(s["cls"])})
        if len(out) == n:
            break
    return out


def scenes_data() -> Path:
    """The built-in scenes in WORK/scenes, drawn on first use."""
    if not (SCENES / "info.json").is_file():
        mm_cli("shards", "builtin", SCENES, "--scenes", "--n-train", N_SCENES_TRAIN, "--n-test", N_SCENES_TEST,
               "--samples-per-shard", SCENES_PER_SHARD)
    return SCENES


def scenes_train_shards() -> str:
    return f"{SCENES}/train-{{000000..{N_SCENES_TRAIN // SCENES_PER_SHARD - 1:06d}}}.tar.gz"


def scenes_test_shard() -> str:
    return f"{SCENES}/test-000000.tar.gz"


def scenes_test_shards() -> str:
    """Every held-out shard of the scenes."""
    return f"{SCENES}/test-{{000000..{max(N_SCENES_TEST // SCENES_PER_SHARD, 1) - 1:06d}}}.tar.gz"


def scene_samples(shard: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` scenes of a shard as {"key", "image" (PIL), "caption", "label", "info" (the json: objects,
    regions, captions), "seg" (the shape map, a (H, W) uint8 array: 0 = background, k = ``seg_classes[k]``)}."""
    import io

    import numpy as np
    from PIL import Image

    from mm.data.decode import decode_image
    from mm.data.wds import iter_shard

    out = []
    for s in iter_shard(shard, warn=print):
        out.append({"key": s["__key__"], "image": decode_image(s["jpg"], 10**8), "caption": s["txt"].decode(),
                    "label": int(s["cls"]), "info": json.loads(s["json"]),
                    "seg": np.asarray(Image.open(io.BytesIO(s["seg.png"])))})
        if len(out) == n:
            break
    return out
