"""The floor of the job's own mechanics, for `segments bench`: the segmentation job's source,
keying, watermarks and sinks, with a keyed function that does only what PyFlink must do per event
and none of the segmentation (no profile, no features, no rules, no transitions): decode and check
the event as the job does, read and write a keyed state value of the job's mean size, keep one
event-time timer per user (the job's pattern: registered when none is pending, 10 minutes ahead,
firing reads and writes the state), and run the merged model session once; invalid and late
events go to the dead letters as in the job.
The bench prints the job against this floor.

    python -m jobs.bench.floor_job [--config FILE] --state-bytes N [--no-model] [--no-timer]
"""

from __future__ import annotations

import argparse
import logging
import shutil

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from jobs.flink_environment import create_environment
from jobs.segment_users import attach_connectors, dead_letter_row, now_ms
from jobs.settings import JobSettings, load_settings
from jobs.shipped_files import ShippedFiles
from jobs.step_outputs import StepOutputs
from udfs.codec import DecodeError, SchemaCatalog
from udfs.events import event_from_record
from udfs.profile_config import MINUTE_MS
from udfs.segmentation import Segmentation

FLOOR_STATE = "floor-state"
TIMER_AHEAD_MS = 10 * MINUTE_MS  # the shipped definitions' most frequent lapse (recently active)
NO_TIMER = -1
PENDING_DIGITS = 20  # the pending timer's instant, at the head of the state value


class KeyedFloor(KeyedProcessFunction):
    def __init__(
        self,
        settings: JobSettings,
        segmentation: Segmentation,
        state_bytes: int,
        model: bool = True,
        timer: bool = True,
    ):
        self.state_bytes = max(state_bytes, PENDING_DIGITS)
        self.model, self.timer = model, timer  # the floor's parts, each left out to price it
        self.definitions_text = segmentation.definitions.text
        self.definitions_source = segmentation.definitions.source
        self.profile_config = settings.profile
        self.files = ShippedFiles.of_job(settings.models_dir, segmentation.definitions.models)
        self.allowed_lateness_ms = settings.allowed_lateness_ms
        self.max_event_bytes = settings.max_event_bytes
        self.max_future_ms = settings.max_future_ms

    def open(self, runtime_context: RuntimeContext):
        self.files_dir = self.files.materialize()
        scorer = (
            Segmentation.from_text(
                self.definitions_text, self.definitions_source, self.profile_config, self.files_dir / "models"
            )
            .engine()
            .scorer
        )
        self.merged = None if scorer is None or not self.model else scorer.merged
        # A fixed row per distinct vector: the call's cost, not the features', is what is measured.
        self.vectors = (
            {} if self.merged is None else {key: [0.5] * len(model.vector.features) for key, model in self.merged.plan}
        )
        self.filler = b"x" * (self.state_bytes - PENDING_DIGITS)
        catalog = SchemaCatalog(self.files_dir / "schemas")
        self.events = catalog.codec("UserEvent", max_bytes=self.max_event_bytes)
        self.dead_letters = catalog.codec("DeadLetter")
        # The job's state type (jobs/segment_users.SegmentUsers.profile_state).
        self.state = runtime_context.get_state(ValueStateDescriptor(FLOOR_STATE, Types.PICKLED_BYTE_ARRAY()))

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        # The job's decode and check, then its lateness check (which is how the bench's end markers
        # come out).
        try:
            event = event_from_record(self.events.decode(value[2]), now_ms(), self.max_future_ms)
        except DecodeError as err:
            yield self._dead_letter(
                dead_letter_row(
                    self.dead_letters,
                    value[2],
                    value[3],
                    value[4],
                    value[5],
                    err.reason,
                    err.message,
                    self.max_event_bytes,
                ),
            )
            return
        if event.timestamp < ctx.timer_service().current_watermark() - self.allowed_lateness_ms:
            yield self._dead_letter(
                dead_letter_row(
                    self.dead_letters,
                    value[2],
                    value[3],
                    value[4],
                    value[5],
                    "late",
                    "behind the watermark",
                    self.max_event_bytes,
                ),
            )
            return
        stored = self.state.value()
        pending = NO_TIMER if stored is None else int(stored[:PENDING_DIGITS])
        if self.merged is not None:
            self.merged.run(self.vectors)
        if pending == NO_TIMER and self.timer:
            pending = event.timestamp + TIMER_AHEAD_MS
            ctx.timer_service().register_event_time_timer(pending)
        self.state.update(b"%0*d" % (PENDING_DIGITS, pending) + self.filler)

    @staticmethod
    def _dead_letter(letter: tuple[str | None, bytes]) -> bytes:
        out = StepOutputs()  # what the job's keyed function yields: one frame per step
        out.dead_letter(letter)
        return out.frame()

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        self.state.value()
        self.state.update(b"%0*d" % (PENDING_DIGITS, NO_TIMER) + self.filler)
        return iter(())

    def close(self):
        shutil.rmtree(self.files_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The floor job of `segments bench`")
    parser.add_argument("--config")
    parser.add_argument("--state-bytes", type=int, required=True, help="size of the keyed state value")
    parser.add_argument("--no-model", action="store_true", help="leave the model call out (to price it)")
    parser.add_argument("--no-timer", action="store_true", help="leave the timer out (to price it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config)
    env = create_environment(settings)
    attach_connectors(
        env,
        settings,
        lambda s, segmentation: KeyedFloor(
            s, segmentation, args.state_bytes, model=not args.no_model, timer=not args.no_timer
        ),
    )
    env.execute(f"{settings.job_name}-floor")


if __name__ == "__main__":
    # Run the imported module's main so that the function ships by name (see jobs/segment_users.py).
    from jobs.bench.floor_job import main as main_of_module

    main_of_module()
