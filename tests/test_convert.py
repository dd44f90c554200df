"""Checkpoint files in and out: create_model(pretrained=FILE), refusing code-running pickles, `mm convert`
to and from open_clip, and Hugging Face CLIPModel import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mm
from mm.hub.open_clip import open_clip_config

ROOT = Path(__file__).resolve().parents[1]


def perturbed(name: str, seed: int = 0):
    """A random mm model whose every tensor is distinct (so a swapped mapping cannot pass)."""
    torch.manual_seed(seed)
    model = mm.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_create_model_loads_open_clip_and_mm_weights_files(tmp_path, suffix):
    from safetensors.torch import save_file

    model = perturbed("tiny-coca")
    oc_sd = {k: v.contiguous() for k, v in mm.to_open_clip(model).items()}
    mm_sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save = (lambda sd, p: torch.save(sd, p)) if suffix == ".pt" else (lambda sd, p: save_file(sd, str(p)))
    save(oc_sd, tmp_path / f"oc{suffix}")
    save(mm_sd, tmp_path / f"mm{suffix}")
    assert same_weights(mm.create_model("tiny-coca", pretrained=tmp_path / f"oc{suffix}"), model)
    assert same_weights(mm.create_model("tiny-coca", pretrained=tmp_path / f"mm{suffix}"), model)


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path):
    model = perturbed("tiny-clip")
    sd = {f"module.{k}": v for k, v in mm.to_open_clip(model).items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "epoch_3.pt")
    assert same_weights(mm.create_model("tiny-clip", pretrained=tmp_path / "epoch_3.pt"), model)


def test_wrong_weights_file_names_the_offending_tensor(tmp_path):
    torch.save(mm.to_open_clip(perturbed("tiny-clip")), tmp_path / "clip.pt")
    with pytest.raises(mm.PretrainedError, match=r"clip\.pt.*'visual\.conv1\.weight' has shape \(192, 3, 4, 4\), expected \(192, 3, 8, 8\)"):
        mm.create_model("tiny-clip", vision__patch_size=8, pretrained=tmp_path / "clip.pt")


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    sd = mm.to_open_clip(perturbed("tiny-clip"))
    sd["logit_scale"] = _RunsCode(marker)
    torch.save(sd, tmp_path / "evil.pt")
    # the file really is dangerous: an unrestricted load runs the command
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(mm.PretrainedError, match="refused"):
        mm.create_model("tiny-clip", pretrained=tmp_path / "evil.pt")
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "mm.cli", "convert", "--from", str(tmp_path / "evil.pt"),
                           "--model", "tiny-clip", "--to", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def register_open_clip_config(tmp_path: Path, name: str) -> None:
    """Make an mm preset known to open_clip's registry under the same name (for its factory functions)."""
    import open_clip

    d = tmp_path / "oc_configs"
    d.mkdir(exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(open_clip_config(name)))
    open_clip.add_model_config(d)


def test_mm_convert_to_open_clip_gives_the_same_zero_shot_predictions(tmp_path):
    import open_clip
    from PIL import Image

    model = perturbed("tiny-clip", seed=3)
    mm.save_pretrained(model, tmp_path / "mm_model")
    out = tmp_path / "exported.safetensors"
    proc = subprocess.run([sys.executable, "-m", "mm.cli", "convert", "--model", str(tmp_path / "mm_model"),
                           "--to-open-clip", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    register_open_clip_config(tmp_path, "tiny-clip")
    oc, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(out))
    oc.eval()
    tok = mm.get_tokenizer(model)
    classes = ["red square", "green circle", "blue star", "a dog", "a cat"]
    W = mm.zero_shot_classifier(model, tok, classes, ["a photo of a {}."])
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(16)]
    pre = mm.image_transform(model)
    x_mm = torch.stack([pre(im) for im in images])
    x_oc = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        ours = model.encode_image(x_mm, normalize=True) @ W
        text = oc.encode_text(tok([f"a photo of a {c}." for c in classes]), normalize=True)
        theirs = oc.encode_image(x_oc, normalize=True) @ text.T
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_mm_convert_from_an_open_clip_weights_file(tmp_path):
    model = perturbed("tiny-coca", seed=5)
    torch.save(mm.to_open_clip(model), tmp_path / "coca.pt")
    proc = subprocess.run([sys.executable, "-m", "mm.cli", "convert", "--from", str(tmp_path / "coca.pt"),
                           "--model", "tiny-coca", "--to", str(tmp_path / "converted")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert same_weights(mm.load_pretrained(tmp_path / "converted"), model)
    missing = subprocess.run([sys.executable, "-m", "mm.cli", "convert", "--from", str(tmp_path / "coca.pt"),
                              "--to", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and "--model PRESET" in missing.stderr


@pytest.mark.hf
def test_hugging_face_clip_converts_exactly():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (optional: pip install transformers)")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512)
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = mm.from_hf_clip(hf).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in mm.create_model("ViT-B-32-quickgelu").parameters())
    x = torch.randn(2, 3, 224, 224)
    tokens = mm.get_tokenizer(model)(["a photo of a dog", "two cats on a sofa"])
    with torch.no_grad():
        assert (hf.get_image_features(pixel_values=x) - model.encode_image(x)).abs().max() < 1e-5
        assert (hf.get_text_features(input_ids=tokens) - model.encode_text(tokens)).abs().max() < 1e-5


def test_load_model_resolves_every_model_spec(tmp_path):
    model = perturbed("tiny-clip", seed=7)
    mm.save_pretrained(model, tmp_path / "dir")
    torch.save(mm.to_open_clip(model), tmp_path / "oc.pt")
    assert same_weights(mm.load_model(tmp_path / "dir"), model)
    assert same_weights(mm.load_model("tiny-clip", pretrained=tmp_path / "oc.pt"), model)
    from_registry = mm.load_model("open_clip:ViT-B-32")  # open_clip's own config, random weights (no tag)
    assert from_registry.config == mm.get_preset("ViT-B-32") and not from_registry.training
    with pytest.raises(mm.PretrainedError, match="model directory"):
        mm.load_model(tmp_path / "dir", pretrained=tmp_path / "oc.pt")


def test_load_model_messages_name_the_arguments_as_the_caller_does(tmp_path, capsys):
    """load_model's messages name its parameters (``spec`` / ``pretrained`` / ``adapter``), or what ``names`` says
    the caller calls them: a config's keys, a command's options (as the commands pass them)."""
    from mm.cli import main

    d = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "dir")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    with pytest.raises(mm.PretrainedError, match=r"is a model directory and holds its weights; drop pretrained$"):
        mm.load_model(d, pretrained=weights)
    with pytest.raises(mm.PretrainedError, match=r"; drop distill\.teacher_pretrained$"):
        mm.load_model(d, pretrained=weights, names={"pretrained": "distill.teacher_pretrained"})
    mm.load_model("tiny-clip")
    assert "and no pretrained file was given: random weights" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("a dog\n")
    assert main(["embed", "--model", str(d), "--pretrained", str(weights), "--texts", str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "emb")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {d} is a model directory and holds its weights; drop --pretrained"
