//! A userspace WAN link between two network namespaces (the kernel here has no netem): a TAP
//! device in each namespace, and frames moved between them through the emulator of
//! `peermesh_interop_tests::wan` (delay, jitter, loss, rate, queue; one [`Direction`] each way).
//!
//! ```text
//! wan_link --a-ns NS --a-if IF --b-ns NS --b-if IF [--delay-ms X] [--jitter-ms X] [--loss-pct X]
//!          [--rate-mbit X] [--queue-kib X] [--reorder 0|1] [--seed N]
//!          [--ab-<key> X ...] [--ba-<key> X ...]
//! ```
//!
//! Flags without a direction set both directions; `--ab-*` (A→B) and `--ba-*` (B→A) override
//! one. The TAPs are only created here; bringing them up and addressing them is the caller's
//! job (the lab does it with `ip`). They are not persistent: when this process exits (or is
//! killed) their fds close and the devices vanish.
//!
//! Output lines are `<ms since start> <kind> <rest>` like `nat_peer`'s: `seed ab=N ba=N`, then
//! `ready` once both TAPs exist. Commands on stdin, one per line:
//! `set ab|ba|both key=value ...` (answers `set <dir> <all parameters>` or `error ...`) and
//! `stats` (answers one `stats` line: `ab.in=… ab.lost=… … ba.… cpu_ms=…`) and `quit`. Exits on
//! `quit` or stdin EOF.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::time::Instant;

use peermesh_interop_tests::wan::{Direction, Impairment};

/// Create TAP `name` in the namespace `/run/netns/<ns>` and return its non-blocking fd.
///
/// A short-lived thread enters the namespace (setns on a thread moves only that thread) and opens
/// the TAP there; the device stays in that namespace whichever thread then uses the fd.
fn open_tap(ns: &str, name: &str) -> Result<OwnedFd, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad interface name {name:?}"));
    }
    let ns_path = format!("/run/netns/{ns}");
    let name = name.to_string();
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        let ns_file = File::open(&ns_path).map_err(|e| format!("{ns_path}: {e}"))?;
        // SAFETY: setns with a valid namespace fd; it changes only this thread's network
        // namespace, and this thread does nothing else and ends right after.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns {ns_path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // Ethernet frames (TAP), without the 4-byte packet-information header. No TUNSETPERSIST:
        // the device lives as long as this fd.
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is, on an open tun fd.
        if unsafe {
            libc::ioctl(
                tun.as_raw_fd(),
                libc::TUNSETIFF,
                &mut ifr as *mut libc::ifreq,
            )
        } != 0
        {
            return Err(format!(
                "TUNSETIFF {name} in {ns_path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(OwnedFd::from(tun))
    })
    .join()
    .map_err(|_| "the TAP thread panicked".to_string())?
}

/// `read(2)` into `buf`: `Ok(0)` at EOF, `Err(WouldBlock)` when nothing is waiting.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` of a whole frame (a TAP takes a frame in one write or not at all).
fn write_fd(fd: RawFd, frame: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
    let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// This process's CPU time (user + system) in ms.
fn cpu_ms() -> u64 {
    // SAFETY: getrusage fills the struct it is given; zeroes are a valid initial value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// Frames read from one TAP before the due frames are written again.
const READ_BATCH: usize = 64;

struct Args {
    a_ns: String,
    a_if: String,
    b_ns: String,
    b_if: String,
    ab: Impairment,
    ba: Impairment,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let (mut a_ns, mut a_if, mut b_ns, mut b_if) = (None, None, None, None);
    let (mut ab, mut ba) = (Impairment::default(), Impairment::default());
    let mut it = args.iter();
    // Both-direction flags first, then the per-direction ones, whatever their order.
    let mut overrides = Vec::new();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .clone();
        let key = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected {flag:?}"))?;
        match key {
            "a-ns" => a_ns = Some(value),
            "a-if" => a_if = Some(value),
            "b-ns" => b_ns = Some(value),
            "b-if" => b_if = Some(value),
            _ if key.starts_with("ab-") || key.starts_with("ba-") => {
                overrides.push((key.to_string(), value))
            }
            _ => {
                ab.set(key, &value)?;
                ba.set(key, &value)?;
            }
        }
    }
    for (key, value) in overrides {
        let (dir, k) = key.split_at(3);
        match dir {
            "ab-" => ab.set(k, &value)?,
            _ => ba.set(k, &value)?,
        }
    }
    let need = |v: Option<String>, f: &str| v.ok_or_else(|| format!("--{f} is required"));
    Ok(Args {
        a_ns: need(a_ns, "a-ns")?,
        a_if: need(a_if, "a-if")?,
        b_ns: need(b_ns, "b-ns")?,
        b_if: need(b_if, "b-if")?,
        ab,
        ba,
    })
}

struct Out {
    start: Instant,
}

impl Out {
    fn line(&self, kind: &str, rest: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{} {kind} {rest}", self.start.elapsed().as_millis());
        let _ = out.flush();
    }
}

/// Apply one stdin command; `Err` is printed as an `error` line.
fn command(line: &str, dirs: &mut [Direction; 2], out: &Out) -> Result<(), String> {
    let mut words = line.split_whitespace();
    match words.next() {
        None => Ok(()),
        Some("set") => {
            let which: &[usize] = match words.next() {
                Some("ab") => &[0],
                Some("ba") => &[1],
                Some("both") => &[0, 1],
                other => return Err(format!("set: want ab, ba or both, not {other:?}")),
            };
            let words: Vec<&str> = words.collect();
            for &i in which {
                // All or nothing: parse into a copy first.
                let mut imp = dirs[i].impairment().clone();
                for w in &words {
                    let (k, v) = w
                        .split_once('=')
                        .ok_or_else(|| format!("set: want key=value, not {w:?}"))?;
                    imp.set(k, v)?;
                }
                dirs[i].set_impairment(imp);
            }
            for &i in which {
                out.line(
                    "set",
                    &format!("{} {}", ["ab", "ba"][i], dirs[i].impairment()),
                );
            }
            Ok(())
        }
        Some("stats") => {
            let mut words = dirs[0].stats().words("ab.");
            words.extend(dirs[1].stats().words("ba."));
            words.push(format!("cpu_ms={}", cpu_ms()));
            out.line("stats", &words.join(" "));
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?} (set, stats)")),
    }
}

fn run(args: Args) -> Result<(), String> {
    let out = Out {
        start: Instant::now(),
    };
    // Wake-ups as close to the release times as the kernel can: 1 µs timer slack (default 50 µs).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    out.line("seed", &format!("ab={} ba={}", args.ab.seed, args.ba.seed));
    let a = open_tap(&args.a_ns, &args.a_if)?;
    let b = open_tap(&args.b_ns, &args.b_if)?;
    let fds = [a.as_raw_fd(), b.as_raw_fd()];
    out.line(
        "ready",
        &format!(
            "{}/{} {}/{} ab: {} ba: {}",
            args.a_ns, args.a_if, args.b_ns, args.b_if, args.ab, args.ba
        ),
    );
    // dirs[0] carries what A's TAP reads to B's TAP, dirs[1] the reverse.
    let mut dirs = [Direction::new(args.ab), Direction::new(args.ba)];
    // SAFETY: setting O_NONBLOCK on our own stdin.
    unsafe {
        let flags = libc::fcntl(0, libc::F_GETFL);
        libc::fcntl(0, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut stdin_buf: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // Sleep until a fd is readable or the earliest frame is due.
        let now = Instant::now();
        let deadline = dirs.iter().filter_map(Direction::next_deadline).min();
        let timeout = deadline.map(|d| {
            let wait = d.saturating_duration_since(now);
            // SAFETY: timespec is plain data; all zeroes is a valid value.
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            ts.tv_sec = wait.as_secs() as libc::time_t;
            ts.tv_nsec = wait.subsec_nanos() as libc::c_long;
            ts
        });
        let mut pfds = [fds[0], fds[1], 0].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let tp = timeout
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: three valid pollfds; `tp` is null or points to a live timespec.
        let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), 3, tp, std::ptr::null()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("ppoll: {e}"));
            }
        }

        // Take in what is waiting on both TAPs: until EAGAIN, or at most READ_BATCH frames, so a
        // flood on one side cannot hold up the frames that are due (ppoll returns at once if
        // more is waiting).
        for (i, &fd) in fds.iter().enumerate() {
            if pfds[i].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(format!("TAP {i} failed (revents {:#x})", pfds[i].revents));
            }
            if pfds[i].revents & libc::POLLIN == 0 {
                continue;
            }
            for _ in 0..READ_BATCH {
                match read_fd(fd, &mut buf) {
                    Ok(0) => break,
                    Ok(len) => {
                        let now = Instant::now();
                        dirs[i].push(now, buf[..len].to_vec());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading TAP {i}: {e}")),
                }
            }
        }

        // Hand over every frame that is due.
        let now = Instant::now();
        for (i, dir) in dirs.iter_mut().enumerate() {
            while let Some(frame) = dir.poll(now) {
                match write_fd(fds[1 - i], &frame) {
                    Ok(_) => {}
                    // A full TAP queue (or a device that is down): the frame is gone.
                    Err(_) => dir.count_write_drop(),
                }
            }
        }

        // Commands.
        if pfds[2].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            let mut chunk = [0u8; 4096];
            loop {
                match read_fd(0, &mut chunk) {
                    Ok(0) => return Ok(()),
                    Ok(len) => stdin_buf.extend_from_slice(&chunk[..len]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("stdin: {e}")),
                }
            }
            while let Some(pos) = stdin_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = stdin_buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                if line.trim() == "quit" {
                    return Ok(());
                }
                if let Err(e) = command(line.trim(), &mut dirs, &out) {
                    out.line("error", &e);
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse_args(&args).and_then(run);
    if let Err(e) = result {
        eprintln!("wan_link: {e}");
        println!("0 error {e}");
        std::process::exit(1);
    }
}
