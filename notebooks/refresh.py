"""Execute every notebook in full mode, as a user runs it, and store it with its outputs (``make notebooks``).

    python notebooks/refresh.py                 # all, in order (01 trains the model 02-04 and 08 use)
    python notebooks/refresh.py 03_captioning   # one (its model is trained first if missing)

Each notebook runs through ``jupyter nbconvert --to notebook --execute --inplace`` (full settings: no
``MM_NOTEBOOK_QUICK``) in ``runs/notebooks`` (``MM_NOTEBOOK_DIR``), then gets a stamp in its metadata (``mm``:
mode, the date, mm's version and git commit, and the SHA-256 of its code cells' sources): the test suite checks
that every stored notebook has outputs from a full run of the code it shows (a cell edited after the run
changes the hash). Figures are small PNGs (``common.py`` sets matplotlib's dpi).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sources_sha256(nb: dict) -> str:
    """The hash of a notebook's code: every code cell's source, in order."""
    h = hashlib.sha256()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = cell["source"]
            h.update(("".join(src) if isinstance(src, list) else src).encode() + b"\0")
    return h.hexdigest()


def stamp(path: Path, seconds: float) -> None:
    nb = json.loads(path.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    import mm

    nb["metadata"]["mm"] = {"mode": "full", "date": datetime.date.today().isoformat(), "mm_version": mm.__version__,
                            "commit": commit.stdout.strip() or None, "seconds": round(seconds),
                            "sources_sha256": sources_sha256(nb)}
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = p.parse_args()
    paths = sorted(HERE.glob("*.ipynb"))
    if args.names:
        paths = [q for q in paths if q.stem in args.names or q.name in args.names]
    env = {k: v for k, v in os.environ.items() if k != "MM_NOTEBOOK_QUICK"}
    work = Path(env.get("MM_NOTEBOOK_DIR") or HERE.parent / "runs" / "notebooks")
    if not args.names and work.exists():  # all of them: from a clean folder, so 01 trains the current recipe
        shutil.rmtree(work)
    for path in paths:
        t0 = time.time()
        print(f"executing {path.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                        "--ExecutePreprocessor.timeout=3600", str(path)], cwd=HERE, env=env, check=True)
        stamp(path, time.time() - t0)
        print(f"  {path.name}: {time.time() - t0:.0f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
