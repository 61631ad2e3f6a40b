//! The NAT lab: a small internet built from network namespaces on each run (see
//! `docs/CONNECTIVITY.md`).
//!
//! ```text
//!  core ns: bridge tnbr = the public segment 203.0.113.0/24
//!    ├── server ns  203.0.113.1 + .2 (peermesh-server: signaling :8080, STUN/TURN :3478;
//!    │              nat_probe responder :3479/:3480; a second server on .3 when asked)
//!    ├── public peer ns  203.0.113.x              (no NAT)
//!    ├── router ns  WAN 203.0.113.x ── LAN 198.18.k.0/24 ── peer ns(s) 198.18.k.2, .3
//!    └── outer router ns  WAN 203.0.113.x ── 198.19.k.0/24 ── inner router ns ── 198.18.k.0/24 ── peer
//! ```
//!
//! Apart from it, [`Lab::wan_pair`] joins two namespaces `wana`/`wanb` (198.18.200.1 and .2 on
//! TAPs `tne`) through the userspace WAN link emulator (`wan_link`, [`crate::wan`]): delay,
//! jitter, loss, rate and queue per direction, changeable at run time.
//!
//! Only documentation (203.0.113.0/24) and benchmarking (198.18.0.0/15) addresses are used;
//! IPv6 is off in every namespace; interfaces are called `tn*`; nothing is done in the root
//! namespace except creating and deleting the namespaces themselves. A [`Lab`] deletes its
//! namespaces and kills its processes when dropped, on Ctrl-C/SIGTERM (a handler is installed),
//! and [`Lab::new`] also removes `pmlab-<pid>-*` namespaces whose process is gone (crashed runs).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::Notify;

use crate::wan::{Impairment, Stats};

/// Signaling and TURN server address (public segment).
pub const SERVER_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The server's second public address (for the mapping probe).
pub const SERVER_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Address of the optional second server (e.g. one without TURN).
pub const SERVER_C: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
/// Signaling (WebSocket) port.
pub const WS_PORT: u16 = 8080;
/// STUN/TURN port of the server.
pub const TURN_PORT: u16 = 3478;
/// Port of the probe responder on both server addresses, and its alternate port.
pub const PROBE_PORT: u16 = 3479;
const PROBE_ALT_PORT: u16 = 3480;

/// Address of A's end of a [`Lab::wan_pair`] (TAP `tne`, /24).
pub const WAN_A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
/// Address of B's end of a [`Lab::wan_pair`].
pub const WAN_B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
/// Port of the `nat_probe echo` server ([`Lab::start_echo`]).
pub const WAN_ECHO_PORT: u16 = 3490;

/// Error of the lab: what failed, with the command's output.
pub type Result<T> = std::result::Result<T, String>;

/// The programs the lab runs.
#[derive(Debug, Clone)]
pub struct Programs {
    /// `peermesh-server`, or this crate's `nat_server` (the server library, same flags).
    pub server: PathBuf,
    /// `nat_peer` (this crate's bin).
    pub peer: PathBuf,
    /// `nat_probe` (this crate's bin).
    pub probe: PathBuf,
    /// `wan_link` (this crate's bin, for [`Lab::wan_pair`]); by default the `wan_link` next to
    /// `probe`.
    pub wan_link: PathBuf,
}

impl Programs {
    /// The lab's programs; `PMLAB_SERVER_BIN` (e.g. `target/debug/peermesh-server`, which takes
    /// the same flags) replaces `server`.
    pub fn new(
        server: impl Into<PathBuf>,
        peer: impl Into<PathBuf>,
        probe: impl Into<PathBuf>,
    ) -> Programs {
        let probe: PathBuf = probe.into();
        Programs {
            server: std::env::var_os("PMLAB_SERVER_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| server.into()),
            peer: peer.into(),
            wan_link: probe.with_file_name("wan_link"),
            probe,
        }
    }

    /// The same programs with another `wan_link`.
    pub fn with_wan_link(mut self, wan_link: impl Into<PathBuf>) -> Programs {
        self.wan_link = wan_link.into();
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Commands.

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if let Some(input) = stdin {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("writing to {program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args, None)
}

/// Run a command inside a namespace and return its stdout.
pub fn ns_run(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all, None)
}

/// Delete the nftables table `ip <table>` in namespace `ns`.
fn nft_delete_table(ns: &str, table: &str) -> Result<()> {
    run(
        "ip",
        &["netns", "exec", ns, "nft", "delete", "table", "ip", table],
        None,
    )
    .map(|_| ())
}

fn nft(ns: &str, ruleset: &str) -> Result<()> {
    run(
        "ip",
        &["netns", "exec", ns, "nft", "-f", "-"],
        Some(ruleset),
    )
    .map(|_| ())
}

/// Namespaces whose names start with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Whether an interface name is one the lab gives (`tnbr`, `tnc<n>`, `tns`, `tnw`, `tnl`,
/// `tnlp<n>`, `tne`); other tests use other `tn*` names.
fn lab_link_name(name: &str) -> bool {
    let numbered = |p: &str| {
        name.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(name, "tnbr" | "tns" | "tnw" | "tnl" | "tne") || numbered("tnc") || numbered("tnlp")
}

/// Links with the lab's interface names in the namespace this process runs in (the root
/// namespace): there must never be any.
pub fn root_lab_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| lab_link_name(n))
        .collect()
}

fn pids_in(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill(pid: i32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A process that exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Kill every process in the namespaces starting with `prefix` and delete the namespaces.
fn cleanup_prefix(prefix: &str) {
    let namespaces = namespaces_with_prefix(prefix);
    for _ in 0..50 {
        let pids: Vec<i32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
        if pids.is_empty() {
            break;
        }
        pids.iter().for_each(|&p| kill(p));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Routers first would strand nothing (veth pairs die with either end), so any order works.
    for ns in namespaces {
        let _ = ip(&["netns", "delete", &ns]);
    }
}

/// Remove namespaces of earlier runs whose process is gone (`pmlab-<pid>-...`).
fn sweep_stale() {
    for ns in namespaces_with_prefix("pmlab-") {
        let pid = ns
            .strip_prefix("pmlab-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid {
            if !alive(pid) {
                cleanup_prefix(&format!("pmlab-{pid}-"));
            }
        }
    }
}

static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SIGNALS: Once = Once::new();

/// On Ctrl-C, SIGTERM or SIGHUP: tear down every live lab of this process, then exit.
fn install_signal_cleanup() {
    SIGNALS.call_once(|| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        std::thread::spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                    signal(SignalKind::hangup()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                let prefixes: Vec<String> = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
                for p in prefixes {
                    cleanup_prefix(&p);
                }
                eprintln!("NAT lab: interrupted; namespaces and processes removed");
                std::process::exit(130);
            })
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Router kinds.

/// How a peer's site reaches the public segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// No NAT: the peer sits on the public segment.
    Public,
    /// Endpoint-independent mapping, address+port-dependent filtering: `masquerade` plus the
    /// usual home-router firewall (unsolicited inbound dropped before conntrack keeps it).
    Home,
    /// Endpoint-independent mapping and filtering (full cone): `masquerade` plus an nft DNAT map
    /// from each mapped port back to its inside address and port.
    FullCone,
    /// Endpoint-dependent mapping (`masquerade fully-random`), address+port-dependent filtering.
    Symmetric,
    /// Corporate firewall: UDP blocked; only TCP to the server's signaling port gets out.
    Blocked,
    /// Two [`Kind::Home`] routers stacked.
    Double,
    /// Plain `masquerade` without a firewall: an unsolicited packet creates a conntrack entry that
    /// makes the router pick another port for the reply flow (the early-inbound race).
    HomeNoFirewall,
}

impl Kind {
    /// The kinds of the matrix.
    pub const MATRIX: [Kind; 6] = [
        Kind::Public,
        Kind::Home,
        Kind::FullCone,
        Kind::Symmetric,
        Kind::Blocked,
        Kind::Double,
    ];

    /// Short name for tables and namespace names.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::Home => "home",
            Kind::FullCone => "fullcone",
            Kind::Symmetric => "symmetric",
            Kind::Blocked => "blocked",
            Kind::Double => "double",
            Kind::HomeNoFirewall => "home-nofw",
        }
    }

    /// (UDP gets out, NATed, endpoint-independent mapping, endpoint-independent filtering).
    fn behaviour(self) -> (bool, bool, bool, bool) {
        match self {
            Kind::Public => (true, false, true, true),
            Kind::Home | Kind::Double | Kind::HomeNoFirewall => (true, true, true, false),
            Kind::FullCone => (true, true, true, true),
            Kind::Symmetric => (true, true, false, false),
            Kind::Blocked => (false, true, false, false),
        }
    }

    /// What the probe must report for this kind: (mapping, filter).
    fn expected_probe(self) -> (&'static str, &'static str) {
        match self {
            Kind::Public => ("none", "eif"),
            Kind::Home | Kind::Double | Kind::HomeNoFirewall => ("eim", "apdf"),
            Kind::FullCone => ("eim", "eif"),
            Kind::Symmetric => ("edm", "apdf"),
            Kind::Blocked => ("blocked", "blocked"),
        }
    }
}

/// The kind of path a pair ends up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathClass {
    /// Direct, host candidates on both sides.
    Host,
    /// Direct through NAT: server- or peer-reflexive candidates (no relay).
    Reflexive,
    /// WebRTC over a TURN relay.
    Relay,
    /// The signaling server's WebSocket relay.
    Server,
}

impl PathClass {
    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            PathClass::Host => "direct host",
            PathClass::Reflexive => "direct srflx/prflx",
            PathClass::Relay => "TURN relay",
            PathClass::Server => "server",
        }
    }

    /// Whether a pair on this path is as well off as on `expected`: the same path, or a direct
    /// one (host or reflexive) where only a TURN relay was expected.
    pub fn at_least(self, expected: PathClass) -> bool {
        self == expected
            || (expected == PathClass::Relay
                && matches!(self, PathClass::Host | PathClass::Reflexive))
    }

    /// The class of a pair's path from both sides' view: relay if either side has a relay
    /// candidate, host only if both see host/host (a public peer sees its NATed partner as
    /// peer-reflexive while the partner sees two host candidates).
    pub fn of_pair(a: &str, b: &str) -> PathClass {
        match (PathClass::of(a), PathClass::of(b)) {
            (PathClass::Server, PathClass::Server) => PathClass::Server,
            (PathClass::Relay, _) | (_, PathClass::Relay) => PathClass::Relay,
            (PathClass::Host, PathClass::Host) => PathClass::Host,
            (PathClass::Server, _) | (_, PathClass::Server) => PathClass::Server,
            _ => PathClass::Reflexive,
        }
    }

    /// The class of a path as `nat_peer` prints it (`server`, `direct host/srflx ...`).
    pub fn of(path: &str) -> PathClass {
        let mut words = path.split_whitespace();
        if words.next() != Some("direct") {
            return PathClass::Server;
        }
        let types = words.next().unwrap_or("");
        if types.contains("relay") {
            PathClass::Relay
        } else if types == "host/host" {
            PathClass::Host
        } else {
            PathClass::Reflexive
        }
    }
}

/// The path two peers can get, worked out from their sites' behaviours: UDP must get out on
/// both sides; then hole punching works if both map endpoint-independently (each side's
/// outbound packet opens its own filter for the other's reflexive address) or if either side
/// filters endpoint-independently (it accepts the other's new mapping and answers it: peer
/// reflexive); otherwise only a TURN relay connects them.
pub fn expected_path(a: Kind, b: Kind, same_lan: bool, turn: bool) -> PathClass {
    let (a_udp, a_nat, a_eim, a_eif) = a.behaviour();
    let (b_udp, b_nat, b_eim, b_eif) = b.behaviour();
    if !(a_udp && b_udp) {
        PathClass::Server
    } else if same_lan || !(a_nat || b_nat) {
        PathClass::Host
    } else if (a_eim && b_eim) || a_eif || b_eif {
        PathClass::Reflexive
    } else if turn {
        PathClass::Relay
    } else {
        PathClass::Server
    }
}

/// A site: one or more peer namespaces behind zero, one or two routers.
#[derive(Debug, Clone)]
pub struct Site {
    /// Its kind.
    pub kind: Kind,
    /// Peer namespaces.
    pub peers: Vec<String>,
    /// Router namespaces, outermost first.
    pub routers: Vec<String>,
    /// Its address on the public segment (the outermost router's WAN, or a public peer's own).
    pub wan: Ipv4Addr,
}

/// What `nat_probe probe` reported.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// The whole line.
    pub line: String,
    /// Key → value.
    pub fields: HashMap<String, String>,
}

impl ProbeReport {
    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("?")
    }

    /// A numeric field.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.fields.get(key)?.parse().ok()
    }

    fn parse(line: &str) -> ProbeReport {
        let line = line.trim().to_string();
        let fields = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProbeReport { line, fields }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab.

static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A small internet of network namespaces. Dropping it removes everything it made.
pub struct Lab {
    prefix: String,
    programs: Programs,
    dir: PathBuf,
    next_ns: usize,
    next_core_port: usize,
    next_public: u8,
    next_subnet: u8,
    core: String,
    server_ns: String,
    pids: Arc<Mutex<Vec<i32>>>,
    torn_down: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("prefix", &self.prefix).finish()
    }
}

impl Lab {
    /// Build the public segment and the server namespace (no processes yet). Needs root.
    pub fn new(programs: Programs) -> Result<Lab> {
        install_signal_cleanup();
        sweep_stale();
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pmlab-{}-{seq}-", std::process::id());
        LIVE.lock()
            .map_err(|_| "lab registry poisoned")?
            .push(prefix.clone());
        let dir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut lab = Lab {
            core: format!("{prefix}core"),
            server_ns: format!("{prefix}server"),
            prefix,
            programs,
            dir,
            next_ns: 0,
            next_core_port: 0,
            next_public: 10,
            next_subnet: 0,
            pids: Arc::default(),
            torn_down: false,
        };
        let core = lab.core.clone();
        lab.add_ns_named(&core)?;
        ip(&["-n", &core, "link", "add", "tnbr", "type", "bridge"])?;
        ip(&["-n", &core, "link", "set", "tnbr", "up"])?;
        let server = lab.server_ns.clone();
        lab.add_ns_named(&server)?;
        lab.attach_public(&server, "tns", &[SERVER_A, SERVER_B, SERVER_C])?;
        Ok(lab)
    }

    /// The name prefix of this lab's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }

    /// Directory for logs (kept if a test panics).
    pub fn dir(&self) -> &FsPath {
        &self.dir
    }

    fn add_ns_named(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        ns_run(
            name,
            "sysctl",
            &[
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn add_ns(&mut self, role: &str) -> Result<String> {
        self.next_ns += 1;
        let name = format!("{}{}{role}", self.prefix, self.next_ns);
        self.add_ns_named(&name)?;
        Ok(name)
    }

    fn public_ip(&mut self) -> Result<Ipv4Addr> {
        if self.next_public >= 250 {
            return Err("out of public addresses".into());
        }
        let ip = Ipv4Addr::new(203, 0, 113, self.next_public);
        self.next_public += 1;
        Ok(ip)
    }

    /// Plug `ns` into the public segment as interface `ifname` with `addrs` (/24).
    fn attach_public(&mut self, ns: &str, ifname: &str, addrs: &[Ipv4Addr]) -> Result<()> {
        self.next_core_port += 1;
        let port = format!("tnc{}", self.next_core_port);
        let core = self.core.clone();
        ip(&[
            "-n", &core, "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", ns,
        ])?;
        ip(&["-n", &core, "link", "set", &port, "master", "tnbr", "up"])?;
        for a in addrs {
            ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", ifname])?;
        }
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// A veth pair between two namespaces.
    fn wire(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        ip(&[
            "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ])?;
        ip(&["-n", a, "link", "set", a_if, "up"])?;
        ip(&["-n", b, "link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Plug `ns` into the public segment as interface `ifname` with `addrs` (/24) through an
    /// emulated WAN link: a `wan_link` (started in `ns`) between TAP `ifname` there and TAP
    /// `tnc<n>` in the core, bridged like a veth port; `up` impairs what `ns` sends, `down` what
    /// it receives.
    fn attach_public_wan(
        &mut self,
        ns: &str,
        ifname: &str,
        addrs: &[Ipv4Addr],
        (up, down): (&Impairment, &Impairment),
    ) -> Result<Proc> {
        self.next_core_port += 1;
        let port = format!("tnc{}", self.next_core_port);
        let core = self.core.clone();
        let log = format!("wan-{ns}.log");
        let args = wan_link_args(ns, ifname, &core, &port, up, down);
        let mut proc = {
            let child = self.spawn(ns, &self.programs.wan_link.clone(), &args, Some(&log))?;
            Proc::new(child, format!("wan_link {ns}"), Some(self.dir.join(&log)))
        };
        // The TAPs exist once `ready` is printed; waited for here without the runtime (this is a
        // blocking builder like the rest of `site`).
        let exists = |n: &str, i: &str| ip(&["-n", n, "link", "show", i]).is_ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(exists(ns, ifname) && exists(&core, &port)) {
            let ended = proc.child.try_wait().ok().flatten().is_some();
            if ended || Instant::now() > deadline {
                return Err(format!("wan_link for {ns} did not start: {}", proc.dump()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ip(&["-n", &core, "link", "set", &port, "master", "tnbr", "up"])?;
        for a in addrs {
            ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", ifname])?;
        }
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(proc)
    }

    /// Build a site of `kind` with `peers` peer namespaces (more than one share a LAN).
    pub fn site(&mut self, kind: Kind, peers: usize) -> Result<Site> {
        self.build_site(kind, peers, None).map(|(site, _)| site)
    }

    /// Like [`Lab::site`], but the site reaches the public segment through an emulated WAN
    /// link instead of a veth: the (outer) router's WAN `tnw` — or, for [`Kind::Public`] (one
    /// peer only), the peer's `tne` — is a TAP whose frames `wan_link` carries to a TAP bridged
    /// in the core. `up` impairs what the site sends, `down` what it receives; both can be
    /// changed at run time through the returned [`WanLink`] (`ab` = up, `ba` = down).
    pub async fn site_with_wan(
        &mut self,
        kind: Kind,
        peers: usize,
        up: Impairment,
        down: Impairment,
    ) -> Result<(Site, WanLink)> {
        if kind == Kind::Public && peers != 1 {
            return Err("a public site with a WAN link has one peer".into());
        }
        let (site, proc) = self.build_site(kind, peers, Some((&up, &down)))?;
        let proc = proc.expect("a WAN link was asked for");
        proc.wait_line(|l| l.kind == "ready", Duration::from_secs(10))
            .await
            .ok_or_else(|| format!("wan_link did not start: {}", proc.dump()))?;
        Ok((site, WanLink { proc }))
    }

    fn build_site(
        &mut self,
        kind: Kind,
        peers: usize,
        wan_link: Option<(&Impairment, &Impairment)>,
    ) -> Result<(Site, Option<Proc>)> {
        assert!(peers >= 1);
        if kind == Kind::Public {
            let mut names = Vec::new();
            let mut wan = None;
            let mut proc = None;
            for _ in 0..peers {
                let ns = self.add_ns("pub")?;
                let addr = self.public_ip()?;
                match wan_link {
                    Some(imp) => proc = Some(self.attach_public_wan(&ns, "tne", &[addr], imp)?),
                    None => self.attach_public(&ns, "tne", &[addr])?,
                }
                wan.get_or_insert(addr);
                names.push(ns);
            }
            let site = Site {
                kind,
                peers: names,
                routers: vec![],
                wan: wan.expect("one peer at least"),
            };
            return Ok((site, proc));
        }
        if self.next_subnet >= 250 {
            return Err("out of LAN subnets".into());
        }
        self.next_subnet += 1;
        let k = self.next_subnet;
        let wan = self.public_ip()?;
        let tag = match kind {
            Kind::Home => "home",
            Kind::FullCone => "fc",
            Kind::Symmetric => "sym",
            Kind::Blocked => "blk",
            Kind::Double => "dbl",
            Kind::HomeNoFirewall => "nofw",
            Kind::Public => unreachable!(),
        };
        let outer = self.add_ns(&format!("r{tag}"))?;
        let proc = match wan_link {
            Some(imp) => Some(self.attach_public_wan(&outer, "tnw", &[wan], imp)?),
            None => {
                self.attach_public(&outer, "tnw", &[wan])?;
                None
            }
        };
        let mut routers = vec![outer.clone()];
        let lan_router = if kind == Kind::Double {
            // Outer LAN 198.19.k.0/24; the inner router's WAN is 198.19.k.2.
            let inner = self.add_ns(&format!("r{tag}in"))?;
            self.wire(&outer, "tnl", &inner, "tnw")?;
            ip(&[
                "-n",
                &outer,
                "addr",
                "add",
                &format!("198.19.{k}.1/24"),
                "dev",
                "tnl",
            ])?;
            ip(&[
                "-n",
                &inner,
                "addr",
                "add",
                &format!("198.19.{k}.2/24"),
                "dev",
                "tnw",
            ])?;
            ip(&[
                "-n",
                &inner,
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{k}.1"),
            ])?;
            routers.push(inner.clone());
            inner
        } else {
            outer.clone()
        };
        // The (inner) router's LAN: 198.18.k.0/24, a bridge when several peers share it.
        let lan_if = if peers > 1 {
            ip(&["-n", &lan_router, "link", "add", "tnl", "type", "bridge"])?;
            ip(&["-n", &lan_router, "link", "set", "tnl", "up"])?;
            "tnl"
        } else {
            "tnl"
        };
        let mut names = Vec::new();
        for i in 0..peers {
            let ns = self.add_ns(&format!("p{tag}"))?;
            if peers > 1 {
                let port = format!("tnlp{i}");
                self.wire(&lan_router, &port, &ns, "tne")?;
                ip(&["-n", &lan_router, "link", "set", &port, "master", "tnl"])?;
            } else {
                self.wire(&lan_router, lan_if, &ns, "tne")?;
            }
            let host = 2 + i;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.18.{k}.{host}/24"),
                "dev",
                "tne",
            ])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{k}.1"),
            ])?;
            names.push(ns);
        }
        ip(&[
            "-n",
            &lan_router,
            "addr",
            "add",
            &format!("198.18.{k}.1/24"),
            "dev",
            lan_if,
        ])?;
        for r in &routers {
            ns_run(r, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
        }
        match kind {
            Kind::Double => {
                nft(&routers[0], &router_rules(Kind::Home))?;
                nft(&routers[1], &router_rules(Kind::Home))?;
            }
            _ => nft(&outer, &router_rules(kind))?,
        }
        let site = Site {
            kind,
            peers: names,
            routers,
            wan,
        };
        Ok((site, proc))
    }

    // ---- processes ----

    fn spawn(
        &self,
        ns: &str,
        program: &FsPath,
        args: &[String],
        log: Option<&str>,
    ) -> Result<Child> {
        let stderr = match log {
            Some(name) => Stdio::from(
                std::fs::File::create(self.dir.join(name))
                    .map_err(|e| format!("creating log {name}: {e}"))?,
            ),
            None => Stdio::null(),
        };
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {} in {ns}: {e}", program.display()))?;
        if let Some(pid) = child.id() {
            self.pids.lock().expect("pids lock").push(pid as i32);
        }
        Ok(child)
    }

    /// Start any `program` in `ns` (stdin piped for commands, stdout collected as [`Line`]s,
    /// stderr to `log` in [`Lab::dir`] if given); killed with the lab like every other process.
    pub fn start_program(
        &self,
        ns: &str,
        program: &FsPath,
        args: &[String],
        name: &str,
        log: Option<&str>,
    ) -> Result<Proc> {
        let child = self.spawn(ns, program, args, log)?;
        Ok(Proc::new(
            child,
            name.to_string(),
            log.map(|l| self.dir.join(l)),
        ))
    }

    /// Start `peermesh-server` in the server namespace on `ip` with `extra` flags; returns once
    /// it listens. Its log is `server-<ip>.log` in [`Lab::dir`].
    pub async fn start_server(&self, ip: Ipv4Addr, extra: &[&str]) -> Result<Proc> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("{ip}:{WS_PORT}"),
            "--heartbeat-timeout-ms".into(),
            "15000".into(),
            // Several servers share the namespace's loopback: no admin listener.
            "--admin-listen".into(),
            "off".into(),
        ];
        if !extra.contains(&"--no-turn") {
            args.extend([
                "--turn-listen".into(),
                format!("{ip}:{TURN_PORT}"),
                "--turn-relay-ports".into(),
                "50000-59999".into(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = format!("server-{ip}.log");
        let child = self.spawn(
            &self.server_ns,
            &self.programs.server.clone(),
            &args,
            Some(&log),
        )?;
        let proc = Proc::new(child, format!("server {ip}"), Some(self.dir.join(&log)));
        proc.wait_line(|l| l.raw.contains("listening on"), Duration::from_secs(20))
            .await
            .ok_or_else(|| format!("peermesh-server on {ip} did not start: {}", proc.dump()))?;
        Ok(proc)
    }

    /// Start the probe responder in the server namespace.
    pub async fn start_responder(&self) -> Result<Proc> {
        let args = vec![
            "respond".into(),
            SERVER_A.to_string(),
            SERVER_B.to_string(),
            PROBE_PORT.to_string(),
            PROBE_ALT_PORT.to_string(),
        ];
        let child = self.spawn(&self.server_ns, &self.programs.probe.clone(), &args, None)?;
        let proc = Proc::new(child, "responder".into(), None);
        proc.wait_line(|l| l.raw.contains("responding"), Duration::from_secs(10))
            .await
            .ok_or_else(|| format!("probe responder did not start: {}", proc.dump()))?;
        Ok(proc)
    }

    /// Start a `nat_peer` in `ns`.
    pub fn start_peer(
        &self,
        ns: &str,
        server: Ipv4Addr,
        group: &str,
        name: &str,
        count: u64,
        interval_ms: u64,
    ) -> Result<Proc> {
        let args: Vec<String> = [
            "--server",
            &format!("ws://{server}:{WS_PORT}/ws"),
            "--group",
            group,
            "--name",
            name,
            "--count",
            &count.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = format!("peer-{name}.log");
        let child = self.spawn(ns, &self.programs.peer.clone(), &args, Some(&log))?;
        Ok(Proc::new(child, name.to_string(), None))
    }

    /// Probe the routers of `site` from its first peer and check they behave as its kind says;
    /// an error says what differs.
    pub async fn check_site(&self, site: &Site) -> Result<ProbeReport> {
        let ns = site.peers[0].clone();
        let probe = self.programs.probe.clone();
        let args = [
            "probe".to_string(),
            SERVER_A.to_string(),
            SERVER_B.to_string(),
            PROBE_PORT.to_string(),
            format!("{SERVER_A}:{WS_PORT}"),
        ];
        let line = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ns_run(&ns, probe.to_str().unwrap_or("nat_probe"), &args)
        })
        .await
        .map_err(|e| e.to_string())??;
        let report = ProbeReport::parse(&line);
        let (mapping, filter) = site.kind.expected_probe();
        let mut wrong = Vec::new();
        if report.get("mapping") != mapping {
            wrong.push(format!(
                "mapping {} (want {mapping})",
                report.get("mapping")
            ));
        }
        if report.get("filter") != filter {
            wrong.push(format!(
                "filtering {} (want {filter})",
                report.get("filter")
            ));
        }
        if report.get("tcp") != "ok" {
            wrong.push("no TCP to the server's signaling port".into());
        }
        if site.kind != Kind::Blocked {
            let want = site.wan.to_string();
            let got = report.get("mapped_a").split(':').next().unwrap_or("");
            if got != want {
                wrong.push(format!("seen as {got} (want the site's address {want})"));
            }
        }
        if site.kind != Kind::Public && site.kind != Kind::Blocked && report.get("hairpin") != "off"
        {
            wrong.push(format!("hairpin {} (want off)", report.get("hairpin")));
        }
        if wrong.is_empty() {
            Ok(report)
        } else {
            Err(format!(
                "{} site does not behave as named: {} [probe: {}]",
                site.kind.name(),
                wrong.join(", "),
                report.line
            ))
        }
    }

    /// Add an nft table to a router namespace.
    pub fn router_rules(&self, router: &str, ruleset: &str) -> Result<()> {
        nft(router, ruleset)
    }

    /// Drop every UDP packet a router forwards (a cut direct path) until [`Lab::restore_udp`].
    pub fn cut_udp(&self, router: &str) -> Result<()> {
        nft(
            router,
            "table ip pmlab_cut {\n chain forward { type filter hook forward priority -10; policy accept; meta l4proto udp drop; }\n}\n",
        )
    }

    /// Undo [`Lab::cut_udp`].
    pub fn restore_udp(&self, router: &str) -> Result<()> {
        nft_delete_table(router, "pmlab_cut")
    }

    /// Hold back the UDP a router forwards from its LAN to anywhere but the server (STUN/TURN
    /// still work) until [`Lab::release_hold`]: the peer's first packets towards its partner
    /// are lost, so the partner's packets reach this router first.
    pub fn hold_outbound(&self, router: &str) -> Result<()> {
        nft(
            router,
            &format!("table ip pmlab_hold {{\n chain forward {{ type filter hook forward priority -10; policy accept; iifname \"tnl\" meta l4proto udp ip daddr != {SERVER_A} drop; }}\n}}\n"),
        )
    }

    /// Undo [`Lab::hold_outbound`].
    pub fn release_hold(&self, router: &str) -> Result<()> {
        nft_delete_table(router, "pmlab_hold")
    }

    /// Give a NATed peer a new LAN address (`198.18.k.h` → `198.18.k.(h + 100)`), as when a
    /// device moves to another network: the new address is added, the old one removed (its
    /// sockets stop working), the default route kept. Returns (old, new).
    pub fn renumber_peer(&self, peer: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let shown = ip(&["-n", peer, "-4", "-o", "addr", "show", "dev", "tne"])?;
        let old: Ipv4Addr = shown
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no address on {peer}/tne: {shown:?}"))?;
        let [a, b, k, h] = old.octets();
        if (a, b) != (198, 18) || h >= 100 {
            return Err(format!("{peer}: {old} is not a LAN peer address"));
        }
        let new = Ipv4Addr::new(a, b, k, h + 100);
        // Keep the new (secondary) address when the old (primary) one goes.
        ns_run(
            peer,
            "sysctl",
            &["-q", "-w", "net.ipv4.conf.tne.promote_secondaries=1"],
        )?;
        ip(&[
            "-n",
            peer,
            "addr",
            "add",
            &format!("{new}/24"),
            "dev",
            "tne",
        ])?;
        ip(&[
            "-n",
            peer,
            "addr",
            "del",
            &format!("{old}/24"),
            "dev",
            "tne",
        ])?;
        let gw = format!("{a}.{b}.{k}.1");
        // The default route may have gone with the old address.
        let _ = ip(&["-n", peer, "route", "replace", "default", "via", &gw]);
        Ok((old, new))
    }

    /// Drop `percent` % of the UDP packets entering a router (either side), at random.
    pub fn add_loss(&self, router: &str, percent: u32) -> Result<()> {
        nft(
            router,
            &format!("table ip pmlab_chaos {{\n chain pre {{ type filter hook prerouting priority -300; policy accept; meta l4proto udp numgen random mod 100 < {percent} counter drop; }}\n}}\n"),
        )
    }

    /// Packets counted by a router's `early` counter: unsolicited UDP from the WAN that created
    /// a conntrack entry ([`Kind::HomeNoFirewall`] only).
    pub fn early_inbound(&self, router: &str) -> Result<u64> {
        let out = ns_run(router, "nft", &["list", "counter", "ip", "pmlab", "early"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no packet count in {out:?}"))
    }

    // ---- WAN link emulator ----

    /// Two namespaces joined by an emulated WAN link ([`crate::wan`]): a `wan_link` process
    /// (started in A's namespace, so the lab's cleanup finds it) moves Ethernet frames between a
    /// TAP `tne` in each, `ab` impairing what A sends, `ba` what B sends. The lab brings the TAPs
    /// up and gives them [`WAN_A_IP`] and [`WAN_B_IP`] (/24). The TAPs are not persistent: they
    /// vanish with the process. Its log is `wan-<n>.log` in [`Lab::dir`].
    pub async fn wan_pair(&mut self, ab: Impairment, ba: Impairment) -> Result<WanPair> {
        let a_ns = self.add_ns("wana")?;
        let b_ns = self.add_ns("wanb")?;
        let args = wan_link_args(&a_ns, "tne", &b_ns, "tne", &ab, &ba);
        let log = format!("wan-{}.log", self.next_ns);
        let child = self.spawn(&a_ns, &self.programs.wan_link.clone(), &args, Some(&log))?;
        let proc = Proc::new(child, "wan_link".into(), Some(self.dir.join(&log)));
        let ready = proc
            .wait_line(
                |l| l.kind == "ready" || l.kind == "error",
                Duration::from_secs(10),
            )
            .await;
        if ready.as_ref().is_none_or(|l| l.kind != "ready") {
            return Err(format!("wan_link did not start: {}", proc.dump()));
        }
        for (ns, addr) in [(&a_ns, WAN_A_IP), (&b_ns, WAN_B_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "tne"])?;
            ip(&["-n", ns, "link", "set", "tne", "up"])?;
        }
        Ok(WanPair {
            a_ns,
            b_ns,
            a_ip: WAN_A_IP,
            b_ip: WAN_B_IP,
            proc,
        })
    }

    /// Start `nat_probe echo` on `addr`:[`WAN_ECHO_PORT`] in `ns` (the other end of
    /// [`Lab::ping`] and [`Lab::burst`]).
    pub async fn start_echo(&self, ns: &str, addr: Ipv4Addr) -> Result<Proc> {
        let args = vec!["echo".into(), addr.to_string(), WAN_ECHO_PORT.to_string()];
        let child = self.spawn(ns, &self.programs.probe.clone(), &args, None)?;
        let proc = Proc::new(child, format!("echo {addr}"), None);
        proc.wait_line(|l| l.raw.contains("echoing"), Duration::from_secs(10))
            .await
            .ok_or_else(|| format!("echo server did not start: {}", proc.dump()))?;
        Ok(proc)
    }

    /// Run `nat_probe ping` in `ns` against the echo server on `to`: `count` probes of `size`
    /// bytes every `interval_ms`. Fields: `sent received reordered dup rtt_{min,p50,p99,max}_us`.
    pub async fn ping(
        &self,
        ns: &str,
        to: Ipv4Addr,
        count: u32,
        interval_ms: f64,
        size: usize,
    ) -> Result<ProbeReport> {
        self.run_probe(
            ns,
            vec![
                "ping".into(),
                to.to_string(),
                WAN_ECHO_PORT.to_string(),
                count.to_string(),
                interval_ms.to_string(),
                size.to_string(),
            ],
        )
        .await
    }

    /// Run `nat_probe burst` in `ns` against the echo server on `to`: `total` bytes in
    /// `size`-byte datagrams, unpaced. Fields: `sent send_errors send_us received received_bytes
    /// span_us rate_bps` (the wire rate at which they arrived at the echo server).
    pub async fn burst(
        &self,
        ns: &str,
        to: Ipv4Addr,
        total: u64,
        size: usize,
    ) -> Result<ProbeReport> {
        self.run_probe(
            ns,
            vec![
                "burst".into(),
                to.to_string(),
                WAN_ECHO_PORT.to_string(),
                total.to_string(),
                size.to_string(),
            ],
        )
        .await
    }

    async fn run_probe(&self, ns: &str, args: Vec<String>) -> Result<ProbeReport> {
        let ns = ns.to_string();
        let probe = self.programs.probe.clone();
        let line = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ns_run(&ns, probe.to_str().unwrap_or("nat_probe"), &args)
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(ProbeReport::parse(&line))
    }

    /// Kill every process, delete every namespace, and check nothing is left: no namespace of
    /// this lab, no link with a lab interface name in the root namespace, no process the lab started.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown();
        let mut left = Vec::new();
        let ns = namespaces_with_prefix(&self.prefix);
        if !ns.is_empty() {
            left.push(format!("namespaces {ns:?}"));
        }
        let links = root_lab_links();
        if !links.is_empty() {
            left.push(format!("links in the root namespace {links:?}"));
        }
        let pids: Vec<i32> = self
            .pids
            .lock()
            .expect("pids lock")
            .iter()
            .copied()
            .filter(|&p| alive(p))
            .collect();
        if !pids.is_empty() {
            left.push(format!("processes {pids:?}"));
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("NAT lab left behind: {}", left.join("; ")))
        }
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for &pid in self.pids.lock().expect("pids lock").iter() {
            if alive(pid) {
                kill(pid);
            }
        }
        cleanup_prefix(&self.prefix);
        // Reap our children (killed above) so they do not linger as zombies.
        let deadline = Instant::now() + Duration::from_secs(5);
        let pids = self.pids.lock().expect("pids lock").clone();
        while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|p| p != &self.prefix);
        }
        if std::thread::panicking() {
            eprintln!("NAT lab logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The nft ruleset of a router of `kind` (WAN `tnw`, LAN `tnl`).
pub fn router_rules(kind: Kind) -> String {
    // Unsolicited inbound is dropped in the filter hooks, before conntrack confirms an entry
    // for it: like a home router's default firewall.
    let firewall = "
  chain input { type filter hook input priority filter; policy accept;
    iifname \"tnw\" ct state established,related accept
    iifname \"tnw\" drop
  }";
    let forward_in = "
  chain forward { type filter hook forward priority filter; policy accept;
    iifname \"tnw\" ct state established,related accept
    iifname \"tnw\" drop
  }";
    let nat = |how: &str| {
        format!(
            "
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"tnw\" {how}
  }}"
        )
    };
    let body = match kind {
        Kind::Home | Kind::Double => format!("{}{firewall}{forward_in}", nat("masquerade")),
        Kind::HomeNoFirewall => format!(
            "{}
  counter early {{ }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname \"tnw\" meta l4proto udp ct state new counter name \"early\"
  }}",
            nat("masquerade")
        ),
        Kind::Symmetric => format!(
            "{}{firewall}{forward_in}",
            nat("masquerade fully-random")
        ),
        Kind::FullCone => format!(
            "{}
  map fullcone {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout 10m; }}
  chain record {{ type filter hook postrouting priority srcnat + 10; policy accept;
    oifname \"tnw\" meta l4proto udp update @fullcone {{ udp sport : ct original ip saddr . ct original proto-src }}
  }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    iifname \"tnw\" meta l4proto udp dnat ip to udp dport map @fullcone
  }}{firewall}",
            nat("masquerade")
        ),
        Kind::Blocked => format!(
            "{}{firewall}
  chain forward {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"tnl\" ip daddr {SERVER_A} tcp dport {WS_PORT} accept
  }}",
            nat("masquerade")
        ),
        Kind::Public => String::new(),
    };
    format!("table ip pmlab {{{body}\n}}\n")
}

// ---------------------------------------------------------------------------------------------
// Processes and their output.

/// One line of a lab process's stdout. `nat_peer` lines are `<ms> <kind> <rest>`.
#[derive(Debug, Clone)]
pub struct Line {
    /// When the test read it.
    pub at: Instant,
    /// The process's own timestamp (ms since it started), if the line has one.
    pub ms: Option<u64>,
    /// Second word (`path`, `done`, ...).
    pub kind: String,
    /// The rest after the kind.
    pub rest: String,
    /// The whole line.
    pub raw: String,
}

struct ProcOutput {
    lines: Mutex<Vec<Line>>,
    notify: Notify,
    ended: Mutex<bool>,
}

/// A process in a lab namespace whose stdout lines are collected.
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<ProcOutput>,
    log: Option<PathBuf>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc").field("name", &self.name).finish()
    }
}

impl Proc {
    fn new(mut child: Child, name: String, log: Option<PathBuf>) -> Proc {
        let out = Arc::new(ProcOutput {
            lines: Mutex::new(Vec::new()),
            notify: Notify::new(),
            ended: Mutex::new(false),
        });
        let stdin = child.stdin.take();
        if let Some(stdout) = child.stdout.take() {
            let out = out.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(raw)) = lines.next_line().await {
                    let mut words = raw.splitn(3, ' ');
                    let first = words.next().unwrap_or("");
                    let (ms, kind, rest) = match first.parse::<u64>() {
                        Ok(ms) => (
                            Some(ms),
                            words.next().unwrap_or("").to_string(),
                            words.next().unwrap_or("").to_string(),
                        ),
                        Err(_) => (None, String::new(), raw.clone()),
                    };
                    out.lines.lock().expect("lines lock").push(Line {
                        at: Instant::now(),
                        ms,
                        kind,
                        rest,
                        raw,
                    });
                    out.notify.notify_waiters();
                }
                *out.ended.lock().expect("ended lock") = true;
                out.notify.notify_waiters();
            });
        }
        Proc {
            name,
            child,
            stdin,
            out,
            log,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id (`None` once it has been waited for).
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.out.lines.lock().expect("lines lock").clone()
    }

    /// Lines of one kind so far.
    pub fn lines_of(&self, kind: &str) -> Vec<Line> {
        self.lines()
            .into_iter()
            .filter(|l| l.kind == kind)
            .collect()
    }

    /// The first line (already read or still to come) that matches `pred`, or `None` after
    /// `timeout` or when the process's output ends.
    pub async fn wait_line(&self, pred: impl Fn(&Line) -> bool, timeout: Duration) -> Option<Line> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.out.notify.notified();
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if *self.out.ended.lock().expect("ended lock") {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The first matching line read after `since` (see [`Proc::wait_line`]).
    pub async fn wait_line_after(
        &self,
        since: Instant,
        pred: impl Fn(&Line) -> bool,
        timeout: Duration,
    ) -> Option<Line> {
        self.wait_line(|l| l.at >= since && pred(l), timeout).await
    }

    /// Send a command line to its stdin.
    pub async fn command(&mut self, cmd: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(|e| format!("{}: {e}", self.name))?;
        stdin
            .flush()
            .await
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// Ask a `nat_peer` for its status and return the `status` lines.
    pub async fn status(&mut self) -> Result<Vec<Line>> {
        let since = Instant::now();
        self.command("status").await?;
        self.wait_line_after(since, |l| l.kind == "status-end", Duration::from_secs(5))
            .await
            .ok_or_else(|| format!("{}: no status", self.name))?;
        Ok(self
            .lines()
            .into_iter()
            .filter(|l| l.at >= since && l.kind == "status")
            .collect())
    }

    /// Its output so far (and its log file, if any), for error messages.
    pub fn dump(&self) -> String {
        let mut s: String = self
            .lines()
            .iter()
            .map(|l| format!("  {}: {}\n", self.name, l.raw))
            .collect();
        if let Some(log) = &self.log {
            if let Ok(text) = std::fs::read_to_string(log) {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                for l in tail.into_iter().rev() {
                    s.push_str(&format!("  {} log: {l}\n", self.name));
                }
            }
        }
        s
    }

    /// Ask it to quit, then make sure it is gone.
    pub async fn stop(mut self) {
        let _ = self.command("quit").await;
        self.stdin = None;
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// `ip:port` of a path line's local address, if direct.
pub fn path_addrs(path: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut w = path.split_whitespace().skip(2);
    Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
}

// ---------------------------------------------------------------------------------------------
// Two peers in one group.

/// Two `nat_peer`s in one group, each sending the other `count` reliable messages.
#[derive(Debug)]
pub struct Pair {
    /// First peer (`<group>-a`).
    pub a: Proc,
    /// Second peer (`<group>-b`).
    pub b: Proc,
    /// Messages each side sends.
    pub count: u64,
}

/// How a pair's run went.
#[derive(Debug, Clone)]
pub struct PairReport {
    /// The final path as `a` reports it (`server`, `direct srflx/prflx A B`, ...).
    pub path_a: String,
    /// The final path as `b` reports it.
    pub path_b: String,
    /// Class of the final path (both sides' view, see [`PathClass::of_pair`]).
    pub observed: PathClass,
    /// From `a` seeing `b` join to `a`'s last path change (zero if it never left the server path).
    pub time_to_final: Duration,
    /// Both sides received all `count` messages in order, once, and had all theirs acknowledged.
    pub messages_ok: bool,
    /// The first message on both sides came over the server path.
    pub first_via_server: bool,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
}

impl Pair {
    /// Start `a` in `ns_a` first, then `b` in `ns_b`, against the server on `server`.
    pub async fn start(
        lab: &Lab,
        ns_a: &str,
        ns_b: &str,
        server: Ipv4Addr,
        group: &str,
        count: u64,
        interval_ms: u64,
    ) -> Result<Pair> {
        let a = lab.start_peer(
            ns_a,
            server,
            group,
            &format!("{group}-a"),
            count,
            interval_ms,
        )?;
        a.wait_line(|l| l.kind == "ready", Duration::from_secs(15))
            .await
            .ok_or_else(|| format!("{group}-a did not connect: {}", a.dump()))?;
        let b = lab.start_peer(
            ns_b,
            server,
            group,
            &format!("{group}-b"),
            count,
            interval_ms,
        )?;
        Ok(Pair { a, b, count })
    }

    /// Both sides' `joined` line.
    pub async fn wait_joined(&self, timeout: Duration) -> Result<()> {
        for p in [&self.a, &self.b] {
            p.wait_line(|l| l.kind == "joined", timeout)
                .await
                .ok_or_else(|| format!("{} saw nobody join: {}", p.name(), p.dump()))?;
        }
        Ok(())
    }

    /// The last `path` line of a side (its rest without the peer name), or `server`.
    pub fn last_path(p: &Proc) -> String {
        p.lines_of("path")
            .last()
            .map(|l| {
                l.rest
                    .split_once(' ')
                    .map(|x| x.1.to_string())
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| "server".into())
    }

    /// Wait until both sides received everything and had everything acknowledged (or
    /// `timeout`), then report.
    pub async fn finish(&mut self, timeout: Duration) -> PairReport {
        let mut problems = Vec::new();
        let deadline = Instant::now() + timeout;
        for p in [&self.a, &self.b] {
            for kind in ["done", "sent"] {
                let left = deadline.saturating_duration_since(Instant::now());
                if p.wait_line(|l| l.kind == kind || l.kind == "error", left)
                    .await
                    .is_none_or(|l| l.kind == "error")
                {
                    problems.push(format!("{}: no `{kind}`", p.name()));
                }
            }
        }
        if !problems.is_empty() {
            // What each side has received and its link counters, for the report.
            for p in [&mut self.a, &mut self.b] {
                let _ = p.status().await;
            }
        }
        let mut first_via_server = true;
        for p in [&self.a, &self.b] {
            for e in p.lines_of("error") {
                problems.push(format!("{}: {}", p.name(), e.rest));
            }
            match p.lines_of("first").first() {
                Some(l) if !l.rest.ends_with("recv_server=0") => {}
                other => {
                    first_via_server = false;
                    problems.push(format!(
                        "{}: first message not via the server path: {other:?}",
                        p.name()
                    ));
                }
            }
        }
        let path_a = Pair::last_path(&self.a);
        let path_b = Pair::last_path(&self.b);
        let observed = PathClass::of_pair(&path_a, &path_b);
        if (PathClass::of(&path_a) == PathClass::Server)
            != (PathClass::of(&path_b) == PathClass::Server)
        {
            problems.push(format!("the sides disagree: a {path_a:?}, b {path_b:?}"));
        }
        let joined = self.a.lines_of("joined").first().and_then(|l| l.ms);
        let last_change = self.a.lines_of("path").last().and_then(|l| l.ms);
        let time_to_final = match (joined, last_change) {
            (Some(j), Some(c)) => Duration::from_millis(c.saturating_sub(j)),
            _ => Duration::ZERO,
        };
        let messages_ok = problems
            .iter()
            .all(|p| !p.contains("no `") && !p.contains("expected message"))
            && self.a.lines_of("error").is_empty()
            && self.b.lines_of("error").is_empty();
        PairReport {
            path_a,
            path_b,
            observed,
            time_to_final,
            messages_ok,
            first_via_server,
            problems,
        }
    }

    /// Both peers' output, for error messages.
    pub fn dump(&self) -> String {
        format!("{}{}", self.a.dump(), self.b.dump())
    }

    /// Stop both.
    pub async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Two namespaces over an emulated WAN link.

/// `wan_link`'s flags: TAP `a_if` in `a_ns`, `b_if` in `b_ns`, every parameter of both
/// directions.
fn wan_link_args(
    a_ns: &str,
    a_if: &str,
    b_ns: &str,
    b_if: &str,
    ab: &Impairment,
    ba: &Impairment,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--a-ns", a_ns, "--a-if", a_if, "--b-ns", b_ns, "--b-if", b_if,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (dir, imp) in [("ab", ab), ("ba", ba)] {
        for w in imp.to_words() {
            let (k, v) = w.split_once('=').expect("key=value");
            args.extend([format!("--{dir}-{k}"), v.to_string()]);
        }
    }
    args
}

/// Two namespaces joined by an emulated WAN link (see [`Lab::wan_pair`]).
#[derive(Debug)]
pub struct WanPair {
    /// A's namespace (the `wan_link` process runs here).
    pub a_ns: String,
    /// B's namespace.
    pub b_ns: String,
    /// A's address ([`WAN_A_IP`]).
    pub a_ip: Ipv4Addr,
    /// B's address ([`WAN_B_IP`]).
    pub b_ip: Ipv4Addr,
    /// The `wan_link` process.
    pub proc: Proc,
}

/// The emulator's counters ([`WanPair::stats`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct WanStats {
    /// A→B.
    pub ab: Stats,
    /// B→A.
    pub ba: Stats,
    /// CPU time the emulator has used so far (user + system).
    pub cpu: Duration,
}

impl WanPair {
    /// See [`WanLink::set`].
    pub async fn set(&mut self, dir: &str, words: &str) -> Result<String> {
        wan_set(&mut self.proc, dir, words).await
    }

    /// See [`WanLink::set_impairment`].
    pub async fn set_impairment(&mut self, dir: &str, imp: &Impairment) -> Result<String> {
        wan_set(&mut self.proc, dir, &imp.to_words().join(" ")).await
    }

    /// See [`WanLink::stats`].
    pub async fn stats(&mut self) -> Result<WanStats> {
        wan_stats(&mut self.proc).await
    }

    /// See [`WanLink::settled_stats`].
    pub async fn settled_stats(&mut self, timeout: Duration) -> Result<WanStats> {
        wan_settled_stats(&mut self.proc, timeout).await
    }

    /// The `wan_link` process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.id()
    }

    /// Stop the emulator (it exits and its TAPs vanish).
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

/// The emulated WAN link of a [`Lab::site_with_wan`]: `ab` is what the site sends (up), `ba`
/// what it receives (down).
#[derive(Debug)]
pub struct WanLink {
    /// The `wan_link` process.
    pub proc: Proc,
}

impl WanLink {
    /// Change the impairments of `dir` (`ab`, `ba` or `both`) at run time: `words` are
    /// `key=value` as [`Impairment::set`] takes them (`delay-ms=25 loss-pct=1`); unnamed keys
    /// keep their values. Returns the new settings as the emulator prints them.
    pub async fn set(&mut self, dir: &str, words: &str) -> Result<String> {
        wan_set(&mut self.proc, dir, words).await
    }

    /// Set every parameter of `dir` (`ab`, `ba` or `both`) to `imp`.
    pub async fn set_impairment(&mut self, dir: &str, imp: &Impairment) -> Result<String> {
        wan_set(&mut self.proc, dir, &imp.to_words().join(" ")).await
    }

    /// The emulator's counters now.
    pub async fn stats(&mut self) -> Result<WanStats> {
        wan_stats(&mut self.proc).await
    }

    /// Wait until nothing is in flight in either direction (or `timeout`); the counters then.
    pub async fn settled_stats(&mut self, timeout: Duration) -> Result<WanStats> {
        wan_settled_stats(&mut self.proc, timeout).await
    }

    /// The `wan_link` process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.id()
    }

    /// Stop the emulator (it exits and its TAPs vanish: the site is cut off).
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

async fn wan_set(proc: &mut Proc, dir: &str, words: &str) -> Result<String> {
    let since = Instant::now();
    proc.command(&format!("set {dir} {words}")).await?;
    let last = if dir == "both" { "ba" } else { dir };
    let line = proc
        .wait_line_after(
            since,
            |l| l.kind == "error" || (l.kind == "set" && l.rest.starts_with(last)),
            Duration::from_secs(5),
        )
        .await
        .ok_or_else(|| format!("wan_link did not answer `set`: {}", proc.dump()))?;
    if line.kind == "error" {
        return Err(format!("wan_link: {}", line.rest));
    }
    Ok(line.rest)
}

async fn wan_stats(proc: &mut Proc) -> Result<WanStats> {
    let since = Instant::now();
    proc.command("stats").await?;
    let line = proc
        .wait_line_after(since, |l| l.kind == "stats", Duration::from_secs(5))
        .await
        .ok_or_else(|| format!("wan_link did not answer `stats`: {}", proc.dump()))?;
    let report = ProbeReport::parse(&line.rest);
    let bad = || format!("wan_link: bad stats line {:?}", line.raw);
    Ok(WanStats {
        ab: Stats::from_fields(&report.fields, "ab.").ok_or_else(bad)?,
        ba: Stats::from_fields(&report.fields, "ba.").ok_or_else(bad)?,
        cpu: Duration::from_millis(report.num("cpu_ms").ok_or_else(bad)? as u64),
    })
}

async fn wan_settled_stats(proc: &mut Proc, timeout: Duration) -> Result<WanStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = wan_stats(proc).await?;
        if (s.ab.in_flight() == 0 && s.ba.in_flight() == 0) || Instant::now() >= deadline {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
