"""Start the service on the current Ray and block until Ctrl-C (``sp-ray serve``).

Ray: the one this process already runs, else the cluster ``RAY_ADDRESS`` names, else a new local one.
Everything that can be checked before Ray starts is (the model's metadata, the batch limit, on a local
Ray the port), and the replicas' CPUs / GPUs are checked against the cluster, so that an impossible
request fails with a message instead of waiting forever for resources.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from sp_ray.errors import UserError
from sp_ray.onnx_model import read_model_info
from sp_ray.serve.settings import ServeSettings, batch_limit

log = logging.getLogger(__name__)


def check_port_free(host: str, port: int) -> None:
    """Raise UserError when ``host:port`` cannot be bound here (in use, or not an address of this machine)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise UserError(f"--host {host} --port {port} cannot be bound ({err.strerror}); pick another --port, "
                        "or stop what listens there") from None


def check_resources(settings: ServeSettings, available: dict[str, float]) -> None:
    """Raise UserError when the cluster cannot hold the replicas (``available``: ``ray.cluster_resources()``)."""
    needs = {"CPU": settings.replicas * settings.threads, "GPU": settings.replicas if settings.gpu else 0}
    for name, needed in needs.items():
        if needed and available.get(name, 0.0) < needed:
            per = f"{settings.threads} CPU(s)" if name == "CPU" else "1 GPU"
            raise UserError(
                f"{settings.replicas} replica(s) x {per} need {needed:g} {name}, but the Ray cluster has "
                f"{available.get(name, 0.0):g}; lower --replicas" + (" or --threads" if name == "CPU" else
                                                                      " or drop --gpu")
            )


def start_service(settings: ServeSettings) -> str:
    """Deploy the application on the current Ray (see the module docstring) and return its URL.

    Returns once every replica is up.

    Raises:
        UserError: a bad model, batch limit, port or resource request.
    """
    info = read_model_info(settings.model)
    batch_limit(settings, info)
    import ray
    from ray import serve

    from sp_ray.serve.app import APP_NAME, build_application

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            check_port_free(settings.host, settings.port)
        ray.init(address=address or None)
    check_resources(settings, ray.cluster_resources())
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the service is reachable from other machines and Serve has no authentication; "
                    "put it behind an authenticating reverse proxy (README: Export and deployment)", settings.host)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def serve_forever(settings: ServeSettings) -> None:
    """``start_service``, then block until Ctrl-C; then stop what this call started.

    On a Ray this call started, Serve and Ray are shut down; on a cluster it joined, only this
    application is deleted (other Serve applications keep running).
    """
    import ray
    from ray import serve

    from sp_ray.serve.app import APP_NAME

    started_ray = not ray.is_initialized()
    own_cluster = started_ray and not os.environ.get("RAY_ADDRESS")
    deployed = False
    try:
        url = start_service(settings)
        deployed = True
        print(f"serving {settings.model} at {url}: POST {url}/predict, GET {url}/healthz, GET {url}/metadata "
              "(Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the service", flush=True)
    finally:
        try:
            if ray.is_initialized():
                if own_cluster:
                    serve.shutdown()
                elif deployed:
                    serve.delete(APP_NAME)
                if started_ray:
                    ray.shutdown()  # a joined cluster keeps running: this only disconnects
        except Exception as err:  # a terminal's Ctrl-C reaches the local Ray's processes too, which may be gone
            log.warning("stopping Serve: %s (the local Ray was stopping already)", err)
