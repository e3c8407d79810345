"""The run report: one self-contained HTML page that a real headless browser without WebGL
renders with the network cut off (no request, no console error, every plot drawn, a mark for
every front member), data that cannot inject markup or script, and the PNG figures."""

from __future__ import annotations

import base64
import fcntl
import gzip
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from evo_compress.app import start_search
from evo_compress.fitness import EvaluationResult
from evo_compress.reports import PNG_NAMES, write_pngs, write_report
from evo_compress.reports.html import (
    FRONT_PLOT_IDS,
    MAX_EVALUATED_POINTS,
    PLOT_IDS,
    SYNTHETIC_HOW,
    how_text,
)
from evo_compress.runs import RunStore
from evo_compress.runs.front import FrontMember, load_front
from evo_compress.runs.store import DB_NAME, LLMCallRow
from evo_compress.testing import invoke_cli

PAYLOAD = "</script><script>alert(1)</script>"
HOSTILE = PAYLOAD + ' <img src=x onerror="alert(2)"> & <!-- <b>bold</b>'
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Every way an attribute makes a browser fetch something by itself.
FETCHING_ATTRIBUTES = {"src", "href", "srcset", "action", "poster", "data", "background"}
FETCHING_TAGS = {"link", "img", "iframe", "frame", "object", "embed", "audio", "video", "source"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
VOID_TAGS |= {"track", "wbr"}
NO_WEBGL = "WebGL is not supported"
# The scatter matrix's panels: every pair of the five objectives once.
PANELS = 10


@pytest.fixture
def run_dir(config_factory, tmp_path) -> Path:
    path = tmp_path / "run"
    search = start_search(
        config_factory(search={"population_size": 8, "generations": 3}), run_dir=path
    )
    search.run()
    search.close()
    return path


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed: the report's browser checks need a headless one")
    return path


# ---------------------------------------------------------------------- parsing helpers
class _Page(HTMLParser):
    """Tags with their attributes, the text of each <script> (by id too) and <style>, and text
    nodes; for each tag, the plot it is drawn in and the plotly trace group it belongs to."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.where: list[tuple[str | None, str | None]] = []  # (plot div id, trace class)
        self.scripts: list[str] = []
        self.script_ids: dict[str, int] = {}
        self.styles: list[str] = []
        self.text: list[str] = []
        self._inside: str | None = None
        self._open: list[tuple[str, str | None, str | None]] = []  # (tag, plot, trace)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        plot, trace = self._open[-1][1:] if self._open else (None, None)
        self.tags.append((tag, found))
        self.where.append((plot, trace))
        if tag not in VOID_TAGS:
            if tag == "div" and found.get("id") in PLOT_IDS:
                plot = found["id"]
            classes = str(found.get("class") or "").split()
            if tag == "g" and "trace" in classes:
                trace = found.get("class")
            self._open.append((tag, plot, trace))
        if tag in ("script", "style"):
            self._inside = tag
            if tag == "script" and found.get("id"):
                self.script_ids[str(found["id"])] = len(self.scripts)
            (self.scripts if tag == "script" else self.styles).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._inside:
            self._inside = None
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth][0] == tag:
                del self._open[depth:]
                break

    def handle_data(self, data: str) -> None:
        if self._inside == "script":
            self.scripts[-1] += data
        elif self._inside == "style":
            self.styles[-1] += data
        else:
            self.text.append(data)

    def by_id(self, ident: str) -> dict[str, str | None]:
        found = [attrs for _, attrs in self.tags if attrs.get("id") == ident]
        assert len(found) == 1, f"expected one element #{ident}, found {len(found)}"
        return found[0]

    def body(self) -> dict[str, str | None]:
        return next(attrs for tag, attrs in self.tags if tag == "body")


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def unpack(page: _Page, ident: str) -> str:
    """A data block the page's script unpacks (gzip, base64), as text."""
    packed = page.scripts[page.script_ids[ident]]
    return gzip.decompress(base64.b64decode(packed.strip())).decode("utf-8")


def figures_of(page: _Page) -> list[dict[str, Any]]:
    """The figure specs the report hands to plotly.js."""
    figures: list[dict[str, Any]] = json.loads(unpack(page, "report-figures"))
    return figures


def marks(dom: _Page, plot: str, trace: str | None, tag: str, kind: str) -> int:
    """How many ``tag`` elements of class ``kind`` (``point``, ``js-line``) plotly drew in the
    plot ``plot`` for the trace whose uid is ``trace`` (None: any); a path must have a shape."""
    count = 0
    for (name, attrs), (where, group) in zip(dom.tags, dom.where, strict=True):
        if name != tag or where != plot or group is None:
            continue
        if trace is not None and f"trace{trace}" not in group.split():
            continue
        if kind in str(attrs.get("class") or "").split() and str(attrs.get("d") or "") not in (
            "",
            "M0,0Z",
        ):
            count += 1
    return count


def assert_front_drawn(dom: _Page, front: list[FrontMember]) -> None:
    """Each front figure has a mark for every front member, and no WebGL notice anywhere."""
    assert front
    assert NO_WEBGL not in " ".join(dom.text)
    for panel in range(1, PANELS + 1):
        assert marks(dom, "front-matrix", f"front{panel}", "path", "point") >= len(front), panel
    # One line per member: plotly draws each stretch between gaps as its own path.
    assert marks(dom, "front-parallel", None, "path", "js-line") == len(front)


# ---------------------------------------------------------------------- browser
@dataclass
class Rendered:
    dom: _Page
    console: list[str]  # what the page wrote to its console (WebGL driver chatter left out)
    requests: list[str]  # URLs the page asked the network stack for


def headless(chromium: str, profile: Path) -> list[str]:
    """Headless chromium as every browser check runs it: no WebGL (like the chromium of CI,
    servers and locked-down desktops: every figure must draw in SVG), and no network (no
    name resolves and every connection goes to a closed port: a fetch can only fail)."""
    return [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-3d-apis",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-extensions",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
    ]


def render(chromium: str, page: Path, work: Path) -> Rendered:
    """Load ``page`` in headless chromium with every network request bound to fail, and
    return the DOM after scripts ran, the console and the page's network requests."""
    netlog = work / "netlog.json"
    command = [
        *headless(chromium, work / "profile"),
        "--disable-default-apps",
        f"--log-net-log={netlog}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--window-size=1280,1000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    console = []
    for line in done.stderr.splitlines():
        match = re.search(r":CONSOLE[^\]]*\] \"(.*)", line)
        if match is None:
            continue
        message = re.sub(r"\", source: .*$", "", match.group(1))
        if not message.startswith("[.WebGL-"):  # SwiftShader performance notes
            console.append(message)
    return Rendered(parse(done.stdout), console, page_requests(netlog))


def page_requests(netlog: Path) -> list[str]:
    """URLs of the requests a file:// page started (the browser's own traffic, keyed to other
    sites, is left out)."""
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # cut short at exit: close the event list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    types = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if types.get(event["type"]) != "URL_REQUEST_START_JOB":
            continue
        if str(params.get("network_isolation_key", "")).startswith("file://"):
            urls.append(str(params.get("url")))
    return urls


def assert_all_plots_drawn(rendered: Rendered, front: list[FrontMember]) -> None:
    body = rendered.dom.body()
    assert rendered.dom.scripts, "chromium dumped no DOM"
    assert body.get("data-plots") == str(len(PLOT_IDS))
    assert body.get("data-rendered") == str(len(PLOT_IDS)), body
    assert "data-error" not in body
    for ident in PLOT_IDS:
        assert "js-plotly-plot" in str(rendered.dom.by_id(ident).get("class")), ident
    svgs = [
        a for tag, a in rendered.dom.tags if tag == "svg" and "main-svg" in str(a.get("class"))
    ]
    assert len(svgs) >= len(PLOT_IDS)
    assert_front_drawn(rendered.dom, front)


# ---------------------------------------------------------------------- DevTools
class Devtools:
    """Headless chromium driven over its DevTools protocol on a pipe
    (``--remote-debugging-pipe``: JSON messages ended by NUL on fds 3 and 4), to time a page's
    drawing and photograph its parts; no WebGL and no network, as in ``render``."""

    def __init__(self, chromium: str, work: Path) -> None:
        self._to_chromium = os.pipe()
        self._from_chromium = os.pipe()
        commands, replies = self._to_chromium[0], self._from_chromium[1]

        def plumb() -> None:  # in the child, before exec: the protocol's fds
            # Out of the way first: either pipe end may itself be fd 3 or 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, replies)]
            for target, fd in zip((3, 4), high, strict=True):
                os.dup2(fd, target, inheritable=True)

        self.process = subprocess.Popen(
            [
                *headless(chromium, work / "devtools-profile"),
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=plumb,  # before exec, in the child: only dup2 calls
            close_fds=False,
        )
        os.close(commands)
        os.close(replies)
        self._buffer = b""
        self._next = 0
        self.console: list[str] = []
        target = next(
            t["targetId"]
            for t in self.call("Target.getTargets")["targetInfos"]
            if t["type"] == "page"
        )
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chromium[1], json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                assert "error" not in reply, (method, reply["error"])
                result: dict[str, Any] = reply.get("result", {})
                return result
            if reply.get("method") == "Runtime.consoleAPICalled":
                args = reply["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a)) for a in args))
            elif reply.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(reply["params"]["exceptionDetails"]))

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chromium[0], 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        found: dict[str, Any] = json.loads(message)
        return found

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    def load(self, page: Path, width: int = 1280, height: int = 1000) -> float:
        """Open ``page`` and wait until every plot is drawn; returns the seconds that took."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        start = time.perf_counter()
        self.call("Page.navigate", session=True, url=page.as_uri())
        state = "document.body && [document.body.dataset.rendered, document.body.dataset.plots, "
        state += "document.body.dataset.error || null]"
        while True:
            found = self.evaluate(state)
            if found and (found[2] or found[0] == found[1]):
                assert found[2] is None, found[2]
                return time.perf_counter() - start
            assert time.perf_counter() - start < 120, f"not drawn in 120 s: {found}"
            time.sleep(0.05)

    def dom(self) -> _Page:
        return parse(str(self.evaluate("document.documentElement.outerHTML")))

    def screenshot(self, ident: str, path: Path) -> Path:
        """A PNG of the element ``#ident`` as drawn."""
        box = self.evaluate(
            f"(function () {{ var r = document.getElementById({json.dumps(ident)})"
            ".getBoundingClientRect(); return [r.left + window.scrollX, r.top + window.scrollY,"
            " r.width, r.height]; })()"
        )
        x, y, width, height = box
        assert width > 0 and height > 0, (ident, box)
        shot = self.call(
            "Page.captureScreenshot",
            session=True,
            format="png",
            captureBeyondViewport=True,
            clip={"x": x, "y": y, "width": width, "height": height, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except AssertionError:
            pass  # it closed before answering
        finally:
            self.process.wait(timeout=30)
            os.close(self._to_chromium[1])
            os.close(self._from_chromium[0])


# ---------------------------------------------------------------------- tests
def test_the_report_is_one_file_that_fetches_nothing(run_dir, tmp_path):
    with RunStore.open(run_dir) as store:
        path = write_report(store, tmp_path / "out" / "report.html")
        front = load_front(store)
    text = path.read_text(encoding="utf-8")
    page = parse(text)

    assert 1_000_000 < path.stat().st_size < 8_000_000  # plotly.js once, plus the data
    assert text.count("Plotly.newPlot") == 1
    for tag, attrs in page.tags:
        assert tag not in FETCHING_TAGS, (tag, attrs)
        fetching = {k: v for k, v in attrs.items() if k in FETCHING_ATTRIBUTES}
        # Only in-page links (#section) are allowed; they fetch nothing.
        assert all(k == "href" and str(v).startswith("#") for k, v in fetching.items()), attrs
    # Two data blocks (plotly.js and the figures, packed: never run) and the page's script.
    assert [tag for tag, _ in page.tags].count("script") == 3
    assert page.script_ids == {"plotly-js": 0, "report-figures": 1}
    blocks = [a for tag, a in page.tags if tag == "script" and a.get("id")]
    assert {a.get("type") for a in blocks} == {"application/gzip"}
    assert "Plotly" in unpack(page, "plotly-js")
    for style in page.styles:
        assert "url(" not in style and "@import" not in style
    assert "http" not in page.scripts[-1]
    csp = next(
        str(a["content"]) for _, a in page.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"]
    assert not {"'unsafe-inline'", "'unsafe-eval'"} & set(directives["script-src"])

    # The page tells the run and says how its values were obtained.
    shown = " ".join(" ".join(page.text).split())
    assert str(run_dir) in shown and "synthetic" in shown
    assert SYNTHETIC_HOW in shown
    matrix = figures_of(page)[0]
    assert matrix["div"] == "front-matrix"
    assert {t["type"] for t in matrix["data"]} == {"scatter"}  # SVG: no WebGL needed
    assert matrix["columns"]["front.accuracy"] == [m.objectives["accuracy"] for m in front]
    assert "kv(" in shown or "quant=" in shown  # recipes summarised in the table
    # The accuracy's stderr (the synthetic `noise`), in the table and the front's hover text.
    best = front[0].objectives["accuracy"]
    assert f"{best:.3f} ± 0.003" in shown
    assert f"accuracy {best:.3f} ± 0.003 fraction" in matrix["columns"]["front.text"][0]
    assert "search:" in shown  # the config, verbatim

    # A directory as the destination holds report.html.
    with RunStore.open(run_dir) as store:
        assert write_report(store, tmp_path / "out") == path


def test_the_report_renders_offline_in_headless_chromium(run_dir, tmp_path, chromium):
    with RunStore.open(run_dir) as store:
        path = write_report(store, tmp_path / "report.html")
        front = load_front(store)
    rendered = render(chromium, path, tmp_path)
    assert rendered.console == []
    assert rendered.requests == []
    assert_all_plots_drawn(rendered, front)


def test_the_front_figures_draw_every_member_without_webgl(run_dir, tmp_path, chromium):
    with RunStore.open(run_dir) as store:
        path = write_report(store, tmp_path / "report.html")
        front = load_front(store)
        evaluated = len(store.evaluated_objectives())
    browser = Devtools(chromium, tmp_path)
    try:
        browser.load(path)
        dom = browser.dom()
        shots = [browser.screenshot(i, tmp_path / f"{i}.png") for i in FRONT_PLOT_IDS]
    finally:
        browser.close()
    assert browser.console == []
    assert_front_drawn(dom, front)
    # Each panel draws every searched recipe evaluated (fewer than the sampling limit here).
    assert evaluated < MAX_EVALUATED_POINTS
    points = [
        tag
        for (tag, attrs), (plot, group) in zip(dom.tags, dom.where, strict=True)
        if plot == "front-matrix" and group and "point" in str(attrs.get("class")).split()
    ]
    assert len(points) == PANELS * evaluated
    for shot in shots:
        data = shot.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000, shot.name


def test_the_browser_check_sees_a_page_that_fetches(tmp_path, chromium):
    # The control: the same browser set-up reports a page's request and its console.
    page = tmp_path / "fetches.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="https://example.com/a.png">'
        "<script>console.error('boom')</script></body></html>"
    )
    rendered = render(chromium, page, tmp_path)
    assert "https://example.com/a.png" in rendered.requests
    assert "boom" in rendered.console


def _plant_hostile_strings(run_dir: Path) -> int:
    """Put markup and script into every kind of text a report shows: the run's name and
    config, a recipe value, an evaluation's "how", an LLM's model name and rationale."""
    with RunStore.open(run_dir) as store:
        member = next(m for m in load_front(store) if m.generation >= 1)
        row = store.individual(member.id)
        store.add_llm_call(
            LLMCallRow(
                generation=row.generation,
                slot=row.slot,
                operator=row.operators[0],
                attempt=0,
                role="mutation",
                provider="local",
                model=HOSTILE,
                prompt_hash="0" * 64,
                prompt="{}",
                reply="{}",
                input_tokens=10,
                output_tokens=5,
                cost=None,
                latency_s=0.1,
                transport_attempts=1,
                outcome="valid",
                error=None,
                rationale="because " + HOSTILE,
                confidence=0.5,
            )
        )
        evaluation = store.evaluation(member.id)
        assert evaluation is not None and evaluation.result.objectives is not None
        metadata = dict(evaluation.result.metadata, synthetic=False)
        metadata["objectives"] = {"energy": {"how": HOSTILE, "measured": False}}
        store.add_evaluation(
            member.id,
            EvaluationResult("ok", evaluation.result.objectives, None, metadata, 0.1),
            evaluation.source,
        )
        store.set_meta({"name": HOSTILE, "config": store.get_meta("config") + f"# {HOSTILE}\n"})
    # A recipe value no search space would allow, written straight into the SQLite file.
    db = sqlite3.connect(run_dir / DB_NAME)
    recipe = json.loads(
        db.execute("SELECT recipe FROM individuals WHERE id = ?", (member.id,)).fetchone()[0]
    )
    recipe["serve.attention_backend"] = HOSTILE
    db.execute("UPDATE individuals SET recipe = ? WHERE id = ?", (json.dumps(recipe), member.id))
    db.commit()
    db.close()
    return member.id


def test_run_data_cannot_inject_markup_or_script(run_dir, tmp_path, chromium):
    ident = _plant_hostile_strings(run_dir)
    with RunStore.open(run_dir) as store:
        path = write_report(store, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")

    assert PAYLOAD not in text and "<img src=x" not in text and "<b>bold" not in text
    assert text.lower().count("<script") == 3 and text.lower().count("</script") == 3
    page = parse(text)
    shown = "".join(page.text)
    # Shown as text where a person reads it: the title, the header, the recipe, the LLM's
    # rationale, how the energy was obtained, the config.
    assert shown.count(HOSTILE) >= 5
    assert f"because {HOSTILE}" in shown
    assert f"estimated: {HOSTILE}" in shown
    # Handed to plotly.js escaped (it reads a subset of HTML in hover text).
    lineage = next(f for f in figures_of(page) if f["div"] == "lineage")
    hovers = [h for trace in lineage["data"] for h in trace.get("hovertext") or []]
    hover = next(h for h in hovers if h.startswith(f"#{ident} "))
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in hover
    assert "<script" not in hover and "<img" not in hover
    assert 'onerror="alert(2)"' in hover  # a quote is plain text to plotly: left as it is

    rendered = render(chromium, path, tmp_path)
    assert rendered.console == []  # no CSP violation, no script error, no alert
    assert rendered.requests == []
    with RunStore.open(run_dir) as store:
        assert_all_plots_drawn(rendered, load_front(store))
    dom_tags = [tag for tag, _ in rendered.dom.tags]
    # Those of the page, and plotly.js it unpacked: nothing from the data.
    assert dom_tags.count("script") == 4 and "img" not in dom_tags and "b" not in dom_tags
    assert f"because {HOSTILE}" in "".join(rendered.dom.text)


def test_pngs_are_written(run_dir, tmp_path):
    with RunStore.open(run_dir) as store:
        paths = write_pngs(store, tmp_path / "png")
    assert [p.name for p in paths] == list(PNG_NAMES)
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path.name


def test_a_run_killed_before_its_first_generation_still_reports(config_factory, tmp_path):
    start_search(config_factory(), run_dir=tmp_path / "run").close()
    with RunStore.open(tmp_path / "run") as store:
        page = parse(write_report(store, tmp_path / "report.html").read_text(encoding="utf-8"))
        paths = write_pngs(store, tmp_path / "png")
    assert page.body().get("data-plots") == "0"
    assert "no front yet" in " ".join(page.text)
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in paths)


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (
            {"how": "median ms per output token, greedy batched generate", "measured": True},
            "measured: median ms per output token, greedy batched generate",
        ),
        (
            {"how": "energy x grid intensity + compression CO2", "measured": False},
            "estimated: energy x grid intensity + compression CO2",
        ),
        (
            {"how": "estimated: process CPU time x 10 W per core", "measured": False},
            "estimated: process CPU time x 10 W per core",
        ),
        ({"how": "synthetic", "unit": "MiB", "measured": False}, SYNTHETIC_HOW),
        (None, "not recorded"),
    ],
)
def test_how_each_value_was_obtained(detail, expected):
    metadata = {"evaluator": "transformers", "objectives": {"memory": detail} if detail else {}}
    assert how_text(metadata, "memory") == expected


@pytest.mark.slow
def test_a_long_runs_report_draws_its_front_and_a_sample_of_the_rest(
    config_factory, tmp_path, chromium
):
    # More evaluations than the matrix draws: the front and a sample of the rest. The size
    # and draw time of a 10,000-evaluation report are a benchmark (bench_report.py).
    search = start_search(
        config_factory(search={"population_size": 60, "generations": 50}),
        run_dir=tmp_path / "run",
    )
    search.run()
    search.close()
    with RunStore.open(tmp_path / "run") as store:
        path = write_report(store, tmp_path / "report.html")
        front = load_front(store)
        evaluated = len(store.evaluated_objectives())
    size = path.stat().st_size
    browser = Devtools(chromium, tmp_path)
    try:
        seconds = browser.load(path)
        dom = browser.dom()
        for ident in FRONT_PLOT_IDS:
            browser.screenshot(ident, tmp_path / f"{ident}.png")
    finally:
        browser.close()
    print(f"report of {evaluated:,} evaluations: {size:,} bytes, drawn in {seconds:.1f} s")
    assert browser.console == []
    assert_front_drawn(dom, front)
    # The other evaluated recipes: a sample of them, and the figure says so.
    others = evaluated - len(front)
    assert others > MAX_EVALUATED_POINTS
    points = [
        tag
        for (tag, attrs), (plot, group) in zip(dom.tags, dom.where, strict=True)
        if plot == "front-matrix" and group and "point" in str(attrs.get("class")).split()
    ]
    assert len(points) == PANELS * (len(front) + MAX_EVALUATED_POINTS)
    shown = " ".join(dom.text)
    assert f"{MAX_EVALUATED_POINTS:,} of the {others:,} other evaluated recipes" in shown


def test_the_command_writes_pngs_beside_the_report_unless_told_not_to(run_dir, tmp_path):
    code, out, err = invoke_cli("report", run_dir)
    assert code == 0, err
    assert sorted(p.name for p in run_dir.glob("*.png")) == sorted(PNG_NAMES)
    assert out.splitlines() == [f"report: {run_dir / 'report.html'}"] + [
        f"plot: {run_dir / name}" for name in PNG_NAMES
    ]
    # --png still chooses the folder; --no-png writes the HTML file alone.
    code, out, err = invoke_cli("report", run_dir, "--png", tmp_path / "plots")
    assert code == 0 and len(list((tmp_path / "plots").glob("*.png"))) == len(PNG_NAMES)
    alone = tmp_path / "alone" / "report.html"
    code, out, err = invoke_cli("report", run_dir, "-o", alone, "--no-png")
    assert code == 0 and out.splitlines() == [f"report: {alone}"]
    assert not list((tmp_path / "alone").glob("*.png"))
    code, out, err = invoke_cli("report", run_dir, "--png", tmp_path, "--no-png")
    assert code == 2 and "`--png` and `--no-png`" in err


def test_without_matplotlib_the_report_is_written_with_one_warning(run_dir, tmp_path, monkeypatch):
    # As where matplotlib is not installed: importing it fails.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = invoke_cli("report", run_dir, "-o", tmp_path)
    assert code == 0, err
    assert (tmp_path / "report.html").is_file() and not list(tmp_path.glob("*.png"))
    assert out.splitlines() == [f"report: {tmp_path / 'report.html'}"]
    warning = [line for line in err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: no PNG plots written")
