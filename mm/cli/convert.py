"""``mm convert`` (open_clip / Hugging Face checkpoints to mm and back, exactly), ``mm merge`` (a LoRA adapter
folded into its base: an ordinary model directory) and ``mm export`` (the towers to ONNX or torch.export), over
:mod:`mm.hub`, :mod:`mm.layers.lora` and :mod:`mm.inference.export`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..hub import (
    OPEN_CLIP_PREFIX,
    ConversionError,
    PretrainedError,
    from_hf,
    load_model,
    save_pretrained,
    to_hf_clip,
    to_open_clip,
)
from ..hub.adapter import is_adapter_dir, read_adapter_meta
from ..hub.wrapped import is_wrapped
from ..inference.export import (
    FORMATS,
    TOWERS,
    ExportError,
    export_model,
    require_packages,
)
from ..layers.lora import merge_lora
from .common import (
    ADAPTER_HELP,
    EXAMPLES,
    MODEL_ARGS,
    MODEL_ERRORS,
    UsageError,
    add_model_options,
    guard,
)


def _open_clip_state_dict(model: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The open_clip state dict of an mm model (converted) or of an open_clip model mm runs through open_clip (its
    own), and how to load it."""
    if is_wrapped(model):  # the open_clip module itself: its state dict is already open_clip's
        sd = model.model.state_dict()
        name = model.config.name
        how = (f"open_clip.create_model({name!r}, pretrained=FILE)" if name else
               "open_clip.CLIP(**cfg) (CustomTextCLIP / CoCa as the config says), cfg = config.json's "
               "wrapped.open_clip_config")
    else:
        sd = to_open_clip(model)
        how = "open_clip.create_model_and_transforms(NAME, pretrained=FILE)"
    # copies: contiguous, on the CPU, none sharing storage (safetensors refuses shared tensors)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}, how


def _write_open_clip(args: argparse.Namespace) -> int:
    if not args.model or not Path(args.model).is_dir():
        raise UsageError("--to-open-clip needs --model DIR (an mm model directory)")
    # with an adapter (--adapter, or an adapter directory as --model) merged: open_clip reads a plain model
    sd, how = _open_clip_state_dict(merge_lora(load_model(args.model, adapter=args.adapter, names=MODEL_ARGS)))
    out = Path(args.to_open_clip)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out))
    else:
        torch.save(sd, out)
    print(f"wrote {out} ({len(sd)} tensors); load it with {how.replace('FILE', repr(str(out)))}")
    return 0


def _write_hf(args: argparse.Namespace) -> int:
    if not args.model:
        raise UsageError("--to-hf needs --model MODEL (an mm model directory, open_clip:NAME[:TAG], or a preset)")
    # an adapter folded in: a plain CLIPModel
    model = merge_lora(load_model(args.model, adapter=args.adapter, names=MODEL_ARGS))
    if is_wrapped(model):  # the command's way out: open_clip's own weights file
        raise ConversionError("not convertible to a Hugging Face CLIPModel: the model runs through open_clip "
                              "(mm does not build its towers); use --to-open-clip")
    out = to_hf_clip(model, args.to_hf)
    print(f"wrote {out} (a transformers CLIPModel: config.json + model.safetensors); load it with "
          f"transformers.CLIPModel.from_pretrained({str(out)!r})")
    return 0


@guard(ConversionError, PretrainedError, FileNotFoundError, UsageError, ImportError, *MODEL_ERRORS)
def cmd_convert(args: argparse.Namespace) -> int:
    """open_clip / Hugging Face -> mm directory; mm directory -> open_clip weights file or Hugging Face CLIPModel."""
    if args.to_open_clip and args.to_hf:
        raise UsageError("give one of --to-open-clip and --to-hf")
    if args.adapter and not (args.to_open_clip or args.to_hf):
        raise UsageError("--adapter goes with --to-open-clip / --to-hf (to fold an adapter into an mm model "
                         "directory: mm merge)")
    if args.to_open_clip:
        return _write_open_clip(args)
    if args.to_hf:
        return _write_hf(args)
    if not args.source or not args.to:
        raise UsageError("give --from SOURCE --to DIR, or --model DIR with --to-open-clip FILE or --to-hf DIR")
    if args.source.startswith("hf:"):
        model = from_hf(args.source[3:])
    elif args.source.startswith(OPEN_CLIP_PREFIX):
        model = load_model(args.source)
    else:  # a weights file: the architecture comes from --model (a preset name or config file)
        if not args.model:
            raise UsageError("converting a weights file needs --model PRESET (e.g. ViT-B-32)")
        model = load_model(args.model, pretrained=args.source, names={**MODEL_ARGS, "pretrained": "--from"})
    save_pretrained(model, args.to)
    print(f"wrote {args.to} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def add_convert_parser(sub: Any) -> None:
    s = sub.add_parser(
        "convert", help="convert open_clip / Hugging Face checkpoints to mm and back",
        description="Convert weights exactly (tensor for tensor).\n\n"
                    "Hugging Face: --from hf:DIR reads a transformers CLIPModel, SiglipModel or Siglip2Model directory\n"
                    "(Siglip2 at the fixed resolution of its position table); --to-hf writes a CLIPModel directory\n"
                    "for models HF's CLIP can express (errors name the config field it cannot).\n\nexamples:\n"
                    "  mm convert --from open_clip:ViT-B-32:laion2b_s34b_b79k --to models/b32\n"
                    "  mm convert --from open_clip_b32.safetensors --model ViT-B-32 --to models/b32\n"
                    "  mm convert --from hf:/path/to/clip-vit-base-patch32 --to models/hf_b32\n"
                    "  mm convert --from hf:/path/to/siglip-base-patch16-224 --to models/siglip_b16\n"
                    "  mm convert --model runs/b32/final --to-hf exported/b32_hf\n"
                    "  mm convert --model runs/b32/final --to-open-clip b32_open_clip.safetensors\n"
                    "  mm convert --model runs/b32/final --adapter runs/b32_lora/final --to-open-clip b32_lora.pt",
        formatter_class=EXAMPLES)
    s.add_argument("--from", dest="source", help="open_clip:NAME[:TAG], hf:DIR (a transformers CLIP / SigLIP / "
                                                 "SigLIP 2 directory), or an open_clip/mm weights file")
    s.add_argument("--to", help="output mm model directory")
    s.add_argument("--model", help="architecture (preset) for a weights file; the mm directory for --to-open-clip; "
                                    "the model (directory or any --model spec) for --to-hf")
    s.add_argument("--to-open-clip", help="write the open_clip state dict of --model DIR to this file "
                                          "(.safetensors, else torch.save); also for open_clip models mm runs "
                                          "through open_clip")
    s.add_argument("--to-hf", help="write --model as a transformers CLIPModel directory (config.json + "
                                   "model.safetensors) here")
    s.add_argument("--adapter", metavar="DIR", help=f"with --to-open-clip / --to-hf: {ADAPTER_HELP}; merged into "
                                                    "the weights first, so the written model is an ordinary one")
    s.set_defaults(fn=cmd_convert)


@guard(ExportError, *MODEL_ERRORS)
def cmd_export(args: argparse.Namespace) -> int:
    towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
    if any(t not in TOWERS for t in towers) or not towers:
        raise ExportError(f"--towers must be some of {','.join(TOWERS)}, got {args.towers!r}")
    if args.to == "onnx":
        require_packages("onnx", "onnxscript", what="--to onnx")  # before the model loads
    # an adapter is merged first: the exported graphs are those of an ordinary model (no adapter branches)
    model = merge_lora(load_model(args.model, args.pretrained, "cpu", adapter=args.adapter, names=MODEL_ARGS))
    spec = f"{args.model} + adapter {args.adapter} (merged)" if args.adapter else args.model
    manifest = export_model(model, args.out, args.to, towers=towers, normalize=not args.no_normalize,
                            verify=not args.no_verify, atol=args.atol, opset=args.opset, model_spec=spec)
    for key in ("image_encoder", "text_encoder"):
        if key in manifest:
            check = manifest["verification"].get(key, "not verified (--no-verify)")
            print(f"{Path(args.out) / manifest[key]['file']}: {check}", file=sys.stderr)
    print(f"inputs, shapes and tokenizer: {Path(args.out) / 'export.json'}, {Path(args.out) / 'README.md'}",
          file=sys.stderr)
    return 0


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "export", help="export the image and text encoders to ONNX or torch.export",
        description="Export a model's image encoder (preprocessed images -> embeddings) and text encoder (CLIP BPE\n"
                    "token ids -> embeddings) with a dynamic batch dimension, verify them against the eager model,\n"
                    "and write export.json + README.md (inputs, shapes, preprocessing, tokenizer, context length)."
                    "\n\nexamples:\n"
                    "  mm export --model runs/builtin/final --to onnx --out exported/builtin\n"
                    "  mm export --model open_clip:ViT-B-32:laion2b_s34b_b79k --to torch-export --out exported/b32\n"
                    "  mm export --model runs/coca/final --to onnx --towers image --out exported/coca_image",
        formatter_class=EXAMPLES)
    add_model_options(s)
    s.add_argument("--to", required=True, choices=FORMATS, help="onnx (needs onnx + onnxscript) or torch-export (.pt2)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--towers", default="image,text", help="comma-separated: image, text (default: both)")
    s.add_argument("--no-normalize", action="store_true", help="export raw embeddings (default: L2-normalised)")
    s.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    s.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference to the eager model")
    s.add_argument("--no-verify", action="store_true", help="skip running the exported files")
    s.set_defaults(fn=cmd_export)
    return s


# -- mm merge --------------------------------------------------------------------------------------------------
MERGE_DESCRIPTION = """\
Fold a LoRA adapter into its base model's weights and save the result as an ordinary mm model directory
(config.json + model.safetensors): every command, open_clip (mm convert --to-open-clip), Hugging Face
(--to-hf), mm export and int8 quantization then take it as any model, with no adapter code in the way. The
adapter is checked against the base first (its recorded SHA-256 of the base weights, its layers' shapes). The
merged weights are computed in fp32; the command prints the largest difference between the merged and the
unmerged model's image and text embeddings on a small random batch, which shows the merge is exact (float
rounding, ~1e-7).

examples:
  mm merge --model runs/b32/final --adapter runs/b32_lora/final --out models/b32_lora_merged
  mm merge --model runs/b32_lora/final --out models/b32_lora_merged       (the base the adapter records)
  mm merge --model ViT-B-32 --pretrained b32.safetensors --adapter runs/lora/final --out models/merged
  mm convert --model models/b32_lora_merged --to-open-clip b32_lora_open_clip.safetensors"""

MERGE_CHECK_BATCH = 2  # random images and texts the merged model is compared on


def _is_adapter_spec(spec: str) -> bool:
    """``--model`` names an adapter directory (which load_model reads as its recorded base + the adapter)."""
    return is_adapter_dir(spec) and not (Path(spec) / "config.json").is_file()


def _protected_dirs(args: argparse.Namespace) -> set[Path]:
    """Directories ``mm merge --out`` must not overwrite: the base model and the adapter (the adapter's recorded
    hash is of the base's weights as they are)."""
    dirs = [args.model, args.adapter]
    if _is_adapter_spec(args.model):
        dirs.append(read_adapter_meta(args.model).get("base"))
    return {Path(d).resolve() for d in dirs if d and Path(d).is_dir()}


@torch.no_grad()
def _embeddings(model: Any, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images).float(), model.encode_text(tokens).float()


@guard(UsageError, *MODEL_ERRORS)
def cmd_merge(args: argparse.Namespace) -> int:
    """Base + adapter -> merged model directory, with the merged-vs-unmerged difference printed."""
    if args.adapter is None and not _is_adapter_spec(args.model):
        raise UsageError(f"--model {args.model} carries no adapter: give --adapter DIR (or an adapter directory "
                         "as --model)")
    if Path(args.out).resolve() in _protected_dirs(args):
        raise UsageError(f"--out {args.out} is the base model's or the adapter's directory: write the merged model "
                         "to a new one")
    # the base checked, or AdapterError
    model = load_model(args.model, args.pretrained, "cpu", adapter=args.adapter, names=MODEL_ARGS)
    # the comparison batch: random pixels and random token ids, fp32 (the model's dtype as loaded), fixed seed
    g = torch.Generator().manual_seed(0)
    size, text = model.config.vision.image_size, model.config.text
    images = torch.randn(MERGE_CHECK_BATCH, 3, size, size, generator=g)
    tokens = torch.randint(1, text.vocab_size, (MERGE_CHECK_BATCH, text.context_length), generator=g)
    unmerged = _embeddings(model, images, tokens)
    merge_lora(model)
    merged = _embeddings(model, images, tokens)
    diff = [(a - b).abs().max().item() for a, b in zip(merged, unmerged)]
    out = save_pretrained(model, args.out)
    print(f"merged: max |merged - unmerged| on {MERGE_CHECK_BATCH} random inputs (fp32): image embeddings "
          f"{diff[0]:.2e}, text embeddings {diff[1]:.2e}")
    print(f"wrote {out} (an mm model directory, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def add_merge_parser(sub: Any) -> None:
    s = sub.add_parser("merge", help="fold a LoRA adapter into its base: an ordinary model directory",
                       description=MERGE_DESCRIPTION, formatter_class=EXAMPLES)
    add_model_options(s, model_help="the base model (an mm model directory, open_clip:NAME[:TAG], a preset with "
                                    "--pretrained FILE), or an adapter directory (then its recorded base)",
                      adapter_help="the LoRA adapter directory (a LoRA run's final/); not needed when --model is "
                                   "one")
    s.add_argument("--out", required=True, metavar="DIR", help="the merged model directory to write")
    s.set_defaults(fn=cmd_merge)
