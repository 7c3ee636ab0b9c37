package segments.redis;

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.EOFException;
import java.io.FileInputStream;
import java.io.FileNotFoundException;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.util.ArrayList;
import java.util.List;

import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLHandshakeException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.SSLSocketFactory;
import javax.net.ssl.TrustManagerFactory;

/**
 * The least of a Redis client: one socket, RESP2 commands as arrays of bulk strings, pipelined
 * (every command of a batch written before any reply is read), with connect and read timeouts.
 * Replies: Long (integer), String (simple or bulk string; null for a nil bulk), {@link ErrorReply}
 * (an error reply, returned, not thrown, so a pipeline's other replies are still read), List (array).
 */
final class RespClient implements AutoCloseable {

    /** A "-ERR ..." reply. */
    static final class ErrorReply {
        final String message;

        ErrorReply(String message) {
            this.message = message;
        }

        boolean isNoScript() {
            return message.startsWith("NOSCRIPT");
        }

        /**
         * Redis unable to take writes for now (loading, busy, a replica after a failover, out of
         * memory, too many clients, not persisting): worth retrying, like a lost connection, and
         * left to the view follower after the retry time. Credentials, permissions, key types
         * and the script are not.
         */
        boolean isTransient() {
            for (String prefix : TRANSIENT) {
                if (message.startsWith(prefix)) {
                    return true;
                }
            }
            return false;
        }

        private static final String[] TRANSIENT = {
            "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "OOM", "CLUSTERDOWN", "NOREPLICAS", "MISCONF",
            "ERR max number of clients",
        };

        @Override
        public String toString() {
            return message;
        }
    }

    /** Redis said no to something retrying cannot change: credentials, database, the script. */
    static final class Rejected extends RuntimeException {
        private static final long serialVersionUID = 1L;

        Rejected(String message) {
            super(message);
        }
    }

    private final Socket socket;
    private final InputStream in;
    private final OutputStream out;

    RespClient(RedisEndpoint endpoint, int connectTimeoutMillis, int readTimeoutMillis) throws IOException {
        Socket plain = new Socket();
        try {
            plain.connect(new InetSocketAddress(endpoint.host, endpoint.port), connectTimeoutMillis);
            plain.setSoTimeout(readTimeoutMillis);
            plain.setTcpNoDelay(true);
            Socket s = plain;
            if (endpoint.tls) {
                SSLSocket tls = (SSLSocket) socketFactory(endpoint).createSocket(plain, endpoint.host, endpoint.port, true);
                // The certificate must name the host (SSLSocketFactory alone checks only the chain).
                SSLParameters parameters = tls.getSSLParameters();
                parameters.setEndpointIdentificationAlgorithm("HTTPS");
                tls.setSSLParameters(parameters);
                try {
                    tls.startHandshake();
                } catch (SSLHandshakeException e) {
                    // An untrusted certificate or another host's: retrying cannot change it.
                    throw new Rejected("the TLS handshake with Redis at " + endpoint + " failed: " + e.getMessage());
                }
                s = tls;
            }
            socket = s;
            in = new BufferedInputStream(s.getInputStream(), 1 << 16);
            out = new BufferedOutputStream(s.getOutputStream(), 1 << 16);
            if (endpoint.password != null) {
                Object reply = endpoint.username == null
                        ? call("AUTH", endpoint.password)
                        : call("AUTH", endpoint.username, endpoint.password);
                if (reply instanceof ErrorReply) {
                    // Never the password in a message; Redis's own reply does not carry it either.
                    failOn((ErrorReply) reply, "Redis refused the credentials: ");
                }
            }
            if (endpoint.database != 0) {
                Object reply = call("SELECT", Integer.toString(endpoint.database));
                if (reply instanceof ErrorReply) {
                    failOn((ErrorReply) reply, "Redis SELECT " + endpoint.database + ": ");
                }
            }
        } catch (IOException | RuntimeException e) {
            plain.close();
            throw e;
        }
    }

    private static SSLSocketFactory socketFactory(RedisEndpoint endpoint) throws IOException {
        if (endpoint.caCertsFile == null) {
            return (SSLSocketFactory) SSLSocketFactory.getDefault();
        }
        try (InputStream pem = new FileInputStream(endpoint.caCertsFile)) {
            KeyStore trusted = KeyStore.getInstance(KeyStore.getDefaultType());
            trusted.load(null, null);
            int n = 0;
            for (Certificate certificate : CertificateFactory.getInstance("X.509").generateCertificates(pem)) {
                trusted.setCertificateEntry("ca-" + n++, certificate);
            }
            if (n == 0) {
                throw new Rejected("ssl_ca_certs " + endpoint.caCertsFile + " holds no certificate");
            }
            TrustManagerFactory trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            trust.init(trusted);
            SSLContext context = SSLContext.getInstance("TLS");
            context.init(null, trust.getTrustManagers(), null);
            return context.getSocketFactory();
        } catch (FileNotFoundException e) {
            throw new Rejected("ssl_ca_certs " + endpoint.caCertsFile + " cannot be read: " + e.getMessage());
        } catch (GeneralSecurityException e) {
            throw new Rejected("ssl_ca_certs " + endpoint.caCertsFile + ": " + e.getMessage());
        }
    }

    /** A transient error (Redis loading, busy) as an IOException, to be retried; else Rejected. */
    private static void failOn(ErrorReply error, String what) throws IOException {
        if (error.isTransient()) {
            throw new IOException(what + error);
        }
        throw new Rejected(what + error);
    }

    /** One command, one round trip. */
    Object call(String... command) throws IOException {
        List<String[]> one = new ArrayList<>(1);
        one.add(command);
        return pipeline(one).get(0);
    }

    /** Writes every command, flushes once, then reads one reply per command, in order. */
    List<Object> pipeline(List<String[]> commands) throws IOException {
        for (String[] command : commands) {
            writeCommand(command);
        }
        out.flush();
        List<Object> replies = new ArrayList<>(commands.size());
        for (int i = 0; i < commands.size(); i++) {
            replies.add(readReply());
        }
        return replies;
    }

    private void writeCommand(String[] command) throws IOException {
        out.write('*');
        writeDecimal(command.length);
        for (String arg : command) {
            byte[] bytes = arg.getBytes(StandardCharsets.UTF_8);
            out.write('$');
            writeDecimal(bytes.length);
            out.write(bytes);
            out.write('\r');
            out.write('\n');
        }
    }

    private void writeDecimal(long value) throws IOException {
        out.write(Long.toString(value).getBytes(StandardCharsets.US_ASCII));
        out.write('\r');
        out.write('\n');
    }

    private Object readReply() throws IOException {
        int type = in.read();
        if (type < 0) {
            throw new EOFException("Redis closed the connection");
        }
        String line = readLine();
        switch (type) {
            case '+':
                return line;
            case '-':
                return new ErrorReply(line);
            case ':':
                return Long.parseLong(line);
            case '$': {
                int length = Integer.parseInt(line);
                if (length < 0) {
                    return null;
                }
                byte[] bytes = readExactly(length);
                readExactly(2); // CRLF
                return new String(bytes, StandardCharsets.UTF_8);
            }
            case '*': {
                int count = Integer.parseInt(line);
                if (count < 0) {
                    return null;
                }
                List<Object> items = new ArrayList<>(count);
                for (int i = 0; i < count; i++) {
                    items.add(readReply());
                }
                return items;
            }
            default:
                throw new IOException("not a RESP2 reply (type byte " + type + ")");
        }
    }

    private String readLine() throws IOException {
        StringBuilder line = new StringBuilder();
        while (true) {
            int c = in.read();
            if (c < 0) {
                throw new EOFException("Redis closed the connection");
            }
            if (c == '\r') {
                int lf = in.read();
                if (lf != '\n') {
                    throw new IOException("malformed RESP line ending");
                }
                return line.toString();
            }
            line.append((char) c);
        }
    }

    private byte[] readExactly(int n) throws IOException {
        byte[] bytes = new byte[n];
        int got = 0;
        while (got < n) {
            int r = in.read(bytes, got, n - got);
            if (r < 0) {
                throw new EOFException("Redis closed the connection");
            }
            got += r;
        }
        return bytes;
    }

    @Override
    public void close() throws IOException {
        socket.close();
    }
}
