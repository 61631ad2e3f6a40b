// The demo page: join a group, see each member's path and RTT, chat.
import { connect } from '/peermesh.js';

const $ = (id) => document.getElementById(id);
const state = { client: null, group: null, members: new Map(), timer: null };
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
  me.append(avatar(state.client.name, state.client.peerId));
  me.append(span('member-name', `${state.client.name} (you)`));
  me.append(span('badge server', 'this tab'));
  me.append(span('member-id', `peer ${state.client.peerId}`));
  me.append(span('rtt', ''));
  ul.append(me);
  for (const [peer, m] of [...state.members].sort((a, b) => a[0] - b[0])) {
    const li = document.createElement('li');
    li.dataset.peer = String(peer);
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
