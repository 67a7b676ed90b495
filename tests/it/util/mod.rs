//! Test helpers that drive the real `spoold` binary against a temporary spool.
//!
//! `Env` owns a temporary directory with a spool root and a config file; `Daemon` is a running
//! `spoold run` with its own NOTIFY_SOCKET, so tests wait on READY=1 and other notifications
//! (events, with generous upper bounds) instead of sleeping.

mod skip;
pub use skip::skip;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_spoold");

/// A generous bound for anything that should happen "soon" on a loaded, shared machine.
pub const SOON: Duration = Duration::from_secs(30);

pub struct Env {
    pub dir: tempfile::TempDir,
    pub spool: PathBuf,
    pub config: PathBuf,
}

impl Env {
    /// A temporary spool and a config whose handler is `command` (an argv) and whose other
    /// settings are `extra` (TOML appended after the [handler] table's command line, so it may
    /// continue [handler] or open further tables).
    pub fn new(command: &[&str], extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool");
        fs::create_dir(&spool).unwrap();
        let config = dir.path().join("spoold.toml");
        let env = Env { dir, spool, config };
        env.write_config(command, extra);
        env
    }

    pub fn write_config(&self, command: &[&str], extra: &str) {
        let argv: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
        let text = format!(
            "[spool]\ndir = {:?}\n\n[handler]\ncommand = [{}]\n{extra}\n",
            self.spool.display().to_string(),
            argv.join(", ")
        );
        fs::write(&self.config, text).unwrap();
    }

    /// Writes an executable shell script into the temp dir and returns its path.
    pub fn script(&self, name: &str, body: &str) -> String {
        let path = self.dir.path().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.spool.join(sub)
    }

    /// Submits a job the Maildir way: write in tmp/, rename into new/.
    pub fn submit(&self, name: &str, body: &str) {
        let tmp = self.path("tmp");
        fs::create_dir_all(&tmp).unwrap();
        fs::create_dir_all(self.path("new")).unwrap();
        fs::write(tmp.join(name), body).unwrap();
        fs::rename(tmp.join(name), self.path("new").join(name)).unwrap();
    }

    /// The names in a spool subdirectory (dot-files and bookkeeping temp files excluded).
    pub fn names(&self, sub: &str) -> BTreeSet<String> {
        match fs::read_dir(self.path(sub)) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(_) => BTreeSet::new(),
        }
    }

    pub fn count(&self, sub: &str) -> usize {
        match fs::read_dir(self.path(sub)) {
            Ok(rd) => rd.count(),
            Err(_) => 0,
        }
    }

    /// Runs a client subcommand (`spoold ARGS... --config CONFIG`) to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run spoold")
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(&self.config, &[])
    }

    /// Adds `line` (`key = value`) to the config's `[spool]` table.
    pub fn set_spool(&self, line: &str) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        fs::write(
            &self.config,
            cfg.replacen("[spool]\n", &format!("[spool]\n{line}\n"), 1),
        )
        .unwrap();
    }

    /// `spoold ARGS --config PATH` with `input` on its standard input.
    pub fn cli_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run spoold");
        // A command that refuses its arguments exits before it reads: a closed stdin is no
        // error here.
        let _ = child.stdin.take().expect("a stdin").write_all(input);
        child.wait_with_output().expect("spoold's output")
    }

    /// Waits up to `SOON` until `cond` holds, where no daemon runs (`Daemon::wait_until` when
    /// one does); past that, panics with `what` and a listing of the spool.
    #[track_caller]
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut() -> bool) {
        if wait_for(SOON, || cond().then_some(())).is_none() {
            panic!("{}", timed_out(SOON, what, Some(&self.spool), None));
        }
    }

    /// The file the handler of `recording_env` appends each job's ID to.
    pub fn runs_file(&self) -> PathBuf {
        self.dir.path().join("runs")
    }
}

/// A spool whose handler appends its job's ID (`$SPOOLD_JOB_ID`, as raw bytes) and a newline
/// to `Env::runs_file` and exits 0; `extra` is the config after the handler's command.
pub fn recording_env(extra: &str) -> Env {
    let env = Env::new(&["/bin/true"], "");
    let h = env.script(
        "record.sh",
        &format!(
            "printf '%s\\n' \"$SPOOLD_JOB_ID\" >> {}",
            env.runs_file().display()
        ),
    );
    env.write_config(&[&h], extra);
    env
}

/// How many times each job's handler ran, from the one ID per line in `Env::runs_file`.
pub fn runs(env: &Env) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let text = fs::read_to_string(env.runs_file()).unwrap_or_default();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}

/// The `spoold failed --json` list as (id, reason) pairs.
pub fn failed_reasons(env: &Env) -> Vec<(String, Option<String>)> {
    let out = env.cli(&["failed", "--json"]);
    assert!(
        out.status.success(),
        "spoold failed --json: {}",
        describe(&out)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().to_owned(),
                j["record"]["last_failure"]["reason"]
                    .as_str()
                    .map(str::to_owned),
            )
        })
        .collect()
}

/// A finished command's exit status, stdout and stderr, for a failed check to show.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cmd` to its exit, which must come within `within` (a refusal is immediate; a daemon
/// that starts instead of refusing is a failure, not a hang).
pub fn run_to_exit(mut cmd: Command, within: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {within:?} (it should have refused to start); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The path after `--config` in a `spoold run` command line.
fn config_arg(cmd: &Command) -> Option<PathBuf> {
    let mut args = cmd.get_args();
    args.by_ref().find(|a| *a == "--config")?;
    args.next().map(PathBuf::from)
}

/// The spool root a config names, if the config reads as TOML with a `[spool] dir`: a test of
/// a bad config has no spool to list.
fn spool_of(config: &Path) -> Option<PathBuf> {
    let table: toml::Table = fs::read_to_string(config).ok()?.parse().ok()?;
    Some(PathBuf::from(table.get("spool")?.get("dir")?.as_str()?))
}

/// How many lines of the daemon's log a failed wait shows: enough for the last few jobs and
/// the error that stopped them.
const LOG_TAIL: usize = 30;

/// How many names of each spool directory a failed wait shows.
const NAMES_SHOWN: usize = 5;

/// The message of a wait that timed out: what it waited for, the spool's directories (each
/// with its count and first names) and the tail of the daemon's log.
fn timed_out(within: Duration, what: &str, spool: Option<&Path>, log: Option<&str>) -> String {
    let mut msg = format!("waited {within:?} for {what}, in vain\n");
    match spool {
        Some(spool) => msg.push_str(&spool_listing(spool)),
        None => msg.push_str("(the spool is not known: its config did not name one)\n"),
    }
    if let Some(log) = log {
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
        msg.push_str(&format!(
            "the daemon's last {} of {} log lines:\n",
            tail.len(),
            lines.len()
        ));
        for line in tail {
            msg.push_str(&format!("  {line}\n"));
        }
    }
    msg
}

/// Each directory of the spool with how many entries it holds and the first few names.
pub fn spool_listing(spool: &Path) -> String {
    let mut dirs: Vec<(String, Vec<String>)> = match fs::read_dir(spool) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let mut names: Vec<String> = fs::read_dir(e.path())
                    .map(|rd| {
                        rd.filter_map(Result::ok)
                            .map(|n| format!("{:?}", n.file_name()))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                (e.file_name().to_string_lossy().into_owned(), names)
            })
            .collect(),
        Err(e) => return format!("spool {}: cannot list it: {e}\n", spool.display()),
    };
    dirs.sort();
    let mut out = format!("spool {}:\n", spool.display());
    for (dir, names) in dirs {
        out.push_str(&format!("  {dir}/ {}", names.len()));
        if !names.is_empty() {
            let more = if names.len() > NAMES_SHOWN {
                " ..."
            } else {
                ""
            };
            let shown = names[..names.len().min(NAMES_SHOWN)].join(" ");
            out.push_str(&format!(": {shown}{more}"));
        }
        out.push('\n');
    }
    out
}

/// A running `spoold run`, with the notifications it sent and everything it logged.
pub struct Daemon {
    pub child: Child,
    pub notes: Arc<Mutex<Vec<String>>>,
    pub log: Arc<Mutex<String>>,
    /// The spool root named by the daemon's config, when that config could be read: a failed
    /// wait lists it.
    spool: Option<PathBuf>,
    /// The thread that reads the daemon's stderr into `log`: it ends at the pipe's end.
    log_reader: Option<thread::JoinHandle<()>>,
    _sock_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon and waits for READY=1.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let d = Daemon::spawn(config, env);
        d.wait_note(|n| n.contains("READY=1"), SOON)
            .unwrap_or_else(|| panic!("no READY=1 within {SOON:?}; log:\n{}", d.log()));
        d
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon::spawn_command(cmd)
    }

    /// Starts `cmd`, which runs the daemon (itself, or through a wrapper such as `unshare`),
    /// with a NOTIFY_SOCKET of its own and its stderr captured; waits for nothing.
    pub fn spawn_command(mut cmd: Command) -> Daemon {
        let spool = config_arg(&cmd).and_then(|config| spool_of(&config));
        let sock_dir = tempfile::tempdir().unwrap();
        let sock_path = sock_dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        let notes = Arc::new(Mutex::new(Vec::new()));
        {
            let notes = notes.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = sock.recv(&mut buf) {
                    notes
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            });
        }
        // The test's own environment must not leak in, but what the caller set stays.
        for var in [
            "RUST_LOG",
            "JOURNAL_STREAM",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ] {
            if !cmd.get_envs().any(|(k, _)| k == var) {
                cmd.env_remove(var);
            }
        }
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn spoold");
        let log = Arc::new(Mutex::new(String::new()));
        let log_reader = {
            let log = log.clone();
            let mut stderr = child.stderr.take().unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        Daemon {
            child,
            notes,
            log,
            spool,
            log_reader: Some(log_reader),
            _sock_dir: sock_dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// How many worker threads the daemon has, as `ps -T` would show them.
    pub fn worker_threads(&self) -> usize {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|comm| comm.trim_end() == "spoold-worker")
            })
            .count()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }

    /// Waits until a notification datagram satisfies `pred`; returns it.
    pub fn wait_note(&self, pred: impl Fn(&str) -> bool, within: Duration) -> Option<String> {
        wait_for(within, || self.notes().into_iter().find(|n| pred(n)))
    }

    /// Waits up to `SOON` until `cond` holds. Past that it panics with `what` (what the test
    /// waited for, in words), a listing of the spool and the daemon's last log lines, which is
    /// what one looks at first to see why.
    #[track_caller]
    pub fn wait_until(&self, what: &str, cond: impl FnMut() -> bool) {
        self.wait_until_within(SOON, what, cond);
    }

    /// `wait_until` with a bound of the test's own.
    #[track_caller]
    pub fn wait_until_within(&self, within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        if wait_for(within, || cond().then_some(())).is_none() {
            panic!(
                "{}",
                timed_out(within, what, self.spool.as_deref(), Some(&self.log()))
            );
        }
    }

    /// Waits until the log satisfies `pred`; false when it did not within `within` (a caller
    /// that must not go on without it asserts, or uses `wait_until`).
    #[must_use]
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, within: Duration) -> bool {
        wait_for(within, || pred(&self.log()).then_some(())).is_some()
    }

    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    pub fn term(&self) {
        self.signal(15);
    }

    /// Waits for the daemon to exit; panics (after killing it) past `within`.
    pub fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = start.elapsed();
                // The log is whole once its reader has met the pipe's end; a process that
                // outlived the daemon and holds the pipe (a test's, on purpose) keeps it open,
                // so the wait is bounded (and short: a daemon's last lines come at once).
                let read_to_end = wait_for(Duration::from_secs(5), || {
                    self.log_reader
                        .as_ref()
                        .is_none_or(|r| r.is_finished())
                        .then_some(())
                });
                if read_to_end.is_some()
                    && let Some(reader) = self.log_reader.take()
                {
                    let _ = reader.join();
                }
                return (status, took);
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "spoold did not exit within {within:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then the exit; asserts the exit status is 0.
    pub fn stop(&mut self) -> Duration {
        self.term();
        let (status, took) = self.wait_exit(SOON);
        assert!(
            status.success(),
            "spoold exited with {status}; log:\n{}",
            self.log()
        );
        took
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Plays systemd's `Restart=` for `env`'s daemon until `done` holds or `within` passes: each
/// time the daemon has died of SIGKILL (a test's poison pill), it is started again. Returns how
/// many times it died; any other end of the daemon fails the test.
pub fn restarting(
    env: &Env,
    daemon: &mut Daemon,
    within: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> usize {
    use std::os::unix::process::ExitStatusExt as _;
    let start = Instant::now();
    let mut deaths = 0;
    loop {
        if done() {
            return deaths;
        }
        if let Some(status) = daemon.child.try_wait().unwrap() {
            assert_eq!(
                status.signal(),
                Some(9),
                "spoold died of something else: {status}; log:\n{}",
                daemon.log()
            );
            deaths += 1;
            *daemon = env.start();
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?} ({deaths} deaths); log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` until it returns Some, or `within` passes.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > within {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// True when a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Reads pids written one per line by handler scripts into `file`.
pub fn pids_in(file: &Path) -> Vec<i32> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A port on 127.0.0.1 that nothing listens on and that no other caller in this process
/// got, from 20000 up to the kernel's ephemeral range. Other processes (other test binaries
/// run at the same time) pick at random too, and a caller that cannot bind picks again (a NATS node does). Below the
/// ephemeral range, so that no outgoing connection takes the port between this pick and the
/// bind.
pub fn free_port() -> u16 {
    static TAKEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = if ephemeral > 21000 {
        (20000, ephemeral)
    } else {
        (ephemeral.saturating_sub(10000).max(1024), ephemeral)
    };
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..1000 {
        let port = fastrand::u16(low..high);
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}..{high} after 1000 tries");
}
