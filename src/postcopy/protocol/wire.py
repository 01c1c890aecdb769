"""Sans-IO wire protocol of postcopy (version 2): frames, validation, the authenticated
handshake, frame authentication and the per-role state machine. Pure encode/decode and
state, in the spirit of h11: no sockets, no threads. :mod:`postcopy.protocol.channel`
moves the bytes. This module gathers the public names of its parts:

- :mod:`~postcopy.protocol.frames`: header, frame types, message classes, encoders;
- :mod:`~postcopy.protocol.decode`: header checks, decoders, the receive buffer;
- :mod:`~postcopy.protocol.handshake`: the challenge-response handshake, key files;
- :mod:`~postcopy.protocol.auth`: per-frame keys and tags;
- :mod:`~postcopy.protocol.state`: the table of phases and frames, the Session.

Frame = 16-byte header ``!HBBIQ`` (magic 0x5043 "PC", type, flags, payload length, arg),
the payload, and after the handshake a 16-byte tag. ``arg`` carries the one integer most
frames need (first page index, count, epoch, error code).

====================  =====  =================  ==========================================
frame                 flags  arg                payload
====================  =====  =================  ==========================================
Hello                 0      0                  ``!HBBB16s32sII`` + regions as ``!QQ`` each
AuthProof             0      0                  32-byte HMAC-SHA256
AuthOk                0      0                  empty
PageRun               cause  first page         npages * page_size bytes of page data
ZeroRange             0      first page         ``!Q`` npages
PageRequest           0      first page         ``!Q`` npages
Discard               0      number of ranges   ``!QQ`` (first_page, npages) each
Switchover, Complete  0      0                  JSON object, UTF-8
PushDone              0      pages              empty
Error                 0      code               reason, UTF-8
Ping, Pong            0      token              empty (checkpoint heartbeats)
ReadyCheck, Ready     0      0                  empty (source asks, destination answers)
RecoveryEnd, -Ack     0      0                  empty (end of the outstanding list; resume)
EpochBegin            0      epoch              empty
EpochCommit, EpochAck 0      0                  JSON object, UTF-8
CheckpointEnd         0      last epoch         empty
====================  =====  =================  ==========================================

A PageRun's page count is its payload length divided by the page size agreed in the
handshake, so its data is exactly the payload and can be received straight into a
page-aligned buffer and installed without a copy. No run exceeds :data:`MAX_RUN_BYTES`.

Handshake: client Hello → server Hello + AuthProof(HMAC-SHA256(key, "postcopy server" +
transcript)) → client AuthProof(HMAC(key, "postcopy client" + transcript)) → server
AuthOk; the transcript is both Hellos, each with a fresh 32-byte nonce.

Frame authentication (every frame after AuthOk, both directions, every channel):
keys ``k_c2s, k_s2c`` = HKDF-SHA256(shared key, salt = SHA256(label + transcript)), one
per direction, fresh for every handshake (so for each channel and each reconnect).
Tag = AES-256-GMAC under the direction's key, nonce = 0^32 || sequence number (64 bits,
counted by both ends from 0, never sent), over header || payload. A wrong tag (altered,
replayed, reordered, dropped, injected frame) raises :class:`IntegrityError`: the stream
ends and nothing of the frame is used. GMAC was chosen over HMAC-SHA256 by measurement
(``postcopy bench``, 1 MiB frames: about 5 GB per CPU second for GMAC in C, about 1.3 for
hashlib's HMAC-SHA256, SHA-NI included, on the development machine).
Frames are authenticated, not encrypted: for confidentiality run the agents over an
encrypted link (WireGuard, IPsec), see README.

Decoding is strict: every field is checked, anything malformed raises
:class:`ProtocolError` (and nothing else), and a decoded frame re-encodes to the very
same bytes (the handshake's MACs rely on that).
"""
from __future__ import annotations

from postcopy.protocol.auth import KEY_BYTES, TAG_BYTES, FrameAuth, derive_frame_keys
from postcopy.protocol.decode import Decoder, FrameHeader, ReceiveBuffer, decode, decode_header, decode_payload
from postcopy.protocol.errors import (AuthError, ErrorCode, FrameError, HandshakeError, IntegrityError, KeyFileError,
                                      PeerError, ProtocolError, RangeError, StateError, VersionError)
from postcopy.protocol.frames import (HEADER, MAC_BYTES, MAGIC, MAX_JSON, MAX_PAYLOAD, MAX_REASON, MAX_RUN_BYTES,
                                      NONCE_BYTES, PAGE_BEARING, PROTOCOL_VERSION, SESSION_BYTES, AuthOk, AuthProof,
                                      Cause, CheckpointEnd, Complete, Discard, EpochAck, EpochBegin, EpochCommit,
                                      Error, FrameType, Hello, Message, PageRequest, PageRun, Ping, Pong, PushDone,
                                      Ready, ReadyCheck, RecoveryAck, RecoveryEnd, Switchover, ZeroRange,
                                      encode_page_run_header, make_hello, max_run_pages)
from postcopy.protocol.handshake import AUTH_FAILED, Handshake, load_key, new_key
from postcopy.protocol.layout import MAX_PAGE_SIZE, MAX_REGIONS, MIN_PAGE_SIZE, Layout
from postcopy.protocol.state import CHECKPOINT, MIGRATION, Phase, Session, kind

__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
