"""``mm serve``: an HTTP API and web page over a model and its ``mm embed`` indexes (:mod:`mm.serve`). Everything
is checked (options, model, indexes, port) before the server starts; FastAPI and uvicorn are imported only when
the command runs, so ``mm --help`` and the other commands do not need the ``serve`` extra."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..inference.embed import EmbedError, check_query_model
from ..utils.precision import PRECISIONS
from .common import (
    EXAMPLES,
    MODEL_ARGS,
    MODEL_ERRORS,
    UsageError,
    add_model_options,
    add_seq_len,
    check_seq_len,
    default_device,
    guard,
)

DESCRIPTION = """\
Serve a model over HTTP: POST /v1/embed, /v1/zeroshot, /v1/caption (CoCa models) and /v1/search (over each
--index: exact over an `mm embed` output, approximate over an `mm index build` output, merged over several
shards), GET /healthz, /metrics (Prometheus) and /v1/info; API docs at /docs, a web page at / (search by
text or image, zero-shot, captions). Concurrent requests are batched into one model call per kind (up to
--max-batch items, the first waiting at most --max-wait-ms); a full queue answers 503 with Retry-After.
Binds to 127.0.0.1 unless --host says otherwise; a non-loopback host needs --api-key (or MM_SERVE_API_KEY),
or --insecure-no-auth. Needs the serve extra: pip install 'mm[serve]'.

examples:
  mm serve --model runs/builtin/final --index runs/emb/test
  mm serve --model open_clip:ViT-B-32:laion2b_s34b_b79k --index photos=emb/photos --port 8080
  mm serve --model runs/builtin/final --host 0.0.0.0 --api-key "$(cat key.txt)" --max-batch 64
  mm serve --model M --index photos=ann/photos-0,ann/photos-1          (two `mm index build` shards as one)
  mm serve --model M --index photos=http://host1:8000/photos,http://host2:8000/photos   (shards on other hosts)
  curl -s localhost:8000/v1/search -H 'content-type: application/json' -d '{"text": "a red circle", "k": 5}'"""


def _settings(args: argparse.Namespace) -> Any:
    from ..serve.app import ServeSettings
    from ..serve.limits import Limits

    for flag in ("port", "max_batch", "max_queue", "decode_workers", "max_upload_mb", "max_pixels", "max_k",
                 "max_connections"):
        value = getattr(args, flag)
        if value < (0 if flag == "port" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'port' else 1}, got {value}")
    if args.max_wait_ms < 0 or args.timeout <= 0:
        raise UsageError("--max-wait-ms must be >= 0 and --timeout > 0")
    from ..serve.server import is_loopback

    if not is_loopback(args.host) and not args.api_key and not args.insecure_no_auth:
        raise UsageError(f"--host {args.host} is reachable from other machines: give --api-key KEY (or set "
                         "MM_SERVE_API_KEY), or --insecure-no-auth to serve without one")
    limits = Limits(max_body_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, max_k=args.max_k,
                    max_images=min(Limits.max_images, args.max_queue), max_texts=min(Limits.max_texts, args.max_queue))
    return ServeSettings(model=args.model, api_key=args.api_key or None, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout=args.timeout,
                         decode_workers=args.decode_workers, cors_origins=tuple(args.cors_origin or ()), limits=limits)


def _reading(seq_len: int | None) -> str:
    return "square" if seq_len is None else f"as NaFlex sequences of at most {seq_len} patches"


@guard(EmbedError, UsageError, OSError, *MODEL_ERRORS)
def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve.app import create_app
        from ..serve.engine import Engine
        from ..serve.indexes import ServedIndex, parse_index_specs
        from ..serve.server import bind, run
    except ImportError as e:
        raise UsageError(f"mm serve needs the serve extra ({e.name} is missing): pip install 'mm[serve]'") from None
    settings = _settings(args)
    specs = parse_index_specs(args.index or [], "--index")
    # EmbedError: unfinished / missing, a remote shard that does not answer, shards that do not belong together
    indexes = {name: ServedIndex(name, shards, api_key=args.api_key) for name, shards in specs.items()}
    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    from ..hub import load_model

    model = load_model(args.model, args.pretrained, default_device(args.device), adapter=args.adapter,
                       names=MODEL_ARGS)
    try:
        seq_len = check_seq_len(model, args.seq_len)
    except ValueError as e:
        raise UsageError(str(e)) from None
    store = retrieval_model = None
    if args.datastore:
        if getattr(model.config, "decoder", None) is None:
            raise UsageError(f"--datastore: {args.model} has no captioning decoder to read retrieved captions")
        from .caption import load_datastore

        args.device = default_device(args.device)
        store, retrieval_model = load_datastore(args, model)
    engine = Engine(model, precision=args.precision, seq_len=seq_len, datastore=store,
                    retrieval_model=retrieval_model, k=args.k)
    for name, index in indexes.items():
        if index.info.get("seq_len") != seq_len:
            print(f"warning: --index {name}'s images were read {_reading(index.info.get('seq_len'))}, queries will be "
                  f"read {_reading(seq_len)}", file=sys.stderr)
        check_query_model(index.info, model, args.model, f"--index {name}", args.allow_other_model,
                          "--allow-other-model")
    app = create_app(engine, indexes, settings)
    return run(app, sock, grace=settings.timeout + 5, max_connections=args.max_connections,
               log_level=args.log_level, access_log=args.access_log)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve a model over HTTP: embed, zero-shot, caption, search, and a web page",
                       description=DESCRIPTION, formatter_class=EXAMPLES)
    add_model_options(s)
    s.add_argument("--index", action="append", metavar="[NAME=]SHARD[,SHARD...]",
                   help="an index to search (repeatable; NAME defaults to the folder's name): an `mm embed` output "
                   "(exact), an `mm index build` output (approximate), or several of them, or other mm serve "
                   "processes' indexes (http://HOST:PORT/NAME), searched together as one")
    s.add_argument("--datastore", metavar="DIR", help="retrieval-augmented captions: /v1/caption first reads the --k "
                   "captions this datastore returns for the image (as mm caption --datastore)")
    s.add_argument("--k", type=int, default=4, help="retrieved captions per caption with --datastore (a request's k "
                   "overrides it; default: 4)")
    s.add_argument("--allow-other-model", action="store_true", help="serve indexes made with another model than "
                   "--model (refused by default: their weights fingerprints differ)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port, printed)")
    s.add_argument("--api-key", default=os.environ.get("MM_SERVE_API_KEY"),
                   help="require this key (Authorization: Bearer KEY or X-API-Key) on /v1/* and /metrics "
                        "(default: $MM_SERVE_API_KEY)")
    s.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without --api-key")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast of the model calls")
    s.add_argument("--max-batch", type=int, default=32, help="items per model call (1: one call per item)")
    s.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="the longest the first item of a batch waits for others (default: 10)")
    s.add_argument("--max-queue", type=int, default=256, help="items waiting per kind of model call; beyond: 503")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take; beyond: 504")
    s.add_argument("--decode-workers", type=int, default=2, help="threads decoding images and searching indexes")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default: 10 MB)")
    s.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image, width x height (read from its "
                                                                      "header: bigger ones are never decoded)")
    s.add_argument("--max-k", type=int, default=100, help="most search results per index a request may ask for")
    s.add_argument("--max-connections", type=int, default=512, help="open connections; beyond: 503")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="a browser origin allowed to call the API (repeatable; default: none, CORS off)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true", help="log every request")
    add_seq_len(s)
    s.set_defaults(fn=cmd_serve)
    return s
