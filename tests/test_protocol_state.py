"""The protocol as a table: every (phase, frame) pair of every role, the transitions,
and seeded fuzzing of frame sequences. No sockets, except one socketpair that proves a
channel refuses a precopy run after the switchover before its bytes reach the agent."""
from __future__ import annotations

import os
import random
import socket
import threading

import pytest

from postcopy.protocol import state, wire
from postcopy.protocol.channel import Channel, handshake
from postcopy.protocol.state import CHECKPOINT, MIGRATION, SENDS, TRANSITIONS, Phase, Session

PS = 4096
LAYOUT = wire.Layout(PS, ((0, 64 * PS),))
KEY = b"0123456789abcdef0123456789abcdef"

# Every frame kind the table can name: each frame type, a page run once per cause.
ALL_KINDS = sorted({t.name for t in wire.FrameType if t is not wire.FrameType.PAGE_RUN}
                   | {f"PAGE_RUN/{c.name}" for c in wire.Cause})


def sample(kind: str):
    """A valid message of this kind."""
    if kind.startswith("PAGE_RUN/"):
        return wire.PageRun(1, 2, wire.Cause[kind.split("/")[1]], bytes(range(256)) * (2 * PS // 256))
    return {
        "HELLO": wire.make_hello("source", "main", PS, LAYOUT.regions),
        "AUTH_PROOF": wire.AuthProof(bytes(32)), "AUTH_OK": wire.AuthOk(),
        "ZERO_RANGE": wire.ZeroRange(3, 4), "PAGE_REQUEST": wire.PageRequest(5, 1),
        "DISCARD": wire.Discard(((1, 2),)), "SWITCHOVER": wire.Switchover({"mode": "postcopy"}),
        "PUSH_DONE": wire.PushDone(9), "COMPLETE": wire.Complete({"ok": True}),
        "ERROR": wire.Error(wire.ErrorCode.ABORTED, "gone"), "PING": wire.Ping(1), "PONG": wire.Pong(1),
        "READY_CHECK": wire.ReadyCheck(), "READY": wire.Ready(), "RECOVERY_END": wire.RecoveryEnd(),
        "RECOVERY_ACK": wire.RecoveryAck(), "EPOCH_BEGIN": wire.EpochBegin(2),
        "EPOCH_COMMIT": wire.EpochCommit({"epoch": 2, "pages": 0}), "EPOCH_ACK": wire.EpochAck({"epoch": 2}),
        "CHECKPOINT_END": wire.CheckpointEnd(2),
    }[kind]


def session_in(protocol: str, role: str, phase: Phase) -> Session:
    s = Session(protocol, role)
    s.phase = phase
    return s


# -- the table ---------------------------------------------------------------------------
def test_every_kind_has_a_sample_of_that_kind():
    assert [state.kind(sample(k)) for k in ALL_KINDS] == ALL_KINDS


def test_table_names_only_real_frames_and_both_roles_of_every_phase():
    for protocol, phases in SENDS.items():
        assert Phase.HANDSHAKE in phases and Phase.DONE in phases and Phase.ERROR in phases
        for phase, by_role in phases.items():
            assert set(by_role) == set(state.ROLES[protocol]), (protocol, phase)
            for kinds in by_role.values():
                assert kinds <= set(ALL_KINDS), kinds - set(ALL_KINDS)


def test_migration_phases_are_the_designed_ones():
    assert set(SENDS[MIGRATION]) == {Phase.HANDSHAKE, Phase.PRECOPY, Phase.SWITCHOVER, Phase.POSTCOPY,
                                     Phase.RECOVERY, Phase.DONE, Phase.ERROR}
    assert set(SENDS[CHECKPOINT]) == {Phase.HANDSHAKE, Phase.SYNC, Phase.IDLE, Phase.EPOCH, Phase.DONE, Phase.ERROR}


def test_checkpointing_has_frames_of_its_own():
    checkpoint = set().union(*(k for by_role in SENDS[CHECKPOINT].values() for k in by_role.values()))
    assert not checkpoint & {"SWITCHOVER", "COMPLETE", "PUSH_DONE", "READY_CHECK", "RECOVERY_END"}
    migration = set().union(*(k for by_role in SENDS[MIGRATION].values() for k in by_role.values()))
    assert not migration & {"EPOCH_BEGIN", "EPOCH_COMMIT", "EPOCH_ACK", "CHECKPOINT_END", "PING", "PONG"}


def test_every_transition_starts_from_a_frame_someone_may_send_there():
    for (protocol, phase, kind), target in TRANSITIONS.items():
        assert target in SENDS[protocol]
        assert any(kind in kinds for kinds in SENDS[protocol][phase].values()), (protocol, phase, kind)


CASES = [(protocol, phase, role, direction)
         for protocol, phases in SENDS.items() for phase in phases
         for role in state.ROLES[protocol] for direction in ("send", "receive")]


@pytest.mark.parametrize("protocol, phase, role, direction", CASES,
                         ids=[f"{p}-{ph.value}-{r}-{d}" for p, ph, r, d in CASES])
def test_every_phase_frame_pair(protocol, phase, role, direction):
    """Each of the 22 kinds, in this (protocol, phase, role, direction): legal ones move
    to the table's next phase; every illegal one is refused naming the phase and frame."""
    legal = state.allowed(protocol, phase, role, direction)
    for kind in ALL_KINDS:
        session = session_in(protocol, role, phase)
        check = session.sent if direction == "send" else session.received
        if kind in legal:
            check(kind, "main")
            expected = Phase.ERROR if kind == "ERROR" else TRANSITIONS.get((protocol, phase, kind), phase)
            assert session.phase is expected, (kind, session.phase)
        else:
            with pytest.raises(wire.StateError) as info:
                check(kind, "main")
            message = str(info.value)
            assert f"phase {phase.value}" in message and f"a {kind} frame" in message and role in message
            assert session.phase is Phase.ERROR


# -- the switchover guard --------------------------------------------------------------------
def migrate_to_postcopy(session: Session, check) -> None:
    session.established()
    for kind in ("PAGE_RUN/PRECOPY", "PAGE_RUN/RESENT", "ZERO_RANGE", "PAGE_RUN/STATE", "SWITCHOVER"):
        check(kind)
    assert session.phase is Phase.POSTCOPY


@pytest.mark.parametrize("cause", ["PRECOPY", "RESENT"])
def test_precopy_run_after_the_switchover_is_refused(cause):
    dest = Session(MIGRATION, "dest")
    migrate_to_postcopy(dest, dest.received)
    dest.received("PAGE_RUN/PUSHED")
    with pytest.raises(wire.StateError, match=f"received a PAGE_RUN/{cause} frame on the main channel in "
                                              f"phase postcopy"):
        dest.received(f"PAGE_RUN/{cause}", "main")
    source = Session(MIGRATION, "source")
    migrate_to_postcopy(source, source.sent)
    with pytest.raises(wire.StateError, match="phase postcopy"):
        source.sent(f"PAGE_RUN/{cause}")


def _handshaken_pair(dest_session: Session) -> tuple[Channel, Channel]:
    """A source channel that checks nothing (a broken or hostile source) and a
    destination channel with the session, after a real handshake over a socketpair."""
    a, b = socket.socketpair()
    source, dest = Channel(a, "main", LAYOUT), Channel(b, "main", session=dest_session)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        handshake(dest, "server", KEY, wire.make_hello("dest", "main", PS))))
    thread.start()
    handshake(source, "client", KEY, wire.make_hello("source", "main", PS, LAYOUT.regions))
    thread.join(10)
    return source, dest


@pytest.mark.parametrize("cause", [wire.Cause.PRECOPY, wire.Cause.RESENT])
def test_channel_refuses_a_precopy_run_after_the_switchover_before_the_agent_sees_it(cause):
    dest_session = Session(MIGRATION, "dest")
    source, dest = _handshaken_pair(dest_session)
    try:
        dest_session.established()
        page = bytes([0xAB]) * PS
        source.send_page_run(0, 1, wire.Cause.STATE, page)
        source.send(wire.Switchover({"mode": "postcopy"}))
        source.send_page_run(7, 1, cause, bytes([0xEE]) * PS)  # would overwrite the running guest's page
        installed = {}  # what an agent would install: every message recv returns
        for _ in range(2):
            message = dest.recv()
            if isinstance(message, wire.PageRun):
                installed[message.first_page] = bytes(message.data)
        assert dest_session.phase is Phase.POSTCOPY
        with pytest.raises(wire.StateError, match=f"PAGE_RUN/{cause.name} frame .* phase postcopy"):
            dest.recv()
        assert installed == {0: page}  # page 7 never reached the agent
    finally:
        source.close()
        dest.close()


# -- seeded fuzz of frame sequences -----------------------------------------------------
def _seed() -> int:
    seed = int(os.environ.get("POSTCOPY_FUZZ_SEED", random.SystemRandom().randrange(2**32)))
    print(f"state fuzz seed {seed} (set POSTCOPY_FUZZ_SEED={seed} to replay)")
    return seed


def _wire_pair(client_role: str):
    """A sealer (sender) and a decoder with the verifier (receiver), for one direction."""
    key = os.urandom(32)
    decoder = wire.Decoder(LAYOUT)
    decoder.set_auth(wire.FrameAuth(key))
    return wire.FrameAuth(key), decoder


@pytest.mark.parametrize("protocol", [MIGRATION, CHECKPOINT])
def test_fuzz_frame_sequences(protocol):
    """Random sequences of valid frames from both roles, legal or not. Both ends check
    each frame (the sender before sending, the receiver after an authenticated decode):
    they must agree on every verdict and every phase, only StateError may be raised,
    nothing but an Error is accepted after a refusal, and a precopy or resent run is
    never accepted once the switchover frame was."""
    rng = random.Random(_seed())
    client, server = state.ROLES[protocol]
    for trial in range(300):
        ends = {client: Session(protocol, client), server: Session(protocol, server)}
        channels = {client: _wire_pair(client), server: _wire_pair(server)}
        handshake_done = rng.random() < 0.9
        if handshake_done:
            for s in ends.values():
                s.established()
        switched = False
        legal_bias = rng.random()
        for step in range(rng.randrange(1, 60)):
            if protocol == MIGRATION and rng.random() < 0.03:
                try:
                    for s in ends.values():
                        s.link_lost()
                except wire.StateError:
                    break
                continue
            role = rng.choice((client, server))
            sender, receiver = ends[role], ends[state.peer_of(protocol, role)]
            allowed = sorted(state.allowed(protocol, sender.phase, role, "send"))
            kind = rng.choice(allowed) if allowed and rng.random() < legal_bias else rng.choice(ALL_KINDS)
            try:
                sender.sent(kind)
            except wire.StateError:
                assert kind not in allowed
                assert sender.phase is Phase.ERROR
                break
            message = sample(kind)
            sealer, decoder = channels[role]
            frame = message.encode()
            decoder.feed(frame + sealer.seal(frame[:wire.HEADER.size], frame[wire.HEADER.size:]))
            received = decoder.next_message()
            assert state.kind(received) == kind
            receiver.received(kind)  # what the sender may send, the receiver may receive
            assert sender.phase is receiver.phase, (trial, step, kind)
            if kind == "SWITCHOVER":
                switched = True
            if switched:
                assert kind not in ("PAGE_RUN/PRECOPY", "PAGE_RUN/RESENT")
            if sender.phase is Phase.ERROR:
                assert state.allowed(protocol, Phase.ERROR, role, "send") == {"ERROR"}


def test_checkpoint_stream_in_order():
    primary, standby = Session(CHECKPOINT, "primary"), Session(CHECKPOINT, "standby")
    primary.established()
    standby.established()
    script = [("primary", "PAGE_RUN/PRECOPY"), ("primary", "EPOCH_COMMIT"), ("primary", "EPOCH_BEGIN"),
              ("primary", "PAGE_RUN/RESENT"), ("primary", "PING"), ("standby", "PONG"),
              ("primary", "EPOCH_COMMIT"), ("primary", "EPOCH_BEGIN"), ("standby", "EPOCH_ACK"),
              ("primary", "EPOCH_COMMIT"), ("primary", "CHECKPOINT_END"), ("standby", "EPOCH_ACK")]
    phases = []
    for role, kind in script:
        (primary if role == "primary" else standby).sent(kind)
        (standby if role == "primary" else primary).received(kind)
        phases.append(primary.phase.value)
    assert phases == ["sync", "idle", "epoch", "epoch", "epoch", "epoch", "idle", "epoch", "epoch", "idle",
                      "done", "done"]
    with pytest.raises(wire.StateError, match="EPOCH_BEGIN frame in phase done"):
        primary.sent("EPOCH_BEGIN")


def test_recovery_round_trip_and_link_loss_outside_postcopy():
    dest = Session(MIGRATION, "dest")
    migrate_to_postcopy(dest, dest.received)
    dest.link_lost()
    for kind in ("HELLO", "AUTH_PROOF"):
        dest.received(kind)
    for kind in ("HELLO", "AUTH_PROOF", "AUTH_OK", "PAGE_REQUEST", "RECOVERY_END"):
        dest.sent(kind)
    dest.received("RECOVERY_ACK")
    assert dest.phase is Phase.POSTCOPY
    early = Session(MIGRATION, "source")
    early.established()
    with pytest.raises(wire.StateError, match="the link was lost in phase precopy"):
        early.link_lost()
