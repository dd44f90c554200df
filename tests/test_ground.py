"""LocCa in use (mm/inference/ground.py, mm/eval/grounding.py, `mm ground`, `mm caption --box`): the box geometry of
each eval preprocessing against the pixels it makes, referring decoding against an uncached recomputation, region
captions against generate(prompt=...), referring accuracy against a recomputation, and the commands."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import write_tar
from PIL import Image

import mm
from mm.cli import main as mm_main
from mm.data.locca import DecoderPrompts, LocTokens
from mm.data.regions import dequantize, iou
from mm.data.transforms import EvalTransform
from mm.eval.config import ShardReading
from mm.eval.grounding import referring_accuracy
from mm.inference.generate import generate
from mm.inference.ground import (
    GroundingError,
    Placement,
    box_to_image,
    box_to_input,
    caption_regions,
    ground,
    locate,
    region_in_input,
)

SIZES = [(80, 50), (50, 90), (64, 64), (100, 70), (33, 120)]  # (width, height), mostly not square
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mm.create_model("tiny-siglip2").eval()


@pytest.fixture(scope="module")
def tok(model):
    return mm.get_tokenizer(model)


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [noise(w, h, i) for i, (w, h) in enumerate(SIZES)]


# -- geometry ----------------------------------------------------------------------------------------------------
def white_box_extent(t: EvalTransform, w: int, h: int, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    """Where a white box on a black image lands in ``t``'s output: the bright pixels' extent (x0, y0, x1, y1)."""
    img = Image.new("RGB", (w, h))
    img.paste((255, 255, 255), box)
    x = t(img)[0] * STD[0] + MEAN[0]  # back to [0, 1]
    ys, xs = torch.nonzero(x > 0.5, as_tuple=True)
    return (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_box_geometry_follows_the_eval_preprocessing_and_inverts_exactly(mode):
    t = EvalTransform(64, MEAN, STD, resize_mode=mode, interpolation="bilinear")
    for w, h in [(80, 50), (50, 90), (120, 40), (64, 64), (30, 20)]:
        place = Placement.of(t, w, h)
        # the map puts a box where the preprocessing puts its pixels (within the resampling's blur)
        box = (round(w * 0.3), round(h * 0.35), round(w * 0.7), round(h * 0.6))
        np.testing.assert_allclose(place.to_input(box), white_box_extent(t, w, h, box), atol=1.01,
                                   err_msg=f"{mode} {w}x{h}")
        # image -> input -> image is exact for a box inside what the model sees...
        v0, v1, v2, v3 = place.to_image((0, 0, 64, 64))
        seen = (v0 + 0.3 * (v2 - v0), v1 + 0.2 * (v3 - v1), v0 + 0.9 * (v2 - v0), v1 + 0.6 * (v3 - v1))
        assert place.to_image(place.to_input(seen)) == pytest.approx(seen, abs=1e-9)
        # ...and input -> image -> input for a box inside the image's part of the input
        inside = place.to_input((0, 0, w, h))
        x0, y0, x1, y1 = inside
        sub = (x0 + 0.25 * (x1 - x0), y0 + 0.1 * (y1 - y0), x0 + 0.8 * (x1 - x0), y0 + 0.9 * (y1 - y0))
        assert place.to_input(place.to_image(sub)) == pytest.approx(sub, abs=1e-9)
        assert box_to_input(t, box, w, h) == place.to_input(box) and box_to_image(t, sub, w, h) == place.to_image(sub)
        # the whole image: the whole input (shortest, squash); a centred band of it (longest pads)
        if mode == "longest":
            assert (x1 - x0 == 64 or y1 - y0 == 64) and min(x0, y0) >= 0 and max(x1, y1) <= 64
        else:
            assert inside == (0, 0, 64, 64)
    # shortest crops the long side: a box wholly in the cut-off part is clipped to nothing, and refused
    t = EvalTransform(64, MEAN, STD, resize_mode="shortest")
    assert Placement.of(t, 128, 64).to_input((0, 0, 20, 64))[2] == 0
    with pytest.raises(GroundingError, match="crops off"):
        region_in_input(t, (0, 0, 20, 64), 128, 64)


# -- referring ---------------------------------------------------------------------------------------------------
EXPRESSIONS = ["x", "the red circle", "a small blue square on the left side of the picture", "it", "the big one"]


def uncached_boxes(model, tok, images, expressions):
    """Independent of mm.inference.ground's decoding: the whole prefix fed each step, no cache, argmax over the
    box ids; one image at a time."""
    loc = LocTokens.of(model.config)
    prompts = DecoderPrompts(tok, loc, model.config.text.context_length)
    pre = mm.image_transform(model, train=False)
    out = []
    with torch.no_grad():
        for img, text in zip(images, expressions):
            image_tokens = model.image_tokens(pre(img)[None])
            tokens = torch.tensor([prompts.referring_prompt(text)])
            logps = []
            for _ in range(4):
                logits = model.next_token_logits(tokens, image_tokens)[:, -1]
                box_logits = logits[:, loc.base:loc.base + loc.bins]
                logps.append(float(box_logits.log_softmax(-1).max()))
                tokens = torch.cat([tokens, box_logits.argmax(-1, keepdim=True) + loc.base], 1)
            ids = tokens[0, -4:].tolist()
            x0, y0, x1, y1 = dequantize([i - loc.base for i in ids], 64, 64, loc.bins)
            box = Placement.of(model, *img.size).to_image((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
            out.append((tuple(ids), box, sum(logps) / 4))
    return out


def test_ground_equals_an_uncached_recomputation(model, tok, images):
    found = locate(model, tok, images, EXPRESSIONS)
    want = uncached_boxes(model, tok, images, EXPRESSIONS)
    assert [f.tokens for f in found] == [w[0] for w in want]
    for f, (_, box, score) in zip(found, want):
        assert f.box == pytest.approx(box, abs=1e-6)
        assert f.score == pytest.approx(score, abs=1e-4)
    assert ground(model, tok, images, EXPRESSIONS) == [f.box for f in found]
    assert len({f.tokens for f in found}) > 1  # the images and prompts do tell the boxes apart


def test_batches_of_mixed_prompt_lengths_equal_one_by_one(model, tok, images):
    lengths = {len(DecoderPrompts(tok, LocTokens.of(model.config), 32).referring_prompt(e)) for e in EXPRESSIONS}
    assert len(lengths) >= 3
    alone = [locate(model, tok, [img], [e])[0] for img, e in zip(images, EXPRESSIONS)]
    for batch_size in (5, 2):
        together = locate(model, tok, images, EXPRESSIONS, batch_size=batch_size)
        assert [t.tokens for t in together] == [a.tokens for a in alone]
        np.testing.assert_allclose([t.box for t in together], [a.box for a in alone], atol=1e-6)
    # a preprocessed tensor: boxes in its pixels, or in the originals' with their sizes
    pre = mm.image_transform(model, train=False)
    x = torch.stack([pre(img) for img in images])
    sized = locate(model, tok, x, EXPRESSIONS, sizes=[img.size for img in images])
    np.testing.assert_allclose([s.box for s in sized], [a.box for a in alone], atol=1e-6)
    raw = locate(model, tok, x, EXPRESSIONS)
    loc = LocTokens.of(model.config)
    for r in raw:
        d = loc.decode(r.tokens, 64, 64)
        assert r.box == pytest.approx((min(d[0], d[2]), min(d[1], d[3]), max(d[0], d[2]), max(d[1], d[3])))


def test_only_box_tokens_are_decoded_and_boxes_lie_in_the_image(tok, images, tmp_path):
    # a model whose head would rather end the text or write words: the box tokens are written all the same
    torch.manual_seed(1)
    m = mm.create_model("tiny-siglip2").eval()
    loc = LocTokens.of(m.config)
    head = m.decoder.head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[m.config.text.eot_id] = 50.0
        biased.bias[: loc.base] += 20.0
    m.decoder.head = biased
    for f, img in zip(locate(m, tok, images, EXPRESSIONS), images):
        assert all(loc.base <= t < loc.base + loc.bins for t in f.tokens), f.tokens
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 <= x1 <= img.width and 0 <= y0 <= y1 <= img.height, (f.box, img.size)
        assert f.score <= 0
    # a longest-side model pads: a box in the padding comes back clipped to the image
    padded = mm.create_model("tiny-siglip2", vision__resize_mode="longest").eval()
    for f, img in zip(locate(padded, tok, images, EXPRESSIONS), images):
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 <= x1 <= img.width and 0 <= y0 <= y1 <= img.height, (f.box, img.size)
    # files work as PIL images do
    img = images[0]
    img.save(tmp_path / "a.png")
    assert ground(m, tok, [tmp_path / "a.png"], "x") == ground(m, tok, [img], ["x"])


def test_models_without_box_tokens_and_bad_inputs_fail_clearly(model, tok, images):
    for name in ("tiny-coca", "tiny-clip"):
        with pytest.raises(GroundingError, match="decoder.loc_bins"):
            ground(mm.create_model(name), tok, images[:1], ["x"])
        with pytest.raises(GroundingError, match="decoder.loc_bins"):
            caption_regions(mm.create_model(name), tok, images[:1], [(0, 0, 5, 5)])
    with pytest.raises(GroundingError, match="2 expressions for 1 images"):
        ground(model, tok, images[:1], ["a", "b"])
    with pytest.raises(GroundingError, match="expression 0: empty"):
        ground(model, tok, images[:1], [" "])
    with pytest.raises(GroundingError, match="box 1: needs x0 < x1"):
        caption_regions(model, tok, images[:2], [(20, 5, 40, 30), (5, 0, 1, 5)])
    with pytest.raises(GroundingError, match="box 0: .* outside the 80x50 image"):
        caption_regions(model, tok, images[:1], [(0, 0, 81, 5)])


# -- region captions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [{"method": "greedy", "max_new_tokens": 8},
                                      {"method": "beam", "num_beams": 3, "max_new_tokens": 6}])
def test_caption_regions_equals_generate_with_the_grounded_prompt(model, tok, images, settings):
    boxes = [(5, 5, 40, 30), (10, 20, 45, 80), (0, 0, 64, 64), (50, 10, 100, 70), (2, 30, 30, 100)]
    got = caption_regions(model, tok, images, boxes, batch_size=4, **settings)
    loc = LocTokens.of(model.config)
    prompts = DecoderPrompts(tok, loc, model.config.text.context_length)
    pre = mm.image_transform(model, train=False)
    x = torch.stack([pre(img) for img in images])
    prompt = torch.tensor([prompts.grounded_prompt(box_to_input(model, b, *img.size), 64, 64)
                           for b, img in zip(boxes, images)])
    ids = generate(model, x, prompt=prompt, **settings)
    assert torch.equal(ids[:, : prompt.shape[1]], prompt)
    new = ids[:, prompt.shape[1]:]
    assert not ((new >= loc.base) & (new < loc.base + loc.bins)).any()  # no box token in a caption
    eot = model.config.text.eot_id
    want = [tok.decode(r[: r.index(eot)] if eot in r else r) for r in new.tolist()]
    assert got == want and any(got)
    # boxes differ: so do the prompts (and, here, the captions)
    other = caption_regions(model, tok, images[:1], [(40, 25, 80, 50)], **settings)
    assert prompts.grounded_prompt(box_to_input(model, (40, 25, 80, 50), 80, 50), 64, 64) != prompt[0].tolist()
    assert isinstance(other[0], str)


# -- referring accuracy ------------------------------------------------------------------------------------------
def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_referring_accuracy_equals_a_recomputation_from_ground_and_iou(model, tok, images, tmp_path):
    # regions near what the model finds (some IoU > 0.5), others elsewhere; one bad region, one sample without any
    captions = ["x", "the red circle", "it", "the big one", "x"]
    predicted = ground(model, tok, images, captions)
    samples, expected = [], []
    for i, (img, cap, p) in enumerate(zip(images, captions, predicted)):
        w, h = img.size
        near = [max(p[0] - 1, 0), max(p[1] - 1, 0), min(p[2] + 1 + i, w), min(p[3] + 2, h)]
        far = [0, 0, w / 3, h / 4]
        regions = [{"box": near, "caption": cap}, {"box": far, "caption": "x"}]
        if i == 1:
            regions.append({"box": [30, 10, 5, 40], "caption": "backwards"})  # x1 < x0: counted, skipped
        members = {"png": png(img), "json": json.dumps({"regions": regions}).encode()}
        samples.append((f"s{i:03d}", members))
        expected += [(img, r["caption"], tuple(r["box"])) for r in regions[:2]]
    samples.append(("nojson", {"png": png(images[0])}))
    samples.append(("empty", {"png": png(images[1]), "json": b'{"captions": ["a"]}'}))
    write_tar(tmp_path / "regions-0000.tar", samples[:4])
    write_tar(tmp_path / "regions-0001.tar", samples[4:])
    got = referring_accuracy(model, tok, str(tmp_path / "regions-{0000..0001}.tar"), batch_size=3,
                             reading=ShardReading(workers=0))
    found = ground(model, tok, [img for img, _, _ in expected], [cap for _, cap, _ in expected])
    want = [iou(b, t) for b, (_, _, t) in zip(found, expected)]
    assert got["regions"] == len(expected) == 10 and got["bad_regions"] == 1
    assert got["referring_miou"] == pytest.approx(sum(want) / len(want), abs=1e-9)
    assert got["referring_acc"] == pytest.approx(sum(v > 0.5 for v in want) / len(want))
    assert 0 < got["referring_acc"] < 1
    strict = referring_accuracy(model, tok, str(tmp_path / "regions-0000.tar"), max_samples=2, threshold=0.0,
                                reading=ShardReading(workers=0))
    assert strict["regions"] == 4 and strict["referring_acc"] == pytest.approx(sum(v > 0 for v in want[:4]) / 4)
    with pytest.raises(GroundingError, match="decoder.loc_bins"):
        referring_accuracy(mm.create_model("tiny-coca"), tok, str(tmp_path / "regions-0000.tar"))


# -- the commands ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ground")
    torch.manual_seed(0)
    return mm.save_pretrained(model, d / "siglip2"), mm.save_pretrained(mm.create_model("tiny-coca"), d / "coca")


def test_mm_ground_prints_writes_json_and_plots(model, tok, images, model_dirs, tmp_path, capsys):
    paths = []
    for i, img in enumerate(images[:3]):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out, plot = tmp_path / "boxes.json", tmp_path / "boxes.png"
    args = ["ground", "--model", str(model_dirs[0]), "--device", "cpu", *map(str, paths), str(tmp_path / "broken.png")]
    texts = ["x", "the red circle", "it", "one more"]
    assert mm_main([*args, *sum((["--text", t] for t in texts), []), "--out", str(out), "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    want = locate(model, tok, images[:3], texts[:3])
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert [line.split("\t")[3] for line in lines] == texts[:3]
    results = json.loads(out.read_text())["results"]
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for r, w, img in zip(results, want, images):
        assert r["box"] == pytest.approx(list(w.box), abs=0.006) and r["score"] == pytest.approx(w.score, abs=1e-5)
        assert (r["width"], r["height"]) == img.size
    assert "broken.png" in captured.err and "1 of 4 images could not be read" in captured.err
    assert Image.open(plot).size[0] > 100
    # one text for every image
    assert mm_main(["ground", "--model", str(model_dirs[0]), "--text", "it", *map(str, paths[:2])]) == 0
    assert [line.split("\t")[3] for line in capsys.readouterr().out.strip().splitlines()] == ["it", "it"]
    # refusals: one line, exit 2
    for argv, needle in [(["--model", str(model_dirs[1]), "--text", "x", str(paths[0])], "decoder.loc_bins"),
                         (["--model", str(model_dirs[0]), "--text", "a", "--text", "b", "--text", "c", str(paths[0])],
                          "--text given 3 times for 1 images"),
                         (["--model", str(model_dirs[0]), "--text", "x", "--out", str(tmp_path / "a.txt"),
                           str(paths[0])], "--out"),
                         (["--model", str(model_dirs[0]), "--text", "x", str(tmp_path / "nope.png")], "nope.png")]:
        assert mm_main(["ground", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err


def test_mm_caption_box_captions_the_region(model, tok, images, model_dirs, tmp_path, capsys):
    paths = []
    for i, img in enumerate(images[:2]):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    plot = tmp_path / "regions.png"
    base = ["caption", "--model", str(model_dirs[0]), "--method", "greedy", "--max-new-tokens", "6", "--json",
            "--device", "cpu"]
    assert mm_main([*base, "--box", "4,6,40,44.5", *map(str, paths), "--plot", str(plot)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    want = caption_regions(model, tok, images[:2], [(4, 6, 40, 44.5)] * 2, method="greedy", max_new_tokens=6)
    assert [r["caption"] for r in rows] == want and [r["box"] for r in rows] == [[4, 6, 40, 44.5]] * 2
    assert [r["image"] for r in rows] == [str(p) for p in paths] and plot.is_file()
    for box, needle in [("4,6,40", "--box '4,6,40': expected x0,y0,x1,y1"), ("4,6,a,9", "--box '4,6,a,9'"),
                        ("40,6,4,44", "--box '40,6,4,44': needs x0 < x1"), ("4,6,40,95", "outside the 80x50 image")]:
        assert mm_main([*base, f"--box={box}", *map(str, paths)]) == 2, box
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, err
    assert mm_main(["caption", "--model", str(model_dirs[1]), "--box", "1,1,9,9", str(paths[0])]) == 2
    assert "decoder.loc_bins" in capsys.readouterr().err
