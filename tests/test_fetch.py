"""Image inputs: URLs fetched under the SSRF rules, data URIs, and this server's own uploads.

The URL tests talk to a real HTTP server on 127.0.0.1. Loopback is refused by default, so the
success paths run with ``allowed_networks=("127.0.0.1/32",)``; names that must not reach DNS are
resolved by a stand-in for :func:`kiln.api.fetch._resolve`, the fetcher's one lookup.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from kiln.api import fetch
from kiln.api.fetch import FetchPolicy, classify_address, is_address_allowed, resolve_image_input
from kiln.errors import AssetNotFound, InvalidImage


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
LOCAL = FetchPolicy(allowed_networks=("127.0.0.1/32",))
NAME = "ab" * 32 + ".png"


# --- a real HTTP server on 127.0.0.1 ------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host"), self.headers.get("Accept-Encoding")))
        url = urlsplit(self.path)
        route = url.path
        if route == "/png":
            self._send(200, PNG, content_type="image/png")
        elif route.startswith("/r/"):  # /r/N: N relative redirects, then the PNG
            n = int(route[3:])
            if n == 0:
                self._send(200, PNG, content_type="image/png")
            else:
                self._send(302, b"", location=f"/r/{n - 1}")
        elif route == "/to":  # /to?url=...: one redirect to anywhere
            self._send(302, b"", location=parse_qs(url.query)["url"][0])
        elif route == "/nolocation":
            self._send(302, b"")
        elif route == "/404":
            self._send(404, b"no such image")
        elif route == "/500":
            self._send(500, b"boom")
        elif route == "/host":
            self._send(200, (self.headers.get("Host") or "").encode())
        elif route == "/empty":
            self._send(200, b"")
        elif route == "/gzip":
            self._send(200, b"\x1f\x8b" + b"\0" * 20, content_encoding="gzip")
        elif route == "/endless":  # no Content-Length: only the running count can stop it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\0" * 65536
            with contextlib.suppress(OSError):
                for _ in range(1024):  # 64 MB at most, should the client never hang up
                    self.wfile.write(chunk)
        elif route == "/big":  # announces a gigabyte; the announcement alone must refuse it
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"\0" * 16)
        elif route == "/slow":  # one byte, then nothing until the test ends
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                self.server.release.wait(30)
                self.wfile.write(b"\0" * 99)
        else:
            self._send(404, b"")

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        location: str | None = None,
        content_encoding: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if location is not None:
            self.send_header("Location", location)
        if content_encoding is not None:
            self.send_header("Content-Encoding", content_encoding)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.release = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self._scheme}://{host}:{self.port}{path}"

    _scheme = "http"


def _serve(server: _Server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def http_server():
    yield from _serve(_Server())


@pytest.fixture
def server(http_server: _Server) -> _Server:
    http_server.seen.clear()
    return http_server


def resolve(value: object, policy: FetchPolicy = LOCAL, *, uploads: dict[str, bytes] | None = None, **kw) -> bytes:
    store = uploads or {}
    return asyncio.run(resolve_image_input(value, policy=policy, own_upload=store.get, **kw))  # type: ignore[arg-type]


def refused(value: object, policy: FetchPolicy = LOCAL, **kw) -> str:
    with pytest.raises(InvalidImage) as info:
        resolve(value, policy, **kw)
    assert info.value.code == "invalid_image"
    return info.value.message


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the named hosts to the given addresses (others: not found); returns the lookups made."""
    lookups: list[str] = []

    async def _resolve(host: str, port: int):
        lookups.append(host)
        if host not in answers:
            raise OSError("not found")
        return [ipaddress.ip_address(a) for a in answers[host]]

    monkeypatch.setattr(fetch, "_resolve", _resolve)
    return lookups


def no_connections(monkeypatch) -> None:
    def _client(policy):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(fetch, "_client", _client)


# --- URL fetching: the success paths -----------------------------------------------------------------


def test_fetches_a_png(server):
    assert resolve(server.url("/png")) == PNG
    assert server.seen == [("/png", f"127.0.0.1:{server.port}", "identity")]


def test_follows_relative_redirects_up_to_the_limit(server):
    assert resolve(server.url("/r/3")) == PNG
    assert [path for path, *_ in server.seen] == ["/r/3", "/r/2", "/r/1", "/r/0"]


def test_follows_an_absolute_redirect_to_an_allowed_host(server):
    assert resolve(server.url(f"/to?url={server.url('/png')}")) == PNG


def test_connects_to_the_checked_address_with_the_original_host_header(server, monkeypatch):
    """One lookup, then the connection goes to that address: img.test exists in no real DNS."""
    lookups = fake_dns(monkeypatch, {"img.test": ["127.0.0.1"]})
    assert resolve(server.url("/host", host="img.test")) == f"img.test:{server.port}".encode()
    assert lookups == ["img.test"]


def test_tries_the_next_checked_address_when_one_refuses(server, monkeypatch):
    """Nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1 only)."""
    lookups = fake_dns(monkeypatch, {"img.test": ["127.0.0.2", "127.0.0.1"]})
    policy = FetchPolicy(allowed_networks=("127.0.0.0/8",))
    assert resolve(server.url("/png", host="img.test"), policy) == PNG
    assert lookups == ["img.test"]


# --- URL fetching: refusals --------------------------------------------------------------------------


def test_default_policy_refuses_loopback_before_connecting(server):
    message = refused(server.url("/png"), FetchPolicy())
    assert "private or local network address" in message
    assert server.seen == []


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.1", "0x7f000001", "[::ffff:127.0.0.1]", "localhost", "0"],
)
def test_numeric_spellings_of_loopback_are_refused(server, host):
    message = refused(f"http://{host}:{server.port}/png", FetchPolicy())
    # httpx itself rejects a dotted quad with leading zeros; the rest resolve to a loopback address
    assert "private or local network address" in message or (host == "0177.0.0.1" and "not valid" in message)
    assert "127.0.0.1" not in message  # never echo an address the server resolved
    assert server.seen == []


def test_a_name_resolving_to_a_private_address_is_refused_without_connecting(monkeypatch):
    fake_dns(monkeypatch, {"evil.example": ["10.0.0.5"]})
    no_connections(monkeypatch)
    message = refused("https://evil.example/cat.png", FetchPolicy())
    assert "private or local network address" in message
    assert "10.0.0.5" not in message


def test_every_resolved_address_is_checked(monkeypatch):
    fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "2606:4700::1", "169.254.169.254"]})
    no_connections(monkeypatch)
    assert "private or local" in refused("http://mixed.example/a.png", FetchPolicy())


def test_allow_private_does_not_open_the_metadata_service(monkeypatch):
    fake_dns(monkeypatch, {"meta.example": ["169.254.169.254"]})
    no_connections(monkeypatch)
    assert "private or local" in refused("http://meta.example/latest", FetchPolicy(allow_private=True))


def test_an_unresolvable_host_is_refused(monkeypatch):
    fake_dns(monkeypatch, {})
    no_connections(monkeypatch)
    assert "could not resolve 'nowhere.example'" in refused("http://nowhere.example/a.png", FetchPolicy())


@pytest.mark.parametrize(
    "target",
    ["http://[::1]:{port}/png", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://0/png"],
)
def test_a_redirect_to_a_disallowed_address_is_refused(server, target):
    target = target.format(port=server.port)
    message = refused(server.url(f"/to?url={target}"))
    assert "redirects to a private or local network address" in message
    assert [path for path, *_ in server.seen] == [f"/to?url={target}"]


@pytest.mark.parametrize(
    "target",
    ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:70/", "http://user:pw@127.0.0.1/png"],
)
def test_a_redirect_to_a_refused_url_is_refused(server, target):
    message = refused(server.url(f"/to?url={target}"))
    assert "redirects to" in message


def test_too_many_redirects_are_refused(server):
    assert "more than 3 times" in refused(server.url("/r/4"))
    assert len(server.seen) == 4  # the original request and three redirects, no fifth request
    assert "more than 0 times" in refused(
        server.url("/r/1"), FetchPolicy(allowed_networks=("127.0.0.1/32",), max_redirects=0)
    )


def test_a_redirect_without_location_is_refused(server):
    assert "without a Location" in refused(server.url("/nolocation"))


@pytest.mark.parametrize(("path", "status"), [("/404", "HTTP 404 Not Found"), ("/500", "HTTP 500")])
def test_non_2xx_names_the_status(server, path, status):
    assert status in refused(server.url(path))


def test_the_size_cap_holds_mid_stream_without_content_length(server):
    policy = FetchPolicy(max_bytes=100_000, allowed_networks=("127.0.0.1/32",))
    started = time.monotonic()
    assert "larger than 100000 bytes" in refused(server.url("/endless"), policy)
    assert time.monotonic() - started < 5


def test_the_size_cap_holds_on_content_length(server):
    assert "larger than 20 MB" in refused(server.url("/big"))


def test_a_body_just_at_the_cap_is_accepted(server):
    assert resolve(server.url("/png"), FetchPolicy(max_bytes=len(PNG), allowed_networks=("127.0.0.1/32",))) == PNG
    policy = FetchPolicy(max_bytes=len(PNG) - 1, allowed_networks=("127.0.0.1/32",))
    assert "larger than" in refused(server.url("/png"), policy)


def test_the_whole_fetch_has_one_deadline(server):
    policy = FetchPolicy(timeout_s=0.3, allowed_networks=("127.0.0.1/32",))
    started = time.monotonic()
    assert "within 0.3 s" in refused(server.url("/slow"), policy)
    assert time.monotonic() - started < 5


def test_compressed_and_empty_bodies_are_refused(server):
    assert "gzip-encoded" in refused(server.url("/gzip"))
    assert "empty body" in refused(server.url("/empty"))


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://example.com:70/_GET",
        "javascript:alert(1)",
        "example.com/a.png",
    ],
)
def test_only_http_and_https(url, monkeypatch):
    no_connections(monkeypatch)
    assert "only http and https" in refused(url, FetchPolicy())


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@example.com/a.png",
        "http://user@example.com/a.png",
        "https://@example.com/a.png",
        "http://example.com\\@127.0.0.1/a.png",
    ],
)
def test_urls_with_userinfo_are_refused(url, monkeypatch):
    no_connections(monkeypatch)
    assert "carries a user name or password" in refused(url, FetchPolicy())


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_empty_values_are_refused(value):
    assert "image: is empty" in refused(value)


def test_bad_values_are_refused(monkeypatch):
    no_connections(monkeypatch)
    assert "must be a string" in refused(None)
    assert "has no host name" in refused("http:///a.png")
    assert "the URL is not valid" in refused("http://exa mple.com/a.png")
    assert "upload path" in refused("//evil.example/a.png")
    assert "longer than" in refused("http://example.com/" + "a" * 9000)


def test_messages_name_the_field():
    with pytest.raises(InvalidImage) as info:
        asyncio.run(resolve_image_input("ftp://x/y", policy=LOCAL, own_upload=dict().get, field="mask"))
    assert info.value.message.startswith("mask: ")
    assert info.value.details == {"field": "mask"}


# --- https: SNI and certificate checks use the original name ------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    ca_ext = "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    openssl(*f"req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=kiln-test-CA {ca_ext}".split())
    openssl(*f"req {ec} -keyout leaf.key -out leaf.csr -subj /CN=img.test".split())
    (d / "leaf.ext").write_text(
        "subjectAltName=DNS:img.test\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n"
    )
    sign = "-CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext"
    openssl(*f"x509 -req -in leaf.csr -out leaf.pem {sign}".split())
    return d


@pytest.fixture(scope="module")
def https_server(tls_files):
    server = _Server()
    server._scheme = "https"
    server.sni: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "leaf.pem", tls_files / "leaf.key")
    context.sni_callback = lambda sock, name, ctx: server.sni.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


def test_https_verifies_the_certificate_against_the_original_host(https_server, tls_files, monkeypatch):
    client = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    monkeypatch.setattr(fetch, "_ssl_context", lambda: client)
    lookups = fake_dns(monkeypatch, {"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    https_server.sni.clear()

    assert resolve(https_server.url("/png", host="img.test")) == PNG
    assert https_server.sni == ["img.test"]
    assert https_server.seen[-1][1] == f"img.test:{https_server.port}"

    message = refused(https_server.url("/png", host="other.test"))  # same address, certificate for img.test
    assert "certificate of 'other.test' could not be verified" in message
    assert lookups == ["img.test", "other.test"]


def test_https_with_an_untrusted_certificate_is_refused(https_server, monkeypatch):
    monkeypatch.setattr(fetch, "_ssl_context", lambda: ssl.create_default_context())  # system CAs only
    fake_dns(monkeypatch, {"img.test": ["127.0.0.1"]})
    assert "could not be verified" in refused(https_server.url("/png", host="img.test"))


# --- the address classifier --------------------------------------------------------------------------


ADDRESSES = [
    # public
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("93.184.216.34", None),
    ("2606:4700:4700::1111", None),
    ("2001:4860:4860::8888", None),
    ("64:ff9b::8.8.8.8", None),  # NAT64 of a public address (DNS64 networks)
    ("2002:808:808::1", None),  # 6to4 of 8.8.8.8
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"),
    ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("192.0.2.1", "special-use"),
    ("198.18.0.1", "special-use"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("ff02::1", "multicast"),
    ("fd00:ec2::254", "metadata"),
    ("2001:db8::1", "special-use"),
    ("100::1", "reserved"),
    ("4000::1", "reserved"),
    # IPv4 embedded in IPv6
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:8.8.8.8", "ipv4-mapped"),
    ("::127.0.0.1", "loopback"),
    ("::10.0.0.1", "private"),
    ("::8.8.8.8", "ipv4-compatible"),
    ("::ffff:0:127.0.0.1", "reserved"),  # SIIT "IPv4-translated"
    ("64:ff9b::127.0.0.1", "loopback"),
    ("64:ff9b::10.0.0.1", "private"),
    ("64:ff9b::169.254.169.254", "metadata"),
    ("64:ff9b:1::a00:1", "private"),  # local-use NAT64
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
    ("2002:a9fe:a9fe::1", "metadata"),  # 6to4 of 169.254.169.254
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
]


@pytest.mark.parametrize(("address", "kind"), ADDRESSES)
def test_classify_address(address, kind):
    assert classify_address(address) == kind
    assert is_address_allowed(address, FetchPolicy()) is (kind is None)


@pytest.mark.parametrize(("address", "kind"), ADDRESSES)
def test_allow_private_lifts_only_local_kinds(address, kind):
    lifted = kind in (None, "loopback", "private", "link-local", "shared")
    assert is_address_allowed(address, FetchPolicy(allow_private=True)) is lifted


def test_allowed_networks_allow_exactly_what_they_list():
    policy = FetchPolicy(allowed_networks=("10.1.0.0/16", "fd00:1::/32", "169.254.169.254/32"))
    assert is_address_allowed("10.1.2.3", policy)
    assert is_address_allowed("::ffff:10.1.2.3", policy)  # the same destination
    assert is_address_allowed("fd00:1::5", policy)
    assert is_address_allowed("169.254.169.254", policy)  # listed explicitly, so allowed
    assert not is_address_allowed("10.2.0.1", policy)
    assert not is_address_allowed("127.0.0.1", policy)
    assert not is_address_allowed("fd00:2::5", policy)


def test_policy_checks_its_settings():
    with pytest.raises(ValueError, match="not a network"):
        FetchPolicy(allowed_networks=("10.0.0.1/8",))
    with pytest.raises(ValueError, match="tuple of CIDRs"):
        FetchPolicy(allowed_networks="10.0.0.0/8")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FetchPolicy(timeout_s=0)
    with pytest.raises(ValueError):
        FetchPolicy(max_redirects=-1)


# --- data URIs ---------------------------------------------------------------------------------------


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "image/jpg", "image/webp", "IMAGE/PNG"])
def test_data_uri(mime, monkeypatch):
    no_connections(monkeypatch)
    assert resolve(data_uri(PNG, mime)) == PNG


def test_data_uri_leniencies():
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert resolve(f"data:image/png;base64,{wrapped}") == PNG
    assert resolve(f"data:image/png;name=a.png;base64,{encoded}") == PNG
    assert resolve("data:image/png;base64," + encoded.replace("+", "%2B").replace("/", "%2F")) == PNG
    assert resolve("data:image/png;base64," + base64.b64encode(b"abcd").decode().rstrip("=")) == b"abcd"


@pytest.mark.parametrize("mime", ["image/gif", "text/html", "image/svg+xml", ""])
def test_data_uri_wrong_type(mime):
    message = refused(data_uri(PNG, mime))
    assert "send image/png, image/jpeg or image/webp" in message


def test_data_uri_not_base64():
    assert "must be base64-encoded" in refused("data:image/png,%89PNG")
    assert "must be base64-encoded" in refused("data:image/png;charset=utf-8,abc")


@pytest.mark.parametrize("payload", ["%FF%FE", "@@@@", "iVBORw0KGgo*", "aGVsbG8=aGVsbG8=", "a", "aGVsbG8-_w", "ünï"])
def test_data_uri_bad_base64(payload):
    assert "not valid base64" in refused(f"data:image/png;base64,{payload}")


def test_data_uri_without_data_or_comma():
    assert "holds no data" in refused("data:image/png;base64,")
    assert "no ','" in refused("data:image/png;base64")


def test_data_uri_size_cap(monkeypatch):
    small = FetchPolicy(max_bytes=1024)
    assert resolve(data_uri(b"x" * 1024), small) == b"x" * 1024
    assert "larger than 1024 bytes" in refused(data_uri(b"x" * 1025), small)
    calls = []
    monkeypatch.setattr(fetch.base64, "b64decode", lambda *a, **k: calls.append(a) or b"")
    assert "larger than 1024 bytes" in refused(data_uri(b"x" * 4096), small)
    assert "larger than 1024 bytes" in refused("data:image/png;base64," + "A" * 10**6, small)
    assert calls == []  # refused on the encoded length, before decoding


# --- this server's own uploads -----------------------------------------------------------------------


def test_own_upload_by_path(monkeypatch):
    no_connections(monkeypatch)
    assert resolve(f"/u/{NAME}", uploads={NAME: PNG}) == PNG


@pytest.mark.parametrize(
    ("public_url", "value"),
    [
        ("https://cdn.example.com", f"https://cdn.example.com/u/{NAME}"),
        ("https://cdn.example.com", f"https://CDN.example.com:443/u/{NAME}"),
        ("https://cdn.example.com", f"https://cdn.example.com/u/{NAME}?v=1"),
        ("http://127.0.0.1:8080", f"http://127.0.0.1:8080/u/{NAME}"),
        ("https://example.com/kiln", f"https://example.com/kiln/u/{NAME}"),
        ("https://example.com/kiln/", f"https://example.com/kiln/u/{NAME}"),
    ],
)
def test_own_upload_by_public_url(public_url, value, monkeypatch):
    no_connections(monkeypatch)
    fake_dns(monkeypatch, {})
    assert resolve(value, FetchPolicy(), uploads={NAME: PNG}, public_url=public_url) == PNG


def test_missing_upload(monkeypatch):
    no_connections(monkeypatch)
    assert "upload not found or expired" in refused(f"/u/{NAME}")
    assert "upload not found or expired" in refused(
        f"https://cdn.example.com/u/{NAME}", public_url="https://cdn.example.com"
    )

    def gone(name: str) -> bytes | None:
        raise AssetNotFound(f"no asset /u/{name}")

    with pytest.raises(InvalidImage, match="upload not found or expired"):
        asyncio.run(resolve_image_input(f"/u/{NAME}", policy=LOCAL, own_upload=gone))


@pytest.mark.parametrize(
    "value",
    [
        "/u/../../etc/passwd",
        "/u/xyz.jpg",
        f"/u/{'AB' * 32}.png",
        f"/u/{'ab' * 32}.gif",
        f"/u/{'ab' * 32}.mp4",
        f"https://cdn.example.com/u/{'ab' * 31}.png",
    ],
)
def test_malformed_upload_names_are_refused_and_never_fetched(value, monkeypatch):
    no_connections(monkeypatch)
    asked: list[str] = []
    with pytest.raises(InvalidImage, match="is not an upload of this server"):
        asyncio.run(
            resolve_image_input(
                value, policy=LOCAL, own_upload=lambda n: asked.append(n), public_url="https://cdn.example.com"
            )
        )
    assert asked == []


def test_another_hosts_upload_url_is_fetched_not_looked_up(server):
    asked: list[str] = []
    value = server.url("/png") + f"?u=/u/{NAME}"
    got = asyncio.run(
        resolve_image_input(
            value, policy=LOCAL, own_upload=lambda n: asked.append(n), public_url="https://cdn.example.com"
        )
    )
    assert got == PNG and asked == []


def test_an_upload_over_the_cap_is_refused():
    assert "larger than 1024 bytes" in refused(f"/u/{NAME}", FetchPolicy(max_bytes=1024), uploads={NAME: b"x" * 2048})
