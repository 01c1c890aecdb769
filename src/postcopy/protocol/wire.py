"""Sans-IO wire protocol of postcopy: frames, messages, validation and the authenticated
handshake. Pure encode/decode and a state machine (in the spirit of h11): no sockets,
no threads, no I/O. :mod:`postcopy.protocol.channel` moves the bytes.

Frame = 16-byte header ``!HBBIQ`` (magic 0x5043 "PC", type, flags, payload length, arg)
followed by the payload. ``arg`` carries the one integer most frames need (first page
index, token, count, error code), so small frames have small or empty payloads.

====================  =====  =================  ==========================================
frame                 flags  arg                payload
====================  =====  =================  ==========================================
Hello                 0      0                  ``!HBB16s32sII`` + regions as ``!QQ`` each
AuthProof             0      0                  32-byte HMAC-SHA256
AuthOk                0      0                  empty
PageRun               cause  first page         npages * page_size bytes of page data
ZeroRange             0      first page         ``!Q`` npages
PageRequest           0      first page         ``!Q`` npages
Discard               0      number of ranges   ``!QQ`` (first_page, npages) each
Switchover, Complete  0      0                  JSON object, UTF-8
PushDone              0      pages              empty
Error                 0      code               reason, UTF-8
Ping, Pong            0      token              empty
====================  =====  =================  ==========================================

A PageRun's page count is its payload length divided by the page size agreed in the
handshake, so its data is exactly the payload and can be received straight into a
page-aligned buffer and installed without a copy.

Decoding is strict: every field is checked, anything malformed raises
:class:`ProtocolError` (and nothing else), and a decoded frame re-encodes to the very
same bytes (the handshake's MACs rely on that).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import os
import secrets
import struct
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Union

MAGIC = 0x5043  # "PC"
HEADER = struct.Struct("!HBBIQ")
PROTOCOL_VERSION = 1
# Ping token that ends the destination's list of outstanding runs after a postcopy
# recovery reconnect (answered by a Pong with the same token).
RECOVERY_TOKEN = 0x5245434F56455259

# Page runs are the largest frames; everything else is far smaller.
DEFAULT_MAX_PAYLOAD = 16 << 20
MAX_REGIONS = 1024
MAX_JSON = 1 << 20
MAX_REASON = 4096
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 30

SESSION_BYTES = 16
NONCE_BYTES = 32
MAC_BYTES = 32

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1
_HELLO = struct.Struct("!HBB16s32sII")
_RANGE = struct.Struct("!QQ")
_U64 = struct.Struct("!Q")
_VERSION = struct.Struct("!H")

_ROLES = {"source": 1, "dest": 2}
_CHANNELS = {"main": 1, "urgent": 2}
_ROLE_NAMES = {v: k for k, v in _ROLES.items()}
_CHANNEL_NAMES = {v: k for k, v in _CHANNELS.items()}


class FrameType(enum.IntEnum):
    """The type byte of a frame header."""

    HELLO = 1
    AUTH_PROOF = 2
    AUTH_OK = 3
    PAGE_RUN = 4
    ZERO_RANGE = 5
    PAGE_REQUEST = 6
    DISCARD = 7
    SWITCHOVER = 8
    PUSH_DONE = 9
    COMPLETE = 10
    ERROR = 11
    PING = 12
    PONG = 13


class Cause(enum.IntEnum):
    """Why a page run was sent (the flags byte of a PageRun); reports count pages by it."""

    PRECOPY = 0
    RESENT = 1
    DEMAND = 2
    PUSHED = 3
    STATE = 4


class ErrorCode(enum.IntEnum):
    """Codes carried by :class:`Error` frames (receivers must accept unknown codes)."""

    PROTOCOL = 1
    AUTH = 2
    VERSION = 3
    INTERNAL = 4
    ABORTED = 5


# -- errors ------------------------------------------------------------------------------
class ProtocolError(Exception):
    """The peer (or our caller) broke the protocol. ``reply`` holds encoded frames (an
    :class:`Error`) worth sending to the peer before closing, so it learns why."""

    code: int = ErrorCode.PROTOCOL

    def __init__(self, message: str, *, reply: list[bytes] | tuple[bytes, ...] = ()):
        super().__init__(message)
        self.reply: list[bytes] = list(reply)


class FrameError(ProtocolError):
    """Malformed frame bytes: bad magic, unknown type, wrong length, bad field."""


class RangeError(ProtocolError):
    """Page-bearing frame that does not fit the RAM layout (or arrives before it is known)."""


class HandshakeError(ProtocolError):
    """The handshake failed (wrong order, incompatible peers, bad credentials)."""


class AuthError(HandshakeError):
    """The peer does not prove knowledge of the shared key."""

    code = ErrorCode.AUTH


class VersionError(HandshakeError):
    """The peers are incompatible: protocol version, page size or RAM layout differ."""

    code = ErrorCode.VERSION


class PeerError(HandshakeError):
    """The peer sent an :class:`Error` during the handshake. ``reason`` and ``peer_code``
    are what it said."""

    def __init__(self, reason: str, peer_code: int = ErrorCode.PROTOCOL):
        super().__init__(f"the peer refused: {reason}")
        self.reason = reason
        self.peer_code = peer_code


class KeyFileError(ValueError):
    """A key file that cannot serve as a shared key."""


# -- RAM layout --------------------------------------------------------------------------
def _layout_problem(page_size: object, regions: tuple) -> str | None:
    """What is wrong with a (page_size, regions) pair, or None. Regions are byte
    (offset, length) pairs: page aligned, non-empty, sorted, not overlapping."""
    if (type(page_size) is not int or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
            or page_size & (page_size - 1)):
        return f"page size {page_size!r} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
    if len(regions) > MAX_REGIONS:
        return f"{len(regions)} RAM regions exceed the limit of {MAX_REGIONS}"
    end = 0
    for i, (offset, length) in enumerate(regions):
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
            return f"RAM region {i} ({offset!r}, {length!r}) is not a non-negative offset and a positive length"
        if offset % page_size or length % page_size:
            return f"RAM region {i} (offset {offset}, length {length}) is not aligned to the page size {page_size}"
        if offset < end:
            return f"RAM region {i} at offset {offset} overlaps or precedes the region before it"
        end = offset + length
        if end > _U64_MAX:
            return f"RAM region {i} ends beyond 2^64 bytes"
    return None


def _pairs(value: object) -> tuple[tuple[int, int], ...]:
    """Normalise a sequence of pairs to a tuple of 2-tuples (equality with decoded frames)."""
    try:
        pairs = tuple(tuple(pair) for pair in value)  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"expected a sequence of pairs, got {value!r}") from None
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"expected a pair, got {pair!r}")
    return pairs  # type: ignore[return-value]


@dataclass(frozen=True)
class Layout:
    """A guest's RAM layout. Page ``i`` covers bytes ``[i*page_size, (i+1)*page_size)``
    of the RAM offset space; a page range is valid when it lies inside one region."""

    page_size: int
    regions: tuple[tuple[int, int], ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regions = _pairs(self.regions)
        problem = _layout_problem(self.page_size, regions)
        if problem:
            raise ValueError(f"invalid RAM layout: {problem}")
        ps = self.page_size
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "_starts", tuple(offset // ps for offset, _ in regions))
        object.__setattr__(self, "_ends", tuple((offset + length) // ps for offset, length in regions))

    @classmethod
    def of(cls, hello: Hello) -> Layout:
        """The layout a Hello announces."""
        return cls(page_size=hello.page_size, regions=hello.regions)

    @property
    def total_pages(self) -> int:
        """Number of pages of RAM (all regions)."""
        return sum(length for _, length in self.regions) // self.page_size

    @property
    def total_bytes(self) -> int:
        return sum(length for _, length in self.regions)

    def contains(self, first_page: int, npages: int) -> bool:
        """Whether pages [first_page, first_page + npages) lie inside one region."""
        if npages < 1 or first_page < 0:
            return False
        i = bisect_right(self._starts, first_page) - 1
        # Python integers: first_page + npages cannot wrap around.
        return i >= 0 and first_page + npages <= self._ends[i]

    def check(self, first_page: int, npages: int, what: str = "page range") -> None:
        """Raise :class:`RangeError` unless the range lies inside RAM."""
        if not self.contains(first_page, npages):
            raise RangeError(
                f"{what} of {npages} pages at page {first_page} is outside the guest RAM "
                f"({self.total_pages} pages of {self.page_size} bytes in {len(self.regions)} region(s))"
            )


# -- messages ----------------------------------------------------------------------------
def _frame(ftype: FrameType, arg: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, ftype, flags, len(payload), arg) + payload


def _check_u64(name: str, value: object, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= _U64_MAX:
        raise ValueError(f"{name} {value!r} is not an integer in [{minimum}, 2^64)")


def _check_range(first_page: int, npages: int) -> None:
    _check_u64("first_page", first_page)
    _check_u64("npages", npages, 1)


def _as_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class Hello:
    """First frame of each side: who it is and the RAM it migrates. ``regions`` are byte
    (offset, length) pairs; a side that does not know the layout yet (an incoming
    destination) sends none and adopts its peer's."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    version: int
    role: str
    channel: str
    session: bytes
    nonce: bytes
    page_size: int
    regions: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if type(self.version) is not int or not 0 <= self.version <= 0xFFFF:
            raise ValueError(f"protocol version {self.version!r} is not a 16-bit number")
        if self.role not in _ROLES:
            raise ValueError(f"role {self.role!r} is not one of {sorted(_ROLES)}")
        if self.channel not in _CHANNELS:
            raise ValueError(f"channel {self.channel!r} is not one of {sorted(_CHANNELS)}")
        object.__setattr__(self, "session", _as_bytes("session", self.session, SESSION_BYTES))
        object.__setattr__(self, "nonce", _as_bytes("nonce", self.nonce, NONCE_BYTES))
        regions = _pairs(self.regions)
        problem = _layout_problem(self.page_size, regions)
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "regions", regions)

    def encode(self) -> bytes:
        payload = _HELLO.pack(self.version, _ROLES[self.role], _CHANNELS[self.channel], self.session,
                              self.nonce, self.page_size, len(self.regions))
        payload += b"".join(_RANGE.pack(offset, length) for offset, length in self.regions)
        return _frame(FrameType.HELLO, 0, payload)


def make_hello(role: str, channel: str, page_size: int, regions=(), session: bytes | None = None) -> Hello:
    """A Hello of this protocol version with a fresh nonce (and a fresh session if none)."""
    return Hello(version=PROTOCOL_VERSION, role=role, channel=channel,
                 session=secrets.token_bytes(SESSION_BYTES) if session is None else session,
                 nonce=secrets.token_bytes(NONCE_BYTES), page_size=page_size, regions=regions)


@dataclass(frozen=True)
class AuthProof:
    """HMAC-SHA256 over the handshake transcript (see :class:`Handshake`)."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH_PROOF
    mac: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", _as_bytes("mac", self.mac, MAC_BYTES))

    def encode(self) -> bytes:
        return _frame(FrameType.AUTH_PROOF, 0, self.mac)


@dataclass(frozen=True)
class AuthOk:
    """The server accepted the client's proof: the connection is authenticated."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH_OK

    def encode(self) -> bytes:
        return _frame(FrameType.AUTH_OK)


def encode_page_run_header(first_page: int, npages: int, cause: Cause, page_size: int) -> bytes:
    """Header of a PageRun frame, for sending the page data from guest RAM without
    copying it: ``sock.sendmsg([header, memoryview_of_pages])``."""
    _check_range(first_page, npages)
    length = npages * page_size
    if length > _U32_MAX:
        raise ValueError(f"page run of {npages} pages of {page_size} bytes exceeds the 4 GiB frame limit")
    return HEADER.pack(MAGIC, FrameType.PAGE_RUN, Cause(cause), length, first_page)


@dataclass(frozen=True)
class PageRun:
    """``npages`` pages of data starting at ``first_page``. ``data`` is any buffer of
    npages * page_size bytes; when decoded, the very memoryview of the payload."""

    TYPE: ClassVar[FrameType] = FrameType.PAGE_RUN
    first_page: int
    npages: int
    cause: Cause
    data: object = field(repr=False)

    def __post_init__(self) -> None:
        _check_range(self.first_page, self.npages)
        if type(self.cause) is not Cause:
            object.__setattr__(self, "cause", Cause(self.cause))

    def encode(self) -> bytes:
        """The whole frame, pages copied in. Senders of bulk data use
        :func:`encode_page_run_header` instead."""
        view = memoryview(self.data)  # type: ignore[arg-type]
        if view.nbytes % self.npages:
            raise ValueError(f"page run data of {view.nbytes} bytes is not {self.npages} equal pages")
        page_size = view.nbytes // self.npages
        problem = _layout_problem(page_size, ())
        if problem:
            raise ValueError(f"page run data of {view.nbytes} bytes for {self.npages} pages: {problem}")
        return encode_page_run_header(self.first_page, self.npages, self.cause, page_size) + view.tobytes()


@dataclass(frozen=True)
class ZeroRange:
    """Pages that hold only zeros on the source; their data is never sent."""

    TYPE: ClassVar[FrameType] = FrameType.ZERO_RANGE
    first_page: int
    npages: int

    def __post_init__(self) -> None:
        _check_range(self.first_page, self.npages)

    def encode(self) -> bytes:
        return _frame(FrameType.ZERO_RANGE, self.first_page, _U64.pack(self.npages))


@dataclass(frozen=True)
class PageRequest:
    """The destination needs these pages now (a guest thread faulted on them)."""

    TYPE: ClassVar[FrameType] = FrameType.PAGE_REQUEST
    first_page: int
    npages: int

    def __post_init__(self) -> None:
        _check_range(self.first_page, self.npages)

    def encode(self) -> bytes:
        return _frame(FrameType.PAGE_REQUEST, self.first_page, _U64.pack(self.npages))


@dataclass(frozen=True)
class Discard:
    """(first_page, npages) ranges the destination must drop: stale since last sent."""

    TYPE: ClassVar[FrameType] = FrameType.DISCARD
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        ranges = _pairs(self.ranges)
        for first_page, npages in ranges:
            _check_range(first_page, npages)
        object.__setattr__(self, "ranges", ranges)

    def encode(self) -> bytes:
        payload = b"".join(_RANGE.pack(first, n) for first, n in self.ranges)
        return _frame(FrameType.DISCARD, len(self.ranges), payload)


def _encode_json(ftype: FrameType, info: dict) -> bytes:
    payload = json.dumps(info, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_JSON:
        raise ValueError(f"{ftype.name} information of {len(payload)} bytes exceeds {MAX_JSON} bytes")
    return _frame(ftype, 0, payload)


def _check_info(info: object) -> None:
    if not isinstance(info, dict):
        raise ValueError(f"info must be a dict, got {type(info).__name__}")


@dataclass(frozen=True)
class Switchover:
    """The guest is paused on the source; ``info`` has its timing and parameters."""

    TYPE: ClassVar[FrameType] = FrameType.SWITCHOVER
    info: dict

    def __post_init__(self) -> None:
        _check_info(self.info)

    def encode(self) -> bytes:
        return _encode_json(FrameType.SWITCHOVER, self.info)


@dataclass(frozen=True)
class PushDone:
    """The source has sent every non-zero page once; ``pages`` is the count."""

    TYPE: ClassVar[FrameType] = FrameType.PUSH_DONE
    pages: int

    def __post_init__(self) -> None:
        _check_u64("pages", self.pages)

    def encode(self) -> bytes:
        return _frame(FrameType.PUSH_DONE, self.pages)


@dataclass(frozen=True)
class Complete:
    """The destination has every page installed; ``info`` has its figures."""

    TYPE: ClassVar[FrameType] = FrameType.COMPLETE
    info: dict

    def __post_init__(self) -> None:
        _check_info(self.info)

    def encode(self) -> bytes:
        return _encode_json(FrameType.COMPLETE, self.info)


@dataclass(frozen=True)
class Error:
    """The sender gives up; ``reason`` is for humans (cut to MAX_REASON bytes)."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: int
    reason: str

    def __post_init__(self) -> None:
        _check_u64("code", self.code)
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be a str, got {type(self.reason).__name__}")
        # Cut to the limit at a character boundary; lone surrogates become "?".
        text = self.reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")
        if text != self.reason:
            object.__setattr__(self, "reason", text)

    def encode(self) -> bytes:
        return _frame(FrameType.ERROR, self.code, self.reason.encode())


@dataclass(frozen=True)
class Ping:
    """Liveness probe; answered by a Pong with the same token."""

    TYPE: ClassVar[FrameType] = FrameType.PING
    token: int

    def __post_init__(self) -> None:
        _check_u64("token", self.token)

    def encode(self) -> bytes:
        return _frame(FrameType.PING, self.token)


@dataclass(frozen=True)
class Pong:
    """Answer to a Ping."""

    TYPE: ClassVar[FrameType] = FrameType.PONG
    token: int

    def __post_init__(self) -> None:
        _check_u64("token", self.token)

    def encode(self) -> bytes:
        return _frame(FrameType.PONG, self.token)


Message = Union[Hello, AuthProof, AuthOk, PageRun, ZeroRange, PageRequest, Discard, Switchover,
                PushDone, Complete, Error, Ping, Pong]
# Messages that need the RAM layout, refused before the handshake sets it.
PAGE_BEARING = (PageRun, ZeroRange, PageRequest, Discard)


# -- decoding ----------------------------------------------------------------------------
class FrameHeader(NamedTuple):
    """A validated frame header: the payload of ``length`` bytes follows."""

    type: FrameType
    flags: int
    length: int
    arg: int


# Exact payload length of fixed-size frames.
_FIXED_LENGTH = {
    FrameType.AUTH_PROOF: MAC_BYTES,
    FrameType.AUTH_OK: 0,
    FrameType.ZERO_RANGE: _U64.size,
    FrameType.PAGE_REQUEST: _U64.size,
    FrameType.PUSH_DONE: 0,
    FrameType.PING: 0,
    FrameType.PONG: 0,
}
# Upper bounds of variable-size frames other than PageRun (which max_payload bounds).
_MAX_LENGTH = {
    FrameType.HELLO: _HELLO.size + MAX_REGIONS * _RANGE.size,
    FrameType.SWITCHOVER: MAX_JSON,
    FrameType.COMPLETE: MAX_JSON,
    FrameType.ERROR: MAX_REASON,
}
# Frames whose arg must be zero (so every frame has one canonical encoding).
_ZERO_ARG = frozenset({FrameType.HELLO, FrameType.AUTH_PROOF, FrameType.AUTH_OK,
                       FrameType.SWITCHOVER, FrameType.COMPLETE})
_TYPES = {t.value: t for t in FrameType}
_CAUSES = frozenset(c.value for c in Cause)


def decode_header(buf: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD) -> FrameHeader:
    """Validate the first HEADER.size bytes of ``buf`` as a frame header: magic, known
    type, flags, arg, and length (exact for fixed-size frames, bounded for the rest), so
    the caller may then read exactly ``length`` payload bytes."""
    if len(buf) < HEADER.size:
        raise FrameError(f"frame header needs {HEADER.size} bytes, got {len(buf)}")
    try:
        magic, raw_type, flags, length, arg = HEADER.unpack_from(buf)
    except (struct.error, TypeError, ValueError) as exc:
        raise FrameError(f"unreadable frame header: {exc}") from None
    if magic != MAGIC:
        raise FrameError(f"bad frame magic 0x{magic:04x} (expected 0x{MAGIC:04x}): not a postcopy peer or lost framing")
    ftype = _TYPES.get(raw_type)
    if ftype is None:
        raise FrameError(f"unknown frame type {raw_type}")
    if length > max_payload:
        raise FrameError(f"{ftype.name} frame of {length} bytes exceeds the limit of {max_payload} bytes")
    if ftype is FrameType.PAGE_RUN:
        if flags not in _CAUSES:
            raise FrameError(f"PAGE_RUN frame with unknown cause {flags}")
        if length == 0:
            raise FrameError("PAGE_RUN frame without pages")
    elif flags:
        raise FrameError(f"{ftype.name} frame with flags 0x{flags:02x} (must be 0)")
    fixed = _FIXED_LENGTH.get(ftype)
    if fixed is not None and length != fixed:
        raise FrameError(f"{ftype.name} frame of {length} bytes (must be {fixed})")
    limit = _MAX_LENGTH.get(ftype)
    if limit is not None and length > limit:
        raise FrameError(f"{ftype.name} frame of {length} bytes exceeds {limit} bytes")
    if ftype is FrameType.DISCARD and length != arg * _RANGE.size:
        raise FrameError(f"DISCARD frame of {length} bytes does not hold its {arg} ranges")
    if arg and ftype in _ZERO_ARG:
        raise FrameError(f"{ftype.name} frame with argument {arg} (must be 0)")
    return FrameHeader(ftype, flags, length, arg)


def _need_layout(layout: Layout | None, ftype: FrameType) -> Layout:
    if layout is None:
        raise RangeError(f"page data before hello: {ftype.name} frame before the handshake set the RAM layout")
    return layout


def _decode_hello(h: FrameHeader, p: memoryview, layout: Layout | None) -> Hello:
    if len(p) < _VERSION.size:
        raise FrameError(f"HELLO frame of {len(p)} bytes is too short")
    (version,) = _VERSION.unpack_from(p)
    try:
        if len(p) < _HELLO.size:
            raise FrameError(f"HELLO frame of {len(p)} bytes is shorter than {_HELLO.size}")
        version, role, channel, session, nonce, page_size, nregions = _HELLO.unpack_from(p)
        if len(p) != _HELLO.size + nregions * _RANGE.size:
            raise FrameError(f"HELLO frame of {len(p)} bytes does not hold its {nregions} regions")
        if role not in _ROLE_NAMES:
            raise FrameError(f"HELLO frame with unknown role {role}")
        if channel not in _CHANNEL_NAMES:
            raise FrameError(f"HELLO frame with unknown channel {channel}")
        regions = tuple(_RANGE.iter_unpack(p[_HELLO.size:]))
        return _construct(Hello, h, version=version, role=_ROLE_NAMES[role], channel=_CHANNEL_NAMES[channel],
                          session=session, nonce=nonce, page_size=page_size, regions=regions)
    except FrameError as exc:
        if version != PROTOCOL_VERSION:
            # Another version may lay its Hello out differently: say what matters.
            message = f"protocol version mismatch: we speak version {PROTOCOL_VERSION}, the peer version {version}"
            raise VersionError(message, reply=[Error(ErrorCode.VERSION, message).encode()]) from exc
        raise


def _decode_page_run(h: FrameHeader, p: memoryview, layout: Layout | None) -> PageRun:
    layout = _need_layout(layout, h.type)
    npages, rest = divmod(h.length, layout.page_size)
    if rest or not npages:
        raise RangeError(f"PAGE_RUN payload of {h.length} bytes is not a whole number of "
                         f"{layout.page_size}-byte pages")
    layout.check(h.arg, npages, "PAGE_RUN")
    return PageRun(h.arg, npages, Cause(h.flags), p)


def _decode_range(cls):
    def decode(h: FrameHeader, p: memoryview, layout: Layout | None):
        layout = _need_layout(layout, h.type)
        (npages,) = _U64.unpack_from(p)
        layout.check(h.arg, npages, h.type.name)
        return cls(h.arg, npages)
    return decode


def _decode_discard(h: FrameHeader, p: memoryview, layout: Layout | None) -> Discard:
    layout = _need_layout(layout, h.type)
    ranges = tuple(_RANGE.iter_unpack(p))
    for first_page, npages in ranges:
        layout.check(first_page, npages, "DISCARD range")
    return Discard(ranges)


def _reject_constant(name: str) -> None:
    raise FrameError(f"JSON constant {name} is not allowed")


def _decode_json(cls):
    def decode(h: FrameHeader, p: memoryview, layout: Layout | None):
        try:
            info = json.loads(str(p, "utf-8"), parse_constant=_reject_constant)
        except FrameError:
            raise
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits
            raise FrameError(f"{h.type.name} frame is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(info, dict):
            raise FrameError(f"{h.type.name} frame holds a JSON {type(info).__name__}, not an object")
        return cls(info)
    return decode


def _decode_error(h: FrameHeader, p: memoryview, layout: Layout | None) -> Error:
    try:
        reason = str(p, "utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"ERROR frame reason is not UTF-8: {exc}") from None
    return Error(h.arg, reason)


_DECODERS = {
    FrameType.HELLO: _decode_hello,
    FrameType.AUTH_PROOF: lambda h, p, layout: AuthProof(p.tobytes()),
    FrameType.AUTH_OK: lambda h, p, layout: AuthOk(),
    FrameType.PAGE_RUN: _decode_page_run,
    FrameType.ZERO_RANGE: _decode_range(ZeroRange),
    FrameType.PAGE_REQUEST: _decode_range(PageRequest),
    FrameType.DISCARD: _decode_discard,
    FrameType.SWITCHOVER: _decode_json(Switchover),
    FrameType.PUSH_DONE: lambda h, p, layout: PushDone(h.arg),
    FrameType.COMPLETE: _decode_json(Complete),
    FrameType.ERROR: _decode_error,
    FrameType.PING: lambda h, p, layout: Ping(h.arg),
    FrameType.PONG: lambda h, p, layout: Pong(h.arg),
}


def _construct(cls, h: FrameHeader, **fields):
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise FrameError(f"bad {h.type.name} frame: {exc}") from None


def decode_payload(header: FrameHeader, payload: bytes | bytearray | memoryview,
                   layout: Layout | None = None) -> Message:
    """Decode the payload of a frame whose header :func:`decode_header` validated.
    Page-bearing frames are checked against ``layout`` (required for them). A PageRun's
    ``data`` is ``payload`` itself: no copy, valid as long as the caller's buffer is."""
    if len(payload) != header.length:
        raise FrameError(f"{header.type.name} payload of {len(payload)} bytes, header says {header.length}")
    decoder = _DECODERS.get(header.type)
    if decoder is None:
        raise FrameError(f"unknown frame type {header.type!r}")
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    try:
        if header.type is FrameType.PAGE_RUN:
            return decoder(header, payload, layout)
        return decoder(header, view, layout)
    except ProtocolError:
        raise
    except (struct.error, ValueError, TypeError, IndexError, OverflowError) as exc:
        # Belt and braces: the checks above should have caught it; it is still bad input.
        raise FrameError(f"bad {header.type.name} frame: {exc}") from None


def decode(frame: bytes | bytearray | memoryview, layout: Layout | None = None,
           max_payload: int = DEFAULT_MAX_PAYLOAD) -> Message:
    """Decode exactly one whole frame (e.g. an exception's ``reply``)."""
    view = memoryview(frame)
    header = decode_header(view, max_payload)
    if len(view) != HEADER.size + header.length:
        raise FrameError(f"{header.type.name} frame of {len(view)} bytes, header says {HEADER.size + header.length}")
    return decode_payload(header, view[HEADER.size:], layout)


class Decoder:
    """Incremental decoder over a byte stream: :meth:`feed` bytes as they come,
    :meth:`next_message` until it returns None (needs more data). A header is validated
    as soon as it is complete, so an oversized frame is refused before its payload is
    awaited or buffered. After a ProtocolError the stream has lost its framing and the
    decoder refuses to continue."""

    def __init__(self, layout: Layout | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.layout = layout
        self.max_payload = max_payload
        self._buf = bytearray()
        self._header: FrameHeader | None = None
        self._failed: ProtocolError | None = None

    def set_layout(self, layout: Layout | None) -> None:
        """Set the RAM layout (after the handshake) that page-bearing frames must fit."""
        self.layout = layout

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed by a returned message."""
        return len(self._buf)

    def next_message(self) -> Message | None:
        """The next complete message, or None if more data is needed."""
        if self._failed is not None:
            raise FrameError(f"decoder stopped after an earlier protocol error: {self._failed}")
        try:
            if self._header is None:
                if len(self._buf) < HEADER.size:
                    return None
                self._header = decode_header(self._buf, self.max_payload)
            header = self._header
            end = HEADER.size + header.length
            if len(self._buf) < end:
                return None
            payload = bytes(memoryview(self._buf)[HEADER.size:end])  # one copy, view released at once
            del self._buf[:end]
            self._header = None
            return decode_payload(header, memoryview(payload), self.layout)
        except ProtocolError as exc:
            self._failed = exc
            raise

    def __iter__(self):
        """Every complete message buffered so far."""
        while (message := self.next_message()) is not None:
            yield message


# -- handshake ---------------------------------------------------------------------------
_SERVER_LABEL = b"postcopy server"
_CLIENT_LABEL = b"postcopy client"
AUTH_FAILED = "authentication failed: the peer does not prove knowledge of the shared key"


class Handshake:
    """Sans-IO authenticated handshake (HMAC-SHA256 challenge-response, shared key).

    Client Hello → server Hello + AuthProof(HMAC(key, "postcopy server" + transcript))
    → client AuthProof(HMAC(key, "postcopy client" + transcript)) → server AuthOk.
    The transcript is the two encoded Hellos, so no field of either can be altered, and
    each side's fresh nonce makes a recorded proof useless later.

    The nonce of ``hello`` is replaced by a fresh random one for every handshake. Both
    Hellos must agree on protocol version, page size and channel; roles must differ;
    regions must be equal if both sides announce some (:attr:`layout` is the agreed
    one). Sessions are not compared: a server learns the session from the client.

    Feed every received message to :meth:`receive` and send the frames it returns. A
    failure raises a :class:`ProtocolError` whose ``reply`` frames (an :class:`Error`)
    should be sent before closing, except :class:`PeerError` (the peer's own Error).
    """

    def __init__(self, role: str, key: bytes, hello: Hello):
        if role not in ("client", "server"):
            raise ValueError(f"handshake role {role!r} is not 'client' or 'server'")
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise ValueError("the shared key must be non-empty bytes")
        if not isinstance(hello, Hello):
            raise TypeError(f"hello must be a Hello, got {type(hello).__name__}")
        self.role = role
        self._key = bytes(key)
        self.hello: Hello = dataclasses.replace(hello, nonce=secrets.token_bytes(NONCE_BYTES))
        self.peer: Hello | None = None
        self.done = False
        self._state = "new"
        self._transcript = b""

    @property
    def layout(self) -> Layout:
        """The RAM layout both sides agreed on (regions from whichever side sent them)."""
        if self.peer is None:
            raise HandshakeError("the peer's Hello has not arrived yet")
        return Layout(self.hello.page_size, self.hello.regions or self.peer.regions)

    def start(self) -> list[bytes]:
        """Frames to send first: the client's Hello; nothing for the server."""
        if self._state != "new":
            raise HandshakeError("handshake already started")
        self._state = "hello"
        return [self.hello.encode()] if self.role == "client" else []

    def receive(self, message: Message) -> list[bytes]:
        """Process one received message; returns the frames to send in reply."""
        try:
            return self._receive(message)
        except PeerError:
            self._state = "failed"
            raise
        except ProtocolError as exc:
            self._state = "failed"
            if not exc.reply:
                exc.reply = [Error(exc.code, str(exc)).encode()]
            raise

    def _mac(self, label: bytes) -> bytes:
        return hmac.new(self._key, label + self._transcript, hashlib.sha256).digest()

    def _expect(self, message: Message, cls: type) -> None:
        if isinstance(message, Error):
            raise PeerError(message.reason, message.code)
        if not isinstance(message, cls):
            what = type(message).__name__
            if isinstance(message, PAGE_BEARING):
                raise HandshakeError(f"page data before the handshake completed: got {what}")
            raise HandshakeError(f"handshake out of order: expected {cls.__name__}, got {what}")

    def _receive(self, message: Message) -> list[bytes]:
        state = self._state
        if state == "failed":
            raise HandshakeError("the handshake has already failed")
        if state == "done":
            raise HandshakeError(f"the handshake is complete; {type(message).__name__} is not for it")
        if state == "new" and self.role == "server":
            state = self._state = "hello"  # a server has nothing to start with
        if state == "new":
            raise HandshakeError("the client must call start() before receiving")
        if state == "hello":
            self._expect(message, Hello)
            self._check_compatible(message)  # type: ignore[arg-type]
            self.peer = message  # type: ignore[assignment]
            self._state = "proof"
            if self.role == "server":
                mine = self.hello.encode()
                self._transcript = message.encode() + mine
                return [mine, AuthProof(self._mac(_SERVER_LABEL)).encode()]
            self._transcript = self.hello.encode() + message.encode()
            return []
        if state == "proof":
            self._expect(message, AuthProof)
            expected = self._mac(_CLIENT_LABEL if self.role == "server" else _SERVER_LABEL)
            if not hmac.compare_digest(message.mac, expected):  # type: ignore[union-attr]
                raise AuthError(AUTH_FAILED, reply=[Error(
                    ErrorCode.AUTH, "authentication failed: the two ends do not use the same key").encode()])
            if self.role == "server":
                self._state = "done"
                self.done = True
                return [AuthOk().encode()]
            self._state = "ok"
            return [AuthProof(self._mac(_CLIENT_LABEL)).encode()]
        # state == "ok": the client waits for the server's acceptance
        self._expect(message, AuthOk)
        self._state = "done"
        self.done = True
        return []

    def _check_compatible(self, peer: Hello) -> None:
        me = self.hello
        if peer.version != me.version:
            raise VersionError(f"protocol version mismatch: the {me.role} speaks version {me.version}, "
                               f"the {peer.role} version {peer.version}")
        if peer.page_size != me.page_size:
            raise VersionError(f"page size mismatch: the {me.role} uses {me.page_size}-byte pages, "
                               f"the {peer.role} {peer.page_size}-byte pages")
        if peer.role == me.role:
            raise HandshakeError(f"both ends are a {me.role}: one must be the source, the other the dest")
        if peer.channel != me.channel:
            raise HandshakeError(f"channel mismatch: the {me.role} expects the {me.channel} channel, "
                                 f"the {peer.role} opened the {peer.channel} channel")
        if me.regions and peer.regions and me.regions != peer.regions:
            raise VersionError(f"RAM layout mismatch: the {me.role} has regions {list(me.regions)}, "
                               f"the {peer.role} {list(peer.regions)}")
        if peer.nonce == me.nonce:
            raise HandshakeError("the peer echoed our nonce")


# -- keys --------------------------------------------------------------------------------
def new_key() -> bytes:
    """A new shared key: hex text of 32 random bytes (write it to a key file)."""
    return secrets.token_hex(32).encode("ascii")


def load_key(path: str | os.PathLike) -> bytes:
    """Read a shared key file (surrounding whitespace stripped). Raises OSError if it
    cannot be read and :class:`KeyFileError` if it is empty or implausibly large."""
    with open(path, "rb") as f:
        data = f.read(65537)
    if len(data) > 65536:
        raise KeyFileError(f"key file {os.fspath(path)!r} is larger than 64 KiB: not a key file")
    key = data.strip()
    if not key:
        raise KeyFileError(f"key file {os.fspath(path)!r} is empty; create one with: "
                           f"python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE")
    return key
