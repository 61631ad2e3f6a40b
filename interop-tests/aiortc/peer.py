#!/usr/bin/env python3
"""A third-party peermesh peer, written from docs/PROTOCOL.md alone, with aiortc + websockets.

It connects to a peermesh server, says hello, joins one group and keeps a link to every
co-member: relay-first on the server path, then the WebRTC direct path (pre-negotiated data
channels "r" and "u", READY, generations), with the link layer of §8 (DATA/ACK/UNRELIABLE/
PING/PONG/READY, in-order reliable delivery across path changes).

Link protocol version 2 (docs/PROTOCOL.md §7.6) by default: "version" in offer/answer, an
in-band send channel "u2" opened by each end for UNRELIABLE/UNRELIABLE_PART/PING/PONG (always
without retransmissions: aiortc sends every SCTP chunk, FORWARD-TSN included, in a packet of its
own, so it may ignore a peer's "u2_reliable": true), direct unreliable frames of at
most 1024 bytes (longer messages split into UNRELIABLE_PART), and the dead-path rule.
`--link-version 1` makes it a pure version 1 peer.

Driven by lines (one per event / command, UTF-8):

stdout (events):
    welcome PEER_ID
    declining NAME GEN                --no-direct: an offer of NAME was declined
    group GROUP                       the join succeeded
    joined NAME PEER_ID               a co-member appeared (a link was created)
    left NAME PEER_ID                 a co-member's link ended
    path NAME server|direct L/R       the path to NAME changed (L/R: host, srflx, prflx, relay)
    msg NAME TEXT                     a reliable message (newlines and backslashes escaped)
    umsg NAME TEXT                    an unreliable message
    direct_failed NAME REASON         a direct-path attempt failed
    declined NAME                     no direct path with NAME: it declined, or the pair's policy is
                                      none (we stay on the server path)
    error CODE MESSAGE                an error frame from the server not explained by a race
    stats NAME k=v ...                answer to the stats command
    usent NAME COUNT                  the usend_many command is done (its messages have left
                                      the data channel's buffer)
    closed REASON                     the session ended (the process then exits)

stdin (commands):
    send NAME TEXT                    reliable message to NAME
    usend NAME TEXT                   unreliable message to NAME
    usend_many NAME COUNT SIZE MS     COUNT unreliable messages of SIZE bytes ("<i> " + x...),
                                      one every MS milliseconds
    stats NAME                        print link counters
    path NAME                         print the current path again
    quit                              close and exit (also on end of input)

NAME may also be a peer id. Logs go to stderr (--verbose for details).
"""

import argparse
import asyncio
import collections
import json
import logging
import socket
import struct
import sys
import time

import aioice.ice
import websockets
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp
from websockets.asyncio.client import connect

log = logging.getLogger("peer")

PROTOCOL_VERSION = 1

# Link frame kinds (§8.1; UNRELIABLE_PART: link v2).
DATA, ACK, UNRELIABLE, PING, PONG, READY = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15
UNRELIABLE_PART = 0x16
FIN = 0x01
RELAY_KIND_DATA = 0x01

# Constants (§8.3).
MAX_FRAGMENT = 16384
MAX_UNRELIABLE = 16384
ACK_EVERY = 32
ACK_DELAY = 0.005
MAX_REORDER = 262144
CONNECT_TIMEOUT = 8.0
PING_EVERY = 1.0
MAX_PINGS = 8
SEND_WINDOW = 8 << 20
FRAGMENT_OVERHEAD = 64

# Link protocol version 2 (docs/PROTOCOL.md §7.6).
LINK_VERSION = 2
MAX_DIRECT_UNRELIABLE_FRAME = 1024  # one SCTP chunk at every known stack
PART_HEADER = 9  # [0x16][msg u32][index u16][count u16]
PART_BYTES = MAX_DIRECT_UNRELIABLE_FRAME - PART_HEADER  # 1015
MAX_PARTS = 17
PART_EXPIRY = 1.0
PART_MAX_HELD = 256 << 10  # parts held in all, each counted as its bytes + PART_OVERHEAD
PART_OVERHEAD = 64
PART_DONE_MAX = 4096
DEAD_PATH_TIMEOUT = 3.0


def out(line):
    """One event line on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def escape(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def data_frame(seq, fin, payload):
    return struct.pack(">BBQ", DATA, FIN if fin else 0, seq) + payload


def u64_frame(kind, value):
    return struct.pack(">BQ", kind, value)


def ready_frame(gen):
    return struct.pack(">BI", READY, gen)


def part_frames(msg, payload):
    """UNRELIABLE_PART frames of one split unreliable message: 1015 bytes each but the last."""
    count = max(1, -(-len(payload) // PART_BYTES))
    return [
        struct.pack(">BIHH", UNRELIABLE_PART, msg, i, count)
        + payload[i * PART_BYTES : (i + 1) * PART_BYTES]
        for i in range(count)
    ]


class PartReassembly:
    """UNRELIABLE_PART frames (from any path) back into whole messages, each delivered once;
    incomplete ones expire PART_EXPIRY after their first part; at most PART_MAX_HELD held (each
    part counted as its bytes + 64), the oldest message evicted first (§7.6)."""

    def __init__(self, stats):
        self.stats = stats
        self.msgs = collections.OrderedDict()  # msg -> [count, parts, length, first at, cost]
        self.held = 0
        self.done = collections.OrderedDict()  # msg -> completed at

    def push(self, frame):
        """The whole message once `frame` completes it, else None."""
        now = time.monotonic()
        self.expire(now)
        if len(frame) < PART_HEADER:
            return self.drop()
        _, msg, index, count = struct.unpack_from(">BIHH", frame)
        data = bytes(frame[PART_HEADER:])
        if count < 2 or count > MAX_PARTS or index >= count or len(data) > PART_BYTES:
            return self.drop()
        if msg in self.done:
            return self.drop()
        m = self.msgs.get(msg)
        if m is not None:
            if count != m[0] or index in m[1] or m[2] + len(data) > MAX_UNRELIABLE:
                return self.drop()
        else:
            m = self.msgs[msg] = [count, {}, 0, now, 0]
        cost = len(data) + PART_OVERHEAD
        for old in list(self.msgs):  # room for it: oldest messages first, never this one
            if self.held + cost <= PART_MAX_HELD:
                break
            if old != msg:
                self.held -= self.msgs.pop(old)[4]
                self.stats["parts_expired"] += 1
        m[1][index] = data
        m[2] += len(data)
        m[4] += cost
        self.held += cost
        if len(m[1]) < count:
            return None
        del self.msgs[msg]
        self.held -= m[4]
        self.done[msg] = now
        if len(self.done) > PART_DONE_MAX:
            self.done.popitem(last=False)
        self.stats["unreliable_joined"] += 1
        return b"".join(m[1][i] for i in range(count))

    def drop(self):
        self.stats["parts_dropped"] += 1
        return None

    def expire(self, now=None):
        now = time.monotonic() if now is None else now
        while self.msgs:
            msg, m = next(iter(self.msgs.items()))
            if now - m[3] < PART_EXPIRY:
                break
            del self.msgs[msg]
            self.held -= m[4]
            self.stats["parts_expired"] += 1
        while self.done and now - next(iter(self.done.values())) >= PART_EXPIRY:
            self.done.popitem(last=False)


def signaled_version(data):
    """The link protocol version an offer or answer announces: absent means 1."""
    v = data.get("version")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else 1


def decode_frame(b, version=LINK_VERSION):
    """(kind, fields...) or None for an undecodable frame (§8.1)."""
    if not b:
        return None
    kind = b[0]
    if kind == UNRELIABLE_PART and version >= 2:
        return (UNRELIABLE_PART, b)
    if kind == DATA:
        if len(b) < 10:
            return None
        _, flags, seq = struct.unpack_from(">BBQ", b)
        return (DATA, seq, bool(flags & FIN), bytes(b[10:]))
    if kind in (ACK, PING, PONG):
        if len(b) < 9:
            return None
        return (kind, struct.unpack_from(">Q", b, 1)[0])
    if kind == UNRELIABLE:
        return (UNRELIABLE, bytes(b[1:]))
    if kind == READY:
        if len(b) < 5:
            return None
        return (READY, struct.unpack_from(">I", b, 1)[0])
    return None


def ice_servers_config(servers):
    """welcome.ice_servers (RTCIceServer shape) -> aiortc configuration.

    An empty list stays an empty list: with iceServers=None aiortc would use a public STUN server.
    """
    result = []
    for s in servers:
        urls = s.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            continue
        result.append(
            RTCIceServer(
                urls=urls, username=s.get("username"), credential=s.get("credential")
            )
        )
    return RTCConfiguration(iceServers=result)


def application_mid(sdp):
    """The mid of the first m=application section of an SDP, or None."""
    in_app = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_app = line.startswith("m=application")
        elif in_app and line.startswith("a=mid:"):
            return line[len("a=mid:"):].strip()
    return None


class Link:
    """One link to one co-member (§7, §8)."""

    def __init__(self, session, peer, name, link_id, initiator, direct="any"):
        self.s = session
        self.peer = peer
        self.name = name
        self.link_id = link_id
        self.initiator = initiator
        self.groups = set()
        self.closed = False
        # sending
        self.next_seq = 1
        self.unacked = collections.OrderedDict()  # seq -> encoded DATA frame
        self.window_used = 0
        self.window_free = asyncio.Event()
        self.window_free.set()
        # receiving
        self.delivered = 0
        self.acked_sent = 0
        self.ack_due = False
        self.ack_timer = None
        self.reorder = {}
        self.partial = bytearray()
        # path
        self.path = "server"
        self.pc = None
        self.r = None
        self.u = None
        self.u2 = None  # link v2: the in-band send channel this end opened
        self.u2_in = None  # link v2: the peer's in-band "u2" (received on)
        self.u2_reliable = False  # the peer asked for a reliable "u2" ("u2_reliable": true)
        self.gen = 0
        self.version = 0  # link protocol version of generation `gen` (0: not known yet)
        self.r_open = False
        self.u_open = False
        self.u2_open = False
        self.u2_in_open = False
        self.connected = False
        self.last_direct_recv = 0.0  # a frame last arrived on the current generation's channels
        self.dead_timer = None
        self.ready_sent = False
        self.connect_timer = None
        self.peer_ready = 0
        self.remote_set = False
        self.pending_candidates = []
        self.signaled_types = {}  # (address, port) -> candidate type, per PeerConnection
        # initiator
        self.retry_handle = None
        self.backoff = 1.0
        self.had_direct = False
        self.declined = False
        # RTT
        self.next_ping = 1
        self.pings = collections.OrderedDict()
        self.rtt = None
        # counters
        self.stats = collections.Counter()
        # link v2: split unreliable messages
        self.next_part_msg = 1
        self.parts = PartReassembly(self.stats)
        # signals are handled one after another (each may await aiortc)
        self.signals = asyncio.Queue()
        self.tasks = [
            asyncio.create_task(self.signal_loop()),
            asyncio.create_task(self.ping_loop()),
        ]
        if direct not in ("any", "relay"):
            # The pair's policy is none (§3.13; an unknown value counts as none): no direct path
            # (said once the link is announced).
            asyncio.get_running_loop().call_soon(self.no_direct)
        elif self.initiator and self.s.direct:
            self.spawn(self.start())

    def no_direct(self):
        """The pair may not use a direct path (policy none, or the server said
        direct_not_allowed): stop trying, for good."""
        if self.declined:
            return
        self.declined = True
        if self.retry_handle is not None:
            self.retry_handle.cancel()
            self.retry_handle = None
        self.close_pc()
        out(f"declined {self.name}")

    # ---- helpers -------------------------------------------------------------------------

    def spawn(self, coro):
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task):
        if task in self.tasks:
            self.tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task failed: %r", self.name, task.exception())

    def relay(self, frame):
        self.s.send_binary(
            struct.pack(">BII", RELAY_KIND_DATA, self.peer, self.link_id) + frame
        )

    def signal(self, data):
        self.s.send_json({"type": "signal", "to": self.peer, "link": self.link_id, "data": data})

    def is_direct(self):
        return self.path != "server"

    # ---- sending (§8.4) ------------------------------------------------------------------

    def unreliable_channel(self):
        """The direct path's channel for UNRELIABLE(_PART), PING, PONG: our own "u2" in a v2
        generation."""
        return self.u2 if self.version >= 2 else self.u

    def transmit(self, frame, channel):
        """Send a link frame on the current path; a failed direct send downgrades."""
        if self.is_direct():
            ch = self.r if channel == "r" else self.unreliable_channel()
            gen = self.gen
            try:
                ch.send(frame)
                if frame[0] == DATA:
                    self.stats["sent_direct"] += 1
                return
            except Exception as e:  # channel closed or broken: a failure (§7.4)
                log.info("%s: direct send failed: %r", self.name, e)
                self.failure(gen, f"send failed: {e}")
                if frame[0] == DATA:
                    return  # re-sent by the downgrade
        if frame[0] == DATA:
            self.stats["sent_server"] += 1
        self.relay(frame)

    async def send_reliable(self, message: bytes):
        chunks = [message[i : i + MAX_FRAGMENT] for i in range(0, len(message), MAX_FRAGMENT)]
        if not chunks:
            chunks = [b""]
        cost = sum(len(c) + FRAGMENT_OVERHEAD for c in chunks)
        # a local send window, like the reference client's (not visible on the wire)
        while self.window_used > 0 and self.window_used + cost > SEND_WINDOW:
            self.window_free.clear()
            await self.window_free.wait()
            if self.closed:
                return
        if self.closed:
            return
        for i, chunk in enumerate(chunks):
            seq = self.next_seq
            self.next_seq += 1
            frame = data_frame(seq, i == len(chunks) - 1, chunk)
            self.unacked[seq] = frame
            self.window_used += len(chunk) + FRAGMENT_OVERHEAD
            self.transmit(frame, "r")

    def send_unreliable(self, message: bytes):
        if len(message) > MAX_UNRELIABLE:
            raise ValueError(f"unreliable message of {len(message)} bytes exceeds {MAX_UNRELIABLE}")
        if self.is_direct() and self.version >= 2 and 1 + len(message) > MAX_DIRECT_UNRELIABLE_FRAME:
            # Link v2: one SCTP chunk per message on the direct path. A part whose direct send
            # fails goes on the server path as it is (transmit).
            msg = self.next_part_msg
            self.next_part_msg = (msg + 1) & 0xFFFFFFFF
            self.stats["unreliable_split"] += 1
            for frame in part_frames(msg, message):
                self.transmit(frame, "u")
            return
        self.transmit(bytes([UNRELIABLE]) + message, "u")

    def on_ack(self, seq):
        while self.unacked:
            first = next(iter(self.unacked))
            if first > seq:
                break
            frame = self.unacked.pop(first)
            self.window_used -= len(frame) - 10 + FRAGMENT_OVERHEAD
        self.window_free.set()

    # ---- receiving (§8.4) ----------------------------------------------------------------

    def on_frame(self, b, direct):
        if self.closed:
            return
        f = decode_frame(b, self.s.link_version)
        if f is None:
            log.warning("%s: undecodable link frame (%d bytes) dropped", self.name, len(b))
            return
        kind = f[0]
        if kind == DATA:
            _, seq, fin, payload = f
            self.stats["recv_direct" if direct else "recv_server"] += 1
            if seq <= self.delivered or seq in self.reorder:
                self.stats["duplicates"] += 1
                self.ack_due = True
                self.schedule_ack()
                return
            if seq != self.delivered + 1:
                if len(self.reorder) >= MAX_REORDER:
                    log.error("%s: reorder buffer full, fragment %d dropped", self.name, seq)
                    return
                self.reorder[seq] = (fin, payload)
                return
            self.accept(fin, payload)
            while self.delivered + 1 in self.reorder:
                self.accept(*self.reorder.pop(self.delivered + 1))
            self.schedule_ack()
        elif kind == ACK:
            self.on_ack(f[1])
        elif kind == UNRELIABLE:
            out(f"umsg {self.name} {escape(f[1])}")
        elif kind == UNRELIABLE_PART:
            whole = self.parts.push(f[1])
            if whole is not None:
                out(f"umsg {self.name} {escape(whole)}")
        elif kind == PING:
            if direct and self.is_direct():
                self.transmit(u64_frame(PONG, f[1]), "u")
            else:
                self.relay(u64_frame(PONG, f[1]))
        elif kind == PONG:
            sent = self.pings.get(f[1])
            if sent is not None:
                sample = time.monotonic() - sent
                while self.pings:
                    pid, _ = self.pings.popitem(last=False)
                    if pid == f[1]:
                        break
                self.rtt = sample if self.rtt is None else (7 * self.rtt + sample) / 8
        elif kind == READY:
            self.peer_ready = max(self.peer_ready, f[1])
            self.maybe_upgrade()

    def accept(self, fin, payload):
        self.delivered += 1
        self.partial += payload
        if fin:
            out(f"msg {self.name} {escape(bytes(self.partial))}")
            self.partial = bytearray()

    def schedule_ack(self):
        if self.delivered - self.acked_sent >= ACK_EVERY:
            self.send_ack()
        elif self.ack_timer is None:
            self.ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self.send_ack)

    def send_ack(self):
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.closed or (self.acked_sent == self.delivered and not self.ack_due):
            return
        self.ack_due = False
        self.acked_sent = self.delivered
        self.transmit(u64_frame(ACK, self.delivered), "r")

    # ---- RTT probes (§8.6) ---------------------------------------------------------------

    def send_ping(self):
        pid = self.next_ping
        self.next_ping += 1
        self.pings[pid] = time.monotonic()
        while len(self.pings) > MAX_PINGS:
            self.pings.popitem(last=False)
        self.transmit(u64_frame(PING, pid), "u")

    async def ping_loop(self):
        while not self.closed:
            self.parts.expire()
            self.send_ping()
            await asyncio.sleep(PING_EVERY)

    # ---- path changes (§8.5) -------------------------------------------------------------

    def selected_types(self):
        """(local, remote) candidate types of the selected ICE pair."""
        try:
            conn = self.pc.sctp.transport.transport._connection
            pair = conn._nominated.get(1)
            local = pair.local_candidate.type
            remote = pair.remote_candidate.type
            if remote == "prflx":
                key = (pair.remote_candidate.host, pair.remote_candidate.port)
                remote = self.signaled_types.get(key, remote)
            known = ("host", "srflx", "prflx", "relay")
            return (local if local in known else "host", remote if remote in known else "host")
        except Exception as e:  # aiortc internals changed: still report a direct path
            log.warning("%s: no selected pair: %r", self.name, e)
            return ("unknown", "unknown")

    def maybe_upgrade(self):
        if self.closed or self.is_direct() or self.pc is None:
            return
        if self.channels_open() and self.connected and self.peer_ready >= self.gen:
            local, remote = self.selected_types()
            self.path = f"direct {local}/{remote}"
            self.backoff = 1.0
            self.had_direct = True
            self.stats["path_changes"] += 1
            self.reset_rtt()
            out(f"path {self.name} {self.path}")
            self.last_direct_recv = time.monotonic()
            if self.s.link_version >= 2:  # every generation; a pure v1 peer predates the rule
                self.arm_dead_timer(self.pc, self.s.dead_path_timeout)
            self.send_ping()

    def channels_open(self):
        """Every channel of the generation is open: "r", "u", and in a v2 generation both "u2"s
        (ours and the peer's)."""
        if self.version < 1 or not (self.r_open and self.u_open):
            return False
        return self.version < 2 or (self.u2_open and self.u2_in_open)

    def arm_dead_timer(self, pc, delay):
        """Dead-path rule (§8.7): while direct, nothing at all on the current generation's
        channels for --dead-path-timeout means the direct path has failed, whatever ICE says."""
        if self.dead_timer is not None:
            self.dead_timer.cancel()

        def check():
            self.dead_timer = None
            if self.closed or self.pc is not pc or not self.is_direct():
                return
            limit = self.s.dead_path_timeout
            idle = time.monotonic() - self.last_direct_recv
            if idle < limit:
                self.arm_dead_timer(pc, limit - idle)
                return
            self.stats["dead_paths"] += 1
            self.failure(self.gen, f"nothing received on the direct path for {idle:.1f}s")

        self.dead_timer = asyncio.get_running_loop().call_later(delay, check)

    def reset_rtt(self):
        self.rtt = None
        self.pings.clear()

    def downgrade(self):
        if not self.is_direct():
            return
        self.path = "server"
        self.stats["path_changes"] += 1
        self.reset_rtt()
        out(f"path {self.name} server")
        for frame in self.unacked.values():
            self.stats["resent"] += 1
            self.stats["sent_server"] += 1
            self.relay(frame)
        self.acked_sent = self.delivered
        self.ack_due = False
        if self.delivered > 0:
            self.relay(u64_frame(ACK, self.delivered))

    # ---- PeerConnections (§7.3, §7.4) ----------------------------------------------------

    def new_pc(self):
        """A PeerConnection with both pre-negotiated channels, made current."""
        pc = RTCPeerConnection(ice_servers_config(self.s.ice_servers))
        r = pc.createDataChannel("r", negotiated=True, id=0, ordered=True)
        u = pc.createDataChannel("u", negotiated=True, id=1, ordered=False, maxRetransmits=0)
        self.pc, self.r, self.u, self.u2, self.u2_in = pc, r, u, None, None
        self.r_open = self.u_open = self.u2_open = self.u2_in_open = False
        self.connected = self.ready_sent = False
        self.remote_set = False
        self.pending_candidates = []
        self.signaled_types = {}

        def current():
            return self.pc is pc and not self.closed

        for ch in (r, u):
            self.wire_channel(pc, ch)

        @pc.on("datachannel")
        def on_datachannel(ch):
            # Link v2: the peer's in-band "u2" (at most one); any other one is closed.
            if current() and ch.label == "u2" and self.version >= 2 and self.u2_in is None:
                log.info("%s: gen %d peer's channel u2 (id %s) arrived", self.name, self.gen, ch.id)
                self.u2_in = ch
                self.wire_channel(pc, ch, "u2_in")
                if ch.readyState == "open":  # aiortc announces it open (its "open" has fired)
                    self.channel_open(pc, "u2_in")
            else:
                log.info("%s: unexpected in-band channel %r closed", self.name, ch.label)
                ch.close()

        @pc.on("connectionstatechange")
        def on_state():
            state = pc.connectionState
            if not current():
                return
            log.info("%s: gen %d connection %s", self.name, self.gen, state)
            if state == "connected":
                self.connected = True
                self.disarm_connect_timer()
                self.maybe_upgrade()
            elif state in ("disconnected", "failed", "closed"):
                self.failure(self.gen, f"connection {state}")

        return pc

    def open_u2(self, pc):
        """Link v2: our in-band send channel "u2", opened by the initiator right after it applied
        a v2 answer, by the responder right after it set its answer. Always unordered without
        retransmissions. A peer asks for a reliable one ("u2_reliable": true) when its SCTP
        stack drops packets in which a FORWARD-TSN is bundled with other chunks; aiortc never
        bundles (one chunk per packet), so §7.6 lets it ignore the request."""
        u2 = pc.createDataChannel("u2", ordered=False, maxRetransmits=0)
        log.info("%s: gen %d opening u2 (unreliable; the peer asked for a reliable one: %s)",
                 self.name, self.gen, self.u2_reliable)
        self.u2 = u2
        self.wire_channel(pc, u2)

    def wire_channel(self, pc, ch, which=None):
        """open / close / message handlers of a data channel of PeerConnection `pc`."""
        which = which or ch.label

        def current():
            return self.pc is pc and not self.closed

        def on_close():
            if current():
                self.failure(self.gen, f"channel {which} closed")

        def on_message(message):
            # Frames from any of our PeerConnections are safe to process (§7.4), but only the
            # current generation's channels count as signs of life of the direct path.
            if current():
                self.last_direct_recv = time.monotonic()
            if isinstance(message, str):
                log.warning("%s: text data channel message dropped", self.name)
                return
            self.on_frame(message, direct=True)

        ch.on("open", lambda: self.channel_open(pc, which))
        ch.on("close", on_close)
        ch.on("message", on_message)

    def channel_open(self, pc, which):
        if self.pc is not pc or self.closed:
            return
        if which == "r":
            self.r_open = True
        elif which == "u":
            self.u_open = True
        elif which == "u2":
            self.u2_open = True
        elif which == "u2_in":
            self.u2_in_open = True
        log.info("%s: gen %d channel %s open", self.name, self.gen, which)
        if self.channels_open() and not self.ready_sent:
            self.ready_sent = True
            self.relay(ready_frame(self.gen))  # READY always on the server path
        self.maybe_upgrade()

    def arm_connect_timer(self, pc):
        self.disarm_connect_timer()

        def expired():
            if self.pc is pc and not self.connected:
                self.failure(self.gen, f"not connected within {CONNECT_TIMEOUT:.0f}s")

        self.connect_timer = asyncio.get_running_loop().call_later(CONNECT_TIMEOUT, expired)

    def disarm_connect_timer(self):
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None

    def close_pc(self):
        pc = self.pc
        self.pc = self.r = self.u = self.u2 = self.u2_in = None
        self.r_open = self.u_open = self.u2_open = self.u2_in_open = self.connected = False
        self.version = 0
        self.u2_reliable = False
        self.disarm_connect_timer()
        if self.dead_timer is not None:
            self.dead_timer.cancel()
            self.dead_timer = None
        if pc is not None:
            self.spawn(pc.close())

    def failure(self, gen, reason):
        """A failed direct-path attempt of generation `gen` (§7.4 step 5 / responder step 3)."""
        if self.closed or gen != self.gen or self.pc is None:
            return
        log.info("%s: gen %d failed: %s", self.name, gen, reason)
        out(f"direct_failed {self.name} {reason}")
        self.downgrade()
        self.close_pc()
        if self.initiator and not self.declined:
            delay = self.backoff
            self.backoff = min(self.backoff * 2, 5.0 if self.had_direct else 60.0)
            self.schedule_start(delay)

    def schedule_start(self, delay):
        if self.retry_handle is not None:
            self.retry_handle.cancel()
        self.retry_handle = asyncio.get_running_loop().call_later(
            delay, lambda: self.spawn(self.start())
        )

    async def start(self):
        """Initiator: a new generation (§7.4 step 2)."""
        self.retry_handle = None
        if self.closed or self.declined:
            return
        self.close_pc()
        self.gen += 1
        gen = self.gen
        try:
            pc = self.new_pc()
            offer = await pc.createOffer()
            if self.pc is not pc:
                return
            await pc.setLocalDescription(offer)  # aiortc gathers every candidate here
            if self.pc is not pc:
                return
            # aiortc does not trickle: the local description carries the candidates.
            self.signal(self.with_version({"kind": "offer", "gen": gen, "sdp": pc.localDescription.sdp}))
            self.arm_connect_timer(pc)
            log.info("%s: gen %d offer sent", self.name, gen)
        except Exception as e:
            log.warning("%s: gen %d offer failed: %r", self.name, gen, e)
            self.failure(gen, f"offer failed: {e}")

    # ---- signals (§7.2) ------------------------------------------------------------------

    def with_version(self, data):
        """An offer or answer with our link protocol version (a v1 peer sends none)."""
        if self.s.link_version >= 2:
            data["version"] = self.s.link_version
        return data

    async def signal_loop(self):
        while True:
            data = await self.signals.get()
            try:
                await self.on_signal(data)
            except Exception as e:
                log.warning("%s: signal %r failed: %r", self.name, data.get("kind"), e)

    async def on_signal(self, data):
        if self.closed:
            return
        if not isinstance(data, dict) or not isinstance(data.get("gen"), int):
            log.warning("%s: malformed signal ignored: %r", self.name, data)
            return
        kind, gen = data.get("kind"), data["gen"]
        if kind == "offer":
            u2_reliable = data.get("u2_reliable") is True
            await self.on_offer(gen, data.get("sdp"), signaled_version(data), u2_reliable)
        elif kind == "answer":
            if not self.initiator or gen != self.gen or self.pc is None:
                return
            sdp = data.get("sdp")
            if not isinstance(sdp, str):
                return
            pc = self.pc
            self.version = min(self.s.link_version, signaled_version(data))
            self.u2_reliable = data.get("u2_reliable") is True
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
                if self.pc is pc and self.version >= 2:
                    self.open_u2(pc)
            except Exception as e:
                self.failure(gen, f"answer failed: {e}")
                return
            if self.pc is pc:
                self.remote_set = True
                await self.add_pending_candidates(pc)
        elif kind == "candidate":
            if gen != self.gen or self.pc is None:
                return
            await self.on_candidate(data)
        elif kind == "decline":
            if not self.initiator or gen != self.gen:
                return
            log.info("%s: peer declined direct paths", self.name)
            out(f"declined {self.name}")
            self.declined = True
            if self.retry_handle is not None:
                self.retry_handle.cancel()
                self.retry_handle = None
            self.downgrade()
            self.close_pc()
        else:
            log.warning("%s: unknown signal kind %r ignored", self.name, kind)

    async def on_offer(self, gen, sdp, version, u2_reliable):
        if not self.s.direct:
            self.signal({"kind": "decline", "gen": gen})
            out(f"declining {self.name} {gen}")
            return
        if self.initiator or not isinstance(sdp, str) or gen <= self.gen:
            return
        self.downgrade()
        self.close_pc()
        self.gen = gen
        self.version = min(self.s.link_version, version)
        self.u2_reliable = u2_reliable
        try:
            pc = self.new_pc()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if self.pc is not pc:
                return
            self.remote_set = True
            await self.add_pending_candidates(pc)
            answer = await pc.createAnswer()
            if self.pc is not pc:
                return
            await pc.setLocalDescription(answer)
            if self.pc is not pc:
                return
            if self.version >= 2:
                self.open_u2(pc)
            self.signal(self.with_version({"kind": "answer", "gen": gen, "sdp": pc.localDescription.sdp}))
            self.arm_connect_timer(pc)
            log.info("%s: gen %d answer sent", self.name, gen)
        except Exception as e:
            log.warning("%s: gen %d answer failed: %r", self.name, gen, e)
            self.failure(gen, f"offer failed: {e}")

    async def on_candidate(self, data):
        text = data.get("candidate")
        if not isinstance(text, str) or not text.strip():
            return  # end-of-candidates
        text = text.strip()
        if text.startswith("candidate:"):
            text = text[len("candidate:"):]
        try:
            cand = candidate_from_sdp(text)
        except Exception as e:
            log.warning("%s: bad candidate %r ignored: %r", self.name, text, e)
            return
        self.signaled_types[(cand.ip, cand.port)] = cand.type
        cand.sdpMid = data.get("sdpMid") or None
        index = data.get("sdpMLineIndex")
        cand.sdpMLineIndex = index if isinstance(index, int) else None
        if self.remote_set:
            await self.add_candidate(self.pc, cand)
        else:
            self.pending_candidates.append(cand)

    async def add_pending_candidates(self, pc):
        pending, self.pending_candidates = self.pending_candidates, []
        for cand in pending:
            await self.add_candidate(pc, cand)

    async def add_candidate(self, pc, cand):
        # Normalise the mid (§7.2): aiortc drops candidates whose mid is not the SCTP mid.
        mid = application_mid(pc.remoteDescription.sdp) if pc.remoteDescription else None
        if mid is not None and cand.sdpMid != mid:
            cand.sdpMid = mid
            cand.sdpMLineIndex = 0
        if self.s.loopback_only and not (cand.ip.startswith("127.") or cand.ip == "::1"):
            log.info("%s: non-loopback candidate %s ignored (--loopback-only)", self.name, cand.ip)
            return
        try:
            await pc.addIceCandidate(cand)
        except Exception as e:
            log.warning("%s: addIceCandidate failed: %r", self.name, e)

    # ---- end -----------------------------------------------------------------------------

    def close(self):
        """Discard the link (§7.1): nothing goes on the wire."""
        if self.closed:
            return
        self.closed = True
        self.window_free.set()
        for handle in (self.ack_timer, self.retry_handle, self.connect_timer, self.dead_timer):
            if handle is not None:
                handle.cancel()
        pc = self.pc
        self.pc = None
        if pc is not None:
            asyncio.create_task(pc.close())
        for task in self.tasks:
            task.cancel()


class Session:
    """The session with the server (§2, §3)."""

    def __init__(self, args):
        self.url = args.server
        self.name = args.name
        self.group = args.group
        self.direct = not args.no_direct
        self.loopback_only = args.loopback_only
        self.link_version = args.link_version
        self.dead_path_timeout = args.dead_path_timeout
        self.ws = None
        self.peer_id = None
        self.ice_servers = []
        self.max_frame = 65600
        self.heartbeat = 5.0
        self.links = {}  # peer id -> Link
        self.groups = {}  # group -> set of peer ids
        self.outgoing = asyncio.Queue()  # (text or bytes), written in order by one task
        self.done = asyncio.get_running_loop().create_future()

    # ---- output to the server ------------------------------------------------------------

    def send_json(self, obj):
        self.send_raw(json.dumps(obj, separators=(",", ":")))

    def send_binary(self, frame):
        self.send_raw(frame)

    def send_raw(self, message):
        size = len(message.encode("utf-8")) if isinstance(message, str) else len(message)
        if size > self.max_frame:
            raise ValueError(f"frame of {size} bytes exceeds max_frame_bytes {self.max_frame}")
        self.outgoing.put_nowait(message)

    async def writer(self):
        while True:
            message = await self.outgoing.get()
            await self.ws.send(message)

    async def heartbeat_loop(self):
        n = 0
        while True:
            n += 1
            self.send_json({"type": "ping", "id": n})
            await asyncio.sleep(self.heartbeat)

    # ---- session -------------------------------------------------------------------------

    async def run(self):
        async with connect(
            self.url, compression=None, ping_interval=None, max_size=1 << 20
        ) as ws:
            self.ws = ws
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await ws.send(json.dumps({"type": "hello", "version": PROTOCOL_VERSION, "name": self.name}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("type") == "welcome":
                    break
                if msg.get("type") == "error":
                    raise RuntimeError(f"hello refused: {msg.get('code')}: {msg.get('message')}")
            if msg.get("version") != PROTOCOL_VERSION:
                raise RuntimeError(f"server speaks protocol version {msg.get('version')}")
            self.peer_id = msg["peer"]
            self.ice_servers = msg.get("ice_servers") or []
            self.max_frame = msg.get("limits", {}).get("max_frame_bytes", self.max_frame)
            self.heartbeat = max(0.1, msg.get("heartbeat_interval_ms", 5000) / 1000)
            out(f"welcome {self.peer_id}")
            tasks = [
                asyncio.create_task(self.writer()),
                asyncio.create_task(self.heartbeat_loop()),
                asyncio.create_task(self.reader()),
                asyncio.create_task(self.commands()),
            ]
            self.send_json({"type": "join", "group": self.group})
            for t in tasks:
                t.add_done_callback(self._task_done)
            try:
                return await self.done
            finally:
                for t in tasks:
                    t.cancel()
                for link in list(self.links.values()):
                    link.close()
                self.links.clear()

    def _task_done(self, task):
        if self.done.done():
            return
        if task.cancelled():
            self.done.set_result("cancelled")
        elif task.exception() is not None:
            self.done.set_result(f"{type(task.exception()).__name__}: {task.exception()}")
        else:
            self.done.set_result(task.result() or "done")

    async def reader(self):
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.on_relay(message)
                else:
                    self.on_json(message)
        except websockets.ConnectionClosed as e:
            return f"connection closed: {e}"
        return "connection closed"

    def on_relay(self, frame):
        if len(frame) < 9 or frame[0] != RELAY_KIND_DATA:
            log.warning("bad relay frame from the server (%d bytes)", len(frame))
            return
        peer, link_id = struct.unpack_from(">II", frame, 1)
        link = self.links.get(peer)
        if link is None or link.link_id != link_id:
            return  # a late frame of an ended link (§4)
        link.on_frame(frame[9:], direct=False)

    def on_json(self, text):
        try:
            msg = json.loads(text)
        except ValueError:
            log.warning("bad JSON from the server: %r", text[:200])
            return
        t = msg.get("type")
        if t == "joined":
            self.groups.setdefault(msg["group"], set())
            out(f"group {msg['group']}")
            for member in msg["members"]:
                self.add_member(msg["group"], member)
        elif t == "member_joined":
            self.add_member(msg["group"], msg["member"])
        elif t == "member_left":
            self.remove_member(msg["group"], msg["peer"])
        elif t == "left":
            for peer in list(self.groups.get(msg["group"], ())):
                self.remove_member(msg["group"], peer)
            self.groups.pop(msg["group"], None)
        elif t == "signal":
            link = self.links.get(msg.get("from"))
            if link is None or link.link_id != msg.get("link"):
                return
            link.signals.put_nowait(msg.get("data"))
        elif t == "ice_servers":
            self.ice_servers = msg.get("ice_servers") or []
        elif t == "pong":
            pass
        elif t == "error":
            code = msg.get("code")
            link = self.links.get(msg.get("peer"))
            if code == "direct_not_allowed" and link is not None:
                link.no_direct()
                return
            if code in ("not_co_member", "stale_link") and msg.get("request") in ("signal", "relay"):
                if msg.get("peer") not in self.links:
                    log.debug("race: %s", msg)
                    return
            log.warning("server error: %s", msg)
            out(f"error {code} {msg.get('message')}")
        else:
            log.debug("unknown server message type %r ignored", t)

    def add_member(self, group, info):
        peer, name, link_id = info["peer"], info["name"], info["link"]
        self.groups.setdefault(group, set()).add(peer)
        link = self.links.get(peer)
        if link is not None and link.link_id != link_id:
            link.close()
            out(f"left {link.name} {peer}")
            link = None
        if link is None:
            link = Link(
                self, peer, name, link_id, bool(info["initiator"]), info.get("direct", "any")
            )
            self.links[peer] = link
            out(f"joined {name} {peer}")
        link.groups.add(group)

    def remove_member(self, group, peer):
        self.groups.get(group, set()).discard(peer)
        link = self.links.get(peer)
        if link is None:
            return
        link.groups.discard(group)
        if not link.groups:
            link.close()
            del self.links[peer]
            out(f"left {link.name} {peer}")

    # ---- commands from stdin -------------------------------------------------------------

    def find(self, who):
        for link in self.links.values():
            if link.name == who:
                return link
        if who.isdigit():
            return self.links.get(int(who))
        return None

    async def commands(self):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 22)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            raw = await reader.readline()
            if not raw:
                return "end of input"
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            parts = line.split(" ", 2)
            cmd = parts[0]
            if cmd == "quit":
                return "quit"
            if cmd not in ("send", "usend", "usend_many", "stats", "path") or len(parts) < 2:
                out(f"bad_command {line}")
                continue
            link = self.find(parts[1])
            if link is None:
                out(f"unknown_peer {parts[1]}")
                continue
            text = parts[2] if len(parts) > 2 else ""
            if cmd == "send":
                await link.send_reliable(text.encode("utf-8"))
            elif cmd == "usend":
                try:
                    link.send_unreliable(text.encode("utf-8"))
                except ValueError as e:
                    out(f"bad_command {e}")
            elif cmd == "usend_many":
                try:
                    count, size, pace = (int(x) for x in text.split(" "))
                except ValueError:
                    out(f"bad_command {line}")
                    continue
                link.spawn(self.usend_many(link, count, size, pace / 1000))
            elif cmd == "path":
                out(f"path {link.name} {link.path}")
            elif cmd == "stats":
                fields = dict(link.stats)
                fields["delivered"] = link.delivered
                fields["unacked"] = len(link.unacked)
                fields["gen"] = link.gen
                fields["peer_ready"] = link.peer_ready
                fields["version"] = link.version
                fields["u2_reliable"] = int(link.u2_reliable)  # the peer asked for it
                out(f"stats {link.name} " + " ".join(f"{k}={v}" for k, v in sorted(fields.items())))


    async def usend_many(self, link, count, size, pace):
        """`count` unreliable messages of `size` bytes: "<i> " padded with x."""
        for i in range(count):
            if link.closed:
                return
            head = f"{i} ".encode()
            try:
                link.send_unreliable(head + b"x" * max(0, size - len(head)))
            except ValueError as e:
                out(f"bad_command {e}")
                return
            await asyncio.sleep(pace)
        # Done once they have left the channel's buffer for the SCTP association (aiortc moves
        # the next message there only when the association's queue is empty).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not link.closed:
            ch = link.unreliable_channel() if link.is_direct() else None
            if ch is None or ch.bufferedAmount == 0:
                break
            await asyncio.sleep(0.01)
        out(f"usent {link.name} {count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="ws://host:port/ws")
    parser.add_argument("--name", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--no-direct", action="store_true", help="decline direct paths")
    parser.add_argument(
        "--loopback-only",
        action="store_true",
        help="gather ICE host candidates on 127.0.0.1 only and ignore remote non-loopback ones",
    )
    parser.add_argument(
        "--link-version",
        type=int,
        choices=(1, 2),
        default=LINK_VERSION,
        help="link protocol version to speak (1: a pure version 1 peer)",
    )
    parser.add_argument(
        "--dead-path-timeout",
        type=float,
        default=DEAD_PATH_TIMEOUT,
        help="seconds without any frame on a direct path before it is given up (§8.7; not with "
        "--link-version 1)",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"[peer.py {args.name}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Local ICE choice (like the reference client's short ICE timeouts, §7.3): aioice checks
    # consent every 5 s and gives up after 6 failures, so a cut path would only be noticed after
    # about 30 s; check every second and give up after 3 failures instead.
    aioice.ice.CONSENT_INTERVAL = 1
    aioice.ice.CONSENT_FAILURES = 3
    if args.loopback_only:
        # aioice skips 127.0.0.1 when it lists host addresses; use exactly loopback instead.
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

    async def run():
        reason = await Session(args).run()
        out(f"closed {reason}")

    asyncio.run(run())


if __name__ == "__main__":
    main()
