// One peer of a libdatachannel (node-datachannel) pair: the outside baseline that
// interop-tests/src/ndc.rs runs next to our own direct path in benchmarks. Run it twice:
//
//   node ndc_peer.mjs --role offer  --ip 127.0.0.1 --signal-listen 127.0.0.1:0 --test rtt --count 200
//   node ndc_peer.mjs --role answer --ip 127.0.0.1 --signal 127.0.0.1:PORT
//
// Signaling: one plain TCP connection, newline-delimited JSON. The offerer listens (port 0 = any;
// it prints {"event":"listening","addr":"IP:PORT"} on stdout), the answerer connects. The
// offerer sends {"type":"config",...} (the test and its parameters) first, then both exchange
// {"type":"description","sdp","kind"} and {"type":"candidate","candidate","mid"}; at the end the
// offerer sends {"type":"bye"}.
//
// Both sides create two pre-negotiated data channels, like peermesh's direct path: "r" (id 0,
// ordered, reliable) and "u" (id 1, unordered, maxRetransmits 0). No STUN/TURN servers: host
// candidates only, ICE bound to --ip (libdatachannel's bindAddress).
//
// What libdatachannel 0.24 (node-datachannel 0.33.4) does with these options, as seen here:
//  - bindAddress: the ICE UDP socket is bound to that address and it is the only host candidate.
//    Without it, libjuice offers every interface address except loopback (so 127.0.0.1 pairs
//    need it). --port-range LO-HI sets portRangeBegin/End (checked: the candidate's port is in it).
//  - mDNS: there is no option; libdatachannel never hides host candidates behind .local names.
//  - disableAutoNegotiation: true on both sides; the offerer calls setLocalDescription('offer'),
//    the answerer setLocalDescription('answer') after the offer. Candidates trickle.
//  - open time is bimodal on loopback: about 10-70 ms, or about 1010 ms when (as Debug logs
//    suggest) the answerer, the DTLS client, sends its ClientHello before the offerer has the
//    answer and its DTLS transport: that flight is lost, and OpenSSL resends it after its 1 s
//    retransmit timer.
//
// Tests (flags on the offerer; the answerer echoes or sinks):
//   --test open                                   time from PeerConnection creation to "r" open
//   --test rtt --count N --size 64                ping-pong on "r": median/p99 RTT
//   --test bulk --mib M --msg-size 16384          M MiB on "r" with back-pressure: MB/s (10^6 B/s)
//   --test unreliable --count N --interval-ms 2 --size 200
//                                                 one-way latency on "u" (CLOCK_MONOTONIC): p50/p99
// Every test first prints the open line, then its own. Results are single lines on stdout that
// start with {"result": ; logs go to stderr. --timeout-s (default 60) bounds the whole run:
// a peer whose partner dies exits on its own, with status 2.
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import nodeDataChannel from 'node-datachannel';

// ---- flags ----

function parseFlags(argv) {
  const flags = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) fail(`unexpected argument ${a}`);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) fail(`flag ${a} needs a value`);
    flags[a.slice(2)] = next;
    i++;
  }
  return flags;
}

function fail(msg) {
  process.stderr.write(`ndc_peer: ${msg}\n`);
  process.exit(1);
}

function num(flags, name, dflt) {
  if (flags[name] === undefined) return dflt;
  const n = Number(flags[name]);
  if (!Number.isFinite(n) || n < 0) fail(`--${name} must be a non-negative number`);
  return n;
}

// "IP:PORT" or "[v6]:PORT".
function parseAddr(s) {
  const i = s.lastIndexOf(':');
  if (i < 0) fail(`address ${s} has no port`);
  let host = s.slice(0, i);
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  const port = Number(s.slice(i + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad port in ${s}`);
  return { host, port };
}

const flags = parseFlags(process.argv.slice(2));
const role = flags.role;
if (role !== 'offer' && role !== 'answer') fail('--role offer|answer is required');
const localIp = flags.ip ?? '127.0.0.1';
const timeoutS = num(flags, 'timeout-s', 60);
const logLevel = flags['log-level'] ?? 'Warning';
let portRange = null;
if (flags['port-range']) {
  const [lo, hi] = flags['port-range'].split('-').map(Number);
  if (!(lo > 0 && hi >= lo && hi < 65536)) fail('--port-range must be LO-HI');
  portRange = [lo, hi];
}

function log(msg) {
  process.stderr.write(`[ndc ${role} ${performance.now().toFixed(1)}] ${msg}\n`);
}

function result(obj) {
  process.stdout.write(`${JSON.stringify({ result: obj.result, role, ...obj })}\n`);
}

// ---- shutdown: bounded in every case ----

let pc = null;
let sock = null;
let finished = false;

function shutdown(code, why) {
  if (finished) return;
  finished = true;
  clearInterval(keepAlive);
  if (why) log(why);
  try {
    if (sock) sock.destroy();
  } catch {}
  try {
    if (pc) pc.close();
  } catch {}
  try {
    nodeDataChannel.cleanup();
  } catch {}
  // cleanup() joins libdatachannel's threads; exit explicitly in case anything is left.
  setTimeout(() => process.exit(code), 10).unref();
  process.exitCode = code;
}

const globalTimer = setTimeout(() => {
  shutdown(2, `timeout: nothing finished within ${timeoutS} s`);
  // If shutdown itself hangs in native code, the process still has to go.
  setTimeout(() => process.exit(2), 2000).unref();
}, timeoutS * 1000);
globalTimer.unref();
// Keeps the event loop alive while the test runs (the timer above is unref'd so that a clean
// finish does not wait for it).
const keepAlive = setInterval(() => {}, 1000);

process.on('uncaughtException', (e) => shutdown(1, `error: ${e.stack ?? e}`));

nodeDataChannel.initLogger(logLevel, (level, message) => log(`libdatachannel ${level}: ${message}`));

// ---- signaling ----

function send(msg) {
  if (sock && !sock.destroyed) sock.write(`${JSON.stringify(msg)}\n`);
}

function attachSignal(s, onMessage) {
  sock = s;
  s.setNoDelay(true);
  let buf = '';
  s.setEncoding('utf8');
  s.on('data', (chunk) => {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!line.trim()) continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        log(`bad signaling line: ${line.slice(0, 200)}`);
        continue;
      }
      onMessage(msg);
    }
  });
  s.on('error', (e) => log(`signaling: ${e.message}`));
  s.on('close', () => {
    if (!finished) shutdown(role === 'answer' && answerDone ? 0 : 3, 'signaling connection closed');
  });
}

// ---- the peer connection ----

function createPeer(onOpenR) {
  const config = {
    iceServers: [],
    bindAddress: localIp,
    disableAutoNegotiation: true,
  };
  if (portRange) {
    config.portRangeBegin = portRange[0];
    config.portRangeEnd = portRange[1];
  }
  pc = new nodeDataChannel.PeerConnection(role, config);
  pc.onLocalDescription((sdp, kind) => send({ type: 'description', sdp, kind }));
  pc.onLocalCandidate((candidate, mid) => {
    log(`local candidate ${candidate}`);
    send({ type: 'candidate', candidate, mid });
  });
  pc.onStateChange((st) => {
    log(`state ${st}`);
    if ((st === 'failed' || st === 'closed') && !finished) shutdown(4, `peer connection ${st}`);
  });
  const r = pc.createDataChannel('r', { negotiated: true, id: 0 });
  const u = pc.createDataChannel('u', {
    negotiated: true,
    id: 1,
    unordered: true,
    maxRetransmits: 0,
  });
  r.onOpen(() => onOpenR(r, u));
  r.onError((e) => log(`channel r error: ${e}`));
  u.onError((e) => log(`channel u error: ${e}`));
  return { r, u };
}

function onSignal(msg) {
  switch (msg.type) {
    case 'description':
      pc.setRemoteDescription(msg.sdp, msg.kind);
      if (msg.kind === 'offer') pc.setLocalDescription('answer');
      break;
    case 'candidate':
      pc.addRemoteCandidate(msg.candidate, msg.mid);
      break;
    case 'bye':
      shutdown(answerDone ? 0 : 3, 'bye');
      break;
    default:
      break;
  }
}

// One clock for both processes of a machine: CLOCK_MONOTONIC (libuv's hrtime), in ms. Unlike
// performance.timeOrigin (a wall-clock reading at each process's start) it is not moved by clock
// adjustments, and network namespaces share it.
const nowAbs = () => Number(process.hrtime.bigint()) / 1e6;

function pct(sorted, p) {
  if (sorted.length === 0) return null;
  const k = Math.max(0, Math.ceil(p * sorted.length) - 1);
  return sorted[Math.min(k, sorted.length - 1)];
}

const round3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

// ---- offerer ----

function runOffer() {
  const test = flags.test ?? 'open';
  const cfg = { type: 'config', test };
  if (test === 'rtt') {
    cfg.count = num(flags, 'count', 200);
    cfg.size = Math.max(8, num(flags, 'size', 64));
  } else if (test === 'bulk') {
    cfg.mib = num(flags, 'mib', 16);
    cfg.msgSize = num(flags, 'msg-size', 16384);
    cfg.high = num(flags, 'high-mib', 4) * 1048576;
    cfg.low = num(flags, 'low-mib', 1) * 1048576;
    cfg.total = Math.round(cfg.mib * 1048576);
  } else if (test === 'unreliable') {
    cfg.count = num(flags, 'count', 500);
    cfg.intervalMs = num(flags, 'interval-ms', 2);
    cfg.size = Math.max(12, num(flags, 'size', 200));
  } else if (test !== 'open') {
    fail(`unknown --test ${test}`);
  }
  const { host, port } = parseAddr(flags['signal-listen'] ?? `${localIp}:0`);
  const server = net.createServer((s) => {
    server.close();
    attachSignal(s, onSignal);
    send(cfg);
    const t0 = performance.now();
    createPeer((r, u) => {
      const openMs = performance.now() - t0;
      result({ result: 'open', open_ms: round3(openMs) });
      const done = (code = 0) => {
        send({ type: 'bye' });
        sock.end();
        shutdown(code);
      };
      if (test === 'open') done();
      else if (test === 'rtt') offerRtt(r, cfg, done);
      else if (test === 'bulk') offerBulk(r, cfg, done);
      else offerUnreliable(r, u, cfg, done);
    });
    pc.setLocalDescription('offer');
  });
  server.on('error', (e) => shutdown(1, `signaling listen: ${e.message}`));
  server.listen(port, host, () => {
    const a = server.address();
    const shown = a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
    process.stdout.write(`${JSON.stringify({ event: 'listening', addr: shown })}\n`);
    log(`signaling on ${shown}`);
  });
}

function offerRtt(r, cfg, done) {
  const rtts = [];
  const msg = Buffer.alloc(cfg.size);
  let sentAt = 0;
  let seq = 0;
  const ping = () => {
    msg.writeUInt32LE(seq, 0);
    sentAt = performance.now();
    r.sendMessageBinary(msg);
  };
  r.onMessage((m) => {
    if (typeof m === 'string') return;
    const b = Buffer.from(m);
    if (b.length < 4 || b.readUInt32LE(0) !== seq) return log('rtt: unexpected echo');
    rtts.push(performance.now() - sentAt);
    seq++;
    if (seq < cfg.count) return ping();
    const sorted = [...rtts].sort((a, b2) => a - b2);
    result({
      result: 'rtt',
      count: rtts.length,
      size: cfg.size,
      median_ms: round3(pct(sorted, 0.5)),
      p99_ms: round3(pct(sorted, 0.99)),
      min_ms: round3(sorted[0]),
      max_ms: round3(sorted[sorted.length - 1]),
    });
    done();
  });
  if (cfg.count > 0) ping();
  else done();
}

function offerBulk(r, cfg, done) {
  const chunk = Buffer.alloc(cfg.msgSize, 0x5a);
  let sent = 0;
  let t0 = 0;
  r.setBufferedAmountLowThreshold(cfg.low);
  const pump = () => {
    while (sent < cfg.total && r.bufferedAmount() < cfg.high) {
      const n = Math.min(cfg.msgSize, cfg.total - sent);
      if (t0 === 0) t0 = performance.now();
      r.sendMessageBinary(n === chunk.length ? chunk : chunk.subarray(0, n));
      sent += n;
    }
  };
  r.onBufferedAmountLow(pump);
  r.onMessage((m) => {
    if (typeof m !== 'string') return;
    const msg = JSON.parse(m);
    if (msg.type !== 'bulk_done') return;
    const secs = (performance.now() - t0) / 1000;
    result({
      result: 'bulk',
      bytes_sent: sent,
      bytes_received: msg.bytes,
      msg_size: cfg.msgSize,
      secs: round3(secs),
      mb_per_s: round3(msg.bytes / secs / 1e6),
    });
    done(msg.bytes === cfg.total ? 0 : 5);
  });
  pump();
}

function offerUnreliable(r, u, cfg, done) {
  const msg = Buffer.alloc(cfg.size);
  let seq = 0;
  r.onMessage((m) => {
    if (typeof m !== 'string') return;
    const stats = JSON.parse(m);
    if (stats.type !== 'unreliable_stats') return;
    // The receiver's figures, also printed by the receiver itself.
    delete stats.type;
    process.stdout.write(
      `${JSON.stringify({ result: 'unreliable', role: 'answer', relayed_by: 'offer', ...stats })}\n`,
    );
    done();
  });
  const tick = () => {
    if (finished) return;
    if (seq >= cfg.count) {
      r.sendMessage(JSON.stringify({ type: 'unreliable_end', sent: seq }));
      return;
    }
    msg.writeDoubleLE(nowAbs(), 0);
    msg.writeUInt32LE(seq, 8);
    u.sendMessageBinary(msg);
    seq++;
    setTimeout(tick, cfg.intervalMs);
  };
  tick();
}

// ---- answerer ----

let answerDone = false;

function runAnswer() {
  if (!flags.signal) fail('--signal IP:PORT is required for --role answer');
  const { host, port } = parseAddr(flags.signal);
  let cfg = null;
  let attempts = 0;
  const connect = () => {
    const s = net.connect({ host, port, localAddress: localIp });
    const onEarlyError = (e) => {
      // The offerer may not listen yet: retry, bounded by the global timeout.
      if (++attempts % 20 === 0) log(`still connecting to ${flags.signal}: ${e.message}`);
      s.destroy();
      setTimeout(connect, 50);
    };
    s.once('error', onEarlyError);
    s.once('connect', () => {
      s.removeListener('error', onEarlyError);
      attachSignal(s, (msg) => {
        if (msg.type === 'config') {
          cfg = msg;
          const { r, u } = createPeer(() => log('channel r open'));
          answerHandlers(cfg, r, u);
          return;
        }
        onSignal(msg);
      });
    });
  };
  connect();
}

function answerHandlers(cfg, r, u) {
  if (cfg.test === 'open') {
    answerDone = true;
  } else if (cfg.test === 'rtt') {
    r.onMessage((m) => {
      if (typeof m !== 'string') r.sendMessageBinary(Buffer.from(m));
    });
    answerDone = true;
  } else if (cfg.test === 'bulk') {
    let bytes = 0;
    r.onMessage((m) => {
      if (typeof m === 'string') return;
      bytes += m.byteLength;
      if (bytes >= cfg.total) {
        r.sendMessage(JSON.stringify({ type: 'bulk_done', bytes }));
        answerDone = true;
      }
    });
  } else if (cfg.test === 'unreliable') {
    const lat = [];
    const seen = new Set();
    let outOfOrder = 0;
    let lastSeq = -1;
    let reported = false;
    u.onMessage((m) => {
      if (typeof m === 'string') return;
      const b = Buffer.from(m);
      if (b.length < 12) return;
      const seq = b.readUInt32LE(8);
      if (seen.has(seq)) return;
      seen.add(seq);
      if (seq < lastSeq) outOfOrder++;
      lastSeq = Math.max(lastSeq, seq);
      lat.push(nowAbs() - b.readDoubleLE(0));
      if (endSent !== null && seen.size >= endSent) report();
    });
    let endSent = null;
    const report = () => {
      if (reported) return;
      reported = true;
      const sorted = [...lat].sort((a, b) => a - b);
      const stats = {
        sent: endSent ?? cfg.count,
        delivered: seen.size,
        out_of_order: outOfOrder,
        size: cfg.size,
        p50_ms: round3(pct(sorted, 0.5)),
        p99_ms: round3(pct(sorted, 0.99)),
        max_ms: round3(sorted.length ? sorted[sorted.length - 1] : null),
      };
      result({ result: 'unreliable', ...stats });
      r.sendMessage(JSON.stringify({ type: 'unreliable_stats', ...stats }));
      answerDone = true;
    };
    r.onMessage((m) => {
      if (typeof m !== 'string') return;
      const msg = JSON.parse(m);
      if (msg.type !== 'unreliable_end') return;
      endSent = msg.sent;
      // "r" and "u" are separate streams: the last unreliable messages may still be on their
      // way; wait for them a little (they may also be lost, which is what we measure).
      if (seen.size >= endSent) report();
      else setTimeout(report, 300);
    });
  }
}

if (role === 'offer') runOffer();
else runAnswer();
void keepAlive;
