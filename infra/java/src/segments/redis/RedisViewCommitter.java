package segments.redis;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.List;

import org.apache.flink.api.connector.sink2.Committer;
import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.Gauge;
import org.apache.flink.metrics.groups.SinkCommitterMetricGroup;
import org.apache.flink.runtime.execution.SuppressRestartsException;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Second phase: applies a completed checkpoint's transitions to Redis, EVALSHA of the apply script
 * per transition, pipelined in chunks. Idempotent: the script applies a transition only if its
 * sequence is newer than the one stored for (user, segment), so committing a committable again
 * after a restore (Flink does, for the restored checkpoint's committables) changes nothing, and
 * the order of the transitions does not matter either. An erasure marker (an entry of kind ERASE)
 * deletes the user's entries up to its sequence; it is applied in its place in the committable,
 * after the user's ERASURE EXITs and before a later return (chunks go out in order).
 *
 * <p>Redis unreachable (connection refused or lost, timeouts, LOADING/BUSY replies): retried with
 * a growing pause for up to retryMillis, then the committable is left to the view follower
 * (jobs/redis_follower.py, which applies the committed transitions topic and keeps its place in
 * Redis) and the job goes on: a Redis outage never stops the Kafka transitions. While Redis is
 * known to be down, later commits try once, at most every {@link #PROBE_MILLIS}, instead of
 * waiting retryMillis each (the committer runs on the task's thread: waiting would stall it).
 *
 * <p>Redis refusing what retrying cannot change (credentials, permissions, a key of the wrong type,
 * the script): the job fails once with that error and is not restarted, instead of restarting in
 * a loop until someone reads the log.
 */
final class RedisViewCommitter implements Committer<TransitionBatch> {

    private static final Logger LOG = LoggerFactory.getLogger(RedisViewCommitter.class);
    static final int CHUNK = 1000;
    private static final int CONNECT_TIMEOUT_MS = 5_000;
    static final long PROBE_MILLIS = 5_000;

    private final RedisEndpoint endpoint;
    private final String userKeyPrefix;
    private final String sequenceKeyPrefix;
    private final String membersKeyPrefix;
    private final String retentionMillis;
    private final long retryMillis;
    private final String script;
    private final String scriptSha;
    private final int readTimeoutMillis;

    private final Counter writes;
    private final Counter stale;
    private final Counter retries;
    private final Counter leftToFollower;
    private final LatencyWindow latency = new LatencyWindow(1024);

    private RespClient client;
    private long downSince = -1; // Redis found unreachable for retryMillis at this instant; -1: up
    private long lastProbe;

    RedisViewCommitter(RedisEndpoint endpoint, String userKeyPrefix, String sequenceKeyPrefix,
            String membersKeyPrefix, long retentionMillis, long retryMillis, String script,
            SinkCommitterMetricGroup metrics) {
        this.endpoint = endpoint;
        this.userKeyPrefix = userKeyPrefix;
        this.sequenceKeyPrefix = sequenceKeyPrefix;
        this.membersKeyPrefix = membersKeyPrefix;
        this.retentionMillis = Long.toString(retentionMillis);
        this.retryMillis = retryMillis;
        this.script = script;
        this.scriptSha = sha1Hex(script);
        this.readTimeoutMillis = (int) Math.max(1_000, Math.min(10_000, retryMillis));
        this.writes = metrics.counter("redis_writes");
        this.stale = metrics.counter("redis_stale_writes"); // not newer than Redis held: re-commits
        this.retries = metrics.counter("redis_retries");
        // Transitions of commits Redis could not take: the view follower applies them from the topic.
        this.leftToFollower = metrics.counter("redis_left_to_follower");
        metrics.gauge("redis_unavailable", (Gauge<Integer>) () -> downSince < 0 ? 0 : 1);
        metrics.gauge("redis_write_latency_p50_us", (Gauge<Long>) () -> latency.percentile(0.5));
        metrics.gauge("redis_write_latency_p99_us", (Gauge<Long>) () -> latency.percentile(0.99));
        metrics.gauge("redis_write_latency_max_us", (Gauge<Long>) latency::max);
    }

    @Override
    public void commit(Collection<CommitRequest<TransitionBatch>> requests) throws IOException, InterruptedException {
        for (CommitRequest<TransitionBatch> request : requests) {
            try {
                commitOne(request);
            } catch (RespClient.Rejected e) {
                throw new SuppressRestartsException(new IOException("Redis at " + endpoint + " refused the view's "
                        + "writes (" + e.getMessage() + "): fix the Redis user, database or keys, then restore the "
                        + "job from its last checkpoint", e));
            }
        }
    }

    private void commitOne(CommitRequest<TransitionBatch> request) throws InterruptedException {
        List<TransitionBatch.Entry> entries = request.getCommittable().entries;
        long now = System.currentTimeMillis();
        // Redis known down: one try per PROBE_MILLIS, so a long outage does not stall the task.
        boolean probing = downSince >= 0;
        if (probing && now - lastProbe < PROBE_MILLIS) {
            leaveToFollower(request, entries.size(), null);
            return;
        }
        lastProbe = now;
        long deadline = probing ? now : now + retryMillis;
        long pauseMillis = 50;
        int done = 0;
        while (done < entries.size()) {
            int end = Math.min(done + CHUNK, entries.size());
            try {
                long started = System.nanoTime();
                int applied = applyChunk(entries.subList(done, end));
                latency.record((System.nanoTime() - started) / 1_000);
                writes.inc(end - done);
                stale.inc(end - done - applied);
                done = end;
                deadline = System.currentTimeMillis() + retryMillis;
                pauseMillis = 50;
                if (downSince >= 0) {
                    LOG.info("Redis at {} is reachable again after {} ms", endpoint, System.currentTimeMillis() - downSince);
                    downSince = -1;
                }
            } catch (IOException e) {
                closeClient();
                now = System.currentTimeMillis();
                if (now >= deadline) {
                    leaveToFollower(request, entries.size() - done, e);
                    return;
                }
                retries.inc();
                if (retries.getCount() % 10 == 1) {
                    LOG.warn("Redis at {} not reachable ({}); retrying for up to {} ms", endpoint, e.toString(),
                            deadline - now);
                }
                Thread.sleep(Math.min(pauseMillis, deadline - now));
                pauseMillis = Math.min(pauseMillis * 2, 1_000);
            }
        }
    }

    /** The rest of the committable is not applied here; the follower applies it from the topic. */
    private void leaveToFollower(CommitRequest<TransitionBatch> request, int notApplied, IOException cause) {
        if (downSince < 0) {
            downSince = System.currentTimeMillis();
            LOG.warn("Redis at {} could not be written for {} ms ({}): this and later commits are left to the view "
                    + "follower until Redis answers again; the Kafka transitions go on", endpoint, retryMillis,
                    cause == null ? "down" : cause.toString());
        }
        leftToFollower.inc(notApplied);
        // Failed, known reason: Flink counts it (numCommittablesFailure), keeps no retry of its
        // own and does not fail the job.
        request.signalFailedWithKnownReason(cause != null ? cause : new IOException("Redis at " + endpoint + " is down"));
    }

    /** Applies the entries in one pipeline; returns how many were newer than what Redis held. */
    private int applyChunk(List<TransitionBatch.Entry> chunk) throws IOException {
        RespClient redis = client();
        List<String[]> commands = new ArrayList<>(chunk.size());
        for (TransitionBatch.Entry e : chunk) {
            commands.add(evalsha(e));
        }
        int applied = 0;
        for (int attempt = 0; ; attempt++) {
            List<Object> replies = redis.pipeline(commands);
            List<String[]> again = new ArrayList<>();
            for (int i = 0; i < replies.size(); i++) {
                Object reply = replies.get(i);
                if (reply instanceof Long) {
                    applied += ((Long) reply).intValue();
                } else if (reply instanceof RespClient.ErrorReply) {
                    RespClient.ErrorReply error = (RespClient.ErrorReply) reply;
                    if (error.isNoScript()) {
                        again.add(commands.get(i)); // this one did not run
                    } else if (error.isTransient()) {
                        throw new IOException("Redis replied " + error);
                    } else {
                        throw new RespClient.Rejected("Redis rejected the apply script: " + error);
                    }
                } else {
                    throw new RespClient.Rejected("unexpected reply to EVALSHA: " + reply);
                }
            }
            if (again.isEmpty()) {
                return applied;
            }
            if (attempt > 0) {
                throw new IOException("Redis forgot the apply script again right after SCRIPT LOAD");
            }
            // Redis restarted (or SCRIPT FLUSH) since the script was loaded: load it and send the
            // commands that did not run once more.
            loadScript(redis);
            commands = again;
        }
    }

    private String[] evalsha(TransitionBatch.Entry e) {
        return new String[] {
            "EVALSHA", scriptSha, "3",
            userKeyPrefix + e.userId, sequenceKeyPrefix + e.userId, membersKeyPrefix + e.segment,
            e.segment, e.kind(), Long.toString(e.sequence), Long.toString(e.eventTime),
            e.userId, retentionMillis, e.rule,
        };
    }

    private void loadScript(RespClient redis) throws IOException {
        Object reply = redis.call("SCRIPT", "LOAD", script);
        if (reply instanceof RespClient.ErrorReply) {
            RespClient.ErrorReply error = (RespClient.ErrorReply) reply;
            if (error.isTransient()) {
                throw new IOException("Redis replied " + error);
            }
            throw new RespClient.Rejected("SCRIPT LOAD failed: " + error);
        }
        if (!scriptSha.equals(reply)) {
            throw new RespClient.Rejected("SCRIPT LOAD returned " + reply + ", expected " + scriptSha);
        }
    }

    private RespClient client() throws IOException {
        if (client == null) {
            client = new RespClient(endpoint, CONNECT_TIMEOUT_MS, readTimeoutMillis);
        }
        return client;
    }

    private void closeClient() {
        if (client != null) {
            try {
                client.close();
            } catch (IOException ignored) {
                // a broken connection: nothing more to do with it
            }
            client = null;
        }
    }

    @Override
    public void close() {
        closeClient();
    }

    static String sha1Hex(String text) {
        try {
            byte[] digest = MessageDigest.getInstance("SHA-1").digest(text.getBytes(StandardCharsets.UTF_8));
            StringBuilder hex = new StringBuilder(40);
            for (byte b : digest) {
                hex.append(Character.forDigit((b >> 4) & 0xF, 16)).append(Character.forDigit(b & 0xF, 16));
            }
            return hex.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    /** The last n round-trip durations (µs), for percentile gauges read by Flink's metric thread. */
    static final class LatencyWindow {
        private final long[] values;
        private int count;
        private int next;

        LatencyWindow(int size) {
            values = new long[size];
        }

        synchronized void record(long micros) {
            values[next] = micros;
            next = (next + 1) % values.length;
            count = Math.min(count + 1, values.length);
        }

        synchronized long percentile(double q) {
            if (count == 0) {
                return 0;
            }
            long[] sorted = Arrays.copyOf(values, count);
            Arrays.sort(sorted);
            return sorted[(int) Math.min(count - 1, Math.floor(q * count))];
        }

        synchronized long max() {
            long max = 0;
            for (int i = 0; i < count; i++) {
                max = Math.max(max, values[i]);
            }
            return max;
        }
    }
}
