"""Several users through the web API (issue 19): `serve --users FILE` with two users; bob cannot list, generate
with, export or delete alice's adapter, nor see, cancel, resume or delete her job; an admin sees everyone's.

The real app in its own process (`python -m app --users FILE`), driven by gradio_client logged in as each user,
calling the same endpoints the page's buttons and timers call."""

from __future__ import annotations

import json

import httpx
import pytest
from gradio_client import Client

from dreambooth_lora.config import TrainConfig
from dreambooth_lora.jobs import Jobs, JobStatus
from dreambooth_lora.library import Library
from dreambooth_lora.users import add_user
from test_cli import add_untrained_adapter
from live import running_studio

pytestmark = pytest.mark.slow
WEIGHTS = [False] + [1.0] * 8  # the Generate handlers' trailing inputs: text apart, 4 weights, 4 text strengths


@pytest.fixture
def studio(tmp_path, subject_images):
    """alice owns adapter 'dog' and a (finished, so untouched by the worker) job; bob owns nothing; root is admin."""
    library = Library(tmp_path / "data")
    dog = add_untrained_adapter(library.for_user("alice"), "dog")
    alice_jobs = Jobs(library.for_user("alice"))
    job_id = alice_jobs.create(TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="box"),
                               subject_images)
    alice_jobs.cancel(job_id)  # before serve starts: its worker never trains it
    users = tmp_path / "users.txt"
    for name, password, admin in (("alice", "alice-pw", False), ("bob", "bob-pw", False), ("root", "root-pw", True)):
        add_user(users, name, password, admin)
    with running_studio(["--users", users, "--data-root", tmp_path / "data", "--prior-dir", tmp_path / "prior"],
                        tmp_path / "serve.log") as url:
        yield url, library, dog, job_id


def fetch_file(url: str, user: str, password: str, path) -> int:
    """The status of a logged-in GET of `path` through Gradio's file route, as a page would ask for it."""
    with httpx.Client(base_url=url) as http:
        assert http.post("/login", data={"username": user, "password": password}).status_code == 200
        return http.get(f"/gradio_api/file={path}").status_code


def call(client: Client, endpoint: str, *inputs) -> str:
    """An endpoint's outputs as one JSON text (their order follows Gradio's, so the checks look for content)."""
    return json.dumps(client.predict(*inputs, api_name=endpoint), default=str)


def test_bob_cannot_list_generate_with_export_or_delete_alices_adapter_or_touch_her_job(studio):
    url, library, dog, job_id = studio
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("bob", "alice-pw"), verbose=False)
    alice = Client(url, auth=("alice", "alice-pw"), verbose=False)
    bob = Client(url, auth=("bob", "bob-pw"), verbose=False)

    # alice sees, exports and generates with her adapter, and sees her job
    assert '"dog"' in call(alice, "/tick", None) and '"dog"' in call(alice, "/adapter_choices", [])
    assert "Exported **dog**" in call(alice, "/do_export", "dog", "diffusers")
    made = call(alice, "/generate", "a photo of sks dog", "", "builtin:tiny-random", ["dog"], 0, 2, 5.0, 0, 1, *WEIGHTS)
    assert "1 images from builtin:tiny-random with dog" in made
    assert job_id in call(alice, "/refresh", None)

    # bob: nothing of hers in any listing ...
    listing = call(bob, "/tick", None)
    assert "dog" not in listing and dog.id not in listing
    assert "dog" not in call(bob, "/adapter_choices", [])
    assert "dog" not in call(bob, "/history_frame")  # nor her generation in the history
    assert job_id not in call(bob, "/refresh", None) and job_id not in call(bob, "/picked", job_id)
    assert "The library is empty" in call(bob, "/show", "dog")
    # ... and by name or by id, her adapter reads as missing: no generating with it, no export, no delete
    for name in ("dog", dog.id):
        refused = f"No adapter named '{name}'"
        assert refused in call(bob, "/generate", "a photo of sks dog", "", "builtin:tiny-random", [name], 0, 2, 5.0, 0, 1,
                               *WEIGHTS)
        assert refused in call(bob, "/do_export", name, "kohya")
        assert refused in call(bob, "/do_delete", name)
        assert refused in call(bob, "/do_rename", name, "mine")
    # her job reads as missing too
    for endpoint in ("/cancel_clicked", "/resume_clicked", "/delete_clicked", "/again_clicked", "/export_settings_clicked"):
        assert f"No job '{job_id}'" in call(bob, endpoint, job_id), endpoint

    # nothing of alice's changed; bob's "dog" is his own; an admin sees both
    assert [(e.id, e.name) for e in library.for_user("alice").list()] == [(dog.id, "dog")]
    assert Jobs(library).get(job_id).status == JobStatus.CANCELLED and Jobs(library).get(job_id).owner == "alice"
    assert library.for_user("bob").list() == []
    # nor can anyone fetch the data root's files by path through Gradio's file route (app/file_guard.py): not the
    # database with everyone's rows, not her adapter's weights; the images above came through Gradio's cache
    for user, password in (("bob", "bob-pw"), ("alice", "alice-pw")):
        for path in (library.root / "library.db", next((library.root / "adapters" / dog.id).glob("*.safetensors"))):
            assert fetch_file(url, user, password, path) == 403, (user, path)
    root = Client(url, auth=("root", "root-pw"), verbose=False)
    assert '"dog"' in call(root, "/tick", None) and job_id in call(root, "/refresh", None)
    assert "Deleted job" in call(alice, "/delete_clicked", job_id) and "Deleted **dog**" in call(alice, "/do_delete", "dog")
    assert library.list() == [] and Jobs(library).list() == []
