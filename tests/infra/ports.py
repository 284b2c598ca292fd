"""Loopback ports and readiness polling for the components the tests start."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def loopback_opener(ssl_context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """A urllib opener that ignores proxy variables: tests talk to 127.0.0.1 only."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    return urllib.request.build_opener(*handlers)


def wait_http(
    url: str,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    *,
    process: subprocess.Popen[bytes] | None = None,
) -> int:
    """Poll `url` until it answers with any HTTP status; return that status.

    A 401 counts as ready (an auth-protected `/v2/` answers so). Fails early
    with RuntimeError when `process` (the server being waited for) has exited.
    """
    opener = loopback_opener(ssl_context)
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode} before answering")
        try:
            with opener.open(url, timeout=1.0) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as error:
            return error.code
        except (OSError, urllib.error.URLError) as error:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s: {error}") from error
        time.sleep(_POLL_INTERVAL)
