"""The console: static HTML, CSS and JavaScript (``static/``, served by ``bridge/web/console.py``)
and the pure session logic (``session``). No build step, nothing fetched from the internet."""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"

__all__ = ["STATIC_DIR"]
