"""CI, second half of the torch-free check, run by the Python of a fresh environment that
holds `pip install ./runtime` and no torch: every inference command on the exports that
.ci/make_exports.py wrote, then `rnnkit serve` with a live stream of the language model and
of the forecaster, stopped by SIGTERM. Standard library only; exits non-zero on any failure.

    ENV/bin/python .ci/runtime_check.py FOLDER
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RNNKIT = str(Path(sys.executable).with_name("rnnkit"))


def run(*args: str, stdin: str | None = None) -> str:
    res = subprocess.run([RNNKIT, *args], input=stdin, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"rnnkit {' '.join(args)}: exit {res.returncode}\n{res.stderr[-2000:]}")
    print(f"ok: rnnkit {' '.join(a if len(a) < 60 else '...' for a in args)}")
    return res.stdout


def call(port: int, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    out = Path(sys.argv[1])
    try:
        import torch  # noqa: F401
        raise SystemExit("torch is importable here: this check needs an environment without it")
    except ImportError:
        pass
    lm, tr, cls, fc = (str(out / f"{n}_onnx") for n in ("lm", "tr", "cls", "fc"))
    assert len(run("generate", lm, "--prime", "The", "--length", "40", "--seed", "1")) >= 40
    src = (ROOT / "data/parallel/test.en").read_text(encoding="utf-8").splitlines()[:20]
    ref = ROOT / "data/parallel/test.fr"
    (out / "src.en").write_text("\n".join(src) + "\n", encoding="utf-8")
    (out / "ref.fr").write_text("\n".join(ref.read_text(encoding="utf-8").splitlines()[:20]) + "\n", encoding="utf-8")
    assert len(run("translate", tr, "--beam", "3", stdin="\n".join(src) + "\n").splitlines()) == 20
    assert "bleu" in json.loads(run("eval", tr, "--src", str(out / "src.en"), "--ref", str(out / "ref.fr"), "--json"))
    assert json.loads(run("eval", lm, "--data", str(ROOT / "data/harbour.txt"), "--json"))["ppl"] > 1
    assert len(run("predict", cls, "--input", str(out / "labels.tsv")).splitlines()) > 0
    assert "accuracy" in json.loads(run("eval", cls, "--data", str(out / "labels.tsv"), "--json"))
    assert run("predict", fc, "--data", str(out / "series.csv")).count("\n") > 12
    assert "mse" in json.loads(run("eval", fc, "--data", str(out / "series.csv"), "--json"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([RNNKIT, "serve", f"chars={lm}", f"load={fc}", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if call(port, "GET", "/health")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.1)
        opened = call(port, "POST", "/v1/chars/streams", {"text": "The lamp", "top_k": 3})
        fed = call(port, "POST", f"/v1/chars/streams/{opened['id']}", {"text": " was", "continuation": 10})
        assert fed["position"] == len("The lamp was") and len(fed["top"]) == 5 and fed["continuation"]["text"]
        rows = [line.split(",")[1:] for line in (out / "series.csv").read_text().splitlines()[1:61]]
        stream = call(port, "POST", "/v1/load/streams", {"rows": [[float(v) for v in r] for r in rows]})
        assert len(stream["forecast"]) == 12 and stream["position"] == 60
        assert call(port, "GET", "/health")["streams"] == {"chars": 1, "load": 1}
        print("ok: rnnkit serve with live streams of a language model and a forecaster")
    finally:
        server.send_signal(signal.SIGTERM)
        text, _ = server.communicate(timeout=60)
    if server.returncode not in (0, -signal.SIGTERM) or "stopped" not in text:   # uvicorn re-raises the signal once drained
        raise SystemExit(f"rnnkit serve did not stop cleanly (exit {server.returncode}):\n{text[-2000:]}")
    print("torch-free runtime: every command ran without torch")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
