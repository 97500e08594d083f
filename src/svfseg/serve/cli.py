"""`svfseg serve` arguments and startup: checkpoints, temp folder, host warning, launch."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from svfseg.serve.auth import PASSWORD_ENV, LoginGuard, parse_auth, resolve_auth
from svfseg.serve.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERIES

__all__ = ["add_serve_arguments", "resolve_checkpoints", "parse_auth", "host_warning", "run_serve_cli"]
logger = logging.getLogger(__name__)

# What `make demo` leaves behind (svfseg demo's runs/demo/<regime>/best.pt, each with a SOURCE.json):
# served when --checkpoint is omitted, those that exist, in this order.
DEFAULT_CHECKPOINTS = (Path("runs/demo/svf/best.pt"), Path("runs/demo/frozen/best.pt"))
LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL_HINT = "pip install 'svfseg[serve]'"
EXAMPLES_DIR = "examples"  # in the server's temp folder: one-click example inputs copied from the demo data


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg serve`."""
    parser.add_argument("--checkpoint", nargs="+", type=Path, metavar="C",
                        help=f"checkpoint(s) or merged export(s) to offer; the first is the default "
                             f"(default: {', '.join(map(str, DEFAULT_CHECKPOINTS))} from `make demo`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER",
                        help=f"ask for a user name and password in the browser; the password comes from "
                             f"${PASSWORD_ENV} or --password-file (USER:PASS also works, visible in ps); failed "
                             f"logins wait 0.5 s, doubling to 8 s")
    parser.add_argument("--password-file", type=Path, metavar="FILE",
                        help="file whose first line is the --auth password")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, MB (default 20)")
    parser.add_argument("--max-pixels", type=_positive_float, default=DEFAULT_MAX_PIXELS / 1e6, metavar="MP",
                        help=f"largest image accepted, megapixels (default {DEFAULT_MAX_PIXELS / 1e6:g}); larger "
                             f"ones are refused from their header, before decoding")
    parser.add_argument("--max-queries", type=_positive_int, default=DEFAULT_MAX_QUERIES, metavar="N",
                        help=f"most queries in one request (default {DEFAULT_MAX_QUERIES})")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch CPU threads (default: one per core); on a machine shared with other jobs fewer "
                             "threads can be faster")
    parser.add_argument("--size", type=int, help="test size (default: each checkpoint's data.test_size)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {text}")
    return value


def resolve_checkpoints(given: Optional[list[Path]]) -> list[Path]:
    """The checkpoints to offer: those given (each must exist), else the demo's.

    Raises:
        FileNotFoundError: a given checkpoint is missing, or none is given and the demo has not run.
        CheckpointError: a given file is not an svfseg checkpoint (an S file, a foreign or damaged file):
            refused at start-up from its metadata, not on the first request.
    """
    if given:
        missing = [str(p) for p in given if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--checkpoint: no such file: {', '.join(missing)}")
        from svfseg.engine.checkpoint import read_checkpoint

        for p in given:  # memory-mapped: the metadata only
            read_checkpoint(p, ("model", "config", "describe"), "an svfseg checkpoint (best.pt/last.pt or a merged "
                                                                "export)", lazy=True)
        return list(given)
    found = [p for p in DEFAULT_CHECKPOINTS if p.is_file()]
    if not found:
        raise FileNotFoundError(f"no --checkpoint given and the demo's {DEFAULT_CHECKPOINTS[0]} does not exist "
                                f"(looked in {Path.cwd()}); "
                                f"run `make demo` (or `svfseg demo`) to train one, or `svfseg train --config "
                                f"RECIPE.yaml` and pass --checkpoint runs/RUN/best.pt")
    return found


def host_warning(host: str, auth: Optional[tuple[str, str]]) -> Optional[str]:
    """What to tell the user about binding ``host``; None for this machine only."""
    if host in LOOPBACK:
        return None
    return (f"--host {host} makes the app reachable from other machines; "
            + ("it asks for the --auth password, sent over plain HTTP" if auth
               else f"it has no authentication (add --auth USER with ${PASSWORD_ENV} set)"))


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _drop_client_disconnects(record: logging.LogRecord) -> bool:
    """A browser that went away mid-upload (e.g. a file over --max-upload-mb) is not a server error:
    uvicorn would print starlette's ClientDisconnect with a whole traceback; keep one line instead."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and type(exc).__name__ == "ClientDisconnect":
        logger.info("a client disconnected during a request (%s)", record.getMessage()[:80])
        return False
    return True


def run_serve_cli(args: argparse.Namespace) -> int:
    """Start the web app and serve until Ctrl-C or SIGTERM; the temp folder is removed on the way out."""
    if importlib.util.find_spec("gradio") is None:
        print(f"svfseg serve: the web app needs gradio: {INSTALL_HINT}", file=sys.stderr)
        return 1
    checkpoints = resolve_checkpoints(args.checkpoint)
    auth, auth_warning = resolve_auth(args.auth, args.password_file)
    for warning in (auth_warning, host_warning(args.host, auth)):
        if warning:
            print(f"svfseg serve: warning: {warning}", file=sys.stderr)
    from svfseg.engine.runtime import set_threads

    threads = set_threads(args.threads)
    max_pixels = int(args.max_pixels * 1e6)
    work_dir = Path(tempfile.mkdtemp(prefix="svfseg-serve-"))
    # Gradio keeps uploads and served files under GRADIO_TEMP_DIR (read when gradio is imported):
    # pointing it at our folder keeps every upload in one place that is removed on exit.
    os.environ["GRADIO_TEMP_DIR"] = str(work_dir / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes, one line each
    logging.getLogger("uvicorn.error").addFilter(_drop_client_disconnects)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from svfseg.serve.app import CSS, build_app
        from svfseg.serve.examples import demo_examples
        from svfseg.serve.handlers import ModelCache

        served = [str(c) for c in checkpoints]
        examples = demo_examples(served, work_dir / EXAMPLES_DIR)
        app = build_app(ModelCache(args.device), served, work_dir, size=args.size, max_pixels=max_pixels,
                        max_queries=args.max_queries, examples=examples)
        app.queue(default_concurrency_limit=1)
        try:
            app.launch(server_name=args.host, server_port=args.port,
                       auth=LoginGuard(*auth).check if auth else None,
                       max_file_size=int(args.max_upload_mb * 1024 * 1024), prevent_thread_lock=True, quiet=True,
                       show_error=False, footer_links=[], css=CSS, allowed_paths=[str(work_dir / EXAMPLES_DIR)])
        except OSError as e:  # e.g. the port is taken
            print(f"svfseg serve: error: cannot serve on {args.host}:{args.port} (pick another with --port): "
                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            return 1
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"svfseg serve: http://{host}:{args.port} with {', '.join(map(str, checkpoints))} "
              f"({threads} torch thread{'s' if threads > 1 else ''}; at most {args.max_queries} queries of "
              f"{args.max_pixels:g} MP per request)\n"
              f"uploads and results in {work_dir} (removed on exit); Ctrl-C to stop", flush=True)
        try:
            while app.is_running:  # the server runs in its own thread; this one waits for a signal
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("svfseg serve: stopping", flush=True)
        finally:
            app.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0
