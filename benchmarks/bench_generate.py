"""Caption generation speed: mm with and without its KV cache, and open_clip's ``CoCa.generate``, on the
same weights, images and settings, in one process.

    python benchmarks/bench_generate.py --model tiny-coca --batch 32 --new-tokens 32

Every method runs exactly ``--new-tokens`` decoding steps (the end token is forbidden until then), so the
timings compare the same work whatever the random weights would say. open_clip's ``generate`` needs
``transformers < 4.56``; install it beside the benchmarks, not into the environment:

    pip install --target benchmarks/.peer/hf --no-deps "transformers>=4.40,<4.56" "tokenizers>=0.21,<0.22" \\
        "huggingface_hub<1.0" requests urllib3 idna charset_normalizer certifi regex tqdm filelock fsspec

(this script puts benchmarks/.peer/hf on sys.path when it exists). Rows: greedy (open_clip: top_k with
k = 1, which picks the arg-max) and beam search (open_clip: one beam group, i.e. plain beam search).
Reports the median wall time of ``--repeats`` interleaved runs, images/s, and ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if (HERE / ".peer" / "hf").is_dir():
    sys.path.insert(0, str(HERE / ".peer" / "hf"))

import mm  # noqa: E402
from mm.inference.generate import generate  # noqa: E402
from mm.layers import text_valid_mask  # noqa: E402


def open_clip_coca(model: mm.CoCa):
    """open_clip's CoCa with mm ``model``'s shapes, holding the same weights."""
    import open_clip
    from open_clip.coca_model import CoCa

    from mm.hub.open_clip import open_clip_config, to_open_clip

    oc = CoCa(**open_clip_config(model.config))
    # open_clip has no config key for the class token's mask; its attribute selects the corrected one
    oc.text.correct_cls_mask = model.config.text.cls_mask == "correct"
    oc.load_state_dict(to_open_clip(model), strict=True)
    assert isinstance(oc, open_clip.CoCa)
    return oc.eval()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-coca")
    p.add_argument("--context", type=int, default=64, help="text context length (room for the new tokens)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-open-clip", action="store_true", help="skip open_clip (e.g. transformers missing)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mm.create_model(args.model, text__context_length=args.context).to(device).eval()
    v = model.config.vision
    images = torch.randn(args.batch, 3, v.image_size, v.image_size, device=device)
    n = args.new_tokens
    sot, eot = model.config.text.sot_id, model.config.text.eot_id

    runs: dict[str, callable] = {}
    for method, extra in (("greedy", {}), ("beam", {"num_beams": args.beams})):
        for cache in (True, False):
            kw = dict(method=method, max_new_tokens=n, min_new_tokens=n, use_cache=cache, **extra)
            runs[f"mm {method} {'cached' if cache else 'uncached'}"] = lambda kw=kw: generate(model, images, **kw)
    oc = None
    if not args.no_open_clip:
        try:
            oc = open_clip_coca(model).to(device)
        except ImportError as e:
            print(f"open_clip CoCa.generate unavailable ({e}); see the docstring for transformers < 4.56")
    if oc is not None:
        # open_clip forces the end token as token seq_len and forbids it before min_seq_len (prompt included):
        # seq_len = 1 + n gives n new tokens, the last one the forced end token
        common = dict(seq_len=1 + n, min_seq_len=n, sot_token_id=sot, eos_token_id=eot, pad_token_id=0)
        runs["open_clip greedy"] = lambda: oc.generate(images, generation_type="top_k", top_k=1, **common)
        runs["open_clip beam"] = lambda: oc.generate(images, generation_type="beam_search", num_beams=args.beams,
                                                     num_beam_groups=1, **common)
        with torch.no_grad():  # the two agree on what they compute (teacher-forced logits, same weights)
            tok = mm.get_tokenizer(model)(["a dog runs on the beach"] * 2).to(device)
            ours = model(images[:2], tok).caption_logits  # packed: positions that predict a real token
            t = model.config.text
            theirs = oc(images[:2], tok)["logits"][text_valid_mask(tok, eot_id=t.eot_id, pad_id=t.pad_id)[:, 1:]]
            print(f"caption logits mm vs open_clip, same weights: max abs diff {(ours - theirs).abs().max():.2e}")

    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():  # interleaved: machine noise hits every method alike
                times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"\n{args.model} (context {args.context}), batch {args.batch}, {n} new tokens, beams {args.beams}, "
          f"{device}, torch {torch.__version__}, median of {args.repeats}")
    print(f"{'method':26s} {'seconds':>8s} {'images/s':>9s}")
    for k, t in med.items():
        print(f"{k:26s} {t:8.3f} {args.batch / t:9.1f}")
    print()
    for method in ("greedy", "beam"):
        speedup = med[f"mm {method} uncached"] / med[f"mm {method} cached"]
        line = f"{method}: KV cache speed-up {speedup:.2f}x"
        if oc is not None:
            line += f"; mm cached vs open_clip: {med[f'open_clip {method}'] / med[f'mm {method} cached']:.2f}x faster"
        print(line)


if __name__ == "__main__":
    main()
