//! Shared server state: clients, groups and links.
//!
//! Everything lives behind one `std::sync::Mutex` that is never held across an `.await`. Frames
//! to clients are queued on channels while the lock is held, which never blocks and gives every
//! client a consistent order of events. The channels are bounded in bytes rather than in
//! frames: forwarded frames by the receiver's relay budget (senders wait for it), the server's
//! own replies and events by [`Outlet::send_text`], which closes a client that lets them pile
//! up (it is not reading).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use peermesh::protocol::{
    validate_group, DirectPolicy, ErrorCode, Limits, LinkId, MemberInfo, PathKind, PeerId,
    ServerMsg, WireCandidateType, PROTOCOL_VERSION,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};

use crate::admin::{AdminError, GroupInfo, GroupOptions, GroupSummary, MemberSummary, ServerEvent};
use crate::metrics::{HubSnapshot, Metrics, SlowQueue};
use crate::Config;

/// What one queued frame costs besides its bytes (the queue slot, the buffer's header): queues
/// are bounded by bytes + this per frame, so a flood of tiny frames cannot hide behind its
/// small byte count.
pub(crate) const FRAME_OVERHEAD: usize = 128;

/// Close code for a client that does not read relayed data (its budget stayed full, or nothing
/// could be written to it, for the stall timeout).
pub(crate) const TOO_SLOW: CloseReason =
    (peermesh::protocol::close_code::TRY_AGAIN_LATER, "too slow");

/// Close code for a client whose queue of replies and events overflowed (it does not read).
pub(crate) const NOT_READING: CloseReason = (
    peermesh::protocol::close_code::POLICY_VIOLATION,
    "not reading",
);

/// Close code for a session replaced by a newer one of the same user.
pub(crate) const REPLACED: CloseReason = (
    peermesh::protocol::close_code::REPLACED,
    "replaced by a newer session",
);

/// Close code for a connection whose session was resumed on another one.
pub(crate) const RESUMED_ELSEWHERE: CloseReason = (
    peermesh::protocol::close_code::RESUMED_ELSEWHERE,
    "session resumed elsewhere",
);

/// Close code for a session ended by the app's backend.
pub(crate) const KICKED: CloseReason = (
    peermesh::protocol::close_code::KICKED,
    "removed by the server",
);

/// A close code and reason for a WebSocket close frame.
pub(crate) type CloseReason = (u16, &'static str);

/// Something for a connection's writer task to send.
pub(crate) enum Outbound {
    /// A JSON text frame from the server itself (counted in [`OutletState::queued`]).
    Text(Utf8Bytes),
    /// A frame forwarded from another client (relay frame or `signal`); `permits` bytes of the
    /// receiver's relay budget are released once it is written.
    Forward { msg: Message, permits: usize },
    /// Send a close frame and stop.
    Close(CloseReason),
}

/// Where to send frames for one client.
#[derive(Clone)]
pub(crate) struct Outlet {
    pub(crate) tx: mpsc::UnboundedSender<Outbound>,
    /// Forwarded bytes (relay frames and `signal`s) that may still be queued towards this client.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) state: Arc<OutletState>,
}

/// The byte count of a client's queued replies and events, and the way to close it at once.
pub(crate) struct OutletState {
    /// Bytes of [`Outbound::Text`] queued and not yet written.
    pub(crate) queued: AtomicUsize,
    limit: usize,
    /// Tells the connection's writer to close at once (skipping queued frames).
    kill: Mutex<Option<oneshot::Sender<CloseReason>>>,
    /// The close code the session was killed with (0: not killed).
    killed_with: AtomicU16,
    metrics: Arc<Metrics>,
}

impl OutletState {
    pub(crate) fn new(
        limit: usize,
        kill: oneshot::Sender<CloseReason>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(OutletState {
            queued: AtomicUsize::new(0),
            limit,
            kill: Mutex::new(Some(kill)),
            killed_with: AtomicU16::new(0),
            metrics,
        })
    }

    /// The close code the session was killed with, if it was.
    pub(crate) fn killed_with(&self) -> Option<u16> {
        Some(self.killed_with.load(Ordering::Relaxed)).filter(|&c| c != 0)
    }

    /// Close the client at once with `reason` (skipping what is queued). Returns `false` if it
    /// was already being closed this way.
    pub(crate) fn kill(&self, reason: CloseReason) -> bool {
        let kill = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(kill) = kill else { return false };
        let sent = kill.send(reason).is_ok();
        if sent {
            self.killed_with.store(reason.0, Ordering::Relaxed);
        }
        sent
    }

    /// A text frame of `bytes` was written (or dropped).
    pub(crate) fn written(&self, bytes: usize) {
        self.queued
            .fetch_sub(bytes + FRAME_OVERHEAD, Ordering::Relaxed);
    }

    /// Close a client that does not read (see [`kill`](Self::kill)) and count it under the
    /// queue that showed it. Returns `false` if it was already being closed.
    pub(crate) fn drop_slow(&self, reason: CloseReason, queue: SlowQueue) -> bool {
        let killed = self.kill(reason);
        if killed {
            self.metrics.slow_dropped(queue);
        }
        killed
    }
}

impl Outlet {
    /// Queue a JSON frame from the server. A client whose queue of such frames would exceed
    /// its limit is not reading: it is closed with [`NOT_READING`] and the frame is dropped
    /// with it.
    pub(crate) fn send_text(&self, text: Utf8Bytes) {
        let len = text.len();
        let cost = len + FRAME_OVERHEAD;
        let before = self.state.queued.fetch_add(cost, Ordering::Relaxed);
        if before + cost > self.state.limit {
            self.state.written(len);
            if self.state.drop_slow(NOT_READING, SlowQueue::Control) {
                tracing::info!("dropping client: {} bytes of replies unread", before);
            }
            return;
        }
        if self.tx.send(Outbound::Text(text)).is_err() {
            self.state.written(len);
        }
    }
}

struct Client {
    name: String,
    /// User id (token `sub`) when the server requires tokens.
    user: Option<String>,
    /// The session's own limit on direct paths: the strictest of its token's and its hello's.
    direct: DirectPolicy,
    groups: BTreeSet<String>,
    /// Membership changes this session was told of and has not acknowledged yet.
    acks_due: HashSet<(String, u64)>,
    outlet: Outlet,
    /// The secret that resumes this session (the client said it is resumable).
    resume_token: Option<String>,
    /// Since when the session's connection is gone (it waits for a resume).
    suspended: Option<Instant>,
    /// Source address (per-address limit on suspended sessions).
    ip: Option<std::net::IpAddr>,
}

struct Link {
    id: LinkId,
    initiator: PeerId,
    shared_groups: usize,
    /// Fixed when the link is made (see [`State::link_policy`]).
    direct: DirectPolicy,
}

/// A membership change not yet acknowledged by every session told of it.
struct PendingChange {
    change: u64,
    waiting: BTreeSet<PeerId>,
    at: Instant,
}

struct Group {
    members: BTreeSet<PeerId>,
    options: GroupOptions,
    /// Created by the app's backend: it stays when empty, until destroyed.
    managed: bool,
    /// The number of the last membership change.
    change: u64,
    /// Oldest first; at most [`MAX_PENDING_CHANGES`].
    pending: VecDeque<PendingChange>,
}

/// Unacknowledged changes kept per group; an older one is reported as timed out early.
const MAX_PENDING_CHANGES: usize = 64;

#[derive(Default)]
struct State {
    last_peer: PeerId,
    last_link: LinkId,
    clients: HashMap<PeerId, Client>,
    /// The live session of each user id.
    users: HashMap<String, PeerId>,
    groups: HashMap<String, Group>,
    /// Keyed by `(smaller peer id, larger peer id)`.
    links: HashMap<(PeerId, PeerId), Link>,
    /// The server is stopping: sessions end without telling their co-members (who are being
    /// closed too, and whose direct paths should not end with the server).
    stopping: bool,
    /// Suspended sessions, in total and per source address.
    suspended_total: usize,
    suspended_by_ip: HashMap<std::net::IpAddr, usize>,
    /// The server is draining (see [`Hub::drain`]).
    drain: Option<Drain>,
}

/// The sessions a drain still waits for.
struct Drain {
    waiting: HashSet<PeerId>,
    /// How many are left, for the server's shutdown.
    left: watch::Sender<usize>,
}

/// The shared state of one server.
pub(crate) struct Hub {
    state: Mutex<State>,
    /// Sessions unregistered since start (the server trims its heap when this moves).
    ended: AtomicU64,
    limits: Limits,
    /// Clients may create a group by joining it.
    client_groups: bool,
    /// How long a membership change may wait for acknowledgements.
    ack_timeout: Duration,
    /// How long a suspended session waits for its resume.
    resume_grace: Duration,
    /// Most suspended sessions from one source address, and in total.
    max_suspended_per_ip: usize,
    max_suspended: usize,
    events: broadcast::Sender<ServerEvent>,
}

/// Who a new session is (from its `hello` and token).
pub(crate) struct NewSession {
    /// Display name.
    pub(crate) name: String,
    /// User id (token `sub`).
    pub(crate) user: Option<String>,
    /// Its own limit on direct paths (token and hello).
    pub(crate) direct: DirectPolicy,
    /// The client can resume the session.
    pub(crate) resumable: bool,
    /// Its source address as counted for per-address limits (IPv6 by /64).
    pub(crate) ip: Option<std::net::IpAddr>,
}

/// Details for an `error` frame.
pub(crate) struct Failure {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) group: Option<String>,
    pub(crate) peer: Option<PeerId>,
}

impl Failure {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            group: None,
            peer: None,
        }
    }

    pub(crate) fn in_group(self, group: &str) -> Self {
        self.group(group)
    }

    fn group(mut self, group: &str) -> Self {
        self.group = Some(group.to_owned());
        self
    }

    fn peer(mut self, peer: PeerId) -> Self {
        self.peer = Some(peer);
        self
    }

    pub(crate) fn into_msg(self, request: Option<&str>) -> ServerMsg {
        ServerMsg::Error {
            code: self.code,
            message: self.message,
            request: request.map(str::to_owned),
            group: self.group,
            peer: self.peer,
        }
    }
}

/// Serialize a server frame. Serializing these types cannot fail in practice; if it ever did,
/// the frame is dropped and logged rather than panicking.
pub(crate) fn encode(msg: &ServerMsg) -> Option<Utf8Bytes> {
    match serde_json::to_string(msg) {
        Ok(s) => Some(Utf8Bytes::from(s)),
        Err(e) => {
            tracing::error!("cannot serialize server frame: {e}");
            None
        }
    }
}

fn send(outlet: &Outlet, msg: &ServerMsg) {
    if let Some(text) = encode(msg) {
        outlet.send_text(text);
    }
}

fn pair(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Next id of a `u32` counter starting at 1, skipping 0 on wrap-around.
fn next_id(last: &mut u32) -> u32 {
    *last = last.wrapping_add(1);
    if *last == 0 {
        *last = 1;
    }
    *last
}

/// Why a member is removed from a group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// It asked (`leave`): it gets `left`.
    Leave,
    /// The app's backend removed it or destroyed the group: it gets `left`.
    Backend,
    /// Its session ended: nothing is sent to it.
    SessionEnded,
}

/// Events to publish once the lock is released.
type Outbox = Vec<ServerEvent>;

impl State {
    /// Record change `change` of `group` as waiting for the acknowledgements of `waiting`
    /// (each was sent a frame carrying it). A change nobody has to acknowledge is acknowledged
    /// at once.
    fn expect_acks(
        &mut self,
        group: &str,
        change: u64,
        waiting: BTreeSet<PeerId>,
        out: &mut Outbox,
    ) {
        if waiting.is_empty() {
            out.push(ServerEvent::ChangeAcked {
                group: group.to_owned(),
                change,
            });
            return;
        }
        for peer in &waiting {
            if let Some(c) = self.clients.get_mut(peer) {
                c.acks_due.insert((group.to_owned(), change));
            }
        }
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        g.pending.push_back(PendingChange {
            change,
            waiting,
            at: Instant::now(),
        });
        if g.pending.len() > MAX_PENDING_CHANGES {
            if let Some(old) = g.pending.pop_front() {
                self.time_out(group, old, out);
            }
        }
    }

    /// Report `pending` as not acknowledged by everyone in time.
    fn time_out(&mut self, group: &str, pending: PendingChange, out: &mut Outbox) {
        for peer in &pending.waiting {
            if let Some(c) = self.clients.get_mut(peer) {
                c.acks_due.remove(&(group.to_owned(), pending.change));
            }
        }
        out.push(ServerEvent::ChangeAckTimedOut {
            group: group.to_owned(),
            change: pending.change,
            missing: pending.waiting.into_iter().collect(),
        });
    }

    /// `peer` acknowledged (or can no longer acknowledge) change `change` of `group`.
    fn acked(&mut self, peer: PeerId, group: &str, change: u64, out: &mut Outbox) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let Some(i) = g.pending.iter().position(|p| p.change == change) else {
            return;
        };
        g.pending[i].waiting.remove(&peer);
        if g.pending[i].waiting.is_empty() {
            g.pending.remove(i);
            out.push(ServerEvent::ChangeAcked {
                group: group.to_owned(),
                change,
            });
        }
    }

    /// The policy of a new link between `a` and `b` made by a change of `group`.
    fn link_policy(&self, group: &Group, a: &Client, b: &Client) -> DirectPolicy {
        group.options.direct.max(a.direct).max(b.direct)
    }

    /// Remove `peer` from `group`, updating links and telling the members (the remaining ones
    /// get `member_left`; the removed one `left` unless its session ended). Also updates the
    /// removed client's group set. Deletes the group when it is empty and not managed.
    fn remove_member(&mut self, peer: PeerId, group: &str, why: Removal, out: &mut Outbox) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        if !g.members.remove(&peer) {
            return;
        }
        g.change += 1;
        let change = g.change;
        let remaining: Vec<PeerId> = g.members.iter().copied().collect();
        let user = self.clients.get(&peer).and_then(|c| c.user.clone());
        let note = encode(&ServerMsg::MemberLeft {
            group: group.to_owned(),
            peer,
            change: Some(change),
        });
        let mut waiting: BTreeSet<PeerId> = BTreeSet::new();
        for &other in &remaining {
            self.unlink(peer, other);
            if let (Some(client), Some(text), false) =
                (self.clients.get(&other), &note, self.stopping)
            {
                client.outlet.send_text(text.clone());
                waiting.insert(other);
            }
        }
        if let Some(client) = self.clients.get_mut(&peer) {
            client.groups.remove(group);
            if why != Removal::SessionEnded {
                send(
                    &client.outlet,
                    &ServerMsg::Left {
                        group: group.to_owned(),
                        change: Some(change),
                    },
                );
                waiting.insert(peer);
            }
        }
        out.push(ServerEvent::MemberLeft {
            group: group.to_owned(),
            peer,
            user,
            change,
        });
        self.expect_acks(group, change, waiting, out);
        if remaining.is_empty() && self.groups.get(group).is_some_and(|g| !g.managed) {
            self.groups.remove(group);
            out.push(ServerEvent::GroupDestroyed {
                group: group.to_owned(),
            });
        }
    }

    /// Add `me` to the existing group `group`, making links and telling everyone (`joined` to
    /// `me`, `member_joined` to the others). The caller checked that `me` may join.
    fn add_member(&mut self, me: PeerId, group: &str, out: &mut Outbox) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        g.change += 1;
        let change = g.change;
        let existing: Vec<PeerId> = g.members.iter().copied().collect();
        let Some(client) = self.clients.get(&me) else {
            return;
        };
        let my_name = client.name.clone();
        let my_user = client.user.clone();
        let my_outlet = client.outlet.clone();

        let mut members = Vec::with_capacity(existing.len());
        let mut waiting: BTreeSet<PeerId> = BTreeSet::new();
        for &other in &existing {
            let (Some(g), Some(mine), Some(theirs)) = (
                self.groups.get(group),
                self.clients.get(&me),
                self.clients.get(&other),
            ) else {
                continue;
            };
            let direct = self.link_policy(g, mine, theirs);
            let link = self.links.entry(pair(me, other)).or_insert_with(|| Link {
                id: next_id(&mut self.last_link),
                initiator: me,
                shared_groups: 0,
                direct,
            });
            link.shared_groups += 1;
            members.push(MemberInfo {
                peer: other,
                name: theirs.name.clone(),
                user: theirs.user.clone(),
                link: link.id,
                initiator: link.initiator == me,
                direct: link.direct,
            });
            send(
                &theirs.outlet,
                &ServerMsg::MemberJoined {
                    group: group.to_owned(),
                    member: MemberInfo {
                        peer: me,
                        name: my_name.clone(),
                        user: my_user.clone(),
                        link: link.id,
                        initiator: link.initiator == other,
                        direct: link.direct,
                    },
                    change: Some(change),
                },
            );
            waiting.insert(other);
        }
        if let Some(g) = self.groups.get_mut(group) {
            g.members.insert(me);
        }
        if let Some(client) = self.clients.get_mut(&me) {
            client.groups.insert(group.to_owned());
        }
        send(
            &my_outlet,
            &ServerMsg::Joined {
                group: group.to_owned(),
                members,
                change: Some(change),
            },
        );
        waiting.insert(me);
        out.push(ServerEvent::MemberJoined {
            group: group.to_owned(),
            peer: me,
            user: my_user,
            change,
        });
        self.expect_acks(group, change, waiting, out);
    }

    /// Why `me` may not be added to `group` (which exists) by anyone, if it may not.
    fn check_add(&self, limits: &Limits, me: PeerId, group: &str) -> Result<(), Failure> {
        let client = self
            .clients
            .get(&me)
            .ok_or_else(|| Failure::new(ErrorCode::Internal, "session not registered"))?;
        if client.groups.contains(group) {
            return Err(
                Failure::new(ErrorCode::AlreadyMember, "already in this group").group(group),
            );
        }
        if client.groups.len() >= limits.max_groups_per_client {
            return Err(Failure::new(
                ErrorCode::TooManyGroups,
                format!("already in {} groups", limits.max_groups_per_client),
            )
            .group(group));
        }
        if let Some(g) = self.groups.get(group) {
            let max = g.max_members(limits);
            if g.members.len() >= max {
                return Err(
                    Failure::new(ErrorCode::GroupFull, format!("group has {max} members"))
                        .group(group),
                );
            }
        }
        Ok(())
    }

    /// Mark `peer` suspended (since now) or not, keeping the counts.
    fn set_suspended(&mut self, peer: PeerId, suspended: bool) {
        let Some(c) = self.clients.get_mut(&peer) else {
            return;
        };
        if c.suspended.is_some() == suspended {
            return;
        }
        c.suspended = suspended.then(Instant::now);
        let ip = c.ip;
        if suspended {
            self.drain_done(peer);
            self.suspended_total += 1;
            if let Some(ip) = ip {
                *self.suspended_by_ip.entry(ip).or_insert(0) += 1;
            }
        } else {
            self.suspended_total -= 1;
            if let Some(ip) = ip {
                if let Some(n) = self.suspended_by_ip.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.suspended_by_ip.remove(&ip);
                    }
                }
            }
        }
    }

    /// The drain no longer waits for `peer` (it answered `drained`, left or lost its connection).
    fn drain_done(&mut self, peer: PeerId) {
        if let Some(d) = &mut self.drain {
            if d.waiting.remove(&peer) {
                d.left.send_replace(d.waiting.len());
            }
        }
    }

    /// Send `msg` to every peer `peer` has a link with (the members of its groups), once each.
    fn tell_co_members(&self, peer: PeerId, msg: &ServerMsg) {
        let Some(text) = encode(msg) else { return };
        let Some(me) = self.clients.get(&peer) else {
            return;
        };
        let others: BTreeSet<PeerId> = me
            .groups
            .iter()
            .filter_map(|g| self.groups.get(g))
            .flat_map(|g| g.members.iter().copied())
            .filter(|&p| p != peer)
            .collect();
        for other in others {
            if let Some(c) = self.clients.get(&other) {
                c.outlet.send_text(text.clone());
            }
        }
    }

    /// The pair `(a, b)` shares one group less: its link ends when it shares none.
    fn unlink(&mut self, a: PeerId, b: PeerId) {
        let key = pair(a, b);
        if let Some(link) = self.links.get_mut(&key) {
            link.shared_groups = link.shared_groups.saturating_sub(1);
            if link.shared_groups == 0 {
                self.links.remove(&key);
            }
        }
    }

    /// Remove a client entirely, telling its co-members.
    fn remove(&mut self, peer: PeerId, reason: &str, out: &mut Outbox) -> Option<Client> {
        let groups: Vec<String> = self.clients.get(&peer)?.groups.iter().cloned().collect();
        self.set_suspended(peer, false);
        for group in &groups {
            self.remove_member(peer, group, Removal::SessionEnded, out);
        }
        let client = self.clients.remove(&peer)?;
        self.drain_done(peer);
        if let Some(user) = &client.user {
            if self.users.get(user) == Some(&peer) {
                self.users.remove(user);
            }
        }
        for (group, change) in &client.acks_due {
            self.acked(peer, group, *change, out);
        }
        // Wake relay senders waiting for this client's budget: their frames are dropped.
        client.outlet.budget.close();
        out.push(ServerEvent::SessionDisconnected {
            peer,
            user: client.user.clone(),
            reason: reason.to_owned(),
        });
        Some(client)
    }

    fn group_info(&self, name: &str, g: &Group) -> GroupInfo {
        GroupInfo {
            name: name.to_owned(),
            options: g.options.clone(),
            managed: g.managed,
            change: g.change,
            members: g
                .members
                .iter()
                .filter_map(|p| {
                    self.clients.get(p).map(|c| MemberSummary {
                        peer: *p,
                        user: c.user.clone(),
                        name: c.name.clone(),
                    })
                })
                .collect(),
        }
    }
}

impl Group {
    fn new(options: GroupOptions, managed: bool) -> Self {
        Group {
            members: BTreeSet::new(),
            options,
            managed,
            change: 0,
            pending: VecDeque::new(),
        }
    }

    fn max_members(&self, limits: &Limits) -> usize {
        self.options
            .max_members
            .unwrap_or(limits.max_members_per_group)
            .min(limits.max_members_per_group)
    }
}

impl Hub {
    pub(crate) fn new(config: &Config) -> Self {
        Hub {
            state: Mutex::new(State::default()),
            ended: AtomicU64::new(0),
            limits: config.limits,
            client_groups: config.client_groups,
            ack_timeout: config.ack_timeout,
            resume_grace: config.resume_grace,
            max_suspended_per_ip: config.server_limits.max_connections_per_ip,
            max_suspended: config.server_limits.max_connections,
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// Sessions, groups and memberships now.
    pub(crate) fn snapshot(&self) -> HubSnapshot {
        let st = self.lock();
        HubSnapshot {
            sessions: st.clients.len(),
            groups: st.groups.len(),
            members: st.groups.values().map(|g| g.members.len()).sum(),
        }
    }

    /// Sessions unregistered since start.
    pub(crate) fn sessions_ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// The server is stopping: from now on sessions end without `member_left` to co-members.
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
    }

    /// The server is about to stop (it no longer accepts connections): send every session
    /// `drain` and wait for `drained` from the resumable ones (the clients that reconnect by
    /// themselves, and so can hold their messages for the next server). The returned count of
    /// sessions still waited for reaches 0 once each has answered or ended.
    pub(crate) fn drain(
        &self,
        reconnect_url: Option<&str>,
        timeout: Duration,
    ) -> watch::Receiver<usize> {
        let mut st = self.lock();
        let msg = ServerMsg::Drain {
            reconnect_url: reconnect_url.map(str::to_owned),
            timeout_ms: duration_ms(timeout),
        };
        let mut waiting = HashSet::new();
        if let Some(text) = encode(&msg) {
            for (&peer, c) in st.clients.iter().filter(|(_, c)| c.suspended.is_none()) {
                c.outlet.send_text(text.clone());
                if c.resume_token.is_some() {
                    waiting.insert(peer);
                }
            }
        }
        let (left, rx) = watch::channel(waiting.len());
        st.drain = Some(Drain { waiting, left });
        rx
    }

    /// `peer` answered `drain`: every reliable frame it sent is acknowledged.
    pub(crate) fn drained(&self, peer: PeerId) {
        self.lock().drain_done(peer);
    }

    /// A stream of the server's events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the whole server would, so keep going on poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publish events (after the lock is released: a subscriber never waits on it).
    fn publish(&self, out: Outbox) {
        for event in out {
            let _ = self.events.send(event);
        }
    }

    /// Register a client after a valid `hello` and queue its `welcome`. Returns its peer id.
    /// A user (`user`: token `sub`) has one live session: an older one is removed (its
    /// co-members see it leave) and closed with [`REPLACED`].
    pub(crate) fn register(
        &self,
        config: &Config,
        ice_servers: impl FnOnce(PeerId) -> Vec<peermesh::protocol::IceServer>,
        who: NewSession,
        outlet: Outlet,
    ) -> PeerId {
        let NewSession {
            name,
            user,
            direct,
            resumable,
            ip,
        } = who;
        let mut out = Outbox::new();
        let mut st = self.lock();
        if let Some(old) = user.as_ref().and_then(|u| st.users.get(u).copied()) {
            if let Some(client) = st.remove(old, "replaced", &mut out) {
                self.ended.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = old, "session replaced by a newer one of its user");
                client.outlet.state.kill(REPLACED);
            }
        }
        let mut peer = next_id(&mut st.last_peer);
        while st.clients.contains_key(&peer) {
            peer = next_id(&mut st.last_peer);
        }
        let resumable = resumable && !self.resume_grace.is_zero();
        let resume_token = resumable.then(new_resume_token);
        send(
            &outlet,
            &ServerMsg::Welcome {
                version: PROTOCOL_VERSION,
                peer,
                ice_servers: ice_servers(peer),
                heartbeat_interval_ms: duration_ms(config.heartbeat_interval),
                heartbeat_timeout_ms: duration_ms(config.heartbeat_timeout),
                limits: config.limits,
                resume_token: resume_token.clone(),
                resume_grace_ms: resumable.then(|| duration_ms(self.resume_grace)),
                resumed: false,
                groups: None,
            },
        );
        if let Some(user) = &user {
            st.users.insert(user.clone(), peer);
        }
        out.push(ServerEvent::SessionConnected {
            peer,
            user: user.clone(),
            name: name.clone(),
        });
        st.clients.insert(
            peer,
            Client {
                name,
                user,
                direct,
                groups: BTreeSet::new(),
                acks_due: HashSet::new(),
                outlet,
                resume_token,
                suspended: None,
                ip,
            },
        );
        drop(st);
        self.publish(out);
        peer
    }

    /// Remove a client (close, timeout, shutdown) and tell its co-members. `budget` identifies
    /// the session's connection: a session that was resumed on another connection since is left
    /// alone.
    pub(crate) fn unregister(&self, peer: PeerId, budget: &Arc<Semaphore>, reason: &str) {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let same = st
            .clients
            .get(&peer)
            .is_some_and(|c| Arc::ptr_eq(&c.outlet.budget, budget));
        if same && st.remove(peer, reason, &mut out).is_some() {
            self.ended.fetch_add(1, Ordering::Relaxed);
        }
        drop(st);
        self.publish(out);
    }

    /// The connection of a resumable session dropped: keep the session (groups, links) for the
    /// resume grace, tell its co-members `member_suspended`. Returns `false` (and does nothing)
    /// if the session is not resumable, or not this connection's any more.
    pub(crate) fn suspend(&self, peer: PeerId, budget: &Arc<Semaphore>) -> bool {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let Some(client) = st.clients.get(&peer) else {
            return false;
        };
        if !Arc::ptr_eq(&client.outlet.budget, budget)
            || client.resume_token.is_none()
            || client.suspended.is_some()
        {
            return false;
        }
        // Suspended sessions hold no connection: bound them per source address and in total
        // like connections, so dropping connections cannot pile them up.
        let ip = client.ip;
        let from_ip = ip.map_or(0, |ip| st.suspended_by_ip.get(&ip).copied().unwrap_or(0));
        if from_ip >= self.max_suspended_per_ip || st.suspended_total >= self.max_suspended {
            tracing::info!(peer, "not keeping the session: too many suspended sessions");
            return false;
        }
        st.set_suspended(peer, true);
        let user = st.clients.get(&peer).and_then(|c| c.user.clone());
        st.tell_co_members(peer, &ServerMsg::MemberSuspended { peer });
        out.push(ServerEvent::SessionSuspended { peer, user });
        drop(st);
        self.publish(out);
        true
    }

    /// Resume session `peer` on a new connection (`outlet`): check `token` and that the same
    /// user asks, then queue `welcome` (resumed) and a `joined` per group with the members
    /// now, and tell the co-members `member_resumed`. A session whose old connection has not
    /// been noticed dead yet is taken over (the old one is closed with 4003).
    pub(crate) fn resume(
        &self,
        config: &Config,
        ice_servers: impl FnOnce(PeerId) -> Vec<peermesh::protocol::IceServer>,
        peer: PeerId,
        token: &str,
        user: Option<&str>,
        outlet: Outlet,
    ) -> Result<(), Failure> {
        let failed = |m: &str| Failure::new(ErrorCode::ResumeFailed, m);
        let mut out = Outbox::new();
        let mut guard = self.lock();
        let st = &mut *guard;
        let client = st.clients.get_mut(&peer).ok_or_else(|| {
            failed("no such session: it ended (grace over) or the server restarted")
        })?;
        let token_ok = client
            .resume_token
            .as_deref()
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !token_ok || client.user.as_deref() != user {
            return Err(failed("wrong resume token for this session"));
        }
        let old = std::mem::replace(&mut client.outlet, outlet.clone());
        let was_suspended = client.suspended.is_some();
        let user = client.user.clone();
        let groups: Vec<String> = client.groups.iter().cloned().collect();
        let resume_token = client.resume_token.clone();
        st.set_suspended(peer, false);
        if !was_suspended {
            old.state.kill(RESUMED_ELSEWHERE);
        }
        // Frames forwarded to the old connection are gone with it.
        old.budget.close();
        send(
            &outlet,
            &ServerMsg::Welcome {
                version: PROTOCOL_VERSION,
                peer,
                ice_servers: ice_servers(peer),
                heartbeat_interval_ms: duration_ms(config.heartbeat_interval),
                heartbeat_timeout_ms: duration_ms(config.heartbeat_timeout),
                limits: config.limits,
                resume_token,
                resume_grace_ms: Some(duration_ms(self.resume_grace)),
                resumed: true,
                groups: Some(groups.clone()),
            },
        );
        for group in &groups {
            let Some(g) = st.groups.get(group) else {
                continue;
            };
            let members = g
                .members
                .iter()
                .filter(|&&p| p != peer)
                .filter_map(|&other| {
                    let c = st.clients.get(&other)?;
                    let link = st.links.get(&pair(peer, other))?;
                    Some(MemberInfo {
                        peer: other,
                        name: c.name.clone(),
                        user: c.user.clone(),
                        link: link.id,
                        initiator: link.initiator == peer,
                        direct: link.direct,
                    })
                })
                .collect();
            send(
                &outlet,
                &ServerMsg::Joined {
                    group: group.clone(),
                    members,
                    change: Some(g.change),
                },
            );
        }
        st.tell_co_members(peer, &ServerMsg::MemberResumed { peer });
        out.push(ServerEvent::SessionResumed { peer, user });
        drop(guard);
        self.publish(out);
        Ok(())
    }

    /// End the sessions that stayed suspended past the resume grace.
    pub(crate) fn expire_suspended(&self) {
        let mut out = Outbox::new();
        let mut st = self.lock();
        if st.suspended_total == 0 {
            return;
        }
        let now = Instant::now();
        let expired: Vec<PeerId> = st
            .clients
            .iter()
            .filter(|(_, c)| {
                c.suspended
                    .is_some_and(|at| now.duration_since(at) >= self.resume_grace)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            if st.remove(peer, "resume grace over", &mut out).is_some() {
                self.ended.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(st);
        self.publish(out);
    }

    /// Drop a client that reads too slowly: tell its co-members and close its socket at once.
    /// `budget` identifies the session (no-op if that client is already gone).
    pub(crate) fn kill_slow(&self, peer: PeerId, budget: &Arc<Semaphore>) {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let same = st
            .clients
            .get(&peer)
            .is_some_and(|c| Arc::ptr_eq(&c.outlet.budget, budget));
        if !same {
            return;
        }
        if let Some(client) = st.remove(peer, "too slow", &mut out) {
            self.ended.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer, "dropping client: too slow to read relayed data");
            client.outlet.state.drop_slow(TOO_SLOW, SlowQueue::Relay);
        }
        drop(st);
        self.publish(out);
    }

    /// Handle `join`.
    pub(crate) fn join(&self, me: PeerId, group: &str) -> Result<(), Failure> {
        if !validate_group(group) {
            return Err(Failure::new(ErrorCode::InvalidGroup, "invalid group name").group(group));
        }
        let mut out = Outbox::new();
        let mut st = self.lock();
        st.check_add(&self.limits, me, group)?;
        match st.groups.get(group) {
            Some(g) if !g.options.self_join => {
                return Err(Failure::new(
                    ErrorCode::Forbidden,
                    "members of this group are added by the app's backend",
                )
                .group(group));
            }
            Some(_) => {}
            None if !self.client_groups => {
                return Err(Failure::new(ErrorCode::NoSuchGroup, "no such group").group(group));
            }
            None => {
                let options = GroupOptions::default();
                st.groups
                    .insert(group.to_owned(), Group::new(options.clone(), false));
                out.push(ServerEvent::GroupCreated {
                    group: group.to_owned(),
                    options,
                    managed: false,
                });
            }
        }
        st.add_member(me, group, &mut out);
        drop(st);
        self.publish(out);
        Ok(())
    }

    /// Handle `leave`.
    pub(crate) fn leave(&self, me: PeerId, group: &str) -> Result<(), Failure> {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let Some(client) = st.clients.get(&me) else {
            return Err(Failure::new(ErrorCode::Internal, "session not registered"));
        };
        if !client.groups.contains(group) {
            return Err(Failure::new(ErrorCode::NotMember, "not in this group").group(group));
        }
        st.remove_member(me, group, Removal::Leave, &mut out);
        drop(st);
        self.publish(out);
        Ok(())
    }

    /// Handle `ack`: it acknowledges every change of the group up to `change` this session was
    /// asked to acknowledge (others, already acknowledged or timed out, are ignored).
    pub(crate) fn ack(&self, me: PeerId, group: &str, change: u64) {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let due: Vec<u64> = match st.clients.get_mut(&me) {
            Some(c) => {
                let due: Vec<u64> = c
                    .acks_due
                    .iter()
                    .filter(|(g, n)| g == group && *n <= change)
                    .map(|(_, n)| *n)
                    .collect();
                for n in &due {
                    c.acks_due.remove(&(group.to_owned(), *n));
                }
                due
            }
            None => Vec::new(),
        };
        for n in due {
            st.acked(me, group, n, &mut out);
        }
        drop(st);
        self.publish(out);
    }

    /// Handle `path`: publish it for the backend.
    pub(crate) fn path(
        &self,
        me: PeerId,
        to: PeerId,
        link: LinkId,
        path: PathKind,
        local: Option<WireCandidateType>,
        remote: Option<WireCandidateType>,
    ) -> Result<(), Failure> {
        let st = self.lock();
        Self::check_link(&st, me, to, link)?;
        let user = |p: &PeerId| st.clients.get(p).and_then(|c| c.user.clone());
        let event = ServerEvent::Path {
            peer: me,
            user: user(&me),
            other: to,
            other_user: user(&to),
            link,
            path,
            local,
            remote,
        };
        drop(st);
        self.publish(vec![event]);
        Ok(())
    }

    /// Report changes that waited for acknowledgements longer than the ack timeout.
    pub(crate) fn expire_acks(&self) {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let now = Instant::now();
        let names: Vec<String> = st
            .groups
            .iter()
            .filter(|(_, g)| {
                g.pending
                    .front()
                    .is_some_and(|p| now.duration_since(p.at) >= self.ack_timeout)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            while let Some(old) = st.groups.get_mut(&name).and_then(|g| {
                g.pending
                    .front()
                    .is_some_and(|p| now.duration_since(p.at) >= self.ack_timeout)
                    .then(|| g.pending.pop_front())
                    .flatten()
            }) {
                st.time_out(&name, old, &mut out);
            }
        }
        drop(st);
        self.publish(out);
    }

    /// The current link between `me` and `to`, checked against `link`.
    fn check_link(st: &State, me: PeerId, to: PeerId, link: LinkId) -> Result<&Link, Failure> {
        let not_co_member =
            || Failure::new(ErrorCode::NotCoMember, "no shared group with that peer").peer(to);
        if me == to {
            return Err(not_co_member());
        }
        let current = st.links.get(&pair(me, to)).ok_or_else(not_co_member)?;
        if current.id != link {
            return Err(Failure::new(
                ErrorCode::StaleLink,
                format!("link {link} is not current (current is {})", current.id),
            )
            .peer(to));
        }
        Ok(current)
    }

    /// The current link between `me` and `to`, checked against `link`; returns `to`'s outlet
    /// (refused while `to` is suspended).
    fn check_target(st: &State, me: PeerId, to: PeerId, link: LinkId) -> Result<&Outlet, Failure> {
        Self::check_link(st, me, to, link)?;
        let c = st.clients.get(&to).ok_or_else(|| {
            Failure::new(ErrorCode::NotCoMember, "no shared group with that peer").peer(to)
        })?;
        if c.suspended.is_some() {
            return Err(Failure::new(
                ErrorCode::PeerSuspended,
                "that peer's connection dropped; it may resume (member_resumed)",
            )
            .peer(to));
        }
        Ok(&c.outlet)
    }

    /// First step of forwarding a relay frame or `signal`: check the link (for a `signal`, also
    /// that the pair may use direct paths) and return the receiver's outlet, so the caller can
    /// wait for its budget without holding the lock, and the pair's policy.
    pub(crate) fn forward_target(
        &self,
        me: PeerId,
        to: PeerId,
        link: LinkId,
        signal: bool,
    ) -> Result<(Outlet, DirectPolicy), Failure> {
        let st = self.lock();
        let direct = Self::check_link(&st, me, to, link)?.direct;
        if signal && direct == DirectPolicy::None {
            return Err(Failure::new(
                ErrorCode::DirectNotAllowed,
                "this pair's direct policy is none: it stays on the server path",
            )
            .peer(to));
        }
        Ok((Self::check_target(&st, me, to, link)?.clone(), direct))
    }

    /// Second step of forwarding, once `permits` budget bytes are held: re-check the link (it
    /// may have changed while waiting) and queue the frame. On error the permits are returned.
    pub(crate) fn forward_deliver(
        &self,
        me: PeerId,
        to: PeerId,
        link: LinkId,
        budget: &Arc<Semaphore>,
        msg: Message,
        permits: usize,
    ) -> Result<(), Failure> {
        let st = self.lock();
        let result = Self::check_target(&st, me, to, link).and_then(|outlet| {
            if Arc::ptr_eq(&outlet.budget, budget) {
                Ok(outlet)
            } else {
                Err(Failure::new(ErrorCode::NotCoMember, "no shared group with that peer").peer(to))
            }
        });
        match result {
            Ok(outlet) => {
                if let Err(mpsc::error::SendError(Outbound::Forward { permits, .. })) =
                    outlet.tx.send(Outbound::Forward { msg, permits })
                {
                    budget.add_permits(permits);
                }
                Ok(())
            }
            Err(e) => {
                budget.add_permits(permits);
                Err(e)
            }
        }
    }

    // ---- The app's backend (see `admin.rs`) ----

    /// Create a managed group, or update the options of an existing one (which becomes
    /// managed). Returns `true` if it was created.
    pub(crate) fn put_group(&self, name: &str, options: GroupOptions) -> Result<bool, AdminError> {
        if !validate_group(name) {
            return Err(AdminError::InvalidGroup(name.to_owned()));
        }
        if let Some(max) = options.max_members {
            if max == 0 || max > self.limits.max_members_per_group {
                return Err(AdminError::InvalidOptions(format!(
                    "max_members must be 1 to {} (the server's max_members_per_group)",
                    self.limits.max_members_per_group
                )));
            }
        }
        let mut out = Outbox::new();
        let mut st = self.lock();
        let created = match st.groups.get_mut(name) {
            Some(g) => {
                g.options = options;
                g.managed = true;
                false
            }
            None => {
                st.groups
                    .insert(name.to_owned(), Group::new(options.clone(), true));
                out.push(ServerEvent::GroupCreated {
                    group: name.to_owned(),
                    options,
                    managed: true,
                });
                true
            }
        };
        drop(st);
        self.publish(out);
        Ok(created)
    }

    /// Destroy a group: every member gets `left` (one change; nobody gets `member_left`).
    pub(crate) fn destroy_group(&self, name: &str) -> Result<(), AdminError> {
        let mut out = Outbox::new();
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(g) = st.groups.remove(name) else {
            return Err(AdminError::NoSuchGroup(name.to_owned()));
        };
        let change = g.change + 1;
        for p in &g.pending {
            for peer in &p.waiting {
                if let Some(c) = st.clients.get_mut(peer) {
                    c.acks_due.remove(&(name.to_owned(), p.change));
                }
            }
        }
        let members: Vec<PeerId> = g.members.iter().copied().collect();
        for (i, &peer) in members.iter().enumerate() {
            for &other in &members[i + 1..] {
                st.unlink(peer, other);
            }
            if let Some(client) = st.clients.get_mut(&peer) {
                client.groups.remove(name);
                send(
                    &client.outlet,
                    &ServerMsg::Left {
                        group: name.to_owned(),
                        change: Some(change),
                    },
                );
                out.push(ServerEvent::MemberLeft {
                    group: name.to_owned(),
                    peer,
                    user: client.user.clone(),
                    change,
                });
            }
        }
        out.push(ServerEvent::GroupDestroyed {
            group: name.to_owned(),
        });
        drop(guard);
        self.publish(out);
        Ok(())
    }

    fn session_of(st: &State, user: &str) -> Result<PeerId, AdminError> {
        st.users
            .get(user)
            .copied()
            .ok_or_else(|| AdminError::NoSuchSession(user.to_owned()))
    }

    /// Add the live session of `user` to the existing group `name`: it gets `joined`.
    pub(crate) fn add_user(&self, name: &str, user: &str) -> Result<(), AdminError> {
        let mut out = Outbox::new();
        let mut st = self.lock();
        if !st.groups.contains_key(name) {
            return Err(AdminError::NoSuchGroup(name.to_owned()));
        }
        let peer = Self::session_of(&st, user)?;
        st.check_add(&self.limits, peer, name)
            .map_err(|f| AdminError::Refused {
                code: f.code,
                message: f.message,
            })?;
        st.add_member(peer, name, &mut out);
        drop(st);
        self.publish(out);
        Ok(())
    }

    /// Remove the live session of `user` from group `name`: it gets `left`.
    pub(crate) fn remove_user(&self, name: &str, user: &str) -> Result<(), AdminError> {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let Some(g) = st.groups.get(name) else {
            return Err(AdminError::NoSuchGroup(name.to_owned()));
        };
        let peer = Self::session_of(&st, user)?;
        if !g.members.contains(&peer) {
            return Err(AdminError::NotMember {
                group: name.to_owned(),
                user: user.to_owned(),
            });
        }
        st.remove_member(peer, name, Removal::Backend, &mut out);
        drop(st);
        self.publish(out);
        Ok(())
    }

    /// End the live session of `user` (close code [`KICKED`]).
    pub(crate) fn kick(&self, user: &str) -> Result<(), AdminError> {
        let mut out = Outbox::new();
        let mut st = self.lock();
        let peer = Self::session_of(&st, user)?;
        if let Some(client) = st.remove(peer, "kicked", &mut out) {
            self.ended.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer, user, "session ended by the app's backend");
            client.outlet.state.kill(KICKED);
        }
        drop(st);
        self.publish(out);
        Ok(())
    }

    /// Every group, by name.
    pub(crate) fn groups(&self) -> Vec<GroupSummary> {
        let st = self.lock();
        let mut list: Vec<GroupSummary> = st
            .groups
            .iter()
            .map(|(name, g)| GroupSummary {
                name: name.clone(),
                options: g.options.clone(),
                managed: g.managed,
                members: g.members.len(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// One group and its members.
    pub(crate) fn group(&self, name: &str) -> Option<GroupInfo> {
        let st = self.lock();
        st.groups.get(name).map(|g| st.group_info(name, g))
    }
}

/// A fresh resume secret: 32 random bytes, base64url.
fn new_resume_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Compare secrets in time that does not depend on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Events kept for a slow subscriber before it misses some (it is told how many).
const EVENT_BUFFER: usize = 4096;

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
