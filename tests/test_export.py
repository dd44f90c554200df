"""mm export: the exported image and text encoders (CLIP and CoCa) reproduce the eager embeddings at any batch
size, and export.json names inputs that the exported files really take."""
from __future__ import annotations

import json

import pytest
import torch

import mm
from mm.cli import main
from mm.inference.export import (
    ExportError,
    example_inputs,
    export_model,
    load_exported,
    run_exported,
)


def eager(model, tower: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(x, normalize=True) if tower == "image" else model.encode_text(x, normalize=True)


def runtime_for(to: str) -> None:
    if to == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install 'mm[export]')")
        pytest.importorskip("onnxruntime", reason="verifying ONNX files needs onnxruntime (pip install 'mm[export]')")


@pytest.fixture(scope="module")
def models():
    """tiny-clip and tiny-coca made shallower (export time grows with the graph; the layers are all alike)."""
    torch.manual_seed(0)
    shallow = {"vision__transformer__depth": 2, "text__transformer__depth": 2}
    return {"tiny-clip": mm.create_model("tiny-clip", **shallow).eval(),
            "tiny-coca": mm.create_model("tiny-coca", **shallow, decoder__transformer__depth=1).eval()}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(name, format, towers) -> (directory, manifest), each exported once per module."""
    done = {}

    def get(name: str, to: str, towers: tuple[str, ...]):
        if (name, to, towers) not in done:
            out = tmp_path_factory.mktemp(f"{name}-{to}")
            done[name, to, towers] = out, export_model(models[name], out, to, towers=towers, model_spec=name)
        return done[name, to, towers]
    return get


@pytest.mark.parametrize("name, to, towers", [
    ("tiny-clip", "torch-export", ("image", "text")),
    ("tiny-coca", "torch-export", ("image", "text")),
    ("tiny-clip", "onnx", ("image", "text")),
    ("tiny-coca", "onnx", ("image",)),
])
def test_exported_encoders_reproduce_eager_embeddings(models, exported, name, to, towers):
    runtime_for(to)
    model = models[name]
    out, manifest = exported(name, to, towers)
    for tower in towers:
        key = f"{tower}_encoder"
        run = load_exported(out / manifest[key]["file"])
        for batch, seed in ((1, 5), (4, 6)):  # neither is the traced batch size (2)
            x = example_inputs(model, tower, batch, seed=seed)
            got, want = run(x), eager(model, tower, x)
            assert got.shape == want.shape == (batch, model.config.embed_dim)
            assert (got - want).abs().max().item() <= 1e-4, (name, to, tower, batch)
        assert "max abs difference" in manifest["verification"][key]
    saved = json.loads((out / "export.json").read_text())
    assert saved == manifest
    size, ctx = model.config.vision.image_size, model.config.text.context_length
    assert saved["image_encoder"]["inputs"][0]["shape"] == ["batch", 3, size, size]
    if "text" in towers:
        assert saved["text_encoder"]["inputs"][0]["shape"] == ["batch", ctx]
        assert saved["text_encoder"]["tokenizer"]["context_length"] == ctx
        assert f"context length {ctx}" in (out / "README.md").read_text()


def test_onnx_files_declare_the_manifests_inputs_and_outputs(exported):
    runtime_for("onnx")
    import onnxruntime as ort

    out, manifest = exported("tiny-clip", "onnx", ("image", "text"))
    onnx_type = {"float32": "tensor(float)", "int64": "tensor(int64)"}
    for key in ("image_encoder", "text_encoder"):
        sess = ort.InferenceSession(str(out / manifest[key]["file"]), providers=["CPUExecutionProvider"])
        (i,), (o,) = sess.get_inputs(), sess.get_outputs()
        want_i, want_o = manifest[key]["inputs"][0], manifest[key]["outputs"][0]
        assert (i.name, o.name) == (want_i["name"], want_o["name"])
        assert i.shape[1:] == want_i["shape"][1:] and isinstance(i.shape[0], str)  # dynamic batch
        assert i.type == onnx_type[want_i["dtype"]] and o.type == onnx_type[want_o["dtype"]]
        assert o.shape[1:] == want_o["shape"][1:]


def test_cli_exports_a_model_directory_and_checks_its_arguments(model_dir, model, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "--model", str(model_dir), "--to", "torch-export", "--out", str(out),
                 "--towers", "text", "--no-normalize"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert "image_encoder" not in manifest and manifest["normalized"] is False
    tokens = mm.get_tokenizer(model)(["a red square", "two blue circles on a table"])
    with torch.no_grad():
        want = model.encode_text(tokens)
    assert torch.allclose(run_exported(out / "text_encoder.pt2", tokens), want, atol=1e-4)
    assert "max abs difference" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--to", "torch-export", "--out", str(out),
                 "--towers", "audio"]) == 2
    assert "--towers must be some of image,text" in capsys.readouterr().err


def test_a_failed_verification_and_a_quantized_model_are_errors(models, tmp_path, monkeypatch):
    import mm.inference.export as ex

    model = models["tiny-clip"]
    real = ex.run_exported
    monkeypatch.setattr(ex, "run_exported", lambda path, x: real(path, x) + 1e-3)  # a runtime that is off
    with pytest.raises(ExportError, match="differ from the eager model"):
        export_model(model, tmp_path / "a", "torch-export", towers=("text",))
    monkeypatch.undo()
    with pytest.raises(ExportError, match="quantized"):
        export_model(mm.quantize(model, "int8-weight"), tmp_path / "b", "torch-export")
