// The demo page: join a group, see each member's path and RTT, chat, send files (drag and drop).
import { connect } from '/peermesh.js';

const $ = (id) => document.getElementById(id);
const state = { client: null, group: null, members: new Map(), timer: null, transfers: new Map() };
window.peermeshDemo = state; // for the console

const params = new URLSearchParams(location.search);
$('group').value = params.get('group') ?? localStorage.getItem('peermesh.group') ?? 'lobby';
$('name').value = params.get('name') ?? localStorage.getItem('peermesh.name') ?? '';

function time() {
  return new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

function log(kind, who, text) {
  const li = document.createElement('li');
  li.className = kind;
  const t = document.createElement('span');
  t.className = 'time';
  t.textContent = time();
  li.append(t);
  if (who !== null) {
    const w = document.createElement('span');
    w.className = 'who';
    w.textContent = `${who}:`;
    li.append(w);
  }
  li.append(document.createTextNode(text));
  const box = $('log');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.append(li);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

// Colour of a path badge: the "most relayed" candidate type of the pair.
function badgeClass(path) {
  if (path === 'server') return 'server';
  const types = path.replace('direct ', '').split('/');
  for (const t of ['relay', 'prflx', 'srflx']) if (types.includes(t)) return t;
  return 'host';
}

const palette = ['#5c7cfa', '#f76707', '#37b24d', '#ae3ec9', '#1098ad', '#f59f00', '#e64980', '#4263eb'];

function renderMembers() {
  const ul = $('members');
  ul.replaceChildren();
  $('member-count').textContent = state.client ? String(state.members.size + 1) : '0';
  if (!state.client) {
    ul.innerHTML = '<li class="empty">Join a group to see who is there.</li>';
    return;
  }
  const me = document.createElement('li');
  me.append(span('pick', ''));
  me.append(avatar(state.client.name, state.client.peerId));
  me.append(span('member-name', `${state.client.name} (you)`));
  me.append(span('badge server', 'this tab'));
  me.append(span('member-id', `peer ${state.client.peerId}`));
  me.append(span('rtt', ''));
  ul.append(me);
  for (const [peer, m] of [...state.members].sort((a, b) => a[0] - b[0])) {
    const li = document.createElement('li');
    li.dataset.peer = String(peer);
    // Checked members get files dropped on the page; a file dropped on the row goes to it.
    const pick = document.createElement('input');
    pick.type = 'checkbox';
    pick.className = 'pick';
    pick.title = `send dropped files to ${m.name}`;
    pick.setAttribute('aria-label', `send dropped files to ${m.name}`);
    pick.checked = m.picked ?? false;
    pick.addEventListener('change', () => (m.picked = pick.checked));
    li.append(pick);
    li.addEventListener('dragover', (e) => {
      if (!e.dataTransfer?.types.includes('Files')) return;
      e.preventDefault();
      li.classList.add('drop-target');
    });
    li.addEventListener('dragleave', () => li.classList.remove('drop-target'));
    li.addEventListener('drop', (e) => {
      e.preventDefault();
      e.stopPropagation();
      li.classList.remove('drop-target');
      $('drop-overlay').hidden = true;
      for (const f of e.dataTransfer.files) sendFile(peer, f);
    });
    li.append(avatar(m.name, peer));
    li.append(span('member-name', m.name));
    m.badge = span('badge server', 'server');
    m.badge.dataset.role = 'path';
    li.append(m.badge);
    li.append(span('member-id', `peer ${peer}`));
    m.rtt = span('rtt', '');
    m.rtt.dataset.role = 'rtt';
    li.append(m.rtt);
    ul.append(li);
  }
  refreshPaths();
}

function span(cls, text) {
  const s = document.createElement('span');
  s.className = cls;
  s.textContent = text;
  return s;
}

function avatar(name, peer) {
  const a = span('avatar', [...name.trim()][0] ?? '?');
  a.style.background = palette[peer % palette.length];
  return a;
}

function refreshPaths() {
  if (!state.client) return;
  for (const [peer, m] of state.members) {
    if (!m.badge) continue;
    let path = 'server';
    let rtt = null;
    try {
      path = state.client.path(peer);
      rtt = state.client.rtt(peer);
    } catch {
      continue; // left meanwhile
    }
    m.badge.textContent = path;
    m.badge.className = `badge ${badgeClass(path)}`;
    m.rtt.textContent = rtt === null ? '…' : `${rtt < 10 ? rtt.toFixed(1) : Math.round(rtt)} ms`;
  }
}

function setOnline(online) {
  $('status').textContent = online ? `${state.client.name} · peer ${state.client.peerId}` : 'offline';
  $('status').className = `status ${online ? 'online' : 'offline'}`;
  for (const id of ['name', 'group', 'direct', 'relay-only']) $(id).disabled = online;
  $('join').hidden = online;
  $('leave').hidden = !online;
  $('message').disabled = !online;
  $('pick-file').disabled = !online;
  $('send').disabled = !online;
  $('message').placeholder = online ? `Message ${state.group}` : 'Join a group first';
  $('group-label').textContent = online ? state.group : '';
}

function showError(text) {
  $('join-error').textContent = text;
  $('join-error').hidden = !text;
}

$('join-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  showError('');
  const name = $('name').value.trim();
  const group = $('group').value.trim();
  $('join').disabled = true;
  try {
    const client = await connect({ name, direct: $('direct').checked, relayOnly: $('relay-only').checked });
    state.client = client;
    state.group = group;
    state.members.clear();
    client.on('memberjoined', ({ peer, name: n }) => {
      state.members.set(peer, { name: n });
      log('system', null, `${n} joined`);
      renderMembers();
    });
    client.on('memberleft', ({ peer, name: n }) => {
      state.members.delete(peer);
      log('system', null, `${n} left`);
      renderMembers();
    });
    client.on('path', ({ peer, path }) => {
      log('system', null, `path to ${client.nameOf(peer) ?? peer}: ${path}`);
      refreshPaths();
    });
    client.on('nodirectpath', ({ peer, reason }) => {
      log('system', null, `no direct path to ${client.nameOf(peer) ?? peer}: ${reason}`);
    });
    client.on('message', ({ from, text }) => log('', client.nameOf(from) ?? `peer ${from}`, text));
    client.on('fileoffer', (offer) => receiveFile(offer));
    client.on('fileprogress', (p) => {
      if (p.direction === 'receive') state.transfers.get(`r ${p.peer} ${p.id}`)?.progress(p);
    });
    client.on('error', ({ code, message }) => log('system', null, `server error ${code}: ${message}`));
    client.on('reconnecting', ({ attempt }) => {
      $('status').textContent = `reconnecting… (attempt ${attempt})`;
      $('status').className = 'status offline';
    });
    client.on('reconnected', ({ resumed }) => {
      log('system', null, resumed ? 'reconnected' : 'reconnected (new session)');
      setOnline(true);
    });
    client.on('rejoined', ({ group: g }) => log('system', null, `rejoined ${g}`));
    client.on('undelivered', ({ messages }) =>
      log('system', null, `${messages} message(s) may not have arrived (the server restarted)`),
    );
    client.on('close', ({ reason, byClient }) => {
      if (!byClient) log('system', null, `disconnected: ${reason}`);
      state.client = null;
      state.members.clear();
      clearInterval(state.timer);
      setOnline(false);
      renderMembers();
    });
    await client.join(group);
    localStorage.setItem('peermesh.name', name);
    localStorage.setItem('peermesh.group', group);
    log('system', null, `you joined ${group} as ${name}`);
    setOnline(true);
    renderMembers();
    state.timer = setInterval(refreshPaths, 1000);
    $('message').focus();
  } catch (err) {
    showError(err.message ?? String(err));
    state.client?.close();
  } finally {
    $('join').disabled = false;
  }
});

$('leave').addEventListener('click', async () => {
  const client = state.client;
  if (!client) return;
  log('system', null, `you left ${state.group}`);
  await client.close();
});

$('send-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = $('message').value;
  if (!text || !state.client) return;
  $('message').value = '';
  log('me', `${state.client.name} (you)`, text);
  try {
    await state.client.broadcast(state.group, text);
  } catch (err) {
    log('system', null, `not sent: ${err.message}`);
  }
});

// ---- files ----

function size(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let u = -1;
  do {
    n /= 1024;
    u++;
  } while (n >= 1024 && u < units.length - 1);
  return `${n < 10 ? n.toFixed(1) : Math.round(n)} ${units[u]}`;
}

function duration(s) {
  if (s === null || !Number.isFinite(s)) return '…';
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
}

// One row of the transfers list: name, peer, a progress bar, a status, and actions.
function transferRow(key, dir, peer, name, total) {
  const li = document.createElement('li');
  li.className = `transfer ${dir}`;
  li.dataset.key = key;
  const who = state.client?.nameOf(peer) ?? `peer ${peer}`;
  const head = span('transfer-head', '');
  head.append(span('transfer-dir', dir === 'send' ? '↑' : '↓'));
  head.append(span('transfer-name', name));
  head.append(span('transfer-peer', dir === 'send' ? `to ${who}` : `from ${who}`));
  head.append(span('transfer-size', size(total)));
  const bar = document.createElement('progress');
  bar.max = Math.max(total, 1);
  bar.value = 0;
  const status = span('transfer-status', dir === 'send' ? 'hashing…' : 'offered');
  const actions = span('transfer-actions', '');
  li.append(head, bar, status, actions);
  $('transfers').prepend(li);
  const row = {
    li,
    bar,
    status,
    actions,
    progress({ done, total: t, rate, eta }) {
      bar.value = done;
      status.textContent = `${size(done)} of ${size(t)} · ${size(rate)}/s · ${duration(eta)} left`;
    },
    end(cls, text) {
      li.classList.add(cls);
      status.textContent = text;
      actions.replaceChildren();
    },
    button(text, onclick, cls = 'secondary') {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = `small ${cls}`;
      b.textContent = text;
      b.addEventListener('click', onclick);
      actions.append(b);
      return b;
    },
  };
  state.transfers.set(key, row);
  $('transfer-count').textContent = String(state.transfers.size);
  return row;
}

function sendFile(peer, file) {
  if (!state.client) return;
  let t;
  try {
    t = state.client.sendFile(peer, file);
  } catch (err) {
    log('system', null, `${file.name} not sent: ${err.message}`);
    return;
  }
  const row = transferRow(`s ${peer} ${t.id}`, 'send', peer, t.name, t.size);
  t.on('progress', (p) => row.progress(p));
  row.button('Cancel', () => t.cancel());
  t.done.then(
    (r) => row.end('done', `sent · sha256 ${r.sha256.slice(0, 16)}…`),
    (err) => row.end('failed', err.code === 'rejected' ? `declined: ${err.message}` : `failed (${err.code}): ${err.message}`),
  );
}

// Files dropped on the page (or picked) go to the checked members, or everyone.
function sendToPicked(files) {
  if (!state.client) return;
  const picked = [...state.members].filter(([, m]) => m.picked).map(([peer]) => peer);
  const peers = picked.length > 0 ? picked : [...state.members.keys()];
  if (peers.length === 0) {
    log('system', null, 'nobody to send files to yet');
    return;
  }
  for (const f of files) for (const peer of peers) sendFile(peer, f);
}

function receiveFile(offer) {
  const row = transferRow(`r ${offer.from} ${offer.id}`, 'receive', offer.from, offer.name, offer.size);
  const accept = () => {
    row.actions.replaceChildren();
    row.status.textContent = 'receiving…';
    row.button('Cancel', () => offer.cancel());
    offer.accept().then(
      (f) => {
        row.end('done', `received · sha256 ${f.sha256.slice(0, 16)}…`);
        const a = document.createElement('a');
        a.href = URL.createObjectURL(f.blob);
        a.download = f.name;
        a.className = 'download';
        a.textContent = 'Download';
        row.actions.append(a);
      },
      (err) => row.end('failed', `failed (${err.code}): ${err.message}`),
    );
  };
  if ($('auto-accept').checked) {
    accept();
    return;
  }
  row.button('Accept', accept, 'primary');
  row.button('Decline', () => {
    offer.reject('declined');
    row.end('failed', 'declined');
  });
}

$('pick-file').addEventListener('click', () => $('file-input').click());
$('file-input').addEventListener('change', () => {
  sendToPicked([...$('file-input').files]);
  $('file-input').value = '';
});

// Dragging files over the page: the overlay; a drop outside a member row goes to the picked ones.
let dragDepth = 0;
document.addEventListener('dragenter', (e) => {
  if (!state.client || !e.dataTransfer?.types.includes('Files')) return;
  dragDepth++;
  $('drop-overlay').hidden = false;
});
document.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) $('drop-overlay').hidden = true;
});
document.addEventListener('dragover', (e) => {
  if (state.client && e.dataTransfer?.types.includes('Files')) e.preventDefault();
});
document.addEventListener('drop', (e) => {
  dragDepth = 0;
  $('drop-overlay').hidden = true;
  if (!e.dataTransfer?.files.length) return;
  e.preventDefault();
  sendToPicked([...e.dataTransfer.files]);
});
