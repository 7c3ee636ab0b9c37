package segments.events;

import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

import org.apache.flink.api.common.eventtime.SerializableTimestampAssigner;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.metrics.Counter;
import org.apache.flink.streaming.api.functions.ProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * The user id and event time of a raw UserEvent record, read in Java so that no Python runs on the
 * source's thread: in PyFlink's thread mode every Python function of a TaskManager shares one
 * interpreter lock, and a decode operator there made the keyed function wait for it on every call
 * into Java (profiled: most of the keyed thread's off-CPU time was in take_gil).
 *
 * <p>Only the key and the time are read here: the header (magic and the fingerprint of a
 * UserEvent version the job reads; jobs/segment_users.user_event_headers checks that each starts
 * with these fields) and the record's first four fields (event_id, user_id, event_type,
 * timestamp). Checking the record is left to the keyed function, which decodes and validates it
 * in Python with the same code as every other runner (udfs/codec.py, udfs/events.py) and
 * dead-letters it with the reason; it also refuses a record whose decoded user id is not this key.
 * A record whose header or user id cannot be read gets the key "" (never a valid user id) and no
 * event time; a time outside [minEventTimeMs, now + maxFutureMs] is not used either, so neither
 * moves the watermark.
 *
 * <p>Input: rows (payload bytes, topic, partition, offset) from the Kafka table source. Output:
 * rows (key, (user_id, event_time, payload, topic, partition, offset)), the shape PyFlink's
 * key_by gives a keyed Python function (event_time is Long.MIN_VALUE when unknown).
 */
public final class UserEventKeys extends ProcessFunction<Row, Row> {

    private static final long serialVersionUID = 1L;
    public static final String NO_KEY = "";

    private static final int HEADER_BYTES = 10;

    private final byte[] headers;
    private final long minEventTimeMs;
    private final long maxFutureMs;
    private final int maxEventBytes;
    private transient CharsetDecoder utf8;
    private transient Counter eventsIn;

    /**
     * @param headers the single-object encoding's headers of the UserEvent versions read (C3 01
     *     and the schema's 8-byte fingerprint each), concatenated
     * @param minEventTimeMs the earliest event time that counts (udfs/events.MIN_EVENT_TIME_MS)
     * @param maxFutureMs how far ahead of the wall clock an event time may be
     * @param maxEventBytes larger records are not read (the keyed function dead-letters them)
     */
    public UserEventKeys(byte[] headers, long minEventTimeMs, long maxFutureMs, int maxEventBytes) {
        if (headers.length == 0 || headers.length % HEADER_BYTES != 0) {
            throw new IllegalArgumentException("headers: whole 10-byte headers expected, got " + headers.length + " bytes");
        }
        this.headers = headers.clone();
        this.minEventTimeMs = minEventTimeMs;
        this.maxFutureMs = maxFutureMs;
        this.maxEventBytes = maxEventBytes;
    }

    @Override
    public void open(OpenContext openContext) {
        utf8 = StandardCharsets.UTF_8.newDecoder()
                .onMalformedInput(CodingErrorAction.REPORT)
                .onUnmappableCharacter(CodingErrorAction.REPORT);
        eventsIn = getRuntimeContext().getMetricGroup().counter("events_in");
    }

    @Override
    public void processElement(Row raw, Context ctx, Collector<Row> out) {
        eventsIn.inc();
        byte[] payload = (byte[]) raw.getField(0);
        String key = NO_KEY;
        long eventTime = Long.MIN_VALUE;
        if (payload != null && payload.length <= maxEventBytes && knownHeader(payload)) {
            Prefix prefix = new Prefix(payload, HEADER_BYTES);
            String userId = prefix.userId(utf8);
            if (userId != null) {
                key = userId;
                long time = prefix.timestamp();
                if (time >= minEventTimeMs && time <= System.currentTimeMillis() + maxFutureMs) {
                    eventTime = time;
                }
            }
        }
        out.collect(Row.of(key, Row.of(key, eventTime, payload, raw.getField(1), raw.getField(2), raw.getField(3))));
    }

    private boolean knownHeader(byte[] payload) {
        if (payload.length < HEADER_BYTES) {
            return false;
        }
        for (int at = 0; at < headers.length; at += HEADER_BYTES) {
            if (Arrays.equals(payload, 0, HEADER_BYTES, headers, at, at + HEADER_BYTES)) {
                return true;
            }
        }
        return false;
    }

    /** Avro binary of the record's first fields: string event_id, string user_id, enum, long. */
    static final class Prefix {
        private final byte[] data;
        private int pos;
        private boolean broken;

        Prefix(byte[] data, int start) {
            this.data = data;
            this.pos = start;
        }

        /** The user id, or null when it cannot be read (the event id before it included). */
        String userId(CharsetDecoder utf8) {
            long skip = readLong();
            if (broken || skip < 0 || skip > data.length - pos) {
                return null;
            }
            pos += (int) skip;
            long length = readLong();
            if (broken || length < 0 || length > data.length - pos) {
                return null;
            }
            try {
                String userId = utf8.decode(ByteBuffer.wrap(data, pos, (int) length)).toString();
                pos += (int) length;
                return userId;
            } catch (CharacterCodingException e) {
                return null;
            }
        }

        /** The timestamp after the event type, or Long.MIN_VALUE when it cannot be read. */
        long timestamp() {
            readLong(); // the event type's index: the keyed function checks it
            long time = readLong();
            return broken ? Long.MIN_VALUE : time;
        }

        /** A zigzag varint of at most 10 bytes (Avro's int and long). */
        private long readLong() {
            long value = 0;
            for (int shift = 0; shift < 70; shift += 7) {
                if (pos >= data.length) {
                    broken = true;
                    return 0;
                }
                int b = data[pos++] & 0xFF;
                value |= (long) (b & 0x7F) << shift;
                if ((b & 0x80) == 0) {
                    return (value >>> 1) ^ -(value & 1);
                }
            }
            broken = true;
            return 0;
        }
    }

    /** The event time the record carries (Long.MIN_VALUE: none, so it never moves the watermark). */
    public static final class EventTime implements SerializableTimestampAssigner<Row> {
        private static final long serialVersionUID = 1L;

        @Override
        public long extractTimestamp(Row keyed, long recordTimestamp) {
            return (Long) ((Row) keyed.getField(1)).getField(1);
        }
    }
}
