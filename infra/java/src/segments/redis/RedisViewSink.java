package segments.redis;

import java.io.IOException;
import java.util.Objects;

import org.apache.flink.api.connector.sink2.Committer;
import org.apache.flink.api.connector.sink2.CommitterInitContext;
import org.apache.flink.api.connector.sink2.Sink;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.SupportsCommitter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.core.io.SimpleVersionedSerializer;
import org.apache.flink.types.Row;

/**
 * The Redis view of segment memberships, written only from committed transitions: a two-phase
 * commit sink, like Flink's KafkaSink.
 *
 * <p>The writer buffers the transitions of each checkpoint interval and hands them over at the
 * checkpoint barrier as one committable ({@link TransitionBatch}); Flink keeps the committables in
 * the committer's checkpointed state and calls the {@link RedisViewCommitter} once the checkpoint
 * has completed, i.e. when the Kafka transaction holding the same transitions commits too. After a
 * restore, the committables of the restored checkpoint are committed again (the apply script keeps
 * only newer sequences per user and segment, so that is harmless) and whatever the writer buffered
 * after that checkpoint is gone, as are the Kafka records of the aborted transaction: the replay
 * makes them again. Redis therefore never holds a transition the committed log does not.
 *
 * <p>Input: rows whose fields 0..4 are user_id (String), segment (String), kind ("ENTER", "EXIT",
 * or "ERASE": an erasure marker, segment "", deleting the user's entries up to its sequence),
 * sequence (Long), event_time (Long, epoch ms), and field 6 the rule (String); field 5 (the Kafka
 * payload) is ignored. The key
 * layout and the Lua script come from the Python side (udfs/redis_layout.py), so they are defined
 * once.
 */
public final class RedisViewSink implements Sink<Row>, SupportsCommitter<TransitionBatch> {

    private static final long serialVersionUID = 1L;

    private final String redisUrl;
    private final String userKeyPrefix;
    private final String sequenceKeyPrefix;
    private final String membersKeyPrefix;
    private final long retentionMillis;
    private final long retryMillis;
    private final String applyScript;

    /**
     * @param redisUrl redis://[user:password@]host[:port][/db] or rediss:// (TLS), or
     *     "env:NAME" to read the URL from the environment variable NAME where the committer runs
     *     (then the URL is not in the job graph)
     * @param userKeyPrefix prefix of a user's segment hash (the user id follows)
     * @param sequenceKeyPrefix prefix of a user's sequence hash (the user id follows)
     * @param membersKeyPrefix prefix of a segment's member set (the segment name follows)
     * @param retentionMillis the profile retention: how long the sequence hash of a user holding no
     *     segment is kept after its last write (0: for good); members go by their retention EXITs
     * @param retryMillis how long a commit retries an unreachable Redis before it leaves the rest to the view follower
     * @param applyScript the Lua script that applies one transition if its sequence is newer
     */
    public RedisViewSink(String redisUrl, String userKeyPrefix, String sequenceKeyPrefix,
            String membersKeyPrefix, long retentionMillis, long retryMillis, String applyScript) {
        this.redisUrl = Objects.requireNonNull(redisUrl);
        this.userKeyPrefix = Objects.requireNonNull(userKeyPrefix);
        this.sequenceKeyPrefix = Objects.requireNonNull(sequenceKeyPrefix);
        this.membersKeyPrefix = Objects.requireNonNull(membersKeyPrefix);
        this.retentionMillis = retentionMillis;
        this.retryMillis = retryMillis;
        this.applyScript = Objects.requireNonNull(applyScript);
        if (redisUrl.startsWith("env:")) {
            if (redisUrl.length() == 4) {
                throw new IllegalArgumentException("env: must name the variable holding the Redis URL");
            }
        } else {
            RedisEndpoint.parse(redisUrl); // fail on the client, before submission
        }
    }

    @Override
    public SinkWriter<Row> createWriter(WriterInitContext context) throws IOException {
        return new RedisViewWriter(context.metricGroup());
    }

    @Override
    public Committer<TransitionBatch> createCommitter(CommitterInitContext context) throws IOException {
        return new RedisViewCommitter(
                RedisEndpoint.parse(RedisEndpoint.resolve(redisUrl)),
                userKeyPrefix, sequenceKeyPrefix, membersKeyPrefix, retentionMillis, retryMillis, applyScript,
                context.metricGroup());
    }

    @Override
    public SimpleVersionedSerializer<TransitionBatch> getCommittableSerializer() {
        return new TransitionBatch.Serializer();
    }

    /** No URL here: the job graph's description must not carry a password. */
    @Override
    public String toString() {
        return "RedisViewSink{prefix=" + userKeyPrefix + ", retention=" + retentionMillis + " ms}";
    }
}
