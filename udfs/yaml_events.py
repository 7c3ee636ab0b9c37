"""PyYAML's safe composer over events already parsed (kept apart from udfs.definitions: a subclass
of PyYAML's Python classes cannot be compiled with the rest of the core by mypyc)."""

import yaml


class EventComposer(yaml.composer.Composer, yaml.resolver.Resolver):
    """SafeLoader's composer and resolver, reading events already parsed instead of a parser."""

    def __init__(self, events: list[yaml.Event]):
        yaml.composer.Composer.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._events = events
        self._next = 0

    # The three methods of PyYAML's Parser that its Composer calls.
    def check_event(self, *choices) -> bool:  # noqa: D102
        if self._next == len(self._events):
            return False
        return not choices or isinstance(self._events[self._next], choices)

    def peek_event(self) -> yaml.Event | None:  # noqa: D102
        return self._events[self._next] if self._next < len(self._events) else None

    def get_event(self) -> yaml.Event | None:  # noqa: D102
        event = self.peek_event()
        self._next += 1
        return event
