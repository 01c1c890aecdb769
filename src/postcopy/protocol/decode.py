"""Decoding: header validation, payload decoders, and the one receive path of every
channel, a :class:`Decoder` over one :class:`ReceiveBuffer` (in the manner of h11's
``_receivebuffer.py``): bytes are received straight into the buffer's free tail, frames
are cut out of it in place, and after the handshake each frame's tag is verified (see
:mod:`postcopy.protocol.auth`) before any of its payload is interpreted."""
from __future__ import annotations

import json
import struct
from typing import NamedTuple

from postcopy.protocol.errors import ErrorCode, FrameError, ProtocolError, RangeError, VersionError
from postcopy.protocol.frames import (CHANNELS, HEADER, HELLO, HELLO_UNAUTHENTICATED, MAC_BYTES, MAGIC, MAX_JSON,
                                      MAX_PAYLOAD, MAX_REASON, PROTOCOL_VERSION, RANGE, ROLES, U64, AuthOk,
                                      AuthProof, Cause, CheckpointEnd, Complete, Discard, EpochAck, EpochBegin,
                                      EpochCommit, Error, FrameType, Hello, Message, PageRequest, PageRun, Ping,
                                      Pong, PushDone, Ready, ReadyCheck, RecoveryAck, RecoveryEnd, Switchover,
                                      ZeroRange, canonical_json)
from postcopy.protocol.layout import MAX_REGIONS, Layout

_VERSION = struct.Struct("!H")
_ROLE_NAMES = {v: k for k, v in ROLES.items()}
_CHANNEL_NAMES = {v: k for k, v in CHANNELS.items()}


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
    FrameType.ZERO_RANGE: U64.size,
    FrameType.PAGE_REQUEST: U64.size,
    FrameType.PUSH_DONE: 0,
    FrameType.PING: 0,
    FrameType.PONG: 0,
    FrameType.READY_CHECK: 0,
    FrameType.READY: 0,
    FrameType.RECOVERY_END: 0,
    FrameType.RECOVERY_ACK: 0,
    FrameType.EPOCH_BEGIN: 0,
    FrameType.CHECKPOINT_END: 0,
}
# Upper bounds of variable-size frames other than PageRun (which max_payload bounds).
_MAX_LENGTH = {
    FrameType.HELLO: HELLO.size + MAX_REGIONS * RANGE.size,
    FrameType.SWITCHOVER: MAX_JSON,
    FrameType.COMPLETE: MAX_JSON,
    FrameType.EPOCH_COMMIT: MAX_JSON,
    FrameType.EPOCH_ACK: MAX_JSON,
    FrameType.ERROR: MAX_REASON,
}
# Frames whose arg must be zero (so every frame has one canonical encoding).
_ZERO_ARG = frozenset({FrameType.HELLO, FrameType.AUTH_PROOF, FrameType.AUTH_OK,
                       FrameType.SWITCHOVER, FrameType.COMPLETE, FrameType.READY_CHECK, FrameType.READY,
                       FrameType.RECOVERY_END, FrameType.RECOVERY_ACK, FrameType.EPOCH_COMMIT,
                       FrameType.EPOCH_ACK})
_TYPES = {t.value: t for t in FrameType}
_CAUSES = frozenset(c.value for c in Cause)


def decode_header(buf: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> FrameHeader:
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
    if ftype is FrameType.DISCARD and length != arg * RANGE.size:
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
        if len(p) < HELLO.size:
            raise FrameError(f"HELLO frame of {len(p)} bytes is shorter than {HELLO.size}")
        version, role, channel, flags, session, nonce, page_size, nregions = HELLO.unpack_from(p)
        if len(p) != HELLO.size + nregions * RANGE.size:
            raise FrameError(f"HELLO frame of {len(p)} bytes does not hold its {nregions} regions")
        if flags & ~HELLO_UNAUTHENTICATED:
            raise FrameError(f"HELLO frame with unknown flags 0x{flags:02x}")
        if role not in _ROLE_NAMES:
            raise FrameError(f"HELLO frame with unknown role {role}")
        if channel not in _CHANNEL_NAMES:
            raise FrameError(f"HELLO frame with unknown channel {channel}")
        regions = tuple(RANGE.iter_unpack(p[HELLO.size:]))
        return _construct(Hello, h, version=version, role=_ROLE_NAMES[role], channel=_CHANNEL_NAMES[channel],
                          session=session, nonce=nonce, page_size=page_size, regions=regions,
                          unauthenticated=bool(flags & HELLO_UNAUTHENTICATED))
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
        (npages,) = U64.unpack_from(p)
        layout.check(h.arg, npages, h.type.name)
        return cls(h.arg, npages)
    return decode


def _decode_discard(h: FrameHeader, p: memoryview, layout: Layout | None) -> Discard:
    layout = _need_layout(layout, h.type)
    ranges = tuple(RANGE.iter_unpack(p))
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
        # One encoding per frame: spacing, escapes, duplicate keys or number spellings that our
        # encoder would not produce are refused, so an authenticated frame means one thing.
        if canonical_json(info) != p:
            raise FrameError(f"{h.type.name} frame's JSON is not in canonical form")
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
    FrameType.READY_CHECK: lambda h, p, layout: ReadyCheck(),
    FrameType.READY: lambda h, p, layout: Ready(),
    FrameType.RECOVERY_END: lambda h, p, layout: RecoveryEnd(),
    FrameType.RECOVERY_ACK: lambda h, p, layout: RecoveryAck(),
    FrameType.EPOCH_BEGIN: lambda h, p, layout: EpochBegin(h.arg),
    FrameType.EPOCH_COMMIT: _decode_json(EpochCommit),
    FrameType.EPOCH_ACK: _decode_json(EpochAck),
    FrameType.CHECKPOINT_END: lambda h, p, layout: CheckpointEnd(h.arg),
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
           max_payload: int = MAX_PAYLOAD) -> Message:
    """Decode exactly one whole frame (e.g. an exception's ``reply``)."""
    view = memoryview(frame)
    header = decode_header(view, max_payload)
    if len(view) != HEADER.size + header.length:
        raise FrameError(f"{header.type.name} frame of {len(view)} bytes, header says {HEADER.size + header.length}")
    return decode_payload(header, view[HEADER.size:], layout)


class ReceiveBuffer:
    """One buffer a stream is received into: :meth:`space` is where the next recv_into
    writes, :meth:`commit` counts what it wrote, and frames are read in place between
    :attr:`start` and :attr:`end`. Its storage is never resized while in use, so views
    handed out stay valid memory; their bytes are valid until the next :meth:`space`."""

    MIN_ROOM = 64 << 10

    def __init__(self, capacity: int):
        self._buf = bytearray(capacity)
        self.view = memoryview(self._buf)
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def space(self, need: int) -> memoryview:
        """Free room after the buffered bytes, after making sure that ``need`` bytes
        counted from :attr:`start` fit (moving the buffered bytes to the front, or to
        a larger buffer, when they do not)."""
        if self.start == self.end:
            self.start = self.end = 0
        cramped = self.start and len(self._buf) - self.end < self.MIN_ROOM  # avoid many tiny recvs
        if self.start + need > len(self._buf) or cramped:
            rest = bytes(self.view[self.start:self.end])
            if need > len(self._buf):
                # Room for two such frames: one recv may bring the next one too. Old
                # views keep the old storage alive.
                self._buf = bytearray(2 * need)
                self.view = memoryview(self._buf)
            self.view[:len(rest)] = rest
            self.start, self.end = 0, len(rest)
        return self.view[self.end:]

    def commit(self, n: int) -> None:
        """``n`` bytes were written at the start of :meth:`space`."""
        self.end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy received bytes in."""
        data = memoryview(data).cast("B")
        room = self.space(len(self) + len(data))
        room[:len(data)] = data
        self.commit(len(data))


class Decoder:
    """Incremental decoder over a byte stream: :meth:`feed` bytes as they come (or
    receive them into :meth:`space` and :meth:`commit`), :meth:`next_message` until it
    returns None (needs more). A header is validated as soon as it is complete, so an
    oversized frame is refused before its payload is awaited or buffered. With
    :meth:`set_auth`, each frame must carry a valid tag, checked before the payload is
    decoded. With ``zero_copy`` a PageRun's data is a view into the buffer, valid until
    the next call (a channel's receive path); otherwise a copy. After a ProtocolError
    the stream has lost its framing and the decoder stops. The buffer starts at
    ``capacity`` bytes and grows only as far as frames that passed the header checks
    need."""

    GREEDY_READ = 64 << 10

    def __init__(self, layout: Layout | None = None, max_payload: int = MAX_PAYLOAD, capacity: int = 64 << 10,
                 zero_copy: bool = False):
        self.layout = layout
        self.max_payload = max_payload
        self.zero_copy = zero_copy
        self._buffer = ReceiveBuffer(capacity)
        self._header: FrameHeader | None = None
        self._auth = None
        self._tag_bytes = 0
        self._failed: ProtocolError | None = None

    def set_layout(self, layout: Layout | None) -> None:
        """Set the RAM layout (after the handshake) that page-bearing frames must fit."""
        self.layout = layout

    def set_auth(self, verifier) -> None:
        """From the next frame on, every frame carries a tag that ``verifier`` (a
        :class:`postcopy.protocol.auth.FrameAuth` of the receiving direction) checks."""
        self._auth = verifier
        self._tag_bytes = verifier.TAG_BYTES

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buffer.feed(data)

    def space(self) -> memoryview:
        """Where to receive the next bytes. Small frames are read greedily, several per
        call; the rest of a large frame (a page run) is read exactly, so its bytes land
        where it is decoded and nothing after it ever needs moving."""
        need = HEADER.size if self._header is None else HEADER.size + self._header.length + self._tag_bytes
        buf = self._buffer
        if need > self.GREEDY_READ:
            room = buf.space(need)
            return room[:buf.start + need - buf.end]
        return buf.space(self.GREEDY_READ)[:self.GREEDY_READ]

    def commit(self, n: int) -> None:
        """``n`` bytes were received into :meth:`space`."""
        self._buffer.commit(n)

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed by a returned message."""
        return len(self._buffer)

    @property
    def auth(self):
        """The verifier of received frames (None: frames carry no tag)."""
        return self._auth

    def take_buffered(self) -> bytes:
        """Hand the bytes received but not decoded to another reader (the native data
        plane): the decoder is left empty, at a frame boundary; :meth:`feed` gives back
        what that reader did not consume."""
        buf = self._buffer
        pending = bytes(buf.view[buf.start:buf.end])
        buf.start = buf.end = 0
        self._header = None
        return pending

    def next_message(self) -> Message | None:
        """The next complete message, or None if more data is needed."""
        if self._failed is not None:
            raise FrameError(f"decoder stopped after an earlier protocol error: {self._failed}")
        try:
            return self._next()
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _next(self) -> Message | None:
        buf = self._buffer
        if self._header is None:
            if len(buf) < HEADER.size:
                return None
            self._header = decode_header(buf.view[buf.start:buf.start + HEADER.size], self.max_payload)
        header = self._header
        payload_end = buf.start + HEADER.size + header.length
        if buf.end < payload_end + self._tag_bytes:
            return None
        view = buf.view
        if self._auth is not None:
            self._auth.verify(view[buf.start:buf.start + HEADER.size], view[buf.start + HEADER.size:payload_end],
                              view[payload_end:payload_end + self._tag_bytes])
        payload = view[buf.start + HEADER.size:payload_end]
        if not self.zero_copy:
            payload = memoryview(bytes(payload))
        buf.start = payload_end + self._tag_bytes
        self._header = None
        return decode_payload(header, payload, self.layout)

    def __iter__(self):
        """Every complete message buffered so far."""
        while (message := self.next_message()) is not None:
            yield message
