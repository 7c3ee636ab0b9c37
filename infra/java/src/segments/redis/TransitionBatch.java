package segments.redis;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Objects;

import org.apache.flink.core.io.SimpleVersionedSerializer;

/**
 * The committable: the transitions one writer subtask made between two checkpoints, to be applied
 * to Redis once the later checkpoint has completed. Immutable.
 */
public final class TransitionBatch {

    /**
     * One transition as the Redis view needs it, or an erasure marker: delete every entry of the
     * user up to {@code sequence} (segment "", not enter; udfs/redis_layout.py).
     */
    public static final class Entry {
        final String userId;
        final String segment;
        final boolean enter;
        final boolean erase;
        final long sequence;
        final long eventTime;
        final String rule; // "" in committables of version 1, which did not carry it

        public Entry(String userId, String segment, boolean enter, long sequence, long eventTime, String rule) {
            this(userId, segment, enter, false, sequence, eventTime, rule);
        }

        private Entry(String userId, String segment, boolean enter, boolean erase, long sequence, long eventTime,
                String rule) {
            this.userId = Objects.requireNonNull(userId);
            this.segment = Objects.requireNonNull(segment);
            this.enter = enter;
            this.erase = erase;
            this.sequence = sequence;
            this.eventTime = eventTime;
            this.rule = Objects.requireNonNull(rule);
        }

        /** The erasure marker of a user: every entry of theirs up to {@code upTo} goes. */
        public static Entry erasure(String userId, long upTo, long eventTime) {
            return new Entry(userId, "", false, true, upTo, eventTime, "");
        }

        /** The apply script's kind argument. */
        String kind() {
            return erase ? "ERASE" : enter ? "ENTER" : "EXIT";
        }

        @Override
        public boolean equals(Object o) {
            if (!(o instanceof Entry)) {
                return false;
            }
            Entry e = (Entry) o;
            return enter == e.enter && erase == e.erase && sequence == e.sequence && eventTime == e.eventTime
                    && userId.equals(e.userId) && segment.equals(e.segment) && rule.equals(e.rule);
        }

        @Override
        public int hashCode() {
            return Objects.hash(userId, segment, enter, erase, sequence, eventTime, rule);
        }

        /** No user id: Flink puts committables into log lines, and user ids are personal data. */
        @Override
        public String toString() {
            return segment + " " + kind() + " #" + sequence + " @" + eventTime;
        }
    }

    final List<Entry> entries;

    public TransitionBatch(List<Entry> entries) {
        this.entries = Collections.unmodifiableList(new ArrayList<>(entries));
    }

    public List<Entry> entries() {
        return entries;
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof TransitionBatch && entries.equals(((TransitionBatch) o).entries);
    }

    @Override
    public int hashCode() {
        return entries.hashCode();
    }

    /** Short: Flink puts committables into log lines and exception messages. */
    @Override
    public String toString() {
        return "TransitionBatch{" + entries.size() + " transitions"
                + (entries.isEmpty() ? "" : ", first " + entries.get(0)) + "}";
    }

    /**
     * Version 3: int count, then per entry: user id and segment (int length + UTF-8 bytes each),
     * byte kind (1 ENTER, 0 EXIT, 2 an erasure marker), long sequence, long event time, then the
     * rule (as the strings); big-endian (DataOutput). Version 2 is the same without erasure
     * markers, version 1 without the rule either; both stay readable (version 1's entries get the
     * rule ""): committables live in checkpoints and savepoints.
     */
    public static final class Serializer implements SimpleVersionedSerializer<TransitionBatch> {
        static final int VERSION = 3;
        private static final byte EXIT = 0;
        private static final byte ENTER = 1;
        private static final byte ERASE = 2;

        @Override
        public int getVersion() {
            return VERSION;
        }

        @Override
        public byte[] serialize(TransitionBatch batch) throws IOException {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream(16 + batch.entries.size() * 48);
            DataOutputStream out = new DataOutputStream(bytes);
            out.writeInt(batch.entries.size());
            for (Entry e : batch.entries) {
                writeString(out, e.userId);
                writeString(out, e.segment);
                out.writeByte(e.erase ? ERASE : e.enter ? ENTER : EXIT);
                out.writeLong(e.sequence);
                out.writeLong(e.eventTime);
                writeString(out, e.rule);
            }
            out.flush();
            return bytes.toByteArray();
        }

        @Override
        public TransitionBatch deserialize(int version, byte[] serialized) throws IOException {
            if (version < 1 || version > VERSION) {
                throw new IOException("unknown TransitionBatch version " + version + " (this code reads 1 to " + VERSION + ")");
            }
            DataInputStream in = new DataInputStream(new ByteArrayInputStream(serialized));
            int count = in.readInt();
            if (count < 0) {
                throw new IOException("corrupt TransitionBatch: negative count");
            }
            List<Entry> entries = new ArrayList<>(Math.min(count, 1 << 16));
            for (int i = 0; i < count; i++) {
                String user = readString(in);
                String segment = readString(in);
                byte kind = in.readByte();
                if (kind != EXIT && kind != ENTER && !(kind == ERASE && version >= 3)) {
                    throw new IOException("corrupt TransitionBatch: kind byte " + kind);
                }
                long sequence = in.readLong();
                long eventTime = in.readLong();
                String rule = version == 1 ? "" : readString(in);
                entries.add(new Entry(user, segment, kind == ENTER, kind == ERASE, sequence, eventTime, rule));
            }
            if (in.available() != 0) {
                throw new IOException("corrupt TransitionBatch: " + in.available() + " trailing bytes");
            }
            return new TransitionBatch(entries);
        }

        private static void writeString(DataOutputStream out, String s) throws IOException {
            byte[] b = s.getBytes(StandardCharsets.UTF_8);
            out.writeInt(b.length);
            out.write(b);
        }

        private static String readString(DataInputStream in) throws IOException {
            int n = in.readInt();
            if (n < 0 || n > in.available()) {
                throw new IOException("corrupt TransitionBatch: string length " + n);
            }
            byte[] b = new byte[n];
            in.readFully(b);
            return new String(b, StandardCharsets.UTF_8);
        }
    }
}
