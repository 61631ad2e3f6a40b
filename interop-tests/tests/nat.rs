//! The NAT lab (`peermesh_interop_tests::nat`, `docs/CONNECTIVITY.md`): pairs of real peers
//! behind namespace routers of every kind, against the peermesh server on a public segment.
//! Needs root (network namespaces, nft). The tests of this file run one at a time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peermesh_interop_tests::nat::*;

/// One lab at a time: the tests measure how fast paths change, and 2 cores are shared.
static SERIAL: Mutex<()> = Mutex::new(());

fn programs() -> Programs {
    Programs::new(
        env!("CARGO_BIN_EXE_nat_server"),
        env!("CARGO_BIN_EXE_nat_peer"),
        env!("CARGO_BIN_EXE_nat_probe"),
    )
}

fn serial<F: std::future::Future<Output = ()>>(test: F) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// A lab with the server (TURN on) and the probe responder.
async fn lab_with_server() -> (Lab, Proc, Proc) {
    let lab = Lab::new(programs()).expect("building the lab");
    let server = lab.start_server(SERVER_A, &[]).await.expect("server");
    let responder = lab.start_responder().await.expect("probe responder");
    (lab, server, responder)
}

async fn checked_site(lab: &mut Lab, kind: Kind, peers: usize) -> Site {
    let site = lab.site(kind, peers).expect("building a site");
    let report = lab
        .check_site(&site)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{:>9} router checked: {}", kind.name(), report.line);
    site
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

struct Row {
    pair: String,
    expected: PathClass,
    observed: PathClass,
    path_a: String,
    path_b: String,
    time: Duration,
    messages_ok: bool,
    problems: Vec<String>,
    dump: String,
}

impl Row {
    /// `pair: expected X, observed Y (path a / path b)`.
    fn summary(&self) -> String {
        format!(
            "{}: expected {}, observed {} ({} / {})",
            self.pair,
            self.expected.name(),
            self.observed.name(),
            self.path_a,
            self.path_b
        )
    }
}

/// Reflexive pairs of the matrix that may end on a TURN relay by ICE's race ([`nat_matrix`]).
const MAX_RELAY_RACES: usize = 2;
/// Pairs that may go direct where the model allows only a relay ([`nat_matrix`]).
const MAX_BETTER_THAN_MODEL: usize = 1;

/// Candidate types of a printed path (`direct srflx/prflx A B` → `srflx/prflx`).
fn types(path: &str) -> &str {
    path.split_whitespace().nth(1).unwrap_or("-")
}

/// Every unordered pair of router kinds, plus two peers on one LAN: both peers in one group,
/// 2000 reliable messages each way across the run; the final path must be what the routers'
/// behaviours allow, or, in at most one pair, a direct one where the model allows only a TURN
/// relay (seen once in about 20 runs, symmetric × double: the double NAT's peer took a check
/// from the symmetric NAT's mapping for it, so some conntrack behaviour of the lab's routers is
/// not in the model; the user gets a better path, not a worse one).
///
/// At most `MAX_RELAY_RACES` pairs that could go direct through their NATs may end on a TURN
/// relay instead, by a race in webrtc-ice 0.17, the default backend's ICE (2 of 6 runs of this
/// test saw it once, home × fullcone): a check sent from one peer's relay candidate reaches the
/// other before that candidate's trickle does, so the other learns the relay address as a
/// peer-reflexive candidate, whose priority (type preference 110) outranks the server-reflexive
/// pair's (100); the signaled relay candidate does not lower it afterwards, and webrtc-ice never
/// nominates again once a pair is nominated. Messages still all arrive. (The sansio backend's
/// ICE is another; the same bound applies to it, unmeasured.)
#[test]
fn nat_matrix() {
    serial(async {
        const COUNT: u64 = 2000;
        const INTERVAL_MS: u64 = 5;
        let started = Instant::now();
        let (mut lab, server, responder) = lab_with_server().await;

        // Scenarios: (a, b, same LAN).
        let mut scenarios = Vec::new();
        for (i, &a) in Kind::MATRIX.iter().enumerate() {
            for &b in &Kind::MATRIX[i..] {
                scenarios.push((a, b, false));
            }
        }
        scenarios.push((Kind::Home, Kind::Home, true));
        assert_eq!(scenarios.len(), 22);

        // Build every site and check its routers behave as named (probes run a few at a time).
        let mut sites = Vec::new();
        for &(a, b, same_lan) in &scenarios {
            if same_lan {
                let s = lab.site(a, 2).expect("site");
                sites.push((s.clone(), s));
            } else {
                sites.push((lab.site(a, 1).expect("site"), lab.site(b, 1).expect("site")));
            }
        }
        let lab = Arc::new(lab);
        let mut probes = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(8));
        for (sa, sb) in &sites {
            for site in [sa, sb] {
                let (lab, site, gate) = (lab.clone(), site.clone(), gate.clone());
                probes.spawn(async move {
                    let _permit = gate.acquire().await;
                    lab.check_site(&site).await
                });
            }
        }
        while let Some(r) = probes.join_next().await {
            r.expect("probe task").unwrap_or_else(|e| panic!("{e}"));
        }
        println!(
            "{} sites built and checked in {}",
            sites.len() * 2 - 1,
            secs(started.elapsed())
        );

        // Run the scenarios, a few at a time.
        let concurrency = std::env::var("PMLAB_CONCURRENCY")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(4);
        let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut runs = tokio::task::JoinSet::new();
        for (i, (&(a, b, same_lan), (sa, sb))) in scenarios.iter().zip(&sites).enumerate() {
            let (lab, gate) = (lab.clone(), gate.clone());
            let (ns_a, ns_b) = if same_lan {
                (sa.peers[0].clone(), sa.peers[1].clone())
            } else {
                (sa.peers[0].clone(), sb.peers[0].clone())
            };
            runs.spawn(async move {
                let _permit = gate.acquire().await;
                let label = if same_lan {
                    format!("{} same LAN", a.name())
                } else {
                    format!("{} × {}", a.name(), b.name())
                };
                let group = format!("m{i}");
                let mut pair =
                    Pair::start(&lab, &ns_a, &ns_b, SERVER_A, &group, COUNT, INTERVAL_MS)
                        .await
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                let report = pair.finish(Duration::from_secs(45)).await;
                let row = Row {
                    pair: label,
                    expected: expected_path(a, b, same_lan, true),
                    observed: report.observed,
                    path_a: report.path_a,
                    path_b: report.path_b,
                    time: report.time_to_final,
                    messages_ok: report.messages_ok && report.first_via_server,
                    problems: report.problems,
                    dump: pair.dump(),
                };
                pair.stop().await;
                (i, row)
            });
        }
        let mut rows: Vec<(usize, Row)> = Vec::new();
        while let Some(r) = runs.join_next().await {
            rows.push(r.expect("scenario task"));
        }
        rows.sort_by_key(|(i, _)| *i);

        let mut table = String::from(
            "| pair | expected path | observed path | selected pair (a / b) | time to final path | messages ok |\n|---|---|---|---|---|---|\n",
        );
        for (_, r) in &rows {
            table.push_str(&format!(
                "| {} | {} | {} | {} / {} | {} | {} |\n",
                r.pair,
                r.expected.name(),
                r.observed.name(),
                types(&r.path_a),
                types(&r.path_b),
                if r.observed == PathClass::Server {
                    "-".to_string()
                } else {
                    secs(r.time)
                },
                if r.messages_ok {
                    format!("{COUNT}/{COUNT} each way, in order")
                } else {
                    "NO".to_string()
                }
            ));
        }
        println!(
            "\nNAT matrix ({} s total):\n\n{table}",
            started.elapsed().as_secs()
        );
        let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nat-matrix.md");
        let _ = std::fs::write(&file, &table);
        println!("(also in {})", file.display());
        let better = |r: &Row| r.observed != r.expected && r.observed.at_least(r.expected);
        let betters = rows.iter().filter(|(_, r)| better(r)).count();
        for (_, r) in rows.iter().filter(|(_, r)| better(r)) {
            // Better than the model (`PathClass::at_least`): kept, with its log, to learn from.
            println!("{}: better than the model\n{}", r.summary(), r.dump);
        }
        // A reflexive pair that ended on a TURN relay through ICE's race (see the doc comment):
        // tolerated in a few pairs, not in most, which would mean hole punching is broken.
        let relay_race = |r: &Row| {
            r.expected == PathClass::Reflexive
                && r.observed == PathClass::Relay
                && r.messages_ok
                && r.problems.is_empty()
        };
        let reflexive = rows
            .iter()
            .filter(|(_, r)| r.expected == PathClass::Reflexive)
            .count();
        let races: Vec<&Row> = rows
            .iter()
            .map(|(_, r)| r)
            .filter(|r| relay_race(r))
            .collect();
        for r in &races {
            println!("{}: the relay won ICE's race\n{}", r.summary(), r.dump);
        }
        let mut failed: Vec<String> = rows
            .iter()
            .filter(|(_, r)| {
                !relay_race(r)
                    && (!r.observed.at_least(r.expected)
                        || !r.messages_ok
                        || !r.problems.is_empty())
            })
            .map(|(_, r)| format!("{}; problems {:?}\n{}", r.summary(), r.problems, r.dump))
            .collect();
        if betters > MAX_BETTER_THAN_MODEL {
            failed.push(format!(
                "{betters} pairs went direct where the model allows only a TURN relay (at most \
                 {MAX_BETTER_THAN_MODEL} may): the lab's routers do not behave as modelled"
            ));
        }
        if races.len() > MAX_RELAY_RACES {
            failed.push(format!(
                "{} of {reflexive} reflexive pairs ended on a TURN relay (at most \
                 {MAX_RELAY_RACES} may, by ICE's race)",
                races.len()
            ));
        }
        drop((server, responder));
        let lab = Arc::try_unwrap(lab).expect("every scenario finished");
        lab.shutdown().expect("clean teardown");
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    });
}

/// Without TURN, two symmetric NATs cannot connect directly: each side is told "no direct
/// path" within 10 s of the join, and the messages flow over the server path all along.
#[test]
fn nat_symmetric_pair_without_turn_reports_no_direct_path() {
    serial(async {
        let (mut lab, _stun, _responder) = lab_with_server().await;
        // A second server without TURN; clients still learn their reflexive addresses from the
        // first one's STUN service.
        let stun = format!("stun:{SERVER_A}:{TURN_PORT}");
        let _server = lab
            .start_server(SERVER_C, &["--no-turn", "--ice-server", &stun])
            .await
            .expect("server without TURN");
        let sa = checked_site(&mut lab, Kind::Symmetric, 1).await;
        let sb = checked_site(&mut lab, Kind::Symmetric, 1).await;
        assert_eq!(
            expected_path(Kind::Symmetric, Kind::Symmetric, false, false),
            PathClass::Server
        );
        let mut pair = Pair::start(
            &lab,
            &sa.peers[0],
            &sb.peers[0],
            SERVER_C,
            "noturn",
            1500,
            10,
        )
        .await
        .expect("peers");
        pair.wait_joined(Duration::from_secs(10))
            .await
            .expect("join");
        for p in [&pair.a, &pair.b] {
            let joined = p.lines_of("joined")[0].ms.expect("timestamp");
            let failed = p
                .wait_line(|l| l.kind == "nodirect", Duration::from_secs(12))
                .await
                .unwrap_or_else(|| panic!("{} was never told: {}", p.name(), pair.dump()));
            let after = failed.ms.expect("timestamp") - joined;
            println!(
                "{}: no direct path after {after} ms: {}",
                p.name(),
                failed.rest
            );
            assert!(after <= 10_000, "{}: told only after {after} ms", p.name());
        }
        let report = pair.finish(Duration::from_secs(60)).await;
        assert!(
            report.messages_ok && report.problems.is_empty(),
            "{report:?}\n{}",
            pair.dump()
        );
        for p in [&pair.a, &pair.b] {
            assert!(
                p.lines_of("path").is_empty(),
                "{} left the server path: {}",
                p.name(),
                pair.dump()
            );
        }
        pair.stop().await;
        lab.shutdown().expect("clean teardown");
    });
}

/// The early-inbound race: the partner's first packet reaches a plain-masquerade router before
/// our own first packet to the partner has left it, so conntrack keeps an entry for the
/// partner's flow and gives our flow another external port than our server-reflexive one.
/// Forced here by holding our outbound UDP until the router has seen the partner's packet. The
/// pair must still end up direct over a peer-reflexive candidate (partner behind full cone) or
/// on TURN (partner behind the same kind of router), never stuck.
#[test]
fn nat_early_inbound_race_still_connects() {
    serial(async {
        let (mut lab, _server, _responder) = lab_with_server().await;
        for partner in [Kind::FullCone, Kind::HomeNoFirewall] {
            let sa = checked_site(&mut lab, Kind::HomeNoFirewall, 1).await;
            let sb = checked_site(&mut lab, partner, 1).await;
            let router = sa.routers[0].clone();
            let before = lab.early_inbound(&router).expect("counter");
            lab.hold_outbound(&router).expect("hold");
            let group = format!("race-{}", partner.name());
            let mut pair = Pair::start(&lab, &sa.peers[0], &sb.peers[0], SERVER_A, &group, 1500, 5)
                .await
                .expect("peers");
            // Release once the partner's packet has hit the router.
            let until = Instant::now() + Duration::from_secs(10);
            while lab.early_inbound(&router).expect("counter") == before {
                assert!(
                    Instant::now() < until,
                    "the partner's packet never reached the router first: {}",
                    pair.dump()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lab.release_hold(&router).expect("release");
            let report = pair.finish(Duration::from_secs(60)).await;
            let early = lab.early_inbound(&router).expect("counter") - before;
            println!(
                "race vs {}: {} unsolicited packets hit the router first; final path {} / {} ({}) after {}",
                partner.name(),
                early,
                report.path_a,
                report.path_b,
                report.observed.name(),
                secs(report.time_to_final)
            );
            let recovered = match report.observed {
                PathClass::Relay => true,
                PathClass::Reflexive => {
                    report.path_a.contains("prflx") || report.path_b.contains("prflx")
                }
                _ => false,
            };
            assert!(
                recovered && report.messages_ok && report.problems.is_empty(),
                "stuck or lost messages: {report:?}\n{}",
                pair.dump()
            );
            // Against a full-cone partner the peer-reflexive pair usually wins (it answers the
            // new mapping), but ICE may nominate the TURN pair first; both recover.
            if partner == Kind::FullCone && report.observed != PathClass::Reflexive {
                println!("race vs fullcone: ICE nominated the TURN pair before the prflx one");
            }
            pair.stop().await;
        }
        lab.shutdown().expect("clean teardown");
    });
}

/// Cut all UDP through one router mid-stream: both sides fall back to the server path within
/// 5 s; restore it: both return to the direct path within 10 s; no reliable message lost or
/// duplicated.
#[test]
fn nat_direct_path_cut_and_restored() {
    serial(async {
        let (mut lab, _server, _responder) = lab_with_server().await;
        let sa = checked_site(&mut lab, Kind::Home, 1).await;
        let sb = checked_site(&mut lab, Kind::FullCone, 1).await;
        let router = sa.routers[0].clone();
        let mut pair = Pair::start(&lab, &sa.peers[0], &sb.peers[0], SERVER_A, "cut", 5000, 5)
            .await
            .expect("peers");
        let direct = |l: &Line| l.kind == "path" && l.rest.contains(" direct ");
        let server = |l: &Line| l.kind == "path" && l.rest.ends_with(" server");
        for p in [&pair.a, &pair.b] {
            p.wait_line(direct, Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("no direct path: {}", pair.dump()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        let cut = Instant::now();
        lab.cut_udp(&router).expect("cut");
        for p in [&pair.a, &pair.b] {
            let l = p
                .wait_line_after(cut, server, Duration::from_secs(8))
                .await
                .unwrap_or_else(|| panic!("{} stayed on the cut path: {}", p.name(), pair.dump()));
            let took = l.at - cut;
            println!(
                "{}: back on the server path {} after the cut",
                p.name(),
                secs(took)
            );
            assert!(
                took <= Duration::from_secs(5),
                "{}: fallback took {took:?}",
                p.name()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        let restored = Instant::now();
        lab.restore_udp(&router).expect("restore");
        for p in [&pair.a, &pair.b] {
            let l = p
                .wait_line_after(restored, direct, Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("{} never went direct again: {}", p.name(), pair.dump()));
            let took = l.at - restored;
            println!(
                "{}: direct again {} after the restore ({})",
                p.name(),
                secs(took),
                l.rest
            );
            assert!(
                took <= Duration::from_secs(10),
                "{}: return took {took:?}",
                p.name()
            );
        }
        let report = pair.finish(Duration::from_secs(60)).await;
        assert!(
            report.messages_ok && report.problems.is_empty(),
            "{report:?}\n{}",
            pair.dump()
        );
        assert_eq!(report.observed, PathClass::Reflexive, "{}", pair.dump());
        for p in [&mut pair.a, &mut pair.b] {
            for l in p.status().await.expect("status") {
                println!("{}: {}", p.name(), l.rest);
            }
        }
        pair.stop().await;
        lab.shutdown().expect("clean teardown");
    });
}

/// A peer behind a home router gets a new LAN address mid-stream (the old one is removed, as
/// when a device changes networks): its WebSocket and its direct path die with the old address;
/// it resumes its session from the new address, the link goes direct again with a new
/// generation, and the reliable stream completes in order, once.
#[test]
fn nat_address_change_mid_stream() {
    serial(async {
        let lab = Lab::new(programs()).expect("building the lab");
        let _server = lab
            .start_server(SERVER_A, &["--heartbeat-timeout-ms", "3000"])
            .await
            .expect("server");
        let _responder = lab.start_responder().await.expect("probe responder");
        let mut lab = lab;
        let sa = checked_site(&mut lab, Kind::Home, 1).await;
        let sb = checked_site(&mut lab, Kind::FullCone, 1).await;
        let mut pair = Pair::start(&lab, &sa.peers[0], &sb.peers[0], SERVER_A, "move", 4000, 5)
            .await
            .expect("peers");
        let direct = |l: &Line| l.kind == "path" && l.rest.contains(" direct ");
        for p in [&pair.a, &pair.b] {
            p.wait_line(direct, Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("no direct path: {}", pair.dump()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        let moved = Instant::now();
        let (old, new) = lab.renumber_peer(&sa.peers[0]).expect("renumber");
        println!("{}: {old} -> {new}", sa.peers[0]);
        let resumed = pair
            .a
            .wait_line_after(
                moved,
                |l| l.rest.contains("Reconnected") && l.rest.contains("resumed: true"),
                Duration::from_secs(20),
            )
            .await
            .unwrap_or_else(|| panic!("the moved peer did not resume: {}", pair.dump()));
        println!(
            "session resumed {} after the move",
            secs(resumed.at - moved)
        );
        let back = pair
            .a
            .wait_line_after(moved, direct, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("never direct again: {}", pair.dump()));
        println!(
            "direct again {} after the move ({})",
            secs(back.at - moved),
            back.rest
        );
        let report = pair.finish(Duration::from_secs(90)).await;
        assert!(
            report.messages_ok && report.problems.is_empty(),
            "{report:?}\n{}",
            pair.dump()
        );
        pair.stop().await;
        lab.shutdown().expect("clean teardown");
    });
}

/// 5 % random UDP loss in a router (both directions): the reliable stream still completes, in
/// order, once.
#[test]
fn nat_reliable_stream_survives_udp_loss() {
    serial(async {
        let (mut lab, _server, _responder) = lab_with_server().await;
        let sa = checked_site(&mut lab, Kind::Home, 1).await;
        let sb = checked_site(&mut lab, Kind::FullCone, 1).await;
        let router = sa.routers[0].clone();
        lab.add_loss(&router, 5).expect("loss");
        let mut pair = Pair::start(&lab, &sa.peers[0], &sb.peers[0], SERVER_A, "loss", 3000, 10)
            .await
            .expect("peers");
        let report = pair.finish(Duration::from_secs(45)).await;
        println!(
            "5 % loss: final path {} / {}, {} to final path, messages ok: {}",
            report.path_a,
            report.path_b,
            secs(report.time_to_final),
            report.messages_ok
        );
        assert!(
            report.messages_ok && report.problems.is_empty(),
            "{report:?}\n{}",
            pair.dump()
        );
        // The path itself is not asserted: under loss the first direct attempt may time out,
        // and the stream then completes on the server path (as it must).
        let dropped =
            ns_run(&router, "nft", &["list", "table", "ip", "pmlab_chaos"]).unwrap_or_default();
        println!(
            "loss rule: {}",
            dropped
                .lines()
                .find(|l| l.contains("drop"))
                .unwrap_or("")
                .trim()
        );
        pair.stop().await;
        lab.shutdown().expect("clean teardown");
    });
}

/// A test that fails half-way (a panic while the lab runs processes) leaves nothing behind.
#[test]
fn nat_lab_cleans_up_after_a_failure() {
    serial(async {
        let (mut lab, server, responder) = lab_with_server().await;
        let site = lab.site(Kind::Double, 2).expect("site");
        let peer = lab
            .start_peer(&site.peers[0], SERVER_A, "cleanup", "cleanup-a", 10, 5)
            .expect("peer");
        peer.wait_line(|l| l.kind == "ready", Duration::from_secs(15))
            .await
            .expect("peer ready");
        let prefix = lab.prefix().to_string();
        let logs = lab.dir().to_path_buf();
        assert!(namespaces_with_prefix(&prefix).len() >= 6);
        // Drop everything as a panicking test would (the lab last, after its processes' handles).
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _lab = lab;
            let _procs = (server, responder, peer);
            panic!("a failing test");
        }));
        assert!(failed.is_err());
        // A failing lab keeps its logs for the person debugging; this failure was on purpose.
        let _ = std::fs::remove_dir_all(logs);
        assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
        assert_eq!(root_lab_links(), Vec::<String>::new());
    });
}

/// Ctrl-C (SIGINT) on a test process that runs a lab removes its namespaces and processes: this
/// test runs itself again as a child that builds a lab and waits, interrupts it, and checks.
#[test]
fn nat_lab_cleans_up_on_ctrl_c() {
    if std::env::var_os("PMLAB_SIGINT_CHILD").is_some() {
        // The child: build a lab with a server process and wait to be interrupted.
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let (lab, _server, _responder) = lab_with_server().await;
                println!("LAB {}", lab.prefix());
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        return;
    }
    serial(async {
        let exe = std::env::current_exe().expect("test executable");
        let mut child = tokio::process::Command::new(exe)
            .args([
                "--exact",
                "nat_lab_cleans_up_on_ctrl_c",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PMLAB_SIGINT_CHILD", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("child test");
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let prefix = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(l)) = lines.next_line().await {
                // libtest may have printed `test ... ` on the same line.
                if let Some((_, p)) = l.split_once("LAB ") {
                    return Some(p.trim().to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("the child built its lab");
        assert!(!namespaces_with_prefix(&prefix).is_empty());
        let pid = child.id().expect("child pid");
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .expect("kill -INT");
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("the child exits on Ctrl-C")
            .expect("wait");
        assert_eq!(status.code(), Some(130), "{status:?}");
        assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
        assert_eq!(root_lab_links(), Vec::<String>::new());
    });
}
