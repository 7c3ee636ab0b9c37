"""`segments dashboard`: a small web page of the live view for users without Grafana (segment
sizes over time, top movers, over-segmentation warnings), its JSON, and the live view's figures
for Prometheus, served by one stdlib HTTP server that reads Redis (jobs/live_view.py).

Routes: `/` the page, `/dashboard.js` its script (both under static/, nothing fetched from
elsewhere), `/api/live` the JSON the page draws, `/metrics` the Prometheus text. A sampler thread
records the segment sizes into a bounded Redis list every `sample_s`, so the chart's history
outlives the dashboard.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from jobs.live_view import live_warnings, read_figures, record_sample, serve_on_thread, size_history, top_movers
from jobs.segment_warnings import WarningThresholds
from udfs.definition_warnings import definition_warnings
from udfs.definitions import DefinitionSet

log = logging.getLogger("segments.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/dashboard.js": ("dashboard.js", "text/javascript")}


@dataclass
class Dashboard:
    client: redis.Redis
    prefix: str
    definitions: DefinitionSet
    thresholds: WarningThresholds
    sample_s: float = 60.0
    keep_samples: int = 1440
    window_ms: int = 60 * 60_000  # the top movers' window

    def defined(self) -> list[str]:
        return list(self.definitions.names)

    def sample(self) -> None:
        figures = read_figures(self.client, self.prefix, self.defined())
        record_sample(self.client, self.prefix, {s.segment: s.members for s in figures.segments}, self.keep_samples)

    def run_sampler(self, stop: threading.Event) -> None:
        """Samples now, then every `sample_s`; a Redis that does not answer skips a sample."""
        while not stop.is_set():
            try:
                self.sample()
            except redis.exceptions.RedisError as err:
                log.warning("size sample skipped: Redis: %s", type(err).__name__)
            stop.wait(self.sample_s)

    def snapshot(self) -> dict:
        """What the page shows, as JSON."""
        now_ms = int(time.time() * 1000)
        defined = self.defined()
        figures = read_figures(self.client, self.prefix, defined)
        history = size_history(self.client, self.prefix)
        in_window = [s for s in history if s.at_ms >= now_ms - self.window_ms]
        warnings = [
            {"kind": w.kind, "segments": list(w.segments), "message": w.message}
            for w in definition_warnings(self.definitions)
        ]
        warnings += live_warnings(figures, defined, self.thresholds.min_members, self.thresholds.max_flap_rate)
        return {
            "now": now_ms,
            "window_ms": self.window_ms,
            "segments": [
                {
                    "segment": s.segment,
                    "members": s.members,
                    "entries": s.entries,
                    "exits": s.exits,
                    "flaps": s.flaps,
                    "flap_rate": s.flap_rate,
                    "defined": s.segment in defined,
                }
                for s in figures.segments
            ],
            "history": [{"t": s.at_ms, "sizes": s.sizes} for s in history],
            "top_movers": [
                {"segment": m.segment, "before": m.before, "now": m.now, "change": m.change}
                for m in top_movers(in_window)
            ],
            "warnings": warnings,
        }


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        try:
            if path in PAGES:
                name, content_type = PAGES[path]
                self._send(200, content_type, (STATIC / name).read_bytes())
            elif path == "/api/live":
                self._send(200, "application/json", json.dumps(self.dashboard.snapshot()).encode())
            elif path == "/metrics":
                d = self.dashboard
                text = read_figures(d.client, d.prefix, d.defined()).prometheus()
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", text.encode())
            else:
                self._send(404, "text/plain", b"not found\n")
        except redis.exceptions.RedisError as err:
            # The error's class only: its text may carry the server's address.
            self._send(503, "application/json", json.dumps({"error": f"Redis: {type(err).__name__}"}).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # page loads and scrapes are not news
        pass


def serve(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    """Starts the HTTP server on a thread of its own; SystemExit if it cannot listen."""
    handler = type("DashboardHandler", (_Handler,), {"dashboard": dashboard})
    return serve_on_thread(handler, host, port, "the dashboard")
