package segments.redis;

import java.io.Serializable;
import java.net.URI;
import java.net.URISyntaxException;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;

/**
 * Where Redis is and how to log in, parsed from a redis:// or rediss:// URL as redis-py reads it:
 * user and password, database in the path or ?db=, ?password=. Its text form hides the password.
 */
public final class RedisEndpoint implements Serializable {

    private static final long serialVersionUID = 1L;

    final String host;
    final int port;
    final int database;
    final String username; // null: AUTH with the password only
    final String password; // null: no AUTH
    final boolean tls;
    // rediss:// with ?ssl_ca_certs=FILE (redis-py's name): the PEM certificates to trust, read on
    // the worker; null: the JVM's default trust store. The host name is verified either way.
    final String caCertsFile;

    private RedisEndpoint(String host, int port, int database, String username, String password, boolean tls,
            String caCertsFile) {
        this.host = host;
        this.port = port;
        this.database = database;
        this.username = username;
        this.password = password;
        this.tls = tls;
        this.caCertsFile = caCertsFile;
    }

    /** "env:NAME" is the URL in the environment variable NAME (read where this runs); else the URL. */
    public static String resolve(String urlOrReference) {
        if (!urlOrReference.startsWith("env:")) {
            return urlOrReference;
        }
        String name = urlOrReference.substring(4);
        String value = System.getenv(name);
        if (value == null || value.isEmpty()) {
            throw new IllegalArgumentException("the Redis URL variable " + name + " is not set");
        }
        return value;
    }

    /** Errors never quote the URL: it may hold a password. */
    public static RedisEndpoint parse(String url) {
        URI uri;
        try {
            uri = new URI(url);
        } catch (URISyntaxException e) {
            throw new IllegalArgumentException("the Redis URL is not a URL (redis://host:port/db expected)");
        }
        String scheme = uri.getScheme();
        if (!"redis".equals(scheme) && !"rediss".equals(scheme)) {
            throw new IllegalArgumentException(
                    "the Redis URL must start with redis:// or rediss://, not " + scheme + "://");
        }
        String host = uri.getHost();
        if (host == null || host.isEmpty()) {
            throw new IllegalArgumentException("the Redis URL names no host");
        }
        int port = uri.getPort() < 0 ? 6379 : uri.getPort();
        int database = 0;
        String path = uri.getRawPath();
        if (path != null && path.length() > 1) {
            database = parseDatabase(path.substring(1));
        }
        String username = null;
        String password = null;
        String userInfo = uri.getRawUserInfo();
        if (userInfo != null) {
            int colon = userInfo.indexOf(':');
            if (colon < 0) {
                username = decode(userInfo);
            } else {
                username = decode(userInfo.substring(0, colon));
                password = decode(userInfo.substring(colon + 1));
            }
            if (username.isEmpty()) {
                username = null;
            }
        }
        String caCertsFile = null;
        String query = uri.getRawQuery();
        if (query != null) {
            for (String pair : query.split("&")) {
                int eq = pair.indexOf('=');
                String key = eq < 0 ? pair : pair.substring(0, eq);
                String value = eq < 0 ? "" : decode(pair.substring(eq + 1));
                if (key.equals("password")) {
                    password = value;
                } else if (key.equals("username")) {
                    username = value.isEmpty() ? null : value;
                } else if (key.equals("db")) {
                    database = parseDatabase(value);
                } else if (key.equals("ssl_ca_certs")) {
                    caCertsFile = value;
                }
            }
        }
        if (username != null && password == null) {
            // redis-py reads redis://secret@host as the password "secret" for the default user.
            password = username;
            username = null;
        }
        boolean tls = "rediss".equals(scheme);
        if (caCertsFile != null && !tls) {
            throw new IllegalArgumentException("ssl_ca_certs is for rediss:// URLs");
        }
        return new RedisEndpoint(host, port, database, username, password, tls, caCertsFile);
    }

    private static int parseDatabase(String text) {
        try {
            return Integer.parseInt(text);
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("the Redis URL's database is not a number");
        }
    }

    private static String decode(String text) {
        return URLDecoder.decode(text, StandardCharsets.UTF_8);
    }

    @Override
    public String toString() {
        return (tls ? "rediss://" : "redis://") + (password != null ? "***@" : "") + host + ":" + port + "/" + database;
    }
}
