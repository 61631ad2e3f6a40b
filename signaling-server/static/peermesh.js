// peermesh.js: the browser client of peermesh (wire protocol v1, docs/PROTOCOL.md; link protocol
// version 4: section 7.6, lanes, section 8.8, and file transfer on lane 8, section 8.9).
//
//   import { connect } from '/peermesh.js';
//   const client = await connect({ name: 'alice' });          // ws(s)://<this host>/ws
//   client.on('message', ({ from, text }) => console.log(from, text));
//   const members = await client.join('lobby');
//   await client.broadcast('lobby', 'hello');
//
// A browser tab becomes a full group member: messages go through the server at once while a
// WebRTC data channel pair is set up in the background; the link then moves to the direct path,
// and back to the server if the direct path dies, without losing, duplicating or reordering a
// reliable message. No build step, no dependencies. Types: /peermesh.d.ts.

export const PROTOCOL_VERSION = 1;
/**
 * The link protocol version this client speaks (offer/answer "version", docs/PROTOCOL.md §7.6,
 * and the VERSION frame of §8.8.2).
 */
export const LINK_VERSION = 4;
/** The app's lanes: 0 to MAX_LANES - 1 (docs/PROTOCOL.md §8.8). */
export const MAX_LANES = 8;
/** The file lane (docs/PROTOCOL.md §8.9): the library's, never the app's; version 4 peers only. */
export const FILE_LANE = 8;
const LANE_SLOTS = FILE_LANE + 1; // app lanes and the file lane
// The file lane's schedule by default: below the app's lanes at their default priority 0.
const FILE_LANE_DEFAULT = { priority: 1, weight: 1 };
/** Largest unreliable message (bytes); also the size of one reliable fragment. */
export const MAX_UNRELIABLE_SIZE = 16384;

const MAX_FRAGMENT = 16384;
const FRAGMENT_OVERHEAD = 64; // window cost of a fragment beyond its bytes
const ACK_EVERY = 32;
const ACK_BYTES = 32 << 10; // ...or this many fragment bytes (section 8.4)
const ACK_DELAY_MS = 5;
const MAX_REORDER = (16 << 20) / FRAGMENT_OVERHEAD;
const CONNECT_TIMEOUT_MS = 8000; // a PeerConnection not connected by then has failed
const PING_EVERY_MS = 1000;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_HAD_DIRECT_MS = 5000;
const RETRY_MAX_NEVER_DIRECT_MS = 60000;
// Flow control on channel "r": DATA goes while less than 1 MiB is queued there (DC_HIGH); the
// pump resumes at half of it.
const DIRECT_HIGH = 1 << 20;
// With more than one lane (section 8.8.3), DATA goes while the permits transmitted and not
// acknowledged are below Q = max(LANES_QUEUE_FLOOR, 2 x rate x min RTT): every lane shares the
// FIFOs past the scheduler (WebSocket, server, SCTP, the peer's receive buffer), and the link's
// own ACKs see all of them. The rate is the largest ack-measured sample over the last
// max(RATE_WINDOW_MIN_MS, 10 x min RTT), each sample spanning at least max(RATE_INTERVAL_MS,
// min RTT).
const LANES_QUEUE_FLOOR = 64 << 10;
const RATE_INTERVAL_MS = 10;
const RATE_WINDOW_MIN_MS = 100;
// Deficit round robin credit per unit of lane weight and visit (section 8.8.3).
const DRR_QUANTUM = 16400;
// Lanes (section 8.8.2): a peer frame without a VERSION before it, this long after the link
// started (server path, or direct once the peer's READY came), says the peer has no lanes.
const LANE_WAIT_MS = 1000;
// What a receiver holds for the peer's one window: reorder (all lanes) and a partial message.
const MAX_PEER_WINDOW = 16 << 20;
// The link's own frames (ACK, PING, PONG) take the server path rather than queue behind this
// much on a channel (the reference client's 100 ms bounded wait).
const OWN_FRAME_MAX_QUEUED = 256 << 10;
// Link protocol v2: every message on the direct path's unreliable channel fits in one SCTP chunk.
const MAX_DIRECT_UNRELIABLE_FRAME = 1024;
const PART_HEADER = 9; // [0x16][msg u32][index u16][count u16]
const PART_BYTES = MAX_DIRECT_UNRELIABLE_FRAME - PART_HEADER; // 1015
const MAX_PARTS = Math.ceil(16384 / PART_BYTES); // 17
const PART_EXPIRY_MS = 1000; // an incomplete split message is dropped this long after its first part
const PART_MAX_HELD = 256 << 10; // parts held in all, each counted as its bytes + PART_OVERHEAD
const PART_OVERHEAD = 64;
const PART_DONE_MAX = 4096; // ids of recently completed split messages remembered (deliver once)
// Direct path with nothing received on the current generation's channels for this long: dead.
const DEAD_PATH_TIMEOUT_MS = 3000;
const DATA_HEADER = 10; // [0x10][flags][seq u64]
const DATA_LANE_HEADER = 11; // [0x17][flags][lane][seq u64]
const SEQ_HEADER = 8; // [0x19][lane][seq u32][index][count]
const SEQ_PART_BYTES = MAX_DIRECT_UNRELIABLE_FRAME - SEQ_HEADER; // 1016
const DRAIN_CHECK_MS = 10; // how often a draining client checks that all it sent is acknowledged
const CARRY_WAIT_MS = 30000; // how long held messages wait for a link to the same user

const K_DATA = 0x10;
const K_ACK = 0x11;
const K_UNRELIABLE = 0x12;
const K_PING = 0x13;
const K_PONG = 0x14;
const K_READY = 0x15;
const K_PART = 0x16;
const K_DATA_LANE = 0x17;
const K_ACK_LANE = 0x18;
const K_SEQ = 0x19;
const K_VERSION = 0x1a;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An error with a stable `code` (the server's error codes, or one of this module's). */
export class PeermeshError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'PeermeshError';
    this.code = code;
    Object.assign(this, extra);
  }
}

// Code points refused in display names (the server's rule, docs/PROTOCOL.md §3.3): controls (Cc),
// format characters (Cf: bidi controls, zero-width characters, soft hyphen, tags, ...), line and
// paragraph separators (Zl, Zp), the other default-ignorable code points except variation
// selectors, and lone surrogates (Cs), which cannot be sent as UTF-8.
const FORBIDDEN_NAME_CHAR =
  /[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}\u034F\u115F\u1160\u17B4\u17B5\u2065\u3164\uFFA0\uFFF0-\uFFF8\u{E0000}-\u{E00FF}\u{E01F0}-\u{E0FFF}]/u;

/**
 * Display names: 1-64 bytes of UTF-8 without control, format or other invisible characters
 * (docs/PROTOCOL.md §3.3).
 */
export function isValidName(name) {
  if (typeof name !== 'string') return false;
  const n = encoder.encode(name).length;
  return n >= 1 && n <= 64 && !FORBIDDEN_NAME_CHAR.test(name);
}

/** Group names: 1-64 characters of A-Z a-z 0-9 . _ - */
export function isValidGroup(group) {
  return typeof group === 'string' && /^[A-Za-z0-9._-]{1,64}$/.test(group);
}

function toBytes(data) {
  if (typeof data === 'string') return encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError('peermesh: data must be a string, an ArrayBuffer or a typed array');
}

function wsUrlFrom(url) {
  if (url === undefined || url === null || url === '') {
    if (typeof location === 'undefined') throw new PeermeshError('invalid_url', 'no URL given');
    return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
  }
  const u = String(url);
  if (/^wss?:\/\//.test(u)) return u;
  const m = /^(https?):\/\/([^/]+)/.exec(u);
  if (m) return `${m[1] === 'https' ? 'wss' : 'ws'}://${m[2]}/ws`;
  throw new PeermeshError('invalid_url', `not a ws://, wss://, http:// or https:// URL: ${u}`);
}

// ---- link frames (section 8.1) ----

function u64Frame(kind, value) {
  const f = new Uint8Array(9);
  f[0] = kind;
  new DataView(f.buffer).setBigUint64(1, BigInt(value));
  return f;
}

function dataFrame(seq, fin, chunk) {
  const f = new Uint8Array(DATA_HEADER + chunk.length);
  f[0] = K_DATA;
  f[1] = fin ? 1 : 0;
  new DataView(f.buffer).setBigUint64(2, BigInt(seq));
  f.set(chunk, DATA_HEADER);
  return f;
}

// DATA (lane 0) or DATA_LANE (lanes 1..7, and the file lane 8).
function laneDataFrame(lane, seq, fin, chunk) {
  if (lane === 0) return dataFrame(seq, fin, chunk);
  const f = new Uint8Array(DATA_LANE_HEADER + chunk.length);
  f[0] = K_DATA_LANE;
  f[1] = fin ? 1 : 0;
  f[2] = lane;
  new DataView(f.buffer).setBigUint64(3, BigInt(seq));
  f.set(chunk, DATA_LANE_HEADER);
  return f;
}

// ACK (lane 0) or ACK_LANE (lanes 1..7, and the file lane 8).
function ackFrame(lane, seq) {
  if (lane === 0) return u64Frame(K_ACK, seq);
  const f = new Uint8Array(10);
  f[0] = K_ACK_LANE;
  f[1] = lane;
  new DataView(f.buffer).setBigUint64(2, BigInt(seq));
  return f;
}

function versionFrame(version = LINK_VERSION) {
  const f = new Uint8Array(5);
  f[0] = K_VERSION;
  new DataView(f.buffer).setUint32(1, version);
  return f;
}

// UNRELIABLE_SEQ frames of one sequenced message: one frame, or (direct path of a version 2 or 3
// generation) parts of `partBytes` each but the last, all with the same seq, in index order.
function seqFrames(lane, seq, bytes, partBytes = Infinity) {
  const count = Math.max(1, Math.ceil(bytes.length / partBytes));
  const frames = [];
  for (let i = 0; i < count; i++) {
    const chunk = count === 1 ? bytes : bytes.subarray(i * partBytes, Math.min((i + 1) * partBytes, bytes.length));
    const f = new Uint8Array(SEQ_HEADER + chunk.length);
    f[0] = K_SEQ;
    f[1] = lane;
    new DataView(f.buffer).setUint32(2, seq);
    f[6] = i;
    f[7] = count;
    f.set(chunk, SEQ_HEADER);
    frames.push(f);
  }
  return frames;
}

// A link frame (section 8.1, 8.8.1) as {kind, ...}, or null if it does not decode (too short, an
// unknown kind, a lane out of range): dropped. Payloads are views into `b`.
function decodeFrame(b) {
  if (b.length === 0) return null;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const kind = b[0];
  switch (kind) {
    case K_DATA:
      if (b.length < DATA_HEADER) return null;
      return { kind, lane: 0, fin: (b[1] & 1) === 1, seq: Number(dv.getBigUint64(2)), payload: b.subarray(DATA_HEADER) };
    case K_DATA_LANE:
      // Lane 8 is the file lane: this end speaks version 4 (section 8.9).
      if (b.length < DATA_LANE_HEADER || b[2] === 0 || b[2] >= LANE_SLOTS) return null;
      return { kind, lane: b[2], fin: (b[1] & 1) === 1, seq: Number(dv.getBigUint64(3)), payload: b.subarray(DATA_LANE_HEADER) };
    case K_ACK:
      if (b.length < 9) return null;
      return { kind, lane: 0, seq: Number(dv.getBigUint64(1)) };
    case K_ACK_LANE:
      if (b.length < 10 || b[1] === 0 || b[1] >= LANE_SLOTS) return null;
      return { kind, lane: b[1], seq: Number(dv.getBigUint64(2)) };
    case K_UNRELIABLE:
      return { kind, payload: b.subarray(1) };
    case K_PART:
      return b.length < PART_HEADER ? null : { kind };
    case K_PING:
    case K_PONG:
      return b.length < 9 ? null : { kind };
    case K_READY:
      return b.length < 5 ? null : { kind, gen: dv.getUint32(1) };
    case K_SEQ: {
      if (b.length < SEQ_HEADER) return null;
      const [lane, index, count] = [b[1], b[6], b[7]];
      if (lane >= MAX_LANES || count === 0 || count > MAX_PARTS || index >= count) return null;
      return { kind, lane, seq: dv.getUint32(2), index, count, payload: b.subarray(SEQ_HEADER) };
    }
    case K_VERSION:
      return b.length < 5 ? null : { kind, version: dv.getUint32(1) };
    default:
      return null;
  }
}

// `a` is newer than `b` in 32-bit serial number arithmetic (RFC 1982).
function newerSeq(a, b) {
  const d = (a - b) >>> 0;
  return d !== 0 && d < 2 ** 31;
}

// Receiver of one lane's sequenced messages (section 8.8.5): the newest delivered, and at most
// one message being assembled (the newest seen); incomplete ones expire PART_EXPIRY_MS after
// their first part; none grows past 16384 bytes.
class SeqReceiver {
  constructor(now = () => performance.now()) {
    this.now = now;
    this.newest = null;
    this.asm = null; // {seq, parts, have, bytes, since}
  }

  // The whole message if this frame completes a newer one; else 'pending', 'stale' or 'bad'.
  push(seq, index, count, part) {
    const t = this.now();
    this.expire(t);
    if (count === 0 || count > MAX_PARTS || index >= count || part.length > MAX_UNRELIABLE_SIZE) return 'bad';
    if (this.newest !== null && !newerSeq(seq, this.newest)) return 'stale';
    if (count === 1) {
      this.newest = seq;
      // What is being assembled is stale now, unless it is newer still.
      if (this.asm && !newerSeq(this.asm.seq, seq)) this.asm = null;
      return part.slice();
    }
    if (this.asm && this.asm.seq === seq) {
      if (this.asm.parts.length !== count) return 'bad';
    } else if (this.asm && newerSeq(this.asm.seq, seq)) {
      return 'stale';
    } else {
      this.asm = { seq, parts: new Array(count), have: 0, bytes: 0, since: t };
    }
    const a = this.asm;
    if (a.parts[index] !== undefined) return 'pending';
    if (a.bytes + part.length > MAX_UNRELIABLE_SIZE) {
      this.asm = null;
      return 'bad';
    }
    a.parts[index] = part.slice();
    a.have++;
    a.bytes += part.length;
    if (a.have < count) return 'pending';
    this.asm = null;
    this.newest = seq;
    return concat(a.parts, a.bytes);
  }

  // Drop an incomplete message past its expiry; true if one was.
  expire(t = this.now()) {
    if (this.asm && t - this.asm.since >= PART_EXPIRY_MS) {
      this.asm = null;
      return true;
    }
    return false;
  }
}

// Lane options of connect(): [{lane, priority = 0, weight = 1}] -> MAX_LANES slots, null for a
// lane not configured; lane 0 is always there (priority 0, weight 1 unless given).
function laneConfigs(lanes) {
  const out = new Array(MAX_LANES).fill(null);
  out[0] = { priority: 0, weight: 1 };
  if (lanes === undefined || lanes === null) return out;
  if (!Array.isArray(lanes)) throw new PeermeshError('invalid_option', 'lanes must be an array of {lane, priority, weight}');
  for (const l of lanes) {
    const lane = l?.lane;
    const priority = l?.priority ?? 0;
    const weight = l?.weight ?? 1;
    if (!Number.isInteger(lane) || lane < 0 || lane >= MAX_LANES) {
      throw new PeermeshError('invalid_option', `a lane is 0 to ${MAX_LANES - 1}, not ${lane}`);
    }
    if (!Number.isInteger(priority) || priority < 0 || priority > 255) {
      throw new PeermeshError('invalid_option', `lane ${lane}: priority must be 0 to 255, not ${priority}`);
    }
    if (!Number.isInteger(weight) || weight < 1 || weight > 65535) {
      throw new PeermeshError('invalid_option', `lane ${lane}: weight must be 1 to 65535, not ${weight}`);
    }
    out[lane] = { priority, weight };
  }
  return out;
}

// The connect option fileLane: {priority = 1, weight = 1}.
function fileLaneConfig(c) {
  if (c === undefined || c === null) return FILE_LANE_DEFAULT;
  const priority = c.priority ?? FILE_LANE_DEFAULT.priority;
  const weight = c.weight ?? FILE_LANE_DEFAULT.weight;
  if (!Number.isInteger(priority) || priority < 0 || priority > 255 || !Number.isInteger(weight) || weight < 1 || weight > 65535) {
    throw new PeermeshError('invalid_option', 'fileLane: priority 0 to 255, weight 1 to 65535');
  }
  return { priority, weight };
}

function readyFrame(gen) {
  const f = new Uint8Array(5);
  f[0] = K_READY;
  new DataView(f.buffer).setUint32(1, gen);
  return f;
}

// UNRELIABLE_PART frames of one split unreliable message (link v2): 1015 bytes each but the last.
function partFrames(msg, bytes) {
  const count = Math.max(1, Math.ceil(bytes.length / PART_BYTES));
  const frames = [];
  for (let i = 0; i < count; i++) {
    const chunk = bytes.subarray(i * PART_BYTES, Math.min((i + 1) * PART_BYTES, bytes.length));
    const f = new Uint8Array(PART_HEADER + chunk.length);
    const dv = new DataView(f.buffer);
    f[0] = K_PART;
    dv.setUint32(1, msg);
    dv.setUint16(5, i);
    dv.setUint16(7, count);
    f.set(chunk, PART_HEADER);
    frames.push(f);
  }
  return frames;
}

// Reassembly of UNRELIABLE_PART frames (from any path, section 7.6): a message is delivered once,
// when all its parts are there; incomplete ones expire PART_EXPIRY_MS after their first part; at
// most PART_MAX_HELD is held, each part counted as its bytes + 64 (the oldest message goes first).
class PartReassembly {
  constructor(stats, now = () => performance.now()) {
    this.stats = stats; // partsDropped, partsExpired, unreliableJoined
    this.now = now;
    this.msgs = new Map(); // msg -> {count, parts, got, len, cost, at}, in order of first arrival
    this.held = 0;
    this.done = new Map(); // msg -> completed at
  }

  // The whole message once `frame` completes it, else null.
  push(frame) {
    const t = this.now();
    this.expire(t);
    if (frame.length < PART_HEADER) return this.drop();
    const dv = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
    const msg = dv.getUint32(1);
    const index = dv.getUint16(5);
    const count = dv.getUint16(7);
    const bytes = frame.subarray(PART_HEADER);
    if (count < 2 || count > MAX_PARTS || index >= count || bytes.length > PART_BYTES) return this.drop();
    if (this.done.has(msg)) return this.drop();
    let m = this.msgs.get(msg);
    if (m) {
      if (count !== m.count || m.parts[index] !== undefined) return this.drop();
      if (m.len + bytes.length > MAX_UNRELIABLE_SIZE) return this.drop();
    } else {
      m = { count, parts: new Array(count), got: 0, len: 0, cost: 0, at: t };
      this.msgs.set(msg, m);
    }
    // Room for it: evict whole messages, oldest first (never the one this part belongs to).
    const cost = bytes.length + PART_OVERHEAD;
    for (const [id, old] of this.msgs) {
      if (this.held + cost <= PART_MAX_HELD) break;
      if (id === msg) continue;
      this.forget(id, old, t);
    }
    m.parts[index] = bytes.slice();
    m.got++;
    m.len += bytes.length;
    m.cost += cost;
    this.held += cost;
    if (m.got < m.count) return null;
    this.msgs.delete(msg);
    this.held -= m.cost;
    this.done.set(msg, t);
    if (this.done.size > PART_DONE_MAX) this.done.delete(this.done.keys().next().value);
    this.stats.unreliableJoined++;
    return concat(m.parts, m.len);
  }

  drop() {
    this.stats.partsDropped++;
    return null;
  }

  // Discard an incomplete message; its late parts are then dropped with it (as parts of a
  // finished message are), not started over as a new message that would expire again.
  forget(id, m, t) {
    this.msgs.delete(id);
    this.held -= m.cost;
    this.stats.partsExpired++;
    this.done.set(id, t);
    if (this.done.size > PART_DONE_MAX) this.done.delete(this.done.keys().next().value);
  }

  expire(t = this.now()) {
    for (const [id, m] of this.msgs) {
      if (t - m.at < PART_EXPIRY_MS) break;
      this.forget(id, m, t);
    }
    for (const [id, at] of this.done) {
      if (t - at < PART_EXPIRY_MS) break;
      this.done.delete(id);
    }
  }
}

/** Internals for unit checks (not part of the API; may change at any time). */

// The version an offer or answer announces: absent (or not a positive integer) means 1.
function signaledVersion(data) {
  return Number.isInteger(data.version) && data.version >= 1 ? data.version : 1;
}

function relayFrame(peer, link, frame) {
  const b = new Uint8Array(9 + frame.length);
  const dv = new DataView(b.buffer);
  b[0] = 0x01;
  dv.setUint32(1, peer);
  dv.setUint32(5, link);
  b.set(frame, 9);
  return b;
}

function readU64(bytes, at) {
  return Number(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(at));
}

function concat(parts, total) {
  if (parts.length === 1) return parts[0].slice();
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// `candidate:<foundation> <component> <proto> <priority> <address> <port> typ <type> ...`
function parseCandidate(line) {
  const f = String(line).replace(/^candidate:/, '').trim().split(/\s+/);
  const typ = f.indexOf('typ');
  if (f.length < 8 || typ < 0 || typ + 1 >= f.length) return null;
  return { key: `${f[4].toLowerCase()} ${f[5]}`, type: f[typ + 1] };
}

function candidateType(t) {
  return t === 'srflx' || t === 'prflx' || t === 'relay' ? t : 'host';
}

// The selected candidate pair from getStats(): transport.selectedCandidatePairId ->
// candidate-pair -> local-candidate / remote-candidate. A remote prflx candidate gets the type
// the peer signaled for the same address and port (section 8.6).
async function selectedPair(pc, signaled) {
  const stats = await pc.getStats();
  let pairId = null;
  stats.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
  });
  if (!pairId) {
    stats.forEach((s) => {
      if (s.type === 'candidate-pair' && s.selected && !pairId) pairId = s.id;
    });
  }
  const p = pairId && stats.get(pairId);
  if (!p) return null;
  const l = stats.get(p.localCandidateId);
  const r = stats.get(p.remoteCandidateId);
  if (!l || !r) return null;
  const remoteAddress = r.address ?? r.ip ?? '';
  let remoteType = candidateType(r.candidateType);
  if (remoteType === 'prflx') {
    remoteType = signaled.get(`${remoteAddress.toLowerCase()} ${r.port}`) ?? remoteType;
  }
  return {
    local: { address: l.address ?? l.ip ?? '', port: l.port, type: candidateType(l.candidateType) },
    remote: { address: remoteAddress, port: r.port, type: remoteType },
  };
}

function pathOf(pair) {
  return `direct ${pair.local.type}/${pair.remote.type}`;
}

// ---- direct policy (docs/PROTOCOL.md §3.3) ----

const POLICY_RANK = { any: 0, relay: 1, none: 2 };

// The stricter of two policies. A value this client does not know counts as 'none': a policy it
// cannot apply must not open more than the server meant.
function strictest(a, b) {
  const known = (p) => (typeof p === 'string' && Object.hasOwn(POLICY_RANK, p) ? p : 'none');
  const [x, y] = [known(a), known(b)];
  return POLICY_RANK[x] >= POLICY_RANK[y] ? x : y;
}

// The client's own policy from its options: `direct` is 'any', 'relay' or 'none'; the older
// `direct: false` means 'none' and `relayOnly: true` means 'relay'.
function ownPolicy(options) {
  const d = options.direct;
  if (d === false || d === 'none') return 'none';
  if (d === 'relay' || options.relayOnly === true) return 'relay';
  if (d === undefined || d === null || d === true || d === 'any') return 'any';
  throw new PeermeshError('invalid_option', `direct must be 'any', 'relay' or 'none', not ${d}`);
}

// A relay candidate (`candidate:...`, with or without `a=`) as it may leave a relay-only end:
// its related address (raddr/rport, this end's own address as the TURN server saw it) becomes
// 0.0.0.0/0. null for a candidate of any other type, or one that does not parse.
function relayCandidate(line) {
  if (parseCandidate(line)?.type !== 'relay') return null;
  // <foundation> <component> <proto> <priority> <address> <port> typ relay, then name/value pairs
  const words = String(line).trim().split(/\s+/);
  for (let i = 8; i + 1 < words.length; i += 2) {
    if (words[i] === 'raddr') words[i + 1] = '0.0.0.0';
    else if (words[i] === 'rport') words[i + 1] = '0';
  }
  return words.join(' ');
}

// `sdp` as it may be sent to (or taken from) a peer of a relay-only pair: without the
// a=candidate lines of any type but relay, relay ones without their related address, and the
// addresses of c= and a=rtcp: lines unspecified (0.0.0.0 or ::). Every other line is kept.
function filterSdp(sdp, policy) {
  if (policy !== 'relay' || typeof sdp !== 'string') return sdp;
  const out = [];
  for (const line of sdp.split(/(?<=\n)/)) {
    const body = line.replace(/[\r\n]+$/, '');
    const end = line.slice(body.length);
    if (body.startsWith('a=candidate:')) {
      const c = relayCandidate(body.slice(2));
      if (c !== null) out.push(`a=${c}${end}`);
      continue;
    }
    const words = body.split(/\s+/);
    const at = words[0].startsWith('c=') ? 2 : words[0].startsWith('a=rtcp:') ? 3 : -1;
    if (at > 0 && words.length === at + 1) {
      words[at] = words[at - 1] === 'IP6' ? '::' : '0.0.0.0';
      out.push(words.join(' ') + end);
    } else {
      out.push(line);
    }
  }
  return out.join('');
}

/**
 * Connect to a peermesh server and say hello.
 * @param {string|object} [url] ws://host:port/ws (http(s)://host:port also works); defaults to
 *   this page's host. May be omitted: connect({ name }).
 * @param {object} options { name, direct = 'any' ('relay', 'none'), sendWindow = 8 MiB,
 *   maxMessageSize = 8 MiB, connectTimeout = 10000, requestTimeout = 10000,
 *   deadPathTimeoutMs = 3000, token, lanes = [] ({lane: 1..7, priority = 0, weight = 1}: lanes
 *   to send on besides lane 0, docs/PROTOCOL.md §8.8) }
 * @returns {Promise<Client>}
 */
export async function connect(url, options) {
  if (options === undefined && url !== null && typeof url === 'object') {
    options = url;
    url = options.url;
  }
  const client = new Client(wsUrlFrom(url), options ?? {});
  await client._handshake();
  return client;
}

/** A session with a peermesh server. Events: see peermesh.d.ts (ClientEventMap). */
export class Client extends EventTarget {
  constructor(url, options) {
    super();
    const name = options.name;
    if (!isValidName(name)) {
      throw new PeermeshError(
        'invalid_name',
        'names are 1-64 bytes of UTF-8 without control, format or invisible characters',
      );
    }
    this.url = url;
    this.name = name;
    /**
     * This client's own limit on direct paths ('any', 'relay' or 'none'), sent in hello; each
     * pair's policy is the strictest of it and the server's for the pair (member.direct).
     */
    this.directPolicy = ownPolicy(options);
    this.sendWindow = Math.min(Math.max(options.sendWindow ?? 8 << 20, 64 << 10), 16 << 20);
    this.maxMessageSize = Math.min(options.maxMessageSize ?? 8 << 20, this.sendWindow);
    /** The lanes this client sends on (index = lane): {priority, weight}, or null if not configured. */
    this.lanes = laneConfigs(options.lanes);
    /** The file lane's schedule (docs/PROTOCOL.md §8.9): {priority, weight}, default {1, 1}. */
    this.fileLane = fileLaneConfig(options.fileLane);
    this._files = new Files(this);
    this._listeners = new Map(); // event type -> listeners added (see _listens)
    this.connectTimeout = options.connectTimeout ?? 10000;
    // Identity token (a JWT from the app's backend), required by servers run with an auth secret.
    this.token = typeof options.token === 'string' ? options.token : null;
    this.requestTimeout = options.requestTimeout ?? 10000;
    // A direct path on which nothing arrives for this long is given up (section 8.7).
    const dead = Number(options.deadPathTimeoutMs ?? DEAD_PATH_TIMEOUT_MS);
    this.deadPathTimeoutMs = Number.isFinite(dead) && dead > 0 ? dead : DEAD_PATH_TIMEOUT_MS;
    /** This client's peer id (from welcome). */
    this.peerId = 0;
    /** The ICE servers new PeerConnections use (welcome, then every ice_servers message). */
    this.iceServers = [];
    /** Limits announced by the server. */
    this.limits = null;
    this._ws = null;
    this._links = new Map(); // peer -> Link
    this._groups = new Map(); // group -> Map(peer -> {peer, name, user, direct})
    this._pendingJoins = new Map();
    this._pendingLeaves = new Map();
    this._closed = false;
    this._heartbeat = null;
    this._nextPing = 1;
    this._lastRecv = 0;
    this._timeoutMs = 15000;
    // Reconnect after a lost connection (section 3.14): false, or back-off settings.
    const r = options.reconnect ?? {};
    this.reconnect =
      r === false
        ? null
        : {
            initialDelayMs: Number(r.initialDelayMs ?? 250),
            maxDelayMs: Number(r.maxDelayMs ?? 10000),
            maxAttempts: Number(r.maxAttempts ?? Infinity),
          };
    this._resumeToken = null;
    this._reconnecting = false;
    this._resyncing = new Set(); // groups whose next 'joined' reconciles (after a resume)
    this._rejoining = new Set(); // groups joined again by the client itself (new session)
    // The server is draining (PROTOCOL.md §3.15): null, 'holding' (links hold new reliable
    // messages; 'drained' goes once all they sent is acknowledged) or 'answered'.
    this._draining = null;
    this._drainCheck = null;
    // Reliable messages an ended session's links held, waiting for a link to the same user in
    // the new session: {peer, user, name, messages, until}.
    this._carried = [];
  }

  addEventListener(type, listener, options) {
    if (listener) this._listeners.set(type, (this._listeners.get(type) ?? 0) + 1);
    super.addEventListener(type, listener, options);
  }

  removeEventListener(type, listener, options) {
    if (listener && this._listeners.get(type) > 0) this._listeners.set(type, this._listeners.get(type) - 1);
    super.removeEventListener(type, listener, options);
  }

  // Whether anything listens to `type` (approximately: a listener added twice counts twice).
  _listens(type) {
    return (this._listeners.get(type) ?? 0) > 0;
  }

  /** Listen to an event; the handler gets the event's detail. Returns an unsubscribe function. */
  on(type, handler) {
    const h = (e) => void handler(e.detail);
    this.addEventListener(type, h);
    return () => this.removeEventListener(type, h);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _handshake() {
    return this._open(null).then((msg) => this._welcomed(msg));
  }

  // Open a WebSocket and say hello (resuming `resume` if given; a refused resume falls back to
  // a new session on the same connection). Resolves to the welcome, once this._ws is the new
  // socket and its frames reach _onText/_onBinary.
  _open(resume) {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (e) {
        reject(new PeermeshError('connect', `cannot open ${this.url}: ${e.message}`));
        return;
      }
      ws.binaryType = 'arraybuffer';
      if (resume === null) this._ws = ws;
      let welcomed = false;
      const timer = setTimeout(() => {
        if (welcomed) return;
        ws.close();
        reject(new PeermeshError('timeout', `no welcome from ${this.url} within ${this.connectTimeout} ms`));
      }, this.connectTimeout);
      const hello = (resuming) => {
        const h = { type: 'hello', version: PROTOCOL_VERSION, name: this.name };
        if (this.token !== null) h.token = this.token;
        if (this.directPolicy !== 'any') h.direct = this.directPolicy;
        if (this.reconnect) h.resumable = true;
        if (resuming) h.resume = resume;
        ws.send(JSON.stringify(h));
      };
      ws.onopen = () => hello(resume !== null);
      ws.onmessage = (e) => {
        this._lastRecv = performance.now();
        if (welcomed) {
          if (typeof e.data === 'string') this._onText(e.data);
          else this._onBinary(new Uint8Array(e.data));
          return;
        }
        if (typeof e.data !== 'string') return;
        let msg;
        try {
          msg = JSON.parse(e.data);
        } catch {
          return;
        }
        if (msg.type === 'error' && msg.code === 'resume_failed' && resume !== null) {
          // The session is gone (the server restarted, or the grace ran out): a new one.
          resume = null;
          hello(false);
        } else if (msg.type === 'error') {
          clearTimeout(timer);
          ws.close();
          reject(new PeermeshError(msg.code, msg.message));
        } else if (msg.type === 'welcome') {
          clearTimeout(timer);
          if (msg.version !== PROTOCOL_VERSION) {
            ws.close();
            reject(new PeermeshError('version_mismatch', `server speaks protocol ${msg.version}, not ${PROTOCOL_VERSION}`));
            return;
          }
          welcomed = true;
          this._ws = ws;
          resolve(msg);
        }
      };
      ws.onclose = (e) => {
        clearTimeout(timer);
        if (!welcomed) {
          reject(new PeermeshError('connect', `server closed the connection (${e.code}${e.reason ? ' ' + e.reason : ''})`));
          return;
        }
        if (this._ws !== ws) return; // an old connection, replaced by a reconnect
        this._onClose(e.code, e.reason || 'connection closed');
      };
      ws.onerror = () => {}; // a close event follows
    });
  }

  // Adopt a welcome: peer id, ICE servers, heartbeat.
  _welcomed(msg) {
    this.peerId = msg.peer;
    this.iceServers = msg.ice_servers ?? [];
    this.limits = msg.limits ?? null;
    this._resumeToken = msg.resume_token ?? null;
    this._timeoutMs = msg.heartbeat_timeout_ms ?? 15000;
    const every = Math.min(Math.max(msg.heartbeat_interval_ms ?? 5000, 100), 60000);
    clearInterval(this._heartbeat);
    this._lastRecv = performance.now();
    this._heartbeat = setInterval(() => this._tick(), every);
    this._tick();
  }

  _tick() {
    this._expireCarried(performance.now());
    // JSON ping: the portable heartbeat (browsers cannot send WebSocket pings).
    this._sendJson({ type: 'ping', id: this._nextPing++ });
    // The server answers every ping: silence this long means the connection is gone.
    if (performance.now() - this._lastRecv > this._timeoutMs) {
      const ws = this._ws;
      this._onClose(4000, 'server silent');
      ws?.close(4000, 'server silent');
    }
  }

  // The connection ended: reconnect if it was lost and reconnecting is on, else end.
  _onClose(code, reason) {
    if (this._closed || this._reconnecting) return;
    // 1001 going away / heartbeat, 1006 lost, 1012 restarting, 1013 too slow, 4000 silent.
    const lost = [1001, 1005, 1006, 1012, 1013, 4000].includes(code);
    if (!this.reconnect || !lost) {
      this._end(code, reason, false);
      return;
    }
    this._reconnecting = true;
    this._ws = null;
    clearInterval(this._heartbeat);
    clearInterval(this._drainCheck);
    // Requests in flight are not answered on a new connection.
    const err = new PeermeshError('reconnecting', 'the connection to the server was lost');
    for (const p of [...this._pendingJoins.values(), ...this._pendingLeaves.values()]) p.reject(err);
    this._pendingJoins.clear();
    this._pendingLeaves.clear();
    // Nothing is relayed until the session is back; unacknowledged frames go again then.
    for (const link of this._links.values()) link.relayPaused = true;
    this._retry(1, reason);
  }

  _retry(attempt, reason) {
    if (this._closed) return;
    const r = this.reconnect;
    if (attempt > r.maxAttempts) {
      this._reconnecting = false;
      this._end(1006, `${reason}; gave up after ${attempt - 1} attempts`, false);
      return;
    }
    const base = Math.min(r.initialDelayMs * 2 ** Math.min(attempt - 1, 16), r.maxDelayMs);
    const delay = Math.round(base * (0.5 + Math.random() / 2));
    this._emit('reconnecting', { attempt, delay });
    setTimeout(() => {
      if (this._closed) return;
      const resume = this._resumeToken ? { peer: this.peerId, token: this._resumeToken } : null;
      this._open(resume).then(
        (msg) => {
          if (this._closed) {
            this._ws?.close(1000);
            return;
          }
          this._reconnecting = false;
          this._reconnected(msg);
        },
        (e) => {
          if (['unauthorized', 'unsupported_version', 'version_mismatch'].includes(e.code)) {
            this._reconnecting = false;
            this._end(1008, `reconnecting: ${e.message}`, false);
          } else {
            this._retry(attempt + 1, reason);
          }
        },
      );
    }, delay);
  }

  _reconnected(msg) {
    const known = [...this._groups.keys()];
    this._welcomed(msg);
    // A drain ends with the connection (a resume's resync() ends the links' hold).
    this._draining = null;
    if (msg.resumed) {
      const now = new Set(msg.groups ?? []);
      for (const g of known) if (!now.has(g)) this._forgetGroup(g);
      this._resyncing = now;
      this._emit('reconnected', { peer: this.peerId, resumed: true });
      for (const link of this._links.values()) link.resync();
      return;
    }
    // A new session: links and link ids are gone. Held messages (a drain) were never
    // transmitted: they go on the next link to the same user. Report what may not have arrived.
    this._emit('reconnected', { peer: this.peerId, resumed: false });
    const users = new Map();
    for (const members of this._groups.values()) for (const m of members.values()) users.set(m.peer, m.user);
    const until = performance.now() + CARRY_WAIT_MS;
    for (const link of [...this._links.values()]) {
      const { messages, undelivered } = link.takeHeld();
      if (undelivered > 0) this._emit('undelivered', { peer: link.peer, messages: undelivered });
      if (messages.length > 0) {
        this._carried.push({ peer: link.peer, user: users.get(link.peer) ?? null, name: link.name, messages, until });
      }
    }
    for (const g of known) {
      for (const peer of [...(this._groups.get(g)?.keys() ?? [])]) this._removeMember(g, peer);
    }
    for (const link of this._links.values()) link._close();
    this._links.clear();
    this._groups.clear();
    this._resyncing = new Set();
    this._rejoining = new Set(known);
    for (const g of known) this._sendJson({ type: 'join', group: g });
  }

  // Held messages whose user did not come back in time (or the session ended): tell the app.
  _expireCarried(now) {
    const expired = this._carried.filter((c) => c.until <= now);
    this._carried = this._carried.filter((c) => c.until > now);
    for (const c of expired) this._emit('undelivered', { peer: c.peer, messages: c.messages.length });
  }

  // The server is draining: hold new reliable messages, answer once every link has had what it
  // sent acknowledged. A client that does not reconnect keeps sending until the end.
  _onDrain(msg) {
    if (!this.reconnect || this._draining) return;
    if (typeof msg.reconnect_url === 'string') this.url = msg.reconnect_url;
    this._draining = 'holding';
    for (const link of this._links.values()) link.hold();
    clearInterval(this._drainCheck);
    this._drainCheck = setInterval(() => {
      if (this._draining !== 'holding') {
        clearInterval(this._drainCheck);
        return;
      }
      if ([...this._links.values()].every((l) => l.drained())) {
        this._draining = 'answered';
        clearInterval(this._drainCheck);
        this._sendJson({ type: 'drained' });
      }
    }, DRAIN_CHECK_MS);
  }

  _forgetGroup(group) {
    for (const peer of [...(this._groups.get(group)?.keys() ?? [])]) this._removeMember(group, peer);
    this._groups.delete(group);
    this._emit('groupleft', { group });
  }

  _end(code, reason, byClient) {
    if (this._closed) return;
    this._closed = true;
    this._reconnecting = false;
    clearInterval(this._heartbeat);
    clearInterval(this._drainCheck);
    for (const link of this._links.values()) link._close();
    this._links.clear();
    this._groups.clear();
    this._expireCarried(Infinity);
    const err = new PeermeshError('closed', 'the session has ended');
    for (const p of [...this._pendingJoins.values(), ...this._pendingLeaves.values()]) p.reject(err);
    this._pendingJoins.clear();
    this._pendingLeaves.clear();
    this._emit('close', { code, reason, byClient });
  }

  _sendJson(msg) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(msg));
  }

  _sendBinary(bytes) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(bytes);
  }

  _checkLane(lane) {
    if (!Number.isInteger(lane) || lane < 0 || lane >= MAX_LANES || this.lanes[lane] === null) {
      throw new PeermeshError('invalid_lane', `lane ${lane} is not configured (connect option lanes)`);
    }
  }

  /** Whether the session has ended. */
  get closed() {
    return this._closed;
  }

  /** The groups this client is in. */
  get groups() {
    return [...this._groups.keys()];
  }

  /**
   * Join a group (created on first join). Resolves to its other members, after a
   * 'memberjoined' event for each of them.
   */
  join(group) {
    return this._request(this._pendingJoins, group, 'join', () => {
      if (!isValidGroup(group)) throw new PeermeshError('invalid_group', `invalid group name: ${group}`);
      if (this._pendingJoins.has(group)) throw new PeermeshError('already_member', `a join of ${group} is already under way`);
    });
  }

  /** Leave a group; a 'memberleft' event is emitted for each of its members. */
  leave(group) {
    return this._request(this._pendingLeaves, group, 'leave', () => {
      if (!this._groups.has(group)) throw new PeermeshError('not_member', `not in group ${group}`);
    });
  }

  _request(pending, group, type, check) {
    return new Promise((resolve, reject) => {
      if (this._closed) throw new PeermeshError('closed', 'the session has ended');
      check();
      const timer = setTimeout(() => {
        if (pending.get(group)?.timer === timer) pending.delete(group);
        reject(new PeermeshError('timeout', `no answer to ${type} ${group}`));
      }, this.requestTimeout);
      pending.set(group, {
        timer,
        resolve: (v) => (clearTimeout(timer), resolve(v)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
      this._sendJson({ type, group });
    });
  }

  /** The other members of a group this client is in, by ascending peer id. */
  members(group) {
    const m = this._groups.get(group);
    if (!m) throw new PeermeshError('not_member', `not in group ${group}`);
    return [...m.values()].map((x) => ({ ...x })).sort((a, b) => a.peer - b.peer);
  }

  /** A co-member's display name, or undefined. */
  nameOf(peer) {
    return this._links.get(peer)?.name;
  }

  _link(peer) {
    if (this._closed) throw new PeermeshError('closed', 'the session has ended');
    const link = this._links.get(peer);
    if (!link) throw new PeermeshError('unknown_peer', `no shared group with peer ${peer}`);
    return link;
  }

  /**
   * Send to a co-member. Reliable messages (default; up to maxMessageSize) arrive complete, in
   * order (per lane) and once, whatever path changes happen; the promise resolves once the
   * message is handed to the link, waiting while the lane's share of the send window is full.
   * `lane` (default 0; others must be configured with the connect option `lanes`, else
   * PeermeshError 'invalid_lane'): each lane is an ordered stream of its own, so a bulk
   * transfer on one lane does not hold up another (docs/PROTOCOL.md §8.8). Unreliable messages
   * ({ reliable: false }, up to 16384 bytes) go on the current path, best effort; they have no
   * lane (`lane` is ignored, as in the reference client).
   */
  async send(peer, data, { reliable = true, lane = 0 } = {}) {
    const bytes = toBytes(data);
    const link = this._link(peer);
    if (reliable) {
      this._checkLane(lane);
      await link.sendReliable(bytes, true, lane);
    } else {
      link.sendUnreliable(bytes);
    }
  }

  /** Like send(), but throws a PeermeshError 'would_block' instead of waiting for the window. */
  trySend(peer, data, { reliable = true, lane = 0 } = {}) {
    const bytes = toBytes(data);
    const link = this._link(peer);
    if (reliable) {
      this._checkLane(lane);
      link.sendReliable(bytes, false, lane);
    } else {
      link.sendUnreliable(bytes);
    }
  }

  /**
   * Send a sequenced unreliable message on a configured `lane` (up to 16384 bytes): best
   * effort, and the peer drops it if it already delivered a newer one of that lane (for state
   * updates; docs/PROTOCOL.md §8.8). A peer without lanes gets it as a plain unreliable message.
   * Until the peer's link protocol version is known (about a round trip after the link starts)
   * only the newest sequenced message per lane waits.
   */
  sendSequenced(peer, lane, data) {
    const bytes = toBytes(data);
    const link = this._link(peer);
    this._checkLane(lane);
    link.sendSequenced(lane, bytes);
  }

  /**
   * Send a file (a Blob or File) to a co-member on the file lane (docs/PROTOCOL.md §8.9): hashed
   * first (SHA-256, read a slice at a time), offered, and streamed once the peer accepts, from
   * the offset it asks for (a native receiver may resume). Returns the transfer at once:
   * {id, peer, name, size, cancel(), on('progress', ...), done}; `done` resolves to
   * {name, size, sha256 (hex), bytesSent, resumedFrom} once the peer has the whole file, checked,
   * or rejects with a PeermeshError: 'rejected', 'cancelled', 'io', 'disk_full', 'too_large',
   * 'hash_mismatch', 'protocol', 'other' (an unknown code; `wireCode`), 'unsupported' (the peer's
   * link protocol version is below 4) or 'peer_left' (the link ended). `byPeer` tells who ended
   * it. `name` defaults to file.name.
   */
  sendFile(peer, file, { name } = {}) {
    if (typeof Blob === 'undefined' || !(file instanceof Blob)) {
      throw new TypeError('peermesh: sendFile takes a Blob or File');
    }
    const n = name ?? (typeof file.name === 'string' && file.name !== '' ? file.name : 'file');
    return this._files.send(this._link(peer), file, String(n));
  }

  /** Send to every other member of a group. */
  async broadcast(group, data, options) {
    const bytes = toBytes(data);
    const peers = this.members(group).map((m) => m.peer);
    await Promise.all(
      peers.map((peer) =>
        this.send(peer, bytes, options).catch((e) => {
          if (e.code !== 'unknown_peer') throw e; // it left meanwhile
        }),
      ),
    );
  }

  /** Resolves once every reliable message sent so far has been acknowledged. */
  async flush() {
    await Promise.all([...this._links.values()].map((l) => l.flush()));
  }

  /** The path to a peer now: 'server' or 'direct <local>/<remote>' (e.g. 'direct host/host'). */
  path(peer) {
    return this._link(peer).path;
  }

  /** Smoothed round-trip time to a peer on the current path (ms), or null before a sample. */
  rtt(peer) {
    return this._link(peer).rtt;
  }

  /** The direct path's candidate pair ({local, remote}: {address, port, type}), or null. */
  candidatePair(peer) {
    const p = this._link(peer).pair;
    return p && { local: { ...p.local }, remote: { ...p.remote } };
  }

  /** Counters of the link to a peer. */
  stats(peer) {
    const l = this._link(peer);
    return {
      path: l.path,
      rtt: l.rtt,
      ...l.stats,
      unacked: l.unackedCount(),
      windowUsed: l.windowUsed,
      peerLanes: l.peerLanes,
      peerVersion: l.peerVersion,
    };
  }

  /** Leave every group and close the session. Unacknowledged reliable messages are abandoned. */
  async close() {
    if (this._closed) return;
    const ws = this._ws;
    this._end(1000, 'closed by the client', true);
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  }

  // ---- session messages ----

  _onText(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      console.warn('peermesh: unparsable server frame');
      return;
    }
    switch (msg.type) {
      case 'joined': {
        if (this._resyncing.delete(msg.group)) {
          // After a resume: the members now, against what the client knew.
          const known = this._groups.get(msg.group) ?? new Map();
          const listed = new Set(msg.members.map((m) => m.peer));
          for (const peer of [...known.keys()]) if (!listed.has(peer)) this._removeMember(msg.group, peer);
          if (!this._groups.has(msg.group)) this._groups.set(msg.group, new Map());
          for (const m of msg.members) {
            if (this._links.get(m.peer)?.linkId !== m.link || !known.has(m.peer)) this._addMember(msg.group, m);
          }
          this._ack(msg);
          break;
        }
        this._groups.set(msg.group, new Map());
        if (this._rejoining.delete(msg.group)) this._emit('rejoined', { group: msg.group });
        else this._emit('groupjoined', { group: msg.group });
        const members = msg.members.map((m) => this._addMember(msg.group, m));
        this._pendingJoins.get(msg.group)?.resolve(members);
        this._pendingJoins.delete(msg.group);
        this._ack(msg);
        break;
      }
      case 'member_joined':
        this._addMember(msg.group, msg.member);
        this._ack(msg);
        break;
      case 'member_left':
        this._removeMember(msg.group, msg.peer);
        this._ack(msg);
        break;
      case 'left': {
        for (const peer of [...(this._groups.get(msg.group)?.keys() ?? [])]) this._removeMember(msg.group, peer);
        this._groups.delete(msg.group);
        this._emit('groupleft', { group: msg.group });
        this._pendingLeaves.get(msg.group)?.resolve();
        this._pendingLeaves.delete(msg.group);
        this._ack(msg);
        break;
      }
      case 'signal': {
        const link = this._links.get(msg.from);
        if (link && link.linkId === msg.link) link.onSignal(msg.data);
        break;
      }
      case 'ice_servers':
        if (Array.isArray(msg.ice_servers)) this.iceServers = msg.ice_servers;
        break;
      case 'member_suspended': {
        const link = this._links.get(msg.peer);
        if (link) link.relayPaused = true;
        break;
      }
      case 'member_resumed':
        this._links.get(msg.peer)?.resync();
        break;
      case 'drain':
        this._onDrain(msg);
        break;
      case 'error':
        this._onError(msg);
        break;
      default: // pong, and message types newer than this client
        break;
    }
  }

  // A membership change is processed (its events dispatched): tell the server, if it asked.
  _ack(msg) {
    if (Number.isInteger(msg.change)) this._sendJson({ type: 'ack', group: msg.group, change: msg.change });
  }

  _onError(msg) {
    const pending =
      msg.request === 'join' ? this._pendingJoins : msg.request === 'leave' ? this._pendingLeaves : null;
    const p = pending && msg.group !== undefined ? pending.get(msg.group) : undefined;
    if (p) {
      pending.delete(msg.group);
      p.reject(new PeermeshError(msg.code, msg.message, { request: msg.request, group: msg.group }));
      return;
    }
    // A frame to a peer that has just left is refused: that peer is gone, and so is the frame.
    const departed =
      msg.code === 'not_co_member' &&
      (msg.request === 'relay' || msg.request === 'signal') &&
      msg.peer !== undefined &&
      !this._links.has(msg.peer);
    if (departed) return;
    // Frames in flight to a peer whose session was just suspended: its link sends them again
    // on member_resumed.
    if (msg.code === 'peer_suspended') return;
    // A group this client joins again by itself after a new session: it is gone.
    if (msg.request === 'join' && this._rejoining.delete(msg.group)) {
      this._emit('groupleft', { group: msg.group });
    }
    // Reports for the server's records (ack, path): a refusal (a link that has just ended or
    // been replaced, a group just left, an older server) changes nothing for the app.
    if (msg.request === 'ack' || msg.request === 'path') return;
    // The server does not let this pair exchange signals: no direct path, for good.
    if (msg.code === 'direct_not_allowed' && msg.request === 'signal' && msg.peer !== undefined) {
      this._links.get(msg.peer)?.restrict('none', 'the server does not allow a direct path to this peer');
      return;
    }
    this._emit('error', { code: msg.code, message: msg.message, request: msg.request, group: msg.group, peer: msg.peer });
  }

  _onBinary(buf) {
    if (buf.length < 9 || buf[0] !== 0x01) return;
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const link = this._links.get(dv.getUint32(1));
    if (link && link.linkId === dv.getUint32(5)) link.onFrame(buf.subarray(9), false);
  }

  // Records a member and makes (or keeps) its link; returns the member as the app sees it.
  _addMember(group, m) {
    if (!this._groups.has(group)) this._groups.set(group, new Map());
    const policy = strictest(this.directPolicy, m.direct ?? 'any');
    let link = this._links.get(m.peer);
    if (link && link.linkId !== m.link) {
      link._close();
      link = undefined;
    }
    if (!link) {
      link = new Link(this, m.peer, m.link, m.initiator, m.name, policy);
      this._links.set(m.peer, link);
      // What an ended session held for this user goes first (before the app hears of the
      // member and can send anything itself).
      const user = m.user ?? null;
      const i = this._carried.findIndex((c) => (c.user !== null || user !== null ? c.user === user : c.name === m.name));
      if (i >= 0) {
        const [c] = this._carried.splice(i, 1);
        for (const { lane, bytes } of c.messages) {
          try {
            Promise.resolve(link.sendReliable(bytes, true, lane)).catch((e) =>
              console.warn(`peermesh: a held message was not re-sent: ${e.message}`),
            );
          } catch (e) {
            console.warn(`peermesh: a held message was not re-sent: ${e.message}`);
          }
        }
      }
      if (this._draining) link.hold();
    } else {
      // The pair shares another group already: the server made its policy with the link, so
      // this is only ever the same, but a stricter one wins.
      link.restrict(policy);
    }
    link.groups.add(group);
    const member = { peer: m.peer, name: m.name, user: m.user ?? null, direct: link.policy };
    this._groups.get(group).set(m.peer, member);
    this._emit('memberjoined', { group, ...member });
    return { ...member };
  }

  _removeMember(group, peer) {
    const members = this._groups.get(group);
    const name = members?.get(peer)?.name;
    members?.delete(peer);
    const link = this._links.get(peer);
    if (link) {
      link.groups.delete(group);
      if (link.groups.size === 0) {
        this._links.delete(peer);
        link._close();
      }
    }
    if (name !== undefined) this._emit('memberleft', { group, peer, name });
  }
}

// ---- one link per co-member (sections 7 and 8) ----

// Window cost of a reliable message: its bytes + 64 per fragment.
function reliableCost(n) {
  return n + Math.max(1, Math.ceil(n / MAX_FRAGMENT)) * FRAGMENT_OVERHEAD;
}

const DEFAULT_LANE = { priority: 0, weight: 1 };
const laneCfg = (L) => L.cfg ?? DEFAULT_LANE;

// The delivery-rate and least-RTT estimate behind the lanes' bound Q (section 8.8.3); starts over
// on every path change.
function newPace() {
  return { minRtt: null, sampleStart: null, sampleAcked: 0, rates: [] }; // rates: [at, bytes per ms]
}

function paceAcked(p, cost, now) {
  if (p.sampleStart === null) {
    p.sampleStart = now;
    p.sampleAcked = 0;
    return;
  }
  p.sampleAcked += cost;
  const span = now - p.sampleStart;
  if (span < Math.max(RATE_INTERVAL_MS, p.minRtt ?? 0)) return;
  p.rates.push([now, p.sampleAcked / span]);
  p.sampleStart = now;
  p.sampleAcked = 0;
  const window = Math.max(RATE_WINDOW_MIN_MS, 10 * (p.minRtt ?? 0));
  while (p.rates.length > 0 && now - p.rates[0][0] > window) p.rates.shift();
}

function paceBound(p, ceiling) {
  let rate = 0;
  for (const [, r] of p.rates) rate = Math.max(rate, r);
  const bdp = p.minRtt === null ? 0 : rate * p.minRtt;
  return Math.min(ceiling, Math.max(LANES_QUEUE_FLOOR, 2 * bdp));
}

// State of one lane of a link: its reliable send stream, its receive stream, its sequenced
// messages and its scheduling.
function newLane(lane, cfg) {
  return {
    lane,
    cfg, // {priority, weight}, or null: not configured (it still receives)
    // sending
    nextSeq: 1,
    unacked: [], // {seq, frame, cost, fin, sent}, seq order, contiguous; entries before head are gone
    head: 0,
    unackedCost: 0,
    nextTx: 1, // seq of the next fragment to transmit; rewound to the oldest unacked on a re-send
    txCost: 0, // cost of the unacked fragments below nextTx (transmitted, not acknowledged)
    heldFrom: null, // draining: first seq held
    waiting: [], // reliable messages waiting for the peer's VERSION
    seqWaiting: null, // the newest sequenced message waiting for it
    heldCost: 0, // window taken by waiting and seqWaiting
    waiters: [], // messages waiting for window: {cost, resolve, reject, admit}
    nextSeqMsg: 1, // seq of the next sequenced message
    deficit: 0,
    // receiving
    delivered: 0,
    ackedSent: 0,
    unackedBytes: 0, // fragment bytes delivered since the last ACK (ACK_BYTES)
    ackDue: false,
    ackTimer: null,
    reorder: new Map(),
    partial: [],
    partialLen: 0,
    discarding: false,
    seqRx: new SeqReceiver(),
  };
}

class Link {
  constructor(client, peer, linkId, initiator, name, policy = 'any') {
    this.c = client;
    this.peer = peer;
    this.linkId = linkId;
    this.initiator = initiator;
    this.name = name;
    // The pair's direct policy: 'none' makes no PeerConnection and declines offers, 'relay'
    // makes relay-only ones and never sends or takes another kind of candidate.
    this.policy = policy;
    this.groups = new Set();
    this.closed = false;
    // Lanes (section 8.8): lane i at index i, configured or not (any lane may receive). Each
    // has its own reliable send and receive streams (lane 0: DATA/ACK) and sequenced counters.
    this.lanes = [];
    for (let i = 0; i < MAX_LANES; i++) this.lanes.push(newLane(i, client.lanes?.[i] ?? (i === 0 ? { priority: 0, weight: 1 } : null)));
    // Lane 8, the file lane (section 8.9): used only once the peer's VERSION said 4 or more.
    this.lanes.push(newLane(FILE_LANE, client.fileLane ?? FILE_LANE_DEFAULT));
    // Whether the peer has lanes: 'unknown' until its VERSION (or its lack) tells, then 'lanes'
    // or 'lane0' (every lane on lane 0) for the rest of the link (section 8.8.2).
    this.peerLanes = 'unknown';
    this.peerVersion = null; // the peer's link protocol version, from its first VERSION
    this.started = performance.now();
    this.versionAnswered = false; // the peer's VERSION was answered (since the start or the last resync)
    this.rr = 0; // deficit round robin cursor, and whether its lane has had this visit's credit
    this.rrFresh = true;
    this.pumping = false;
    this.pace = newPace();
    this.draining = false; // the server drains (see hold())
    this.windowUsed = 0; // every lane's unacknowledged fragments and waiting messages
    this.flushWaiters = []; // {target: seq per lane, waiting, resolve}
    this.decidedWaiters = [];
    // receiving: fragments held for reordering, every lane together (bounded together)
    this.reorderCount = 0;
    this.reorderBytes = 0;
    this.nextPartMsg = 1; // msg of the next split unreliable message (link v2)
    // path
    this.path = 'server';
    // The server path is interrupted (member_suspended, or this client is reconnecting).
    this.relayPaused = false;
    this.pair = null;
    this.pc = null;
    this.gen = 0;
    this.r = null;
    this.u = null;
    this.u2 = null; // link v2: the in-band unreliable channel this end opened (sends go here)
    this.u2In = null; // link v2: the peer's in-band "u2" (receive only)
    this.u2Reliable = false; // the peer asked for a reliable "u2" ("u2_reliable" in its offer/answer)
    this.rOpen = false;
    this.uOpen = false;
    this.u2Open = false;
    this.u2InOpen = false;
    this.readySent = false;
    this.version = 0; // link protocol version of generation `gen` (0: not known yet)
    this.connected = false;
    this.connectTimer = null;
    this.lastDirectRecv = 0; // when a frame last arrived on the current generation's channels
    this.deadTimer = null;
    this.peerReady = 0;
    this.retryTimer = null;
    this.backoff = RETRY_MIN_MS;
    this.hadDirect = false;
    this.declined = false;
    this.upgrading = null; // the PeerConnection whose selected pair maybeUpgrade waits for
    this.signaled = new Map(); // "address port" -> candidate type the peer signaled
    this.remoteSet = false;
    this.remoteQueue = [];
    this.localSent = false;
    this.localQueue = [];
    // RTT
    this.nextPing = 1;
    this.pings = []; // [id, sent at]
    this.rtt = null;
    this.stats = {
      sentServer: 0,
      sentDirect: 0,
      recvServer: 0,
      recvDirect: 0,
      resent: 0,
      duplicates: 0,
      pathChanges: 0,
      candidatesHost: 0,
      candidatesSrflx: 0,
      candidatesRelay: 0,
      unreliableSplit: 0,
      unreliableJoined: 0,
      partsDropped: 0,
      partsExpired: 0,
      deadPaths: 0,
      sequencedStale: 0,
      sequencedReplaced: 0,
      reorderFull: 0,
      tooLarge: 0,
    };
    this.parts = new PartReassembly(this.stats);
    this.pingTimer = setInterval(() => this.onPingTimer(), PING_EVERY_MS);
    // VERSION first, before the first PING (section 8.8.2): a peer's frame without a VERSION
    // before it tells an old peer apart.
    this.relay(versionFrame());
    this.sendPing();
    if (this.initiator && this.policy !== 'none') this.start();
  }

  // Tightens the pair's policy. A PeerConnection made under the looser one is dropped (it may
  // be using, or have signaled, addresses the new one forbids); under 'relay' the initiator
  // starts a relay-only one, under 'none' nothing more is tried. `why`: tell the app
  // ('nodirectpath') if the link was trying.
  restrict(policy, why = null) {
    const next = strictest(this.policy, policy);
    if (this.closed || next === this.policy) return;
    this.policy = next;
    const trying = this.pc !== null || this.retryTimer !== null || this.isDirect();
    this.downgrade('direct policy tightened');
    this.resetRtc();
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (why !== null && trying) this.c._emit('nodirectpath', { peer: this.peer, reason: why });
    if (this.initiator && next !== 'none' && !this.declined) this.start();
  }

  _close() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.pingTimer);
    clearTimeout(this.retryTimer);
    for (const L of this.lanes) clearTimeout(L.ackTimer);
    this.resetRtc();
    const err = new PeermeshError('unknown_peer', `the link to peer ${this.peer} has closed`);
    for (const L of this.lanes) {
      for (const w of L.waiters) w.reject(err);
      L.waiters = [];
    }
    for (const f of this.flushWaiters) f.resolve();
    this.flushWaiters = [];
    for (const f of this.decidedWaiters) f();
    this.decidedWaiters = [];
    this.c._files?.linkClosed(this);
  }

  // Whether the peer takes the file lane (section 8.9): null until its lanes are decided.
  peerFiles() {
    if (this.peerLanes === 'unknown') return null;
    return this.peerLanes === 'lanes' && this.peerVersion !== null && this.peerVersion >= 4;
  }

  // Resolves once the peer's lanes are decided (or the link closed).
  decided() {
    if (this.peerLanes !== 'unknown' || this.closed) return Promise.resolve();
    return new Promise((resolve) => this.decidedWaiters.push(resolve));
  }

  // Whether a file transfer has DATA unacknowledged or waiting: the lanes' queue bound Q then
  // applies as with several app lanes (section 8.9).
  filesBusy() {
    const F = this.lanes[FILE_LANE];
    return F.unackedCost + F.heldCost > 0;
  }

  // ---- sending ----

  unackedCount() {
    return this.lanes.reduce((n, L) => n + L.unacked.length - L.head, 0);
  }

  // Lanes that share the window with reserves (section 8.8.4): the configured ones, or one when
  // every lane goes on lane 0.
  reservingLanes() {
    if (this.peerLanes === 'lane0') return 1;
    return Math.max(1, this.lanes.filter((L) => L.lane < MAX_LANES && L.cfg !== null).length);
  }

  // The file lane keeps no reserve but holds at most half the window, so the app's lanes always
  // keep the other half (section 8.9).
  fileLaneFree(free) {
    const F = this.lanes[FILE_LANE];
    return Math.min(free, Math.max(0, Math.floor(this.c.sendWindow / 2) - F.unackedCost - F.heldCost));
  }

  // Window lane `lane` may take now: what is free, less the unused reserve (window / (2K)) of
  // every other configured lane, so that a bulk lane never takes what a chat lane needs.
  laneFree(lane) {
    const w = this.c.sendWindow;
    const free = Math.max(0, w - this.windowUsed);
    const k = this.reservingLanes();
    if (k === 1) return lane === FILE_LANE ? this.fileLaneFree(free) : free;
    const reserve = Math.floor(w / (2 * k));
    let owed = 0;
    for (const L of this.lanes) {
      if (L.lane !== lane && L.lane < MAX_LANES && L.cfg !== null) owed += Math.max(0, reserve - L.unackedCost - L.heldCost);
    }
    const left = Math.max(0, free - owed);
    return lane === FILE_LANE ? this.fileLaneFree(left) : left;
  }

  // Most window one lane can ever hold: the window less the other lanes' reserves.
  laneCap() {
    const w = this.c.sendWindow;
    const k = this.reservingLanes();
    return k === 1 ? w : w - (k - 1) * Math.floor(w / (2 * k));
  }

  // Takes a reliable message for `lane` (configured; checked by the caller). Returns undefined
  // once the message is taken, or a promise that resolves once it is (`wait`: the lane's share
  // of the window is full); throws 'too_large', or 'would_block' when full and not `wait`.
  // The file lane (the library's own messages, fresh buffers, section 8.9) may hold half the
  // window and is not bound by maxMessageSize.
  sendReliable(bytes, wait, lane = 0) {
    const file = lane === FILE_LANE;
    if (!file && bytes.length > this.c.maxMessageSize) {
      throw new PeermeshError('too_large', `reliable message of ${bytes.length} bytes exceeds ${this.c.maxMessageSize}`);
    }
    const cost = reliableCost(bytes.length);
    if (cost > (file ? Math.floor(this.c.sendWindow / 2) : this.laneCap())) {
      throw new PeermeshError('too_large', `reliable message of ${bytes.length} bytes does not fit the send window`);
    }
    if (this.closed) throw new PeermeshError('unknown_peer', `the link to peer ${this.peer} has closed`);
    // Copy now: the caller may reuse its buffer once send() has returned.
    const copy = file ? bytes : bytes.slice();
    const L = this.lanes[lane];
    if (L.waiters.length === 0 && cost <= this.laneFree(lane)) {
      this.takeReliable(lane, copy);
      return undefined;
    }
    if (!wait) throw new PeermeshError('would_block', 'the send window is full');
    // Waiting in the lane's own line: a bulk lane waiting for room holds up no other lane.
    return new Promise((resolve, reject) =>
      L.waiters.push({ cost, resolve, reject, admit: () => this.takeReliable(lane, copy) }),
    );
  }

  // A reliable message of `lane` has window: it waits for the peer's VERSION (lanes >= 1 while
  // not known), or is numbered on its lane's stream, or on lane 0's for a peer without lanes.
  takeReliable(lane, bytes) {
    if (lane === FILE_LANE && this.peerLanes !== 'unknown' && !this.peerFiles()) {
      // Never on lane 0 or to a version 3 peer (the file code checks peerFiles() first).
      console.warn(`peermesh: a file message to peer ${this.peer}, which has no file lane, dropped`);
      return;
    }
    if (lane !== 0 && this.peerLanes === 'unknown') {
      const L = this.lanes[lane];
      const cost = reliableCost(bytes.length);
      L.waiting.push(bytes);
      L.heldCost += cost;
      this.windowUsed += cost;
      return;
    }
    this.pushReliable(this.peerLanes === 'lanes' ? lane : 0, bytes);
    this.pump();
  }

  // Numbers a message's fragments on stream `lane` (transmitted by pump()).
  pushReliable(lane, bytes) {
    const L = this.lanes[lane];
    // Draining: from the first message that would go through the server, held (see hold()).
    if (this.draining && !this.isDirect() && L.heldFrom === null) L.heldFrom = L.nextSeq;
    const count = Math.max(1, Math.ceil(bytes.length / MAX_FRAGMENT));
    for (let i = 0; i < count; i++) {
      const chunk = bytes.subarray(i * MAX_FRAGMENT, Math.min((i + 1) * MAX_FRAGMENT, bytes.length));
      const seq = L.nextSeq++;
      const fin = i === count - 1;
      const cost = chunk.length + FRAGMENT_OVERHEAD;
      // via: the path it last went on ('server' or 'direct'), null before it went.
      L.unacked.push({ seq, frame: laneDataFrame(lane, seq, fin, chunk), cost, fin, sent: false, via: null });
      L.unackedCost += cost;
      this.windowUsed += cost;
    }
  }

  // Lets in the messages waiting for window, each lane's in its order, as far as they fit.
  admitWaiters() {
    let progress = true;
    while (progress) {
      progress = false;
      for (const L of this.lanes) {
        while (L.waiters.length && L.waiters[0].cost <= this.laneFree(L.lane)) {
          const w = L.waiters.shift();
          w.admit();
          w.resolve();
          progress = true;
        }
      }
    }
  }

  // The peer's lanes are known (section 8.8.2), for good: what waited goes on its lane, or
  // (lane0) on lane 0, lane by lane, in order; sequenced messages then go as UNRELIABLE.
  decideLanes(lanes) {
    if (this.peerLanes !== 'unknown') return;
    this.peerLanes = lanes ? 'lanes' : 'lane0';
    for (const L of this.lanes) {
      const waiting = L.waiting;
      L.waiting = [];
      for (const m of waiting) {
        const cost = reliableCost(m.length);
        L.heldCost -= cost;
        this.windowUsed -= cost;
        if (L.lane === FILE_LANE && !this.peerFiles()) {
          // A file lane never goes on lane 0 (section 8.9); the transfer learns it is unsupported.
          console.warn(`peermesh: a file message to peer ${this.peer}, which has no file lane, dropped`);
          continue;
        }
        this.pushReliable(lanes ? L.lane : 0, m);
      }
      if (L.seqWaiting !== null) {
        const m = L.seqWaiting;
        L.seqWaiting = null;
        L.heldCost -= m.length + FRAGMENT_OVERHEAD;
        this.windowUsed -= m.length + FRAGMENT_OVERHEAD;
        if (lanes) this.transmitSequenced(L.lane, m);
        else this.sendUnreliable(m);
      }
    }
    for (const f of this.decidedWaiters) f();
    this.decidedWaiters = [];
    this.admitWaiters(); // the reserves changed with lane0
    this.pump();
    this.checkFlush();
  }

  sendSequenced(lane, bytes) {
    if (bytes.length > MAX_UNRELIABLE_SIZE) {
      throw new PeermeshError('too_large', `sequenced message of ${bytes.length} bytes exceeds ${MAX_UNRELIABLE_SIZE}`);
    }
    if (this.peerLanes === 'lane0') {
      this.sendUnreliable(bytes);
      return;
    }
    if (this.peerLanes === 'lanes') {
      this.transmitSequenced(lane, bytes);
      return;
    }
    // Not known yet: only the newest waits (the receiver would drop older ones anyway); it
    // counts in the window while it waits.
    const L = this.lanes[lane];
    if (L.seqWaiting !== null) {
      L.heldCost -= L.seqWaiting.length + FRAGMENT_OVERHEAD;
      this.windowUsed -= L.seqWaiting.length + FRAGMENT_OVERHEAD;
      this.stats.sequencedReplaced++;
    }
    L.seqWaiting = bytes.slice();
    L.heldCost += bytes.length + FRAGMENT_OVERHEAD;
    this.windowUsed += bytes.length + FRAGMENT_OVERHEAD;
  }

  // UNRELIABLE_SEQ with the lane's next seq: where UNRELIABLE goes; on "u2" (version 2 or 3
  // generation) in parts of at most 1024 bytes, else whole.
  transmitSequenced(lane, bytes) {
    const L = this.lanes[lane];
    const seq = L.nextSeqMsg;
    L.nextSeqMsg = (seq + 1) >>> 0;
    const ch = this.isDirect() ? this.unreliableChannel() : null;
    const direct = ch !== null && ch.bufferedAmount < DIRECT_HIGH;
    const frames = seqFrames(lane, seq, bytes, direct && this.version >= 2 ? SEQ_PART_BYTES : Infinity);
    for (const f of frames) {
      const now = direct && this.isDirect() && this.unreliableChannel() === ch && ch.bufferedAmount < DIRECT_HIGH;
      if (!(now && this.sendOn(ch, f))) this.relay(f);
    }
  }

  sendUnreliable(bytes) {
    if (bytes.length > MAX_UNRELIABLE_SIZE) {
      throw new PeermeshError('too_large', `unreliable message of ${bytes.length} bytes exceeds ${MAX_UNRELIABLE_SIZE}`);
    }
    const ch = this.isDirect() ? this.unreliableChannel() : null;
    const direct = ch !== null && ch.bufferedAmount < DIRECT_HIGH;
    if (direct && this.version >= 2 && 1 + bytes.length > MAX_DIRECT_UNRELIABLE_FRAME) {
      // Link v2: one SCTP chunk per message on the direct path, so split it. A part that cannot
      // go direct goes on the server path as it is.
      const msg = this.nextPartMsg;
      this.nextPartMsg = (msg + 1) >>> 0;
      this.stats.unreliableSplit++;
      for (const f of partFrames(msg, bytes)) {
        const now = this.isDirect() && this.unreliableChannel() === ch && ch.bufferedAmount < DIRECT_HIGH;
        if (!(now && this.sendOn(ch, f))) this.relay(f);
      }
      return;
    }
    const frame = new Uint8Array(1 + bytes.length);
    frame[0] = K_UNRELIABLE;
    frame.set(bytes, 1);
    if (direct && this.sendOn(ch, frame)) return;
    this.relay(frame);
  }

  // The channel of UNRELIABLE, UNRELIABLE_PART, UNRELIABLE_SEQ, PING and PONG on the direct
  // path: the "u2" this end opened in a link v2 (or v3) generation, "u" in a v1 one.
  unreliableChannel() {
    return this.version >= 2 ? this.u2 : this.u;
  }

  isDirect() {
    return this.path !== 'server';
  }

  relay(frame) {
    // While the server path is interrupted nothing is relayed: reliable frames stay
    // unacknowledged and go again on resync().
    if (this.relayPaused || this.c._reconnecting) return;
    this.c._sendBinary(relayFrame(this.peer, this.linkId, frame));
  }

  // With several lanes, DATA waits while Q is transmitted and unacknowledged (section 8.8.3).
  lanesFull() {
    if (this.reservingLanes() <= 1 && !this.filesBusy()) return false;
    let sent = 0;
    for (const L of this.lanes) sent += L.txCost;
    return sent >= paceBound(this.pace, this.c.sendWindow);
  }

  // The length of lane L's next fragment to transmit, or null (none, or held by a drain).
  ready(L) {
    if (L.heldFrom !== null && L.nextTx >= L.heldFrom) return null;
    const n = L.unacked.length - L.head;
    if (n === 0) return null;
    const i = L.nextTx - L.unacked[L.head].seq;
    return i < n ? L.unacked[L.head + i].frame.length : null;
  }

  // The lane whose fragment goes next (section 8.8.3): the lowest priority number among the
  // lanes with a fragment ready, and among those deficit round robin by weight.
  pickLane() {
    let best = Infinity;
    for (const L of this.lanes) if (this.ready(L) !== null) best = Math.min(best, laneCfg(L).priority);
    if (best === Infinity) return null;
    // Each visit of a ready lane adds at least one full fragment of credit: at most one round
    // (plus the lane the cursor is on) passes before one is picked.
    for (let n = 0; n <= 2 * LANE_SLOTS; n++) {
      const L = this.lanes[this.rr];
      const len = this.ready(L);
      if (len !== null && laneCfg(L).priority === best) {
        if (this.rrFresh) {
          L.deficit += DRR_QUANTUM * laneCfg(L).weight;
          this.rrFresh = false;
        }
        if (L.deficit >= len) {
          L.deficit -= len;
          return L.lane;
        }
      } else if (len === null) {
        L.deficit = 0; // an idle lane keeps no credit
      }
      this.rr = (this.rr + 1) % LANE_SLOTS;
      this.rrFresh = true;
    }
    return null;
  }

  // Transmits DATA fragments of the lanes, by their schedule, while the path takes them: with
  // several lanes, while less than Q is transmitted and unacknowledged (an ACK pumps again);
  // on the direct path also while channel "r" has less than DC_HIGH queued.
  pump() {
    if (this.closed || this.pumping) return;
    this.pumping = true;
    try {
      for (;;) {
        if (this.lanesFull()) return;
        if (!this.isDirect()) {
          if (this.relayPaused || this.c._reconnecting) return;
        } else if (this.r.readyState === 'open') {
          if (this.r.bufferedAmount >= DIRECT_HIGH) {
            this.r.bufferedAmountLowThreshold = DIRECT_HIGH / 2; // onbufferedamountlow pumps again
            return;
          }
        } // a channel that is not open fails the send below, which downgrades the link
        const lane = this.pickLane();
        if (lane === null) return;
        const L = this.lanes[lane];
        const u = L.unacked[L.head + (L.nextTx - L.unacked[L.head].seq)];
        L.nextTx++;
        L.txCost += u.cost;
        if (u.sent) this.stats.resent++;
        u.sent = true;
        u.via = this.isDirect() ? 'direct' : 'server';
        if (!this.isDirect()) {
          this.stats.sentServer++;
          this.relay(u.frame);
        } else if (this.sendOn(this.r, u.frame)) {
          this.stats.sentDirect++;
        } // else: the downgrade rewound every lane; the loop goes on on the server path
      }
    } finally {
      this.pumping = false;
    }
  }

  // The server path is back (this session resumed, or the peer's did): VERSION first again,
  // then every unacknowledged fragment and the current ACKs, unless the link is direct.
  resync() {
    this.relayPaused = false;
    this.versionAnswered = false;
    this.relay(versionFrame());
    this.draining = false;
    for (const L of this.lanes) L.heldFrom = null;
    if (!this.isDirect()) {
      this.resendOnServer();
    } else {
      // Fragments that last went on the server path may have been lost in the interruption
      // (sent just before the upgrade): again, there. So does READY, which may have been lost
      // too and would keep the peer off the direct path. Held messages never went: they go
      // now on the direct path. ACKs that fell back to the interrupted server path (busy
      // channels) may be lost: again.
      for (const L of this.lanes) {
        for (let i = L.head; i < L.unacked.length; i++) {
          const u = L.unacked[i];
          if (u.seq >= L.nextTx) break;
          if (u.via === 'server') {
            this.stats.resent++;
            this.relay(u.frame);
          }
        }
      }
      if (this.readySent) this.relay(readyFrame(this.gen));
      for (const L of this.lanes) {
        if (L.delivered > 0) {
          L.ackDue = true;
          this.sendAck(L);
        }
      }
      this.pump();
    }
  }

  // The server is draining: from the first reliable message that would go on the server path,
  // reliable messages are numbered and kept (per lane), not transmitted, until resync() or
  // takeHeld(). ACKs and probes still go. A direct link goes on sending: it does not need the
  // server.
  hold() {
    this.draining = true;
  }

  // Draining, and nothing of this link in flight through the server: every reliable fragment
  // transmitted before the hold is acknowledged, or the link is direct and holds nothing.
  drained() {
    if (!this.draining) return false;
    return this.lanes.every((L) => {
      const empty = L.unacked.length === L.head;
      if (L.heldFrom === null) return this.isDirect() || empty;
      return empty || L.unacked[L.head].seq >= L.heldFrom;
    });
  }

  // A new session replaces this link: the held messages (never transmitted) with their lanes,
  // oldest first per lane, and how many transmitted ones are not acknowledged (they may or may
  // not have arrived).
  takeHeld() {
    const messages = [];
    let undelivered = 0;
    for (const L of this.lanes) {
      if (L.lane === FILE_LANE) {
        // File messages belong to this link's transfers, which end with it: not carried.
        L.unacked = [];
        L.head = 0;
        L.unackedCost = 0;
        L.nextTx = L.nextSeq;
        L.txCost = 0;
        L.waiting = [];
        L.heldCost = 0;
        continue;
      }
      const held = L.heldFrom ?? Infinity;
      const header = L.lane === 0 ? DATA_HEADER : DATA_LANE_HEADER;
      let parts = [];
      for (let i = L.head; i < L.unacked.length; i++) {
        const u = L.unacked[i];
        if (u.seq < held) {
          if (u.fin) undelivered++;
          continue;
        }
        parts.push(u.frame.subarray(header));
        if (u.fin) {
          messages.push({ lane: L.lane, bytes: concat(parts, parts.reduce((n, p) => n + p.length, 0)) });
          parts = [];
        }
      }
      L.unacked = [];
      L.head = 0;
      L.unackedCost = 0;
      L.nextTx = L.nextSeq;
      L.txCost = 0;
      // Never numbered: the peer's lanes were not known yet.
      for (const m of L.waiting) messages.push({ lane: L.lane, bytes: m });
      L.waiting = [];
      L.seqWaiting = null;
      L.heldCost = 0;
    }
    this.windowUsed = 0;
    return { messages, undelivered };
  }

  // Every lane's unacknowledged fragments go again on the server path (each lane's in seq
  // order, the lanes interleaved by the schedule), after the current ACK of every lane that
  // delivered anything (frames and ACKs may have died with a path: the direct one, or the
  // session's connection).
  resendOnServer() {
    for (const L of this.lanes) {
      L.nextTx = L.unacked.length > L.head ? L.unacked[L.head].seq : L.nextSeq;
      L.txCost = 0;
      L.ackedSent = L.delivered;
      L.ackDue = false;
      if (L.delivered > 0) this.relay(ackFrame(L.lane, L.delivered));
    }
    this.pump();
  }

  // Send on a channel of the current PeerConnection; a failure is a failure of the direct path.
  sendOn(ch, frame) {
    try {
      ch.send(frame);
      return true;
    } catch (e) {
      const why = `send failed: ${e.message}`;
      this.downgrade(why);
      this.rtcFailed(why);
      return false;
    }
  }

  // ACK, ACK_LANE, PING, PONG: on the channel when direct and not queued up, else on the server
  // path.
  transmitOwn(frame, ch) {
    if (this.isDirect() && ch && ch.bufferedAmount < OWN_FRAME_MAX_QUEUED && this.sendOn(ch, frame)) return;
    this.relay(frame);
  }

  onAck(lane, seq) {
    const L = this.lanes[lane];
    let released = 0;
    while (L.head < L.unacked.length && L.unacked[L.head].seq <= seq) {
      const u = L.unacked[L.head];
      L.unacked[L.head++] = undefined;
      L.unackedCost -= u.cost;
      if (u.seq < L.nextTx) L.txCost -= u.cost;
      this.windowUsed -= u.cost;
      released += u.cost;
    }
    paceAcked(this.pace, released, performance.now());
    if (L.head > 1024 && L.head * 2 > L.unacked.length) {
      L.unacked = L.unacked.slice(L.head);
      L.head = 0;
    }
    // Acked fragments need no (re-)transmission.
    L.nextTx = Math.max(L.nextTx, L.unacked.length > L.head ? L.unacked[L.head].seq : L.nextSeq);
    this.admitWaiters();
    this.checkFlush();
    if (released > 0) this.pump(); // room under the lanes' bound
  }

  // Every lane's fragments up to `target[lane]` are acknowledged.
  ackedThrough(target) {
    return this.lanes.every((L) => L.unacked.length === L.head || L.unacked[L.head].seq > target[L.lane]);
  }

  checkFlush() {
    if (this.flushWaiters.length === 0) return;
    this.flushWaiters = this.flushWaiters.filter((f) => {
      if (f.waiting) {
        // Messages waiting for the peer's VERSION when flush() was called: numbered now.
        if (this.peerLanes === 'unknown') return true;
        f.waiting = false;
        f.target = this.lanes.map((L) => L.nextSeq - 1);
      }
      if (!this.ackedThrough(f.target)) return true;
      f.resolve();
      return false;
    });
  }

  // Resolves once every reliable message taken so far (every lane) is acknowledged.
  flush() {
    const target = this.lanes.map((L) => L.nextSeq - 1);
    const waiting = this.lanes.some((L) => L.waiting.length > 0);
    if (this.closed || (!waiting && this.ackedThrough(target))) return Promise.resolve();
    return new Promise((resolve) => this.flushWaiters.push({ target, waiting, resolve }));
  }

  // ---- receiving ----

  onFrame(bytes, direct) {
    if (this.closed) return;
    const f = decodeFrame(bytes);
    if (f === null) return;
    // An old peer: a frame of it without a VERSION before it, this late, on the ordered server
    // path, or on the direct path once its READY came (section 8.8.2). No timer.
    if (
      this.peerLanes === 'unknown' &&
      f.kind !== K_VERSION &&
      (!direct || this.peerReady > 0) &&
      performance.now() - this.started >= LANE_WAIT_MS
    ) {
      this.decideLanes(false);
    }
    switch (f.kind) {
      case K_DATA:
      case K_DATA_LANE:
        if (direct) this.stats.recvDirect++;
        else this.stats.recvServer++;
        this.onData(this.lanes[f.lane], f.seq, f.fin, f.payload);
        return;
      case K_ACK:
      case K_ACK_LANE:
        this.onAck(f.lane, f.seq);
        return;
      case K_UNRELIABLE:
        this.deliver(f.payload.slice(), false, 0);
        return;
      case K_PART: {
        const whole = this.parts.push(bytes);
        if (whole) this.deliver(whole, false, 0);
        return;
      }
      case K_SEQ: {
        const r = this.lanes[f.lane].seqRx.push(f.seq, f.index, f.count, f.payload);
        if (r instanceof Uint8Array) this.deliver(r, false, f.lane);
        else if (r === 'stale') this.stats.sequencedStale++;
        return;
      }
      case K_VERSION:
        if (!this.versionAnswered) {
          // Ours may have been dropped before the peer's end of the link existed.
          this.versionAnswered = true;
          this.relay(versionFrame());
        }
        if (this.peerVersion === null) this.peerVersion = f.version;
        this.decideLanes(f.version >= 3);
        return;
      case K_PING: {
        const pong = bytes.slice(0, 9);
        pong[0] = K_PONG;
        if (direct && this.isDirect()) this.transmitOwn(pong, this.unreliableChannel());
        else this.relay(pong);
        return;
      }
      case K_PONG:
        this.onPong(readU64(bytes, 1));
        return;
      case K_READY:
        this.peerReady = Math.max(this.peerReady, f.gen);
        this.maybeUpgrade();
        return;
      default:
        return;
    }
  }

  // A DATA / DATA_LANE fragment of lane L (section 8.4's receiver, per lane; reorder bounded
  // for all lanes together, section 8.8.5).
  onData(L, seq, fin, payload) {
    if (seq <= L.delivered || L.reorder.has(seq)) {
      // The sender is re-sending: our last ACK may have died with the direct path.
      this.stats.duplicates++;
      L.ackDue = true;
      this.scheduleAck(L);
      return;
    }
    if (seq !== L.delivered + 1) {
      const cost = payload.length + FRAGMENT_OVERHEAD;
      if (this.reorderCount >= MAX_REORDER || this.reorderBytes + cost > MAX_PEER_WINDOW) {
        this.stats.reorderFull++;
        console.warn(`peermesh: reorder buffer full, fragment ${seq} of lane ${L.lane} from peer ${this.peer} dropped`);
        return;
      }
      L.reorder.set(seq, [fin, payload]);
      this.reorderCount++;
      this.reorderBytes += cost;
      return;
    }
    this.accept(L, fin, payload);
    while (L.reorder.has(L.delivered + 1)) {
      const next = L.reorder.get(L.delivered + 1);
      L.reorder.delete(L.delivered + 1);
      this.reorderCount--;
      this.reorderBytes -= next[1].length + FRAGMENT_OVERHEAD;
      this.accept(L, next[0], next[1]);
    }
    this.scheduleAck(L);
  }

  accept(L, fin, payload) {
    L.delivered++;
    L.unackedBytes += payload.length;
    if (L.discarding) {
      L.discarding = !fin;
      return;
    }
    if (L.partialLen + payload.length > MAX_PEER_WINDOW) {
      // No sender within its window sends this: dropped, with its fragments up to FIN.
      console.warn(`peermesh: reliable message longer than ${MAX_PEER_WINDOW} bytes from peer ${this.peer} dropped`);
      this.stats.tooLarge++;
      L.partial = [];
      L.partialLen = 0;
      L.discarding = !fin;
      return;
    }
    L.partial.push(payload);
    L.partialLen += payload.length;
    if (fin) {
      const data = concat(L.partial, L.partialLen);
      L.partial = [];
      L.partialLen = 0;
      this.deliver(data, true, L.lane);
    }
  }

  deliver(data, reliable, lane) {
    if (lane === FILE_LANE) {
      this.c._files?.onMessage(this, data);
      return;
    }
    this.c._emit('message', {
      from: this.peer,
      data,
      reliable,
      lane,
      get text() {
        return decoder.decode(data);
      },
    });
  }

  scheduleAck(L) {
    if (L.delivered - L.ackedSent >= ACK_EVERY || L.unackedBytes >= ACK_BYTES) this.sendAck(L);
    else if (!L.ackTimer) L.ackTimer = setTimeout(() => this.sendAck(L), ACK_DELAY_MS);
  }

  sendAck(L) {
    clearTimeout(L.ackTimer);
    L.ackTimer = null;
    if (this.closed || (L.ackedSent === L.delivered && !L.ackDue)) return;
    L.ackDue = false;
    L.ackedSent = L.delivered;
    L.unackedBytes = 0;
    this.transmitOwn(ackFrame(L.lane, L.delivered), this.r);
  }

  // ---- RTT ----

  onPingTimer() {
    this.parts.expire();
    for (const L of this.lanes) L.seqRx.expire();
    this.sendPing();
    if (this.isDirect()) this.refreshPair();
  }

  sendPing() {
    const id = this.nextPing++;
    if (this.pings.length >= 8) this.pings.shift();
    this.pings.push([id, performance.now()]);
    this.transmitOwn(u64Frame(K_PING, id), this.unreliableChannel());
  }

  onPong(id) {
    const i = this.pings.findIndex(([p]) => p === id);
    if (i < 0) return;
    const sample = performance.now() - this.pings[i][1];
    this.pings.splice(0, i + 1);
    this.rtt = this.rtt === null ? sample : (7 * this.rtt + sample) / 8;
    this.pace.minRtt = this.pace.minRtt === null ? sample : Math.min(this.pace.minRtt, sample);
  }

  // ---- path ----

  // `quiet`: the caller reports the change itself (emitPath) once its state is consistent.
  setPath(path, quiet = false) {
    if (this.path === path) return;
    this.path = path;
    this.stats.pathChanges++;
    this.rtt = null; // samples of one path say nothing about the other
    this.pings = [];
    this.pace = newPace();
    if (!quiet) this.emitPath();
  }

  emitPath() {
    this.c._emit('path', { peer: this.peer, path: this.path, pair: this.pair && { ...this.pair } });
    // Reported to the server too, for the app's backend.
    const report = { type: 'path', peer: this.peer, link: this.linkId, path: 'server' };
    const direct = /^direct (\w+)\/(\w+)$/.exec(this.path);
    if (direct) Object.assign(report, { path: 'direct', local: direct[1], remote: direct[2] });
    this.c._sendJson(report);
  }

  // While direct: ICE may switch to a pair of other candidate types.
  async refreshPair() {
    const pc = this.pc;
    if (!pc) return;
    let pair;
    try {
      pair = await selectedPair(pc, this.signaled);
    } catch {
      return;
    }
    if (!pair || pc !== this.pc || !this.isDirect()) return;
    this.pair = pair;
    this.setPath(pathOf(pair));
  }

  // Every channel of the generation is open: "r" and "u", and in a link v2 generation both "u2"s
  // (the one this end opened and the peer's).
  channelsOpen() {
    return this.rOpen && this.uOpen && this.version >= 1 && (this.version < 2 || (this.u2Open && this.u2InOpen));
  }

  canUpgrade() {
    return !this.closed && !this.isDirect() && this.pc && this.channelsOpen() && this.connected && this.peerReady >= this.gen;
  }

  async maybeUpgrade() {
    // One wait for the selected pair per PeerConnection: a wait still pending for a replaced
    // one (its getStats may never settle once it is closed) must not hold up the new one.
    const pc = this.pc;
    if (!this.canUpgrade() || this.upgrading === pc) return;
    this.upgrading = pc;
    try {
      // The path type comes from the selected candidate pair; wait until ICE reports it.
      while (this.canUpgrade() && this.pc === pc) {
        let pair = null;
        try {
          pair = await selectedPair(pc, this.signaled);
        } catch {
          pair = null;
        }
        if (!(this.canUpgrade() && this.pc === pc)) return;
        if (pair) {
          this.backoff = RETRY_MIN_MS;
          this.hadDirect = true;
          this.pair = pair;
          this.setPath(pathOf(pair));
          this.lastDirectRecv = performance.now();
          this.armDeadTimer(pc, this.c.deadPathTimeoutMs);
          this.sendPing();
          this.pump(); // fragments not transmitted yet go on the direct path
          return;
        }
        await sleep(50);
      }
    } finally {
      if (this.upgrading === pc) this.upgrading = null;
    }
  }

  // Dead-path rule (section 8.7; every generation, version 1 ones too): while direct, nothing at
  // all on the current generation's channels for deadPathTimeoutMs means the direct path has
  // failed, whatever ICE says.
  armDeadTimer(pc, delay) {
    clearTimeout(this.deadTimer);
    this.deadTimer = setTimeout(() => {
      this.deadTimer = null;
      if (this.closed || this.pc !== pc || !this.isDirect()) return;
      const limit = this.c.deadPathTimeoutMs;
      const idle = performance.now() - this.lastDirectRecv;
      if (idle < limit) {
        this.armDeadTimer(pc, limit - idle);
        return;
      }
      this.stats.deadPaths++;
      this.rtcFailed(`nothing received on the direct path for ${(idle / 1000).toFixed(1)}s`);
    }, delay);
  }

  downgrade(why) {
    if (!this.isDirect()) return;
    console.info(`peermesh: direct path to peer ${this.peer} lost (${why}); back to the server path`);
    this.pair = null;
    this.setPath('server', true);
    // Everything unacknowledged may have died with the direct path, ACKs sent directly too.
    this.resendOnServer();
    // Only now: a 'path' handler that sends finds the re-send done (its message is not re-sent
    // too, and it follows the re-sent fragments on the server path).
    this.emitPath();
  }

  resetRtc() {
    const pc = this.pc;
    this.pc = null;
    this.r = null;
    this.u = null;
    this.u2 = null;
    this.u2In = null;
    this.u2Reliable = false;
    this.rOpen = false;
    this.uOpen = false;
    this.u2Open = false;
    this.u2InOpen = false;
    this.readySent = false;
    this.version = 0;
    this.connected = false;
    clearTimeout(this.connectTimer);
    this.connectTimer = null;
    clearTimeout(this.deadTimer);
    this.deadTimer = null;
    this.signaled = new Map();
    this.remoteSet = false;
    this.remoteQueue = [];
    this.localSent = false;
    this.localQueue = [];
    if (pc) {
      try {
        pc.close();
      } catch {
        // already closed
      }
    }
  }

  // The direct path could not be made, or died: stay on the server path; the initiator tries
  // again after a back-off.
  rtcFailed(why) {
    this.downgrade(why); // a PeerConnection carrying the link is never dropped without one
    this.resetRtc();
    if (this.closed) return;
    this.c._emit('nodirectpath', { peer: this.peer, reason: why });
    if (this.initiator && this.policy !== 'none' && !this.declined) {
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        this.start();
      }, this.backoff);
      const max = this.hadDirect ? RETRY_MAX_HAD_DIRECT_MS : RETRY_MAX_NEVER_DIRECT_MS;
      this.backoff = Math.min(this.backoff * 2, max);
    }
  }

  signal(data) {
    this.c._sendJson({ type: 'signal', to: this.peer, link: this.linkId, data });
  }

  armConnectTimer(pc) {
    this.connectTimer = setTimeout(() => {
      if (this.pc === pc && !this.connected) this.rtcFailed(`not connected within ${CONNECT_TIMEOUT_MS / 1000}s`);
    }, CONNECT_TIMEOUT_MS);
  }

  // A PeerConnection of generation this.gen with both pre-negotiated channels.
  createPc() {
    const gen = this.gen;
    const pc = new RTCPeerConnection({
      iceServers: this.c.iceServers,
      iceTransportPolicy: this.policy === 'relay' ? 'relay' : 'all',
    });
    const r = pc.createDataChannel('r', { negotiated: true, id: 0, ordered: true });
    const u = pc.createDataChannel('u', { negotiated: true, id: 1, ordered: false, maxRetransmits: 0 });
    r.bufferedAmountLowThreshold = DIRECT_HIGH / 2;
    this.pc = pc;
    this.r = r;
    this.u = u;
    const current = () => this.pc === pc && this.gen === gen && !this.closed;
    pc.onicecandidate = (e) => {
      if (!current() || !e.candidate || !e.candidate.candidate) return;
      const c = e.candidate.toJSON();
      const t = parseCandidate(c.candidate)?.type;
      // The transport policy gathers nothing else; this is the last check before an address
      // leaves the host.
      const candidate = this.policy === 'relay' ? relayCandidate(c.candidate) : c.candidate;
      if (candidate === null) return;
      if (t === 'host') this.stats.candidatesHost++;
      else if (t === 'srflx') this.stats.candidatesSrflx++;
      else if (t === 'relay') this.stats.candidatesRelay++;
      const data = {
        kind: 'candidate',
        gen,
        candidate,
        sdpMid: c.sdpMid ?? '0',
        sdpMLineIndex: c.sdpMLineIndex ?? 0,
      };
      if (c.usernameFragment) data.usernameFragment = c.usernameFragment;
      // Candidates follow the offer/answer they belong to.
      if (this.localSent) this.signal(data);
      else this.localQueue.push(data);
    };
    pc.onconnectionstatechange = () => {
      if (!current()) return;
      const s = pc.connectionState;
      if (s === 'connected') {
        this.connected = true;
        clearTimeout(this.connectTimer);
        this.connectTimer = null;
        this.maybeUpgrade();
      } else if (s === 'disconnected' || s === 'failed' || s === 'closed') {
        this.connected = false;
        this.downgrade(`ice ${s}`);
        this.rtcFailed(`ice ${s}`);
      }
    };
    // Link v2: the peer's in-band "u2" (at most one); any other in-band channel is closed.
    pc.ondatachannel = (e) => {
      const ch = e.channel;
      if (current() && ch.label === 'u2' && this.version >= 2 && !this.u2In) {
        this.u2In = ch;
        this.wireChannel(pc, gen, ch);
        this.channelOpened(pc, gen); // announced channels are usually open already
        return;
      }
      try {
        ch.close();
      } catch {
        // already closed
      }
    };
    for (const ch of [r, u]) this.wireChannel(pc, gen, ch);
    r.onbufferedamountlow = () => {
      if (current()) this.pump();
    };
    return pc;
  }

  // Link v2: this end's in-band send channel "u2" (section 7.6), opened by the initiator right
  // after it applied a v2 answer, by the responder right after it set its answer. Unreliable,
  // unless the peer asked for a reliable one ("u2_reliable": its SCTP stack cannot parse a
  // FORWARD-TSN bundled with other chunks; a reliable channel never sends one).
  openU2(pc) {
    const options = this.u2Reliable ? { ordered: false } : { ordered: false, maxRetransmits: 0 };
    const u2 = pc.createDataChannel('u2', options);
    this.u2 = u2;
    this.wireChannel(pc, this.gen, u2);
  }

  // open / close / message handlers of a data channel of PeerConnection `pc` (generation `gen`).
  wireChannel(pc, gen, ch) {
    const current = () => this.pc === pc && this.gen === gen && !this.closed;
    ch.binaryType = 'arraybuffer';
    ch.onopen = () => this.channelOpened(pc, gen);
    ch.onclose = () => {
      if (!current()) return;
      this.downgrade(`data channel ${ch.label} closed`);
      this.rtcFailed(`data channel ${ch.label} closed`);
    };
    ch.onmessage = (e) => {
      // Frames of older generations are still processed (section 7.4), but only the current
      // generation's channels count as signs of life of the direct path.
      if (current()) this.lastDirectRecv = performance.now();
      this.onFrame(new Uint8Array(e.data), true);
    };
  }

  channelOpened(pc, gen) {
    if (this.pc !== pc || this.gen !== gen || this.closed) return;
    this.rOpen = this.r?.readyState === 'open';
    this.uOpen = this.u?.readyState === 'open';
    this.u2Open = this.u2?.readyState === 'open';
    this.u2InOpen = this.u2In?.readyState === 'open';
    if (!this.readySent && this.channelsOpen()) {
      this.readySent = true;
      this.relay(readyFrame(gen)); // always on the server path
    }
    this.maybeUpgrade();
  }

  sendLocal(kind, sdp) {
    this.signal({ kind, gen: this.gen, sdp: filterSdp(sdp, this.policy), version: LINK_VERSION });
    this.localSent = true;
    for (const c of this.localQueue) this.signal(c);
    this.localQueue = [];
  }

  // Initiator: a new PeerConnection generation and its offer.
  async start() {
    if (this.closed || this.policy === 'none' || this.declined) return;
    const pc = this.newGeneration(this.gen + 1, 'new connection attempt');
    if (!pc) return;
    try {
      const offer = await pc.createOffer();
      if (this.pc !== pc) return;
      await this.publishLocal(pc, offer);
    } catch (e) {
      if (this.pc === pc) this.rtcFailed(`creating offer: ${e.message}`);
    }
  }

  async onSignal(data) {
    if (this.closed || data === null || typeof data !== 'object' || !Number.isInteger(data.gen)) return;
    const gen = data.gen;
    switch (data.kind) {
      case 'offer':
        if (typeof data.sdp !== 'string') return;
        if (this.policy === 'none') {
          this.signal({ kind: 'decline', gen });
          return;
        }
        if (gen <= this.gen) return; // stale
        // A peer of version 2 or less has no lanes (section 8.8.2 allows deciding it here).
        if (signaledVersion(data) < 3) this.decideLanes(false);
        const version = Math.min(LINK_VERSION, signaledVersion(data));
        await this.acceptOffer(gen, data.sdp, version, data.u2_reliable === true);
        return;
      case 'answer': {
        const pc = this.pc;
        if (gen !== this.gen || !pc || typeof data.sdp !== 'string') return;
        try {
          if (signaledVersion(data) < 3) this.decideLanes(false);
          this.version = Math.min(LINK_VERSION, signaledVersion(data));
          this.u2Reliable = data.u2_reliable === true;
          await pc.setRemoteDescription({ type: 'answer', sdp: filterSdp(data.sdp, this.policy) });
          if (this.pc !== pc) return;
          this.remoteSet = true;
          if (this.version >= 2) this.openU2(pc);
          await this.addQueuedCandidates(pc);
        } catch (e) {
          if (this.pc === pc) this.rtcFailed(`applying answer: ${e.message}`);
        }
        return;
      }
      case 'candidate': {
        if (gen !== this.gen || !this.pc || typeof data.candidate !== 'string') return;
        // Some stacks send the SDP attribute line itself: accept and strip `a=` (PROTOCOL.md §7.2).
        const line = data.candidate.trim().replace(/^a=/, '');
        if (line === '') return;
        const parsed = parseCandidate(line);
        // A relay-only pair exchanges relay addresses only (defence in depth: the peer should
        // not have sent it).
        if (this.policy === 'relay' && parsed?.type !== 'relay') return;
        if (parsed) this.signaled.set(parsed.key, parsed.type);
        const init = {
          candidate: line.startsWith('candidate:') ? line : `candidate:${line}`,
          sdpMid: typeof data.sdpMid === 'string' && data.sdpMid !== '' ? data.sdpMid : null,
          sdpMLineIndex: Number.isInteger(data.sdpMLineIndex) ? data.sdpMLineIndex : 0,
        };
        if (typeof data.usernameFragment === 'string' && data.usernameFragment !== '') {
          init.usernameFragment = data.usernameFragment;
        }
        if (this.remoteSet) await this.addCandidate(this.pc, init);
        else this.remoteQueue.push(init);
        return;
      }
      case 'decline':
        if (gen === this.gen && this.initiator) {
          this.declined = true;
          this.resetRtc();
          clearTimeout(this.retryTimer);
          this.retryTimer = null;
          this.c._emit('nodirectpath', { peer: this.peer, reason: 'the peer does not take direct paths' });
        }
        return;
      default:
        return;
    }
  }

  // Responder: adopt a newer generation.
  async acceptOffer(gen, sdp, version, u2Reliable) {
    const pc = this.newGeneration(gen, 'peer restarted the connection');
    if (!pc) return;
    this.version = version;
    this.u2Reliable = u2Reliable;
    try {
      await pc.setRemoteDescription({ type: 'offer', sdp: filterSdp(sdp, this.policy) });
      if (this.pc !== pc) return;
      this.remoteSet = true;
      await this.addQueuedCandidates(pc);
      const answer = await pc.createAnswer();
      if (this.pc !== pc) return;
      await this.publishLocal(pc, answer);
      if (this.pc === pc && this.version >= 2) this.openU2(pc);
    } catch (e) {
      if (this.pc === pc) this.rtcFailed(`answering offer: ${e.message}`);
    }
  }

  // Back to the server path and a new PeerConnection for generation `gen`; null if that failed
  // (already reported).
  newGeneration(gen, reason) {
    this.downgrade(reason);
    this.resetRtc();
    this.gen = gen;
    try {
      return this.createPc();
    } catch (e) {
      this.rtcFailed(`creating peer connection: ${e.message}`);
      return null;
    }
  }

  // Applies `desc` (offer or answer) locally and signals it, unless `pc` was replaced meanwhile.
  async publishLocal(pc, desc) {
    await pc.setLocalDescription(desc);
    if (this.pc !== pc) return;
    this.sendLocal(desc.type, desc.sdp);
    this.armConnectTimer(pc);
  }

  async addQueuedCandidates(pc) {
    const queued = this.remoteQueue;
    this.remoteQueue = [];
    for (const init of queued) await this.addCandidate(pc, init);
  }

  async addCandidate(pc, init) {
    const mid = /^a=mid:(\S+)/m.exec(pc.remoteDescription?.sdp ?? '')?.[1];
    if (init.sdpMid === null || (mid !== undefined && init.sdpMid !== mid)) {
      // Peers that send no usable mid (missing, empty, or not the one of the remote
      // description): use the mid of the (single) application section.
      init.sdpMid = mid ?? '0';
      init.sdpMLineIndex = 0;
    }
    try {
      await pc.addIceCandidate(init);
    } catch (e) {
      if (this.pc === pc) console.warn(`peermesh: remote candidate refused: ${e.message}`);
    }
  }
}

// ---- file transfer (section 8.9) ----

// SHA-256 (FIPS 180-4), incremental: WebCrypto has no streaming digest, and crypto.subtle is
// missing outside secure contexts anyway. update() any number of times, then digest() once.
const SHA256_K = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

export class Sha256 {
  constructor() {
    this.h = new Int32Array([
      0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ]);
    this.w = new Int32Array(64);
    this.buf = new Uint8Array(64); // a partial block
    this.bufLen = 0;
    this.length = 0; // bytes hashed so far
    this.done = false;
  }

  /** Adds bytes (a Uint8Array, ArrayBuffer or typed array). */
  update(data) {
    if (this.done) throw new Error('Sha256: update after digest');
    const b = toBytes(data);
    this.length += b.length;
    let i = 0;
    if (this.bufLen > 0) {
      const n = Math.min(64 - this.bufLen, b.length);
      this.buf.set(b.subarray(0, n), this.bufLen);
      this.bufLen += n;
      i = n;
      if (this.bufLen < 64) return this;
      this.blocks(this.buf, 0, 64);
      this.bufLen = 0;
    }
    const whole = i + ((b.length - i) & ~63);
    if (whole > i) this.blocks(b, i, whole);
    if (whole < b.length) {
      this.buf.set(b.subarray(whole), 0);
      this.bufLen = b.length - whole;
    }
    return this;
  }

  /** The 32-byte digest (once). */
  digest() {
    if (this.done) throw new Error('Sha256: digest twice');
    const bits = this.length * 8;
    const pad = new Uint8Array((this.bufLen < 56 ? 64 : 128) - this.bufLen);
    pad[0] = 0x80;
    const dv = new DataView(pad.buffer);
    dv.setUint32(pad.length - 8, Math.floor(bits / 2 ** 32));
    dv.setUint32(pad.length - 4, bits >>> 0);
    this.update(pad);
    this.done = true;
    const out = new Uint8Array(32);
    const odv = new DataView(out.buffer);
    for (let j = 0; j < 8; j++) odv.setInt32(j * 4, this.h[j]);
    return out;
  }

  // Compresses the 64-byte blocks of b[from..to).
  blocks(b, from, to) {
    const w = this.w;
    const h = this.h;
    const k = SHA256_K;
    let h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3], h4 = h[4], h5 = h[5], h6 = h[6], h7 = h[7];
    for (let p = from; p < to; p += 64) {
      for (let t = 0; t < 16; t++) {
        const q = p + t * 4;
        w[t] = (b[q] << 24) | (b[q + 1] << 16) | (b[q + 2] << 8) | b[q + 3];
      }
      for (let t = 16; t < 64; t++) {
        const x = w[t - 15];
        const y = w[t - 2];
        const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
        const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
        w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
      }
      let a = h0, bb = h1, c = h2, d = h3, e = h4, f = h5, g = h6, hh = h7;
      for (let t = 0; t < 64; t++) {
        const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
        const ch = (e & f) ^ (~e & g);
        const t1 = (hh + S1 + ch + k[t] + w[t]) | 0;
        const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
        const maj = (a & bb) ^ (a & c) ^ (bb & c);
        const t2 = (S0 + maj) | 0;
        hh = g;
        g = f;
        f = e;
        e = (d + t1) | 0;
        d = c;
        c = bb;
        bb = a;
        a = (t1 + t2) | 0;
      }
      h0 = (h0 + a) | 0;
      h1 = (h1 + bb) | 0;
      h2 = (h2 + c) | 0;
      h3 = (h3 + d) | 0;
      h4 = (h4 + e) | 0;
      h5 = (h5 + f) | 0;
      h6 = (h6 + g) | 0;
      h7 = (h7 + hh) | 0;
    }
    h[0] = h0; h[1] = h1; h[2] = h2; h[3] = h3; h[4] = h4; h[5] = h5; h[6] = h6; h[7] = h7;
  }
}

/** SHA-256 of bytes, at once. */
export function sha256(data) {
  return new Sha256().update(data).digest();
}

const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
const sameBytes = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

// The name a receiver uses for a file a peer offered as `offered` (section 8.9, as the reference
// client's src/files/name.rs): only its last path component, without characters file systems
// refuse, control and format characters, trailing dots and spaces, a leading dot, or Windows
// device names; at most 200 bytes of UTF-8 (keeping a short extension); never empty ('file').
const MAX_FILE_NAME = 200;
export function safeFileName(offered) {
  const parts = String(offered).split(/[/\\]/);
  let name = parts[parts.length - 1].replace(/[\p{Cc}\p{Cf}]/gu, '_');
  let bytes = encoder.encode(name);
  if (bytes.length > MAX_FILE_NAME) {
    // Cut first, keeping an extension of at most 16 bytes (Rust's Path::extension).
    const dot = name.lastIndexOf('.');
    let ext = dot > 0 ? name.slice(dot + 1) : null;
    if (ext !== null && encoder.encode(ext).length > 16) ext = null;
    const extBytes = ext === null ? 0 : encoder.encode(ext).length + 1;
    let end = MAX_FILE_NAME - extBytes;
    while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--; // a character boundary
    name = decoder.decode(bytes.subarray(0, end)) + (ext === null ? '' : `.${ext}`);
  }
  // As the sanitize-filename crate with Windows rules and "_" as the replacement.
  name = name.replace(/[/?<>\\:*|"]/g, '_').replace(/[\x00-\x1f\x80-\x9f]/g, '_');
  name = name.replace(/^\.+$/, '_');
  name = name.replace(/^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$/i, '_');
  name = name.replace(/[. ]+$/, '_');
  if (name.startsWith('.')) name = '_' + name.slice(1); // no hidden files
  name = name.replace(/[. ]+$/, '');
  if (/^[_ ]*$/.test(name)) return 'file';
  return name;
}

// File-transfer messages (section 8.9), each one reliable message on the file lane.
const F_OFFER = 0x01;
const F_ACCEPT = 0x02;
const F_REJECT = 0x03;
const F_CHUNK = 0x04;
const F_VERIFIED = 0x05;
const F_END = 0x06;
const F_DONE = 0x07;
const F_CANCEL = 0x08;
const FILE_CHUNK_MAX = 256 << 10;
const FILE_TEXT_MAX = 1024;
const FILE_UNVERIFIED_MAX = 16 << 20; // a sender's most bytes sent and not VERIFIED
const FILE_VERIFY_EVERY = 4 << 20; // a receiver's VERIFIED, every this many bytes
const FILE_HASH_READ = 1 << 20; // bytes read at a time to hash a whole file
const FILE_PROGRESS_MS = 100; // most progress events per transfer: one per this long, and the last
// Codes of REJECT and CANCEL; an unknown one is 'other' (its byte in `wireCode`).
const FILE_CODES = [null, 'rejected', 'cancelled', 'io', 'disk_full', 'too_large', 'hash_mismatch', 'protocol'];
const strictDecoder = new TextDecoder('utf-8', { fatal: true });

// UTF-8 text cut to FILE_TEXT_MAX bytes at a character boundary.
function fileText(s) {
  const b = encoder.encode(String(s ?? ''));
  if (b.length <= FILE_TEXT_MAX) return b;
  let end = FILE_TEXT_MAX;
  while (end > 0 && (b[end] & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

// Encodes a file message: {kind, transfer (BigInt), ...} as in decodeFileMsg.
function encodeFileMsg(m) {
  const text = m.kind === F_OFFER ? fileText(m.name) : m.kind === F_REJECT || m.kind === F_CANCEL ? fileText(m.reason) : null;
  const len =
    {
      [F_OFFER]: 49 + (text?.length ?? 0),
      [F_ACCEPT]: 17,
      [F_REJECT]: 10 + (text?.length ?? 0),
      [F_CHUNK]: 49 + (m.bytes?.length ?? 0),
      [F_VERIFIED]: 17,
      [F_END]: 41,
      [F_DONE]: 9,
      [F_CANCEL]: 10 + (text?.length ?? 0),
    }[m.kind] ?? null;
  if (len === null) throw new Error(`file message kind ${m.kind}`);
  const f = new Uint8Array(len);
  const dv = new DataView(f.buffer);
  f[0] = m.kind;
  dv.setBigUint64(1, m.transfer);
  switch (m.kind) {
    case F_OFFER:
      dv.setBigUint64(9, BigInt(m.size));
      f.set(m.sha256, 17);
      f.set(text, 49);
      break;
    case F_ACCEPT:
    case F_VERIFIED:
      dv.setBigUint64(9, BigInt(m.offset));
      break;
    case F_REJECT:
    case F_CANCEL:
      f[9] = m.code;
      f.set(text, 10);
      break;
    case F_CHUNK:
      dv.setBigUint64(9, BigInt(m.offset));
      f.set(m.sha256, 17);
      f.set(m.bytes, 49);
      break;
    case F_END:
      f.set(m.sha256, 9);
      break;
    default:
      break;
  }
  return f;
}

// Decodes a file message, or returns null (dropped): empty, an unknown kind, shorter than its
// fixed part, longer than its kind allows, or text that is not UTF-8. Sizes and offsets are
// Numbers (exact below 2^53; larger ones decode as Infinity and fail the checks that use them).
function decodeFileMsg(b) {
  if (b.length === 0) return null;
  const kind = b[0];
  const limits = {
    [F_OFFER]: [49, FILE_TEXT_MAX],
    [F_ACCEPT]: [17, 0],
    [F_REJECT]: [10, FILE_TEXT_MAX],
    [F_CHUNK]: [50, FILE_CHUNK_MAX - 1], // 1 to FILE_CHUNK_MAX bytes of the file
    [F_VERIFIED]: [17, 0],
    [F_END]: [41, 0],
    [F_DONE]: [9, 0],
    [F_CANCEL]: [10, FILE_TEXT_MAX],
  }[kind];
  if (!limits || b.length < limits[0] || b.length - limits[0] > limits[1]) return null;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const u64 = (at) => {
    const v = dv.getBigUint64(at);
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : Infinity;
  };
  const m = { kind, transfer: dv.getBigUint64(1) };
  try {
    switch (kind) {
      case F_OFFER:
        m.size = u64(9);
        m.sha256 = b.slice(17, 49);
        m.name = strictDecoder.decode(b.subarray(49));
        break;
      case F_ACCEPT:
      case F_VERIFIED:
        m.offset = u64(9);
        break;
      case F_REJECT:
      case F_CANCEL:
        m.wireCode = b[9];
        m.code = FILE_CODES[b[9]] ?? 'other';
        m.reason = strictDecoder.decode(b.subarray(10));
        break;
      case F_CHUNK:
        m.offset = u64(9);
        m.sha256 = b.subarray(17, 49);
        m.bytes = b.subarray(49);
        break;
      case F_END:
        m.sha256 = b.slice(9, 41);
        break;
      default:
        break;
    }
  } catch {
    return null; // not UTF-8
  }
  return m;
}

// Largest file bytes per CHUNK on a link with this window: a file message takes at most half
// the window (section 8.9), as the reference client's file_chunk_max.
function fileChunkMax(window) {
  const half = Math.floor(window / 2);
  return Math.max(1, Math.min(FILE_CHUNK_MAX, half - Math.ceil(half / MAX_FRAGMENT) * FRAGMENT_OVERHEAD - 64));
}

// A transfer's error; `byPeer`: the peer ended it (REJECT or CANCEL).
function fileError(code, message, extra = {}) {
  return new PeermeshError(code, message, { byPeer: false, ...extra });
}

// The wire code of an error this end sends in CANCEL (null: nothing to send).
function cancelCodeOf(e) {
  if (e.byPeer || ['peer_left', 'unsupported', 'other'].includes(e.code)) return null;
  const i = FILE_CODES.indexOf(e.code);
  return i > 0 ? i : null;
}

// Progress of a transfer: {done, total, rate (bytes/s since it started, from its first
// offset), eta (s, or null)}.
function progressOf(done, total, from, started) {
  const secs = (performance.now() - started) / 1000;
  const rate = secs > 0 ? (done - from) / secs : 0;
  return { done, total, rate, eta: rate > 0 ? (total - done) / rate : null };
}

// A transfer's messages from the peer, in order, awaited one at a time; fail() wakes a waiting
// next() with an error.
class FileInbox {
  constructor() {
    this.items = [];
    this.waiter = null;
    this.error = null;
  }
  push(m) {
    this.items.push(m);
    this.wake();
  }
  fail(e) {
    if (this.error === null) this.error = e;
    this.wake();
  }
  wake() {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }
  // The next message if one is in (or the error), else null.
  poll() {
    if (this.error !== null) throw this.error;
    return this.items.length > 0 ? this.items.shift() : null;
  }
  async next() {
    for (;;) {
      const m = this.poll();
      if (m !== null) return m;
      await new Promise((resolve) => (this.waiter = resolve));
    }
  }
}

/**
 * A file being sent (Client.sendFile). Events: 'progress' (detail {done, total, rate, eta}).
 * `done` resolves to {name, size, sha256 (hex), bytesSent, resumedFrom} once the receiver said
 * DONE, or rejects with a PeermeshError (codes: see peermesh.d.ts).
 */
class OutgoingFile extends EventTarget {
  constructor(files, link, blob, name, id) {
    super();
    this.id = id.toString(16).padStart(16, '0');
    this.peer = link.peer;
    this.name = name;
    this.size = blob.size;
    this._files = files;
    this._link = link;
    this._blob = blob;
    this._transfer = id;
    this._inbox = new FileInbox();
    this._cancelled = false;
    this._lastProgress = 0;
    this.done = this._run();
    this.done.catch(() => {}); // the app may look at it or not
  }

  /** Listen to 'progress'; the handler gets the detail. Returns an unsubscribe function. */
  on(type, handler) {
    const h = (e) => void handler(e.detail);
    this.addEventListener(type, h);
    return () => this.removeEventListener(type, h);
  }

  /** Ends the transfer at both ends (done rejects with 'cancelled'). */
  cancel() {
    if (this._cancelled) return;
    this._cancelled = true;
    this._inbox.fail(fileError('cancelled', 'cancelled by this side', { byPeer: false }));
  }

  _progress(done, from, started, last = false) {
    const now = performance.now();
    if (!last && now - this._lastProgress < FILE_PROGRESS_MS) return;
    this._lastProgress = now;
    const p = progressOf(done, this.size, from, started);
    this.dispatchEvent(new CustomEvent('progress', { detail: p }));
    this._files.c._emit('fileprogress', { id: this.id, peer: this.peer, direction: 'send', name: this.name, ...p });
  }

  async _send(m) {
    if (this._inbox.error !== null) throw this._inbox.error;
    try {
      await this._link.sendReliable(encodeFileMsg({ ...m, transfer: this._transfer }), true, FILE_LANE);
    } catch (e) {
      if (this._link.closed) throw fileError('peer_left', `the link to peer ${this.peer} has ended`);
      throw e;
    }
  }

  async _run() {
    // Not before the caller has the object (and its `on`).
    await Promise.resolve();
    try {
      return await this._exchange();
    } catch (e0) {
      const e = e0 instanceof PeermeshError ? e0 : fileError('io', String(e0?.message ?? e0));
      const code = cancelCodeOf(e);
      if (code !== null && this._offered && !this._link.closed) {
        try {
          this._link.sendReliable(encodeFileMsg({ kind: F_CANCEL, transfer: this._transfer, code, reason: e.message }), true, FILE_LANE)?.catch?.(() => {});
        } catch {
          // the link ended meanwhile
        }
      }
      throw e;
    } finally {
      this._files.forget(this._files.sending, this);
    }
  }

  async _read(from, to) {
    try {
      const b = new Uint8Array(await this._blob.slice(from, to).arrayBuffer());
      if (b.length !== to - from) throw new Error(`read ${b.length} bytes at ${from}, not ${to - from}`);
      return b;
    } catch (e) {
      throw fileError('io', `reading ${this.name}: ${e.message} (did it change?)`);
    }
  }

  // The next message of the receiver of one of `kinds`; CANCEL and REJECT end the transfer, any
  // other kind is a protocol error.
  static check(m, kinds, what) {
    if (m.kind === F_CANCEL || m.kind === F_REJECT) {
      throw fileError(m.code, m.reason || m.code, { byPeer: true, wireCode: m.wireCode });
    }
    if (!kinds.includes(m.kind)) throw fileError('protocol', `file message kind ${m.kind} ${what}`);
    return m;
  }

  async _exchange() {
    const link = this._link;
    // The whole file's hash first (the OFFER carries it), a slice at a time.
    const h = new Sha256();
    for (let at = 0; at < this.size; at += FILE_HASH_READ) {
      const b = await this._read(at, Math.min(this.size, at + FILE_HASH_READ));
      if (this._inbox.error !== null) throw this._inbox.error;
      h.update(b);
    }
    const sha = h.digest();
    this.sha256 = toHex(sha);
    await Promise.race([link.decided(), new Promise((resolve) => (this._inbox.waiter = resolve))]);
    if (this._inbox.error !== null) throw this._inbox.error;
    if (link.closed) throw fileError('peer_left', `the link to peer ${this.peer} has ended`);
    if (!link.peerFiles()) {
      throw fileError('unsupported', `peer ${this.peer} does not take file transfers (link protocol version ${link.peerVersion ?? 'below 3'})`);
    }
    this._offered = true;
    await this._send({ kind: F_OFFER, size: this.size, sha256: sha, name: this.name });
    const answer = OutgoingFile.check(await this._inbox.next(), [F_ACCEPT], 'before ACCEPT');
    if (answer.offset > this.size) throw fileError('protocol', `ACCEPT at ${answer.offset}, past the size ${this.size}`);
    const from = answer.offset;
    const started = performance.now();
    const chunkMax = fileChunkMax(this._files.c.sendWindow);
    let sent = from;
    let verified = from;
    const take = (m) => {
      OutgoingFile.check(m, [F_VERIFIED], 'while sending');
      if (m.offset > sent) throw fileError('protocol', `VERIFIED at ${m.offset}, past what was sent (${sent})`);
      verified = Math.max(verified, m.offset);
    };
    this._progress(sent, from, started, true);
    while (sent < this.size) {
      const n = Math.min(this.size - sent, chunkMax);
      // At most FILE_UNVERIFIED_MAX beyond the receiver's last VERIFIED.
      while (sent + n - verified > FILE_UNVERIFIED_MAX) take(await this._inbox.next());
      for (let m = this._inbox.poll(); m !== null; m = this._inbox.poll()) take(m);
      const bytes = await this._read(sent, sent + n);
      await this._send({ kind: F_CHUNK, offset: sent, sha256: sha256(bytes), bytes });
      sent += n;
      this._progress(sent, from, started, sent === this.size);
    }
    await this._send({ kind: F_END, sha256: sha });
    for (;;) {
      const m = OutgoingFile.check(await this._inbox.next(), [F_VERIFIED, F_DONE], 'after END');
      if (m.kind === F_DONE) {
        return { name: this.name, size: this.size, sha256: this.sha256, bytesSent: this.size - from, resumedFrom: from };
      }
    }
  }
}

// A file a peer offers (the 'fileoffer' event's detail is its public view).
class IncomingFile {
  constructor(files, link, m) {
    this._files = files;
    this._link = link;
    this._transfer = m.transfer;
    this.id = m.transfer.toString(16).padStart(16, '0');
    this.from = link.peer;
    this.offeredName = m.name;
    this.name = safeFileName(m.name);
    this.size = m.size;
    this.sha256 = m.sha256;
    this.state = 'offered'; // 'receiving', then 'ended'
    this.result = null; // accept()'s promise
    this.resolve = null;
    this.reject = null;
  }

  // What the app sees.
  view() {
    const t = this;
    return {
      id: t.id,
      from: t.from,
      name: t.name,
      size: t.size,
      sha256: toHex(t.sha256),
      accept: () => t.accept(),
      reject: (reason) => t.refuse(reason),
      cancel: () => t.fail(fileError('cancelled', 'cancelled by this side', { byPeer: false })),
    };
  }

  post(m) {
    try {
      this._link.sendReliable(encodeFileMsg({ ...m, transfer: this._transfer }), true, FILE_LANE)?.catch?.(() => {});
    } catch {
      // the link ended: so does the transfer (linkClosed)
    }
  }

  accept() {
    if (this.result !== null) return this.result;
    if (this.state !== 'offered') return Promise.reject(fileError('protocol', 'the offer was answered or has ended'));
    this.result = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.result.catch(() => {}); // also told by 'filefailed': the app may look at either
    this.state = 'receiving';
    this.hash = new Sha256();
    this.parts = []; // Blobs of verified bytes, one per VERIFIED
    this.pending = []; // chunk bytes since the last VERIFIED
    this.verified = 0;
    this.verifiedSent = 0;
    this.started = performance.now();
    this.lastProgress = 0;
    this.post({ kind: F_ACCEPT, offset: 0 });
    return this.result;
  }

  refuse(reason = 'rejected') {
    if (this.state !== 'offered') return;
    this.state = 'ended';
    this.post({ kind: F_REJECT, code: 1, reason });
    this._files.forget(this._files.receiving, this);
  }

  // Ends the transfer with `e`; tells the peer unless the peer ended it.
  fail(e) {
    if (this.state === 'ended') return;
    const answered = this.state === 'receiving';
    this.state = 'ended';
    const code = cancelCodeOf(e);
    if (code !== null) this.post({ kind: F_CANCEL, code, reason: e.message });
    this.parts = this.pending = [];
    this._files.forget(this._files.receiving, this);
    if (answered) this.reject(e);
    this._files.c._emit('filefailed', { id: this.id, peer: this.from, direction: 'receive', name: this.name, error: e, code: e.code });
  }

  progress(last) {
    const now = performance.now();
    if (!last && now - this.lastProgress < FILE_PROGRESS_MS) return;
    this.lastProgress = now;
    this._files.c._emit('fileprogress', {
      id: this.id,
      peer: this.from,
      direction: 'receive',
      name: this.name,
      ...progressOf(this.verified, this.size, 0, this.started),
    });
  }

  onMessage(m) {
    if (m.kind === F_CANCEL) {
      this.fail(fileError(m.code, m.reason || m.code, { byPeer: true, wireCode: m.wireCode }));
      return;
    }
    if (this.state !== 'receiving') {
      // Only CANCEL may come before the answer.
      this.fail(fileError('protocol', `file message kind ${m.kind} before ACCEPT`));
      return;
    }
    if (m.kind === F_CHUNK) {
      const end = m.offset + m.bytes.length;
      if (m.offset !== this.verified) {
        this.fail(fileError('protocol', `chunk at ${m.offset}, expected ${this.verified}`));
        return;
      }
      if (end > this.size) {
        this.fail(fileError('protocol', `chunk ends at ${end}, past the size ${this.size}`));
        return;
      }
      if (!sameBytes(sha256(m.bytes), m.sha256)) {
        this.fail(fileError('hash_mismatch', `chunk at ${m.offset}: hash mismatch`));
        return;
      }
      this.hash.update(m.bytes);
      this.pending.push(m.bytes);
      this.verified = end;
      if (end - this.verifiedSent >= FILE_VERIFY_EVERY || end === this.size) {
        this.parts.push(new Blob(this.pending));
        this.pending = [];
        this.verifiedSent = end;
        this.post({ kind: F_VERIFIED, offset: end });
      }
      this.progress(end === this.size);
      return;
    }
    if (m.kind === F_END) {
      if (this.verified !== this.size) {
        this.fail(fileError('protocol', `END after ${this.verified} of ${this.size} bytes`));
        return;
      }
      const whole = this.hash.digest();
      const zeros = this.sha256.every((x) => x === 0);
      if (!sameBytes(whole, m.sha256) || (!zeros && !sameBytes(whole, this.sha256))) {
        this.fail(fileError('hash_mismatch', 'the whole file does not match its hash'));
        return;
      }
      this.parts.push(...this.pending.map((b) => new Blob([b])));
      const blob = new Blob(this.parts);
      this.parts = this.pending = [];
      this.state = 'ended';
      this.post({ kind: F_DONE });
      this._files.forget(this._files.receiving, this);
      const file = { id: this.id, from: this.from, name: this.name, size: this.size, sha256: toHex(whole), blob };
      this.resolve(file);
      this._files.c._emit('filereceived', file);
      return;
    }
    this.fail(fileError('protocol', `file message kind ${m.kind} while receiving`));
  }
}

// Every transfer of a client, by peer and id, per direction (ids are the sender's).
class Files {
  constructor(client) {
    this.c = client;
    this.sending = new Map(); // "peer id" -> OutgoingFile
    this.receiving = new Map(); // "peer id" -> IncomingFile
  }

  static key(peer, transfer) {
    return `${peer} ${transfer}`;
  }

  forget(map, t) {
    const k = Files.key(t.peer ?? t.from, t._transfer);
    if (map.get(k) === t) map.delete(k);
  }

  send(link, blob, name) {
    let id;
    do {
      const r = crypto.getRandomValues(new Uint32Array(2));
      id = (BigInt(r[0]) << 32n) | BigInt(r[1]);
      // Unique among this end's transfers to the peer, and none of the peer's to this end (a
      // CANCEL names only the id).
    } while (this.sending.has(Files.key(link.peer, id)) || this.receiving.has(Files.key(link.peer, id)));
    const t = new OutgoingFile(this, link, blob, name, id);
    this.sending.set(Files.key(link.peer, id), t);
    return t;
  }

  // A message of the file lane of `link`.
  onMessage(link, data) {
    const m = decodeFileMsg(data);
    if (m === null) {
      console.warn(`peermesh: a malformed file-lane message from peer ${link.peer} dropped`);
      return;
    }
    const k = Files.key(link.peer, m.transfer);
    if (m.kind === F_OFFER) {
      if (this.receiving.has(k) || this.sending.has(k)) {
        console.warn(`peermesh: an OFFER of transfer ${m.transfer} from peer ${link.peer}, which is in use, dropped`);
        return;
      }
      const t = new IncomingFile(this, link, m);
      this.receiving.set(k, t);
      if (!this.c._listens('fileoffer')) {
        // Nobody to answer: that is a no (as an offer the app drops).
        t.refuse('not accepted');
        return;
      }
      this.c._emit('fileoffer', t.view());
      return;
    }
    const sender = [F_ACCEPT, F_REJECT, F_VERIFIED, F_DONE].includes(m.kind) || (m.kind === F_CANCEL && this.sending.has(k));
    const t = sender ? this.sending.get(k) : this.receiving.get(k);
    if (!t || t._link !== link) return; // a transfer that has ended
    if (sender) t._inbox.push(m);
    else t.onMessage(m);
  }

  // The link ended: so do its transfers.
  linkClosed(link) {
    const e = () => fileError('peer_left', `the link to peer ${link.peer} has ended`);
    for (const t of [...this.sending.values()]) if (t._link === link) t._inbox.fail(e());
    for (const t of [...this.receiving.values()]) if (t._link === link) t.fail(e());
  }
}

/** Internals for unit checks (interop-tests/browser/unit.mjs); not part of the API. */
export const _internals = {
  FILE_LANE,
  Sha256,
  sha256,
  safeFileName,
  encodeFileMsg,
  decodeFileMsg,
  fileChunkMax,
  Files,
  partFrames,
  laneDataFrame,
  ackFrame,
  versionFrame,
  seqFrames,
  decodeFrame,
  newerSeq,
  SeqReceiver,
  laneConfigs,
  LANE_WAIT_MS,
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
};
