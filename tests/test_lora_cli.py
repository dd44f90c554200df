"""LoRA adapters through the commands: ``--adapter DIR`` gives exactly the library's adapted model (zeroshot, embed,
search's queries), ``mm merge`` folds an adapter into an ordinary model directory equal to the unmerged model (and
open_clip reads its conversion), an adapter on a base it was not trained on stops with one line naming it, and
``mm finetune --lora`` trains the image encoder's adapters and the head only, saving an adapter that reloads."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, colour_image
from safetensors.torch import load_file

import mm
from mm.cli import main
from mm.data.folder import load_image
from mm.eval.probe import labelled_batches
from mm.eval.zeroshot import zero_shot_classifier
from mm.hub import base_sha256, load_model, save_adapter
from mm.hub.open_clip import open_clip_config
from mm.inference.embed import load_index
from mm.layers.config import LoraConfig
from mm.layers.lora import LoraError, add_lora, is_lora_param
from mm.train.classifier import Classifier, load_classifier, zero_shot_head
from mm.train.finetune import (
    FinetuneConfig,
    add_image_adapters,
    classifier_eval,
    finetune,
    train_batches,
    trainable_names,
)

CLASSES = ["red", "green", "blue", "yellow"]  # colour_shards' info.json
TEMPLATE = "a {} square"
ADAPTER = LoraConfig(rank=4, targets=["*.attn", "*.mlp"])  # both towers: image and text outputs change


def adapted(model_dir: Path, seed: int = 1) -> tuple[torch.nn.Module, str]:
    """The base of model_dir with random non-zero adapters (in memory), and the base's hash."""
    model = mm.load_pretrained(model_dir).eval()
    base_hash = base_sha256(model)
    add_lora(model, ADAPTER)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, base_hash


@pytest.fixture(scope="module")
def lora(model_dir, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """(the adapted model, its adapter saved with save_adapter, base = model_dir)."""
    model, base_hash = adapted(model_dir)
    d = save_adapter(model, tmp_path_factory.mktemp("adapter") / "lora", ADAPTER, base=str(model_dir),
                     base_hash=base_hash)
    return model, d


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "photos"
    root.mkdir()
    for i in range(8):
        colour_image(COLOURS[i % 4], seed=i).save(root / f"{i:02d}.png")
    return root


def image_batch(model, paths: list[Path]) -> torch.Tensor:
    pre = mm.image_transform(model, train=False)
    return torch.stack([pre(load_image(p)) for p in paths])


def random_batch(model, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=g), mm.get_tokenizer(model)(["a red square", "a dog", "blue"][:n])


def embeddings(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- --adapter on the commands ---------------------------------------------------------------------------------
def test_zeroshot_with_adapter_equals_the_adapted_model(model_dir, lora, photos, tmp_path):
    model, adapter = lora
    out = tmp_path / "preds.json"
    assert main(["zeroshot", "--model", str(model_dir), "--adapter", str(adapter), "--classes", ",".join(CLASSES),
                 "--templates", TEMPLATE, "-k", "4", "--workers", "0", "--out", str(out), str(photos)]) == 0
    paths = sorted(photos.glob("*.png"))
    got = json.loads(out.read_text())["predictions"]
    assert [p["image"] for p in got] == [str(p) for p in paths]

    def probs(m) -> torch.Tensor:  # softmax(100 * cosine), as zero-shot classification computes it
        W = zero_shot_classifier(m, mm.get_tokenizer(m), CLASSES, [TEMPLATE])
        with torch.no_grad():
            return (100 * m.encode_image(image_batch(m, paths), normalize=True) @ W).softmax(-1)

    want = probs(model)
    for row, p in zip(got, want):
        assert {t["class"]: t["prob"] for t in row["top"]} == pytest.approx(dict(zip(CLASSES, p.tolist())), abs=1e-5)
    assert (want - probs(mm.load_pretrained(model_dir).eval())).abs().max() > 1e-3  # the adapter mattered


def test_embed_with_adapter_records_it_and_search_reloads_it(model_dir, lora, photos, tmp_path, capsys):
    model, adapter = lora
    out = tmp_path / "emb"
    assert main(["embed", "--model", str(model_dir), "--adapter", str(adapter), "--images", str(photos), "--out",
                 str(out), "--workers", "0", "--batch-size", "3"]) == 0
    assert json.loads((out / "index.json").read_text())["adapter"] == str(adapter.resolve())
    emb, ids = load_index(out)
    with torch.no_grad():
        want = model.encode_image(image_batch(model, [photos / i for i in ids]), normalize=True)
    torch.testing.assert_close(torch.from_numpy(emb), want, rtol=0, atol=1e-5)

    capsys.readouterr()
    assert main(["search", "--index", str(out), "a red square", "-k", "3", "--json"]) == 0  # model from the index
    got = json.loads(capsys.readouterr().out.splitlines()[0])["results"]
    with torch.no_grad():
        q = model.encode_text(mm.get_tokenizer(model)(["a red square"]), normalize=True)[0]
    top = (torch.from_numpy(emb) @ q).topk(3)
    assert [r["id"] for r in got] == [ids[i] for i in top.indices.tolist()]
    assert [r["score"] for r in got] == pytest.approx(top.values.tolist(), abs=1e-5)

    # the same output directory without the adapter: other embeddings, refused before anything is written
    assert main(["embed", "--model", str(model_dir), "--images", str(photos), "--out", str(out), "--workers",
                 "0"]) == 2
    assert "different adapter" in one_error_line(capsys.readouterr().err)


# -- mm merge, and open_clip reading the result ----------------------------------------------------------------
def test_merge_equals_the_unmerged_model_and_is_an_ordinary_model_directory(model_dir, lora, tmp_path, capsys):
    model, adapter = lora
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    printed = capsys.readouterr().out
    diffs = [float(x) for x in re.findall(r"embeddings ([0-9.]+e[-+][0-9]+)", printed)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, printed  # the printed check: image and text
    loaded = mm.load_pretrained(merged).eval()  # an ordinary model directory
    base = mm.load_pretrained(model_dir).eval()
    assert set(loaded.state_dict()) == set(base.state_dict())
    batch = random_batch(model)
    assert max_diff(embeddings(loaded, *batch), embeddings(model, *batch)) < 1e-5
    assert max_diff(embeddings(base, *batch), embeddings(model, *batch)) > 1e-3

    # an adapter directory as --model: the base it records, the same merged weights
    assert main(["merge", "--model", str(adapter), "--out", str(tmp_path / "merged2")]) == 0
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(tmp_path / "merged2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(model_dir)]) == 2
    assert "base model's or the adapter's directory" in one_error_line(capsys.readouterr().err)
    assert main(["merge", "--model", str(model_dir), "--out", str(tmp_path / "m3")]) == 2
    assert "carries no adapter" in one_error_line(capsys.readouterr().err)


def test_open_clip_reads_the_merged_model_and_convert_with_adapter_merges(model_dir, lora, tmp_path):
    import open_clip

    model, adapter = lora
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    f1, f2 = tmp_path / "merged_oc.safetensors", tmp_path / "adapter_oc.safetensors"
    assert main(["convert", "--model", str(merged), "--to-open-clip", str(f1)]) == 0
    assert main(["convert", "--model", str(model_dir), "--adapter", str(adapter), "--to-open-clip", str(f2)]) == 0
    sd, sd2 = load_file(str(f1)), load_file(str(f2))
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    oc = open_clip.CLIP(**open_clip_config("tiny-clip")).eval()
    oc.load_state_dict(sd, strict=True)
    batch = random_batch(model)
    assert max_diff(embeddings(oc, *batch), embeddings(model, *batch)) < 1e-5


# -- adapters on the wrong base --------------------------------------------------------------------------------
def test_adapter_on_another_base_exits_2_with_one_line_naming_the_adapter(model_dir, lora, photos, tmp_path,
                                                                           capsys):
    _, adapter = lora
    torch.manual_seed(5)
    other = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "other")  # same architecture, other weights
    assert main(["zeroshot", "--model", str(other), "--adapter", str(adapter), "--classes", "red,green",
                 "--workers", "0", str(photos)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(adapter) in line and "other base weights" in line

    wider = mm.save_pretrained(mm.create_model("tiny-clip", vision__transformer__width=96), tmp_path / "wider")  # other shapes
    assert main(["embed", "--model", str(wider), "--adapter", str(adapter), "--images", str(photos), "--out",
                 str(tmp_path / "emb"), "--workers", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(adapter) in line and "another architecture" in line
    assert not (tmp_path / "emb").exists()

    # an adapter of layers this base does not have (its hash this base's): the layer is named
    odd = tmp_path / "odd_adapter"
    shutil.copytree(adapter, odd)
    meta = json.loads((odd / "mm_adapter.json").read_text())
    meta["layers"][0] = "vision.transformer.blocks.9.attn.qkv"
    (odd / "mm_adapter.json").write_text(json.dumps(meta))
    assert main(["merge", "--model", str(model_dir), "--adapter", str(odd), "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(odd) in line and "blocks.9.attn.qkv does not exist" in line


# -- mm finetune --lora ----------------------------------------------------------------------------------------
def test_lora_finetune_trains_only_the_image_adapters_and_the_head(model_dir, colour_shards):
    model = mm.load_pretrained(model_dir)
    cfg = FinetuneConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=1, workers=0, shuffle_buffer=8,
                         lora=LoraConfig(rank=4, targets=["vision.attn"]))
    names = add_image_adapters(model, cfg.lora)
    assert names and all(n.startswith("vision.") and n.endswith((".qkv", ".proj")) for n in names)
    clf = Classifier(model, zero_shot_head(model, CLASSES, [TEMPLATE]))
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    trained = trainable_names(clf)
    assert trained == [n for n, _ in clf.named_parameters()
                       if n.startswith("head.") or (n.startswith("model.vision.") and is_lora_param(n))]
    finetune(clf, train_batches(model, [f"{colour_shards}/train-{i:04d}.tar" for i in range(3)], cfg), cfg,
             device=torch.device("cpu"))
    after = clf.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k not in trained)  # the base, bit for bit
    assert all(not torch.equal(after[k], before[k]) for k in trained)  # every adapter factor and the head moved
    assert all(not p.requires_grad for n, p in clf.named_parameters() if n not in trained)  # out of the optimizer

    with pytest.raises(LoraError, match="not in the image encoder"):
        add_image_adapters(mm.load_pretrained(model_dir), LoraConfig(rank=4, targets=["text.attn"]))


def test_lora_finetune_command_saves_an_adapter_that_reloads_and_scales_it_for_wise(model_dir, colour_shards,
                                                                                  tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", str(model_dir), "--train", f"{colour_shards}/train-{{0000..0002}}.tar",
               "--test", f"{colour_shards}/test-0000.tar", "--templates", TEMPLATE, "--lora", "--lora-rank", "4",
               "--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "1", "--workers", "0",
               "--wise-alpha", "0,1", "--save-alpha", "0.5", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ft_dir = out / "finetuned"
    assert not (ft_dir / "model.safetensors").exists()  # the adapters alone, no copy of the base
    tensors = load_file(str(ft_dir / "adapter_model.safetensors"))
    assert tensors and all(is_lora_param(k) and k.startswith("base_model.model.vision.") for k in tensors)
    assert json.loads((ft_dir / "mm_adapter.json").read_text())["base"] == str(model_dir.resolve())

    test = [f"{colour_shards}/test-0000.tar"]
    ft, classes = load_classifier(ft_dir)  # on the base it names, checked
    assert classes == CLASSES
    assert classifier_eval(ft, labelled_batches(ft.model, test), device=torch.device("cpu"))["top1"] == \
        got["wise"][1]["top1"]
    base = mm.load_pretrained(model_dir).eval()
    zs = Classifier(base, zero_shot_head(base, CLASSES, [TEMPLATE]))  # alpha 0: the base's zero-shot classifier
    assert classifier_eval(zs, labelled_batches(base, test), device=torch.device("cpu"))["top1"] == \
        got["wise"][0]["top1"]
    # any command takes the result as a model: its recorded base + the adapter
    assert load_model(ft_dir).state_dict().keys() == ft.model.state_dict().keys()

    # WiSE-FT at 0.5: the same A factors, half of each B (half the update), the head interpolated
    wise = load_file(str(out / "wise-0.5" / "adapter_model.safetensors"))
    assert wise.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(wise[k], torch.lerp(torch.zeros_like(v), v, 0.5) if ".lora_B." in k else v), k
    head, wise_head = load_file(str(ft_dir / "classifier.safetensors")), load_file(str(out / "wise-0.5" /
                                                                                       "classifier.safetensors"))
    zs_head = zs.head.state_dict()
    assert all(torch.equal(wise_head[k], torch.lerp(zs_head[k], head[k], 0.5)) for k in head)

    # --lora on top of an adapter is refused before loading; --lora-* without --lora too
    capsys.readouterr()
    common = ["finetune", "--train", f"{colour_shards}/train-0000.tar", "--test", test[0], "--out", str(tmp_path / "x")]
    assert main([*common, "--model", str(ft_dir), "--lora"]) == 2
    assert "mm merge" in one_error_line(capsys.readouterr().err)
    assert main([*common, "--model", str(model_dir), "--lora-rank", "4"]) == 2
    assert "--lora-rank needs --lora" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


# -- LoRA fine-tuning in two processes ---------------------------------------------------------------------------
FT_STEPS, FT_BATCH = 3, 8
FT_CFG = {"steps": FT_STEPS, "batch_size": FT_BATCH, "lr": 1e-2, "warmup_steps": 1, "workers": 0, "log_every": 1,
          "lora": LoraConfig(rank=4, targets=["vision.attn"])}


def _lora_classifier(model_dir: str) -> Classifier:
    model = mm.load_pretrained(model_dir)
    torch.manual_seed(0)  # the adapters' A factors
    add_image_adapters(model, FT_CFG["lora"])
    return Classifier(model, zero_shot_head(model, CLASSES, [TEMPLATE]))


def _ft_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"images": torch.randn(FT_BATCH, 3, 32, 32, generator=g),
             "labels": torch.randint(0, len(CLASSES), (FT_BATCH,), generator=g)} for _ in range(FT_STEPS)]


def _ft_worker(rank: int, init: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from mm.train.finetune import _ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        clf = _lora_classifier(model_dir)
        half = FT_BATCH // 2
        mine = ({k: v[rank * half:(rank + 1) * half] for k, v in b.items()} for b in _ft_batches())
        finetune(clf, mine, FinetuneConfig(**FT_CFG), device=torch.device("cpu"), wrap=_ddp(torch.device("cpu")))
        torch.save(clf.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_lora_finetune_equals_one_process(model_dir, tmp_path):
    """DDP over 2 gloo processes with the base frozen (only adapters and head require gradients): the ranks stay
    identical, equal one process given the whole batches, and the base is untouched."""
    import torch.multiprocessing as mp

    mp.spawn(_ft_worker, args=(str(tmp_path / "pg"), str(model_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    clf = _lora_classifier(str(model_dir))
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    finetune(clf, iter(_ft_batches()), FinetuneConfig(**FT_CFG), device=torch.device("cpu"))
    one, trained = clf.state_dict(), set(trainable_names(clf))
    for k, v in one.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        if k in trained:  # two reduction orders: a tenth of a step (lr 1e-2) apart at most
            torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-3)
        else:
            assert torch.equal(ranks[0][k], before[k]), k  # the frozen base, bit for bit
    assert max((one[k] - before[k]).abs().max().item() for k in trained) > 2e-2  # it trained
