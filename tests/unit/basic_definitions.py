"""The five segments the engine shipped before the definitions language, written in it: unit tests
with exact expectations use this small file; the Flink and end-to-end tests use the shipped one."""

from __future__ import annotations

from udfs.definitions import DefinitionSet, parse_definitions
from udfs.profile_config import ProfileConfig

BASIC_VERSION = "basic-1"


def basic_yaml(active_window: str = "10m", abandon_after: str = "30m") -> str:
    return f"""
version: {BASIC_VERSION}
segments:
  - name: active_browser
    when: ms_since_last_event < {active_window}
  - name: cart_holder
    when: cart_items > 0
  - name: cart_abandoner
    when: cart_items > 0 and ms_since_cart_activity >= {abandon_after}
  - name: highly_engaged
    when: engagement_tier == "high"
  - name: engagement_score_above_50
    when: engagement_score > 50
"""


def basic_definitions(profile_config: ProfileConfig | None = None, **windows: str) -> DefinitionSet:
    return parse_definitions(basic_yaml(**windows), "basic.yaml", profile_config)
