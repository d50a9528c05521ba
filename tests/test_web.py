"""`dpl serve`: the workbench's handlers on the bundled model (few steps), and the page end to end in
a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from dpl_edit.editing import EditConfig
from dpl_edit.errors import DplEditError
from dpl_edit.web.workbench import InvertSettings, Workbench, enlarged

STEPS = 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Workbench(tmp_path_factory.mktemp("serve-cache"), model_name="scenes")


@pytest.fixture(scope="module")
def scene(bench):
    return bench.scene_example(0)


def test_tokens_show_the_marked_words(bench):
    table = bench.tokens("a white {circle} and a purple {square} on sand")
    assert "marked words: circle (3), square (7)" in table
    assert "**circle**" in table and "**square**" in table and "| white |" in table


def test_invert_caches_and_edit_never_inverts_again(bench, scene, monkeypatch):
    path, caption = scene
    seen = []
    view = bench.invert(path, caption, InvertSettings(steps=STEPS), report=lambda done, what: seen.append(what))
    assert not view.cached and view.inversion.method == "dpl" and view.psnr > 20
    assert seen[0].startswith("DDIM inversion") and seen[STEPS].startswith(f"DPL step {STEPS}/{STEPS}: L_at")
    assert seen[STEPS + 1:] == [f"Reconstructing the image: step {i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert view.attention.width > 200 and view.background is not None and view.dpl_log is not None
    assert view.comparison is None  # no NTI inversion of this image yet

    from dpl_edit.web import workbench

    def no_inversion(*args, **kwargs):
        raise AssertionError("inverted again")

    monkeypatch.setattr(workbench, "invert", no_inversion)
    seen.clear()
    again = bench.invert(path, caption, InvertSettings(steps=STEPS),  # a reload, or a second session
                         report=lambda done, what: seen.append(what))
    assert seen == [f"Reconstructing the image: step {i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert again.cached and again.key == view.key and "from the cache" in again.summary
    target = caption.replace("{", "").replace("}", "").replace("circle", "square")
    first = bench.edit(view.key, target, EditConfig(blend=("circle",)))
    reported = []
    second = bench.edit(view.key, target + "\n" + target.replace("sand", "grass"), EditConfig(),
                        report=lambda done, what: reported.append((done, what)))
    assert reported[0] == (0.0, f"Editing 2 target(s): {STEPS} steps")
    assert reported[-1] == (1.0, f"Editing 2 target(s): step {STEPS}/{STEPS}") and len(reported) == STEPS + 1
    with pytest.raises(DplEditError, match="Edit cancelled; the edits shown before are kept"):
        bench.edit(view.key, target, EditConfig(), cancelled=lambda: True)
    assert len(first.edits) == 1 and len(second.edits) == 2 and second.edits[1][1].endswith("grass")
    with zipfile.ZipFile(second.download) as archive:
        names = set(archive.namelist())
        record = json.loads(archive.read("edits/edit.json"))
    assert {"inversion/inversion.json", "edits/edit_1.png", "edits/edit_2.png", "edits/edit_grid.png"} <= names
    assert record["inversion"] == "../inversion" and record["targets"] == [target, target.replace("sand", "grass")]
    assert record["method"] == "dpl" and record["settings"]["cross_replace_steps"] == 0.8


def test_the_model_runs_on_one_thread_whichever_thread_asks(bench, scene, monkeypatch):
    """Gradio calls handlers from its pool's threads and the server loads the model from its main
    thread; the workbench runs all of it on its one torch thread (a second thread's OpenMP team made
    every CPU kernel slower: on_torch_thread)."""
    from dpl_edit.web import workbench

    path, caption = scene
    key = bench.invert(path, caption, InvertSettings(steps=STEPS)).key  # (cached by the test above, or here)
    ran_on = []

    def recorded(*args, **kwargs):
        ran_on.append(threading.current_thread())
        raise DplEditError("recorded")

    monkeypatch.setattr(workbench.Workbench, "_invert", recorded)
    monkeypatch.setattr(workbench, "edit", recorded)
    monkeypatch.setattr(workbench, "load_model", recorded)

    def ask() -> None:
        for call in (lambda: bench.invert(path, "a {tree}", InvertSettings(steps=1)),  # not cached: inverts
                     lambda: bench.edit(key, "a tree", EditConfig()),
                     lambda: bench.model("another model")):
            with pytest.raises(DplEditError, match="recorded"):
                call()

    callers = [threading.Thread(target=ask) for _ in range(2)]
    for caller in callers:
        caller.start()
        caller.join()
    ask()  # and from the main thread
    assert len(ran_on) == 9 and set(ran_on) == {bench._torch_thread}
    assert bench._torch_thread not in (*callers, threading.main_thread())


def test_the_token_helper_and_a_picked_picture_do_not_wait_for_an_inversion(bench, scene):
    """While the torch thread inverts, the page still shows a typed prompt's tokens and a picked
    picture: they read the loaded model's tokenizer and size, which needs no torch thread."""
    path, caption = scene
    bench.model()
    busy, release = threading.Event(), threading.Event()
    bench._torch.submit(lambda: (busy.set(), release.wait(120)))  # an inversion that runs until released
    assert busy.wait(30)
    try:
        with ThreadPoolExecutor(1) as handler:
            table, image = handler.submit(lambda: (bench.tokens(caption), bench.source_image(path))).result(30)
    finally:
        release.set()
    assert "marked words: circle" in table and image.size == (bench.model().image_size,) * 2


def test_dpl_with_a_negative_prompt_null_step_says_what_it_did_to_scene_edits(bench, scene):
    path, caption = scene
    for null in ("negative", "direct"):
        view = bench.invert(path, caption, InvertSettings(null=null, steps=1))
        assert ("damaged the other objects" in view.summary) == (null == "negative"), view.summary


def test_a_job_that_waits_for_the_one_before_says_so(bench, scene):
    """An inversion or edit sent while the torch thread still works (another session's job, or a
    cancelled one finishing its step) shows that it waits, then its own progress; one sent to an idle
    thread starts with its own."""
    from dpl_edit.web.workbench import WAITING

    path, caption = scene
    key = bench.invert(path, caption, InvertSettings(method="nti", steps=1)).key  # (other tests' inversions have more steps)
    target = caption.replace("{", "").replace("}", "").replace("circle", "square")
    busy, release = threading.Event(), threading.Event()

    def blocked() -> bool:  # the first job's cancel check, on the torch thread: holds it there until released
        busy.set()
        return not release.wait(120)

    seen = []
    with ThreadPoolExecutor(2) as handlers:
        first = handlers.submit(bench.invert, path, caption, InvertSettings(method="nti", steps=1),
                                cancelled=blocked)  # from the cache: blocked while its views are drawn
        assert busy.wait(60)
        second = handlers.submit(bench.edit, key, target, EditConfig(), report=lambda done, what: seen.append(what))
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()
        first.result(120), second.result(120)
    assert seen[0] == WAITING and seen[1].startswith("Editing 1 target(s)")
    seen.clear()
    bench.edit(key, target, EditConfig(), report=lambda done, what: seen.append(what))
    assert WAITING not in seen


def test_progress_reaches_gradio_from_the_torch_thread(bench, scene):
    """Gradio's progress bar reports to the event named in the handler thread's context variables;
    the torch thread runs each call in a copy of the caller's context, or every report is lost."""
    import gradio as gr
    from gradio.context import LocalContext

    path, caption = scene
    reported = []

    class Queue:
        def set_progress(self, event_id, iterables):
            reported.append((event_id, iterables[-1].desc))

    def handler() -> None:  # what Gradio's handler thread holds while it runs run_invert
        LocalContext.blocks.set(type("Blocks", (), {"_queue": Queue()})())
        LocalContext.event_id.set("the event")
        progress = gr.Progress()
        bench.invert(path, caption, InvertSettings(method="nti", steps=2), report=lambda done, what: progress(
            done, desc=what))

    caller = threading.Thread(target=handler)
    caller.start()
    caller.join()
    assert [what.split(":")[0] for _, what in reported] == [
        "DDIM inversion (2 steps)", "null-text step 1/2", "null-text step 2/2", *["Reconstructing the image"] * 2]
    assert {event for event, _ in reported} == {"the event"}


def test_nti_and_dpl_of_one_image_are_compared_and_downloaded_apart(bench, scene):
    path, caption = scene
    dpl = bench.invert(path, caption, InvertSettings(steps=STEPS))
    nti = bench.invert(path, caption, InvertSettings(method="nti", steps=STEPS))
    assert nti.comparison is not None and nti.background is None
    # the two inversions of one image and prompt share their key's first part, not their downloads
    for view in (dpl, nti):
        with zipfile.ZipFile(bench.inversion_zip(view.key)) as archive:
            assert json.loads(archive.read("inversion.json"))["method"] == view.inversion.method
    target = caption.replace("{", "").replace("}", "").replace("circle", "square")
    downloads = {bench.edit(view.key, target, config).download
                 for view in (dpl, nti) for config in (EditConfig(), EditConfig(self_replace_steps=0.2))}
    assert len(downloads) == 4


def test_a_cache_entry_that_cannot_be_read_is_inverted_again(tmp_path, caplog):
    """A damaged or other version's entry, or one a server stopped while saving left without its
    inversion.json, is inverted again and replaced, never an error for that image for good; another
    method's unreadable entry leaves the comparison out."""
    bench = Workbench(tmp_path, model_name="scenes")
    path, caption = bench.scene_example(0)
    nti = InvertSettings(method="nti", steps=2)
    first = bench.invert(path, caption, nti)
    folder = tmp_path / "inversions" / first.key
    (folder / "inversion.json").write_text("{cut")
    again = bench.invert(path, caption, nti)
    assert not again.cached and again.key == first.key and "cannot be read" in caplog.text
    (folder / "inversion.json").unlink()  # stopped between the tensors and the JSON
    assert not bench.invert(path, caption, nti).cached
    assert bench.invert(path, caption, nti).cached
    (folder / "inversion.json").write_text("[]")
    dpl = bench.invert(path, caption, InvertSettings(method="dpl", steps=2))
    assert dpl.comparison is None and dpl.inversion.method == "dpl"


def test_cancel_stops_the_inversion_and_keeps_nothing(bench, scene):
    path, caption = scene
    settings = InvertSettings(steps=STEPS, seed=7)
    with pytest.raises(DplEditError, match="cancelled"):
        bench.invert(path, caption, settings, cancelled=lambda: True)
    assert not list((bench.cache_dir / "inversions").glob("*-dpl-*" + bench._key(
        bench.source_image(path), caption, bench.model(), settings)[-12:]))


def test_cancel_while_the_views_are_drawn_keeps_the_finished_inversion(bench, scene):
    """A cancel that comes after the inversion (during the reconstruction the views are drawn from)
    stops the reconstruction and says the inversion is kept; the next Invert takes it from the cache."""
    path, caption = scene
    settings = InvertSettings(steps=2, seed=11)
    steps = []

    def cancelled() -> bool:  # asked at each inversion step (2), then at each reconstruction step
        steps.append(1)
        return len(steps) > 2

    with pytest.raises(DplEditError, match="the inversion itself is kept"):
        bench.invert(path, caption, settings, cancelled=cancelled)
    assert len(steps) == 3  # stopped at the first reconstruction step
    assert bench.invert(path, caption, settings).cached


def test_a_cancelled_job_stays_cancelled_when_the_next_one_starts():
    """Cancel, then Invert again before the cancelled inversion reaches the end of its step: the old
    one still stops (it keeps its own flag) and the new one runs."""
    from dpl_edit.web.app import CancelFlags

    jobs = CancelFlags()
    jobs.cancel("session", "invert")  # nothing runs yet: nothing to cancel
    first = jobs.start("session", "invert")
    others = [jobs.start("another session", "invert"), jobs.start("session", "edit")]
    jobs.cancel("session", "invert")
    second = jobs.start("session", "invert")
    assert first.is_set() and not second.is_set() and not any(flag.is_set() for flag in others)


@pytest.mark.parametrize("case, message", [
    ("no marked word", "curly brackets"),
    ("unbalanced braces", "Unbalanced"),
    ("too long", "77"),
    ("unreadable", "Could not read"),
    ("no image", "Upload an image"),
    ("edit first", "Invert an image first"),
    ("a key that is no key", "Invert an image first"),
    ("unknown model", "Could not load model"),
    ("replace counts", "different token counts"),
])
def test_bad_input_gives_a_message(bench, scene, tmp_path, case, message):
    path, caption = scene
    plain = caption.replace("{", "").replace("}", "")
    with pytest.raises(DplEditError, match=message):
        if case == "no marked word":
            bench.invert(path, plain, InvertSettings(steps=STEPS))
        elif case == "unbalanced braces":
            bench.invert(path, caption.replace("{circle}", "{cirle"), InvertSettings(steps=STEPS))
        elif case == "too long":
            bench.invert(path, "a {red} " + "very " * 80 + "circle", InvertSettings(steps=STEPS))
        elif case == "unreadable":
            broken = tmp_path / "broken.png"
            broken.write_bytes(b"not a png")
            try:
                bench.invert(str(broken), caption, InvertSettings(steps=STEPS))
            except DplEditError as err:  # the page names the file, not the server's upload folder
                assert "broken.png" in str(err) and str(tmp_path) not in str(err)
                raise
        elif case == "no image":
            bench.invert(None, caption, InvertSettings(steps=STEPS))
        elif case == "edit first":
            bench.edit(None, plain, EditConfig())
        elif case == "a key that is no key":  # never a path out of the cache, whatever a session sends
            view = bench.invert(path, caption, InvertSettings(steps=STEPS))
            escape = f"../inversions/{view.key}"
            assert (bench.cache_dir / "inversions" / escape / "inversion.json").is_file()
            for bad in (escape, view.key + "/.", str(bench.cache_dir / "inversions" / view.key)):
                with pytest.raises(DplEditError, match="Invert an image first"):
                    bench.inversion_zip(bad)
            bench.edit(escape, plain, EditConfig())
        elif case == "unknown model":
            Workbench(tmp_path, model_name=str(tmp_path / "no-such-model")).model()
        elif case == "replace counts":
            view = bench.invert(path, caption, InvertSettings(steps=STEPS))
            bench.edit(view.key, plain.replace("circle", "big round ball"), EditConfig())


@pytest.mark.slow  # bfloat16: 35 s on a CPU without bfloat16 instructions
def test_the_workbench_loads_models_in_the_servers_precision_and_keeps_each_precision_apart(tmp_path, monkeypatch):
    from dpl_edit.web import workbench

    loaded = []
    real = workbench.load_model

    def load_model(name, **options):
        loaded.append((name, options))
        return real(name, **{**options, "variant": None})  # the tiny model has no weight files to choose from

    monkeypatch.setattr(workbench, "load_model", load_model)
    half = Workbench(tmp_path / "cache", model_name="tiny", dtype="bfloat16", variant="fp16")
    full = Workbench(tmp_path / "cache", model_name="tiny")
    path, caption = half.scene_example(0)
    views = [bench.invert(path, caption, InvertSettings(steps=1)) for bench in (half, full)]
    assert half.model().dtype == torch.bfloat16 and full.model().dtype == torch.float32
    assert views[0].key != views[1].key and not views[1].cached  # the float32 page did not take the bf16 inversion
    assert "float32 is its reliable precision" in views[0].summary and "reliable" not in views[1].summary
    # the views after each inversion reused the loaded model (its model_id is "tiny:0"); a model named
    # on the page loads in the same precision, with its own weight files
    half.model("tiny:1")
    assert [(name, options["dtype"], options["variant"]) for name, options in loaded] == [
        ("tiny", "bfloat16", "fp16"), ("tiny", "float32", None), ("tiny:1", "bfloat16", None)]


def test_a_handler_that_runs_out_of_memory_says_what_to_change():
    from dpl_edit.web.app import ERROR, _guarded

    @_guarded(1)
    def handler():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    message = handler()
    assert message.startswith(ERROR) and "ran out of memory" in message and "bug" not in message


def test_a_handler_on_a_full_disk_says_so_and_is_no_bug():
    from dpl_edit.web.app import ERROR, _guarded

    @_guarded(2)
    def handler():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/dpl-edit-serve/x.safetensors")

    message, _ = handler()
    assert message.startswith(ERROR) and "the disk is full" in message and "dpl serve --cache" in message
    assert "bug" not in message


def test_small_images_are_enlarged_for_the_page():
    image = Image.new("RGB", (64, 64))
    assert enlarged(image).size == (256, 256)
    assert enlarged(Image.new("RGB", (512, 512))).size == (512, 512)


# ---------------------------------------------------------------------------- the page in a browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    cache = tmp_path_factory.mktemp("page-cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    url = f"http://127.0.0.1:{port}/"
    with open(cache / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpl_edit.cli", "serve", "--port", str(port), "--steps", str(STEPS),
             "--cache", str(cache), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    assert process.poll() is None, (cache / "server.log").read_text()
                    time.sleep(0.5)
            else:
                raise AssertionError("dpl serve did not start: " + (cache / "server.log").read_text())
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the page test needs Debian's chromium and chromium-driver (install.sh installs them)"
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def _wait(condition, seconds: float = 180, what: str = ""):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_page_inverts_edits_and_shows_errors(server, browser):
    from selenium.webdriver.common.by import By

    def text(element_id: str) -> str:
        found = browser.find_elements(By.ID, element_id)
        return found[0].text if found else ""

    def tab(name: str) -> None:
        for button in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
            if button.text.strip() == name:
                button.click()
                return
        raise AssertionError(f"no tab {name}")

    browser.get(server)
    picker = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#picker input"), 60, "the page")[0]
    picker.click()
    option = _wait(lambda: [o for o in browser.find_elements(By.CSS_SELECTOR, "li[role='option']")
                            if "test scene 0 (two objects)" in o.text], 30, "the scene list")[0]
    option.click()
    prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    _wait(lambda: "{circle}" in prompt.get_attribute("value"), 60, "the scene's prompt")
    _wait(lambda: "marked words: circle" in text("tokens"), 60, "the token helper")

    browser.find_element(By.ID, "invert").click()
    # while it runs, the status under Invert shows the step and DPL's losses (not the last message)
    _wait(lambda: re.search(r"DDIM inversion \(3 steps\)|DPL step \d/3: L_at", status := text("status"))
          and "Picked" not in status, 120, "the inversion's progress")
    _wait(lambda: "reconstruction PSNR" in text("status"), 300, "the inversion")
    assert "DPL inversion, 3 steps" in text("status")
    tab("Attention")
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#attention img"), 30, "the attention map")

    target = prompt.get_attribute("value").replace("{", "").replace("}", "").replace("circle", "square")
    browser.find_element(By.CSS_SELECTOR, "#targets textarea").send_keys(target)
    _wait(lambda: browser.find_element(By.ID, "edit").is_enabled(), 30, "the Edit button")
    browser.find_element(By.ID, "edit").click()
    tab("Edits")
    _wait(lambda: "edit(s) of the kept inversion" in text("edit-status"), 300, "the edit")
    edited = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#edits img"), 30, "the edited image")[0]
    # one edit is a thumbnail of the gallery's 4 columns, not the gallery's whole width
    assert edited.size["width"] < browser.find_element(By.ID, "edits").size["width"] / 3
    browser.find_element(By.ID, "cancel-edit").click()  # nothing runs: says so, and the next edit runs whole
    _wait(lambda: "Edit cancelled" in text("edit-status"), 30, "the cancel message")
    browser.find_element(By.ID, "edit").click()
    _wait(lambda: "edit(s) of the kept inversion" in text("edit-status"), 300, "the edit after a cancel")
    cells = browser.find_elements(By.CSS_SELECTOR, "#tokens td")
    assert cells and all(cell.value_of_css_property("white-space") == "nowrap" for cell in cells)  # tokens unbroken

    if os.environ.get("DPL_SCREENSHOT"):  # docs/serve.png
        tab("Attention")
        browser.save_screenshot(os.environ["DPL_SCREENSHOT"])
        tab("Edits")
    prompt.clear()
    prompt.send_keys(target)  # no word in braces: DPL has nothing to learn
    time.sleep(1)
    browser.find_element(By.ID, "invert").click()
    _wait(lambda: "Error:" in text("status"), 120, "the error message")
    assert "curly brackets" in text("status") and "Traceback" not in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, "#edits img"), "the edit shown before the error was lost"


def test_huge_uploads_are_refused_before_decoding(bench, tmp_path, monkeypatch):
    from dpl_edit.web import workbench

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    monkeypatch.setattr(workbench, "MAX_UPLOAD_PIXELS", 50_000)
    with pytest.raises(DplEditError, match="megapixels"):
        bench.source_image(str(big))
    monkeypatch.setattr(workbench, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(DplEditError, match="MB"):
        bench.source_image(str(big))


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", "/no/such/model"], "Could not load model"),
    (["serve", "--port", "70000"], "at most 65535"),
    (["serve", "--steps", "0"], "--steps"),
    (["serve", "--cache", __file__], "is a file; give a folder"),
    (["serve", "--cache", f"{__file__}/cache"], "is a file, not a folder"),
    (["serve", "--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
    (["serve", "--model", "tiny", "--variant", "fp16"], "the tiny model is built in memory"),
])
def test_serve_refuses_bad_settings_before_starting(argv, message, capsys):
    from dpl_edit.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_says_when_its_port_is_taken_before_loading_a_model(capsys, monkeypatch):
    from dpl_edit.cli import main

    monkeypatch.setattr("dpl_edit.web.workbench.Workbench.model", lambda self: pytest.fail("the model was loaded"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Cannot listen on 127.0.0.1:{port} (Address already in use)" in err and "--port" in err, err
