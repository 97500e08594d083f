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

logger = logging.getLogger(__name__)

# What `make demo` leaves behind (svfseg demo's runs/demo/<regime>/best.pt): used when --checkpoint is
# omitted; the first must exist, the others are offered for comparison when they exist.
DEFAULT_CHECKPOINTS = (Path("runs/demo/svf/best.pt"), Path("runs/demo/frozen/best.pt"))
LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL_HINT = "pip install 'svfseg[serve]'"


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `svfseg serve`."""
    parser.add_argument("--checkpoint", nargs="+", type=Path, metavar="C",
                        help=f"checkpoint(s) or merged export(s) to offer; the first is the default "
                             f"(default: {', '.join(map(str, DEFAULT_CHECKPOINTS))} from `make demo`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password in the browser")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, MB (default 20)")
    parser.add_argument("--size", type=int, help="test size (default: each checkpoint's data.test_size)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def resolve_checkpoints(given: Optional[list[Path]]) -> list[Path]:
    """The checkpoints to offer: those given (each must exist), else the demo's.

    Raises:
        FileNotFoundError: a given checkpoint is missing, or none is given and the demo has not run.
    """
    if given:
        missing = [str(p) for p in given if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--checkpoint: no such file: {', '.join(missing)}")
        return list(given)
    first = DEFAULT_CHECKPOINTS[0]
    if not first.is_file():
        raise FileNotFoundError(f"no --checkpoint given and the demo's {first} does not exist (looked in "
                                f"{Path.cwd()}); "
                                f"run `make demo` (or `svfseg demo`) to train one, or `svfseg train --config "
                                f"RECIPE.yaml` and pass --checkpoint runs/RUN/best.pt")
    return [p for p in DEFAULT_CHECKPOINTS if p.is_file()]


def parse_auth(value: Optional[str]) -> Optional[tuple[str, str]]:
    """``USER:PASS`` -> (user, password); None stays None."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth: expected USER:PASS with both parts non-empty, got {value!r}")
    return user, password


def host_warning(host: str, auth: Optional[tuple[str, str]]) -> Optional[str]:
    """What to tell the user about binding ``host``; None for this machine only."""
    if host in LOOPBACK:
        return None
    return (f"--host {host} makes the app reachable from other machines; "
            + ("it asks for the --auth password, sent over plain HTTP" if auth
               else "it has no authentication (add --auth USER:PASS)"))


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def run_serve_cli(args: argparse.Namespace) -> int:
    """Start the web app and serve until Ctrl-C or SIGTERM; the temp folder is removed on the way out."""
    if importlib.util.find_spec("gradio") is None:
        print(f"svfseg serve: the web app needs gradio: {INSTALL_HINT}", file=sys.stderr)
        return 1
    checkpoints = resolve_checkpoints(args.checkpoint)
    auth = parse_auth(args.auth)
    warning = host_warning(args.host, auth)
    if warning:
        print(f"svfseg serve: warning: {warning}", file=sys.stderr)
    work_dir = Path(tempfile.mkdtemp(prefix="svfseg-serve-"))
    # Gradio keeps uploads and served files under GRADIO_TEMP_DIR (read when gradio is imported):
    # pointing it at our folder keeps every upload in one place that is removed on exit.
    os.environ["GRADIO_TEMP_DIR"] = str(work_dir / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes, one line each
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from svfseg.serve.app import build_app
        from svfseg.serve.handlers import ModelCache

        app = build_app(ModelCache(args.device), [str(c) for c in checkpoints], work_dir, size=args.size)
        app.queue(default_concurrency_limit=1)
        try:
            app.launch(server_name=args.host, server_port=args.port, auth=auth,
                       max_file_size=int(args.max_upload_mb * 1024 * 1024), prevent_thread_lock=True, quiet=True,
                       show_error=False, footer_links=[])
        except OSError as e:  # e.g. the port is taken
            print(f"svfseg serve: error: cannot serve on {args.host}:{args.port} (pick another with --port): "
                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            return 1
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"svfseg serve: http://{host}:{args.port} with {', '.join(map(str, checkpoints))}\n"
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
