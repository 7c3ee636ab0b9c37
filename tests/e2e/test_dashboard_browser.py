"""`segments dashboard` in a real headless browser (Debian's chromium): a real redis-server that
the view follower's apply path filled with committed transitions, the dashboard as its own
process, and the page as chromium renders it after its script has run. Checks what it shows: the
sizes equal the member sets, the top mover, the warnings; and that the size history outlives a
restart of the dashboard.

chromium is a test requirement (infra/setup.sh installs it): without it this test fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.request import urlopen

import pytest
import yaml

from infra.stack import ManagedProcess, free_port, wait_for_port
from jobs.live_view import size_history
from jobs.redis_follower import ViewFollower
from jobs.redis_view import RedisSegmentView
from udfs.redis_layout import members_key

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dash"
DEFINITIONS = """
version: dashboard-test-1
segments:
  - name: browsers
    when: ms_since_last_event < 10m
  - name: carters
    when: cart_items > 0
  - name: impossible
    when: cart_items > 5 and cart_items < 2
"""
MIN_MEMBERS = 10


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: infra/setup.sh installs it (apt-get install chromium)")
    return binary


class PageReader(HTMLParser):
    """The rendered page's rows, movers and warnings, by the attributes its script sets."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[str, int] = {}
        self.movers: list[tuple[str, int, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.status = ""
        self.lines: dict[str, int] = {}  # segment -> points of its line on the chart
        self._row: str | None = None
        self._cell: str | None = None
        self._item: dict | None = None
        self._in_status = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-segment" in a:
            self._row = a["data-segment"]
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class")
        elif tag == "li" and a.get("class") in ("mover", "warning"):
            self._item = {**a, "text": ""}
        elif tag == "p" and a.get("id") == "status":
            self._in_status = True
        elif tag == "polyline":
            self.lines[a["data-segment"]] = len(a["points"].split())

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None
        elif tag == "li" and self._item is not None:
            item, self._item = self._item, None
            if item["class"] == "mover":
                self.movers.append((item["data-segment"], int(item["data-change"]), item["text"]))
            else:
                self.warnings.append((item["data-kind"], item["data-segments"]))
        elif tag == "p":
            self._in_status = False

    def handle_data(self, data):
        if self._row is not None and self._cell == "members":
            self.sizes[self._row] = int(data)
        if self._item is not None:
            self._item["text"] += data
        if self._in_status:
            self.status += data


def render(url: str, tmp_path: Path) -> PageReader:
    """The DOM after the page's script has fetched and drawn /api/live."""
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    page = PageReader()
    page.feed(result.stdout)
    assert page.status.startswith("updated"), f"the page did not load its data: {page.status!r}"
    return page


@pytest.fixture
def dashboard_settings(tmp_path, redis_url) -> dict[str, str]:
    definitions = tmp_path / "definitions.yaml"
    definitions.write_text(DEFINITIONS)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"definitions_path": str(definitions), "warnings": {"min_members": MIN_MEMBERS}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_") and k != "REDIS_URL"}
    env.update(
        {
            "REDIS_URL": redis_url,
            "SEGMENTS_REDIS_KEY_PREFIX": PREFIX,
            "PYTHONPATH": str(PROJECT_ROOT),
        }
    )
    return {"config": str(config), **env}


def start_dashboard(stack_root: Path, settings: dict[str, str], port: int, name: str) -> ManagedProcess:
    env = {k: v for k, v in settings.items() if k != "config"}
    proc = ManagedProcess(name, stack_root)
    proc.start(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "dashboard",
            "--config",
            settings["config"],
            "--port",
            str(port),
            "--sample-every",
            "300ms",
        ],
        env=env,
        cwd=PROJECT_ROOT,
    )
    wait_for_port(port, what="dashboard")
    return proc


def wait_for_sample(view: RedisSegmentView, sizes: dict[str, int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        history = size_history(view.client, PREFIX)
        if history and all(history[-1].sizes.get(s) == n for s, n in sizes.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no size sample {sizes} within {timeout_s} s")


def committed(follower: ViewFollower, transitions: list[tuple[str, str, str, int]], now_ms: int) -> None:
    """Committed transitions applied the way the view follower applies the topic's (its batch
    script, its live tallies, its offsets); (user, segment, kind, sequence)."""
    first = follower.figures.read  # the next offset of the one partition, as if read from it
    batch = [(u, s, k, seq, now_ms - 1000, "test_rule", 0, first + i) for i, (u, s, k, seq) in enumerate(transitions)]
    follower._apply(batch, {"0": first + len(batch)})


def test_the_dashboard_page_shows_the_member_sets_the_top_mover_and_the_warnings(
    redis_url, stack_root, tmp_path, dashboard_settings
):
    view = RedisSegmentView(redis_url, PREFIX, retention_ms=0)
    follower = ViewFollower(view, "127.0.0.1:1", "segment-transitions")  # its apply path only: no broker read
    now_ms = int(time.time() * 1000)
    # Before: 6 browsers, 2 carters.
    committed(follower, [(f"b{i}", "browsers", "ENTER", 1) for i in range(6)], now_ms)
    committed(follower, [(f"c{i}", "carters", "ENTER", 1) for i in range(2)], now_ms)
    port = free_port()
    proc = start_dashboard(stack_root, dashboard_settings, port, "dashboard")
    try:
        wait_for_sample(view, {"browsers": 6, "carters": 2})
        # After: 3 more browsers and one left (8), 10 more carters (12): carters moved most.
        committed(follower, [(f"b{i}", "browsers", "ENTER", 1) for i in range(6, 9)], now_ms)
        committed(follower, [("b0", "browsers", "EXIT", 2)], now_ms)
        committed(follower, [(f"c{i}", "carters", "ENTER", 1) for i in range(2, 12)], now_ms)
        wait_for_sample(view, {"browsers": 8, "carters": 12})

        page = render(f"http://127.0.0.1:{port}/", tmp_path)
        in_redis = {s: view.client.scard(members_key(PREFIX, s)) for s in ("browsers", "carters", "impossible")}
        assert in_redis == {"browsers": 8, "carters": 12, "impossible": 0}
        assert page.sizes == in_redis
        assert page.movers[0][:2] == ("carters", 10)
        assert "2 → 12" in page.movers[0][2]
        # One line a segment that had members, a point a sample (`impossible` never had any).
        shown_samples = int(page.status.split("; ")[1].split()[0])  # "updated ...; N size samples"
        assert 2 <= shown_samples <= len(size_history(view.client, PREFIX))  # the sampler goes on
        assert page.lines == {"browsers": shown_samples, "carters": shown_samples}
        assert ("browsers", 2) in [m[:2] for m in page.movers]
        warned = set(page.warnings)
        assert ("never_entered", "impossible") in warned, page.warnings
        # Fewer members than warnings.min_members (10) now: browsers (8) and impossible (0).
        assert {w for w in warned if w[0] == "too_small"} == {("too_small", "browsers"), ("too_small", "impossible")}
    finally:
        proc.stop()

    # A new dashboard process: the sizes sampled by the first are still there (in Redis), so the
    # top movers still see where carters started.
    samples_before = len(size_history(view.client, PREFIX))
    proc = start_dashboard(stack_root, dashboard_settings, port, "dashboard-again")
    try:
        page = render(f"http://127.0.0.1:{port}/", tmp_path)
        assert page.movers[0][:2] == ("carters", 10)
        with urlopen(f"http://127.0.0.1:{port}/api/live", timeout=10) as response:
            live = json.load(response)
        assert len(live["history"]) > samples_before >= 2
    finally:
        proc.stop()
        view.close()
