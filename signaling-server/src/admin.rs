//! Server-managed groups: what the app's backend does, in-process ([`Admin`]) or over HTTP on
//! the admin listener (`/v1/...`, bearer secret), and the events it is told of
//! ([`ServerEvent`], also as Server-Sent Events at `GET /v1/events`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use peermesh_server::admin::GroupOptions;
//! use peermesh_server::{Config, Server};
//! use peermesh::protocol::DirectPolicy;
//! let server = Server::bind(Config::default()).await?;
//! let admin = server.admin();
//! let mut events = admin.events();
//! admin.create_group(
//!     "match-7",
//!     GroupOptions { max_members: Some(4), direct: DirectPolicy::Relay, self_join: false },
//! )?;
//! let handle = server.spawn();
//! // ... once alice's session is up:
//! admin.add_member("match-7", "alice")?;
//! while let Ok(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures_util::Stream;
use peermesh::protocol::{DirectPolicy, ErrorCode, PathKind, PeerId, WireCandidateType};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::hub::Hub;

/// A group's options, set when the app's backend creates it (`PUT /v1/groups/{group}` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupOptions {
    /// Most members (at most, and by default, the server's `max_members_per_group`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_members: Option<usize>,
    /// The direct-connectivity policy of pairs whose link this group makes: `any`, `relay` (TURN
    /// candidates only, no address is ever shared), `none` (server path only).
    pub direct: DirectPolicy,
    /// Whether clients may join it by themselves with `join` (their token must still allow
    /// it). `false`: only the backend adds members.
    pub self_join: bool,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            max_members: None,
            direct: DirectPolicy::Any,
            self_join: true,
        }
    }
}

/// A group in a list (`GET /v1/groups`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The group's name.
    pub name: String,
    /// Its options.
    pub options: GroupOptions,
    /// Created by the backend (it stays when empty); `false` for a group a client's `join`
    /// created, which goes away with its last member.
    pub managed: bool,
    /// How many members it has.
    pub members: usize,
}

/// A group and its members (`GET /v1/groups/{group}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Its options.
    pub options: GroupOptions,
    /// See [`GroupSummary::managed`].
    pub managed: bool,
    /// The number of its last membership change.
    pub change: u64,
    /// Its members, by peer id.
    pub members: Vec<MemberSummary>,
}

/// A member of a group as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSummary {
    /// The session's peer id.
    pub peer: PeerId,
    /// Its user id (absent on an open server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its display name.
    pub name: String,
}

/// Something that happened on the server, for the app's backend and operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// A session said `hello`.
    SessionConnected {
        /// Its peer id.
        peer: PeerId,
        /// Its user id (absent on an open server).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Its display name.
        name: String,
    },
    /// A session ended (its memberships ended first, each with a `member_left`).
    SessionDisconnected {
        /// Its peer id.
        peer: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Why: `closed` (the client closed, the connection was lost or timed out),
        /// `replaced` (a newer session of the same user), `kicked` (by the backend),
        /// `too slow`, `shutdown`.
        reason: String,
    },
    /// A resumable session's connection dropped; it waits for a resume (its memberships stay).
    SessionSuspended {
        /// Its peer id.
        peer: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// A suspended session resumed on a new connection.
    SessionResumed {
        /// Its peer id.
        peer: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// A group was created (by a client's `join` or by the backend).
    GroupCreated {
        /// Its name.
        group: String,
        /// Its options.
        options: GroupOptions,
        /// Created by the backend.
        managed: bool,
    },
    /// A group was destroyed (by the backend, or its last member left a group a client made).
    GroupDestroyed {
        /// Its name.
        group: String,
    },
    /// A session became a member of a group: membership change `change`.
    MemberJoined {
        /// The group.
        group: String,
        /// The member's peer id.
        peer: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The group's change number.
        change: u64,
    },
    /// A session stopped being a member of a group: membership change `change`.
    MemberLeft {
        /// The group.
        group: String,
        /// The member's peer id.
        peer: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The group's change number.
        change: u64,
    },
    /// Every session told of change `change` of `group` has acknowledged it (or ended).
    ChangeAcked {
        /// The group.
        group: String,
        /// The change number.
        change: u64,
    },
    /// Some sessions did not acknowledge change `change` within the ack timeout (or more
    /// changes piled up); they are listed. No `change_acked` follows for it.
    ChangeAckTimedOut {
        /// The group.
        group: String,
        /// The change number.
        change: u64,
        /// The sessions that did not acknowledge it.
        missing: Vec<PeerId>,
    },
    /// A client reported the path of one of its links.
    Path {
        /// The reporting session.
        peer: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The other end.
        other: PeerId,
        /// Its user id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        other_user: Option<String>,
        /// The link id.
        link: u32,
        /// `server` or `direct`.
        path: PathKind,
        /// On a direct path, the reporter's candidate type.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local: Option<WireCandidateType>,
        /// On a direct path, the other end's candidate type.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote: Option<WireCandidateType>,
    },
}

/// Why a backend request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Not a valid group name (1–64 bytes of `A–Z a–z 0–9 . _ -`).
    #[error("invalid group name {0:?}")]
    InvalidGroup(String),
    /// Options out of range.
    #[error("invalid group options: {0}")]
    InvalidOptions(String),
    /// No group of that name.
    #[error("no group {0:?}")]
    NoSuchGroup(String),
    /// The user has no live session.
    #[error("user {0:?} has no live session")]
    NoSuchSession(String),
    /// The user's session is not in the group.
    #[error("user {user:?} is not in group {group:?}")]
    NotMember {
        /// The group.
        group: String,
        /// The user.
        user: String,
    },
    /// The session cannot be added (already a member, in too many groups, group full).
    #[error("{message}")]
    Refused {
        /// The protocol's error code for it (`already_member`, `too_many_groups`,
        /// `group_full`).
        code: ErrorCode,
        /// Detail.
        message: String,
    },
}

impl AdminError {
    /// A stable code for it (the admin API's `error` field).
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidGroup(_) => "invalid_group",
            AdminError::InvalidOptions(_) => "invalid_options",
            AdminError::NoSuchGroup(_) => "no_such_group",
            AdminError::NoSuchSession(_) => "no_such_session",
            AdminError::NotMember { .. } => "not_member",
            AdminError::Refused { code, .. } => code.as_str(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            AdminError::InvalidGroup(_) | AdminError::InvalidOptions(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AdminError::NoSuchGroup(_)
            | AdminError::NoSuchSession(_)
            | AdminError::NotMember { .. } => StatusCode::NOT_FOUND,
            AdminError::Refused { .. } => StatusCode::CONFLICT,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        error_response(self.status(), self.code(), &self.to_string())
    }
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": code, "message": message })),
    )
        .into_response()
}

/// The app's backend's handle on a server: create and destroy groups, add and remove members,
/// list them, end sessions, and watch [`ServerEvent`]s. Cheap to clone; get it from
/// [`Server::admin`](crate::Server::admin) or [`ServerHandle::admin`](crate::ServerHandle::admin).
#[derive(Clone)]
pub struct Admin {
    pub(crate) hub: Arc<Hub>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// Create group `name` with `options`, or change the options of an existing one (which
    /// then stays when empty, like every group the backend made). Returns `true` if it was
    /// created. New options apply to links made from now on.
    pub fn create_group(&self, name: &str, options: GroupOptions) -> Result<bool, AdminError> {
        self.hub.put_group(name, options)
    }

    /// Destroy group `name`: every member gets `left`.
    pub fn destroy_group(&self, name: &str) -> Result<(), AdminError> {
        self.hub.destroy_group(name)
    }

    /// Add the live session of `user` (token `sub`) to group `name`: it gets `joined` with the
    /// member list, the others `member_joined`. The group's `self_join` and the token's
    /// `groups` do not apply; its `max_members` and the server's limits do.
    pub fn add_member(&self, name: &str, user: &str) -> Result<(), AdminError> {
        self.hub.add_user(name, user)
    }

    /// Remove the session of `user` from group `name`: it gets `left`, the others
    /// `member_left`.
    pub fn remove_member(&self, name: &str, user: &str) -> Result<(), AdminError> {
        self.hub.remove_user(name, user)
    }

    /// Every group, by name.
    pub fn groups(&self) -> Vec<GroupSummary> {
        self.hub.groups()
    }

    /// Group `name` and its members.
    pub fn group(&self, name: &str) -> Option<GroupInfo> {
        self.hub.group(name)
    }

    /// End the live session of `user`: its co-members see it leave, and it is closed with
    /// close code 4002.
    pub fn kick(&self, user: &str) -> Result<(), AdminError> {
        self.hub.kick(user)
    }

    /// The server's events from now on. A receiver that falls more than 4096 events behind
    /// gets [`broadcast::error::RecvError::Lagged`] with the number it missed.
    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.hub.subscribe()
    }
}

/// The `/v1` routes of the admin listener. Every request needs `Authorization: Bearer
/// <secret>`; without a configured secret every request gets 401.
pub(crate) fn router(
    admin: Admin,
    secret: Option<String>,
    shutdown: watch::Receiver<bool>,
) -> Router {
    let api = Router::new()
        .route("/v1/groups", get(list_groups))
        .route(
            "/v1/groups/{group}",
            put(put_group).delete(delete_group).get(get_group),
        )
        .route(
            "/v1/groups/{group}/members/{user}",
            put(put_member).delete(delete_member),
        )
        .route("/v1/sessions/{user}", axum::routing::delete(delete_session))
        .route(
            "/v1/events",
            get(move |State(admin): State<Admin>| events(admin, shutdown.clone())),
        )
        .with_state(admin);
    let secret: Option<Arc<str>> = secret.map(Arc::from);
    api.layer(axum::middleware::from_fn(
        move |headers: HeaderMap, req, next: axum::middleware::Next| {
            let secret = secret.clone();
            async move {
                match authorized(&headers, secret.as_deref()) {
                    Ok(()) => next.run(req).await,
                    Err(message) => {
                        let mut r =
                            error_response(StatusCode::UNAUTHORIZED, "unauthorized", message);
                        r.headers_mut().insert(
                            axum::http::header::WWW_AUTHENTICATE,
                            axum::http::HeaderValue::from_static("Bearer"),
                        );
                        r
                    }
                }
            }
        },
    ))
}

/// Check the bearer secret (in constant time).
fn authorized(headers: &HeaderMap, secret: Option<&str>) -> Result<(), &'static str> {
    let Some(secret) = secret else {
        return Err("the admin API is off: start the server with --admin-secret");
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("missing Authorization: Bearer <admin secret>")?;
    if crate::hub::constant_time_eq(given.as_bytes(), secret.as_bytes()) {
        Ok(())
    } else {
        Err("wrong admin secret")
    }
}

async fn list_groups(State(admin): State<Admin>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "groups": admin.groups() }))
}

async fn get_group(
    State(admin): State<Admin>,
    Path(group): Path<String>,
) -> Result<Json<GroupInfo>, AdminError> {
    admin
        .group(&group)
        .map(Json)
        .ok_or(AdminError::NoSuchGroup(group))
}

async fn put_group(
    State(admin): State<Admin>,
    Path(group): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, AdminError> {
    let options: GroupOptions = if body.iter().all(u8::is_ascii_whitespace) {
        GroupOptions::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| AdminError::InvalidOptions(e.to_string()))?
    };
    let created = admin.create_group(&group, options)?;
    let info = admin
        .group(&group)
        .ok_or_else(|| AdminError::NoSuchGroup(group.clone()))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

async fn delete_group(
    State(admin): State<Admin>,
    Path(group): Path<String>,
) -> Result<StatusCode, AdminError> {
    admin.destroy_group(&group)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_member(
    State(admin): State<Admin>,
    Path((group, user)): Path<(String, String)>,
) -> Result<Json<GroupInfo>, AdminError> {
    admin.add_member(&group, &user)?;
    admin
        .group(&group)
        .map(Json)
        .ok_or(AdminError::NoSuchGroup(group))
}

async fn delete_member(
    State(admin): State<Admin>,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode, AdminError> {
    admin.remove_member(&group, &user)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_session(
    State(admin): State<Admin>,
    Path(user): Path<String>,
) -> Result<StatusCode, AdminError> {
    admin.kick(&user)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/events`: one SSE event per [`ServerEvent`] (`event:` its type, `data:` its JSON);
/// a subscriber that fell behind gets an event `lagged` with `{"missed": n}`. The stream ends
/// when the server shuts down.
async fn events(
    admin: Admin,
    shutdown: watch::Receiver<bool>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = admin.events();
    let stream =
        futures_util::stream::unfold((rx, shutdown), |(mut rx, mut shutdown)| async move {
            let next = tokio::select! {
                r = rx.recv() => r,
                _ = shutdown.wait_for(|s| *s) => return None,
            };
            let event = match next {
                Ok(e) => {
                    let kind = serde_json::to_value(&e)
                        .ok()
                        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                        .unwrap_or_default();
                    Event::default()
                        .event(kind)
                        .json_data(&e)
                        .unwrap_or_else(|_| Event::default().comment("unserializable event"))
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => Event::default()
                    .event("lagged")
                    .data(format!("{{\"missed\":{missed}}}")),
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(event), (rx, shutdown)))
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
