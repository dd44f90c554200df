"""Pictures the commands draw: `mm search --plot`, `mm caption --plot`, the run's curves; and `mm shards extract`,
which turns shards back into files for the folder commands."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import mm
from mm.cli import main
from mm.data.sources import extract


def _members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_shards_extract_writes_the_stored_bytes_in_shard_order(colour_shards, tmp_path, capsys):
    out = tmp_path / "files"
    assert main(["shards", "extract", f"{colour_shards}/train-{{0000..0002}}.tar", str(out), "-n", "20"]) == 0
    images = sorted(out.glob("*.jpg"))
    assert [p.stem for p in images] == [f"s{i:05d}" for i in range(20)]  # 16 of shard 0, then 4 of shard 1
    first, second = _members(colour_shards / "train-0000.tar"), _members(colour_shards / "train-0001.tar")
    assert (out / "s00003.jpg").read_bytes() == first["s00003.jpg"]
    assert (out / "s00017.txt").read_bytes() == second["s00017.txt"] == b"a green square number 17"
    assert "wrote 20 images" in capsys.readouterr().err
    assert len(extract(str(colour_shards / "test-0000.tar"), tmp_path / "all", verbose=False)) == 16  # no -n: all
    assert main(["shards", "extract", str(colour_shards / "missing.tar"), str(out)]) == 2
    assert "missing.tar" in capsys.readouterr().err
    assert main(["shards", "extract", str(colour_shards / "test-0000.tar"), str(out), "-n", "0"]) == 2


@pytest.fixture
def gallery(colour_shards, tmp_path):
    return extract(str(colour_shards / "test-0000.tar"), tmp_path / "gallery", limit=6, verbose=False)[0].parent


def test_search_plot_finds_the_indexed_images_in_folders_and_shards(model_dir, colour_shards, gallery, tmp_path,
                                                                    capsys):
    from mm.inference.search import result_images

    emb_files, emb_shards = tmp_path / "emb_files", tmp_path / "emb_shards"
    shard = colour_shards / "train-0001.tar"
    assert main(["embed", "--model", str(model_dir), "--images", str(gallery), "--out", str(emb_files),
                 "--workers", "0"]) == 0
    assert main(["embed", "--model", str(model_dir), "--images", str(shard), "--out", str(emb_shards),
                 "--workers", "0"]) == 0
    index = json.loads((emb_files / "index.json").read_text())
    assert index["sources"] == {"roots": [f"{gallery}/"], "shards": []}
    assert json.loads((emb_shards / "index.json").read_text())["sources"] == {"roots": [], "shards": [str(shard)]}

    # ids -> the very images that were embedded
    found = result_images(emb_files, ["s01002.jpg", "s01000.jpg"])
    assert np.array_equal(np.asarray(found["s01002.jpg"]), np.asarray(Image.open(gallery / "s01002.jpg").convert("RGB")))
    found = result_images(emb_shards, ["s00020", "s00031", "nope"])
    expected = Image.open(io.BytesIO(_members(shard)["s00031.jpg"])).convert("RGB")
    assert np.array_equal(np.asarray(found["s00031"]), np.asarray(expected)) and found["nope"] is None

    capsys.readouterr()
    out = tmp_path / "search.png"
    assert main(["search", "--index", str(emb_shards), "a red square", "a blue square", "-k", "3", "--plot",
                 str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    two_rows = Image.open(out)
    assert main(["search", "--index", str(emb_files), "--image", str(gallery / "s01001.jpg"), "-k", "5", "--plot",
                 str(out)]) == 0
    one_row = Image.open(out)
    # one row per query, one column for the query and one per result
    assert two_rows.height > 1.6 * one_row.height and one_row.width / two_rows.width == pytest.approx(6 / 4, rel=0.05)


def test_search_plot_survives_moved_images(model_dir, gallery, tmp_path):
    emb = tmp_path / "emb"
    assert main(["embed", "--model", str(model_dir), "--images", str(gallery), "--out", str(emb), "--workers", "0"]) == 0
    for p in gallery.iterdir():
        p.unlink()
    from mm.inference.search import result_images

    assert set(result_images(emb, ["s01000.jpg"]).values()) == {None}
    assert main(["search", "--index", str(emb), "a red square", "-k", "2", "--plot", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 0


def test_caption_plot_draws_every_image_with_its_caption(gallery, tmp_path, capsys):
    import torch

    torch.manual_seed(0)
    coca = mm.save_pretrained(mm.create_model("tiny-coca"), tmp_path / "coca")
    out = tmp_path / "captions.png"
    assert main(["caption", "--model", str(coca), str(gallery), "--method", "greedy", "--max-new-tokens", "3",
                 "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 6 and f"wrote {out}" in captured.err
    sheet = Image.open(out)
    assert sheet.width > sheet.height  # 6 images, 4 a row: two rows of four columns


def test_plot_run_draws_curves_and_leaves_pyplot_alone(tmp_path):
    import matplotlib

    from mm.train.log import plot_run

    records = [{"step": s, "loss": 5.0 / s, "contrastive_loss": 2.0 / s, "caption_loss": 3.0 / s, "lr": 1e-3}
               for s in range(1, 6)]
    records += [{"step": 5, "zeroshot_top1": 0.2, "zeroshot_top5": 0.6, "caption_bleu4": 0.1, "caption_cider": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = matplotlib.get_backend()
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png", "lr.png", "eval.png", "caption.png"]
    assert all(Image.open(p).size == (600, 350) for p in written)
    assert matplotlib.get_backend() == before  # a notebook's inline backend survives a run in the kernel
