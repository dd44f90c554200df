"""Scores captions (`mm caption --json` output) against a shard set's references: BLEU-4 and CIDEr-D (coco-caption's
definitions, mm.eval.caption_metrics), the references being each sample's json "captions" (else its txt). Images were
extracted with `mm shards extract` (files KEY.jpg), so the caption file's image names give the sample keys.

    python benchmarks/bench_retrieval_caption.py --shards ../shared/datasets/flickr8k/test-0000.tar captions.jsonl ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm.data.wds import check_urls, iter_shard
from mm.eval.caption_metrics import caption_scores


def references(spec: str) -> dict[str, list[str]]:
    refs = {}
    for url in check_urls(spec, "--shards"):
        for s in iter_shard(url, warn=print):
            caps = json.loads(s["json"]).get("captions") if "json" in s else None
            refs[s["__key__"]] = caps or [s["txt"].decode()]
    return refs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("captions", nargs="+", help="mm caption --json outputs")
    args = p.parse_args()
    refs = references(args.shards)
    for path in args.captions:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        keys = [Path(r["image"]).stem for r in rows]
        scores = caption_scores([r["caption"] for r in rows], [refs[k] for k in keys])
        print(json.dumps({"file": path, "images": len(rows), **{k: round(v, 4) for k, v in scores.items()}}))


if __name__ == "__main__":
    main()
