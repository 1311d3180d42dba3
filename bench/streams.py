"""Live streams through ``rnnkit serve`` on the WikiText-2 word LM (configs/lm_wikitext2.yaml:
two LSTM layers of 400, an adaptive softmax over 33,278 words), checkpoint and export, on
loopback with bounded request counts.

1. model: the shipped recipe trained ``--steps`` updates (speed and memory do not depend on
   how well trained), then exported.
2. per backend, a real ``rnnkit serve`` (the model in its process of its own):
   ``--streams`` streams opened, each primed with a word, then ``--clients`` concurrent
   clients feed them one word per request (each client its own share of the streams):
   words per second, against one process stepping the same streams directly in batches of
   ``--clients`` (``Model.streams()``, no HTTP), and against a stateless client that resends
   the whole prefix with every request (``/generate`` with ``length: 1``) at prefix lengths
   100 and 1,000; then p50 and p99 latency of one feed with 100 streams fed at once by 100
   clients.
3. memory (checkpoint): the server's resident memory (both processes) before and with
   ``--memory-streams`` streams open, against the bytes of their states, and after they
   expire (``--stream-idle-seconds``).

    python bench/streams.py [--steps 20] [--streams 1000] [--clients 32] [--feeds 4000]
                            [--memory-streams 10000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import Client, Server, free_port, rss_mb  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def rnnkit(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "rnnkit", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rnnkit {' '.join(args)}: exit {res.returncode}\n{res.stderr[-1500:]}")


def words(n: int) -> list[str]:
    text = (DATA / "valid.txt").read_text(encoding="utf-8").split()
    return [text[i % len(text)] for i in range(n)]


def serve(model: Path, out: Path, name: str, *extra: str) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "rnnkit", "serve", f"wt2={model}", "--port", str(port),
                   "--max-wait-ms", "2", "--max-streams", "100000", *extra], port, "/health", out / f"{name}.log", ROOT)


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def in_threads(n: int, work) -> float:
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def open_streams(port: int, n: int, clients: int, vocab: list[str]) -> list[str]:
    ids: list = [None] * n

    def work(k: int) -> None:
        c = Client(port)
        for i in range(k, n, clients):
            status, answer = c.post("/v1/wt2/streams", body(text=vocab[i % len(vocab)], top_k=0))
            assert status == 200, answer
            ids[i] = answer["id"]

    in_threads(clients, work)
    return ids


def feed_load(port: int, ids: list[str], clients: int, feeds: int, vocab: list[str]) -> tuple[float, list[float]]:
    """``feeds`` one-word feeds by ``clients`` threads, each over its own share of the streams;
    (words per second, each feed's latency in seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        c, mine, own = Client(port), ids[k::clients], []
        for j in range(feeds // clients):
            t = time.perf_counter()
            status, answer = c.post(f"/v1/wt2/streams/{mine[j % len(mine)]}",
                                    body(text=vocab[(k + j * clients) % len(vocab)], top_k=5))
            own.append(time.perf_counter() - t)
            assert status == 200, answer
        with lock:
            latencies.extend(own)

    seconds = in_threads(clients, work)
    return len(latencies) / seconds, latencies


def stateless(port: int, prefix: list[str], clients: int, requests: int) -> float:
    """Requests per second (a word each) when every request carries its whole prefix."""
    text = " ".join(prefix)

    def work(k: int) -> None:
        c = Client(port)
        for _ in range(requests // clients):
            status, answer = c.post("/v1/wt2/generate", body(prime=text, length=1, seed=k))
            assert status == 200, answer

    return (requests // clients) * clients / in_threads(clients, work)


def direct(model: Path, n: int, batch: int, feeds: int, vocab: list[str]) -> float:
    """Words per second of one process feeding ``n`` streams one word each, ``batch`` at a time."""
    import rnnkit

    m = rnnkit.load(model)
    book = m.streams()
    for i in range(n):
        book.open(i)
    for lo in range(0, n, batch):
        book.feed([(i, vocab[i % len(vocab)], {"top_k": 0}) for i in range(lo, min(n, lo + batch))])
    start, done, i = time.perf_counter(), 0, 0
    while done < feeds:
        group = [((i + j) % n, vocab[(i + j) % len(vocab)], {"top_k": 5}) for j in range(batch)]
        answers = book.feed(group)
        assert not any(isinstance(a, Exception) for a in answers)
        done += batch
        i += batch
    return done / (time.perf_counter() - start)


def faults(model: Path, out: Path, vocab: list[str], opens: int = 1000) -> list[str]:
    """Bad feeds and broken clients against a real server with --max-streams 100: each must get
    a 4xx (or 429), the server must stay up, and no stream may stay open once closed."""
    import socket

    server = serve(model, out, "faults", "--max-streams", "100")
    lines = []
    try:
        c = Client(server.port)
        sid = c.post("/v1/wt2/streams", body(text="the"))[1]["id"]
        cases = {"unknown id": ("/v1/wt2/streams/0000", body(text="a")),
                 "wrong type": (f"/v1/wt2/streams/{sid}", body(text=5)),
                 "rows to a language model": (f"/v1/wt2/streams/{sid}", body(rows=[[1.0]])),
                 "too long": (f"/v1/wt2/streams/{sid}", body(ids=[1] * 6000)),
                 "not UTF-8": (f"/v1/wt2/streams/{sid}", b'{"text": "' + bytes([0xFF, 0xFE]) + b'"}'),
                 "not JSON": (f"/v1/wt2/streams/{sid}", b"{text")}
        for name, (path, payload) in cases.items():
            status, answer = c.post(path, payload)
            lines.append(f"{name}: {status} {answer.get('error', '') if isinstance(answer, dict) else answer}")
        opened = [c.post("/v1/wt2/streams", body(text=vocab[i])) for i in range(opens)]
        codes = [status for status, _ in opened]
        lines.append(f"{opens:,} opens at --max-streams 100 (one open before): {codes.count(200)} opened, "
                     f"{codes.count(429)} answered 429, {len(codes) - codes.count(200) - codes.count(429)} other")
        for cut in (True, False):            # a client gone mid-body, and one gone before its answer
            payload = body(text="harbour lights")
            head = (f"POST /v1/wt2/streams/{sid} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                raw.sendall(head + (payload[:5] if cut else payload))
        time.sleep(1.0)
        c = Client(server.port)
        for key in [sid] + [answer["id"] for status, answer in opened if status == 200]:
            c.conn.request("DELETE", f"/v1/wt2/streams/{key}")
            c.conn.getresponse().read()
        c.conn.request("GET", "/health")
        health = json.loads(c.conn.getresponse().read())
        lines.append(f"two clients gone mid-feed, then every stream closed: /health {health['status']}, "
                     f"{health['streams']['wt2']} streams open")
    finally:
        code = server.stop()
    lines.append(f"rnnkit serve after SIGTERM: exit {code}")
    return lines


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def state_bytes(model: Path) -> int:
    """Bytes of one stream's recurrent state in this model (the slab's row)."""
    import rnnkit

    book = rnnkit.load(model).streams()
    book.open(0, "the")
    return book.rows.row_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--feeds", type=int, default=4000)
    ap.add_argument("--memory-streams", type=int, default=10_000)
    ap.add_argument("--memory-only", action="store_true", help="only the memory part (and the faults)")
    ap.add_argument("--quick", action="store_true", help="small counts: checks that it runs")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent")
        return 0
    idle = 20
    if args.quick:
        args.steps, args.streams, args.feeds, args.memory_streams, args.clients, idle = 2, 64, 128, 300, 8, 1
    from bench.machine import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ckpt, onnx = out / "wt2" / "last.pt", out / "wt2_onnx"
        print(f"training the WikiText-2 word LM for {args.steps} steps and exporting it ...", file=sys.stderr, flush=True)
        rnnkit("train", "configs/lm_wikitext2.yaml", "--set", f"run_dir={out / 'wt2'}", "--set",
               f"train.max_steps={args.steps}", "--set", f"train.eval_every={args.steps}", "--set",
               "train.warmup_steps=0", "--set", "train.max_time=null", "--set", "train.decay_by=steps")
        if not args.quick:
            rnnkit("export", str(ckpt), "-o", str(onnx))
        vocab = words(50_000)
        rows = {}
        backends = (("checkpoint", ckpt),) if args.quick else (("checkpoint", ckpt), ("export", onnx))
        for backend, model in () if args.memory_only else backends:
            print(f"{backend}: streams ...", file=sys.stderr, flush=True)
            server = serve(model, out, backend)
            try:
                ids = open_streams(server.port, args.streams, args.clients, vocab)
                rate, lat = feed_load(server.port, ids, args.clients, args.feeds, vocab)
                few = max(args.clients, 64 if not args.quick else 8)
                flat = {n: stateless(server.port, vocab[:n], args.clients, few) for n in (100, 1000)}
                hundred = ids[:100]
                _, lat100 = feed_load(server.port, hundred, len(hundred), 10 * len(hundred), vocab)
            finally:
                server.stop()
            base = direct(model, args.streams, args.clients, args.feeds, vocab)
            rows[backend] = {"rate": rate, "direct": base, "flat": flat, "p50": percentile(lat100, 0.5),
                             "p99": percentile(lat100, 0.99)}
        print("memory ...", file=sys.stderr, flush=True)
        row = state_bytes(ckpt)
        server = serve(ckpt, out, "memory", "--stream-idle-seconds", str(idle))
        try:
            Client(server.port).post("/v1/wt2/streams", body(text="warm", top_k=0))   # the slab exists
            time.sleep(idle + 1)
            before = rss_mb(server.proc.pid)
            open_streams(server.port, args.memory_streams, args.clients, vocab)
            full = rss_mb(server.proc.pid)
            open_streams(server.port, args.memory_streams, args.clients, vocab)     # as many again: the slope
            twice = rss_mb(server.proc.pid)
            time.sleep(idle + (2 if args.quick else 10))        # every stream idle past idle: expired
            c = Client(server.port)
            c.conn.request("GET", "/health")
            health = json.loads(c.conn.getresponse().read())
            after = rss_mb(server.proc.pid)
        finally:
            server.stop()
        fault_lines = faults(ckpt, out, vocab, 150 if args.quick else 1000)
    print(f"CPU {cpu_description()}; rnnkit serve (model process), {args.clients} clients on loopback in the "
          f"same machine; the WikiText-2 word LM (2x LSTM 400, adaptive softmax, 33,278 words)")
    print(f"{'backend':<11} {'words/s':>8} {'direct':>8} {'ratio':>6} {'stateless@100':>14} {'x':>6} "
          f"{'stateless@1000':>15} {'x':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for backend, r in rows.items():
        print(f"{backend:<11} {r['rate']:>8.0f} {r['direct']:>8.0f} {r['rate'] / r['direct']:>6.2f} "
              f"{r['flat'][100]:>14.1f} {r['rate'] / r['flat'][100]:>6.1f} {r['flat'][1000]:>15.1f} "
              f"{r['rate'] / r['flat'][1000]:>7.1f} {1000 * r['p50']:>7.1f} {1000 * r['p99']:>7.1f}")
    states = args.memory_streams * row / 2 ** 20
    print(f"memory: {args.memory_streams} streams of {row} state bytes each = {states:.1f} MB; resident "
          f"{before:.0f} MB -> {full:.0f} MB (+{full - before:.1f} MB, {(full - before) / states:.2f}x the states) "
          f"-> {after:.0f} MB after they expired ({health['streams']['wt2']} open)")
    print(f"memory: {args.memory_streams} more streams: {full:.0f} -> {twice:.0f} MB (+{twice - full:.1f} MB, "
          f"{(twice - full) / states:.2f}x their states: the cost per stream beyond the first's fixed part)")
    for line in fault_lines:
        print("faults: " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
