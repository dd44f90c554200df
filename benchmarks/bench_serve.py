"""`mm serve` under load: N concurrent clients embedding images, dynamic batching vs one model call per request,
and the server's memory over many requests.

    python benchmarks/bench_serve.py                                   # ViT-B-32 (random weights), 1/8/32/128 clients
    python benchmarks/bench_serve.py --model tiny-clip --duration 5 --rss-requests 2000   # a quick look
    python benchmarks/bench_serve.py --device cuda --max-batch 64       # on a GPU
    python benchmarks/bench_serve.py --kind text --rss-requests 0       # one text per request instead of an image

First the model alone in this process: time per item at batch 1 and at ``--max-batch``, the most batching can
gain on this machine. Then each configuration is a fresh ``python -m mm serve`` process on a loopback port (``--max-batch B`` for batching,
``--max-batch 1`` for one model call per request; everything else the same). Clients are closed loops in one
asyncio process (a minimal keep-alive HTTP/1.1 client on asyncio streams: cheap, so that on a small machine the
server is what is measured): each posts one ``--size`` x ``--size`` JPEG to /v1/embed as a multipart upload, waits for
the answer, and posts the next. For each number of clients: a warm-up round, then ``--duration`` seconds
counted; throughput = answers with status 200 in that window / its length; latency p50 / p99 over those
answers; 503s (queue full) are counted apart. CPU: the server's CPU seconds (user + system, /proc) per answered
request and the cores it kept busy; the mean batch the server ran (its /metrics). Memory: a server (``--rss-model``,
default tiny-clip so that 10,000 requests take minutes, not hours) answers ``--rss-requests`` mixed requests
(image and text embeddings, zero-shot, 32 clients) and its resident set size is read every 1,000 requests:
growth after the first 1,000 (warm-up: allocator pools, caches) is what a leak would show.

Prints a table and writes the results as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def jpegs(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Server:
    def __init__(self, model: str, *args: str):
        cmd = [sys.executable, "-m", "mm", "serve", "--model", model, "--port", "0", "--max-queue", "1024",
               "--timeout", "600", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
        else:
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")
        for _ in range(1200):
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def batches(self, kind: str = "image") -> tuple[float, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            if line.startswith((f'mm_batch_size_sum{{kind="{kind}"}}', f'mm_batch_size_count{{kind="{kind}"}}')):
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0]] = float(value)
        return values.get("mm_batch_size_sum", 0.0), values.get("mm_batch_size_count", 0.0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def multipart(field: str, filename: str, data: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = "mmbenchboundary7d1f"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(url: str, path: str, body: bytes, content_type: str) -> bytes:
    """A whole HTTP/1.1 POST, ready to write to a kept-alive connection."""
    host = url.split("//", 1)[1]
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """A minimal keep-alive HTTP/1.1 client over asyncio streams: the benchmark's clients cost next to nothing,
    so that on a 2-core machine the server, not an HTTP library in the client, is what is measured."""

    def __init__(self, url: str):
        self.host, self.port = url.split("//", 1)[1].rsplit(":", 1)
        self.reader = self.writer = None

    async def send(self, raw: bytes, retry: bool = True) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host.strip("[]"), int(self.port))
        self.writer.write(raw)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            if not retry:
                raise
            # the server closed the connection while it was idle (keep-alive timeout): a new one, once
            self.writer.close()
            self.reader = self.writer = None
            return await self.send(raw, retry=False)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.writer.close()
            self.reader = self.writer = None
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def embed_requests(url: str, kind: str, images: list[bytes]) -> list[bytes]:
    if kind == "text":
        return [request(url, "/v1/embed", json.dumps({"texts": [f"a photo of a thing number {i}"]}).encode(),
                        "application/json") for i in range(256)]
    return [request(url, "/v1/embed", *multipart("images", f"{i}.jpg", im)) for i, im in enumerate(images)]


async def load(url: str, raws: list[bytes], clients: int, duration: float) -> dict:
    """Closed-loop clients for ``duration`` s after a warm-up round; per-answer latency and status."""
    conns = [Connection(url) for _ in range(clients)]

    async def post(c: int, i: int) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        status, _ = await conns[c].send(raws[i % len(raws)])
        return status, t0, time.perf_counter()

    await asyncio.gather(*(post(c, c) for c in range(clients)))  # warm-up: connections, first batches
    done: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    end = start + duration

    async def loop(c: int) -> None:
        i = c
        while time.perf_counter() < end:
            done.append(await post(c, i))
            i += clients
    await asyncio.gather(*(loop(c) for c in range(clients)))
    stop = time.perf_counter()
    for conn in conns:
        conn.close()
    ok = [(t1 - t0) for s, t0, t1 in done if s == 200 and t1 <= end]
    lat = sorted(ok)
    return {"clients": clients, "answered": len(ok), "seconds": round(end - start, 2),
            "throughput": len(ok) / (end - start), "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "rejected_503": sum(1 for s, _, _ in done if s == 503),
            "errors": sum(1 for s, _, _ in done if s not in (200, 503)), "drain_s": round(stop - end, 2)}


def throughput(args: argparse.Namespace, images: list[bytes]) -> list[dict]:
    rows = []
    for mode, max_batch in (("batching", args.max_batch), ("per-request", 1)):
        server = Server(args.model, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
                        *(["--device", args.device] if args.device else []))
        try:
            for clients in args.clients:
                cpu0, (s0, n0) = server.cpu_seconds(), server.batches(args.kind)
                r = asyncio.run(load(server.url, embed_requests(server.url, args.kind, images), clients, args.duration))
                cpu1, (s1, n1) = server.cpu_seconds(), server.batches(args.kind)
                r.update(mode=mode, max_batch=max_batch, mean_batch=(s1 - s0) / max(n1 - n0, 1),
                         server_cpu_s_per_request=(cpu1 - cpu0) / max(r["answered"], 1),
                         server_cores_busy=(cpu1 - cpu0) / (r["seconds"] + r["drain_s"]))
                rows.append(r)
                print(f"{mode:>11}  {clients:>4} clients  {r['throughput']:7.2f} req/s  p50 {r['p50_ms'] or 0:8.1f} ms  "
                      f"p99 {r['p99_ms'] or 0:8.1f} ms  mean batch {r['mean_batch']:5.1f}  "
                      f"server CPU {r['server_cpu_s_per_request'] * 1000:6.1f} ms/req on {r['server_cores_busy']:.2f} "
                      f"cores  503s {r['rejected_503']}  errors {r['errors']}", flush=True)
        finally:
            server.stop()
    return rows


async def mixed(url: str, images: list[bytes], n: int, clients: int, on_thousand) -> int:
    """``n`` requests over ``clients`` connections: text embeddings, image embeddings (two in four) and zero-shot."""
    text = [request(url, "/v1/embed", json.dumps({"texts": [f"a photo of thing {i}"]}).encode(), "application/json")
            for i in range(100)]
    image = [request(url, "/v1/embed", *multipart("images", "q.jpg", im)) for im in images]
    zeroshot = [request(url, "/v1/zeroshot", *multipart("image", "q.jpg", im, {"classes": "cat,dog,car",
                                                                               "templates": "a photo of a {}."}))
                for im in images]
    errors, counter = 0, iter(range(n))

    async def worker() -> None:
        nonlocal errors
        conn = Connection(url)
        for i in counter:
            raw = (text[i % len(text)], image[i % len(image)], image[i % len(image)], zeroshot[i % len(image)])[i % 4]
            status, _ = await conn.send(raw)
            errors += status != 200
            if (i + 1) % 1000 == 0:
                on_thousand(i + 1)
        conn.close()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return errors


def memory(args: argparse.Namespace, images: list[bytes]) -> dict:
    server = Server(args.rss_model, "--max-batch", str(args.max_batch))
    samples: list[tuple[int, float]] = [(0, server.rss_mb())]
    try:
        t0 = time.perf_counter()
        errors = asyncio.run(mixed(server.url, images, args.rss_requests, 32,
                                   lambda n: samples.append((n, server.rss_mb()))))
        seconds = time.perf_counter() - t0
    finally:
        server.stop()
    after_warmup = next((mb for n, mb in samples if n >= 1000), samples[-1][1])
    result = {"model": args.rss_model, "requests": args.rss_requests, "errors": errors, "seconds": round(seconds, 1),
              "rss_mb": [(n, round(mb, 1)) for n, mb in samples],
              "growth_after_1000_mb": round(samples[-1][1] - after_warmup, 1)}
    print(f"memory: {args.rss_requests} requests ({args.rss_model}, 32 clients, {seconds:.0f} s, {errors} errors): RSS "
          + ", ".join(f"{n}: {mb:.0f} MB" for n, mb in samples)
          + f"; growth after the first 1,000: {result['growth_after_1000_mb']:+.1f} MB", flush=True)
    return result


def model_ceiling(args: argparse.Namespace) -> dict:
    """The model alone, in this process (same threads as the servers): seconds per item of ``encode_image`` /
    ``encode_text`` at batch 1 and at ``--max-batch``: the most batching can gain on this machine."""
    import torch

    import mm

    model = mm.create_model(args.model).eval()
    tok = mm.get_tokenizer(model)
    size = model.config.vision.image_size
    per_item = {}
    for b in (1, args.max_batch):
        x = torch.randn(b, 3, size, size) if args.kind == "image" else tok([f"a photo {i}" for i in range(b)])
        encode = model.encode_image if args.kind == "image" else model.encode_text
        with torch.inference_mode():
            encode(x, normalize=True)
            reps = max(2, 32 // b)
            t0 = time.perf_counter()
            for _ in range(reps):
                encode(x, normalize=True)
            per_item[b] = (time.perf_counter() - t0) / (reps * b)
    result = {"batch_1_ms_per_item": 1000 * per_item[1], f"batch_{args.max_batch}_ms_per_item":
              1000 * per_item[args.max_batch], "ceiling": per_item[1] / per_item[args.max_batch],
              "torch_threads": torch.get_num_threads()}
    print(f"model alone ({args.model}, {args.kind}s, {torch.get_num_threads()} torch threads): "
          f"{result['batch_1_ms_per_item']:.1f} ms per item at batch 1, "
          f"{result[f'batch_{args.max_batch}_ms_per_item']:.1f} at batch {args.max_batch}: batching can gain at most "
          f"{result['ceiling']:.2f}x", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="--model of the throughput servers (a preset: random weights)")
    p.add_argument("--clients", default="1,8,32,128", type=lambda s: [int(c) for c in s.split(",")])
    p.add_argument("--duration", type=float, default=30.0, help="seconds counted per number of clients")
    p.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--size", type=int, default=256, help="side of the JPEGs sent")
    p.add_argument("--kind", choices=["image", "text"], default="image", help="what each request embeds: one image "
                                                                               "(multipart) or one text (JSON)")
    p.add_argument("--device", default=None)
    p.add_argument("--rss-model", default="tiny-clip")
    p.add_argument("--rss-requests", type=int, default=10_000, help="0: skip the memory run")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    args = p.parse_args()
    images = jpegs(64, args.size)
    result = {"model": args.model, "kind": args.kind, "size": args.size, "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if not args.skip_throughput:
        result["model_alone"] = model_ceiling(args)
        rows = throughput(args, images)
        result["throughput"] = rows
        for c in args.clients:
            b = next(r for r in rows if r["mode"] == "batching" and r["clients"] == c)
            s = next(r for r in rows if r["mode"] == "per-request" and r["clients"] == c)
            print(f"{c:>4} clients: batching / per-request throughput = {b['throughput'] / max(s['throughput'], 1e-9):.2f}x")
    if args.rss_requests:
        result["memory"] = memory(args, images)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
