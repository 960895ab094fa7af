"""Serve stage, ``raysearch serve``: start Ray (or join a cluster), deploy the ensemble's app on
``host:port`` (``127.0.0.1`` unless told otherwise), and serve until Ctrl-C or SIGTERM. SIGHUP
reloads the ensemble folder in place (after ``raysearch ensemble`` rewrote it): the replicas swap
models through Serve's ``user_config``, without a restart and without dropping requests.
"""

from __future__ import annotations

import errno
import signal
import threading
import time
import urllib.request

from raysearch.errors import ConfigError

__all__ = ["run_serve"]

APP_NAME = "raysearch"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_listen(host: str, port: int) -> None:
    """Refuse (:class:`ConfigError`) a ``host`` that is not an address of this machine or does
    not resolve, and a ``port`` already in use there, by binding a socket to it for a moment
    (Serve's proxy would otherwise retry it without end, and the command would hang)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: not an address or a name that resolves ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: already in use on {host}; choose another "
                                  "port, or stop what listens there") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host!r}: not an address of this machine (use "
                                  "127.0.0.1, or 0.0.0.0 for every interface)") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise ConfigError(f"--port {port}: permission denied (ports below 1024 need "
                                  "root); choose a port of 1024 or more") from None
            raise ConfigError(f"--host {host!r} --port {port}: cannot listen there ({e})") from None


def _url_host(host: str) -> str:
    """How a client on this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def run_serve(
    *,
    ensemble: str | None = None,
    storage: str = "reports",
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_batch_size: int = 8,
    limits=None,
    gpus: float | None = None,
    address: str | None = None,
    verbose: bool = False,
    console=None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve the ensemble (or experiment) folder ``ensemble``, by default the most recent
    experiment under ``storage``. Blocks until interrupted (or ``stop`` is set). The folder is
    checked (members load) before Ray starts. Raises :class:`ConfigError` for bad options."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if replicas < 1 or max_batch_size < 1:
        raise ConfigError("--replicas and --max-batch-size must be >= 1")
    check_listen(host, port)  # a wrong --host or a busy port answers now, not from inside Serve
    from raysearch.experiment import check_model_folder, find_experiment

    source = check_model_folder(ensemble or find_experiment(None, storage=storage))
    # Signals first: a SIGHUP that comes while Serve starts (after /healthz answers, before the
    # loop below) reloads once the loop runs, instead of killing the server.
    reload = threading.Event()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from rich.console import Console

    from raysearch.cluster import init_ray
    from raysearch.inference.predictor import Predictor
    from raysearch.serve.app import build_app

    console = console or Console(stderr=True)
    Predictor.from_dir(source, device="cpu")  # fails here, with one line, on a broken folder
    init_ray(address=address, verbose=verbose)
    import ray
    from ray import serve

    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    if not verbose:
        # serve.start puts its own INFO handler on "ray.serve" and logs through it at once; a
        # logger filter holds for handlers added later too.
        import logging

        logging.getLogger("ray.serve").addFilter(lambda r: r.levelno >= logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    from raysearch.logs import quiet_libraries

    if not verbose:
        quiet_libraries()  # serve.start put a terminal handler on ray.serve
    version = [0]

    def deploy() -> None:
        app = build_app(source, limits=limits, max_batch_size=max_batch_size, replicas=replicas,
                        gpus=gpus, version=version[0])
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)

    deploy()
    if not verbose:
        quiet_libraries()  # and serve.run another one
    url = f"http://{_url_host(host)}:{port}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=60) as r:
        model = r.read().decode()
    console.print(f"serving {source} at {url} ({model}); Ctrl-C stops, SIGHUP reloads the ensemble",
                  soft_wrap=True)
    if host not in LOOPBACK:
        console.print("[yellow]listening beyond this machine: put an authenticating proxy in "
                      "front; Serve has no authentication[/]")
    if ready is not None:
        ready.set()

    try:
        while not stop.wait(0.5):
            if reload.is_set():
                reload.clear()
                version[0] += 1
                try:
                    Predictor.from_dir(source, device="cpu")
                    deploy()
                    console.print(f"reloaded {source} (version {version[0]})")
                except Exception as e:  # noqa: BLE001 - a broken folder leaves the old model serving
                    console.print(f"[red]reload failed, still serving the previous ensemble: {e}[/]")
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        time.sleep(0.1)
        console.print("stopped")
