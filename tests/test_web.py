"""The web page, in a real headless Chromium against a real server process."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import encode, real_server, wait_ready

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A random-init server, so the page's warning banner is part of what is tested."""
    log = tmp_path_factory.mktemp("web") / "server.log"
    with real_server(log, weights_mode="random", allow_download="false", device="cpu") as (url, process):
        wait_ready(url, process)
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, base_url: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US")
    page = context.new_page()
    page.goto(base_url)
    expect(page.locator("#status")).to_contain_text("ResNet-18 on cpu")
    yield page
    context.close()


@pytest.fixture
def photo_files(photo_jpegs: dict[str, bytes], tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("chelsea", "coffee"):
        files[name] = tmp_path / f"{name}.jpg"
        files[name].write_bytes(photo_jpegs[name])
    return files


def card(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.locator("article.card", has=page.locator("h2", has_text=name))


def test_an_uploaded_photo_shows_the_apis_top3_as_bars(page: Page, base_url: str, photo_files: dict[str, Path]) -> None:
    page.set_input_files("#file", str(photo_files["chelsea"]))
    result = card(page, "chelsea.jpg")
    expect(result.locator("li.prediction")).to_have_count(3)
    shown = [(row.locator(".label").inner_text(), row.locator(".pct").inner_text())
             for row in result.locator("li.prediction").all()]
    api = httpx.post(f"{base_url}/predict", files={"file": ("c.jpg", photo_files["chelsea"].read_bytes(), "image/jpeg")})
    expected = [(p["label_en"], f"{p['confidence'] * 100:.1f}%") for p in api.json()["predictions"]]
    assert shown == expected
    expect(result.locator(".times")).to_contain_text("inference")
    expect(result.locator(".times")).to_contain_text("round trip")
    expect(result.locator("img.photo")).to_have_attribute("alt", "Preview of chelsea.jpg")
    widths = [bar.evaluate("b => b.getBoundingClientRect().width") for bar in result.locator(".fill").all()]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0


def test_chinese_names_and_interface_and_the_choice_is_remembered(page: Page, base_url: str, photo_files: dict[str, Path]) -> None:
    page.set_input_files("#file", str(photo_files["coffee"]))
    result = card(page, "coffee.jpg")
    expect(result.locator("li.prediction")).to_have_count(3)
    page.click("#lang")
    expect(page.locator("h1")).to_have_text("这张图片里是什么？")
    api = httpx.post(f"{base_url}/predict", files={"file": ("c.jpg", photo_files["coffee"].read_bytes(), "image/jpeg")})
    zh = [p["label_zh"] for p in api.json()["predictions"]]
    expect(result.locator(".label")).to_have_text(zh)
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    page.reload()
    expect(page.locator("h1")).to_have_text("这张图片里是什么？")
    page.click("#lang")  # back to English for the other tests
    expect(page.locator("h1")).to_have_text("What is in this picture?")


def test_a_non_image_gets_a_clear_message(page: Page, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    disguised = tmp_path / "fake.jpg"
    disguised.write_text("a text file renamed to .jpg")
    page.set_input_files("#file", str(text))  # refused in the browser, before uploading
    expect(card(page, "notes.txt").locator(".error")).to_have_text("This file is not an image.")
    page.set_input_files("#file", str(disguised))  # refused by the server (415)
    expect(card(page, "fake.jpg").locator(".error")).to_have_text(
        "This file is not an image format the server understands."
    )


def test_what_the_browser_cannot_show_is_still_classified(page: Page, photos: dict[str, Image.Image],
                                                          photo_jpegs: dict[str, bytes]) -> None:
    tiff = encode(photos["astronaut"], "TIFF")  # the server reads TIFF; Chromium cannot draw it
    page.set_input_files("#file", files=[{"name": "scan.tif", "mimeType": "image/tiff", "buffer": tiff}])
    scan = card(page, "scan.tif")
    expect(scan.locator("li.prediction")).to_have_count(3)
    expect(scan.locator(".unshown")).to_have_text("No preview: this browser cannot show TIFF.")
    expect(scan.locator("img.photo")).to_be_hidden()  # no broken-image icon
    expect(scan.locator(".times")).to_contain_text("batch")
    # A name without an extension: a type the browser does not know is left to the server.
    page.set_input_files("#file", files=[{"name": "IMG_0001", "mimeType": "", "buffer": photo_jpegs["rocket"]}])
    expect(card(page, "IMG_0001").locator("li.prediction")).to_have_count(3)
    page.set_input_files("#file", files=[{"name": "NOTES", "mimeType": "", "buffer": b"plain text"}])
    notes = card(page, "NOTES")
    expect(notes.locator(".error")).to_have_text("This file is not an image format the server understands.")
    expect(notes.locator(".preview")).to_be_hidden()
    # The same bytes again come from the server's cache: no inference time, no batch to report.
    page.set_input_files("#file", files=[{"name": "again.tif", "mimeType": "image/tiff", "buffer": tiff}])
    again = card(page, "again.tif")
    expect(again.locator(".times")).to_contain_text("from the cache")
    expect(again.locator(".times")).not_to_contain_text("batch")


SEND_FILE = """([kind, where, name, bytes]) => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/jpeg" }));
  const event = kind === "paste"
    ? new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true })
    : new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true });
  return document.querySelector(where).dispatchEvent(event);  // false: the page took it over
}"""


@pytest.mark.parametrize(("kind", "where"), [("drop", "#drop"), ("drop", "h1"), ("paste", "body")])
def test_a_photo_dropped_anywhere_or_pasted_is_classified(page: Page, photo_jpegs: dict[str, bytes],
                                                          kind: str, where: str) -> None:
    """A drop that misses the zone must not leave the browser to open the file instead of the page."""
    name = f"{kind}-{where.strip('#')}.jpg"
    assert page.evaluate(SEND_FILE, [kind, where, name, list(photo_jpegs["chelsea"])]) is False
    expect(card(page, name).locator("li.prediction")).to_have_count(3)


def test_two_images_at_once_make_two_cards(page: Page, photo_files: dict[str, Path]) -> None:
    page.set_input_files("#file", [str(photo_files["chelsea"]), str(photo_files["coffee"])])
    expect(page.locator("article.card")).to_have_count(2)
    for name in ("chelsea.jpg", "coffee.jpg"):
        expect(card(page, name).locator("li.prediction")).to_have_count(3)


def test_top_k_is_user_selectable(page: Page, photo_files: dict[str, Path]) -> None:
    page.select_option("#topk", "5")
    page.set_input_files("#file", str(photo_files["coffee"]))
    expect(card(page, "coffee.jpg").locator("li.prediction")).to_have_count(5)
    page.select_option("#topk", "3")


def test_random_init_banner_and_status_line(page: Page) -> None:
    expect(page.locator("#random-banner")).to_be_visible()
    expect(page.locator("#random-banner")).to_contain_text("random-init")
    expect(page.locator("#status")).to_contain_text("batch ≤ 4")


def test_why_lays_the_heatmap_over_the_preview_with_an_opacity_slider(page: Page, photo_files: dict[str, Path]) -> None:
    blocked: list[str] = []
    page.on("console", lambda message: blocked.append(message.text) if "Content Security Policy" in message.text else None)
    page.set_input_files("#file", str(photo_files["chelsea"]))
    result = card(page, "chelsea.jpg")
    expect(result.locator("li.prediction")).to_have_count(3)
    why = result.locator("button.why").first
    expect(why).to_have_text("why?")
    why.focus()
    page.keyboard.press("Enter")  # keyboard reachable
    heat = result.locator("img.heat")
    expect(heat).to_be_visible(timeout=30_000)  # the first explanation loads the eager network
    expect(why).to_have_attribute("aria-pressed", "true")
    size = heat.evaluate("h => [h.naturalWidth, h.naturalHeight]")
    photo_box = result.locator("img.photo").bounding_box()
    assert size == [451, 300] and heat.bounding_box() == photo_box
    slider = result.locator(".opacity input[type=range]")
    slider.fill("0.25")
    assert heat.evaluate("h => getComputedStyle(h).opacity") == "0.25"
    ARTIFACTS.mkdir(exist_ok=True)
    result.screenshot(path=str(ARTIFACTS / "web-explain.png"))
    page.locator("#lang").click()
    expect(why).to_have_text("为什么？")
    expect(heat).to_have_attribute("alt", re.compile("热力图"))
    why.click()
    expect(heat).to_be_hidden()
    expect(why).to_have_attribute("aria-pressed", "false")
    assert blocked == []


def test_keyboard_reaches_the_file_picker_and_the_controls(page: Page) -> None:
    focused = []
    for _ in range(4):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
    assert {"topk", "lang", "file"} <= set(focused)


def test_screenshots_desktop_and_phone(browser: Browser, base_url: str, photo_files: dict[str, Path]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for name, viewport in {"desktop": {"width": 1280, "height": 860}, "phone": {"width": 390, "height": 844}}.items():
        context = browser.new_context(viewport=viewport, device_scale_factor=1, locale="en-US")
        page = context.new_page()
        page.goto(base_url)
        page.set_input_files("#file", [str(photo_files["chelsea"]), str(photo_files["coffee"])])
        expect(page.locator("li.prediction")).to_have_count(6)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"{name}: the page scrolls sideways ({width}px)"
        page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)
        context.close()
        assert (ARTIFACTS / f"web-{name}.png").stat().st_size > 10_000


def test_the_page_is_served_with_strict_headers(base_url: str) -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        response = httpx.get(base_url + path)
        assert response.status_code == 200
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert httpx.get(base_url + "/health/live").headers["X-Content-Type-Options"] == "nosniff"


HTML_LABELS = ["<img src=x onerror=alert(1)>", "<b>bold</b>"]


@pytest.fixture(scope="module")
def repository_url(user_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The two user models, and a third whose labels are HTML, served from one repository."""
    from resnet_serve.cli import main

    folder = tmp_path_factory.mktemp("web-repository")
    shutil.copytree(user_repository, folder / "models")
    (folder / "labels.txt").write_text("\n".join(HTML_LABELS) + "\n")
    assert main(["export", "--arch", "mobilenet_v3_small", "--weights", "random", "--labels", str(folder / "labels.txt"),
                 "--name", "html", "--repository", str(folder / "models"), "--format", "torchscript"]) == 0
    with real_server(folder / "server.log", model_repository=str(folder / "models"), device="cpu") as (url, process):
        wait_ready(url, process)
        yield url


def test_a_picker_chooses_the_model_and_labels_are_shown_as_text(
    browser: Browser, repository_url: str, photo_files: dict[str, Path]
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US")
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(repository_url)
    expect(page.locator("#model-picker")).to_be_visible()
    expect(page.locator("#model option")).to_have_text(["flowers", "html", "parts"])
    expect(page.locator("#status")).to_contain_text("flowers (resnet18) on cpu")
    page.select_option("#model", "html")
    expect(page.locator("#status")).to_contain_text("html (mobilenet_v3_small)")
    page.select_option("#topk", "3")
    page.set_input_files("#file", str(photo_files["chelsea"]))
    result = card(page, "chelsea.jpg")
    expect(result.locator("li.prediction")).to_have_count(2)  # two classes, whatever Top-K asks
    assert sorted(result.locator(".label").all_inner_texts()) == sorted(HTML_LABELS)
    assert result.locator(".label img, .label b").count() == 0  # text, not markup
    expect(result.locator(".times")).to_contain_text("html")
    assert not dialogs and page.evaluate("typeof window.alerted") == "undefined"
    context.close()


@pytest.mark.parametrize(("path", "rendered"), [("/docs", ".swagger-ui .opblock-summary-path[data-path='/predict']"),
                                                ("/redoc", "h1:has-text('resnet-serve')")])
def test_the_api_docs_render_offline(browser: Browser, base_url: str, path: str, rendered: str) -> None:
    """Swagger UI and ReDoc from the server itself: every request elsewhere (a CDN) is refused,
    and none was for a script or a style (ReDoc's footer asks Redocly's CDN for its logo)."""
    context = browser.new_context()
    elsewhere: list[str] = []

    def only_this_server(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            if route.request.resource_type != "image":
                elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    page = context.new_page()
    page.goto(base_url + path)
    expect(page.locator(rendered).first).to_be_visible(timeout=20_000)
    assert elsewhere == []
    context.close()
