// Unit checks of peermesh.js's link protocol v2 pieces that need no browser: UNRELIABLE_PART
// framing, reassembly (expiry, cap, drop rules, deliver once), the direct-path 1024-byte rule,
// msg wrap-around, the dead-path rule, and the v2 channel set-up (each end opens its own "u2",
// reliable if the peer asks for it; READY waits for both; a v1 peer gets none), and the direct
// policies (relay-only PeerConnections that signal and take relay candidates only, 'none' links
// that never signal and decline, tightening), acks of membership changes and path reports; and
// lanes (link protocol v3: the frame examples of §8.8.1, drop rules, the sequenced receiver,
// VERSION negotiation and lane 0 for old peers, the schedule, window reserves); and file transfer
// (link protocol v4: the incremental SHA-256, offered names, the §8.9 messages, transfers between
// two clients wired together, the file lane's window). Run
// by interop-tests/tests/browser.rs
// (`peermesh_js_link_v2_units`), or by hand: node interop-tests/browser/unit.mjs
import assert from 'node:assert/strict';
import { _internals, LINK_VERSION, MAX_UNRELIABLE_SIZE } from '../../signaling-server/static/peermesh.js';

const {
  partFrames,
  PartReassembly,
  Link,
  Client,
  K_PART,
  PART_BYTES,
  MAX_PARTS,
  strictest,
  ownPolicy,
  filterSdp,
  relayCandidate,
} = _internals;
let checks = 0;
const check = (name, f) => {
  f();
  checks++;
  process.stdout.write(`ok ${name}\n`);
};
const pattern = (n, salt = 0) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + salt) % 251);
const hex = (b) => Buffer.from(b).toString('hex');
const newStats = () => ({ partsDropped: 0, partsExpired: 0, unreliableJoined: 0 });
const part = (msg, index, count, bytes) => {
  const f = new Uint8Array(9 + bytes.length);
  const dv = new DataView(f.buffer);
  f[0] = K_PART;
  dv.setUint32(1, msg);
  dv.setUint16(5, index);
  dv.setUint16(7, count);
  f.set(bytes, 9);
  return f;
};

check('constants', () => {
  assert.equal(LINK_VERSION, 4);
  assert.equal(K_PART, 0x16);
  assert.equal(PART_BYTES, 1015);
  assert.equal(MAX_PARTS, 17);
});

check('the 2000-byte example of the spec', () => {
  const msg = pattern(2000);
  const f = partFrames(1, msg);
  assert.equal(f.length, 2);
  assert.equal(hex(f[0].subarray(0, 9)), '16' + '00000001' + '0000' + '0002');
  assert.equal(hex(f[1].subarray(0, 9)), '16' + '00000001' + '0001' + '0002');
  assert.equal(f[0].length, 9 + 1015);
  assert.equal(f[1].length, 9 + 985);
  assert.deepEqual(Buffer.concat([f[0].subarray(9), f[1].subarray(9)]), Buffer.from(msg));
});

check('every part of a 16384-byte message fits in 1024 bytes', () => {
  const f = partFrames(7, pattern(16384));
  assert.equal(f.length, 17);
  for (const x of f) assert.ok(x.length <= 1024);
  assert.equal(f[16].length, 9 + 16384 - 16 * 1015);
});

check('reassembly in any order, delivered once', () => {
  const stats = newStats();
  const r = new PartReassembly(stats, () => 0);
  const msg = pattern(16384, 3);
  const f = partFrames(42, msg);
  const order = [...f.keys()].reverse();
  let got = null;
  for (const i of order) {
    const out = r.push(f[i]);
    if (i !== order[order.length - 1]) assert.equal(out, null);
    else got = out;
  }
  assert.deepEqual(got, msg);
  assert.equal(stats.unreliableJoined, 1);
  // A late copy of a part of a delivered message is not the start of a new one.
  assert.equal(r.push(f[3]), null);
  assert.equal(r.msgs.size, 0);
  assert.equal(r.held, 0);
  assert.equal(stats.partsDropped, 1);
});

check('drop rules', () => {
  const stats = newStats();
  const r = new PartReassembly(stats, () => 0);
  const b = pattern(1015);
  assert.equal(r.push(part(1, 2, 2, b)), null); // index >= count
  assert.equal(r.push(part(1, 0, 1, b)), null); // count < 2
  assert.equal(r.push(part(1, 0, 18, b)), null); // count > 17
  assert.equal(r.push(new Uint8Array([K_PART, 0, 0, 0])), null); // too short
  assert.equal(r.push(part(1, 0, 2, pattern(1016))), null); // part longer than 1015
  assert.equal(stats.partsDropped, 5);
  assert.equal(r.msgs.size, 0);
  assert.equal(r.push(part(2, 0, 3, b)), null);
  assert.equal(r.push(part(2, 1, 4, b)), null); // count differs from the first part's
  assert.equal(r.push(part(2, 0, 3, b)), null); // repeated index
  assert.equal(stats.partsDropped, 7);
  // Longer than 16384 in all: 17 parts of 1015 would be 17255 bytes.
  for (let i = 0; i < 16; i++) assert.equal(r.push(part(3, i, 17, b)), null);
  assert.equal(r.push(part(3, 16, 17, b)), null);
  assert.equal(stats.partsDropped, 8);
  // The rest completes normally.
  const whole = r.push(part(2, 1, 3, b)) ?? r.push(part(2, 2, 3, pattern(10)));
  assert.equal(whole.length, 2 * 1015 + 10);
});

check('incomplete messages expire 1 s after their first part', () => {
  let now = 0;
  const stats = newStats();
  const r = new PartReassembly(stats, () => now);
  const f = partFrames(5, pattern(3000));
  r.push(f[0]);
  now = 600;
  r.push(f[1]);
  now = 1000;
  assert.equal(r.push(f[2]), null); // too late: the message was discarded, and this part with it
  assert.equal(stats.partsExpired, 1);
  assert.equal(stats.partsDropped, 1);
  assert.equal(r.held, 0);
  now = 2000;
  r.expire();
  assert.equal(r.msgs.size, 0);
  assert.equal(r.held, 0);
  assert.equal(stats.partsExpired, 1); // counted once
  // Within the second it completes.
  const g = partFrames(6, pattern(3000, 1));
  now = 5000;
  r.push(g[2]);
  r.push(g[0]);
  now = 5999;
  assert.deepEqual(r.push(g[1]), pattern(3000, 1));
});

check('at most 256 KiB held (bytes + 64 a part), the oldest message evicted first', () => {
  const stats = newStats();
  const r = new PartReassembly(stats, () => 0);
  const msgs = [];
  for (let m = 1; m <= 16; m++) msgs.push(partFrames(m, pattern(16384, m)));
  // 16 parts of each of 15 messages: 240 * 1079 = 258960.
  for (let m = 0; m < 15; m++) for (let i = 0; i < 16; i++) r.push(msgs[m][i]);
  assert.equal(r.held, 15 * 16 * (1015 + 64));
  assert.equal(stats.partsExpired, 0);
  // Message 16: its third part no longer fits, so message 1 goes.
  for (let i = 0; i < 3; i++) r.push(msgs[15][i]);
  assert.equal(stats.partsExpired, 1);
  assert.ok(!r.msgs.has(1));
  assert.ok(r.held <= 256 << 10);
  // Message 2 still completes; message 1 does not.
  assert.deepEqual(r.push(msgs[1][16]), pattern(16384, 2));
  assert.equal(r.push(msgs[0][16]), null);
});

// A Link with a fake client and fake channels (no RTCPeerConnection in node).
function fakeLink({ initiator = false, deadPathTimeoutMs = 3000, policy = 'any' } = {}) {
  const relayed = [];
  const events = [];
  const client = {
    direct: true,
    sendWindow: 8 << 20,
    maxMessageSize: 8 << 20,
    deadPathTimeoutMs,
    iceServers: [],
    _sendBinary: (b) => relayed.push(b.slice(9)),
    _sendJson: () => {},
    _emit: (type, detail) => events.push({ type, detail }),
  };
  const link = new Link(client, 2, 9, initiator, 'peer', policy);
  relayed.length = 0; // the first PING
  const channel = (label) => ({
    label,
    readyState: 'open',
    bufferedAmount: 0,
    sent: [],
    send(f) {
      this.sent.push(f.slice());
    },
    close() {},
  });
  return { link, relayed, events, channel };
}

check('v2 direct: whole frames up to 1024 bytes, parts beyond, msg wraps to 0', () => {
  const { link, relayed, channel } = fakeLink();
  link.path = 'direct host/host';
  link.version = 2;
  link.u = channel('u');
  link.u2 = channel('u2');
  link.sendUnreliable(pattern(1023));
  assert.equal(link.u2.sent.length, 1);
  assert.equal(link.u2.sent[0].length, 1024);
  assert.equal(link.u2.sent[0][0], 0x12);
  link.nextPartMsg = 0xffffffff;
  link.sendUnreliable(pattern(1024));
  link.sendUnreliable(pattern(16384));
  const parts = link.u2.sent.slice(1);
  assert.equal(parts.length, 2 + 17);
  for (const f of parts) assert.ok(f.length <= 1024 && f[0] === K_PART);
  const dv = (f) => new DataView(f.buffer, f.byteOffset);
  assert.equal(dv(parts[0]).getUint32(1), 0xffffffff);
  assert.equal(dv(parts[2]).getUint32(1), 0);
  assert.equal(link.nextPartMsg, 1);
  assert.equal(link.u.sent.length, 0);
  assert.equal(relayed.length, 0);
  // PING goes on "u2".
  link.sendPing();
  assert.equal(link.u2.sent.at(-1)[0], 0x13);
  // On the server path: whole UNRELIABLE frames, up to 16384.
  link.path = 'server';
  link.sendUnreliable(pattern(16384));
  assert.equal(relayed.length, 1);
  assert.equal(relayed[0].length, 16385);
  // The receiver side takes the parts from any path.
  const got = [];
  link.c._emit = (type, d) => type === 'message' && got.push(d.data);
  for (const f of parts.slice(2)) link.onFrame(f, false);
  assert.equal(got.length, 1);
  assert.deepEqual(got[0], pattern(16384));
  link._close();
});

check('a resync while direct sends again on the server path what last went there, and READY', () => {
  const { link, relayed, channel } = fakeLink();
  link.sendReliable(new TextEncoder().encode('before'), false, 0); // on the server path; a cut may take it
  assert.ok(relayed.some((f) => f[0] === 0x10));
  link.path = 'direct host/host';
  link.version = 2;
  link.r = channel('r');
  link.u = channel('u');
  link.u2 = channel('u2');
  link.readySent = true;
  link.gen = 1;
  link.sendReliable(new TextEncoder().encode('after'), false, 0); // on "r"
  assert.equal(link.r.sent.filter((f) => f[0] === 0x10).length, 1);
  relayed.length = 0;
  link.resync();
  const data = relayed.filter((f) => f[0] === 0x10);
  assert.deepEqual(data.map((f) => new TextDecoder().decode(f.subarray(10))), ['before']);
  assert.ok(relayed.some((f) => f[0] === 0x15 && f[4] === 1), 'READY of generation 1 again');
  link._close();
});

check('v1 direct: whole frames on "u", any size', () => {
  const { link, relayed, channel } = fakeLink();
  link.path = 'direct host/host';
  link.version = 1;
  link.u = channel('u');
  link.sendUnreliable(pattern(16384));
  assert.equal(link.u.sent.length, 1);
  assert.equal(link.u.sent[0].length, 16385);
  assert.equal(relayed.length, 0);
  link._close();
});

check('a split message whose direct send fails goes on as parts on the server path', () => {
  const { link, relayed, channel } = fakeLink();
  link.path = 'direct host/host';
  link.version = 2;
  link.u = channel('u');
  link.u2 = channel('u2');
  let n = 0;
  link.u2.send = () => {
    if (++n === 3) throw new Error('boom');
  };
  link.sendUnreliable(pattern(5000));
  assert.equal(link.path, 'server');
  assert.equal(relayed.filter((f) => f[0] === K_PART).length, 5 - 2);
  link._close();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A fake RTCPeerConnection (node has none): records the channels made and what was signaled.
class FakePc {
  constructor(config) {
    this.config = config;
    this.added = [];
    this.channels = [];
    this.closed = false;
    FakePc.last = this;
  }
  createDataChannel(label, options) {
    const ch = {
      label,
      options,
      // set when it was made: the local and remote descriptions then
      descriptions: [this.localDescription?.type, this.remoteDescription?.type],
      readyState: 'connecting',
      bufferedAmount: 0,
      sent: [],
      closed: false,
      send(f) {
        this.sent.push(f.slice());
      },
      close() {
        this.closed = true;
      },
    };
    this.channels.push(ch);
    return ch;
  }
  async createOffer() {
    return { type: 'offer', sdp: FakePc.sdp ?? 'v=0 offer' };
  }
  async createAnswer() {
    return { type: 'answer', sdp: FakePc.sdp ?? 'v=0 answer' };
  }
  async setLocalDescription(d) {
    this.localDescription = d;
    this.events?.push(`local ${d.type}`);
  }
  async setRemoteDescription(d) {
    this.remoteDescription = d;
    this.events?.push(`remote ${d.type}`);
  }
  async addIceCandidate(c) {
    this.added.push(c.candidate);
  }
  close() {
    this.closed = true;
  }
}
globalThis.RTCPeerConnection = FakePc;

// Opens a channel (fake or peer-announced) and tells the link.
const open = (ch) => {
  ch.readyState = 'open';
  ch.onopen?.();
};
// A peer-announced in-band channel.
const announced = (label) => ({
  label,
  readyState: 'open',
  bufferedAmount: 0,
  sent: [],
  closed: false,
  close() {
    this.closed = true;
  },
});

// Link v2 channel set-up (section 7.6), run for both roles and both u2 options.
for (const [initiator, u2Reliable] of [
  [false, false],
  [false, true],
  [true, false],
  [true, true],
]) {
  const { link, relayed } = fakeLink({ initiator });
  const signals = [];
  link.c._sendJson = (m) => signals.push(m.data);
  let pc;
  if (initiator) {
    await link.start();
    pc = FakePc.last;
    assert.equal(signals[0].kind, 'offer');
    assert.equal(signals[0].version, LINK_VERSION);
    assert.equal('u2_reliable' in signals[0], false, 'the JS client never asks for a reliable u2');
    // No "u2" before the answer.
    assert.deepEqual(pc.channels.map((c) => c.label), ['r', 'u']);
    const answer = { kind: 'answer', gen: link.gen, sdp: 'x', version: 2 };
    if (u2Reliable) answer.u2_reliable = true;
    await link.onSignal(answer);
  } else {
    const offer = { kind: 'offer', gen: 1, sdp: 'x', version: 2 };
    if (u2Reliable) offer.u2_reliable = true;
    await link.onSignal(offer);
    pc = FakePc.last;
    assert.equal(signals[0].kind, 'answer');
    assert.equal(signals[0].version, LINK_VERSION);
    assert.equal('u2_reliable' in signals[0], false, 'the JS client never asks for a reliable u2');
  }
  const [r, u, u2, ...more] = pc.channels;
  assert.deepEqual([r.label, u.label, u2?.label, more.length], ['r', 'u', 'u2', 0]);
  assert.deepEqual(r.options, { negotiated: true, id: 0, ordered: true });
  assert.deepEqual(u2.options, u2Reliable ? { ordered: false } : { ordered: false, maxRetransmits: 0 });
  assert.equal(link.u2, u2);
  // The initiator opens it once the answer is applied, the responder once its answer is set.
  assert.deepEqual(u2.descriptions, initiator ? ['offer', 'answer'] : ['answer', 'offer']);
  // The peer's "u2" is taken (once); any other in-band channel is closed, a second "u2" too.
  const peerU2 = announced('u2');
  const other = announced('x');
  const second = announced('u2');
  pc.ondatachannel({ channel: peerU2 });
  pc.ondatachannel({ channel: other });
  pc.ondatachannel({ channel: second });
  assert.equal(link.u2In, peerU2);
  assert.deepEqual([peerU2.closed, other.closed, second.closed], [false, true, true]);
  // READY once "r", "u", this end's "u2" and the peer's "u2" are open.
  const ready = () => relayed.filter((f) => f[0] === 0x15).length;
  open(r);
  open(u);
  assert.equal(ready(), 0, 'READY before this end\'s u2 is open');
  open(u2);
  assert.equal(ready(), 1);
  // Frames from the peer's "u2" are received; this end sends only on its own.
  link.path = 'direct host/host';
  link.sendUnreliable(pattern(10));
  assert.equal(u2.sent.length, 1);
  assert.equal(peerU2.sent.length + u.sent.length, 0);
  const got = [];
  link.c._emit = (type, d) => type === 'message' && got.push(d.data);
  const frame = new Uint8Array([0x12, 1, 2, 3]);
  peerU2.onmessage({ data: frame.buffer });
  assert.deepEqual(got, [Uint8Array.from([1, 2, 3])]);
  link._close();
  checks++;
  process.stdout.write(`ok v2 channels, ${initiator ? 'initiator' : 'responder'}, u2 ${u2Reliable ? 'reliable' : 'unreliable'}\n`);
}

{
  // READY waits for the peer's "u2" too (here it arrives last).
  const { link, relayed } = fakeLink();
  await link.onSignal({ kind: 'offer', gen: 1, sdp: 'x', version: 2 });
  const [r, u, u2] = FakePc.last.channels;
  for (const ch of [r, u, u2]) open(ch);
  const ready = () => relayed.filter((f) => f[0] === 0x15).length;
  assert.equal(ready(), 0, 'READY before the peer\'s u2 arrived');
  FakePc.last.ondatachannel({ channel: announced('u2') });
  assert.equal(ready(), 1);
  link._close();
  checks++;
  process.stdout.write('ok v2 READY waits for the peer\'s u2\n');
}

{
  // A v1 peer (no "version"): no "u2" at all, an in-band one is closed, READY on "r" and "u".
  const { link, relayed } = fakeLink();
  const signals = [];
  link.c._sendJson = (m) => signals.push(m.data);
  await link.onSignal({ kind: 'offer', gen: 1, sdp: 'x' });
  const pc = FakePc.last;
  assert.deepEqual(pc.channels.map((c) => c.label), ['r', 'u']);
  const stray = announced('u2');
  pc.ondatachannel({ channel: stray });
  assert.equal(stray.closed, true);
  for (const ch of pc.channels) open(ch);
  assert.equal(relayed.filter((f) => f[0] === 0x15).length, 1);
  link._close();
  checks++;
  process.stdout.write('ok v1 peer: no u2\n');
}

{
  // Dead-path rule: frames keep it alive; silence for deadPathTimeoutMs downgrades and closes.
  const { link, events, channel } = fakeLink({ deadPathTimeoutMs: 300 });
  let closed = 0;
  const pc = { close: () => closed++ };
  link.pc = pc;
  link.path = 'direct host/host';
  link.version = 1; // the rule holds in every generation (section 8.7)
  link.r = channel('r');
  link.u = channel('u');
  link.u2 = channel('u2');
  link.lastDirectRecv = performance.now();
  link.armDeadTimer(pc, 300);
  for (let i = 0; i < 6; i++) {
    await sleep(100);
    link.lastDirectRecv = performance.now(); // a frame arrived
  }
  assert.equal(link.path, 'direct host/host');
  const t0 = performance.now();
  while (link.path !== 'server' && performance.now() - t0 < 2000) await sleep(10);
  const took = performance.now() - t0;
  assert.equal(link.path, 'server');
  assert.ok(took >= 250 && took < 600, `dead path noticed after ${took} ms`);
  assert.equal(closed, 1);
  assert.equal(link.stats.deadPaths, 1);
  assert.ok(events.some((e) => e.type === 'nodirectpath' && /nothing received/.test(e.detail.reason)));
  link._close();
  checks++;
  process.stdout.write(`ok dead-path rule (noticed after ${took.toFixed(0)} ms of silence)\n`);
}

// ---- direct policies, acks, path reports ----

const HOST = 'candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host';
const SRFLX = 'candidate:2 1 udp 1694498815 203.0.113.5 6000 typ srflx raddr 0.0.0.0 rport 0';
const RELAY = 'candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 203.0.113.5 rport 6000 generation 0';
// As a relay-only end sends it: without its related address (its own, as TURN saw it).
const RELAY_SENT = 'candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 0.0.0.0 rport 0 generation 0';
const SDP =
  'v=0\r\nm=application 50000 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 203.0.113.5\r\n' +
  `a=rtcp:9 IN IP4 203.0.113.5\r\na=mid:0\r\na=${HOST}\r\na=${SRFLX}\r\na=${RELAY}\r\na=end-of-candidates\r\n`;
const SDP_RELAY =
  'v=0\r\nm=application 50000 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n' +
  `a=rtcp:9 IN IP4 0.0.0.0\r\na=mid:0\r\na=${RELAY_SENT}\r\na=end-of-candidates\r\n`;
// A local candidate event as a browser fires it.
const iceEvent = (candidate) => ({
  candidate: { candidate, toJSON: () => ({ candidate, sdpMid: '0', sdpMLineIndex: 0 }) },
});

check('policies: strictest, own options, SDP filter', () => {
  assert.equal(strictest('any', 'relay'), 'relay');
  assert.equal(strictest('none', 'relay'), 'none');
  assert.equal(strictest('any', 'any'), 'any');
  assert.equal(strictest('any', 'bogus'), 'none'); // an unknown policy opens nothing
  assert.equal(strictest('any', 'toString'), 'none');
  assert.equal(ownPolicy({}), 'any');
  assert.equal(ownPolicy({ direct: 'relay' }), 'relay');
  assert.equal(ownPolicy({ direct: 'none' }), 'none');
  assert.equal(ownPolicy({ direct: false }), 'none');
  assert.equal(ownPolicy({ direct: true, relayOnly: true }), 'relay');
  assert.throws(() => ownPolicy({ direct: 'sometimes' }), /direct must be/);
  assert.equal(filterSdp(SDP, 'relay'), SDP_RELAY);
  assert.equal(filterSdp(SDP, 'any'), SDP);
  assert.equal(filterSdp(`a=mid:0\na=${HOST}\nc=IN IP6 2001:db8::1\na=rtcp:9\n`, 'relay'), 'a=mid:0\nc=IN IP6 ::\na=rtcp:9\n');
  assert.equal(relayCandidate(RELAY), RELAY_SENT);
  assert.equal(relayCandidate(`a=${RELAY}`), `a=${RELAY_SENT}`);
  assert.equal(relayCandidate('candidate:3 1 udp 1 198.51.100.7 7000 typ relay'), 'candidate:3 1 udp 1 198.51.100.7 7000 typ relay');
  assert.equal(relayCandidate(SRFLX), null);
});

{
  // Relay-only initiator: iceTransportPolicy 'relay', the offer and trickled candidates carry
  // relay addresses only, received host/srflx candidates (in SDP or trickled) are not used.
  FakePc.sdp = SDP;
  const { link } = fakeLink({ initiator: true, policy: 'relay' });
  const signals = [];
  link.c._sendJson = (m) => signals.push(m.data);
  await link.start(); // a second generation: its signals are recorded
  const pc = FakePc.last;
  assert.equal(pc.config.iceTransportPolicy, 'relay');
  assert.equal(pc.localDescription.sdp, SDP, 'the local description is what the browser made');
  assert.equal(signals[0].kind, 'offer');
  assert.equal(signals[0].sdp, SDP_RELAY);
  for (const c of [HOST, SRFLX, RELAY]) pc.onicecandidate(iceEvent(c));
  assert.deepEqual(
    signals.slice(1).map((s) => s.candidate),
    [RELAY_SENT],
  );
  await link.onSignal({ kind: 'answer', gen: link.gen, sdp: SDP, version: 2 });
  assert.equal(pc.remoteDescription.sdp, SDP_RELAY);
  for (const c of [HOST, SRFLX, RELAY]) await link.onSignal({ kind: 'candidate', gen: link.gen, candidate: c });
  assert.deepEqual(pc.added, [RELAY]);
  link._close();
  FakePc.sdp = undefined;
  checks++;
  process.stdout.write('ok relay-only initiator signals and takes relay candidates only\n');
}

{
  // Relay-only responder: the answer too.
  const { link } = fakeLink({ policy: 'relay' });
  const signals = [];
  link.c._sendJson = (m) => signals.push(m.data);
  FakePc.sdp = SDP;
  await link.onSignal({ kind: 'offer', gen: 1, sdp: SDP, version: 2 });
  const pc = FakePc.last;
  assert.equal(pc.config.iceTransportPolicy, 'relay');
  assert.equal(pc.remoteDescription.sdp, SDP_RELAY);
  assert.equal(signals[0].kind, 'answer');
  assert.equal(signals[0].sdp, SDP_RELAY);
  link._close();
  FakePc.sdp = undefined;
  checks++;
  process.stdout.write('ok relay-only responder answers with relay candidates only\n');
}

{
  // 'none': the initiator never makes a PeerConnection, the responder declines every offer and
  // signals nothing else.
  const before = FakePc.last;
  const { link: init } = fakeLink({ initiator: true, policy: 'none' });
  await init.start();
  assert.equal(FakePc.last, before);
  const { link } = fakeLink({ policy: 'none' });
  const signals = [];
  link.c._sendJson = (m) => signals.push(m.data);
  await link.onSignal({ kind: 'offer', gen: 1, sdp: SDP, version: 2 });
  await link.onSignal({ kind: 'offer', gen: 2, sdp: SDP, version: 2 });
  assert.equal(FakePc.last, before);
  assert.deepEqual(signals, [
    { kind: 'decline', gen: 1 },
    { kind: 'decline', gen: 2 },
  ]);
  init._close();
  link._close();
  checks++;
  process.stdout.write('ok none: no PeerConnection, offers declined\n');
}

{
  // Tightening: to 'relay' the initiator starts over relay-only; to 'none' it stops for good
  // (told once), and looser policies change nothing.
  const { link, events } = fakeLink({ initiator: true });
  await sleep(0); // the constructor's start()
  const first = FakePc.last;
  assert.equal(first.config.iceTransportPolicy, 'all');
  link.restrict('relay');
  await sleep(0);
  assert.equal(first.closed, true);
  const second = FakePc.last;
  assert.notEqual(second, first);
  assert.equal(second.config.iceTransportPolicy, 'relay');
  link.restrict('any');
  assert.equal(link.policy, 'relay');
  link.restrict('none', 'the server does not allow a direct path to this peer');
  assert.equal(second.closed, true);
  assert.equal(link.pc, null);
  assert.equal(link.retryTimer, null);
  link.restrict('none', 'again');
  assert.deepEqual(
    events.filter((e) => e.type === 'nodirectpath').map((e) => e.detail.reason),
    ['the server does not allow a direct path to this peer'],
  );
  link._close();
  checks++;
  process.stdout.write('ok tightening a link\'s policy\n');
}

check('path reports follow path events', () => {
  const { link } = fakeLink();
  const sent = [];
  link.c._sendJson = (m) => sent.push(m);
  link.setPath('direct relay/host');
  link.setPath('server');
  assert.deepEqual(sent, [
    { type: 'path', peer: 2, link: 9, path: 'direct', local: 'relay', remote: 'host' },
    { type: 'path', peer: 2, link: 9, path: 'server' },
  ]);
  link._close();
});

{
  // hello carries the client's own policy, except 'any'.
  class FakeWs {
    constructor() {
      this.sent = [];
      FakeWs.last = this;
    }
    send(m) {
      this.sent.push(JSON.parse(m));
    }
    close() {}
  }
  globalThis.WebSocket = FakeWs;
  for (const [options, direct] of [
    [{}, undefined],
    [{ direct: 'relay' }, 'relay'],
    [{ direct: false }, 'none'],
  ]) {
    const c = new Client('ws://127.0.0.1:1/ws', { name: 'me', ...options });
    const handshake = c._handshake();
    FakeWs.last.onopen();
    const hello = FakeWs.last.sent[0];
    assert.equal(hello.type, 'hello');
    assert.equal(hello.direct, direct);
    assert.equal('direct' in hello, direct !== undefined);
    FakeWs.last.onmessage({ data: JSON.stringify({ type: 'welcome', version: 1, peer: 5, ice_servers: [] }) });
    await handshake;
    c._end(1000, 'done', true);
  }
  delete globalThis.WebSocket;
  checks++;
  process.stdout.write('ok hello carries the own policy\n');
}

check('a client: member direct, acks, quiet report errors, direct_not_allowed', () => {
  const c = new Client('ws://127.0.0.1:1/ws', { name: 'me', direct: 'relay' });
  const sent = [];
  const seen = [];
  c._sendJson = (m) => sent.push(m);
  for (const t of ['memberjoined', 'memberleft', 'error', 'nodirectpath']) c.on(t, (d) => seen.push({ t, ...d }));
  let joined;
  c._pendingJoins.set('g', { resolve: (v) => (joined = v), reject: assert.fail });
  c._onText(JSON.stringify({ type: 'joined', group: 'g', change: 7, members: [{ peer: 2, name: 'p', link: 5, initiator: false }] }));
  assert.deepEqual(joined, [{ peer: 2, name: 'p', user: null, direct: 'relay' }]);
  assert.deepEqual(c.members('g'), joined);
  assert.deepEqual(seen.shift(), { t: 'memberjoined', group: 'g', peer: 2, name: 'p', user: null, direct: 'relay' });
  c._onText(JSON.stringify({ type: 'member_joined', group: 'g', member: { peer: 3, name: 'q', link: 6, initiator: false, direct: 'none' } }));
  assert.equal(seen.shift().direct, 'none');
  c._onText(JSON.stringify({ type: 'member_joined', group: 'g', member: { peer: 4, name: 'r', link: 7, initiator: false } }));
  assert.equal(seen.shift().direct, 'relay');
  c._onText(JSON.stringify({ type: 'member_left', group: 'g', peer: 4, change: 9 }));
  assert.deepEqual(seen.shift(), { t: 'memberleft', group: 'g', peer: 4, name: 'r' });
  // Acks after the events, with the group and number; none for frames without a number.
  assert.deepEqual(
    sent.filter((m) => m.type === 'ack'),
    [
      { type: 'ack', group: 'g', change: 7 },
      { type: 'ack', group: 'g', change: 9 },
    ],
  );
  // Refused reports are not the app's business; direct_not_allowed closes the pair's direct path.
  c._onText(JSON.stringify({ type: 'error', code: 'stale_link', message: 'x', request: 'path', peer: 2 }));
  c._onText(JSON.stringify({ type: 'error', code: 'not_member', message: 'x', request: 'ack', group: 'g' }));
  c._onText(JSON.stringify({ type: 'error', code: 'direct_not_allowed', message: 'x', request: 'signal', peer: 2 }));
  assert.equal(c._links.get(2).policy, 'none');
  assert.deepEqual(seen, []);
  c._onText(JSON.stringify({ type: 'left', group: 'g', change: 10 }));
  assert.deepEqual(sent.at(-1), { type: 'ack', group: 'g', change: 10 });
  c._end(1000, 'done', true);
});

// ---- lanes (link protocol version 3, docs/PROTOCOL.md §8.8) ----

{
  const { laneDataFrame, ackFrame, versionFrame, seqFrames, decodeFrame, newerSeq, SeqReceiver, laneConfigs, LANE_WAIT_MS } =
    _internals;
  const enc = (s) => new TextEncoder().encode(s);
  const unhex = (s) => Uint8Array.from(Buffer.from(s.replace(/ /g, ''), 'hex'));

  check('lanes: the frame examples of §8.8.1 encode and decode', () => {
    assert.equal(hex(versionFrame(3)), '1a00000003');
    assert.equal(hex(laneDataFrame(1, 1, true, enc('hi'))), '170101' + '0000000000000001' + '6869');
    assert.equal(hex(laneDataFrame(7, 2, false, new Uint8Array(0))), '170007' + '0000000000000002');
    assert.equal(hex(ackFrame(1, 1)), '1801' + '0000000000000001');
    assert.equal(hex(seqFrames(2, 7, enc('xy'))[0]), '1902' + '00000007' + '0001' + '7879');
    // Lane 0 stays DATA / ACK.
    assert.equal(hex(laneDataFrame(0, 1, true, enc('hi'))), '1001' + '0000000000000001' + '6869');
    assert.equal(hex(ackFrame(0, 1)), '11' + '0000000000000001');
    const d = (s) => decodeFrame(unhex(s));
    assert.deepEqual(d('1a 00000003'), { kind: 0x1a, version: 3 });
    const dl = d('17 01 01 0000000000000001 6869');
    assert.deepEqual([dl.kind, dl.lane, dl.seq, dl.fin, hex(dl.payload)], [0x17, 1, 1, true, '6869']);
    const e = d('17 00 07 0000000000000002');
    assert.deepEqual([e.lane, e.seq, e.fin, e.payload.length], [7, 2, false, 0]);
    assert.deepEqual(d('18 01 0000000000000001'), { kind: 0x18, lane: 1, seq: 1 });
    const s1 = d('19 02 00000007 00 01 7879');
    assert.deepEqual([s1.lane, s1.seq, s1.index, s1.count, hex(s1.payload)], [2, 7, 0, 1, '7879']);
    const s2 = d('19 00 00000008 01 02 7a');
    assert.deepEqual([s2.lane, s2.seq, s2.index, s2.count, hex(s2.payload)], [0, 8, 1, 2, '7a']);
  });

  check('lanes: malformed lane frames are dropped', () => {
    const d = (s) => decodeFrame(unhex(s));
    assert.equal(d('17 01 00 0000000000000001'), null); // DATA_LANE lane 0
    assert.notEqual(d('17 01 08 0000000000000001'), null); // lane 8: the file lane (version 4)
    assert.equal(d('17 01 09 0000000000000001'), null); // lane 9
    assert.equal(d('17 01 01 00000000000000'), null); // short
    assert.equal(d('18 00 0000000000000001'), null);
    assert.notEqual(d('18 08 0000000000000001'), null);
    assert.equal(d('18 09 0000000000000001'), null);
    assert.equal(d('18 01 00000000000000'), null);
    assert.equal(d('19 08 00000001 00 01'), null); // lane 8
    assert.equal(d('19 00 00000001 00 00'), null); // count 0
    assert.equal(d('19 00 00000001 00 12'), null); // count 18
    assert.equal(d('19 00 00000001 02 02'), null); // index >= count
    assert.equal(d('19 00 00000001 00'), null); // short
    assert.equal(d('1a 000000'), null);
    assert.notEqual(d('19 07 00000001 10 11'), null); // part 16 of 17: fine
  });

  check('lanes: sequenced parts are 1016 bytes on "u2", one frame elsewhere', () => {
    const f = seqFrames(3, 9, pattern(2100), 1016);
    assert.deepEqual(f.map((x) => x.length), [1024, 1024, 8 + 68]);
    assert.deepEqual(f.map((x) => [x[6], x[7]]), [[0, 3], [1, 3], [2, 3]]);
    assert.equal(seqFrames(3, 9, pattern(16384), 1016).length, 17);
    assert.equal(seqFrames(3, 9, pattern(1016), 1016).length, 1);
    assert.equal(seqFrames(3, 9, pattern(16384)).length, 1);
  });

  check('lanes: sequenced receiver keeps the newest only (serial arithmetic, wrap)', () => {
    assert.ok(newerSeq(1, 0) && newerSeq(0, 0xffffffff) && newerSeq(0x7fffffff, 0));
    assert.ok(!newerSeq(0x80000000, 0) && !newerSeq(5, 5) && !newerSeq(4, 5));
    const r = new SeqReceiver(() => 0);
    const whole = (seq, s) => r.push(seq, 0, 1, enc(s));
    assert.equal(new TextDecoder().decode(whole(5, 'a')), 'a');
    assert.equal(whole(5, 'dup'), 'stale');
    assert.equal(whole(4, 'old'), 'stale');
    assert.equal(new TextDecoder().decode(whole(9, 'b')), 'b');
    // Wrap-around: 0xffffffff then 0 are newer in turn.
    const w = new SeqReceiver(() => 0);
    assert.ok(w.push(0xfffffffe, 0, 1, enc('x')) instanceof Uint8Array);
    assert.ok(w.push(0xffffffff, 0, 1, enc('y')) instanceof Uint8Array);
    assert.ok(w.push(0, 0, 1, enc('z')) instanceof Uint8Array);
    assert.equal(w.push(0xffffffff, 0, 1, enc('late')), 'stale');
  });

  check('lanes: sequenced parts: one message assembled, newer replaces, older dropped, expiry, 16384', () => {
    let t = 0;
    const r = new SeqReceiver(() => t);
    const [a0, a1, a2] = seqFrames(0, 10, pattern(2100, 1), 1016).map((f) => decodeFrame(f));
    const push = (f, seq = f.seq) => r.push(seq, f.index, f.count, f.payload);
    assert.equal(push(a2), 'pending');
    assert.equal(push(a0), 'pending');
    assert.equal(push(a0), 'pending'); // a repeated part: nothing
    assert.deepEqual(push(a1), pattern(2100, 1));
    assert.equal(push(a1), 'stale'); // delivered once
    // A newer seq's part replaces the one being assembled; a part of the replaced one is stale.
    const b = seqFrames(0, 11, pattern(3000, 2), 1016).map((f) => decodeFrame(f));
    const c = seqFrames(0, 12, pattern(3000, 3), 1016).map((f) => decodeFrame(f));
    assert.equal(push(b[0]), 'pending');
    assert.equal(push(c[1]), 'pending');
    assert.equal(push(b[1]), 'stale');
    assert.equal(push(c[0]), 'pending');
    assert.deepEqual(push(c[2]), pattern(3000, 3));
    // A whole newer message drops an older one being assembled.
    const d = seqFrames(0, 13, pattern(3000, 4), 1016).map((f) => decodeFrame(f));
    assert.equal(push(d[0]), 'pending');
    assert.ok(r.push(14, 0, 1, enc('whole')) instanceof Uint8Array);
    assert.equal(push(d[1]), 'stale');
    // Expiry: 1 s after its first part.
    const e = seqFrames(0, 20, pattern(3000, 5), 1016).map((f) => decodeFrame(f));
    assert.equal(push(e[0]), 'pending');
    t += 1000;
    assert.equal(push(e[1]), 'pending'); // a new assembly: the old one expired
    assert.equal(push(e[2]), 'pending');
    assert.deepEqual(push(e[0]), pattern(3000, 5)); // within 1 s of its new start
    // At most 16384 bytes: parts past that drop the message.
    assert.equal(r.push(30, 0, 17, pattern(16000)), 'pending');
    assert.equal(r.push(30, 1, 17, pattern(1000)), 'bad');
    assert.equal(r.asm, null);
  });

  check('lanes: lane options', () => {
    const c = laneConfigs([{ lane: 1 }, { lane: 3, priority: 2, weight: 5 }]);
    assert.deepEqual(c[0], { priority: 0, weight: 1 });
    assert.deepEqual(c[1], { priority: 0, weight: 1 });
    assert.deepEqual(c[3], { priority: 2, weight: 5 });
    assert.equal(c[2], null);
    for (const bad of [[{ lane: 8 }], [{ lane: 1, weight: 0 }], [{ lane: -1 }], [{ lane: 1, priority: 256 }], 'x']) {
      assert.throws(() => laneConfigs(bad), (e) => e.code === 'invalid_option');
    }
  });

  // A link whose client has these lanes configured; `got` collects messages with their lanes.
  const laneLink = (lanes, window = 8 << 20) => {
    const { link, relayed, events, channel } = fakeLink();
    link._close(); // its config had no lanes: a new one
    const client = { ...link.c, lanes: laneConfigs(lanes), sendWindow: window, maxMessageSize: window };
    const out = [];
    client._sendBinary = (b) => out.push(b.slice(9));
    const got = [];
    client._emit = (type, d) => type === 'message' && got.push({ lane: d.lane, reliable: d.reliable, text: d.text });
    const l = new Link(client, 2, 9, false, 'peer', 'any');
    return { link: l, relayed: out, got, channel };
  };
  const kinds = (frames) => frames.map((f) => f[0]);
  const text = (f) => new TextDecoder().decode(f.subarray(f[0] === 0x10 ? 10 : 11));

  check('lanes: VERSION first, answered once; lane >= 1 and sequenced wait for it, then go on their lanes', () => {
    const { link, relayed, got } = laneLink([{ lane: 1 }, { lane: 2 }]);
    assert.deepEqual(kinds(relayed), [0x1a, 0x13]); // VERSION before the first PING
    relayed.length = 0;
    link.sendReliable(enc('zero'), false, 0);
    link.sendReliable(enc('one-a'), false, 1);
    link.sendReliable(enc('one-b'), false, 1);
    link.sendSequenced(2, enc('s1'));
    link.sendSequenced(2, enc('s2')); // replaces s1
    link.sendUnreliable(enc('u'));
    assert.deepEqual(kinds(relayed), [0x10, 0x12]); // lane 0 and plain unreliable go at once
    assert.equal(link.stats.sequencedReplaced, 1);
    assert.ok(link.windowUsed > 0);
    relayed.length = 0;
    link.onFrame(versionFrame(3), false);
    assert.equal(link.peerLanes, 'lanes');
    // The answer first, then what waited, on its lane.
    assert.equal(relayed[0][0], 0x1a);
    const data = relayed.filter((f) => f[0] === 0x17);
    assert.deepEqual(data.map((f) => [f[2], text(f)]), [[1, 'one-a'], [1, 'one-b']]);
    const seq = relayed.filter((f) => f[0] === 0x19);
    assert.deepEqual(seq.map((f) => hex(f.subarray(0, 8))), ['1902' + '00000001' + '0001']);
    // A second VERSION is not answered again (until a resync).
    relayed.length = 0;
    link.onFrame(versionFrame(3), false);
    assert.deepEqual(kinds(relayed), []);
    link.resync();
    assert.equal(relayed[0][0], 0x1a);
    // Receiving on a lane: in order per lane, ACK_LANE.
    link.onFrame(laneDataFrame(1, 2, true, enc('second')), false);
    link.onFrame(laneDataFrame(1, 1, true, enc('first')), false);
    link.onFrame(laneDataFrame(3, 1, true, enc('lane3')), false); // lanes not configured here still receive
    link.onFrame(seqFrames(4, 1, enc('state'))[0], false);
    assert.deepEqual(got, [
      { lane: 1, reliable: true, text: 'first' },
      { lane: 1, reliable: true, text: 'second' },
      { lane: 3, reliable: true, text: 'lane3' },
      { lane: 4, reliable: false, text: 'state' },
    ]);
    relayed.length = 0;
    link.sendAck(link.lanes[1]);
    assert.deepEqual(relayed.map(hex), ['1801' + '0000000000000002']);
    // An ACK_LANE releases the lane's window.
    link.onFrame(ackFrame(1, 2), false);
    link.onFrame(ackFrame(0, 1), false);
    assert.equal(link.windowUsed, 0);
    link._close();
  });

  check('lanes: an old peer (a frame without VERSION, 1 s on) gets every lane on lane 0, lane by lane', () => {
    const { link, relayed } = laneLink([{ lane: 1 }, { lane: 2 }]);
    link.sendReliable(enc('zero'), false, 0);
    link.sendReliable(enc('two-a'), false, 2);
    link.sendReliable(enc('one-a'), false, 1);
    link.sendReliable(enc('two-b'), false, 2);
    link.sendSequenced(1, enc('seq'));
    // Early frames say nothing; neither do direct ones before the peer's READY.
    link.onFrame(u64Ping(1), false);
    assert.equal(link.peerLanes, 'unknown');
    link.started -= LANE_WAIT_MS;
    link.onFrame(u64Ping(2), true);
    assert.equal(link.peerLanes, 'unknown');
    relayed.length = 0;
    link.onFrame(u64Ping(3), false);
    assert.equal(link.peerLanes, 'lane0');
    const data = relayed.filter((f) => f[0] === 0x10);
    assert.deepEqual(data.map(text), ['one-a', 'two-a', 'two-b']);
    assert.deepEqual(data.map((f) => Number(new DataView(f.buffer).getBigUint64(2))), [2, 3, 4]);
    assert.ok(relayed.some((f) => f[0] === 0x12 && new TextDecoder().decode(f.subarray(1)) === 'seq'));
    // Final: later messages of every lane go on lane 0; a VERSION 3 now changes nothing.
    link.onFrame(versionFrame(3), false);
    assert.equal(link.peerLanes, 'lane0');
    relayed.length = 0;
    link.sendReliable(enc('one-c'), false, 1);
    link.sendSequenced(2, enc('seq2'));
    assert.deepEqual(kinds(relayed), [0x10, 0x12]);
    link._close();
    // VERSION < 3 decides at once, and so does an offer / answer of version 2.
    const b = laneLink([{ lane: 1 }]);
    b.link.onFrame(versionFrame(2), false);
    assert.equal(b.link.peerLanes, 'lane0');
    b.link._close();
  });

  check('lanes: the schedule: lane 0 waits for at most one fragment of each busy lane; tiers; weights', () => {
    const { link, relayed } = laneLink([{ lane: 1 }, { lane: 2, priority: 1 }, { lane: 3, weight: 3 }], 16 << 20);
    link.onFrame(versionFrame(3), false);
    link.relayPaused = true; // nothing goes: the lanes queue
    link.sendReliable(pattern(16384 * 8), false, 1);
    link.sendReliable(pattern(16384 * 8), false, 2);
    link.sendReliable(pattern(16384 * 12), false, 3);
    link.sendReliable(enc('chat'), false, 0);
    relayed.length = 0;
    // Every fragment acknowledged as soon as it goes, so the lanes' bound never holds.
    link.c._sendBinary = (b) => {
      const f = b.slice(9);
      relayed.push(f);
      const v = new DataView(f.buffer, f.byteOffset);
      if (f[0] === 0x10) link.onAck(0, Number(v.getBigUint64(2)));
      if (f[0] === 0x17) link.onAck(f[2], Number(v.getBigUint64(3)));
    };
    link.relayPaused = false;
    link.pump();
    const order = relayed.filter((f) => f[0] === 0x10 || f[0] === 0x17).map((f) => (f[0] === 0x10 ? 0 : f[2]));
    // Lane 2 (priority 1) only once the tier of priority 0 has nothing ready.
    assert.deepEqual(order.slice(-8), [2, 2, 2, 2, 2, 2, 2, 2]);
    const tier0 = order.slice(0, -8);
    assert.ok(tier0.indexOf(0) <= 2, `lane 0 waits for at most one fragment per busy lane: ${tier0}`);
    // Lane 3 (weight 3) sends three fragments per round to lane 1's one.
    const first = tier0.filter((l) => l !== 0).slice(0, 8);
    assert.equal(first.filter((l) => l === 3).length, 6, `${first}`);
    link._close();
  });

  check('lanes: 64 KiB transmitted and unacknowledged at most until a rate is known; a chat lane keeps its window reserve', () => {
    const { link, relayed } = laneLink([{ lane: 1 }], 1 << 20);
    link.onFrame(versionFrame(3), false);
    relayed.length = 0;
    // Lane 1 may hold the window less lane 0's reserve (W / 4).
    const big = pattern(700 << 10);
    link.sendReliable(big, false, 1);
    assert.throws(() => link.sendReliable(pattern(100 << 10), false, 1), (e) => e.code === 'would_block');
    assert.equal(relayed.length, 4); // 4 x (16 KiB + 64) transmitted: the 64 KiB floor
    link.onAck(1, 1);
    assert.equal(relayed.length, 5, 'an ACK makes room for one more');
    link.sendReliable(pattern(200 << 10), false, 0); // lane 0's reserve is there
    assert.throws(() => link.sendReliable(pattern(300 << 10), false, 0), (e) => e.code === 'would_block');
    assert.throws(() => link.sendReliable(pattern(1 << 20), false, 1), (e) => e.code === 'too_large');
    assert.throws(
      () => link.c._checkLane?.(5) ?? Client.prototype._checkLane.call({ lanes: link.c.lanes }, 5),
      (e) => e.code === 'invalid_lane',
    );
    link._close();
  });

  check('acks go at once every 32 KiB of fragments, not only every 32 fragments or 5 ms', () => {
    const { link, relayed } = laneLink([{ lane: 1 }]);
    relayed.length = 0;
    const data = (seq) => {
      const f = new Uint8Array(10 + 16384);
      f[0] = 0x10;
      f[1] = 1; // FIN
      new DataView(f.buffer).setBigUint64(2, BigInt(seq));
      return f;
    };
    link.onFrame(data(1), false);
    assert.deepEqual(kinds(relayed), [], 'one 16 KiB fragment: the ACK waits for its timer');
    link.onFrame(data(2), false);
    assert.deepEqual(kinds(relayed), [0x11], '32 KiB: acknowledged at once');
    assert.equal(Number(new DataView(relayed[0].buffer, relayed[0].byteOffset).getBigUint64(1)), 2);
    link._close();
  });

  function u64Ping(id) {
    const f = new Uint8Array(9);
    f[0] = 0x13;
    new DataView(f.buffer).setBigUint64(1, BigInt(id));
    return f;
  }
}

// ---- file transfer (link protocol version 4, docs/PROTOCOL.md §8.9) ----

{
  const { FILE_LANE, Sha256, sha256, safeFileName, encodeFileMsg, decodeFileMsg, fileChunkMax, laneConfigs, versionFrame } = _internals;
  // A link whose client has these app lanes and this window.
  const laneLink = (lanes, window = 8 << 20) => {
    const { link } = fakeLink();
    link._close();
    const client = { ...link.c, lanes: laneConfigs(lanes), sendWindow: window, maxMessageSize: window, _sendBinary: () => {} };
    return { link: new Link(client, 2, 9, false, 'peer', 'any') };
  };
  const { createHash, webcrypto } = await import('node:crypto');
  const unhex = (s) => Uint8Array.from(Buffer.from(s.replace(/ /g, ''), 'hex'));
  const enc = (s) => new TextEncoder().encode(s);

  check('files: SHA-256 of the FIPS 180-2 vectors, whole and byte by byte', () => {
    const vectors = [
      ['', 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'],
      ['abc', 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'],
      ['abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq', '248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1'],
      [
        'abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu',
        'cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1',
      ],
    ];
    for (const [msg, want] of vectors) {
      assert.equal(hex(sha256(enc(msg))), want, msg);
      const h = new Sha256();
      for (const b of enc(msg)) h.update(new Uint8Array([b]));
      assert.equal(hex(h.digest()), want, `${msg} byte by byte`);
    }
    // A million 'a's, in uneven pieces.
    const h = new Sha256();
    const a = new Uint8Array(1000003).fill(0x61);
    let at = 0;
    for (const n of [1, 63, 64, 65, 4096, 999, 12345]) {
      h.update(a.subarray(at, at + n));
      at += n;
    }
    h.update(a.subarray(at, 1000000));
    assert.equal(hex(h.digest()), 'cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0');
    assert.throws(() => h.update(a), /after digest/);
  });

  {
    // Random buffers split at random points: the same as node's SHA-256 and WebCrypto's.
    let seed = 12345;
    const rnd = (n) => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % n;
    };
    for (let round = 0; round < 40; round++) {
      const len = round < 20 ? round * 13 : rnd(300000);
      const buf = Uint8Array.from({ length: len }, () => rnd(256));
      const h = new Sha256();
      let at = 0;
      while (at < len) {
        const n = Math.min(len - at, rnd(70000) + 1);
        h.update(buf.subarray(at, at + n));
        at += n;
      }
      const got = hex(h.digest());
      assert.equal(got, createHash('sha256').update(buf).digest('hex'), `length ${len}`);
      assert.equal(got, hex(new Uint8Array(await webcrypto.subtle.digest('SHA-256', buf))), `length ${len} (WebCrypto)`);
    }
    checks++;
    process.stdout.write('ok files: incremental SHA-256 matches node and WebCrypto on random splits\n');
  }

  check('files: offered names are sanitised as the reference client does', () => {
    const cases = [
      ['report.pdf', 'report.pdf'],
      ['../../etc/passwd', 'passwd'],
      ['/etc/shadow', 'shadow'],
      ['C:\\Windows\\system32\\cmd.exe', 'cmd.exe'],
      ['..', 'file'],
      ['...', 'file'],
      ['', 'file'],
      ['dir/', 'file'],
      ['.bashrc', '_bashrc'],
      ['CON', 'file'],
      ['nul.txt', 'file'],
      ['com1', 'file'],
      ['a<b>c:d"e|f?g*h', 'a_b_c_d_e_f_g_h'],
      ['evil\u202etxt.exe', 'evil_txt.exe'],
      ['zero\u200bwidth', 'zero_width'],
      ['tab\there\n', 'tab_here_'],
      ['trailing. . ', 'trailing_'],
      ['héllo wörld.txt', 'héllo wörld.txt'],
    ];
    for (const [offered, want] of cases) assert.equal(safeFileName(offered), want, JSON.stringify(offered));
    const long = safeFileName('ä'.repeat(300) + '.tar.gz');
    assert.ok(enc(long).length <= 200, `${enc(long).length}`);
    assert.ok(long.endsWith('.gz') && long.startsWith('ää'), long);
    const noExt = safeFileName('x'.repeat(500));
    assert.equal(noExt, 'x'.repeat(200));
  });

  check('files: the message examples of §8.9 encode and decode; bad ones are dropped', () => {
    const ab = new Uint8Array(32).fill(0xab);
    const offer = encodeFileMsg({ kind: 1, transfer: 7n, size: 3, sha256: ab, name: 'a.txt' });
    assert.equal(hex(offer), '01' + '0000000000000007' + '0000000000000003' + 'ab'.repeat(32) + '612e747874');
    assert.equal(hex(encodeFileMsg({ kind: 2, transfer: 7n, offset: 262144 })), '02' + '0000000000000007' + '0000000000040000');
    assert.equal(hex(encodeFileMsg({ kind: 8, transfer: 7n, code: 4, reason: '' })), '08' + '0000000000000007' + '04');
    const o = decodeFileMsg(offer);
    assert.deepEqual([o.kind, o.transfer, o.size, hex(o.sha256), o.name], [1, 7n, 3, 'ab'.repeat(32), 'a.txt']);
    const c = decodeFileMsg(unhex('08 0000000000000007 04'));
    assert.deepEqual([c.kind, c.code, c.reason], [8, 'disk_full', '']);
    assert.equal(decodeFileMsg(unhex('03 0000000000000007 63 6e6f')).code, 'other');
    const chunk = encodeFileMsg({ kind: 4, transfer: 1n, offset: 5, sha256: sha256(enc('hi')), bytes: enc('hi') });
    assert.equal(chunk.length, 49 + 2);
    assert.equal(new TextDecoder().decode(decodeFileMsg(chunk).bytes), 'hi');
    assert.equal(decodeFileMsg(new Uint8Array(0)), null);
    assert.equal(decodeFileMsg(unhex('09 0000000000000007')), null); // unknown kind
    assert.equal(decodeFileMsg(unhex('07 00000000000007')), null); // short
    assert.equal(decodeFileMsg(unhex('07 0000000000000007 00')), null); // longer than DONE
    assert.equal(decodeFileMsg(unhex('08 0000000000000007 02 ff')), null); // not UTF-8
    assert.equal(decodeFileMsg(new Uint8Array(49 + (256 << 10) + 1).fill(4)), null); // chunk too long
    assert.equal(decodeFileMsg(new Uint8Array(49).fill(4)), null); // an empty chunk
    assert.equal(fileChunkMax(8 << 20), 256 << 10);
    // A CHUNK fits half the window (bytes + 64 per fragment), here 32 KiB.
    const m = fileChunkMax(64 << 10) + 49;
    assert.ok(m + Math.ceil(m / 16384) * 64 <= 32 << 10 && m > 30 << 10, `${m}`);
  });

  // Two clients whose links are wired to each other through a fake server path (frames go on a
  // later turn of the event loop); `tamper` may change a frame from a to b (return it, or null to
  // drop it). a is peer 1, b peer 2.
  const wired = ({ bVersion = 4, tamper = (f) => f, window } = {}) => {
    const make = (name, id) => {
      const c = new Client('ws://127.0.0.1:1/ws', { name, sendWindow: window });
      c.peerId = id;
      c._sendJson = () => {};
      return c;
    };
    const a = make('a', 1);
    const b = make('b', 2);
    const wire = (from, to, change) => (frame) => {
      const f = change(frame.slice());
      if (f === null) return;
      new DataView(f.buffer, f.byteOffset).setUint32(1, from.peerId); // the source, as the server does
      setImmediate(() => !to.closed && to._onBinary(f));
    };
    a._sendBinary = wire(a, b, tamper);
    b._sendBinary = wire(b, a, (f) => f);
    if (bVersion < 4) {
      // An old peer: its VERSION says bVersion, and lane 8 frames are unknown to it.
      const send = b._sendBinary;
      b._sendBinary = (f) => {
        if (f[9] === 0x1a) new DataView(f.buffer, f.byteOffset).setUint32(10, bVersion);
        send(f);
      };
      const onBinary = b._onBinary.bind(b);
      b._onBinary = (f) => ((f[9] === 0x17 && f[11] === 8) || (f[9] === 0x18 && f[10] === 8) ? undefined : onBinary(f));
    }
    a._addMember('g', { peer: 2, name: 'b', link: 5, initiator: false, direct: 'none' });
    b._addMember('g', { peer: 1, name: 'a', link: 5, initiator: false, direct: 'none' });
    return { a, b };
  };
  const until = async (f, what) => {
    const t0 = performance.now();
    while (!f()) {
      assert.ok(performance.now() - t0 < 10000, `timed out: ${what}`);
      await sleep(5);
    }
  };
  const bytesOf = async (blob) => new Uint8Array(await blob.arrayBuffer());
  const asyncCheck = async (name, f) => {
    await f();
    checks++;
    process.stdout.write(`ok ${name}\n`);
  };

  await asyncCheck('files: a 3 MiB file between two clients: hashes checked, VERIFIED, progress, name sanitised', async () => {
    const { a, b } = wired();
    const data = pattern((3 << 20) + 5, 9);
    const offers = [];
    const received = [];
    const progress = [];
    b.on('fileoffer', (o) => offers.push(o));
    b.on('filereceived', (f) => received.push(f));
    b.on('fileprogress', (p) => progress.push(p));
    const t = a.sendFile(2, new Blob([data]), { name: '../secret/x.bin' });
    assert.equal(t.peer, 2);
    assert.equal(t.size, data.length);
    assert.match(t.id, /^[0-9a-f]{16}$/);
    const sent = [];
    t.on('progress', (p) => sent.push(p));
    await until(() => offers.length === 1, 'the offer');
    const o = offers[0];
    assert.deepEqual([o.id, o.from, o.name, o.size, o.sha256], [t.id, 1, 'x.bin', data.length, createHash('sha256').update(data).digest('hex')]);
    const got = await o.accept();
    const done = await t.done;
    const want = createHash('sha256').update(data).digest('hex');
    assert.deepEqual(done, { name: '../secret/x.bin', size: data.length, sha256: want, bytesSent: data.length, resumedFrom: 0 });
    assert.equal(got.sha256, want);
    assert.equal(got.name, 'x.bin');
    assert.deepEqual(await bytesOf(got.blob), data);
    assert.equal(received.length, 1);
    assert.equal(received[0].blob, got.blob);
    assert.deepEqual(sent.at(-1).done, data.length);
    assert.equal(progress.at(-1).done, data.length);
    assert.equal(progress.at(-1).direction, 'receive');
    assert.equal(a.stats(2).peerVersion, 4);
    assert.equal(a._files.sending.size + b._files.receiving.size, 0, 'transfers forgotten');
    // Lane 8 is the library's: the app cannot send on it.
    await assert.rejects(a.send(2, 'x', { lane: FILE_LANE }), (e) => e.code === 'invalid_lane');
    assert.throws(() => a.sendSequenced(2, FILE_LANE, 'x'), (e) => e.code === 'invalid_lane');
    a._end(1000, 'done', true);
    b._end(1000, 'done', true);
  });

  await asyncCheck('files: several at once both ways, an empty file, reject and cancel', async () => {
    const { a, b } = wired();
    const answer = (c, f) => c.on('fileoffer', f);
    answer(b, (o) => (o.name === 'no.txt' ? o.reject('not wanted') : o.accept().catch(() => {})));
    answer(a, (o) => o.accept().catch(() => {}));
    const x = a.sendFile(2, new Blob([pattern(700000, 1)]), { name: 'x' });
    const y = a.sendFile(2, new Blob([pattern(900000, 2)]), { name: 'y' });
    const z = b.sendFile(1, new Blob([pattern(500000, 3)]), { name: 'z' });
    const empty = a.sendFile(2, new Blob([]), { name: 'empty' });
    const no = a.sendFile(2, new Blob([pattern(10)]), { name: 'no.txt' });
    const got = await Promise.all([x.done, y.done, z.done, empty.done]);
    assert.deepEqual(got.map((d) => d.size), [700000, 900000, 500000, 0]);
    assert.equal(got[3].sha256, 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
    await assert.rejects(no.done, (e) => e.code === 'rejected' && e.byPeer === true && e.message === 'not wanted');
    // A cancel by the sender ends it at the receiver too, which never reports the file.
    const failed = [];
    const received = [];
    b.on('filefailed', (f) => failed.push(f));
    b.on('filereceived', (f) => received.push(f));
    const big = a.sendFile(2, new Blob([pattern(40 << 20, 4)]), { name: 'big' });
    big.on('progress', (p) => p.done >= 1 << 20 && big.cancel());
    await assert.rejects(big.done, (e) => e.code === 'cancelled' && e.byPeer === false);
    await until(() => failed.length === 1, 'the receiver hears of the cancel');
    assert.deepEqual([failed[0].code, failed[0].error.byPeer, failed[0].name], ['cancelled', true, 'big']);
    // A cancel by the receiver ends it at the sender.
    const offers = [];
    const c2 = a.sendFile(2, new Blob([pattern(40 << 20, 5)]), { name: 'big2' });
    const off = b.on('fileoffer', (o) => offers.push(o));
    await until(() => offers.some((o) => o.name === 'big2'), 'the offer');
    off();
    b.on('fileprogress', (p) => p.name === 'big2' && p.done >= 1 << 20 && offers.find((o) => o.name === 'big2').cancel());
    await assert.rejects(c2.done, (e) => e.code === 'cancelled' && e.byPeer === true);
    assert.deepEqual(received, []);
    a._end(1000, 'done', true);
    b._end(1000, 'done', true);
  });

  await asyncCheck('files: a corrupted chunk is never reported complete; a version 3 peer is unsupported; a peer that leaves', async () => {
    let n = 0;
    // Flip a byte of the third DATA_LANE fragment of lane 8 a sends.
    const { a, b } = wired({ tamper: (f) => (f[9] === 0x17 && f[11] === 8 && ++n === 3 ? ((f[f.length - 1] ^= 1), f) : f) });
    const failed = [];
    const received = [];
    b.on('filefailed', (f) => failed.push(f));
    b.on('filereceived', (f) => received.push(f));
    let result;
    b.on('fileoffer', (o) => (result = o.accept()));
    const t = a.sendFile(2, new Blob([pattern(1 << 20, 6)]), { name: 'c' });
    await assert.rejects(t.done, (e) => e.code === 'hash_mismatch' && e.byPeer === true);
    await assert.rejects(result, (e) => e.code === 'hash_mismatch' && e.byPeer === false);
    assert.deepEqual([failed.length, received.length], [1, 0]);
    a._end(1000, 'done', true);
    b._end(1000, 'done', true);

    const old = wired({ bVersion: 3 });
    old.b.on('fileoffer', assert.fail);
    const u = old.a.sendFile(2, new Blob([pattern(100)]), { name: 'u' });
    await assert.rejects(u.done, (e) => e.code === 'unsupported');
    assert.equal(old.a._links.get(2).peerFiles(), false);
    assert.equal(old.a._links.get(2).lanes[FILE_LANE].nextSeq, 1, 'nothing went on lane 8');
    old.a._end(1000, 'done', true);
    old.b._end(1000, 'done', true);

    const gone = wired();
    let offered = false;
    gone.b.on('fileoffer', (o) => {
      offered = true;
      o.accept().catch(() => {});
    });
    const g = gone.a.sendFile(2, new Blob([pattern(30 << 20, 7)]), { name: 'g' });
    await until(() => offered, 'the offer');
    gone.a._removeMember('g', 2);
    await assert.rejects(g.done, (e) => e.code === 'peer_left');
    assert.throws(() => gone.a.sendFile(2, new Blob([])), (e) => e.code === 'unknown_peer');
    assert.throws(() => gone.b.sendFile(1, 'not a blob'), TypeError);
    gone.a._end(1000, 'done', true);
    gone.b._end(1000, 'done', true);
  });

  check('files: the file lane holds at most half the window, keeps no reserve, and makes the lanes bound Q apply', () => {
    const { link } = laneLink([{ lane: 1 }], 1 << 20);
    link.onFrame(versionFrame(4), false);
    assert.equal(link.peerFiles(), true);
    const msg = () => new Uint8Array(200 << 10);
    link.sendReliable(msg(), false, FILE_LANE);
    link.sendReliable(msg(), false, FILE_LANE);
    assert.throws(() => link.sendReliable(msg(), false, FILE_LANE), (e) => e.code === 'would_block');
    assert.ok(link.lanes[FILE_LANE].unackedCost <= 512 << 10);
    assert.throws(() => link.sendReliable(new Uint8Array(600 << 10), false, FILE_LANE), (e) => e.code === 'too_large');
    assert.ok(link.filesBusy() && link.lanesFull() === (link.lanes.reduce((n, L) => n + L.txCost, 0) >= 64 << 10));
    // The app's lanes keep the other half: lane 0 and lane 1 still send.
    link.sendReliable(new Uint8Array(200 << 10), false, 0);
    link.sendReliable(new Uint8Array(200 << 10), false, 1);
    link._close();
    // No file lane towards a version 3 peer.
    const old = laneLink([]);
    old.link.onFrame(versionFrame(3), false);
    assert.equal(old.link.peerFiles(), false);
    old.link._close();
  });
}

assert.equal(MAX_UNRELIABLE_SIZE, 16384);
process.stdout.write(`all ${checks} checks passed\n`);
