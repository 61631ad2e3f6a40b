//! Shared server state: clients, groups and links.
//!
//! Everything lives behind one `std::sync::Mutex` that is never held across an `.await`. Frames
//! to clients are queued on channels while the lock is held, which never blocks and gives every
//! client a consistent order of events. The channels are bounded in bytes rather than in
//! frames: forwarded frames by the receiver's relay budget (senders wait for it), the server's
//! own replies and events by [`Outlet::send_text`], which closes a client that lets them pile
//! up (it is not reading).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::{Message, Utf8Bytes};
use peermesh::protocol::{
    validate_group, ErrorCode, LinkId, MemberInfo, PeerId, ServerMsg, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

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
    groups: BTreeSet<String>,
    outlet: Outlet,
}

struct Link {
    id: LinkId,
    initiator: PeerId,
    shared_groups: usize,
}

#[derive(Default)]
struct State {
    last_peer: PeerId,
    last_link: LinkId,
    clients: HashMap<PeerId, Client>,
    /// The live session of each user id.
    users: HashMap<String, PeerId>,
    groups: HashMap<String, BTreeSet<PeerId>>,
    /// Keyed by `(smaller peer id, larger peer id)`.
    links: HashMap<(PeerId, PeerId), Link>,
}

/// The shared state of one server.
pub(crate) struct Hub {
    state: Mutex<State>,
    /// Sessions unregistered since start (the server trims its heap when this moves).
    ended: AtomicU64,
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

impl State {
    /// Remove `peer` from `group`, updating links and telling the remaining members. The caller
    /// updates the leaver's own group set.
    fn leave_group(&mut self, peer: PeerId, group: &str) {
        let Some(members) = self.groups.get_mut(group) else {
            return;
        };
        members.remove(&peer);
        let remaining: Vec<PeerId> = members.iter().copied().collect();
        if remaining.is_empty() {
            self.groups.remove(group);
        }
        let note = ServerMsg::MemberLeft {
            group: group.to_owned(),
            peer,
            change: None,
        };
        let text = encode(&note);
        for other in remaining {
            let key = pair(peer, other);
            if let Some(link) = self.links.get_mut(&key) {
                link.shared_groups = link.shared_groups.saturating_sub(1);
                if link.shared_groups == 0 {
                    self.links.remove(&key);
                }
            }
            if let (Some(client), Some(text)) = (self.clients.get(&other), &text) {
                client.outlet.send_text(text.clone());
            }
        }
    }

    /// Remove a client entirely, telling its co-members.
    fn remove(&mut self, peer: PeerId) -> Option<Client> {
        let client = self.clients.remove(&peer)?;
        if let Some(user) = &client.user {
            if self.users.get(user) == Some(&peer) {
                self.users.remove(user);
            }
        }
        for group in &client.groups {
            self.leave_group(peer, group);
        }
        // Wake relay senders waiting for this client's budget: their frames are dropped.
        client.outlet.budget.close();
        Some(client)
    }
}

impl Hub {
    pub(crate) fn new() -> Self {
        Hub {
            state: Mutex::new(State::default()),
            ended: AtomicU64::new(0),
        }
    }

    /// Sessions, groups and memberships now.
    pub(crate) fn snapshot(&self) -> HubSnapshot {
        let st = self.lock();
        HubSnapshot {
            sessions: st.clients.len(),
            groups: st.groups.len(),
            members: st.groups.values().map(BTreeSet::len).sum(),
        }
    }

    /// Sessions unregistered since start.
    pub(crate) fn sessions_ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the whole server would, so keep going on poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a client after a valid `hello` and queue its `welcome`. Returns its peer id.
    /// A user (`user`: token `sub`) has one live session: an older one is removed (its
    /// co-members see it leave) and closed with [`REPLACED`].
    pub(crate) fn register(
        &self,
        config: &Config,
        ice_servers: impl FnOnce(PeerId) -> Vec<peermesh::protocol::IceServer>,
        name: String,
        user: Option<String>,
        outlet: Outlet,
    ) -> PeerId {
        let mut st = self.lock();
        if let Some(old) = user.as_ref().and_then(|u| st.users.get(u).copied()) {
            if let Some(client) = st.remove(old) {
                self.ended.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = old, "session replaced by a newer one of its user");
                client.outlet.state.kill(REPLACED);
            }
        }
        let mut peer = next_id(&mut st.last_peer);
        while st.clients.contains_key(&peer) {
            peer = next_id(&mut st.last_peer);
        }
        send(
            &outlet,
            &ServerMsg::Welcome {
                version: PROTOCOL_VERSION,
                peer,
                ice_servers: ice_servers(peer),
                heartbeat_interval_ms: duration_ms(config.heartbeat_interval),
                heartbeat_timeout_ms: duration_ms(config.heartbeat_timeout),
                limits: config.limits,
            },
        );
        if let Some(user) = &user {
            st.users.insert(user.clone(), peer);
        }
        st.clients.insert(
            peer,
            Client {
                name,
                user,
                groups: BTreeSet::new(),
                outlet,
            },
        );
        peer
    }

    /// Remove a client (close, timeout, shutdown) and tell its co-members.
    pub(crate) fn unregister(&self, peer: PeerId) {
        if self.lock().remove(peer).is_some() {
            self.ended.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drop a client that reads too slowly: tell its co-members and close its socket at once.
    /// `budget` identifies the session (no-op if that client is already gone).
    pub(crate) fn kill_slow(&self, peer: PeerId, budget: &Arc<Semaphore>) {
        let mut st = self.lock();
        let same = st
            .clients
            .get(&peer)
            .is_some_and(|c| Arc::ptr_eq(&c.outlet.budget, budget));
        if !same {
            return;
        }
        if let Some(client) = st.remove(peer) {
            self.ended.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer, "dropping client: too slow to read relayed data");
            client.outlet.state.drop_slow(TOO_SLOW, SlowQueue::Relay);
        }
    }

    /// Handle `join`.
    pub(crate) fn join(&self, config: &Config, me: PeerId, group: &str) -> Result<(), Failure> {
        if !validate_group(group) {
            return Err(Failure::new(ErrorCode::InvalidGroup, "invalid group name").group(group));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(client) = st.clients.get(&me) else {
            return Err(Failure::new(ErrorCode::Internal, "session not registered"));
        };
        if client.groups.contains(group) {
            return Err(
                Failure::new(ErrorCode::AlreadyMember, "already in this group").group(group),
            );
        }
        if client.groups.len() >= config.limits.max_groups_per_client {
            return Err(Failure::new(
                ErrorCode::TooManyGroups,
                format!("already in {} groups", config.limits.max_groups_per_client),
            )
            .group(group));
        }
        let existing: Vec<PeerId> = st
            .groups
            .get(group)
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default();
        if existing.len() >= config.limits.max_members_per_group {
            return Err(Failure::new(
                ErrorCode::GroupFull,
                format!("group has {} members", config.limits.max_members_per_group),
            )
            .group(group));
        }
        let my_name = client.name.clone();
        let my_user = client.user.clone();
        let my_outlet = client.outlet.clone();

        let mut members = Vec::with_capacity(existing.len());
        for &other in &existing {
            let Some(other_client) = st.clients.get(&other) else {
                continue;
            };
            let link = st.links.entry(pair(me, other)).or_insert_with(|| Link {
                id: next_id(&mut st.last_link),
                initiator: me,
                shared_groups: 0,
            });
            link.shared_groups += 1;
            members.push(MemberInfo {
                peer: other,
                name: other_client.name.clone(),
                user: other_client.user.clone(),
                link: link.id,
                initiator: link.initiator == me,
                direct: Default::default(),
            });
            send(
                &other_client.outlet,
                &ServerMsg::MemberJoined {
                    group: group.to_owned(),
                    member: MemberInfo {
                        peer: me,
                        name: my_name.clone(),
                        user: my_user.clone(),
                        link: link.id,
                        initiator: link.initiator == other,
                        direct: Default::default(),
                    },
                    change: None,
                },
            );
        }
        st.groups.entry(group.to_owned()).or_default().insert(me);
        if let Some(client) = st.clients.get_mut(&me) {
            client.groups.insert(group.to_owned());
        }
        send(
            &my_outlet,
            &ServerMsg::Joined {
                group: group.to_owned(),
                members,
                change: None,
            },
        );
        Ok(())
    }

    /// Handle `leave`.
    pub(crate) fn leave(&self, me: PeerId, group: &str) -> Result<(), Failure> {
        let mut st = self.lock();
        let Some(client) = st.clients.get_mut(&me) else {
            return Err(Failure::new(ErrorCode::Internal, "session not registered"));
        };
        if !client.groups.remove(group) {
            return Err(Failure::new(ErrorCode::NotMember, "not in this group").group(group));
        }
        let outlet = client.outlet.clone();
        st.leave_group(me, group);
        send(
            &outlet,
            &ServerMsg::Left {
                group: group.to_owned(),
                change: None,
            },
        );
        Ok(())
    }

    /// The current link between `me` and `to`, checked against `link`; returns `to`'s outlet.
    fn check_link(st: &State, me: PeerId, to: PeerId, link: LinkId) -> Result<&Outlet, Failure> {
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
        st.clients
            .get(&to)
            .map(|c| &c.outlet)
            .ok_or_else(not_co_member)
    }

    /// First step of forwarding a relay frame or `signal`: check the link and return the
    /// receiver's outlet so the caller can wait for its budget without holding the lock.
    pub(crate) fn forward_target(
        &self,
        me: PeerId,
        to: PeerId,
        link: LinkId,
    ) -> Result<Outlet, Failure> {
        let st = self.lock();
        Self::check_link(&st, me, to, link).cloned()
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
        let result = Self::check_link(&st, me, to, link).and_then(|outlet| {
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
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
