"""A small static web server for the browser example (examples/web) and a bundle.

``python -m ptedge.serve_static --bundle BUNDLE_DIR`` serves the current folder at ``/``
and the bundle at ``/bundle/``, with the headers a WebAssembly page needs: the MIME types
of ``.mjs`` and ``.wasm`` files; cross-origin isolation (COOP/COEP), without which a
browser gives the page no ``SharedArrayBuffer`` and onnxruntime-web runs on one thread;
and ``Cache-Control: no-cache`` with ``Last-Modified``, so a browser keeps the bundle in
its cache and only revalidates it (a 304 answer) when the page is opened again.

Not for production traffic (one Python process, no TLS, no compression): any web server
that sends the same headers serves the example. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading
from pathlib import Path

BUNDLE_PREFIX = "/bundle/"
MIME_TYPES = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".data": "application/octet-stream",
    ".ort": "application/octet-stream",
    ".map": "application/json",
}
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory`` at ``/`` and ``bundle`` (if any) at ``/bundle/``."""

    extensions_map = http.server.SimpleHTTPRequestHandler.extensions_map | MIME_TYPES

    def __init__(self, *args, bundle: Path | None, isolate: bool, quiet: bool, **kw):
        self.bundle, self.isolate, self.quiet = bundle, isolate, quiet
        super().__init__(*args, **kw)

    def translate_path(self, path: str) -> str:
        route = path.split("?", 1)[0].split("#", 1)[0]
        if self.bundle is None or not route.startswith(BUNDLE_PREFIX):
            return super().translate_path(path)
        # the parent maps a URL under `directory` (dropping "..", decoding %xx); re-root it
        inner = Path(super().translate_path("/" + path[len(BUNDLE_PREFIX) :]))
        return str(self.bundle / inner.relative_to(self.directory))

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        if self.isolate:
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the parent's name)
        if not self.quiet:
            super().log_message(format, *args)


def make_server(
    root: str | Path = ".",
    bundle: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    isolate: bool = True,
    quiet: bool = False,
) -> http.server.ThreadingHTTPServer:
    """A server (not yet serving) for ``root`` at ``/`` and ``bundle`` at ``/bundle/``;
    ``port=0`` picks a free port (``server.server_address[1]``)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if bundle is not None:
        bundle = Path(bundle).resolve()
        if not (bundle / "ptedge.json").is_file():
            raise ValueError(f"{bundle}: not a bundle (no ptedge.json)")
    handler = functools.partial(
        Handler, directory=str(root), bundle=bundle, isolate=isolate, quiet=quiet
    )
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve_in_thread(**kw) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start ``make_server(**kw)`` in a daemon thread; returns it and its base URL."""
    server = make_server(**kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ptedge.serve_static", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--bundle", help="Bundle folder, served at /bundle/.")
    ap.add_argument("--root", default=".", help="Folder served at / (default: here).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--no-isolate",
        action="store_true",
        help="Leave out COOP/COEP: the page is not cross-origin isolated (one thread).",
    )
    args = ap.parse_args(argv)
    try:
        server = make_server(args.root, args.bundle, args.host, args.port, not args.no_isolate)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    host, port = server.server_address[:2]
    print(f"serving {Path(args.root).resolve()} at http://{host}:{port}/", file=sys.stderr)
    if args.bundle:
        print(
            f"serving {Path(args.bundle).resolve()} at http://{host}:{port}/bundle/",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
