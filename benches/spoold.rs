//! spoold's benchmark suite (issue 5): throughput at the process-spawn limit, the daemon's own CPU
//! time per job, stop latency, start-up with a million-job backlog, and a burst of new jobs.
//!
//! Run it with `cargo bench --bench spoold` (BENCHMARKS.md has the details). It drives the
//! release binary cargo builds for it, the way a user would: a spool on disk, a config file, a
//! NOTIFY_SOCKET of its own for READY=1, SIGTERM to stop. Each spoold figure is measured beside
//! a peer in the same run, the runs of the contenders alternate, and each figure is the median
//! of several runs, because the machines this runs on are shared and noisy: the targets are
//! therefore ratios where a peer exists. The table goes to stdout, a JSON summary to
//! `$CARGO_TARGET_DIR/bench/summary.json` (or `$SPOOLD_BENCH_JSON`).
//!
//! Environment: `SPOOLD_BENCH_QUICK=1` runs small counts (a smoke test of the suite itself, not
//! figures to quote); `SPOOLD_BENCH_ONLY=throughput,stop,start,burst,retry,persistent,metrics`
//! picks sections (`operator`, how soon a pause and a cancel take effect, runs only when named;
//! `SPOOLD_BENCH_OPERATOR_RUNS=N` sets its runs); `SPOOLD_BENCH_PERSISTENT_JOBS=N` sets the
//! persistent section's job count, and `SPOOLD_BENCH_INSTALL=1` lets it install its peers
//! (Sidekiq, Redis, Celery); `SPOOLD_BENCH_ROUNDS=N` sets how many alternating rounds the
//! throughput and metrics sections run; `SPOOLD_BENCH_DIR` is where the temporary spools go (it
//! must be a local filesystem). `jetstream` (a 3-node cluster: enqueue, 1-3 hosts, hand-over)
//! and `jetstream-host` (one host's jobs/s in `SPOOLD_BENCH_ROUNDS` rounds of
//! `SPOOLD_BENCH_JS_JOBS` jobs) run only when named; `exec` too. `SPOOLD_BENCH_BASE=PATH` has
//! the `exec` and `jetstream-host` sections run a second build in each round.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use inotify::{EventMask, Inotify, WatchMask};
use rustix::process::{Pid, Signal};
use serde_json::json;

mod peers;

/// The daemon under test: cargo builds it (in the bench profile, which is the release profile)
/// before it builds this program, and tells us where it put it.
const SPOOLD: &str = env!("CARGO_BIN_EXE_spoold");

/// /proc reports CPU times in USER_HZ ticks, which Linux fixes at 100 per second for userspace.
const TICKS_PER_SEC: f64 = 100.0;

/// Anything that should be over in seconds gets this long before the suite gives up on it.
const PATIENCE: Duration = Duration::from_secs(600);

/// How many jobs, runs and rounds each section uses.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    jobs: usize,
    rounds: usize,
    parallel_rounds: usize,
    stops: usize,
    drain_runs: usize,
    backlog: usize,
    backlog_rounds: usize,
    burst: usize,
    retry_backlog: usize,
    retry_rounds: usize,
    persistent_jobs: usize,
    persistent_rounds: usize,
}

impl Sizes {
    fn from_env() -> Sizes {
        let quick = std::env::var("SPOOLD_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut sizes = if quick {
            Sizes {
                jobs: 2_000,
                rounds: 3,
                parallel_rounds: 1,
                stops: 10,
                drain_runs: 3,
                backlog: 50_000,
                backlog_rounds: 2,
                burst: 10_000,
                retry_backlog: 20_000,
                retry_rounds: 2,
                persistent_jobs: 5_000,
                persistent_rounds: 1,
            }
        } else {
            Sizes {
                jobs: 20_000,
                rounds: 5,
                // GNU parallel runs about 350 jobs/s: a minute per run, so fewer of them.
                parallel_rounds: 3,
                stops: 50,
                drain_runs: 5,
                backlog: 1_000_000,
                backlog_rounds: 3,
                burst: 100_000,
                retry_backlog: 100_000,
                retry_rounds: 3,
                persistent_jobs: 100_000,
                persistent_rounds: 3,
            }
        };
        if let Some(rounds) = std::env::var("SPOOLD_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            sizes.rounds = rounds;
            sizes.parallel_rounds = sizes.parallel_rounds.min(rounds);
            sizes.persistent_rounds = rounds;
        }
        if let Some(jobs) = std::env::var("SPOOLD_BENCH_PERSISTENT_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            sizes.persistent_jobs = jobs;
        }
        sizes
    }
}

/// One line of the table and of the JSON summary.
struct Row {
    section: &'static str,
    what: String,
    spoold: f64,
    unit: &'static str,
    peer: Option<(String, f64)>,
    /// The target, as the issue states it, and whether it was met.
    target: Option<(String, bool)>,
    samples: Vec<f64>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.peer.as_ref().map(|(_, p)| self.spoold / p)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The burst section uses this program itself as the handler, to record every run of a job.
    if args.get(1).map(String::as_str) == Some("record-job") {
        record_job(&args[2], &args[3]);
        return;
    }
    // The persistent section's minimal handler is this program too.
    if args.get(1).map(String::as_str) == Some("persistent-handler") {
        peers::persistent_handler_main();
        return;
    }
    let sizes = Sizes::from_env();
    let only: Option<Vec<String>> = std::env::var("SPOOLD_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    let base = std::env::var_os("SPOOLD_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let work = tempfile::Builder::new()
        .prefix("spoold-bench-")
        .tempdir_in(&base)
        .expect("create the benchmark's work directory");
    let bench = Bench {
        work: work.path().to_owned(),
        sizes,
        seq: AtomicUsize::new(0),
        daemon: std::sync::Mutex::new(PathBuf::from(SPOOLD)),
    };

    let machine = machine();
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let load_before = load_average();
    println!("spoold benchmark suite, {started_at}");
    println!("binary: {SPOOLD}");
    println!(
        "machine: {} cpus, kernel {}, {}",
        machine.nproc, machine.kernel, machine.cpu
    );
    println!("load average at start: {load_before}");
    println!("sizes: {sizes:?}\n");

    let mut rows = Vec::new();
    if wanted("throughput") {
        rows.extend(bench.throughput());
    }
    if wanted("stop") {
        rows.extend(bench.stop_latency());
    }
    if wanted("start") {
        rows.extend(bench.start_and_backlog());
    }
    if wanted("burst") {
        rows.extend(bench.burst());
    }
    if wanted("retry") {
        rows.extend(bench.retry_backlog());
    }
    if wanted("metrics") {
        rows.extend(bench.metrics_overhead());
    }
    if wanted("persistent") {
        rows.extend(bench.persistent());
    }
    // Not in the default run: asked for by name (SPOOLD_BENCH_ONLY=exec), a quicker way to
    // compare exec mode with its floor than the whole persistent section.
    if only.as_ref().is_some_and(|o| o.iter().any(|s| s == "exec")) {
        rows.extend(bench.exec_against_floor());
    }
    // Not in the default run: asked for by name (SPOOLD_BENCH_ONLY=operator).
    if only
        .as_ref()
        .is_some_and(|o| o.iter().any(|s| s == "operator"))
    {
        rows.extend(bench.operator());
    }
    // Only when asked for by name: it needs a nats-server and boots a 3-node cluster.
    if only
        .as_ref()
        .is_some_and(|o| o.iter().any(|s| s == "jetstream"))
    {
        rows.extend(bench.jetstream());
    }
    // Only when asked for by name, like the jetstream section.
    if only
        .as_ref()
        .is_some_and(|o| o.iter().any(|s| s == "jetstream-host"))
    {
        rows.extend(bench.jetstream_host());
    }
    let load_after = load_average();

    println!();
    print_table(&rows);
    println!("\nload average at start: {load_before}; at end: {load_after}");

    let summary = json!({
        "started_at": started_at,
        "finished_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "quick": sizes.jobs < 20_000,
        "binary": SPOOLD,
        "machine": {
            "nproc": machine.nproc,
            "kernel": machine.kernel,
            "cpu": machine.cpu,
        },
        "load_average": { "start": load_before, "end": load_after },
        "sizes": {
            "jobs": sizes.jobs,
            "rounds": sizes.rounds,
            "parallel_rounds": sizes.parallel_rounds,
            "stops": sizes.stops,
            "drain_runs": sizes.drain_runs,
            "backlog": sizes.backlog,
            "backlog_rounds": sizes.backlog_rounds,
            "burst": sizes.burst,
            "retry_backlog": sizes.retry_backlog,
            "persistent_jobs": sizes.persistent_jobs,
        },
        "rows": rows.iter().map(|r| json!({
            "section": r.section,
            "what": r.what,
            "spoold": r.spoold,
            "unit": r.unit,
            "peer": r.peer.as_ref().map(|(name, _)| name),
            "peer_value": r.peer.as_ref().map(|(_, v)| v),
            "ratio": r.ratio(),
            "target": r.target.as_ref().map(|(t, _)| t),
            "met": r.target.as_ref().map(|(_, m)| m),
            "samples": r.samples,
        })).collect::<Vec<_>>(),
    });
    let out = std::env::var_os("SPOOLD_BENCH_JSON").map_or_else(
        || target_dir().join("bench").join("summary.json"),
        PathBuf::from,
    );
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).expect("create the summary's directory");
    }
    fs::write(
        &out,
        serde_json::to_string_pretty(&summary).expect("serialize"),
    )
    .expect("write the summary");
    println!("summary: {}", out.display());
    println!("(removing the temporary spools)");
}

/// The handler of the burst section: appends the job's name to the record, one line per run.
/// O_APPEND makes each short write land whole, whichever worker writes it.
fn record_job(record: &str, id: &str) {
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(record)
        .expect("open the record");
    file.write_all(format!("{id}\n").as_bytes())
        .expect("write the record");
}

/// The cargo target directory the binary lives in (`<target>/release/spoold`).
fn target_dir() -> PathBuf {
    Path::new(SPOOLD)
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target"), Path::to_owned)
}

struct Machine {
    nproc: usize,
    kernel: String,
    cpu: String,
}

fn machine() -> Machine {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
        cpu,
    }
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<11} {:<58} {:>10} {:<7} {:<32} {:>10} {:>7}  {:<18} met",
        "section", "measurement", "spoold", "unit", "peer", "peer value", "ratio", "target"
    );
    for r in rows {
        let (peer, peer_value) = match &r.peer {
            Some((name, v)) => (name.as_str(), format!("{v:.1}")),
            None => ("-", "-".into()),
        };
        let ratio = r.ratio().map_or("-".into(), |x| format!("{x:.2}"));
        let (target, met) = match &r.target {
            Some((t, m)) => (t.as_str(), if *m { "yes" } else { "NO" }),
            None => ("-", "-"),
        };
        println!(
            "{:<11} {:<58} {:>10.1} {:<7} {:<32} {:>10} {:>7}  {:<18} {met}",
            r.section, r.what, r.spoold, r.unit, peer, peer_value, ratio, target
        );
    }
}

/// A spool directory laid out the way spoold creates it, with a config file beside it.
struct SpoolDir {
    root: PathBuf,
    config: PathBuf,
}

impl SpoolDir {
    fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// The config: `workers` workers running `command`, and `extra` TOML after `[handler]`.
    fn configure(&self, workers: usize, command: &[&str], extra: &str) {
        let argv: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
        let text = format!(
            "[spool]\ndir = {:?}\n\n[workers]\ncount = {workers}\n\n[handler]\ncommand = [{}]\n{extra}\n",
            self.root.display().to_string(),
            argv.join(", ")
        );
        fs::write(&self.config, text).expect("write the config");
    }

    fn count(&self, sub: &str) -> usize {
        count_entries(&self.dir(sub))
    }
}

fn count_entries(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |rd| {
        rd.filter_map(Result::ok)
            .filter(|e| e.file_name().as_encoded_bytes().first() != Some(&b'.'))
            .count()
    })
}

/// Creates `n` empty job files in `dir`, from two threads (a million of them take a while).
fn make_jobs(dir: &Path, prefix: &str, n: usize) {
    thread::scope(|s| {
        for part in 0..2 {
            s.spawn(move || {
                for i in (part..n).step_by(2) {
                    File::create(dir.join(format!("{prefix}{i:07}"))).expect("create a job file");
                }
            });
        }
    });
}

/// A running `spoold run`.
struct Daemon {
    child: Child,
    exec_at: Instant,
    /// When READY=1 arrived, from the thread that reads the notify socket.
    ready: mpsc::Receiver<Instant>,
    /// When each WATCHDOG=1 arrived.
    pings: Arc<std::sync::Mutex<Vec<Instant>>>,
    /// Tells that thread to end.
    gone: Arc<AtomicBool>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads every datagram the daemon sends, as systemd would. Unread datagrams would fill the
/// socket's queue (net.unix.max_dgram_qlen, 10 by default) and block the daemon's next send.
fn read_notifications(
    notify: UnixDatagram,
    ready: mpsc::Sender<Instant>,
    pings: Arc<std::sync::Mutex<Vec<Instant>>>,
    gone: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 4096];
    while !gone.load(Ordering::Relaxed) {
        match notify.recv(&mut buf) {
            Ok(n) => {
                let at = Instant::now();
                if buf[..n].windows(7).any(|w| w == b"READY=1") {
                    let _ = ready.send(at);
                }
                if buf[..n].windows(10).any(|w| w == b"WATCHDOG=1") {
                    pings.lock().expect("pings").push(at);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

impl Daemon {
    fn pid(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// Waits for READY=1; returns the time from exec to its arrival.
    fn wait_ready(&self) -> Duration {
        let at = self
            .ready
            .recv_timeout(Duration::from_secs(60))
            .expect("spoold sent no READY=1 in 60 s");
        at - self.exec_at
    }

    /// The daemon's own CPU time so far (user + system of all its threads, not its children).
    fn cpu(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        // Fields after the command name, which is in parentheses and may hold spaces: state is
        // field 3, utime field 14 and stime field 15.
        let rest = stat.rsplit_once(')').expect("a stat line").1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_secs_f64(ticks as f64 / TICKS_PER_SEC)
    }

    /// Peak resident set size (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib / 1024.0
    }

    /// SIGTERM, then waits for the exit; returns the time between the two and the status.
    fn stop(mut self) -> (Duration, ExitStatus) {
        terminate_and_wait(&mut self.child)
    }

    /// The wait for the exit after a SIGTERM sent elsewhere.
    fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().expect("wait")
    }
}

/// GETs `/metrics` on loopback `port` every second until `done`; returns how many scrapes got
/// an answer (the first ones may come before the daemon listens).
fn scrape_every_second(port: u16, done: &AtomicBool) -> usize {
    use std::net::TcpStream;
    let mut answered = 0;
    while !done.load(Ordering::Relaxed) {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut body = String::new();
            if stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .and_then(|()| stream.read_to_string(&mut body))
                .is_ok()
                && body.contains("spoold_jobs_finished_total")
            {
                answered += 1;
            }
        }
        thread::sleep(Duration::from_secs(1));
    }
    answered
}

/// Sends SIGTERM and waits for the exit; returns the time between the two.
fn terminate_and_wait(child: &mut Child) -> (Duration, ExitStatus) {
    let sent = Instant::now();
    rustix::process::kill_process(Pid::from_child(child), Signal::TERM).expect("kill");
    let status = child.wait().expect("wait");
    (sent.elapsed(), status)
}

/// Counts job files arriving in a directory (by rename, as spoold moves them) with inotify, and
/// tells when the `target`-th arrived. It reads the non-blocking inotify descriptor every 5 ms:
/// the kernel queues the events meanwhile, the error of the end time stays under 0.1 % of a
/// run, and the watcher does not take CPU from the daemon it measures (polling every half
/// millisecond cost spoold about 15 % of its throughput on 2 cores).
struct Arrivals {
    handle: thread::JoinHandle<Option<Instant>>,
}

/// How often [`Arrivals`] reads its inotify queue.
const POLL: Duration = Duration::from_millis(5);

impl Arrivals {
    fn watch(dir: &Path, target: usize) -> Arrivals {
        let mut inotify = Inotify::init().expect("inotify");
        inotify
            .watches()
            .add(dir, WatchMask::MOVED_TO | WatchMask::CREATE)
            .expect("watch");
        let dir = dir.to_owned();
        let already = count_entries(&dir);
        let handle = thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut count = already;
            let mut overflowed = false;
            let mut last_count_at = Instant::now();
            let give_up = Instant::now() + PATIENCE;
            loop {
                if count >= target {
                    return Some(Instant::now());
                }
                match inotify.read_events(&mut buf) {
                    Ok(events) => {
                        for e in events {
                            if e.mask.contains(EventMask::Q_OVERFLOW) {
                                overflowed = true;
                            } else if e
                                .name
                                .is_some_and(|n| n.as_encoded_bytes().first() != Some(&b'.'))
                            {
                                count += 1;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(POLL);
                    }
                    Err(e) => panic!("inotify: {e}"),
                }
                // A lost event would leave the count short for ever: count the directory then,
                // at most every 50 ms since that is a long read.
                if overflowed && last_count_at.elapsed() > Duration::from_millis(50) {
                    count = count_entries(&dir);
                    last_count_at = Instant::now();
                }
                if Instant::now() > give_up {
                    return None;
                }
            }
        });
        Arrivals { handle }
    }

    fn wait(self) -> Option<Instant> {
        self.handle.join().expect("arrivals thread")
    }
}

struct Bench {
    work: PathBuf,
    sizes: Sizes,
    seq: AtomicUsize,
    /// The daemon `start` runs: this build's, unless a section compares another build.
    daemon: std::sync::Mutex<PathBuf>,
}

impl Bench {
    /// A fresh, empty spool (with every subdirectory, so that `done/` can be watched at once).
    fn spool(&self, label: &str) -> SpoolDir {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let root = self.work.join(format!("{label}-{n}"));
        for sub in [
            "tmp", "new", "active", "retry", "done", "failed", "state", "reasons",
        ] {
            fs::create_dir_all(root.join(sub)).expect("create the spool");
        }
        SpoolDir {
            config: root.with_extension("toml"),
            root,
        }
    }

    /// Starts `spoold run` on `spool`, logging to a file beside it.
    fn start(&self, spool: &SpoolDir) -> Daemon {
        self.start_with(spool, &[])
    }

    /// [`Bench::start`] with extra environment variables (a watchdog interval, say).
    fn start_with(&self, spool: &SpoolDir, env: &[(&str, &str)]) -> Daemon {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let sock_path = self.work.join(format!("notify-{n}.sock"));
        let notify = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("socket timeout");
        let log = File::create(spool.root.with_extension("log")).expect("create the log");
        let mut cmd = Command::new(&*self.daemon.lock().expect("the daemon's path"));
        cmd.arg("run")
            .arg("--config")
            .arg(&spool.config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (ready_tx, ready) = mpsc::channel();
        let gone = Arc::new(AtomicBool::new(false));
        let pings = Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let gone = gone.clone();
            let pings = pings.clone();
            thread::spawn(move || read_notifications(notify, ready_tx, pings, gone));
        }
        let exec_at = Instant::now();
        let child = cmd.spawn().expect("spawn spoold");
        Daemon {
            child,
            exec_at,
            ready,
            pings,
            gone,
        }
    }

    fn remove(&self, spool: SpoolDir) {
        let _ = fs::remove_dir_all(&spool.root);
    }

    // ---- 1 and 2: throughput and overhead ------------------------------------------------

    fn throughput(&self) -> Vec<Row> {
        let n = self.sizes.jobs;
        let have_parallel = Command::new("parallel")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have_parallel {
            println!("GNU parallel is not installed (apt-get install -y parallel): (d) skipped");
        }
        let mut spoold = Vec::new();
        let mut spoold_cpu = Vec::new();
        let mut spawner = Vec::new();
        let mut spawner_cpu = Vec::new();
        let mut renames_cpu = Vec::new();
        let mut xargs_true = Vec::new();
        let mut xargs_mv = Vec::new();
        let mut parallel = Vec::new();
        println!("== throughput: {n} jobs, handler /bin/true, 2 workers");
        for round in 0..self.sizes.rounds {
            let (rate, cpu) = self.spoold_throughput(n);
            println!(
                "  round {round}: spoold {rate:.0} jobs/s, {:.1} us CPU/job",
                cpu * 1e6
            );
            spoold.push(rate);
            spoold_cpu.push(cpu * 1e6);

            let (rate, cpu) = minimal_spawner(n);
            println!(
                "  round {round}: spawner {rate:.0} jobs/s, {:.1} us CPU/job",
                cpu * 1e6
            );
            spawner.push(rate);
            spawner_cpu.push(cpu * 1e6);

            let cpu = self.rename_floor(n);
            println!(
                "  round {round}: claim + completion renames alone {:.1} us CPU/job",
                cpu * 1e6
            );
            renames_cpu.push(cpu * 1e6);

            let rate = self.shell_throughput(
                n,
                "find new -type f -print0 | xargs -0 -P2 -n1 /bin/true",
                false,
            );
            println!("  round {round}: xargs /bin/true {rate:.0} jobs/s");
            xargs_true.push(rate);

            let rate = self.shell_throughput(
                n,
                "find new -type f -print0 | xargs -0 -P2 -n1 sh -c 'mv \"$1\" done/' sh",
                true,
            );
            println!("  round {round}: xargs mv {rate:.0} jobs/s");
            xargs_mv.push(rate);

            if have_parallel && round < self.sizes.parallel_rounds {
                let rate = self.shell_throughput(
                    n,
                    "find new -type f -print0 | parallel --will-cite -0 -j2 mv {} done/",
                    true,
                );
                println!("  round {round}: parallel mv {rate:.0} jobs/s");
                parallel.push(rate);
            }
        }
        let s = median(&spoold);
        let mut rows = vec![];
        let mut versus = |peer: &str, samples: &[f64], min_ratio: f64| {
            let p = median(samples);
            rows.push(Row {
                section: "throughput",
                what: format!("{n} jobs, /bin/true, 2 workers"),
                spoold: s,
                unit: "jobs/s",
                peer: Some((peer.to_owned(), p)),
                target: Some((format!("ratio >= {min_ratio}"), s / p >= min_ratio)),
                samples: spoold.clone(),
            });
        };
        versus("(a) minimal spawner, 2 threads", &spawner, 0.85);
        versus("(b) xargs -P2 /bin/true", &xargs_true, 1.3);
        versus("(c) xargs -P2 sh -c mv", &xargs_mv, 2.5);
        if !parallel.is_empty() {
            // The issue sets no ratio against GNU parallel; it is there for scale.
            let p = median(&parallel);
            rows.push(Row {
                section: "throughput",
                what: format!("{n} jobs, /bin/true, 2 workers"),
                spoold: s,
                unit: "jobs/s",
                peer: Some(("(d) parallel -j2 mv".to_owned(), p)),
                target: None,
                samples: parallel.clone(),
            });
        }
        let cpu = median(&spoold_cpu);
        rows.push(Row {
            section: "overhead",
            what: "spoold CPU (user+sys, not children) per job".into(),
            spoold: cpu,
            unit: "us",
            peer: Some(("minimal spawner CPU per job".into(), median(&spawner_cpu))),
            target: Some(("<= 50 us".into(), cpu <= 50.0)),
            samples: spoold_cpu,
        });
        // What no process-per-job design with a claim and a completion rename can go below on
        // this machine: the spawner's CPU per spawn plus the two renames' CPU, each measured in
        // this run. When the floor alone is above the target, no change to spoold meets it.
        let floor = median(&spawner_cpu) + median(&renames_cpu);
        rows.push(Row {
            section: "overhead",
            what: "floor: spawner CPU + 2 renames per job".into(),
            spoold: cpu,
            unit: "us",
            peer: Some(("spawn + 2 renames, measured alone".into(), floor)),
            target: None,
            samples: renames_cpu,
        });
        rows
    }

    // ---- persistent handlers (issue 16) ------------------------------------------------

    /// spoold in persistent mode (the benchmark's minimal handler, and the documented Python
    /// example) against exec mode with `/bin/true`, Sidekiq and Celery, and the floors, in
    /// alternating rounds; 2 workers everywhere.
    fn persistent(&self) -> Vec<Row> {
        let n = self.sizes.persistent_jobs;
        let me = std::env::current_exe().expect("this benchmark's path");
        let me = me.display().to_string();
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/example-persistent-handler.py")
            .display()
            .to_string();
        let python_child = self.work.join("child.py");
        fs::write(&python_child, peers::PYTHON_CHILD).expect("write the Python child");
        let python_child = python_child.display().to_string();
        let persistent = "mode = \"persistent\"\n";
        type Samples = Vec<f64>;
        let (mut minimal, mut minimal_cpu, mut python, mut python_cpu): (
            Samples,
            Samples,
            Samples,
            Samples,
        ) = Default::default();
        let (mut exec, mut exec_cpu, mut sidekiq, mut celery): (
            Samples,
            Samples,
            Samples,
            Samples,
        ) = Default::default();
        let (mut floor_json, mut floor_py, mut floor_renames, mut floor_spawn): (
            Samples,
            Samples,
            Samples,
            Samples,
        ) = Default::default();
        let mut floor_spawn_cpu = Vec::new();
        println!("== persistent handlers: {n} no-op jobs, 2 workers");
        for round in 0..self.sizes.persistent_rounds {
            let spoold = |label: &str, command: &[&str], extra: &str| {
                let (rate, cpu) = self.jobs_through(label, command, extra, n);
                println!("  round {round}: spoold {label} {rate:.0} jobs/s, {cpu:.1} us CPU/job");
                (rate, cpu)
            };
            let (r, c) = spoold(
                "persistent-minimal",
                &[&me, "persistent-handler"],
                persistent,
            );
            minimal.push(r);
            minimal_cpu.push(c);
            let (r, c) = spoold("persistent-python", &["python3", &example], persistent);
            python.push(r);
            python_cpu.push(c);
            let (r, c) = spoold("exec-true", &["/bin/true"], "");
            exec.push(r);
            exec_cpu.push(c);

            let floor = |label: &str, run: &dyn Fn(&Path) -> f64| {
                let spool = self.spool(label);
                make_jobs(&spool.dir("new"), "job", n);
                let rate = run(&spool.root);
                self.remove(spool);
                println!("  round {round}: floor {label} {rate:.0} jobs/s");
                rate
            };
            floor_json.push(floor("renames+json-rust-child", &|root| {
                peers::json_floor(root, &[me.clone(), "persistent-handler".into()]).0
            }));
            floor_py.push(floor("renames+json-python-child", &|root| {
                peers::json_floor(root, &["python3".into(), python_child.clone()]).0
            }));
            floor_renames.push(floor("renames", &|root| peers::renames_floor(root)));
            let spawn_cpu = std::cell::Cell::new(0.0);
            floor_spawn.push(floor("renames+posix_spawn", &|root| {
                let (rate, cpu) = peers::posix_spawn_floor(root);
                spawn_cpu.set(cpu * 1e6);
                rate
            }));
            floor_spawn_cpu.push(spawn_cpu.get());

            if let Some(rate) = peers::sidekiq(&self.work.join(format!("sidekiq-{round}")), n) {
                println!("  round {round}: Sidekiq 2x5 {rate:.0} jobs/s");
                sidekiq.push(rate);
            }
            if let Some(rate) =
                peers::celery(&self.work.join(format!("celery-{round}")), &target_dir(), n)
            {
                println!("  round {round}: Celery prefork -c2 {rate:.0} jobs/s");
                celery.push(rate);
            }
        }
        let what = format!("{n} no-op jobs, 2 workers");
        let row = |spoold: &Samples, peer: &str, samples: &Samples, target: Option<f64>| {
            let (s, p) = (median(spoold), median(samples));
            Row {
                section: "persistent",
                what: what.clone(),
                spoold: s,
                unit: "jobs/s",
                peer: Some((peer.to_owned(), p)),
                target: target.map(|t| (format!("ratio >= {t}"), s / p >= t)),
                samples: spoold.clone(),
            }
        };
        let mut rows = vec![
            row(&minimal, "spoold exec /bin/true", &exec, Some(10.0)),
            row(
                &minimal,
                "floor: renames + JSON round trip (Rust child)",
                &floor_json,
                Some(0.5),
            ),
            row(
                &python,
                "floor: renames + JSON round trip (Python child)",
                &floor_py,
                Some(0.5),
            ),
            row(&minimal, "floor: the renames alone", &floor_renames, None),
            row(
                &exec,
                "floor: renames + posix_spawn /bin/true",
                &floor_spawn,
                Some(0.9),
            ),
        ];
        if !sidekiq.is_empty() {
            rows.push(row(
                &minimal,
                "Sidekiq 6, 2 processes x 5 threads",
                &sidekiq,
                Some(1.0),
            ));
        }
        if !celery.is_empty() {
            rows.push(row(
                &minimal,
                "Celery, prefork -c2, acks_late",
                &celery,
                Some(3.0),
            ));
        }
        rows.push(Row {
            section: "persistent",
            what: "spoold CPU per job, persistent (minimal handler)".into(),
            spoold: median(&minimal_cpu),
            unit: "us",
            peer: Some(("the same in exec mode".into(), median(&exec_cpu))),
            target: None,
            samples: minimal_cpu,
        });
        rows.push(cpu_against_floor("persistent", &exec_cpu, &floor_spawn_cpu));
        rows.push(Row {
            section: "persistent",
            what: "spoold CPU per job, persistent (Python example)".into(),
            spoold: median(&python_cpu),
            unit: "us",
            peer: None,
            target: None,
            samples: python_cpu,
        });
        rows
    }

    /// `n` no-op jobs through spoold with 2 workers running `command` (`extra` added to the
    /// handler's table) on a fresh spool: jobs per second and spoold's CPU per job in us.
    fn jobs_through(&self, label: &str, command: &[&str], extra: &str, n: usize) -> (f64, f64) {
        let spool = self.spool(label);
        spool.configure(2, command, extra);
        make_jobs(&spool.dir("new"), "job", n);
        let (rate, cpu, _, _) = self.run_until_done(&spool, n);
        self.remove(spool);
        (rate, cpu * 1e6)
    }

    /// Exec mode with `/bin/true` against the `posix_spawn` floor alone, alternating, with the
    /// persistent section's job count and rounds: the same two figures as there, without the
    /// peers and persistent runs around them. With `SPOOLD_BENCH_BASE=PATH`, each round also
    /// runs that build of spoold, to compare two builds in the same conditions.
    fn exec_against_floor(&self) -> Vec<Row> {
        let n = self.sizes.persistent_jobs;
        let (mut exec, mut exec_cpu, mut floor, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut floor_cpu = Vec::new();
        let base = std::env::var_os("SPOOLD_BENCH_BASE").map(PathBuf::from);
        let (mut base_rates, mut base_cpu) = (Vec::new(), Vec::new());
        println!("== exec mode against the posix_spawn floor: {n} no-op jobs, 2 workers");
        for round in 0..self.sizes.persistent_rounds {
            if let Some(base) = &base {
                *self.daemon.lock().expect("the daemon's path") = base.clone();
                let (rate, cpu) = self.jobs_through("exec-true-base", &["/bin/true"], "", n);
                *self.daemon.lock().expect("the daemon's path") = PathBuf::from(SPOOLD);
                println!("  round {round}: base build {rate:.0} jobs/s ({cpu:.1} us CPU/job)");
                base_rates.push(rate);
                base_cpu.push(cpu);
            }
            let (rate, cpu) = self.jobs_through("exec-true", &["/bin/true"], "", n);
            let spool = self.spool("renames+posix_spawn");
            make_jobs(&spool.dir("new"), "job", n);
            let (floor_rate, floor_per_job) = peers::posix_spawn_floor(&spool.root);
            self.remove(spool);
            println!(
                "  round {round}: spoold exec {rate:.0} jobs/s ({cpu:.1} us CPU/job), floor \
                 {floor_rate:.0} jobs/s ({:.1} us CPU/job), ratio {:.3}",
                floor_per_job * 1e6,
                rate / floor_rate
            );
            exec.push(rate);
            exec_cpu.push(cpu);
            floor.push(floor_rate);
            floor_cpu.push(floor_per_job * 1e6);
            ratios.push(rate / floor_rate);
        }
        println!(
            "  round ratios: {ratios:.3?}; spoold CPU per job, median {:.1} us",
            median(&exec_cpu)
        );
        if base.is_some() {
            println!(
                "  base build: median {:.0} jobs/s ({:.3} of the floor), CPU per job median \
                 {:.1} us",
                median(&base_rates),
                median(&base_rates) / median(&floor),
                median(&base_cpu)
            );
        }
        vec![
            Row {
                section: "exec",
                what: format!("{n} no-op jobs, 2 workers"),
                spoold: median(&exec),
                unit: "jobs/s",
                peer: Some((
                    "floor: renames + posix_spawn /bin/true".into(),
                    median(&floor),
                )),
                target: Some(("ratio >= 0.9".into(), median(&exec) / median(&floor) >= 0.9)),
                samples: exec,
            },
            cpu_against_floor("exec", &exec_cpu, &floor_cpu),
        ]
    }

    /// The filesystem's share of the floor: `n` empty files renamed `new/` to `active/` to
    /// `done/` with `renameat2(RENAME_NOREPLACE)`, the system call and directories spoold uses
    /// for its claim and completion, from one thread. Returns this process's CPU seconds per
    /// job.
    fn rename_floor(&self, n: usize) -> f64 {
        use rustix::fs::{Mode, OFlags, RenameFlags, open, renameat_with};
        let spool = self.spool("tp-renames");
        make_jobs(&spool.dir("new"), "job", n);
        let dir = |sub: &str| {
            open(
                spool.dir(sub),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .expect("open a spool directory")
        };
        let (new, active, done) = (dir("new"), dir("active"), dir("done"));
        let names: Vec<_> = fs::read_dir(spool.dir("new"))
            .expect("list new/")
            .map(|e| e.expect("a directory entry").file_name())
            .collect();
        let before = own_cpu();
        for name in &names {
            let name = name.as_os_str();
            renameat_with(&new, name, &active, name, RenameFlags::NOREPLACE).expect("claim");
            renameat_with(&active, name, &done, name, RenameFlags::NOREPLACE).expect("complete");
        }
        let cpu = own_cpu() - before;
        self.remove(spool);
        cpu / n as f64
    }

    /// One spoold run: `n` jobs waiting in `new/` at exec; the clock runs from exec to the
    /// arrival of the last job in `done/`. Returns jobs/s and the daemon's CPU seconds per job.
    /// Throughput with the metrics endpoint off and on, in alternating runs: on, it listens on
    /// loopback and a scraper reads `/metrics` every second (Prometheus's default is every 15 s,
    /// so this is the harsher case). The counters themselves are always kept; what is compared
    /// is the endpoint and its scrapes.
    fn metrics_overhead(&self) -> Vec<Row> {
        let n = self.sizes.jobs;
        let (mut off, mut on) = (Vec::new(), Vec::new());
        println!(
            "== metrics: {n} jobs, /bin/true, 2 workers, metrics off vs on (scraped every second)"
        );
        for round in 0..self.sizes.rounds {
            let spool = self.spool("metrics-off");
            spool.configure(2, &["/bin/true"], "");
            make_jobs(&spool.dir("new"), "job", n);
            let (rate, _, _, _) = self.run_until_done(&spool, n);
            self.remove(spool);
            println!("  round {round}: metrics off {rate:.0} jobs/s");
            off.push(rate);

            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let spool = self.spool("metrics-on");
            spool.configure(
                2,
                &["/bin/true"],
                &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            );
            make_jobs(&spool.dir("new"), "job", n);
            let done = Arc::new(AtomicBool::new(false));
            let scraper = {
                let done = done.clone();
                thread::spawn(move || scrape_every_second(port, &done))
            };
            let (rate, _, _, _) = self.run_until_done(&spool, n);
            done.store(true, Ordering::Relaxed);
            let scrapes = scraper.join().expect("the scraper");
            self.remove(spool);
            println!("  round {round}: metrics on {rate:.0} jobs/s ({scrapes} scrapes)");
            on.push(rate);
        }
        let (on_median, off_median) = (median(&on), median(&off));
        vec![Row {
            section: "metrics",
            what: format!("{n} jobs, /bin/true, 2 workers, scraped every 1 s"),
            spoold: on_median,
            unit: "jobs/s",
            peer: Some(("spoold, metrics off".into(), off_median)),
            target: Some(("ratio >= 0.97".into(), on_median / off_median >= 0.97)),
            samples: on,
        }]
    }

    fn spoold_throughput(&self, n: usize) -> (f64, f64) {
        let spool = self.spool("tp-spoold");
        spool.configure(2, &["/bin/true"], "");
        make_jobs(&spool.dir("new"), "job", n);
        let (rate, cpu, _, _) = self.run_until_done(&spool, n);
        self.remove(spool);
        (rate, cpu)
    }

    /// Starts spoold on a prepared spool and waits until `n` jobs are in `done/`. Returns the
    /// rate (from exec), the CPU seconds per job, the time to READY and the peak RSS in MiB.
    fn run_until_done(&self, spool: &SpoolDir, n: usize) -> (f64, f64, Duration, f64) {
        let arrivals = Arrivals::watch(&spool.dir("done"), n);
        let daemon = self.start(spool);
        let ready = daemon.wait_ready();
        let Some(done_at) = arrivals.wait() else {
            panic!(
                "spoold did not finish {n} jobs in {PATIENCE:?}; see {}",
                spool.root.with_extension("log").display()
            );
        };
        let took = done_at - daemon.exec_at;
        let cpu = daemon.cpu();
        let rss = daemon.peak_rss_mib();
        let (_, status) = daemon.stop();
        assert!(status.success(), "spoold exited with {status}");
        (
            n as f64 / took.as_secs_f64(),
            cpu.as_secs_f64() / n as f64,
            ready,
            rss,
        )
    }

    /// A shell pipeline run in a spool root whose `new/` holds `n` jobs; returns jobs/s. With
    /// `moves`, checks that every job ended in `done/`.
    fn shell_throughput(&self, n: usize, pipeline: &str, moves: bool) -> f64 {
        let spool = self.spool("tp-shell");
        make_jobs(&spool.dir("new"), "job", n);
        let started = Instant::now();
        let status = Command::new("sh")
            .arg("-c")
            .arg(pipeline)
            .current_dir(&spool.root)
            .stdin(Stdio::null())
            .status()
            .expect("run the pipeline");
        let took = started.elapsed();
        assert!(status.success(), "{pipeline}: {status}");
        if moves {
            assert_eq!(spool.count("done"), n, "{pipeline} left jobs behind");
        }
        self.remove(spool);
        n as f64 / took.as_secs_f64()
    }

    // ---- 3: stop latency, and 4a: exec to READY with an empty spool -------------------

    fn stop_latency(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let stops = self.sizes.stops;
        println!(
            "== stop latency: {stops} idle stops, alternating with `sleep` killed the same way"
        );
        let spool = self.spool("stop-idle");
        spool.configure(2, &["/bin/true"], "");
        let mut idle = Vec::new();
        let mut ready = Vec::new();
        let mut floor = Vec::new();
        let mut exec_floor = Vec::new();
        for _ in 0..stops {
            let daemon = self.start(&spool);
            ready.push(ms(daemon.wait_ready()));
            // Let the start-up settle, so that the stop is measured on an idle daemon.
            thread::sleep(Duration::from_millis(20));
            let (took, status) = daemon.stop();
            assert!(status.success(), "spoold exited with {status}");
            idle.push(ms(took));

            // The floor of this measurement: a process whose default action for SIGTERM is to die.
            let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
            thread::sleep(Duration::from_millis(20));
            floor.push(ms(terminate_and_wait(&mut sleeper).0));

            // The floor of exec-to-READY: starting a process that does nothing.
            let at = Instant::now();
            Command::new("/bin/true").status().expect("/bin/true");
            exec_floor.push(ms(at.elapsed()));
        }
        self.remove(spool);
        let m = median(&idle);
        println!(
            "  idle stop: median {m:.2} ms (sleep: {:.2} ms)",
            median(&floor)
        );
        rows.push(Row {
            section: "stop",
            what: format!("SIGTERM to exit, idle (median of {stops})"),
            spoold: m,
            unit: "ms",
            peer: Some(("`sleep` killed by SIGTERM".into(), median(&floor))),
            target: Some(("<= 20 ms".into(), m <= 20.0)),
            samples: idle,
        });
        let r = median(&ready);
        rows.push(Row {
            section: "start",
            what: format!("exec to READY=1, empty spool (median of {stops})"),
            spoold: r,
            unit: "ms",
            peer: Some(("exec to exit of /bin/true".into(), median(&exec_floor))),
            target: Some(("<= 50 ms".into(), r <= 50.0)),
            samples: ready,
        });

        // Jobs in flight that end before the deadline: the exit should follow the last of them.
        let runs = self.sizes.drain_runs;
        let mut after_last = Vec::new();
        for _ in 0..runs {
            let spool = self.spool("stop-drain");
            let ends = spool.root.with_extension("ends");
            fs::create_dir_all(&ends).expect("create the ends directory");
            let end_file = format!("{}/{{id}}", ends.display());
            spool.configure(
                2,
                &[
                    "/bin/sh",
                    "-c",
                    "sleep 0.3; date +%s%N > \"$1\"",
                    "sh",
                    &end_file,
                ],
                "",
            );
            make_jobs(&spool.dir("new"), "job", 2);
            let mut daemon = self.start(&spool);
            daemon.wait_ready();
            wait_until(Duration::from_secs(10), || spool.count("active") == 2)
                .expect("two jobs in flight");
            rustix::process::kill_process(daemon.pid(), Signal::TERM).expect("kill");
            let status = daemon.wait_exit();
            let exited = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_nanos();
            assert!(status.success(), "spoold exited with {status}");
            assert_eq!(
                spool.count("done"),
                2,
                "the jobs in flight were not drained"
            );
            let last_end: u128 = fs::read_dir(&ends)
                .expect("read ends")
                .map(|e| {
                    fs::read_to_string(e.expect("entry").path())
                        .expect("read an end stamp")
                        .trim()
                        .parse::<u128>()
                        .expect("an end stamp")
                })
                .max()
                .expect("two end stamps");
            after_last.push(exited.saturating_sub(last_end) as f64 / 1e6);
            let _ = fs::remove_dir_all(&ends);
            self.remove(spool);
        }
        let m = median(&after_last);
        println!("  drain stop: exit {m:.2} ms after the last job ended");
        rows.push(Row {
            section: "stop",
            what: format!("exit after the last in-flight job ended (median of {runs})"),
            spoold: m,
            unit: "ms",
            peer: None,
            target: Some(("<= 50 ms".into(), m <= 50.0)),
            samples: after_last,
        });

        // Jobs that ignore SIGTERM: the stop aborts at drain_timeout and kills at kill_grace.
        let drain = Duration::from_millis(200);
        let grace = Duration::from_millis(200);
        let mut over = Vec::new();
        for _ in 0..runs {
            let spool = self.spool("stop-abort");
            // `trap '' TERM` makes the shell ignore SIGTERM, and `sleep` inherits that.
            spool.configure(
                2,
                &["/bin/sh", "-c", "trap '' TERM; sleep 30"],
                &format!(
                    "kill_grace = \"{}ms\"\n\n[shutdown]\ndrain_timeout = \"{}ms\"\n",
                    grace.as_millis(),
                    drain.as_millis()
                ),
            );
            make_jobs(&spool.dir("new"), "job", 2);
            let daemon = self.start(&spool);
            daemon.wait_ready();
            wait_until(Duration::from_secs(10), || spool.count("active") == 2)
                .expect("two jobs in flight");
            let (took, status) = daemon.stop();
            assert!(status.success(), "spoold exited with {status}");
            assert_eq!(spool.count("new"), 2, "the aborted jobs were not requeued");
            over.push(ms(took.saturating_sub(drain + grace)));
            self.remove(spool);
        }
        let m = median(&over);
        println!("  abort stop: exit {m:.2} ms after drain_timeout + kill_grace");
        rows.push(Row {
            section: "stop",
            what: format!("abort: exit past drain_timeout+kill_grace (median of {runs})"),
            spoold: m,
            unit: "ms",
            peer: None,
            target: Some(("<= 100 ms".into(), m <= 100.0)),
            samples: over,
        });
        rows
    }

    // ---- 4: start-up and throughput with a backlog ------------------------------------

    fn start_and_backlog(&self) -> Vec<Row> {
        let backlog = self.sizes.backlog;
        let n = self.sizes.jobs;
        println!("== backlog: {backlog} files waiting in new/");
        let big = self.spool("backlog");
        big.configure(2, &["/bin/true"], "");
        let made = Instant::now();
        make_jobs(&big.dir("new"), "job", backlog);
        println!(
            "  created {backlog} files in {:.1} s",
            made.elapsed().as_secs_f64()
        );
        let mut ready = Vec::new();
        let mut rss = Vec::new();
        let mut rate = Vec::new();
        let mut empty_rate = Vec::new();
        let mut empty_rss = Vec::new();
        for round in 0..self.sizes.backlog_rounds {
            let small = self.spool("backlog-empty");
            small.configure(2, &["/bin/true"], "");
            make_jobs(&small.dir("new"), "job", n);
            let (r, _, _, m) = self.run_until_done(&small, n);
            self.remove(small);
            empty_rate.push(r);
            empty_rss.push(m);

            let (r, _, t, m) = self.run_until_done(&big, n);
            println!(
                "  round {round}: READY after {:.1} ms, {r:.0} jobs/s (empty spool: {:.0}), peak RSS {m:.1} MiB",
                ms(t),
                empty_rate[round]
            );
            ready.push(ms(t));
            rss.push(m);
            rate.push(r);
            // Put the finished jobs back, so that every round starts with the full backlog.
            for entry in fs::read_dir(big.dir("done")).expect("read done/") {
                let entry = entry.expect("entry");
                fs::rename(entry.path(), big.dir("new").join(entry.file_name()))
                    .expect("move a job back");
            }
        }
        let started = Instant::now();
        self.remove(big);
        println!(
            "  removed the backlog in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let r = median(&ready);
        let m = median(&rss);
        let tp = median(&rate);
        let te = median(&empty_rate);
        vec![
            Row {
                section: "start",
                what: format!("exec to READY=1, {backlog} files in new/"),
                spoold: r,
                unit: "ms",
                peer: None,
                target: Some(("<= 250 ms".into(), r <= 250.0)),
                samples: ready,
            },
            Row {
                section: "start",
                what: format!("peak RSS (VmHWM), {backlog} files in new/"),
                spoold: m,
                unit: "MiB",
                peer: Some(("peak RSS, empty spool".into(), median(&empty_rss))),
                target: Some(("<= 32 MiB".into(), m <= 32.0)),
                samples: rss,
            },
            Row {
                section: "start",
                what: format!("throughput, {n} jobs of a {backlog} backlog"),
                spoold: tp,
                unit: "jobs/s",
                peer: Some((format!("{n} jobs, empty spool"), te)),
                target: Some(("ratio >= 0.9".into(), tp / te >= 0.9)),
                samples: rate,
            },
        ]
    }

    // ---- 5: a burst -------------------------------------------------------------------

    fn burst(&self) -> Vec<Row> {
        let n = self.sizes.burst;
        println!("== burst: {n} files renamed into new/ at once while spoold runs");
        let spool = self.spool("burst");
        let record = spool.root.with_extension("record");
        let me = std::env::current_exe().expect("the benchmark's own path");
        spool.configure(
            2,
            &[
                &me.display().to_string(),
                "record-job",
                &record.display().to_string(),
                "{id}",
            ],
            "",
        );
        let stage = spool.root.with_extension("stage");
        fs::create_dir_all(&stage).expect("create the staging directory");
        make_jobs(&stage, "burst", n);
        let names: Vec<_> = fs::read_dir(&stage)
            .expect("read the stage")
            .map(|e| e.expect("entry").file_name())
            .collect();

        let daemon = self.start(&spool);
        daemon.wait_ready();
        let arrivals = Arrivals::watch(&spool.dir("done"), n);
        let began = Instant::now();
        for name in &names {
            fs::rename(stage.join(name), spool.dir("new").join(name)).expect("rename into new/");
        }
        let renamed = began.elapsed();
        let done_at = arrivals.wait().expect("the burst drained");
        let drain = done_at - began;
        let (_, status) = daemon.stop();
        assert!(status.success(), "spoold exited with {status}");

        let mut text = String::new();
        File::open(&record)
            .expect("open the record")
            .read_to_string(&mut text)
            .expect("read the record");
        let runs = text.lines().count();
        let distinct: HashSet<&str> = text.lines().collect();
        let in_done = spool.count("done");
        let left = spool.count("new") + spool.count("active") + spool.count("retry");
        let failed = spool.count("failed");
        let dups = fs::read_dir(spool.dir("done"))
            .expect("read done/")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().contains(".dup-"))
            })
            .count();
        let ok = runs == n && distinct.len() == n && in_done == n && left == 0 && failed == 0;
        println!(
            "  renamed in {:.2} s; drained in {:.2} s ({:.0} jobs/s); handler runs {runs}, \
             distinct {}, done {in_done}, dup-named {dups}, failed {failed}, left {left}",
            renamed.as_secs_f64(),
            drain.as_secs_f64(),
            n as f64 / drain.as_secs_f64(),
            distinct.len()
        );
        self.remove(spool);
        let _ = fs::remove_dir_all(&stage);
        let _ = fs::remove_file(&record);
        vec![
            Row {
                section: "burst",
                what: format!("{n} renamed into new/: time to drain"),
                spoold: drain.as_secs_f64(),
                unit: "s",
                peer: None,
                target: None,
                samples: vec![drain.as_secs_f64()],
            },
            Row {
                section: "burst",
                what: format!("{n} renamed into new/: all once, none twice"),
                spoold: runs as f64,
                unit: "runs",
                peer: Some(("jobs".into(), n as f64)),
                target: Some(("each job run once".into(), ok)),
                samples: vec![runs as f64, distinct.len() as f64, in_done as f64],
            },
        ]
    }
}

impl Bench {
    // ---- 6: a retry backlog --------------------------------------------------------------

    /// A downstream outage has sent everything to `retry/`: `retry_backlog` jobs wait there
    /// with due times spread evenly over the minute after the start. What a stop costs then
    /// (SIGTERM to exit, a few seconds after READY while promotions run), and whether the
    /// watchdog (WATCHDOG_USEC = 2 s, so a ping every second) ever went a whole interval
    /// without a ping.
    fn retry_backlog(&self) -> Vec<Row> {
        let n = self.sizes.retry_backlog;
        let rounds = self.sizes.retry_rounds;
        let watchdog = Duration::from_secs(2);
        println!(
            "== retry backlog: {n} jobs in retry/ due over 60 s, {rounds} rounds, SIGTERM 3, 10 and 30 s after READY"
        );
        let mut stops = Vec::new();
        let mut gaps = Vec::new();
        for round in 0..rounds {
            for after in [3, 10, 30] {
                let spool = self.spool("retry");
                spool.configure(2, &["/bin/true"], "");
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("after the epoch")
                    .as_millis() as u64;
                make_retry_backlog(&spool, n, now_ms + 2_000, 60_000);
                let usec = watchdog.as_micros().to_string();
                let mut daemon = self.start_with(&spool, &[("WATCHDOG_USEC", &usec)]);
                daemon.wait_ready();
                let ready_at = Instant::now();
                thread::sleep(Duration::from_secs(after));
                let sent = Instant::now();
                rustix::process::kill_process(daemon.pid(), Signal::TERM).expect("kill");
                let status = daemon.wait_exit();
                let took = sent.elapsed();
                assert!(status.success(), "spoold exited with {status}");
                let pings = daemon.pings.lock().expect("pings").clone();
                let mut last = ready_at;
                let mut gap = Duration::ZERO;
                for at in pings.iter().filter(|at| **at > ready_at && **at < sent) {
                    gap = gap.max(*at - last);
                    last = *at;
                }
                gap = gap.max(sent - last);
                println!(
                    "  round {}, SIGTERM {after} s after READY: exit after {:.1} ms; longest gap between watchdog pings {:.0} ms; {} retried jobs done",
                    round + 1,
                    ms(took),
                    ms(gap),
                    spool.count("done")
                );
                stops.push(ms(took));
                gaps.push(ms(gap));
                drop(daemon);
                self.remove(spool);
            }
        }
        let stop = median(&stops);
        let worst = stops.iter().copied().fold(0.0, f64::max);
        let gap = gaps.iter().copied().fold(0.0, f64::max);
        vec![
            Row {
                section: "retry",
                what: format!(
                    "SIGTERM to exit with {n} jobs in retry/ (median; worst {worst:.1} ms)"
                ),
                spoold: stop,
                unit: "ms",
                peer: None,
                target: Some(("<= 50 ms".into(), worst <= 50.0)),
                samples: stops,
            },
            Row {
                section: "retry",
                what: format!(
                    "longest gap between watchdog pings, WATCHDOG_USEC 2 s, {n} in retry/"
                ),
                spoold: gap,
                unit: "ms",
                peer: None,
                target: Some(("< 2000 ms".into(), gap < 2000.0)),
                samples: gaps,
            },
        ]
    }
}

impl Bench {
    // ---- 7: operator actions -------------------------------------------------------------

    /// How soon a running daemon honours `spoold pause` and `spoold cancel ID`, each the median
    /// of several runs, timed from the start of the command (as an operator types it) to:
    /// for a pause, the last job claimed under a steady stream of short jobs (no job starts
    /// after it); for a cancel, the moment the running handler's process group is gone.
    fn operator(&self) -> Vec<Row> {
        let quick = self.sizes.jobs < 20_000;
        let runs: usize = std::env::var("SPOOLD_BENCH_OPERATOR_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 5 } else { 30 });
        println!(
            "== operator: {runs} pauses under a stream of /bin/true jobs, {runs} cancels of a running `sleep`"
        );

        // Pause: new/ always holds more short jobs than the quiet period can run.
        let spool = self.spool("operator-pause");
        spool.configure(2, &["/bin/true"], "");
        let daemon = self.start(&spool);
        daemon.wait_ready();
        let claims = Claims::watch(&spool.dir("active"));
        let mut pauses = Vec::new();
        for run in 0..runs {
            make_jobs(&spool.dir("new"), &format!("p{run:03}-"), 3_000);
            spoold_client(&spool, &["resume"]);
            // The stream flows again before the pause is asked for.
            let flowing = claims.count();
            wait_until(PATIENCE, || claims.count() > flowing + 20).expect("jobs start again");
            let asked = Instant::now();
            spoold_client(&spool, &["pause"]);
            let returned = Instant::now();
            // Honoured once no job has started for a second past the command's return (twice
            // the target: a later start is then a miss, not an end of the quiet).
            let last = loop {
                thread::sleep(Duration::from_millis(100));
                let last = claims.last().unwrap_or(asked);
                if last.max(returned).elapsed() > Duration::from_secs(2) {
                    break last;
                }
            };
            let took = if last > asked {
                last - asked
            } else {
                returned - asked
            };
            println!(
                "  pause {run}: command took {:.1} ms; last job started {:.1} ms after it began",
                ms(returned - asked),
                ms(took)
            );
            pauses.push(ms(took));
        }
        claims.stop();
        let (_, status) = daemon.stop();
        assert!(status.success(), "spoold exited with {status}");
        self.remove(spool);

        // Cancel: one job at a time, a shell that records its pid (its process group's id:
        // spoold makes each handler a group leader) and becomes `sleep 300`.
        let spool = self.spool("operator-cancel");
        let pids = self.work.join("operator-pids");
        fs::create_dir_all(&pids).expect("create the pid directory");
        let script = format!("echo $$ > {}/$0; exec sleep 300", pids.display());
        spool.configure(
            1,
            &["/bin/sh", "-c", &script, "{id}"],
            "kill_grace = \"5s\"",
        );
        let daemon = self.start(&spool);
        daemon.wait_ready();
        let mut cancels = Vec::new();
        for run in 0..runs {
            let id = format!("cancel{run:03}");
            File::create(spool.dir("new").join(&id)).expect("create a job");
            let pid_file = pids.join(&id);
            let mut pgid = None;
            wait_until(PATIENCE, || {
                pgid = fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                pgid.is_some()
            })
            .expect("the handler started");
            let pgid = Pid::from_raw(pgid.expect("a pid")).expect("a pid above 0");
            let asked = Instant::now();
            spoold_client(&spool, &["cancel", &id]);
            let returned = Instant::now();
            wait_until(PATIENCE, || {
                rustix::process::test_kill_process_group(pgid).is_err()
            })
            .expect("the handler's group ended");
            let took = asked.elapsed();
            wait_until(PATIENCE, || spool.dir("failed").join(&id).exists())
                .expect("the job failed");
            println!(
                "  cancel {run}: command took {:.1} ms; group gone {:.1} ms after it began",
                ms(returned - asked),
                ms(took)
            );
            cancels.push(ms(took));
        }
        let (_, status) = daemon.stop();
        assert!(status.success(), "spoold exited with {status}");
        self.remove(spool);
        let _ = fs::remove_dir_all(&pids);

        let pause = median(&pauses);
        let cancel = median(&cancels);
        vec![
            Row {
                section: "operator",
                what: "`spoold pause` to the last job start, /bin/true stream (median)".into(),
                spoold: pause,
                unit: "ms",
                peer: None,
                target: Some(("<= 1000 ms".into(), pause <= 1000.0)),
                samples: pauses,
            },
            Row {
                section: "operator",
                what: "`spoold cancel ID` to the running handler's group gone (median)".into(),
                spoold: cancel,
                unit: "ms",
                peer: None,
                target: Some(("<= 1000 ms".into(), cancel <= 1000.0)),
                samples: cancels,
            },
        ]
    }
}

/// Runs a client command (`spoold ARGS --config ...`) on `spool` and checks that it succeeded.
fn spoold_client(spool: &SpoolDir, args: &[&str]) {
    let out = Command::new(SPOOLD)
        .args(args)
        .arg("--config")
        .arg(&spool.config)
        .stdin(Stdio::null())
        .output()
        .expect("run a spoold command");
    assert!(
        out.status.success(),
        "spoold {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The jobs claimed in a spool: inotify on `active/`, where a claim renames a job, read every
/// 2 ms by a thread of its own, which notes when it saw each claim.
struct Claims {
    seen: Arc<std::sync::Mutex<(usize, Option<Instant>)>>,
    done: Arc<AtomicBool>,
    handle: thread::JoinHandle<()>,
}

impl Claims {
    fn watch(active: &Path) -> Claims {
        let mut inotify = Inotify::init().expect("inotify");
        inotify
            .watches()
            .add(active, WatchMask::MOVED_TO)
            .expect("watch active/");
        let seen = Arc::new(std::sync::Mutex::new((0, None)));
        let done = Arc::new(AtomicBool::new(false));
        let handle = {
            let (seen, done) = (seen.clone(), done.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !done.load(Ordering::Relaxed) {
                    match inotify.read_events(&mut buf) {
                        Ok(events) => {
                            let n = events.count();
                            let mut seen = seen.lock().expect("claims");
                            seen.0 += n;
                            seen.1 = Some(Instant::now());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("inotify: {e}"),
                    }
                }
            })
        };
        Claims { seen, done, handle }
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("claims").0
    }

    fn last(&self) -> Option<Instant> {
        self.seen.lock().expect("claims").1
    }

    fn stop(self) {
        self.done.store(true, Ordering::Relaxed);
        self.handle.join().expect("claims thread");
    }
}

/// Puts `n` empty jobs in `retry/`, each with the `state/` record a failed first attempt
/// leaves, due evenly between `first_due_ms` and `first_due_ms + spread_ms`.
fn make_retry_backlog(spool: &SpoolDir, n: usize, first_due_ms: u64, spread_ms: u64) {
    let retry = spool.dir("retry");
    let state = spool.dir("state");
    thread::scope(|s| {
        for part in 0..2 {
            let (retry, state) = (&retry, &state);
            s.spawn(move || {
                for i in (part..n).step_by(2) {
                    let name = format!("retry{i:07}");
                    let due = first_due_ms + spread_ms * i as u64 / n as u64;
                    let record = json!({
                        "id": name,
                        "attempts": 1,
                        "next_attempt_unix_ms": due,
                        "permanent": false,
                    });
                    fs::write(state.join(&name), record.to_string()).expect("write a record");
                    File::create(retry.join(&name)).expect("create a job file");
                }
            });
        }
    });
}

/// The minimal spawner (a): two threads that run /bin/true and do nothing else, the physical
/// limit of one process per job. Returns spawns/s and this process's CPU seconds per spawn.
fn minimal_spawner(n: usize) -> (f64, f64) {
    let cpu_before = own_cpu();
    let started = Instant::now();
    thread::scope(|s| {
        for part in 0..2 {
            s.spawn(move || {
                for _ in (part..n).step_by(2) {
                    let status = Command::new("/bin/true").status().expect("/bin/true");
                    assert!(status.success());
                }
            });
        }
    });
    let took = started.elapsed();
    let cpu = own_cpu() - cpu_before;
    (n as f64 / took.as_secs_f64(), cpu / n as f64)
}

/// This process's CPU seconds (user + system), from /proc/self/stat.
fn own_cpu() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let rest = stat.rsplit_once(')').expect("a stat line").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")) as f64
        / TICKS_PER_SEC
}

/// Exec mode's CPU per job (spoold's own, not its handlers') against the `posix_spawn` floor's
/// own CPU per job (its two threads' renames, spawns and waits), in microseconds: issue 16
/// reports the CPU target of the first benchmark issue as this ratio, since an absolute figure
/// moves with the machine.
fn cpu_against_floor(section: &'static str, exec_cpu: &[f64], floor_cpu: &[f64]) -> Row {
    Row {
        section,
        what: "spoold CPU per job, exec mode /bin/true".into(),
        spoold: median(exec_cpu),
        unit: "us",
        peer: Some((
            "the posix_spawn floor's own CPU per job".into(),
            median(floor_cpu),
        )),
        target: None,
        samples: exec_cpu.to_vec(),
    }
}

/// Polls `cond` every millisecond until it holds or `within` passes.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> Option<()> {
    let give_up = Instant::now() + within;
    while Instant::now() < give_up {
        if cond() {
            return Some(());
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
}

// ---- JetStream (issue 14) -----------------------------------------------------------------

/// A 3-node JetStream cluster on 127.0.0.1 for the jetstream section; the nodes die with it.
struct NatsCluster {
    nodes: Vec<Child>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

impl NatsCluster {
    fn start(work: &Path) -> NatsCluster {
        let server = std::env::var_os("SPOOLD_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let dir = tempfile::Builder::new()
            .prefix("nats-")
            .tempdir_in(work)
            .expect("the cluster's directory");
        let ports: Vec<u16> = (0..6)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port()
            })
            .collect();
        let mut nodes = Vec::new();
        for n in 0..3 {
            let routes: Vec<String> = (0..3)
                .filter(|&m| m != n)
                .map(|m| format!("\"nats-route://127.0.0.1:{}\"", ports[3 + m]))
                .collect();
            let conf = dir.path().join(format!("n{n}.conf"));
            fs::write(
                &conf,
                format!(
                    "server_name: n{n}\nlisten: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: {:?} }}\n\
                     cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    ports[n],
                    dir.path().join(format!("n{n}")).display().to_string(),
                    ports[3 + n],
                    routes.join(", ")
                ),
            )
            .expect("a node's config");
            nodes.push(
                Command::new(&server)
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display())),
            );
        }
        let urls = (0..3)
            .map(|n| format!("nats://127.0.0.1:{}", ports[n]))
            .collect();
        let cluster = NatsCluster {
            nodes,
            urls,
            _dir: dir,
        };
        // Ready once a stream can be created and removed.
        let rt = runtime();
        rt.block_on(async {
            let give_up = Instant::now() + Duration::from_secs(60);
            loop {
                let ok = async {
                    let client = async_nats::ConnectOptions::new()
                        .connect(cluster.urls.as_slice())
                        .await
                        .ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.create_stream(async_nats::jetstream::stream::Config {
                        name: "READY".into(),
                        subjects: vec!["ready".into()],
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await
                    .ok()?;
                    js.delete_stream("READY").await.ok()
                }
                .await;
                if ok.is_some() {
                    return;
                }
                assert!(
                    Instant::now() < give_up,
                    "the NATS cluster is not ready in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        cluster
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

impl Bench {
    /// A spool configured for the JetStream backend on `cluster`: `workers` workers running
    /// `command`, with `extra` after `[handler]`.
    fn js_spool(
        &self,
        cluster: &NatsCluster,
        queue: &str,
        command: &[&str],
        extra: &str,
    ) -> SpoolDir {
        let spool = self.spool("js");
        let servers: Vec<String> = cluster.urls.iter().map(|u| format!("{u:?}")).collect();
        spool.configure(
            2,
            command,
            &format!(
                "{extra}\n[backend]\nkind = \"jetstream\"\n[jetstream]\nservers = [{}]\n\
                 queue = {queue:?}\nack_wait = \"5s\"\nprogress_interval = \"1s\"\n",
                servers.join(", ")
            ),
        );
        spool
    }

    /// `spoold enqueue` of `n` files; returns jobs/s.
    fn js_enqueue(&self, spool: &SpoolDir, n: usize) -> f64 {
        let dir = spool.root.join("submit");
        fs::create_dir_all(&dir).expect("a directory of jobs");
        make_jobs(&dir, "job", n);
        let files: Vec<PathBuf> = fs::read_dir(&dir)
            .expect("read the jobs")
            .map(|e| e.expect("an entry").path())
            .collect();
        let began = Instant::now();
        let out = Command::new(SPOOLD)
            .arg("enqueue")
            .args(&files)
            .arg("--config")
            .arg(&spool.config)
            .stdout(Stdio::null())
            .output()
            .expect("spoold enqueue");
        assert!(
            out.status.success(),
            "enqueue: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        n as f64 / began.elapsed().as_secs_f64()
    }

    /// `spoold status --json` of `spool`'s queue.
    fn js_status(&self, spool: &SpoolDir) -> serde_json::Value {
        let out = Command::new(SPOOLD)
            .args(["status", "--json", "--config"])
            .arg(&spool.config)
            .output()
            .expect("spoold status");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Jobs per second of `hosts` spoold processes (2 workers each, `/bin/true`) on `queue`
    /// of `cluster`, through `n` jobs submitted before they start: from their start to the
    /// queue's being empty and idle, as `spoold status` sees it.
    fn js_hosts_rate(&self, cluster: &NatsCluster, queue: &str, hosts: usize, n: usize) -> f64 {
        let spools: Vec<SpoolDir> = (0..hosts)
            .map(|_| self.js_spool(cluster, queue, &["/bin/true"], ""))
            .collect();
        self.js_enqueue(&spools[0], n);
        let began = Instant::now();
        let daemons: Vec<Daemon> = spools.iter().map(|s| self.start(s)).collect();
        for d in &daemons {
            d.wait_ready();
        }
        wait_until(PATIENCE, || {
            // A status is a process and a few requests: not more than 10 a second.
            thread::sleep(Duration::from_millis(100));
            let s = self.js_status(&spools[0]);
            s["queued"] == 0 && s["active"] == 0 && s["retry"] == 0
        })
        .expect("the jobs done");
        let rate = n as f64 / began.elapsed().as_secs_f64();
        for d in daemons {
            let (_, status) = d.stop();
            assert!(status.success());
        }
        for spool in spools {
            self.remove(spool);
        }
        rate
    }

    /// Jobs per second through one JetStream host (2 workers, `/bin/true`) in alternating
    /// rounds, on a queue of its own each round: quicker than the whole jetstream section.
    /// With `SPOOLD_BENCH_BASE=PATH`, each round also runs that build of spoold (the client
    /// commands stay this build's), to compare two builds' broker paths in the same conditions.
    fn jetstream_host(&self) -> Vec<Row> {
        let n: usize = std::env::var("SPOOLD_BENCH_JS_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5_000);
        let cluster = NatsCluster::start(&self.work);
        let base = std::env::var_os("SPOOLD_BENCH_BASE").map(PathBuf::from);
        let (mut rates, mut base_rates) = (Vec::new(), Vec::new());
        println!("== one JetStream host: {n} no-op jobs, 2 workers, R3");
        for round in 0..self.sizes.rounds {
            if let Some(base) = &base {
                *self.daemon.lock().expect("the daemon's path") = base.clone();
                let rate = self.js_hosts_rate(&cluster, &format!("base{round}"), 1, n);
                *self.daemon.lock().expect("the daemon's path") = PathBuf::from(SPOOLD);
                println!("  round {round}: base build {rate:.0} jobs/s");
                base_rates.push(rate);
            }
            let rate = self.js_hosts_rate(&cluster, &format!("this{round}"), 1, n);
            println!("  round {round}: this build {rate:.0} jobs/s");
            rates.push(rate);
        }
        vec![Row {
            section: "jetstream-host",
            what: format!("1 spoold, 2 workers, /bin/true, {n} jobs"),
            spoold: median(&rates),
            unit: "jobs/s",
            peer: base.map(|b| (format!("base build {}", b.display()), median(&base_rates))),
            target: None,
            samples: rates,
        }]
    }

    fn jetstream(&self) -> Vec<Row> {
        let n: usize = std::env::var("SPOOLD_BENCH_JS_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let cluster = NatsCluster::start(&self.work);
        let mut rows = Vec::new();

        // Submit: spoold enqueue against the raw publish rate with 256 acks in flight, in
        // alternating rounds. The raw publishes send what enqueue sends, the jobs' (empty)
        // bodies, to a stream like spoold's job stream (R3, work queue, the same duplicate
        // window); once bare, and once with a unique Nats-Msg-Id, which the issue requires of
        // enqueue and which the servers check against that window. Every stream is made before
        // any clock starts (the first client command makes the queue's) and emptied after each
        // round, so that no round runs on a fuller store than another.
        let spool = self.js_spool(&cluster, "submit", &["/bin/true"], "");
        self.js_status(&spool);
        let rt = runtime();
        let js = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .connect(cluster.urls.as_slice())
                .await
                .expect("connect");
            let js = async_nats::jetstream::new(client);
            for name in ["RAW", "RAWID"] {
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: name.into(),
                    subjects: vec![name.to_lowercase()],
                    num_replicas: 3,
                    retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .expect("a raw stream");
            }
            js
        });
        let raw_publish = |subject: &str, round: usize, with_id: bool| -> f64 {
            rt.block_on(async {
                let began = Instant::now();
                let mut acks = std::collections::VecDeque::new();
                for i in 0..n {
                    if acks.len() >= 256 {
                        let ack: async_nats::jetstream::context::PublishAckFuture =
                            acks.pop_front().expect("an ack");
                        ack.await.expect("a PubAck");
                    }
                    let sent = if with_id {
                        let mut headers = async_nats::HeaderMap::new();
                        let id = format!("01RAW{round:03}{i:018}");
                        headers.insert("Nats-Msg-Id", id.as_str());
                        js.publish_with_headers(subject.to_owned(), headers, bytes::Bytes::new())
                            .await
                    } else {
                        js.publish(subject.to_owned(), bytes::Bytes::new()).await
                    };
                    acks.push_back(sent.expect("publish"));
                }
                for ack in acks {
                    ack.await.expect("a PubAck");
                }
                n as f64 / began.elapsed().as_secs_f64()
            })
        };
        let empty = |stream: &str| {
            rt.block_on(async {
                js.get_stream(stream)
                    .await
                    .expect("the stream")
                    .purge()
                    .await
                    .expect("purge");
            })
        };
        let (mut enqueue, mut raw, mut raw_id) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..3 {
            enqueue.push(self.js_enqueue(&spool, n));
            empty("SPOOLD_submit");
            raw.push(raw_publish("raw", round, false));
            empty("RAW");
            raw_id.push(raw_publish("rawid", round, true));
            empty("RAWID");
            println!(
                "  round {round}: enqueue {:.0} jobs/s, raw publish {:.0}/s, with Nats-Msg-Id {:.0}/s",
                enqueue[round], raw[round], raw_id[round]
            );
        }
        drop(js);
        rows.push(Row {
            section: "jetstream",
            what: format!("spoold enqueue of {n} jobs (R3)"),
            spoold: median(&enqueue),
            unit: "jobs/s",
            peer: Some(("raw publish, 256 in flight".into(), median(&raw))),
            target: Some((">= 0.7x".into(), median(&enqueue) >= 0.7 * median(&raw))),
            samples: enqueue.clone(),
        });
        rows.push(Row {
            section: "jetstream",
            what: format!("spoold enqueue of {n} jobs (R3)"),
            spoold: median(&enqueue),
            unit: "jobs/s",
            peer: Some((
                "raw publish with a unique Nats-Msg-Id, 256 in flight".into(),
                median(&raw_id),
            )),
            target: None,
            samples: enqueue,
        });

        // Throughput with 1, 2 and 3 spoold processes (/bin/true, 2 workers each).
        let spool_rate = self.spoold_throughput(n).0;
        for hosts in 1..=3 {
            let rate = self.js_hosts_rate(&cluster, &format!("tp{hosts}"), hosts, n);
            rows.push(Row {
                section: "jetstream",
                what: format!("{hosts} spoold, 2 workers each, /bin/true (from exec)"),
                spoold: rate,
                unit: "jobs/s",
                peer: Some(("spool source, 1 spoold".into(), spool_rate)),
                target: None,
                samples: vec![rate],
            });
        }

        // Hand-over: from a kill -9 of the host running a job, and from an abort, to the job
        // starting on the other host.
        for (what, kill) in [("kill -9", true), ("abort (SIGTERM, drain 0s)", false)] {
            let queue = if kill { "killed" } else { "aborted" };
            let marker = self.work.join(format!("{queue}.started"));
            let script = format!(
                "echo \"$HOST\" >> {m:?}; if [ \"$HOST\" = first ]; then sleep 60; fi",
                m = marker.display().to_string()
            );
            let first = self.js_spool(
                &cluster,
                queue,
                &["sh", "-c", &script],
                "env = { HOST = \"first\" }\n[shutdown]\ndrain_timeout = \"0s\"",
            );
            let second = self.js_spool(
                &cluster,
                queue,
                &["sh", "-c", &script],
                "env = { HOST = \"second\" }",
            );
            let mut a = self.start(&first);
            a.wait_ready();
            self.js_enqueue(&first, 1);
            wait_until(PATIENCE, || marker.exists()).expect("the job started");
            let b = self.start(&second);
            b.wait_ready();
            let began = Instant::now();
            if kill {
                let _ = a.child.kill();
                let _ = a.child.wait();
            } else {
                rustix::process::kill_process(a.pid(), Signal::TERM).expect("kill");
                a.wait_exit();
            }
            wait_until(PATIENCE, || {
                fs::read_to_string(&marker).is_ok_and(|t| t.contains("second"))
            })
            .expect("the job started on the second host");
            let took = began.elapsed();
            rows.push(Row {
                section: "jetstream",
                what: format!("hand-over after {what} (ack_wait 5s)"),
                spoold: ms(took),
                unit: "ms",
                peer: None,
                target: (!kill).then(|| ("< 1000 ms".into(), took < Duration::from_secs(1))),
                samples: vec![ms(took)],
            });
            let (_, status) = b.stop();
            assert!(status.success());
        }
        rows
    }
}
