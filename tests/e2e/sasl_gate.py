"""A test-side authenticating front for the local broker: SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)
and optional TLS in front of tansu, because tansu 0.6 cannot require SASL itself (its memory
storage keeps no SCRAM users, it offers no PLAIN, its TLS flags do not work). It is test
infrastructure only: production deployments point the job at their own Kafka, which enforces its
own security.

What it does, per client connection: TLS if a certificate and key are given; then, before a login,
it accepts only ApiVersions (passed through to the broker, so the client sees the broker's
versions), SaslHandshake v1 and SaslAuthenticate v0-v2, which it answers itself against a JSON file
of users and passwords (`{"alice": "secret"}`); any other request before a login, an unknown
mechanism or a failed login closes the connection (a refused login is answered with Kafka's
SASL_AUTHENTICATION_FAILED, 58, first). After a login it relays bytes unchanged both ways. The
broker's advertised listener must be this gate's address, so that clients that follow the metadata
come back through it; the broker's own port is never handed to a client.

With a third TLS file, CLIENT_CA_PEM, the TLS handshake requires a client certificate signed by
that CA (mutual TLS). Not done: OAUTHBEARER and GSSAPI are not offered; re-authentication
(KIP-368) is not asked for (session lifetime 0).

    python -m tests.e2e.sasl_gate LISTEN_PORT BROKER_HOST:PORT USERS_JSON [CERT_PEM KEY_PEM [CLIENT_CA_PEM]]
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
import sys

MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_ITERATIONS = 4096
API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58


class LoginRefused(Exception):
    pass


class Request:
    """A request's header fields and a reader over the rest."""

    def __init__(self, data: bytes):
        self.data = data
        self.api_key, self.version, self.correlation = struct.unpack_from(">hhi", data, 0)
        self.pos = 8
        self.client_id = self.string()

    def _unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def string(self) -> str | None:
        length = self._unpack(">h")
        if length < 0:
            return None
        text = self.data[self.pos : self.pos + length].decode()
        self.pos += length
        return text

    def bytes32(self) -> bytes:
        length = self._unpack(">i")
        self.pos += length
        return self.data[self.pos - length : self.pos]

    def compact_bytes(self) -> bytes:
        length = self.uvarint() - 1
        self.pos += length
        return self.data[self.pos - length : self.pos]

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.pos += self.uvarint()


def uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def scram_keys(hash_name: str, password: str, salt: bytes) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) of RFC 5802."""
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    return hashlib.new(hash_name, client_key).digest(), hmac.new(salted, b"Server Key", hash_name).digest()


class Login:
    """The server side of one SASL login: `step(client bytes) -> (done, reply bytes)`, or
    LoginRefused."""

    def __init__(self, users: dict[str, str], mechanism: str):
        self.users, self.mechanism = users, mechanism
        self.user: str | None = None
        self.hash = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
        self.server_first: str | None = None

    def step(self, data: bytes) -> tuple[bool, bytes]:
        if self.mechanism == "PLAIN":
            parts = data.decode().split("\0")
            if len(parts) != 3:
                raise LoginRefused("malformed PLAIN message")
            _, user, password = parts
            if user not in self.users or not hmac.compare_digest(self.users[user], password):
                raise LoginRefused("Authentication failed: Invalid username or password")
            self.user = user
            return True, b""
        if self.server_first is None:
            return False, self._first(data.decode())
        return True, self._final(data.decode())

    def _first(self, message: str) -> bytes:
        gs2_header_end = message.index(",", message.index(",") + 1)
        self.client_first_bare = message[gs2_header_end + 1 :]
        attrs = dict(part.split("=", 1) for part in self.client_first_bare.split(","))
        self.user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
        salt = hashlib.sha256(f"salt:{self.user}".encode()).digest()[:16]
        password = self.users.get(self.user)
        self.keys = scram_keys(self.hash, password, salt) if password is not None else None
        self.nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        self.server_first = f"r={self.nonce},s={base64.b64encode(salt).decode()},i={SCRAM_ITERATIONS}"
        return self.server_first.encode()

    def _final(self, message: str) -> bytes:
        without_proof, _, proof = message.rpartition(",p=")
        attrs = dict(part.split("=", 1) for part in without_proof.split(","))
        refused = LoginRefused(
            "Authentication failed during authentication due to invalid credentials with "
            f"SASL mechanism {self.mechanism}"
        )
        if self.keys is None or attrs.get("r") != self.nonce:
            raise refused
        stored_key, server_key = self.keys
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, self.hash).digest()
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=False))
        if not hmac.compare_digest(hashlib.new(self.hash, client_key).digest(), stored_key):
            raise refused
        return b"v=" + base64.b64encode(hmac.new(server_key, auth_message, self.hash).digest())


def authenticate_reply(request: Request, code: int, error: str | None, data: bytes) -> bytes:
    """A SaslAuthenticate response in the request's version (v2 is flexible)."""
    if request.version >= 2:
        message = b"\0" if error is None else uvarint(len(error.encode()) + 1) + error.encode()
        body = struct.pack(">h", code) + message + uvarint(len(data) + 1) + data + struct.pack(">q", 0) + b"\0"
        return struct.pack(">i", request.correlation) + b"\0" + body
    message = struct.pack(">h", -1) if error is None else struct.pack(">h", len(error.encode())) + error.encode()
    body = struct.pack(">h", code) + message + struct.pack(">i", len(data)) + data
    if request.version >= 1:
        body += struct.pack(">q", 0)  # session lifetime: no re-authentication
    return struct.pack(">i", request.correlation) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def handle(client_r, client_w, broker: tuple[str, int], users: dict[str, str]) -> None:
    broker_r, broker_w = await asyncio.open_connection(*broker)
    login: Login | None = None
    try:
        while True:
            request = Request(await read_frame(client_r))
            if request.api_key == API_VERSIONS:
                broker_w.write(frame(request.data))
                await broker_w.drain()
                client_w.write(frame(await read_frame(broker_r)))
            elif request.api_key == SASL_HANDSHAKE and request.version >= 1:
                mechanism = request.string()
                known = mechanism in MECHANISMS
                body = struct.pack(">hi", 0 if known else UNSUPPORTED_SASL_MECHANISM, len(MECHANISMS))
                body += b"".join(struct.pack(">h", len(m)) + m.encode() for m in MECHANISMS)
                client_w.write(frame(struct.pack(">i", request.correlation) + body))
                await client_w.drain()
                if not known:
                    return
                login = Login(users, mechanism)
                client_id = request.client_id
            elif request.api_key == SASL_AUTHENTICATE and login is not None:
                if request.version >= 2:  # a flexible request: the header's tagged fields first
                    request.skip_tags()
                    data = request.compact_bytes()
                else:
                    data = request.bytes32()
                try:
                    done, reply = login.step(data)
                except (LoginRefused, ValueError, KeyError, IndexError) as err:
                    text = str(err) if isinstance(err, LoginRefused) else f"malformed SASL message: {err!r}"
                    client_w.write(frame(authenticate_reply(request, SASL_AUTHENTICATION_FAILED, text, b"")))
                    await client_w.drain()
                    print(f"refused a {login.mechanism} login of {login.user!r}: {text}", flush=True)
                    return
                client_w.write(frame(authenticate_reply(request, 0, None, reply)))
                await client_w.drain()
                if done:
                    print(f"authenticated {login.user!r} with {login.mechanism}, client id {client_id!r}", flush=True)
                    await asyncio.gather(relay(client_r, broker_w), relay(broker_r, client_w))
                    return
            else:
                print(f"refused request {request.api_key} v{request.version} before a login", flush=True)
                return
            await client_w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        client_w.close()
        broker_w.close()


async def serve(port: int, broker: tuple[str, int], users: dict[str, str], tls: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, broker, users), "127.0.0.1", port, ssl=tls)
    print(f"listening on {port} ({'TLS' if tls else 'plaintext'}), broker {broker[0]}:{broker[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    port, broker, users_file, *tls_files = argv
    host, broker_port = broker.rsplit(":", 1)
    with open(users_file) as f:
        users = json.load(f)
    tls = None
    if tls_files:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*tls_files[:2])
        if len(tls_files) > 2:
            tls.load_verify_locations(tls_files[2])
            tls.verify_mode = ssl.CERT_REQUIRED
    asyncio.run(serve(int(port), (host, int(broker_port)), users, tls))


if __name__ == "__main__":
    main(sys.argv[1:])
