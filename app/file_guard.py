"""Refuses direct downloads of the data root's files through Gradio's file route.

The studio passes the data root to Gradio as an allowed path because a handler's output files (samples, photos,
exports, generated images) must come from an allowed folder before Gradio copies them into its own cache, from where
the page loads them. The same setting would also let any logged-in person fetch any file under the root by its path
(`/gradio_api/file=<root>/library.db`: every user's rows; another user's photos or adapter by a guessed name). Gradio
has no setting that allows a folder for outputs but not for downloads (`blocked_paths` blocks both), so this ASGI
middleware answers 403 to file requests whose path lies under the root; Gradio's cache and upload folders stay
served even when they lie inside it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

FILE_ROUTE = "file="  # Gradio's `/gradio_api/file=<path>` (and its deprecated `/file=<path>`)


def refused(url_path: str, root: Path, served: list[Path]) -> bool:
    """Whether a request path names a file under `root` outside the `served` folders (all resolved)."""
    prefix, found, rest = url_path.partition(FILE_ROUTE)
    if not found or not (prefix.endswith("/gradio_api/") or prefix == "/"):
        return False
    target = Path(unquote(rest))
    if not target.is_absolute():
        return False  # Gradio resolves relative names against its working directory, never the data root
    target = target.resolve()
    return target.is_relative_to(root) and not any(target.is_relative_to(folder) for folder in served)


class DataRootGuard:
    """ASGI middleware: 403 for Gradio file requests under the data root (module docstring)."""

    def __init__(self, app, root: Path):
        from gradio import utils

        self.app, self.root = app, Path(root).resolve()
        self.served = [Path(utils.get_upload_folder()).resolve(), Path(utils.get_cache_folder()).resolve()]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and refused(scope.get("path", ""), self.root, self.served):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"Files of the data root are not served directly."})
            return
        await self.app(scope, receive, send)
