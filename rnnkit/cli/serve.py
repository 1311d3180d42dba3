"""``rnnkit serve``: trained models over HTTP."""
from __future__ import annotations

import errno
import os
import socket
from typing import List

import typer

from rnnkit.cli.common import (bad_option, err_console, int8_option, note,
                               precision_option, user_errors)
from rnnkit.runtime.manifest import PREPACK_VARIABLE


def serve(
    checkpoints: List[str] = typer.Argument(..., metavar="CKPT...",
                                            help="Checkpoints to serve, each PATH (named after its run folder; "
                                                 "an export folder after itself) or NAME=PATH."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Sentences decoded together at most."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0,
                                      help="How long a short batch waits for more requests."),
    max_queue: int = typer.Option(1024, "--max-queue", min=1,
                                  help="Sentences waiting per model; beyond it requests get 503."),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in bytes (413 beyond)."),
    max_lines: int = typer.Option(256, "--max-lines", min=1, help="Lines per request at most."),
    max_tokens: int = typer.Option(400, "--max-tokens", min=1, help="Tokens per line at most."),
    max_streams: int = typer.Option(10_000, "--max-streams", min=1,
                                    help="Live streams open at once per model; an open beyond it gets 429."),
    stream_idle_seconds: float = typer.Option(600.0, "--stream-idle-seconds", min=0.001,
                                              help="A live stream not fed for this long is closed."),
    precision: str = precision_option(),
    int8: bool = int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    in_process: bool = typer.Option(False, "--in-process",
                                    help="Run the models in the server's own process (by default they run in a "
                                         "process of their own, so that HTTP work does not hold them up)."),
) -> None:
    """Serve trained models over HTTP, batching concurrent requests.

    Each model gets JSON routes under /v1/NAME/; OpenAPI docs are at /docs and a page to try the models at /.

    Example:  rnnkit serve runs/en_fr/best.pt --port 8000

    Then:     curl -s localhost:8000/v1/en_fr/translate -d '{"lines": ["a man is riding a bike ."], "beam": 5}'

    Language models and forecasters also keep live streams: POST /v1/NAME/streams opens one, POST
    /v1/NAME/streams/ID feeds it text (or rows) and answers from the state kept since the last feed.
    """
    with user_errors():
        check_port_free(host, port)     # before minutes of loading, not after
        import uvicorn

        import rnnkit
        from rnnkit.serve import Limits, build_app, model_names

        limits = Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_body=max_body,
                        max_lines=max_lines, max_tokens=max_tokens, max_streams=max_streams,
                        stream_idle_seconds=stream_idle_seconds)
        names = model_names(checkpoints)
        # a server runs for long: exports' weights packed for onnxruntime's kernels (faster
        # steps for more memory; one-shot commands keep the weights once, mapped from the file)
        os.environ.setdefault(PREPACK_VARIABLE, "1")
        worker = None
        if in_process:
            models = {name: rnnkit.load(path, device=device, precision=precision, int8=int8, note=note)
                      for name, path in names.items()}
        else:
            from rnnkit.serve import ModelProcess

            worker = ModelProcess(names, device=device, precision=precision, int8=int8, note=note)
            models = worker.models
        for name, path in names.items():
            err_console.print(f"loaded {name}: {models[name].kind} from {path}")

        def stopped(counts: dict[str, int]) -> None:
            if worker is not None:
                worker.close()
            err_console.print(f"stopped: {counts['received']} requests received, {counts['answered']} answered")

        app_ = build_app(models, limits, on_shutdown=stopped)
    err_console.print(f"serving on http://{host}:{port} (docs: /docs, try it: /)")
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)


def check_port_free(host: str, port: int) -> None:
    """One line and exit 2 when the address cannot be listened on (a server already there)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        bad_option(f"--host {host}: {err.strerror}")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as uvicorn does: a closed server's port is free
        try:
            probe.bind(address)
        except OSError as err:
            hint = "; another server is listening there: stop it or choose another --port" \
                if err.errno == errno.EADDRINUSE else ""
            bad_option(f"cannot listen on {host}:{port}: {err.strerror}{hint}")
