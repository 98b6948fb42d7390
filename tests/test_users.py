"""Several users (issue 19): the users file, and each user seeing only their own adapters, jobs and generations.

The same isolation through the live web app is in tests/test_users_web.py."""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import create_engine, inspect, text

from dreambooth_lora import users as users_module
from dreambooth_lora.cli import main
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.formats import export_adapter
from dreambooth_lora.jobs import Jobs, JobStatus
from dreambooth_lora.library import Library
from dreambooth_lora.users import UsersFile, add_user, hash_password, parse_users, read_users, verify_password
from test_cli import add_untrained_adapter, assert_refused, run
from test_cluster import postgres_url  # noqa: F401 - the fixture: a new database on the PostgreSQL of .ci/run


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    """A cheap scrypt cost keeps these tests fast; the hash records its cost, so verifying follows it."""
    monkeypatch.setattr(users_module, "SCRYPT_N", 2**4)


# ----- the users file -----

def test_a_hash_verifies_its_password_only_and_is_salted():
    first, second = hash_password("s3cret pass"), hash_password("s3cret pass")
    assert first != second and first.startswith("scrypt$16$8$1$")  # a new salt each time, the cost in the string
    assert verify_password("s3cret pass", first) and verify_password("s3cret pass", second)
    assert not verify_password("s3cret pasS", first) and not verify_password("", first)
    with pytest.raises(UserError, match="empty"):
        hash_password("")


def test_add_then_verify_and_admin_flag(tmp_path):
    path = tmp_path / "users.txt"
    add_user(path, "alice", "wonderland")
    add_user(path, "root", "toor", admin=True)
    read = read_users(path)
    assert [(u.name, u.admin) for u in read.values()] == [("alice", False), ("root", True)]
    assert "wonderland" not in path.read_text()
    logins = UsersFile(path)
    assert logins.login("alice", "wonderland") and not logins.login("alice", "toor")
    assert not logins.login("mallory", "wonderland") and logins.is_admin("root") and not logins.is_admin("alice")
    with pytest.raises(UserError, match="already in"):
        add_user(path, "alice", "again")
    with pytest.raises(UserError, match="empty"):
        add_user(path, "bob", "")
    add_user(path, "bob", "builder")  # a user added while serving logs in without a restart
    assert logins.login("bob", "builder")


@pytest.mark.parametrize("line, named", [
    ("alice", "expected NAME:HASH"),
    ("alice:scrypt$16$8$1$AAAA$AAAA:root", "expected NAME:HASH"),
    ("alice:plaintext", "not scrypt$N$r$p$salt$key"),
    ("alice:scrypt$15$8$1$AAAA$AAAA", "not scrypt$N$r$p$salt$key"),  # N not a power of two
    ("../etc:scrypt$16$8$1$AAAA$AAAA", "Invalid user name"),
])
def test_a_malformed_line_is_refused_naming_its_line(line, named):
    with pytest.raises(UserError) as refused:
        parse_users("# the studio's users\n\n" + line + "\n", "users.txt")
    assert str(refused.value).startswith("users.txt, line 3:") and named in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_user_twice_and_a_missing_file_are_refused(tmp_path):
    line = "alice:" + hash_password("x")
    with pytest.raises(UserError, match="line 2: user 'alice' is listed twice"):
        parse_users(f"{line}\n{line}\n")
    with pytest.raises(UserError, match="No users file"):
        read_users(tmp_path / "missing.txt")


def test_cli_users_add_reads_the_password_from_stdin(capsys, tmp_path, monkeypatch):
    path = tmp_path / "users.txt"
    monkeypatch.setattr("sys.stdin", io.StringIO("open sesame\n"))
    code, out, _ = run(capsys, "users", "add", "alice", "--users", path, "--admin")
    assert code == 0 and "added admin user alice" in out
    assert verify_password("open sesame", read_users(path)["alice"].password_hash) and read_users(path)["alice"].admin
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert_refused(capsys, ["users", "add", "bob", "--users", path], "password is empty")
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert_refused(capsys, ["users", "add", "alice", "--users", path], "already in")
    assert_refused(capsys, ["users", "add", "bad:name", "--users", path], "Invalid user name")
    assert_refused(capsys, ["serve", "--auth", "a:b", "--users", path], "not allowed with argument")
    (tmp_path / "bad.txt").write_text("alice\n")
    assert_refused(capsys, ["serve", "--users", tmp_path / "bad.txt", "--data-root", tmp_path / "d"], "line 1")


# ----- scoping: adapters and jobs -----

@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


def test_a_user_sees_only_their_adapters_and_another_users_reads_as_missing(root, tmp_path):
    library = Library(root)
    alice, bob = library.for_user("alice"), library.for_user("bob")
    admin = library.for_user("root", admin=True)
    dog = add_untrained_adapter(alice, "dog")
    assert dog.owner == "alice" and [e.name for e in alice.list()] == ["dog"]
    assert bob.list() == [] and not bob.name_taken("dog")
    for act in (lambda: bob.get("dog"), lambda: bob.get(dog.id), lambda: bob.delete("dog"),
                lambda: bob.rename("dog", "mine"), lambda: bob.rename(dog.id, "mine")):
        with pytest.raises(UserError) as refused:
            act()
        assert str(refused.value).startswith("No adapter named") and "alice" not in str(refused.value)
    # names are per user: bob's own dog is no clash, and neither user's changes the other's
    bobs_dog = add_untrained_adapter(bob, "dog")
    assert bob.get("dog").id == bobs_dog.id and alice.get("dog").id == dog.id
    export_adapter(alice.get("dog"), "diffusers", tmp_path / "a.safetensors")  # export goes through get: alice's only
    # an admin sees everyone's; a name two users share is theirs to pick by id
    assert sorted((e.name, e.owner) for e in admin.list()) == [("dog", "alice"), ("dog", "bob")]
    with pytest.raises(UserError, match="Several users have an adapter named 'dog'"):
        admin.get("dog")
    assert admin.get(dog.id).owner == "alice"
    # the CLI acts as admin: it sees all, and what it adds belongs to no one (only admins see those)
    assert {e.id for e in library.list()} == {dog.id, bobs_dog.id}
    cli_dog = add_untrained_adapter(library, "dog")
    assert cli_dog.owner is None and library.get("dog").id == cli_dog.id  # its own first
    assert [e.id for e in bob.list()] == [bobs_dog.id]
    bob.delete("dog")
    assert {e.id for e in library.list()} == {dog.id, cli_dog.id}
    admin.delete(dog.id)
    assert alice.list() == []


def test_a_user_sees_and_acts_on_only_their_jobs(root, subject_images):
    library = Library(root)
    alice, bob = Jobs(library.for_user("alice")), Jobs(library.for_user("bob"))
    config = TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="box")
    job_id = alice.create(config, subject_images)
    assert alice.get(job_id).owner == "alice" and [j.id for j in alice.list()] == [job_id]
    assert bob.list() == []
    for act in (bob.get, bob.cancel, bob.resume, bob.delete, bob.again):
        with pytest.raises(UserError, match=f"No job '{job_id}'"):
            act(job_id)
    # bob's subject gets a different identifier (library-wide), and the message does not name alice's job
    bob_job = bob.create(config, subject_images)
    assert bob.get(bob_job).config["token"] != "sks" and bob.get(bob_job).name == "box"  # names are per user
    assert job_id not in bob.read_log(bob_job)
    admin = Jobs(library.for_user("root", admin=True))
    assert {j.id for j in admin.list()} == {job_id, bob_job} == {j.id for j in Jobs(library).list()}
    assert alice.cancel(job_id) == JobStatus.CANCELLED
    alice.delete(job_id)
    assert [j.id for j in Jobs(library).list()] == [bob_job]
    assert json.loads(json.dumps(Jobs(library).get(bob_job).to_dict()))["owner"] == "bob"


def test_a_library_restricts_a_query_on_any_owned_table_to_what_its_user_may_see(root, subject_images):
    # Library.visible is the one scoping rule; jobs.py applies it to the jobs table through it
    from sqlalchemy import select

    from dreambooth_lora.db import jobs as jobs_table

    library = Library(root)
    config = TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="box")
    ids = {user: Jobs(library.for_user(user)).create(config, subject_images) for user in ("alice", "bob")}

    def seen(view: Library) -> set:
        with view.engine.connect() as db:
            return set(db.execute(view.visible(select(jobs_table.c.id), jobs_table.c.owner)).scalars())

    assert seen(library.for_user("alice")) == {ids["alice"]} and seen(library.for_user("carol")) == set()
    assert seen(library.for_user("root", admin=True)) == seen(library) == set(ids.values())


def test_a_job_stores_its_adapter_under_its_user(root, subject_images, session_prior_dir):
    from dreambooth_lora.jobs import Runner, run_job

    library = Library(root)
    alice = Jobs(library.for_user("alice"))
    add_untrained_adapter(library.for_user("bob"), "box")  # bob's "box" is no clash for alice's
    job_id = alice.create(TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="box",
                                      steps=2, num_class_images=1), subject_images)
    worker = Jobs(library)  # the worker serves every user
    job = worker.claim_next(Runner.this_process())
    assert job.id == job_id
    assert run_job(worker, job_id, session_prior_dir).status == JobStatus.DONE
    entry = library.for_user("alice").get("box")
    assert entry.owner == "alice" and alice.adapter_name(alice.get(job_id)) == "box"
    assert [e.owner for e in library.for_user("bob").list()] == ["bob"]


def test_generation_history_is_per_user(root):
    from PIL import Image

    from dreambooth_lora.generate import GenerateSettings
    from dreambooth_lora.history import recent_generations, record_generation

    library = Library(root)
    alice, bob = library.for_user("alice"), library.for_user("bob")
    record_generation(alice.history_root, [Image.new("RGB", (8, 8))], GenerateSettings(prompt="a box"), "m", 0.1)
    assert len(recent_generations(alice.history_root)) == 1
    assert recent_generations(bob.history_root) == [] and recent_generations(library.history_root) == []


def test_a_library_from_before_users_keeps_working(tmp_path):
    """Its adapters table had UNIQUE(name) library-wide and neither table had an owner: rebuilt, rows unowned."""
    root = tmp_path / "old"
    root.mkdir()
    engine = create_engine(f"sqlite:///{root / 'library.db'}")
    with engine.begin() as db:
        db.execute(text("CREATE TABLE adapters (id VARCHAR NOT NULL, name VARCHAR NOT NULL, token VARCHAR, "
                        "class_noun VARCHAR, base_model VARCHAR, fingerprint VARCHAR, rank INTEGER, alpha FLOAT, "
                        "steps INTEGER, created FLOAT, size_bytes INTEGER, meta TEXT NOT NULL, PRIMARY KEY (id), UNIQUE (name))"))
        db.execute(text("INSERT INTO adapters VALUES ('a1', 'dog', 'sks', 'dog', 'm', '', 4, 4.0, 10, 1.0, 0, '{}')"))
        db.execute(text("CREATE TABLE jobs (id VARCHAR NOT NULL PRIMARY KEY, status VARCHAR NOT NULL, config TEXT NOT NULL, "
                        "phase VARCHAR, step INTEGER, total INTEGER, losses TEXT, message TEXT, error TEXT, error_kind VARCHAR, "
                        "adapter_id VARCHAR, runner_host VARCHAR, runner_pid INTEGER, runner_started FLOAT, heartbeat FLOAT, "
                        "cancel_requested INTEGER, created FLOAT, updated FLOAT)"))
        db.execute(text("INSERT INTO jobs (id, status, config, created) VALUES ('j1', 'done', '{}', 1.0)"))
    engine.dispose()
    library = Library(root)
    assert [(e.name, e.owner) for e in library.list()] == [("dog", None)]
    assert [(j.id, j.owner) for j in Jobs(library).list()] == [("j1", None)]
    assert library.for_user("alice").list() == [] and Jobs(library.for_user("alice")).list() == []
    assert library.name_taken("dog") and not library.for_user("alice").name_taken("dog")
    assert {"owner"} <= {c["name"] for c in inspect(library.engine).get_columns("adapters")}


def test_the_cli_lists_every_users_adapters_and_jobs_with_their_user(capsys, root, subject_images):
    library = Library(root)
    add_untrained_adapter(library.for_user("alice"), "dog")
    add_untrained_adapter(library, "cat")
    Jobs(library.for_user("bob")).create(TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random",
                                                     name="box"), subject_images)
    code, out, _ = run(capsys, "library", "list", "--data-root", root)
    assert code == 0 and out.splitlines()[0].endswith("USER")
    assert {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]} == {"dog": "alice", "cat": "-"}
    code, out, _ = run(capsys, "jobs", "list", "--data-root", root)
    assert code == 0 and out.splitlines()[1].endswith("bob")
    code, out, _ = run(capsys, "library", "show", "dog", "--data-root", root)
    assert json.loads(out)["owner"] == "alice"


@pytest.mark.slow
def test_on_postgresql_an_old_adapters_table_gets_names_per_user(tmp_path, monkeypatch, postgres_url, subject_images):
    """DBL_DB_URL on PostgreSQL (where `user` would be a reserved word): a table from before users, with a
    library-wide UNIQUE(name), drops it for the per-owner indexes; the NULL owner stays one namespace."""
    engine = create_engine(postgres_url)
    with engine.begin() as db:
        db.execute(text("CREATE TABLE adapters (id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, token VARCHAR, "
                        "class_noun VARCHAR, base_model VARCHAR, fingerprint VARCHAR, rank INTEGER, alpha FLOAT, "
                        "steps INTEGER, created FLOAT, size_bytes INTEGER, meta TEXT NOT NULL)"))
        db.execute(text("INSERT INTO adapters VALUES ('a1', 'dog', 'sks', 'dog', 'm', '', 4, 4.0, 10, 1.0, 0, '{}')"))
    engine.dispose()
    monkeypatch.setenv("DBL_DB_URL", postgres_url)
    library = Library(tmp_path / "data")
    assert [(e.name, e.owner) for e in library.list()] == [("dog", None)]
    alice, bob = library.for_user("alice"), library.for_user("bob")
    add_untrained_adapter(alice, "dog")
    add_untrained_adapter(bob, "dog")
    assert [e.owner for e in alice.list()] == ["alice"] and [e.owner for e in bob.list()] == ["bob"]
    with pytest.raises(UserError, match="already exists"):
        add_untrained_adapter(bob, "dog")
    job_id = Jobs(alice).create(TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="box"),
                                subject_images)
    assert Jobs(bob).list() == [] and Jobs(library).get(job_id).owner == "alice"
    with library.engine.begin() as db:  # the database itself refuses a second unowned "dog"
        with pytest.raises(Exception, match="adapters_unowned_name"):
            db.execute(text("INSERT INTO adapters (id, name, meta) VALUES ('a2', 'dog', '{}')"))
