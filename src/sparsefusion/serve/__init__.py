"""``sparsefusion serve``: a local web playground and run viewer (FastAPI + uvicorn).

- ``runs.py``: the run folders being served (config, checkpoints, metrics, eval rows, reports);
- ``paths.py``: the one place that turns a requested file path into a file (never outside a run);
- ``params.py``: validation of a generation request (errors name the field);
- ``models.py``: models loaded once and kept, one generation at a time each, bounded queues;
- ``render.py``: generated samples as JSON (images and audio inline as data URLs);
- ``plots.py``: per-modality loss curves as PNG;
- ``app.py``: the FastAPI app (JSON API and the static pages under ``static/``).

The server dependencies are the optional extra ``serve``; :func:`require_server` says what to
install when they are missing.
"""

from __future__ import annotations

import importlib.util

SERVER_MODULES = ("fastapi", "uvicorn", "multipart")


def require_server() -> None:
    """Raise ImportError naming the extra to install when a server dependency is missing."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join("python-multipart" if m == "multipart" else m for m in missing)
        raise ImportError(
            f"sparsefusion serve needs {names}: pip install 'sparsefusion[serve]' "
            "(or pip install fastapi uvicorn python-multipart)"
        )
