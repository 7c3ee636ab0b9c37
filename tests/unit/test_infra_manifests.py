"""Deployment files under infra/ parse and agree with the stack they describe."""

from __future__ import annotations

from pathlib import Path

import yaml

from infra.stack import PROMETHEUS_PORTS, StackPorts

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_the_prometheus_scrape_config_covers_the_stack_reporter_ports():
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    first = StackPorts().prometheus
    assert targets == {f"127.0.0.1:{port}" for port in range(first, first + PROMETHEUS_PORTS)}
