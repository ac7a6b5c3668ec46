"""Image inputs for the render API: an http(s) URL, a data URI, or one of this server's uploads.

A request's ``image`` / ``mask`` is one of (reference, "Image Uploads"):

1. this server's own upload, ``/u/<64 hex>.<ext>`` or ``{public_url}/u/<64 hex>.<ext>``: read from
   the local asset store through the ``own_upload`` callback, never over HTTP;
2. a data URI, ``data:image/png;base64,...`` (PNG, JPEG or WebP, base64 only);
3. any other ``http://`` / ``https://`` URL, fetched under a :class:`FetchPolicy`.

:func:`resolve_image_input` returns the raw bytes; it never decodes the image (the engine does) and
refuses everything else with :class:`~kiln.errors.InvalidImage`, whose message says what to send
instead.

Fetching a URL a user chose is a server-side request forgery risk, so every hop is checked:

- only ``http`` and ``https``, no user name or password in the URL;
- the host name is resolved once, here (``loop.getaddrinfo``, which also turns decimal, octal and
  hex IPv4 spellings into ordinary addresses), and *every* address it resolves to must pass
  :func:`is_address_allowed` — one private answer among public ones refuses the URL;
- the connection goes to an address that was checked, never to the name (no second lookup, so a
  DNS-rebinding answer cannot slip in between check and use): the request URL carries the IP,
  the ``Host`` header the original host, and for https the TLS SNI and certificate check use the
  original host name;
- redirects are followed here, at most ``max_redirects``, each hop checked the same way;
- the whole fetch, redirects included, has one deadline (``timeout_s``), and the body is cut off as
  soon as it passes ``max_bytes`` (``Content-Length`` is checked first when the server sends one);
  the body is read raw (``Accept-Encoding: identity``), so no decompression bomb can grow it;
- no proxy from the environment, no cookies, no credentials are ever used or sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import ipaddress
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import httpx

from kiln import __version__
from kiln.errors import AssetNotFound, InvalidImage, UserError
from kiln.storage.names import validate_name

__all__ = [
    "FetchPolicy",
    "Fetched",
    "fetch_file",
    "classify_address",
    "is_address_allowed",
    "resolve_image_input",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_USER_AGENT: Final = f"kiln/{__version__} (image input fetcher)"
_ACCEPT: Final = "image/png,image/jpeg,image/webp;q=0.9,image/*;q=0.5"
_MAX_URL_CHARS: Final = 8192
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_UPLOAD_HINT: Final = "use a public http(s) URL, a data URI, or upload the image with POST /uploads"


# --- policy -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchPolicy:
    """How :func:`resolve_image_input` may fetch a URL; one per server, from its settings.

    ``allow_private`` lifts the refusal of loopback, private (RFC 1918, ``fc00::/7``), link-local
    and carrier-grade NAT addresses (and the IPv6 forms that embed them). It never lifts the cloud
    metadata addresses, nor unspecified, multicast, broadcast, reserved or special-use ones: list a
    network in ``allowed_networks`` to allow exactly it, whatever its kind.
    """

    max_bytes: int = 20 * 2**20  # reference: uploads max 20 MB
    timeout_s: float = 10.0  # total time for the whole fetch, redirects included
    max_redirects: int = 3
    allow_private: bool = False  # operator opt-in: allow private/loopback ranges
    allowed_networks: tuple[str, ...] = ()  # extra CIDRs allowed even when allow_private is False
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        # Configuration errors (ValueError) surface at start-up, never as a request's fault.
        if self.max_bytes < 1:
            raise ValueError(f"FetchPolicy.max_bytes must be at least 1, not {self.max_bytes}")
        if not self.timeout_s > 0:
            raise ValueError(f"FetchPolicy.timeout_s must be positive, not {self.timeout_s}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchPolicy.max_redirects must be 0 or more, not {self.max_redirects}")
        if isinstance(self.allowed_networks, str):
            raise ValueError("FetchPolicy.allowed_networks is a tuple of CIDRs, not one string")
        networks = []
        for cidr in self.allowed_networks:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=True))
            except ValueError as exc:
                raise ValueError(f"FetchPolicy.allowed_networks: {cidr!r} is not a network: {exc}") from None
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "_networks", tuple(networks))


# --- the address classifier --------------------------------------------------------------------------


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


_METADATA: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS / GCP / Azure / OpenStack / Oracle instance metadata
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure platform "wire server" (a public address, reachable only in Azure)
        "fd00:ec2::254",  # AWS instance metadata over IPv6
    )
)

# Kinds allow_private lifts. Everything else classify_address names is refused unless listed in
# allowed_networks.
_LOCAL_KINDS: Final = frozenset({"loopback", "private", "link-local", "shared"})

# IANA IPv4 special-purpose registry, most specific first where ranges nest.
_V4_TABLE: Final = (
    (_nets("255.255.255.255/32"), "broadcast"),
    (_nets("0.0.0.0/8"), "unspecified"),  # "this network"; 0.0.0.0 reaches the local host on Linux
    (_nets("127.0.0.0/8"), "loopback"),
    (_nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"), "private"),
    (_nets("169.254.0.0/16"), "link-local"),
    (_nets("100.64.0.0/10"), "shared"),  # carrier-grade NAT
    (_nets("224.0.0.0/4"), "multicast"),
    (_nets("240.0.0.0/4"), "reserved"),
    (
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # TEST-NET-1
            "192.88.99.0/24",  # former 6to4 relay anycast
            "198.18.0.0/15",  # benchmarking
            "198.51.100.0/24",  # TEST-NET-2
            "203.0.113.0/24",  # TEST-NET-3
        ),
        "special-use",
    ),
)

_V6_MAPPED: Final = ipaddress.ip_network("::ffff:0:0/96")
_V6_COMPATIBLE: Final = ipaddress.ip_network("::/96")
_V6_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_V6_NAT64_LOCAL: Final = ipaddress.ip_network("64:ff9b:1::/48")
_V6_6TO4: Final = ipaddress.ip_network("2002::/16")
_V6_TEREDO: Final = ipaddress.ip_network("2001::/32")
_V6_GLOBAL_UNICAST: Final = ipaddress.ip_network("2000::/3")
_V6_TABLE: Final = (
    (_nets("fe80::/10"), "link-local"),
    (_nets("fc00::/7", "fec0::/10"), "private"),  # unique local; deprecated site-local
    (_nets("ff00::/8"), "multicast"),
    (
        _nets(
            "2001::/23",  # IETF protocol assignments (benchmarking, ORCHID, AMT, ...)
            "2001:db8::/32",  # documentation
            "3fff::/20",  # documentation
            "5f00::/16",  # SRv6 SIDs
        ),
        "special-use",
    ),
)


def classify_address(address: IPAddress | str) -> str | None:
    """``None`` for a public unicast address; otherwise the kind of address it is.

    Kinds: ``loopback``, ``private``, ``link-local``, ``shared`` (carrier-grade NAT),
    ``unspecified``, ``multicast``, ``broadcast``, ``reserved``, ``special-use`` (documentation,
    benchmarking, protocol assignments), ``metadata`` (cloud instance metadata), ``ipv4-mapped``,
    ``ipv4-compatible`` and ``teredo``. IPv6 forms that embed an IPv4 address are judged by it:
    IPv4-mapped (``::ffff:a.b.c.d``) and IPv4-compatible (``::a.b.c.d``) addresses are never public
    (their embedded address's kind, else ``ipv4-mapped`` / ``ipv4-compatible``); NAT64
    (``64:ff9b::/96``) and 6to4 (``2002::/16``) take the kind of the address they embed, so
    ``64:ff9b::808:808`` (8.8.8.8 through a DNS64 gateway) is public and ``64:ff9b::7f00:1`` is
    loopback. The local-use NAT64 prefix ``64:ff9b:1::/48`` is private; Teredo is always refused.
    """
    ip = _unscoped(ipaddress.ip_address(address) if isinstance(address, str) else address)
    if ip.version == 4:
        return _classify_v4(ip)
    if ip in _METADATA:
        return "metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip in _V6_MAPPED:
        return _classify_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)) or "ipv4-mapped"
    if ip in _V6_COMPATIBLE:
        return _classify_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)) or "ipv4-compatible"
    if ip in _V6_NAT64:
        return _classify_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _V6_NAT64_LOCAL:
        return "private"
    if ip in _V6_6TO4:
        return _classify_v4(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    if ip in _V6_TEREDO:
        return "teredo"
    for networks, kind in _V6_TABLE:
        if any(ip in net for net in networks):
            return kind
    if ip not in _V6_GLOBAL_UNICAST:  # everything outside 2000::/3 is unassigned or reserved
        return "reserved"
    if not ip.is_global:  # the standard library's registry, as a second opinion
        return "special-use"
    return None


def _unscoped(ip: IPAddress) -> IPAddress:
    """``fe80::1%eth0`` -> ``fe80::1``: the zone does not change what kind of address it is."""
    if ip.version == 6 and ip.scope_id is not None:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _classify_v4(ip: ipaddress.IPv4Address) -> str | None:
    if ip in _METADATA:
        return "metadata"
    for networks, kind in _V4_TABLE:
        if any(ip in net for net in networks):
            return kind
    if not ip.is_global:  # the standard library's registry, as a second opinion
        return "special-use"
    return None


def is_address_allowed(address: IPAddress | str, policy: FetchPolicy) -> bool:
    """Whether the fetcher may connect to ``address`` under ``policy``.

    A public address is allowed; one inside ``policy.allowed_networks`` is allowed whatever it is
    (an IPv4-mapped address counts as the IPv4 address it maps); with ``policy.allow_private``,
    loopback, private, link-local and shared (CGNAT) addresses are allowed too.
    """
    ip = _unscoped(ipaddress.ip_address(address) if isinstance(address, str) else address)
    candidates: list[IPAddress] = [ip]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    if any(c in net for c in candidates for net in policy._networks):
        return True
    kind = classify_address(ip)
    return kind is None or (policy.allow_private and kind in _LOCAL_KINDS)


# --- the entry point ---------------------------------------------------------------------------------


async def resolve_image_input(
    value: str,
    *,
    policy: FetchPolicy,
    own_upload: Callable[[str], bytes | None],
    public_url: str | None = None,
    field: str = "image",
) -> bytes:
    """The bytes of one image input (``value`` as the request sent it); never decoded here.

    ``own_upload(name)`` returns the stored upload called ``name`` (``<64 hex>.png|jpg|webp``) or
    ``None`` (it may also raise :class:`~kiln.errors.AssetNotFound`); it is called in a worker
    thread, so it may do blocking I/O. ``public_url`` is the base URL this server hands out
    (``https://cdn.example.com`` or ``https://example.com/kiln``); URLs under its ``/u/`` are read
    through ``own_upload`` and never fetched. ``field`` names the input in messages and in the
    error's ``details`` (``image`` or ``mask``).

    Raises :class:`~kiln.errors.InvalidImage` for every input it will not or cannot read.
    """
    if not isinstance(value, str):
        raise _refuse(field, "must be a string: an http(s) URL, a data URI or an upload URL")
    text = value.strip()
    if not text:
        raise _refuse(field, f"is empty; {_UPLOAD_HINT}")
    if text[:5].lower() == "data:":
        return _decode_data_uri(text, policy, field)
    name = _own_upload_name(text, public_url, field)
    if name is not None:
        return await _read_own_upload(name, own_upload, policy, field)
    if text.startswith("/"):
        raise _refuse(field, f"a path must be an upload path, /u/<name> as POST /uploads returns it; {_UPLOAD_HINT}")
    want = _Want(field)
    url = _parse_url(text, want, redirected=False)
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy, want)
    except (TimeoutError, httpx.TimeoutException):
        raise _refuse(
            field,
            f"the URL did not deliver the image within {policy.timeout_s:g} s; "
            "use a faster host, or upload the image with POST /uploads",
        ) from None


def _refuse(field: str, message: str) -> InvalidImage:
    return InvalidImage(f"{field}: {message}", details={"field": field})


class _Memory:
    """The body in memory (images: at most ``max_bytes``, 20 MB by default)."""

    def __init__(self) -> None:
        self.body = bytearray()

    @property
    def size(self) -> int:
        return len(self.body)

    def write(self, chunk: bytes) -> int:
        self.body += chunk
        return len(self.body)

    def close(self) -> bytes:
        return bytes(self.body)

    def discard(self) -> None:
        self.body = bytearray()


class _Spool:
    """The body in a temporary file in ``directory``, hashed as it arrives (files too big for memory)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.NamedTemporaryFile(dir=directory, prefix=".fetch-", delete=False)  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> int:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)
        return self.size

    def close(self) -> Fetched:
        self.file.close()
        return Fetched(Path(self.file.name), self.digest.hexdigest(), self.size)

    def discard(self) -> None:
        self.file.close()
        Path(self.file.name).unlink(missing_ok=True)


@dataclass(frozen=True)
class Fetched:
    """A file :func:`fetch_file` downloaded: a temporary path (the caller moves or deletes it), the
    SHA-256 of its bytes and their count."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class _Want:
    """What a fetch is for: how its refusals read (``field: message``, in ``error``'s type) and
    where its body goes."""

    field: str
    noun: str = "image"
    error: type[UserError] = InvalidImage
    accept: str = _ACCEPT
    hint: str = _UPLOAD_HINT
    schemes: str = "only http and https URLs, data URIs and upload URLs are accepted"
    sink: Callable[[], Any] = _Memory

    def refuse(self, message: str) -> UserError:
        return self.error(f"{self.field}: {message}", details={"field": self.field})


async def fetch_file(
    url: str,
    *,
    policy: FetchPolicy,
    directory: Path,
    field: str,
    noun: str,
    error: type[UserError],
    accept: str = "application/octet-stream;q=0.9, */*;q=0.5",
) -> Fetched:
    """Download ``url`` (an http(s) URL only) into a temporary file in ``directory``, with every
    check :func:`resolve_image_input` makes (addresses, redirects, deadline, size cap). Refusals are
    ``error("<field>: …")`` and speak of the ``noun`` (``LoRA``)."""
    want = _Want(field, noun, error, accept, hint=f"send a public http(s) URL of the {noun}",
                 schemes="only http and https URLs are accepted", sink=lambda: _Spool(directory))
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise want.refuse(f"is empty; {want.hint}")
    parsed = _parse_url(text, want, redirected=False)
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(parsed, policy, want)
    except (TimeoutError, httpx.TimeoutException):
        raise want.refuse(f"the URL did not deliver the {noun} within {policy.timeout_s:g} s; use a faster host") from None


def _size(n: int) -> str:
    return f"{n // 2**20} MB" if n % 2**20 == 0 else f"{n} bytes"


# --- data URIs ---------------------------------------------------------------------------------------

_DATA_TYPES: Final = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp"})
_WHITESPACE: Final = re.compile(r"[ \t\r\n\f]+")


def _decode_data_uri(text: str, policy: FetchPolicy, field: str) -> bytes:
    """``data:[<mime>][;param=value]*;base64,<data>``, for PNG, JPEG or WebP only."""
    header, comma, data = text[5:].partition(",")
    if not comma:
        raise _refuse(field, "the data URI has no ',' before its data; send data:image/png;base64,<data>")
    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower()
    if mime not in _DATA_TYPES:
        shown = repr(mime[:40]) if mime else "no media type"
        raise _refuse(
            field,
            f"the data URI holds {shown}; send image/png, image/jpeg or image/webp (data:image/png;base64,<data>)",
        )
    if len(params) < 2 or params[-1].lower() != "base64":
        raise _refuse(field, f"the data URI must be base64-encoded: data:{mime};base64,<data>")
    # The encoded length bounds the decoded size: refuse before doing any work on an oversize value.
    limit = 4 * -(-policy.max_bytes // 3)
    too_big = _refuse(field, f"the image is larger than {_size(policy.max_bytes)}; send a smaller image")
    if len(data) > 2 * limit + 1024:  # generous room for line breaks and %-escapes, cut below
        raise too_big
    if "%" in data:  # a URL-escaped payload: %2B, %2F, %3D
        try:
            data = unquote(data, errors="strict")
        except UnicodeDecodeError:
            raise _refuse(field, "the data URI is not valid base64 (it holds %-escaped non-text bytes)") from None
    data = _WHITESPACE.sub("", data)
    if len(data) > limit:
        raise too_big
    if not data:
        raise _refuse(field, "the data URI holds no data")
    if len(data) % 4:
        data += "=" * (-len(data) % 4)  # missing padding is a common, harmless omission
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(field, "the data URI is not valid base64 (standard alphabet A-Z a-z 0-9 + /)") from None
    if len(decoded) > policy.max_bytes:
        raise too_big
    if not decoded:
        raise _refuse(field, "the data URI holds no data")
    return decoded


# --- own uploads -------------------------------------------------------------------------------------


def _own_upload_name(text: str, public_url: str | None, field: str) -> str | None:
    """The upload name if ``text`` names one of this server's uploads, else None.

    A value under this server's upload route that is not a valid upload name is refused here, so
    it is never fetched over HTTP.
    """
    rest: str | None = None
    if text.startswith("/u/"):
        rest = text[3:]
    elif public_url and text[:8].lower().startswith(("http://", "https://")):
        rest = _under_public_url(text, public_url)
    if rest is None:
        return None
    name = re.split(r"[?#]", rest, maxsplit=1)[0]
    try:
        validate_name("u", name)
    except AssetNotFound:
        raise _refuse(
            field,
            f"{text[:120]!r} is not an upload of this server; upload URLs end in "
            "/u/<64 hex digits>.png, .jpg or .webp as POST /uploads returns them",
        ) from None
    return name


def _under_public_url(text: str, public_url: str) -> str | None:
    """What follows ``{public_url}/u/`` in ``text`` when it is on this server's origin, else None."""
    try:
        base = httpx.URL(public_url)
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    if (url.scheme, _origin_host(url), _port(url)) != (base.scheme, _origin_host(base), _port(base)):
        return None
    prefix = base.raw_path.split(b"?", 1)[0].rstrip(b"/") + b"/u/"
    path = url.raw_path.split(b"?", 1)[0]
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].decode("ascii", "replace")


def _origin_host(url: httpx.URL) -> bytes:
    return url.raw_host.lower().rstrip(b".")


def _port(url: httpx.URL) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)


async def _read_own_upload(
    name: str, own_upload: Callable[[str], bytes | None], policy: FetchPolicy, field: str
) -> bytes:
    try:
        data = await asyncio.to_thread(own_upload, name)
    except AssetNotFound:
        data = None
    if data is None:
        raise _refuse(
            field,
            f"upload not found or expired: /u/{name}; uploads are kept for a limited time, "
            "so upload the image again with POST /uploads",
        )
    if len(data) > policy.max_bytes:
        raise _refuse(field, f"the upload is larger than {_size(policy.max_bytes)}; upload a smaller image")
    return bytes(data)


# --- URL fetching ------------------------------------------------------------------------------------

_SCHEME_AUTHORITY: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")
_CONTROL: Final = re.compile(r"[\x00-\x20\x7f]")


def _parse_url(text: str, want: _Want, *, redirected: bool) -> httpx.URL:
    """``text`` as an http(s) URL with a host and no user info, or ``want``'s error."""

    def refuse(problem: str, hint: str = "") -> UserError:
        where = "the URL redirects to a URL that" if redirected else "the URL"
        return want.refuse(f"{where} {problem}{'; ' + hint if hint else ''}")

    if len(text) > _MAX_URL_CHARS:
        raise refuse(f"is longer than {_MAX_URL_CHARS} characters", want.hint)
    if _CONTROL.search(text):
        raise refuse("is not valid (it contains spaces or control characters)")
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise refuse("is not valid", want.hint) from None
    if url.scheme not in ("http", "https"):
        problem = f"uses the {url.scheme[:20]}: scheme" if url.scheme else "is not an absolute http(s) URL"
        raise refuse(problem, want.schemes)
    authority = _SCHEME_AUTHORITY.match(text)
    if url.userinfo or (authority is not None and "@" in authority.group(1)):
        raise refuse("carries a user name or password", "send a URL without one")
    if not url.raw_host:
        raise refuse("has no host name")
    return url


async def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates.

    The one place a name is looked up. Raises ``OSError`` (``socket.gaierror``) when it does not
    resolve.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


async def _checked_addresses(url: httpx.URL, policy: FetchPolicy, want: _Want, *, redirected: bool) -> list[IPAddress]:
    host = url.raw_host.decode("ascii")
    port = _port(url) or 0
    target = "the URL redirects to" if redirected else "the URL points to"
    try:
        addresses = await _resolve(host, port)
    except (OSError, UnicodeError, ValueError):
        addresses = []
    if not addresses:
        if redirected:
            raise want.refuse(f"the URL redirects to a host name that does not resolve; check the {want.noun} URL")
        raise want.refuse(f"could not resolve {host[:100]!r}; check the {want.noun} URL")
    try:
        allowed = all(is_address_allowed(ip, policy) for ip in addresses)
    except ValueError:  # unparseable answer: fail closed
        allowed = False
    if not allowed:
        raise want.refuse(f"{target} a private or local network address, which this server does not fetch from; {want.hint}")
    return addresses


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Certificate verification as httpx does it by default (certifi, or SSL_CERT_FILE / _DIR)."""
    return httpx.create_ssl_context()


def _client(policy: FetchPolicy) -> httpx.AsyncClient:
    """A one-connection client: no proxies from the environment, no redirects, no keep-alive."""
    return httpx.AsyncClient(
        verify=_ssl_context(),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(policy.timeout_s),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
    )


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


async def _fetch(url: httpx.URL, policy: FetchPolicy, want: _Want) -> Any:
    for hop in range(policy.max_redirects + 1):
        addresses = await _checked_addresses(url, policy, want, redirected=hop > 0)
        try:
            return await _get(url, addresses, policy, want)
        except _Redirect as redirect:
            location = redirect.location
        if hop == policy.max_redirects:
            break
        try:
            next_url = str(url.join(location))
        except (httpx.InvalidURL, ValueError, TypeError):
            raise want.refuse("the URL redirects to an invalid URL") from None
        url = _parse_url(next_url, want, redirected=True)
    raise want.refuse(f"the URL redirects more than {policy.max_redirects} times; send the {want.noun}'s final URL")


async def _get(url: httpx.URL, addresses: Iterable[IPAddress], policy: FetchPolicy, want: _Want) -> Any:
    """GET ``url`` from the first of ``addresses`` that accepts a connection (all are checked)."""
    host = url.raw_host.decode("ascii")
    headers = {
        "Host": url.netloc.decode("ascii"),
        "User-Agent": _USER_AGENT,
        "Accept": want.accept,
        "Accept-Encoding": "identity",
    }
    failure: httpx.ConnectError | None = None
    for ip in addresses:
        pinned = httpx.URL(scheme=url.scheme, host=ip.compressed, port=url.port, raw_path=url.raw_path)
        try:
            async with (
                _client(policy) as client,
                client.stream("GET", pinned, headers=headers, extensions={"sni_hostname": host}) as response,
            ):
                return await _read_body(response, policy, want)
        except httpx.ConnectError as exc:  # refused, unreachable, TLS handshake: try the next address
            failure = exc
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise want.refuse(f"the {want.noun} server's response could not be read ({_why(exc)}); {want.hint}") from None
    if failure is not None and _is_certificate_error(failure):
        raise want.refuse(f"the TLS certificate of {host[:100]!r} could not be verified; use a URL with a valid certificate")
    raise want.refuse(f"could not connect to the {want.noun} URL's server; check the URL or {want.hint}")


async def _read_body(response: httpx.Response, policy: FetchPolicy, want: _Want) -> Any:
    status = response.status_code
    if status in _REDIRECTS:
        location = response.headers.get("location")
        if not location:
            raise want.refuse(f"the URL answered HTTP {status} without a Location to redirect to")
        raise _Redirect(location)
    if not 200 <= status < 300:
        reason = response.reason_phrase or ""
        raise want.refuse(
            f"the URL answered HTTP {status}{' ' + reason if reason else ''}; "
            f"check that the {want.noun} exists and is publicly readable"
        )
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise want.refuse(f"the server sent the {want.noun} {encoding[:20]}-encoded; serve it uncompressed")
    too_big = want.refuse(f"the {want.noun} is larger than {_size(policy.max_bytes)}; send a smaller {want.noun}")
    length = (response.headers.get("content-length") or "").strip()
    if length.isascii() and length.isdigit() and int(length) > policy.max_bytes:  # h11 checked its form
        raise too_big
    sink = want.sink()
    try:
        async for chunk in response.aiter_raw():
            if sink.write(chunk) > policy.max_bytes:
                raise too_big
        if not sink.size:
            raise want.refuse("the URL answered with an empty body")
        return sink.close()
    except BaseException:
        sink.discard()
        raise


def _why(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.RemoteProtocolError):
        return "it broke off or did not speak HTTP/1.1 correctly"
    if isinstance(exc, httpx.NetworkError):
        return "the connection failed while reading"
    return f"{type(exc).__name__}"


def _is_certificate_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False
