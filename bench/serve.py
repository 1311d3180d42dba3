"""``rnnkit serve`` under load, beside ``rnnkit translate`` in one process and OpenNMT-py's
``onmt_server``, on the shared translation model (loopback only, bounded request counts).

1. models: rnnkit's configs/translate_attention.yaml and OpenNMT-py's copy of the same model
   (../shared/bench/peers), each trained for ``--steps`` updates (reused when present).
2. in one process: ``rnnkit translate --beam 5`` on test_2016_flickr (whole process, and the
   decoding alone through ``rnnkit.load``), and every sentence decoded alone.
3. ``rnnkit serve``: 32 concurrent clients, one sentence per request, beam 5; how many answers
   differ from the sentence decoded alone; one client's median latency against the in-process
   ``m.translate([s])``; malformed requests (each must get a 4xx JSON error); ``--requests``
   valid requests with the server's resident memory sampled; SIGTERM under load (every request
   the server received must be answered); a headless Chromium check of the page (screenshot).
4. ``onmt_server`` with the OpenNMT-py model under the same 32-client load.

5. ``--export-only``: serving the checkpoint against serving its ONNX export, same load:
   sentences per second and the server's resident memory.

    python bench/serve.py [--steps 600] [--requests 10000] [--quick] [--export-only]

``--quick`` uses 100 sentences and few requests (a check of the plumbing, not a result).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402
from bench.peers import OUT, SHARED, train_onmt, train_rnnkit  # noqa: E402

TEST = SHARED / "data" / "multi30k" / "test_2016_flickr.en"
REF = SHARED / "data" / "multi30k" / "test_2016_flickr.fr"
BEAM, ALPHA = 5, 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its child processes (``rnnkit serve``'s model process)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mb(int(child))
    return total


def wait_ready(port: int, path: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (code {proc.returncode}) before it was ready")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server on port {port} was not ready after {seconds:.0f} s")


class Client:
    """One keep-alive connection; ``post`` returns (status, parsed JSON or None)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, object]:
        self.conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        r = self.conn.getresponse()
        data = r.read()
        if r.getheader("connection", "").lower() == "close":
            self.conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, None


def load_test(port: int, path: str, payloads: list[bytes], clients: int,
              answer=lambda body: body) -> tuple[float, list]:
    """``clients`` threads send the payloads, one request each, in order; returns (seconds, answers)."""
    answers: list = [None] * len(payloads)
    lock = threading.Lock()
    nxt = iter(range(len(payloads)))

    def work() -> None:
        c = Client(port)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            status, body = c.post(path, payloads[i])
            answers[i] = answer(body) if status == 200 else f"HTTP {status}: {body}"

    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, answers


def rnnkit_payload(line: str, beam: int = BEAM) -> bytes:
    return json.dumps({"lines": [line], "beam": beam, "length_penalty": ALPHA}).encode()


def malformed(port: int) -> tuple[int, list[str]]:
    """Bad requests of every kind; returns (how many, the ones not answered 4xx with a JSON error)."""
    good = {"lines": ["a man ."], "beam": 5}
    cases: list[tuple[str, str, bytes, dict]] = []
    route = "/v1/en_fr/translate"
    bodies = [b"{not json", b"", b"null", b"[]", b"[1, 2]", b'"lines"', b"{}", b'{"lines": null}',
              b'{"lines": "a man ."}', b'{"lines": [1, 2]}', b'{"lines": [["a"]]}', b'{"lines": ["a"], "beam": "5"}',
              b'{"lines": ["a"], "beam": 0}', b'{"lines": ["a"], "beam": -3}', b'{"lines": ["a"], "beam": 1e9}',
              b'{"lines": ["a"], "beam": 2.5}', b'{"lines": ["a"], "n_best": 9, "beam": 2}',
              b'{"lines": ["a"], "length_penalty": -1}', b'{"lines": ["a"], "surprise": 1}',
              b'{"lines": ["\xff\xfe\xfd"]}', b"\xff\xfe{\"lines\": []}", b"[" * 5000 + b"]" * 5000,
              b'{"lines": ["a"]', b"x" * (10 * 1024 * 1024),
              json.dumps({"lines": [" ".join(["word"] * 10_000)]}).encode(),
              json.dumps({"lines": ["a ."] * 5000}).encode()]
    cases += [("POST", route, b, {}) for b in bodies]
    cases += [("POST", "/v1/nobody/translate", json.dumps(good).encode(), {}),
              ("POST", "/v1/en_fr/predict", json.dumps(good).encode(), {}),
              ("POST", "/v1/en_fr/generate", b"{}", {}),
              ("POST", "/v2/en_fr/translate", json.dumps(good).encode(), {}),
              ("POST", "/nowhere", b"{}", {}),
              ("GET", route, b"", {}), ("PUT", route, json.dumps(good).encode(), {}),
              ("DELETE", "/v1/models", b"", {}),
              ("POST", route, b'{"lines": ["a"], "beam": true}', {}),
              ("POST", route, b'{"lines": ["a"], "replace_unk": "yes"}', {})]
    cases = cases * 3         # 3 x 36 = 108
    failures = []
    for method, path, body, headers in cases:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        status = None
        try:
            c.putrequest(method, path)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
            for k, v in headers.items():
                c.putheader(k, v)
            c.endheaders(body)
            r = c.getresponse()
            status, data = r.status, r.read()
            ok = 400 <= status < 500 and isinstance(json.loads(data).get("error"), str)
        except (OSError, ValueError, http.client.HTTPException) as err:
            ok, data = False, repr(err).encode()
        finally:
            c.close()
        if not ok:
            failures.append(f"{method} {path} {body[:40]!r}: {status} {data[:120]!r}")
    return len(cases), failures


class Server:
    def __init__(self, cmd: list[str], port: int, ready: str, log: Path, cwd: Path, env: dict | None = None):
        self.port, self.log = port, log
        self.fh = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.fh, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        wait_ready(port, ready, self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.fh.close()
        return code


def rnnkit_server(ckpt: Path, out: Path, name: str, *extra: str) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "rnnkit", "serve", f"en_fr={ckpt}", "--port", str(port), *extra],
                  port, "/health", out / f"{name}.log", ROOT)


def train_models(steps: int, out: Path, want_onmt: bool) -> tuple[Path, Path | None]:
    ckpt = out / "rnnkit" / "last.pt"
    if not ckpt.exists():
        print(f"training rnnkit's shared model for {steps} steps ...", flush=True)
        r = train_rnnkit(out / "rnnkit", steps, "fp32")
        if "error" in r:
            raise SystemExit(r["error"])
    onmt = None
    venv = OUT / "peers-venv" / "bin"
    if want_onmt and (venv / "onmt_server").exists():
        work = out / "onmt-run"
        onmt = work / "onmt" / f"model_step_{steps}.pt"
        if not onmt.exists():
            print(f"training OpenNMT-py's shared model for {steps} steps ...", flush=True)
            rc, _ = train_onmt(work, steps, venv)
            if rc != 0:
                raise SystemExit(f"OpenNMT-py training failed (exit {rc}); see {work / 'onmt' / 'train.log'}")
    elif want_onmt:
        print("onmt_server: skipped (run bench/peers.py once to install the peers into bench/out/peers-venv)")
    return ckpt, onmt


def sigterm_under_load(ckpt: Path, out: Path, lines: list[str], seconds: float) -> dict:
    server = rnnkit_server(ckpt, out, "sigterm")
    results = {"ok": 0, "refused": 0, "dropped": 0, "other": 0}
    lock = threading.Lock()

    def work(k: int) -> None:
        c = Client(server.port)
        i = k
        while True:             # until the server stops answering
            try:
                status, _ = c.post("/v1/en_fr/translate", rnnkit_payload(lines[i % len(lines)]))
                kind = "ok" if status == 200 else "other"
            except ConnectionRefusedError:
                kind = "refused"
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                kind = "dropped"      # a kept-alive connection the draining server closed between requests
            with lock:
                results[kind] += 1
            if kind != "ok":
                return
            i += 32

    threads = [threading.Thread(target=work, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    code = server.stop(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    text = server.log.read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("stopped:")]
    counts = [int(w) for w in line[-1].replace(",", " ").split() if w.isdigit()] if line else [-1, -1]
    return {**results, "exit": code, "received": counts[0], "answered": counts[1]}


def browser_check(ckpt: Path, out: Path, sentence: str) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        return "skipped: no chromium on this machine (apt-get install chromium)"
    server = rnnkit_server(ckpt, out, "page")
    url = f"http://127.0.0.1:{server.port}/?model=en_fr&run=1&text={quote(sentence)}"
    shot = out / "serve_page.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,760",
             "--virtual-time-budget=15000"]
    try:
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                             timeout=120).stdout
        c = Client(server.port)
        _, body = c.post("/v1/en_fr/translate", rnnkit_payload(sentence))
        expected = body["translations"][0]["text"]
    finally:
        server.stop()
    from html import escape

    shown = escape(expected, quote=False) in dom and 'class="heat"' in dom
    return f"{'ok' if shown else 'FAILED'}: the page showed {expected!r} with its attention heatmap; screenshot {shot}"


def onmt_load(onmt_model: Path, args, lines: list[str], refs: list[str]) -> tuple[float, float]:
    """OpenNMT-py's REST server (flask on waitress) with its model, under the same load:
    (seconds for the lines, BLEU of its answers)."""
    import sacrebleu

    port = free_port()
    conf = args.out / "onmt_server.json"
    conf.write_text(json.dumps({"models_root": str(onmt_model.parent), "models": [{
        "id": 100, "model": onmt_model.name, "timeout": -1, "on_timeout": "to_cpu", "load": True,
        "opt": {"beam_size": BEAM, "batch_size": 64, "max_length": 100, "length_penalty": "wu",
                "alpha": ALPHA}}]}))
    venv = OUT / "peers-venv" / "bin"
    peer = Server([str(venv / "onmt_server"), "--ip", "127.0.0.1", "--port", str(port), "--url_root",
                   "/translator", "--model_config", str(conf)], port, "/translator/health", args.out / "onmt.log",
                  args.out, {"OMP_NUM_THREADS": "2",
                             # its server loads checkpoints with torch.load's default, which since
                             # torch 2.6 refuses OpenNMT-py's own (argparse.Namespace inside); ours, trusted
                             "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    try:
        payloads = [json.dumps([{"src": s, "id": 100}]).encode() for s in lines]
        load_test(port, "/translator/translate", payloads[:64], args.clients)
        seconds, answers = load_test(port, "/translator/translate", payloads, args.clients,
                                     lambda b: b[0][0]["tgt"])
    finally:
        peer.stop()
    bad = [a for a in answers if not isinstance(a, str) or a.startswith("HTTP ")]
    if bad:
        print(f"onmt_server: {len(bad)} failed requests, e.g. {bad[0]!r}")
    return seconds, sacrebleu.corpus_bleu([a if isinstance(a, str) else "" for a in answers], [refs]).score


def served_footprint(models: dict[str, Path], out: Path, lines: list[str], clients: int) -> list[str]:
    """Each model served in turn under the same load (warm-up, then the test sentences twice,
    the faster run kept) with the server's resident memory (and its model process's) sampled
    after each run: a checkpoint against its export."""
    rows = []
    for name, path in models.items():
        server = rnnkit_server(path, out, f"footprint_{name}")
        try:
            load_test(server.port, "/v1/en_fr/translate", [rnnkit_payload(s) for s in lines[:64]], clients)
            runs, peak = [], 0.0
            for _ in range(2):
                seconds, answers = load_test(server.port, "/v1/en_fr/translate", [rnnkit_payload(s) for s in lines],
                                             clients, lambda b: b["translations"][0]["text"])
                runs.append(seconds)
                peak = max(peak, rss_mb(server.proc.pid))
            errors = sum(a is None or a.startswith("HTTP ") for a in answers)
            rows.append(f"  `rnnkit serve` {name}: {len(lines) / min(runs):.1f} sent/s (faster of two runs), resident "
                        f"{peak:.0f} MB after the load, {errors} errors")
        finally:
            server.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="training updates of each model (reused when present)")
    ap.add_argument("--requests", type=int, default=10_000, help="valid requests of the memory check")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--no-onmt", action="store_true", help="leave OpenNMT-py's onmt_server out")
    ap.add_argument("--out", type=Path, default=OUT / "serve")
    ap.add_argument("--quick", action="store_true", help="20 sentences and few requests: checks the plumbing")
    ap.add_argument("--onmt-only", action="store_true", help="only the onmt_server load (for checking it)")
    ap.add_argument("--export-only", action="store_true", help="only serving the checkpoint against serving its "
                                                               "ONNX export ('rnnkit export'), under the same load")
    args = ap.parse_args()
    if not TEST.is_file():
        print(f"skipped: {TEST} is absent")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    lines = TEST.read_text(encoding="utf-8").splitlines()
    if args.quick:
        lines, args.requests, args.steps, args.clients = lines[:20], 60, min(args.steps, 4), 8
        args.out = Path(tempfile.mkdtemp())
        args.out.mkdir(parents=True, exist_ok=True)
    n = len(lines)
    ckpt, onmt_model = train_models(args.steps, args.out, not args.no_onmt)
    rows: list[tuple[str, str]] = []
    if args.onmt_only:
        print(onmt_load(onmt_model, args, lines, REF.read_text(encoding="utf-8").splitlines()[:len(lines)]))
        return 0
    if args.export_only:
        folder = args.out / "export"
        if not folder.exists():
            subprocess.run([sys.executable, "-m", "rnnkit", "export", str(ckpt), "-o", str(folder)], cwd=ROOT,
                           check=True, capture_output=True)
        print(f"{cpu_description()}; {n} sentences of test_2016_flickr, beam {BEAM}, {args.clients} clients, one "
              f"sentence per request")
        for row in served_footprint({"checkpoint": ckpt, "export": folder}, args.out, lines, args.clients):
            print(row)
        return 0

    # in one process: the command as a whole process, and the decoding alone
    import sacrebleu
    import torch

    import rnnkit

    src = args.out / "test.en"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run_cli() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rnnkit", "translate", str(ckpt), "--beam", str(BEAM),
                        "--length-penalty", str(ALPHA), "-i", str(src), "-o", str(args.out / "cli.fr")],
                       cwd=ROOT, check=True)
        return time.perf_counter() - start

    # the machine is shared: the command and the server's load alternate, twice each, and the
    # faster of each pair is compared
    cli_times = [run_cli()]
    cli_out = (args.out / "cli.fr").read_text(encoding="utf-8").splitlines()
    torch.set_num_threads(2)
    m = rnnkit.load(ckpt)
    start = time.perf_counter()
    batch_out = m.translate(lines, beam=BEAM, length_penalty=ALPHA)
    api_s = time.perf_counter() - start
    alone, alone_s = [], []
    for s in lines:
        t = time.perf_counter()
        alone.append(m.translate([s], beam=BEAM, length_penalty=ALPHA)[0])
        alone_s.append(time.perf_counter() - t)
    refs = REF.read_text(encoding="utf-8").splitlines()[:n]
    bleu = sacrebleu.corpus_bleu(cli_out, [refs]).score
    rows += [("`m.translate(all lines)` in process", f"{api_s:.1f} s, {n / api_s:.1f} sent/s"),
             ("`m.translate([s])` one at a time", f"{sum(alone_s):.1f} s, median {1000 * statistics.median(alone_s):.1f} ms")]
    del m

    # the server under 32 clients
    server = rnnkit_server(ckpt, args.out, "server")
    try:
        warm = [rnnkit_payload(s) for s in lines[:64]]
        load_test(server.port, "/v1/en_fr/translate", warm, args.clients)
        served_times = []
        for _ in range(2):
            seconds, answers = load_test(server.port, "/v1/en_fr/translate", [rnnkit_payload(s) for s in lines],
                                         args.clients, lambda b: b["translations"][0]["text"])
            served_times.append(seconds)
            if len(cli_times) < 2:
                cli_times.append(run_cli())
        cli_s, served_s = min(cli_times), min(served_times)
        rows.insert(0, (f"`rnnkit translate` whole process ({n} sentences, beam {BEAM}), two runs",
                        f"{' and '.join(f'{t:.1f}' for t in cli_times)} s: {n / cli_s:.1f} sent/s, BLEU {bleu:.1f}"))
        errors = [a for a in answers if a is None or a.startswith("HTTP ")]
        differ = [i for i, (a, b) in enumerate(zip(answers, alone)) if a != b]
        differ_batch = [i for i, (a, b) in enumerate(zip(answers, batch_out)) if a != b]
        rows += [(f"`rnnkit serve`, {args.clients} clients, one sentence per request, two runs",
                  f"{' and '.join(f'{t:.1f}' for t in served_times)} s: {n / served_s:.1f} sent/s, "
                  f"{(n / served_s) / (n / cli_s):.2f}x the whole process (faster run of each), "
                  f"{(n / served_s) / (n / api_s):.2f}x the in-process decoding; {len(errors)} errors"),
                 ("answers unlike the sentence decoded alone", f"{len(differ)} of {n}"),
                 ("answers unlike the in-process batch decode", f"{len(differ_batch)} of {n}")]
        (args.out / "differences.json").write_text(json.dumps(
            [{"source": lines[i], "alone": alone[i], "served": answers[i]} for i in differ], indent=1,
            ensure_ascii=False))
        # one client: latency
        c = Client(server.port)
        k = min(n, 200)
        lat = []
        for s in lines[:k]:
            t = time.perf_counter()
            c.post("/v1/en_fr/translate", rnnkit_payload(s))
            lat.append(time.perf_counter() - t)
        inproc = statistics.median(alone_s[:k])
        rows.append((f"one client, {k} requests: median latency",
                     f"{1000 * statistics.median(lat):.1f} ms vs in-process {1000 * inproc:.1f} ms "
                     f"(bound 1.2x + 5 ms = {1000 * (1.2 * inproc + 0.005):.1f} ms)"))
        # malformed requests
        count, failures = malformed(server.port)
        alive = Client(server.port).post("/v1/en_fr/translate", rnnkit_payload(lines[0]))[0] == 200
        rows.append(("malformed requests answered 4xx with a JSON error",
                     f"{count - len(failures)} of {count}; server alive afterwards: {alive}"))
        for f in failures[:10]:
            print("  not 4xx JSON:", f)
        # memory over many valid requests (greedy, so that the count fits the time)
        payloads = [rnnkit_payload(lines[i % n], beam=1) for i in range(args.requests)]
        warmup = max(1, args.requests // 10)
        load_test(server.port, "/v1/en_fr/translate", payloads[:warmup], args.clients)
        base = rss_mb(server.proc.pid)
        samples = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                samples.append(rss_mb(server.proc.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        mem_s, mem_answers = load_test(server.port, "/v1/en_fr/translate", payloads[warmup:], args.clients)
        done.set()
        sampler.join()
        samples.append(rss_mb(server.proc.pid))
        bad = sum(1 for a in mem_answers if isinstance(a, str))
        rows.append((f"{args.requests} valid requests (greedy; first {warmup} warm-up): resident memory",
                     f"{base:.0f} MB after warm-up, peak {max(samples):.0f} MB, end {samples[-1]:.0f} MB: "
                     f"+{100 * (max(samples) / base - 1):.1f}%; {bad} errors; {len(payloads) - warmup} in {mem_s:.0f} s"))
    finally:
        server.stop()

    st = sigterm_under_load(ckpt, args.out, lines, 3.0 if args.quick else 5.0)
    rows.append(("SIGTERM under 32-client load",
                 f"server received {st['received']}, answered {st['answered']}; clients got {st['ok']} answers, "
                 f"{st['dropped']} closed idle connections, {st['refused']} refused, {st['other']} other; "
                 f"exit {st['exit']}"))
    rows.append(("page in headless Chromium", browser_check(ckpt, args.out, lines[0])))

    if onmt_model is not None:
        onmt_s, onmt_bleu = onmt_load(onmt_model, args, lines, refs)
        rows.append((f"`onmt_server`, {args.clients} clients, one sentence per request",
                     f"{onmt_s:.1f} s, {n / onmt_s:.1f} sent/s, BLEU {onmt_bleu:.1f}; rnnkit serve "
                     f"{(n / served_s) / (n / onmt_s):.2f}x"))

    print(f"\nrnnkit serve on CPU {cpu_description()}, torch {torch.__version__}, models trained {args.steps} steps"
          + ("  (--quick: not a result)" if args.quick else ""))
    print("| measure | result |")
    print("| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")
    (args.out / "results.json").write_text(json.dumps(dict(rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
