"""app/file_guard.py: which Gradio file requests are refused (the served app is checked in tests/test_users_web.py)."""

from pathlib import Path

from app.file_guard import refused


def test_refuses_paths_under_the_data_root_but_not_gradios_folders_or_other_paths(tmp_path):
    root = (tmp_path / "data").resolve()
    cache = (tmp_path / "data" / "gradio-cache").resolve()  # a cache inside the root stays served
    for path in (f"/gradio_api/file={root}/library.db", f"/file={root}/adapters/x/lora.safetensors",
                 f"/gradio_api/file={root}/jobs/../library.db",
                 "/gradio_api/file=" + f"{root}/library.db".replace("/", "%2F")):
        assert refused(path, root, [cache]), path
    for path in (f"/gradio_api/file={cache}/abc/image.png", f"/gradio_api/file={tmp_path.resolve()}/other.png",
                 f"/gradio_api/file={root}-elsewhere/x.png", "/gradio_api/file=relative.png",
                 "/gradio_api/upload", f"/config?file={root}/library.db", "/gradio_api/file=https://example.com/a.png"):
        assert not refused(path, root, [cache]), path


def test_a_symlink_into_the_root_is_refused(tmp_path):
    root = tmp_path / "data"
    (root / "adapters").mkdir(parents=True)
    (tmp_path / "link").symlink_to(root / "adapters")
    assert refused(f"/gradio_api/file={tmp_path}/link/x.safetensors", root.resolve(), [])
