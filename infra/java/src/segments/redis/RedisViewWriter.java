package segments.redis;

import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.List;

import org.apache.flink.api.connector.sink2.CommittingSinkWriter;
import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.groups.SinkWriterMetricGroup;
import org.apache.flink.types.Row;

/**
 * First phase: keeps the transitions of the current checkpoint interval in memory and, at the
 * checkpoint barrier, hands them over as one committable. Nothing is written to Redis here, and
 * the writer needs no state of its own: what it held when the job failed belonged to a checkpoint
 * that never completed, so the restored job makes those transitions again.
 */
final class RedisViewWriter implements CommittingSinkWriter<Row, TransitionBatch> {

    /** The row's rule (jobs/segment_users.py TRANSITION_RECORD: after the Kafka payload). */
    static final int RULE_FIELD = 6;

    private List<TransitionBatch.Entry> pending = new ArrayList<>();
    private final Counter buffered;

    RedisViewWriter(SinkWriterMetricGroup metrics) {
        this.buffered = metrics.counter("redis_transitions_buffered");
    }

    @Override
    public void write(Row row, Context context) {
        // Fields read at once: with object reuse the row may be overwritten after this call.
        String kind = (String) row.getField(2);
        String userId = (String) row.getField(0);
        long sequence = ((Number) row.getField(3)).longValue();
        long eventTime = ((Number) row.getField(4)).longValue();
        if ("ERASE".equals(kind)) {
            // An erasure marker (udfs/redis_layout.py ERASE_VIEW_KIND): in the batch in its place,
            // after the user's erasure EXITs, before anything of a later return.
            pending.add(TransitionBatch.Entry.erasure(userId, sequence, eventTime));
        } else if ("ENTER".equals(kind) || "EXIT".equals(kind)) {
            pending.add(new TransitionBatch.Entry(userId, (String) row.getField(1), "ENTER".equals(kind), sequence,
                    eventTime, (String) row.getField(RULE_FIELD)));
        } else {
            throw new IllegalArgumentException("transition kind must be ENTER, EXIT or ERASE, got " + kind);
        }
        buffered.inc();
    }

    @Override
    public void flush(boolean endOfInput) {
        // Nothing to flush: the transitions go out as the checkpoint's committable.
    }

    @Override
    public Collection<TransitionBatch> prepareCommit() {
        if (pending.isEmpty()) {
            return Collections.emptyList();
        }
        TransitionBatch batch = new TransitionBatch(pending);
        pending = new ArrayList<>();
        return Collections.singletonList(batch);
    }

    @Override
    public void close() {
        pending = new ArrayList<>();
    }
}
