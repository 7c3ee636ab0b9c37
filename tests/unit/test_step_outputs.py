"""The frame the keyed function yields per step (jobs/step_outputs.py), byte for byte as the Java
splitter (infra/java segments.steps.SplitStepOutputs) reads it: the flink tier proves the two agree
end to end; this pins the layout both sides are written against."""

from jobs.segment_users import KEYED_OUTPUTS
from jobs.step_outputs import DEAD_LETTER, ERASURE_AUDIT, IDENTITY_FEEDBACK, KEYED_KINDS, SHADOW_TRANSITION, StepOutputs


def test_a_step_with_nothing_to_say_yields_no_frame():
    assert not StepOutputs()


def test_items_are_framed_in_order_with_big_endian_lengths_and_utf8_text():
    out = StepOutputs()
    out.transition("ü1", "cart", True, 2, 1_700_000_000_000, b"\xc3\x01avro", "x > 1")
    out.dead_letter((None, b"dl"))
    out.snapshot("ü1", None, b"st")
    out.keyed(IDENTITY_FEEDBACK, "k", b"")
    assert out
    assert out.frame() == (
        b"\x01"
        + b"\x00\x00\x00\x03"
        + "ü1".encode()
        + b"\x00\x00\x00\x04cart"
        + b"\x01"
        + (2).to_bytes(8, "big")
        + (1_700_000_000_000).to_bytes(8, "big")
        + b"\x00\x00\x00\x06\xc3\x01avro"
        + b"\x00\x00\x00\x05x > 1"
        + b"\x03"  # a dead letter with no key: length -1
        + b"\xff\xff\xff\xff"
        + b"\x00\x00\x00\x02dl"
        + b"\x02"
        + b"\x00\x00\x00\x03"
        + "ü1".encode()
        + b"\xff\xff\xff\xff"
        + b"\x00\x00\x00\x02st"
        + b"\x04\x00\x00\x00\x01k\x00\x00\x00\x00"
    )


def test_an_exit_has_its_flag_clear_and_the_keyed_kinds_follow_the_java_side_outputs_order():
    out = StepOutputs()
    out.transition("u", "s", False, 1, 0, b"", "r")
    assert out.frame()[1 + 4 + 1 + 4 + 1] == 0
    # SplitStepOutputs: kind 3 + i goes to the i-th keyed tag, in jobs.segment_users.KEYED_OUTPUTS' order.
    assert KEYED_KINDS == (DEAD_LETTER, IDENTITY_FEEDBACK, ERASURE_AUDIT, SHADOW_TRANSITION) == (3, 4, 5, 6)
    assert len(KEYED_OUTPUTS) == len(KEYED_KINDS)


def test_the_erasure_marker_is_a_transition_item_of_kind_two_with_no_segment_payload_or_rule():
    out = StepOutputs()
    out.erase_view("u", 7, 9)
    assert out.frame() == (
        b"\x01\x00\x00\x00\x01u\x00\x00\x00\x00\x02"
        + (7).to_bytes(8, "big")
        + (9).to_bytes(8, "big")
        + b"\x00\x00\x00\x00\x00\x00\x00\x00"
    )
