"""An event's context (device, referrer, campaign, country, timezone): what a value may be, how it
is normalised, and the local hour and weekday of an instant in a timezone. docs/features.md
("Context") and docs/contract.md say the same for users.

Every value is bounded: the device to four classes, a referrer to its host name, campaign values
to 64 characters without `@`, `:` or `/` (no e-mail addresses or URLs in them), a country to two
letters, a timezone to the IANA names the installed tz database knows.
"""

from __future__ import annotations

import re
from datetime import datetime
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, available_timezones

DEVICE_CLASSES = ("desktop", "mobile", "tablet", "other")
_DEVICE_CLASS = {name: name for name in DEVICE_CLASSES}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# What first_touch_source is when the first event carried neither a campaign source nor a referrer.
DIRECT = "direct"
# ... and what it is for a user whose profile was stored before the context was kept.
UNKNOWN_SOURCE = "unknown"

MAX_CAMPAIGN_LENGTH = 64
MAX_REFERRER_LENGTH = 2048
MAX_TIMEZONE_LENGTH = 64
_CAMPAIGN = re.compile(r"[a-z0-9][a-z0-9 _.+\-]{0,63}")
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.\-]{0,251}[a-z0-9])?")
_COUNTRY = re.compile(r"[A-Z]{2}")

# The IANA names of the installed tz database (the system's, else the `tzdata` package), read
# once: a name is valid iff it is one of them, which keeps file-like names ("../x") away from
# ZoneInfo and the zones held below to that set. "localtime" (the machine's own zone, where a
# system lists it) and "posixrules" are not zones of a shopper.
ZONE_NAMES = frozenset(available_timezones()) - {"localtime", "posixrules"}
_ZONES: dict[str, ZoneInfo] = {}

HOUR_S = 3600
DAY_S = 86_400
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def device_class(device: str) -> str | None:
    """The class of a device field: desktop, mobile or tablet as given (any case), other for
    anything else; None for a blank one."""
    known = _DEVICE_CLASS.get(device)
    if known is not None:
        return known
    cleaned = device.strip().lower()
    if not cleaned:
        return None
    return _DEVICE_CLASS.get(cleaned, "other")


def campaign_value(raw: str) -> str | None:
    """A utm_source, utm_medium or utm_campaign value in lower case, or None unless it is 1 to 64
    letters, digits, spaces, `_`, `.`, `+` or `-` (starting with a letter or digit)."""
    value = raw.strip().lower()
    return value if _CAMPAIGN.fullmatch(value) else None


def referrer_host(raw: str) -> str | None:
    """The host name of a referrer (a URL, or a bare host), in lower case without port or user
    information; None when it has none or is longer than MAX_REFERRER_LENGTH."""
    value = raw.strip()
    if not value or len(value) > MAX_REFERRER_LENGTH:
        return None
    try:
        host = urlsplit(value if "//" in value else "//" + value).hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return None
    return host if host is not None and _HOST.fullmatch(host) else None


def country_code(raw: str) -> str | None:
    """An ISO 3166-1 alpha-2 style code in upper case (two letters), or None."""
    value = raw.strip().upper()
    return value if _COUNTRY.fullmatch(value) else None


def timezone_name(raw: str) -> str | None:
    """The IANA timezone name as given, or None when the tz database does not know it."""
    value = raw.strip()
    return value if len(value) <= MAX_TIMEZONE_LENGTH and value in ZONE_NAMES else None


def _zone(name: str) -> ZoneInfo:
    zone = _ZONES.get(name)
    if zone is None:
        zone = _ZONES[name] = ZoneInfo(name)  # a name of ZONE_NAMES: at most that many held
    return zone


def _offset_s(zone: ZoneInfo | None, s: int) -> int:
    """The zone's UTC offset in seconds at `s` seconds since the epoch (0 for UTC)."""
    if zone is None:
        return 0
    offset = datetime.fromtimestamp(s, zone).utcoffset()
    return 0 if offset is None else offset.days * DAY_S + offset.seconds


def local_hour(ms: int, zone_name: str | None) -> int:
    """The hour of the day (0-23) at `ms` in the named zone (UTC for None)."""
    s = ms // 1000
    return (s + _offset_s(None if zone_name is None else _zone(zone_name), s)) // HOUR_S % 24


def local_weekday(ms: int, zone_name: str | None) -> str:
    """The day of the week (monday ... sunday) at `ms` in the named zone (UTC for None)."""
    s = ms // 1000
    days = (s + _offset_s(None if zone_name is None else _zone(zone_name), s)) // DAY_S
    return WEEKDAYS[(days + _EPOCH_WEEKDAY) % 7]


def next_boundary_ms(ms: int, zone_name: str | None, period_s: int) -> int:
    """The first instant after `ms` at which the local time of the zone reaches a multiple of
    `period_s` (HOUR_S: the next hour, DAY_S: the next midnight), or at which the zone's offset
    changes first: the local hour or weekday cannot change before it. Assumes the offset does
    not change and change back within one period (no zone of the tz database does so)."""
    zone = None if zone_name is None else _zone(zone_name)
    s = ms // 1000
    offset = _offset_s(zone, s)
    due = ((s + offset) // period_s + 1) * period_s - offset  # if the offset holds until then
    if zone is not None and _offset_s(zone, due - 1) != offset:
        low, high = s, due - 1  # the offset is `offset` at low and another at high
        while high - low > 1:
            middle = (low + high) // 2
            if _offset_s(zone, middle) == offset:
                low = middle
            else:
                high = middle
        due = high
    return due * 1000
