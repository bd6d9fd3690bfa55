"""``bonecluster serve``: a local web viewer and JSON API over a trained run folder.

See :func:`bonecluster.serve.app.create_app` for the routes and the safety limits.
"""

from __future__ import annotations

from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name == "create_app":  # imported on use: FastAPI is an optional extra (bonecluster[serve])
        from bonecluster.serve.app import create_app

        return create_app
    raise AttributeError(name)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 50,
          log_level: str = "info", max_decodes: int = 2, limits: dict | None = None) -> None:
    """Load ``run`` and serve the viewer with uvicorn until interrupted (Ctrl-C).

    ``max_decodes`` and ``limits``: see :func:`bonecluster.serve.app.create_app`.
    """
    import logging

    try:
        import uvicorn

        from bonecluster.serve.app import create_app
    except ImportError as err:
        raise RuntimeError(f"the web viewer needs the serve extra: pip install 'bonecluster[serve]' ({err})") from err

    if not 0 < max_upload_mb <= 4096:
        raise ValueError(f"--max-upload-mb must be in (0, 4096], got {max_upload_mb}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    # Bound to a loopback address, only requests naming it in their Host header are answered
    # (a guard against DNS rebinding); bound elsewhere on purpose, any Host is accepted.
    # (Starlette cannot match an IPv6 Host header, so ::1 accepts any.)
    hosts = None if host in ("127.0.0.1", "localhost") else ["*"]
    if host not in LOOPBACK:
        logging.getLogger("bonecluster").warning(
            "serving on %s: anyone who can reach this address can upload images and rename clusters", host)
    app = create_app(run, max_upload_bytes=int(max_upload_mb * 2**20), allowed_hosts=hosts,
                     max_decodes=max_decodes, limits=limits)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {run} at http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
