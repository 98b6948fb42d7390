"""The studio in a real browser: upload, train in the background worker, see it in the Library, generate.

Starts `python -m app` on a free port with temporary data and prior folders and drives headless
Chromium through Playwright. Screenshots of each tab land in $DBL_UI_SHOTS (default /tmp/ui-shots).
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest
from live import running_studio

from dreambooth_lora.tinyworld import subject_image_paths

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("DBL_UI_SHOTS", "/tmp/ui-shots"))


def _require_browser():
    problem = None
    if not CHROMIUM.exists():
        problem = f"no Chromium at {CHROMIUM} (install it with .ci/install-browser)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright Python package is not installed"
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run under CI: {problem}")
    if problem:
        pytest.skip(problem)


@pytest.fixture
def server(tmp_path):
    with running_studio(["--data-root", tmp_path / "data", "--prior-dir", tmp_path / "prior"], tmp_path / "server.log",
                        stop_seconds=40) as url:
        yield url, tmp_path


def _download(page, url: str, link, folder: Path) -> Path:
    """Fetch the file behind a download link as the browser would, into `folder` under its own name."""
    href = link.get_attribute("href")
    path = folder / urllib.parse.unquote(href.rsplit("/", 1)[-1])
    path.write_bytes(urllib.request.urlopen(urllib.parse.urljoin(url, href), timeout=30).read())
    return path


def _clear_file(page, elem_id: str) -> None:
    """Empty a file box that holds an earlier upload, so its file input is there again."""
    clear = page.locator(f"#{elem_id} button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator(f"#{elem_id} input[type=file]").wait_for(state="attached", timeout=10_000)


def test_train_then_generate_in_the_browser(server):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(url)
            expect(page.get_by_text("DreamBooth-LoRA Studio").first).to_be_visible(timeout=30_000)

            # --- Train: three photos, a short run on the tiny random model ---
            page.locator("#train-images input[type=file]").set_input_files([str(p) for p in subject_image_paths("bluecyan-box")[:3]])
            expect(page.locator("#upload-notes")).to_contain_text("3 photos ready", timeout=30_000)
            page.locator("#train-class").get_by_role("textbox").fill("box")
            page.locator("#train-name").get_by_role("textbox").fill("browser-box")
            base = page.locator("#train-base-model input")
            base.fill("builtin:tiny-random")
            base.press("Enter")
            page.get_by_text("Advanced").click()
            page.locator("#adv-steps input").fill("4")
            page.locator("#adv-steps input").press("Tab")  # commit the number: without it the run sometimes kept 0 (400 steps)
            page.locator("#adv-class-images input").fill("2")
            page.locator("#adv-sample-every input").fill("2")  # samples at step 2, one per prompt
            page.locator("#adv-sample-prompts textarea").fill("a photo of sks box\na photo of sks box on a red background")
            # a person's mistakes: one error line naming the studio's own field, no CLI flag, no toast
            page.locator("#train-token").get_by_role("textbox").fill("my subject")
            page.locator("#start-training").click()
            expect(page.locator("#start-message")).to_contain_text("Error: Token 'my subject'", timeout=30_000)
            expect(page.locator("#start-message")).not_to_contain_text("--")
            page.locator("#train-token").get_by_role("textbox").fill("sks")
            base.fill("builtin:nope")  # refused when submitted, not after queueing
            base.press("Enter")
            page.locator("#start-training").click()
            expect(page.locator("#start-message")).to_contain_text("Unknown built-in model 'builtin:nope'", timeout=30_000)
            base.fill("builtin:tiny-random")
            base.press("Enter")
            page.locator("#start-training").click()
            expect(page.locator("#start-message")).to_contain_text("Queued", timeout=30_000)
            expect(page.locator("#job-status")).to_contain_text("done", timeout=150_000)
            expect(page.locator("#jobs-table")).to_contain_text("browser-box")
            # the monitor: speed, elapsed time and each phase's time; the job's log; the Advanced sample settings
            expect(page.locator("#job-monitor")).to_contain_text("it/s", timeout=30_000)
            expect(page.locator("#job-monitor")).to_contain_text("class images")
            expect(page.locator("#job-monitor")).to_contain_text("training")
            page.get_by_text("Log", exact=True).click()
            expect(page.locator("#job-log textarea")).to_have_value(re.compile("started on.*done at step 4", re.S))
            expect(page.locator("#train-samples")).to_contain_text("step 2 · #2", timeout=30_000)
            expect(page.locator("#job-status")).to_contain_text("#2 a photo of sks box on a red background")
            page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
            page.locator("#job-panel").screenshot(path=str(SHOTS / "train-monitor.png"))

            # --- Export the job's settings, import them back into the form; a file that is not one is refused ---
            page.locator("#export-settings").click()
            settings_link = page.locator("#settings-download a").first
            expect(settings_link).to_have_attribute("href", re.compile(r"browser-box\.settings\.json$"), timeout=30_000)
            settings = _download(page, url, settings_link, tmp_path)
            page.locator("#adv-sample-every input").fill("0")
            page.locator("#settings-box").get_by_text("Settings file").first.click()
            bad = tmp_path / "notes.json"
            bad.write_text("{not json")
            page.locator("#settings-import input[type=file]").set_input_files(str(bad))
            expect(page.locator("#settings-message")).to_contain_text("Error: notes.json is not valid JSON", timeout=30_000)
            _clear_file(page, "settings-import")
            page.locator("#settings-import input[type=file]").set_input_files(str(settings))
            expect(page.locator("#settings-message")).to_contain_text("are in the form", timeout=30_000)
            expect(page.locator("#adv-sample-every input")).to_have_value("2")
            expect(page.locator("#train-name").get_by_role("textbox")).to_have_value("browser-box-2")  # a free name
            expect(page.locator("#adv-sample-prompts textarea")).to_have_value(re.compile("on a red background"))
            page.reload()  # the job panel never claims there are no jobs while it reads them
            expect(page.get_by_text("DreamBooth-LoRA Studio").first).to_be_visible(timeout=30_000)
            assert "No jobs yet" not in page.locator("#job-status").inner_text()
            expect(page.locator("#job-status")).to_contain_text("done", timeout=30_000)
            page.locator("#example-subjects").get_by_text("redyellow-ball").click()  # a thumbnail fills the form
            expect(page.locator("#upload-notes")).to_contain_text("4 photos ready", timeout=30_000)
            expect(page.locator("#train-class").get_by_role("textbox")).to_have_value("ball")

            # --- Library: the adapter is listed with its details ---
            page.get_by_role("tab", name="Library").click()
            expect(page.locator("#library-table")).to_contain_text("browser-box", timeout=30_000)
            expect(page.locator("#library-details")).to_contain_text("builtin:tiny-random", timeout=30_000)
            for row in ("training photos", "learning rate", "training time", "parameters",
                        "LoRA on the UNet attention + identifier embedding"):
                expect(page.locator("#library-details")).to_contain_text(row)
            expect(page.locator("#library-photos img")).to_have_count(3, timeout=30_000)
            page.screenshot(path=str(SHOTS / "library-details.png"), full_page=True)
            page.locator("#library-export").click()
            expect(page.locator("#library-download a").first).to_have_attribute(
                "href", re.compile(r"browser-box\.diffusers\.safetensors$"), timeout=30_000)
            page.screenshot(path=str(SHOTS / "library.png"), full_page=True)

            # --- Rename, then export, with no reload: the new name everywhere, no error ---
            page.locator("#library-new-name").get_by_role("textbox").fill("browser-box2")
            page.locator("#library-rename").click()
            expect(page.locator("#library-message")).to_contain_text("Renamed to browser-box2", timeout=30_000)
            expect(page.locator("#library-table")).to_contain_text("browser-box2", timeout=30_000)
            expect(page.locator("#library-details")).to_contain_text("browser-box2")
            expect(page.locator("#library-choice input")).to_have_value("browser-box2")
            expect(page.locator("#library-download a")).to_have_count(0)  # the old file's link is gone
            page.wait_for_timeout(4 * 1500)  # a few refresh ticks: each raised "not in the list of choices" before
            page.locator("#library-export").click()
            expect(page.locator("#library-download a").first).to_have_attribute(
                "href", re.compile(r"browser-box2\.diffusers\.safetensors$"), timeout=30_000)
            expect(page.locator("#library-details")).to_contain_text("browser-box2")
            expect(page.locator(".toast-body")).to_have_count(0)
            page.screenshot(path=str(SHOTS / "library-renamed.png"), full_page=True)

            # --- Generate: the adapter at weight 0.8 ---
            page.get_by_role("tab", name="Generate").click()
            page.locator("#gen-prompt").get_by_role("textbox").fill("a photo of sks box")
            page.locator("#gen-adapters input").click()
            page.get_by_role("option", name="browser-box2").click()
            page.keyboard.press("Escape")
            weight = page.locator("#gen-weight-0 input[type=number]")
            expect(weight).to_be_visible(timeout=10_000)
            weight.fill("0.8")
            weight.press("Enter")
            expect(page.locator("#gen-hints")).to_contain_text("sks")
            page.locator("#gen-run").click()
            expect(page.locator("#gen-message")).to_contain_text("browser-box2 × 0.8", timeout=90_000)
            page.wait_for_function(
                "() => { const imgs = [...document.querySelectorAll('#gen-gallery img')];"
                " return imgs.length >= 4 && imgs.every(i => i.complete && i.naturalWidth > 0); }", timeout=30_000)
            expect(page.locator("#gen-gallery")).to_contain_text("seed 0")  # each image says its seed
            expect(page.locator("#gen-download a").first).to_have_attribute("href", re.compile(r"generation-.*\.zip$"),
                                                                            timeout=30_000)
            with zipfile.ZipFile(_download(page, url, page.locator("#gen-download a").first, tmp_path)) as archive:
                assert len([n for n in archive.namelist() if n.endswith(".png")]) == 4
            # the history: a second generation, then the first one picked from the table comes back with its settings
            page.locator("#gen-seed input").fill("7")
            page.locator("#gen-run").click()
            expect(page.locator("#gen-gallery")).to_contain_text("seed 7", timeout=90_000)
            older, newer = sorted(p.name for p in (tmp_path / "data" / "generations").iterdir() if p.name[0] != ".")
            expect(page.locator("#gen-history")).to_contain_text(newer, timeout=30_000)
            page.locator("#gen-history").get_by_text(older, exact=True).click()
            expect(page.locator("#gen-message")).to_contain_text("From the history", timeout=30_000)
            expect(page.locator("#gen-seed input")).to_have_value("0")
            expect(page.locator("#gen-gallery")).to_contain_text("seed 0")
            page.screenshot(path=str(SHOTS / "generate-history.png"), full_page=True)
            page.locator("#gen-sweep").click()
            expect(page.locator("#gen-message")).to_contain_text("Weight sweep of browser-box2", timeout=90_000)
            expect(page.locator("#sweep-download a").first).to_have_attribute(
                "href", re.compile(r"weight-sweep\.png$"), timeout=30_000)
            page.locator("#mix-name").get_by_role("textbox").fill("browser-mix")
            page.locator("#mix-save").click()
            expect(page.locator("#gen-message")).to_contain_text("Saved the mix as browser-mix", timeout=60_000)
            page.screenshot(path=str(SHOTS / "generate.png"), full_page=True)

            # --- Library again: import a LoRA file, delete the mix after confirming ---
            page.get_by_role("tab", name="Library").click()
            expect(page.locator("#library-table")).to_contain_text("browser-mix", timeout=30_000)
            page.get_by_text("Import a LoRA file").click()
            lora_file = next((tmp_path / "data" / "adapters").glob("*/adapter.safetensors"))
            page.locator("#import-file input[type=file]").set_input_files(str(lora_file))
            page.locator("#import-name").get_by_role("textbox").fill("imported-box")
            page.locator("#import-base input").fill("builtin:nope")
            page.locator("#import-base input").press("Enter")
            page.locator("#import-button").click()  # a person's mistake: one sentence, no traceback
            expect(page.get_by_text("Unknown built-in model 'builtin:nope'").first).to_be_visible(timeout=30_000)
            page.locator("#import-base input").fill("builtin:tiny-random")
            page.locator("#import-base input").press("Enter")
            page.locator("#import-button").click()
            expect(page.locator("#library-message")).to_contain_text("Imported imported-box", timeout=60_000)
            expect(page.locator("#library-table")).to_contain_text("imported-box", timeout=30_000)
            page.locator("#library-table").get_by_text("browser-box2", exact=True).click()  # a row picks its adapter
            expect(page.locator("#library-details")).to_contain_text("browser-box2", timeout=30_000)

            # --- kohya export, then import with its sidecar embedding as the second upload ---
            page.locator("#library-format").get_by_text("kohya").click()
            page.locator("#library-export").click()
            links = page.locator("#library-download a")
            expect(links).to_have_count(2, timeout=30_000)  # the LoRA and its identifier embedding
            kohya = [_download(page, url, links.nth(i), tmp_path) for i in range(2)]
            lora = next(p for p in kohya if not p.name.endswith(".embedding.safetensors"))
            sidecar = next(p for p in kohya if p.name.endswith(".embedding.safetensors"))
            _clear_file(page, "import-file")
            page.locator("#import-file input[type=file]").set_input_files(str(lora))
            page.locator("#import-embedding input[type=file]").set_input_files(str(sidecar))
            page.locator("#import-name").get_by_role("textbox").fill("kohya-box")
            page.locator("#import-button").click()
            expect(page.locator("#library-message")).to_contain_text("Imported kohya-box", timeout=60_000)
            expect(page.locator("#library-message")).not_to_contain_text("without")
            expect(page.locator("#library-details")).to_contain_text("identifier embedding, imported from a kohya file",
                                                                     timeout=30_000)
            choice = page.locator("#library-choice input")
            choice.click()
            page.get_by_role("option", name="browser-mix").click()
            expect(page.locator("#library-details")).to_contain_text("mix of browser-box2 × 0.8")  # its parts
            expect(page.locator("#library-details")).to_contain_text("box (mix)")  # not "class box" or steps 0
            expect(page.locator("#library-samples img")).to_have_count(4, timeout=30_000)  # rendered when saved
            page.screenshot(path=str(SHOTS / "library-mix.png"), full_page=True)
            page.locator("#library-delete").click()
            page.locator("#library-delete-confirm").click()
            expect(page.locator("#library-message")).to_contain_text("Deleted browser-mix", timeout=30_000)
            expect(page.locator("#library-table")).not_to_contain_text("browser-mix", timeout=30_000)
            page.screenshot(path=str(SHOTS / "library-after.png"), full_page=True)

            # --- Train again: a finished job can be deleted; its adapter stays ---
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#resume-job")).to_be_hidden()  # done: nothing to resume
            expect(page.locator("#train-again")).to_be_visible()
            page.locator("#delete-job").click()
            expect(page.locator("#job-message")).to_contain_text("Deleted job", timeout=30_000)
            expect(page.locator("#job-status")).to_contain_text("No jobs yet", timeout=30_000)
            page.screenshot(path=str(SHOTS / "train-after.png"), full_page=True)

            # --- Generate: a fifth adapter is named as ignored, not dropped silently (the library no longer changes,
            # so no refresh of the adapter choices runs meanwhile) ---
            page.get_by_role("tab", name="Generate").click()
            picker = page.locator("#gen-adapters input")
            for extra in ("extra-1", "extra-2", "extra-3", "extra-4"):
                picker.fill(extra)
                picker.press("Enter")
            page.keyboard.press("Escape")
            expect(page.locator("#gen-hints")).to_contain_text("Only the first 4 adapters are used; ignored: extra-4",
                                                               timeout=30_000)
        except Exception:
            page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    shutil.copytree(SHOTS, tmp_path / "shots", dirs_exist_ok=True)
    server_log = (tmp_path / "server.log").read_text()
    assert "not in the list of choices" not in server_log and "Traceback" not in server_log
