"""Export a model's image and text encoders for serving without mm (``mm export``).

Formats: ``onnx`` (torch's dynamo exporter; needs ``onnx`` + ``onnxscript``, verified with ``onnxruntime``
when installed: ``pip install mm[export]``) and ``torch-export`` (``torch.export`` programs saved as
``.pt2``, loaded with ``torch.export.load(path).module()``, no mm needed). Output directory::

    image_encoder.onnx | .pt2   images (batch, 3, S, S) float32, preprocessed -> image_embedding (batch, D)
    text_encoder.onnx | .pt2    tokens (batch, L) int64, CLIP BPE ids          -> text_embedding (batch, D)
    export.json                 inputs, outputs, shapes, dtypes, preprocessing, tokenizer, verification
    README.md                   the same for people

The batch dimension is dynamic; the image size and the text length (the model's context length: pad with
0 after the end token, as the tokenizer does) are fixed. The text encoder takes token ids, not strings:
tokenize with ``mm.get_tokenizer(context_length=L)`` or ``open_clip.tokenize(texts, context_length=L)``
(the same ids). Embeddings are L2-normalised unless ``normalize=False``. Each exported encoder is run on a
batch other than the one it was traced with and compared with the eager model (``atol``, default 1e-4).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..hub.wrapped import refuse_wrapped
from ..tokenizer import get_tokenizer

FORMATS = ("onnx", "torch-export")
TOWERS = ("image", "text")
_SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
_EXAMPLE_TEXTS = ["a photo of a cat", "a diagram of a small red bicycle leaning on a wall", "x"]


class ExportError(RuntimeError):
    """A model or format that cannot be exported, a missing optional package, or a failed verification."""


class ImageEncoder(nn.Module):
    """images (B, 3, S, S) -> (B, embed_dim): what is exported as the image encoder."""

    def __init__(self, model: nn.Module, normalize: bool = True):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=self.normalize)


class TextEncoder(nn.Module):
    """tokens (B, L) int64 -> (B, embed_dim): what is exported as the text encoder."""

    def __init__(self, model: nn.Module, normalize: bool = True):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=self.normalize)


def example_inputs(model: nn.Module, tower: str, batch: int, seed: int = 0) -> torch.Tensor:
    """A batch for ``tower``: standard-normal images (preprocessed pixels are about that), or real token ids."""
    if tower == "image":
        s = model.config.vision.image_size
        return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))
    texts = [_EXAMPLE_TEXTS[(i + seed) % len(_EXAMPLE_TEXTS)] for i in range(batch)]
    return get_tokenizer(model)(texts)


def require_packages(*modules: str, what: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{what} needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                          "(or pip install 'mm[export]')")


def _export_one(wrapper: nn.Module, x: torch.Tensor, name: str, out_name: str, path: Path, to: str,
                opset: int | None) -> None:
    from torch.export import Dim

    dynamic = {name: {0: Dim("batch", min=1)}}
    if to == "torch-export":
        torch.export.save(torch.export.export(wrapper, (x,), dynamic_shapes=dynamic), str(path))
        return
    n_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    torch.onnx.export(wrapper, (x,), str(path), input_names=[name], output_names=[out_name], dynamo=True,
                      dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                      external_data=n_bytes > 1_800_000_000)  # protobuf's 2 GB limit: weights beside it


def load_exported(path: str | Path):
    """An exported encoder file as a function tensor -> tensor: ``.pt2`` through ``torch.export.load``, ``.onnx``
    through an onnxruntime CPU session."""
    path = Path(path)
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)
        return run
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def run_exported(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Run an exported encoder file on ``x`` once (see :func:`load_exported`)."""
    return load_exported(path)(x)


# VisionConfig.resize_mode (open_clip's) -> (resize, crop) as the manifest states them
_RESIZE_MODES = {
    "shortest": ("shortest side to image_size, keeping the aspect ratio", "center, image_size x image_size"),
    "longest": ("longest side to image_size, keeping the aspect ratio",
                ("pad to image_size x image_size with black (0), image centered (odd padding: the extra pixel right / "
                 "bottom)")),
    "squash": ("both sides to image_size (aspect ratio not kept)", "none"),
}


def _preprocess(v: Any) -> dict[str, Any]:
    """The image encoder's preprocessing (``v``: the model's VisionConfig), as export.json states it."""
    resize, crop = _RESIZE_MODES[v.resize_mode]
    return {"image_size": v.image_size, "resize_mode": v.resize_mode, "interpolation": v.interpolation,
            "resize": f"{resize}, {v.interpolation}, antialiased", "crop": crop, "pixels": "RGB scaled to [0, 1]",
            "mean": list(v.image_mean), "std": list(v.image_std),
            "python": f"mm.image_transform(model, train=False), or open_clip's eval preprocess with "
                      f"resize_mode={v.resize_mode!r}, interpolation={v.interpolation!r}, fill_color=0"}


def _manifest(model: nn.Module, to: str, files: dict[str, str], normalize: bool, spec: str | None) -> dict[str, Any]:
    cfg, d = model.config, model.config.embed_dim
    v, t = cfg.vision, cfg.text
    out: dict[str, Any] = {"format": "mm-export", "version": 1, "to": to, "model": spec, "mm_version": __version__,
                           "torch_version": torch.__version__, "embed_dim": d, "normalized": normalize}
    if "image" in files:
        out["image_encoder"] = {
            "file": files["image"],
            "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 3, v.image_size, v.image_size]}],
            "outputs": [{"name": "image_embedding", "dtype": "float32", "shape": ["batch", d]}],
            "preprocess": _preprocess(v),
        }
    if "text" in files:
        out["text_encoder"] = {
            "file": files["text"],
            "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", t.context_length]}],
            "outputs": [{"name": "text_embedding", "dtype": "float32", "shape": ["batch", d]}],
            "tokenizer": {"name": "CLIP BPE (open_clip's bpe_simple_vocab_16e6; lower-cased, ftfy-cleaned)",
                          "context_length": t.context_length, "sot_id": t.sot_id, "eot_id": t.eot_id,
                          "pad_id": t.pad_id, "layout": "[sot, tokens..., eot, pad...], truncated to context_length "
                                                        "with eot kept last",
                          "python": f"mm.get_tokenizer(context_length={t.context_length})(texts) == "
                                    f"open_clip.tokenize(texts, context_length={t.context_length})"},
        }
    return out


def _readme_resize(p: dict[str, Any]) -> str:
    """The resize (and crop or pad) of a manifest's ``preprocess``, in words; manifests written before
    ``resize_mode`` / ``interpolation`` existed were shortest-side bicubic."""
    s, mode, interp = p["image_size"], p.get("resize_mode", "shortest"), p.get("interpolation", "bicubic")
    if mode == "longest":
        return (f"resize the longest side to {s} keeping the aspect ratio ({interp}, antialiased), pad to {s}x{s} "
                f"with black, image centered")
    if mode == "squash":
        return f"resize to {s}x{s} ignoring the aspect ratio ({interp}, antialiased)"
    return f"resize the shortest side to {s} ({interp}, antialiased), center crop {s}x{s}"


def _readme(m: dict[str, Any]) -> str:
    lines = [f"# Exported encoders ({m['to']})", "",
             (f"Model: `{m['model']}`, embedding width {m['embed_dim']}, "
              f"{'L2-normalised' if m['normalized'] else 'raw (not normalised)'} embeddings; exported by mm "
              f"{m['mm_version']} with torch {m['torch_version']}. `export.json` holds the same facts."), ""]
    load = ("onnxruntime.InferenceSession(path).run(None, {{'{name}': x}})[0]" if m["to"] == "onnx"
            else "torch.export.load(path).module()(x)")
    for key in ("image_encoder", "text_encoder"):
        if key not in m:
            continue
        e = m[key]
        i, o = e["inputs"][0], e["outputs"][0]
        lines += [f"## {key.replace('_', ' ')}: `{e['file']}`", "",
                  f"- input `{i['name']}`: {i['dtype']} {i['shape']} (batch is dynamic)",
                  f"- output `{o['name']}`: {o['dtype']} {o['shape']}",
                  f"- run: `{load.format(name=i['name'])}`"]
        if "preprocess" in e:
            p = e["preprocess"]
            lines.append(f"- preprocessing: {_readme_resize(p)}, RGB in [0, 1], subtract mean {p['mean']}, "
                         f"divide by std {p['std']} (`{p['python']}`)")
        if "tokenizer" in e:
            tk = e["tokenizer"]
            lines.append(f"- tokens: {tk['name']}, context length {tk['context_length']}: {tk['layout']}; start id "
                         f"{tk['sot_id']}, end id {tk['eot_id']}, padding id {tk['pad_id']}. The encoder takes ids, "
                         f"not strings: `{tk['python']}`")
        if key in m.get("verification", {}):
            lines += [f"- verified: {m['verification'][key]}"]
        lines.append("")
    return "\n".join(lines)


def export_model(model: nn.Module, out_dir: str | Path, to: str = "onnx", *, towers: tuple[str, ...] = TOWERS,
                 normalize: bool = True, verify: bool = True, atol: float = 1e-4, opset: int | None = None,
                 model_spec: str | None = None) -> dict[str, Any]:
    """Export ``towers`` of ``model`` into ``out_dir`` as ``to`` ("onnx" / "torch-export"); returns the
    manifest written to ``export.json``. With ``verify`` each file is run on a fresh batch of 3 and compared
    with the eager model: a difference above ``atol`` raises ExportError (ONNX files are verified only when
    onnxruntime is installed; the manifest says when they were not)."""
    if to not in FORMATS:
        raise ExportError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ExportError(f"towers must be some of {', '.join(TOWERS)}, got {list(towers)}")
    if to == "onnx":
        require_packages("onnx", "onnxscript", what="ONNX export")
    refuse_wrapped(model, f"export ({to})", ExportError)
    if getattr(model, "quantization", None):
        raise ExportError(f"the model is quantized ({model.quantization}); export the float model and quantize "
                          "with the target runtime's tools")
    model = model.cpu().eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, checks = {}, {}
    for tower in towers:
        wrapper = (ImageEncoder if tower == "image" else TextEncoder)(model, normalize).eval()
        name, out_name = ("images", "image_embedding") if tower == "image" else ("tokens", "text_embedding")
        path = out / f"{tower}_encoder{_SUFFIX[to]}"
        try:
            _export_one(wrapper, example_inputs(model, tower, 2), name, out_name, path, to, opset)
        except ExportError:
            raise
        except Exception as e:  # the exporters raise many types; name the tower
            raise ExportError(f"exporting the {tower} encoder to {to} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        files[tower] = path.name
        if verify:
            checks[f"{tower}_encoder"] = _verify(wrapper, path, tower, model, to, atol)
    manifest = _manifest(model, to, files, normalize, model_spec)
    manifest["verification"] = checks
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    (out / "README.md").write_text(_readme(manifest))
    return manifest


def _verify(wrapper: nn.Module, path: Path, tower: str, model: nn.Module, to: str, atol: float) -> str:
    if to == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return "not verified (onnxruntime is not installed)"
    x = example_inputs(model, tower, 3, seed=1)
    with torch.no_grad():
        want = wrapper(x)
    got = run_exported(path, x)
    diff = (got.float() - want.float()).abs().max().item()
    if not diff <= atol:
        raise ExportError(f"{path.name}: outputs differ from the eager model by {diff:.3g} (> {atol})")
    runtime = "onnxruntime" if to == "onnx" else "torch.export"
    return f"max abs difference {diff:.2e} to the eager model on a batch of 3 ({runtime})"
