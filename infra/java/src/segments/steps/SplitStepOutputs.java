package segments.steps;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.Map;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;
import org.apache.flink.streaming.api.functions.ProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * Splits what the keyed Python function produced in one step (one event, timer or request) into
 * the job's streams. The function yields one byte array per step instead of one record per
 * transition and per side output: every record a Python function yields crosses PyFlink's
 * per-record Python (generators, converters, a Row object) and the interpreter boundary, and its
 * side outputs yielded from on_timer are not routed in thread mode for keyed broadcast functions
 * (docs/architecture.md). The counters of transitions per segment are kept here too, off the
 * Python thread. jobs/step_outputs.py writes the frames; the layout is documented there.
 *
 * <p>Output: transition rows (user_id, segment, kind, sequence, event_time, payload, rule) on the
 * main output; keyed records (key, payload) on the side output of their kind; profile snapshots
 * (user_id, cause_event_id, payload) on theirs.
 */
public final class SplitStepOutputs extends ProcessFunction<byte[], Row> {

    private static final long serialVersionUID = 1L;

    static final byte TRANSITION = 1;
    static final byte SNAPSHOT = 2;
    static final byte FIRST_KEYED = 3;
    // A transition item's kind byte indexes these: the view's erasure marker goes to the Redis
    // view's sink only (attach_connectors filters it out of the transitions topic).
    private static final String[] KINDS = {"EXIT", "ENTER", "ERASE"};
    private static final byte ENTER = 1;
    private static final byte ERASE_VIEW = 2;

    private final String[] segments;
    private final OutputTag<Row> snapshots;
    private final OutputTag<Row>[] keyed;
    private transient Counter transitionsOut;
    private transient Map<String, Counter[]> perSegment;
    private transient MetricGroup metrics;

    /**
     * @param segments the defined segments, whose counters exist (at 0) before their first transition
     * @param snapshots the side output of profile snapshots
     * @param keyed the side outputs of keyed records, kind FIRST_KEYED + i going to keyed[i]
     */
    public SplitStepOutputs(String[] segments, OutputTag<Row> snapshots, OutputTag<Row>[] keyed) {
        this.segments = segments.clone();
        this.snapshots = snapshots;
        this.keyed = keyed.clone();
    }

    @Override
    public void open(OpenContext openContext) {
        metrics = getRuntimeContext().getMetricGroup();
        transitionsOut = metrics.counter("transitions_out");
        perSegment = new HashMap<>();
        for (String segment : segments) {
            counters(segment);
        }
    }

    @Override
    public void processElement(byte[] frame, Context ctx, Collector<Row> out) {
        ByteBuffer in = ByteBuffer.wrap(frame);
        while (in.hasRemaining()) {
            byte kind = in.get();
            if (kind == TRANSITION) {
                String userId = string(in);
                String segment = string(in);
                byte transitionKind = in.get();
                long sequence = in.getLong();
                long eventTime = in.getLong();
                byte[] payload = bytes(in);
                String rule = string(in);
                if (transitionKind != ERASE_VIEW) {
                    transitionsOut.inc();
                    counters(segment)[transitionKind == ENTER ? 0 : 1].inc();
                }
                out.collect(Row.of(userId, segment, KINDS[transitionKind], sequence, eventTime, payload, rule));
            } else if (kind == SNAPSHOT) {
                String userId = string(in);
                String cause = string(in);
                ctx.output(snapshots, Row.of(userId, cause, bytes(in)));
            } else if (kind >= FIRST_KEYED && kind - FIRST_KEYED < keyed.length) {
                String key = string(in);
                ctx.output(keyed[kind - FIRST_KEYED], Row.of(key, bytes(in)));
            } else {
                throw new IllegalStateException("step output frame: unknown item kind " + kind);
            }
        }
    }

    private Counter[] counters(String segment) {
        Counter[] counters = perSegment.get(segment);
        if (counters == null) {
            MetricGroup group = metrics.addGroup("segment", segment);
            counters = new Counter[] {group.counter("enter"), group.counter("exit")};
            perSegment.put(segment, counters);
        }
        return counters;
    }

    /** A length-prefixed UTF-8 string; length -1 is null. */
    private static String string(ByteBuffer in) {
        int length = in.getInt();
        if (length < 0) {
            return null;
        }
        String value = new String(in.array(), in.position(), length, StandardCharsets.UTF_8);
        in.position(in.position() + length);
        return value;
    }

    private static byte[] bytes(ByteBuffer in) {
        byte[] value = new byte[in.getInt()];
        in.get(value);
        return value;
    }
}
