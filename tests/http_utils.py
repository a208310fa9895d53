"""A threaded HTTP server on 127.0.0.1 for the download tests (no network beyond this machine)."""

from __future__ import annotations

import contextlib
import http.server
import threading


@contextlib.contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler], **attrs):
    """Serve ``handler`` on a free port of 127.0.0.1; yields (server, base URL). ``attrs`` are
    set on the server (the handler reads them as ``self.server.<name>``)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attrs.items():
        setattr(httpd, name, value)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
