"""The report page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) opens a tiny run's report.html; every figure
loads, every link resolves, nothing overflows a 1280-pixel window and the console is clean."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 800
# No sandbox (CI runs as root); nothing in the background: on a closed network Chromium's calls
# home are refused many at a time.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--window-size={WIDTH},{HEIGHT}")

# Outermost elements whose right edge passes the viewport and that no scrolling (or clipping)
# ancestor contains: what makes the page itself scroll sideways.
_OVERFLOWING = """
const vw = document.documentElement.clientWidth;
const contained = el => {
  for (let a = el.parentElement; a && a !== document.body; a = a.parentElement)
    if (getComputedStyle(a).overflowX !== 'visible') return true;
  return false;
};
const out = [];
for (const el of document.body.querySelectorAll('*')) {
  if (el.getBoundingClientRect().right <= vw + 0.5 || contained(el)) continue;
  if (out.some(o => o.contains(el))) continue;
  out.push(el);
}
return out.map(el => `<${el.tagName.toLowerCase()}> ending at x=`
  + Math.round(el.getBoundingClientRect().right) + `: "${el.textContent.trim().slice(0, 60)}"`);
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium under chromedriver, Debian's binaries only (Selenium Manager, which
    would download a driver, is never asked: the driver's path is given)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: install Debian's chromium "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def page_problems(driver, page: Path) -> list[str]:
    """Everything wrong with ``page`` once loaded: figures that did not load, links that lead
    nowhere (external ones are checked for form only: no network), elements that overflow the
    window, console errors."""
    driver.get(page.resolve().as_uri())  # returns once the page and its images have loaded
    problems = [
        f"figure {src!r} did not load"
        for src, ok in driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'),"
            " i.complete && i.naturalWidth > 0])")
        if not ok
    ]
    ids = set(driver.execute_script("return [...document.querySelectorAll('[id]')].map(e => e.id)"))
    for href in driver.execute_script(
            "return [...document.links].map(a => a.getAttribute('href'))"):
        url = urlsplit(href)
        if url.scheme in ("http", "https"):
            ok = bool(url.netloc)
        elif url.scheme or url.netloc:
            ok = False
        elif not url.path:
            ok = unquote(url.fragment) in ids
        else:
            ok = (page.parent / unquote(url.path)).exists()
        if not ok:
            problems.append(f"link {href!r} leads nowhere")
    width, view = driver.execute_script(
        "const d = document.documentElement; return [d.scrollWidth, d.clientWidth]")
    if width > view:
        problems.append(f"the page scrolls sideways: {width} px wide in a {view} px viewport")
    problems += [f"{el} overflows the window" for el in driver.execute_script(_OVERFLOWING)]
    problems += [f"console: {e['message']}" for e in driver.get_log("browser")
                 if e["level"] == "SEVERE"]
    return problems


def test_a_tiny_runs_report_loads_links_and_fits_1280_px(browser, tiny_run):
    page = tiny_run[0] / "report.html"
    assert browser.execute_script("return window.innerWidth") == WIDTH
    assert page_problems(browser, page) == []
    n_images = browser.execute_script("return document.images.length")
    assert n_images >= 10, f"only {n_images} figures on the page"


def test_the_check_finds_a_missing_figure_a_dead_link_and_a_wide_table(browser, tmp_path):
    (tmp_path / "there.txt").write_text("here")
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><html><body><h2 id="top">t</h2><img src="figures/gone.png">'
        '<a href="#top">ok</a><a href="#nowhere">x</a><a href="there.txt">ok</a>'
        '<a href="missing.html">x</a><a href="https://example.org/a">ok</a><a href="https:/">x</a>'
        '<table><tr><td style="min-width:2000px">wide</td></tr></table>'
        '<div style="overflow-x:auto"><table><tr><td style="min-width:2000px">scrolls</td></tr>'
        "</table></div></body></html>")
    problems = page_problems(browser, page)
    assert problems[0] == "figure 'figures/gone.png' did not load"
    assert problems[1:4] == [f"link {h!r} leads nowhere"
                             for h in ("#nowhere", "missing.html", "https:/")]
    assert problems[4].startswith("the page scrolls sideways: ")
    assert problems[5].startswith('<table> ending at x=') and '"wide"' in problems[5]
    assert len(problems) == 7  # the table that scrolls inside its container is no offender
    assert problems[6].startswith("console: ") and "gone.png" in problems[6]
