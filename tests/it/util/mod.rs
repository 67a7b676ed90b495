//! Test helpers that drive the real `spoold` binary against a temporary spool.
//!
//! `Env` owns a temporary directory with a spool root and a config file; `Daemon` is a running
//! `spoold run` with its own NOTIFY_SOCKET, so tests wait on READY=1 and other notifications
//! (events, with generous upper bounds) instead of sleeping.

mod skip;
pub use skip::skip;

use std::collections::BTreeSet;
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
}

/// A running `spoold run`, with the notifications it sent and everything it logged.
pub struct Daemon {
    pub child: Child,
    pub notes: Arc<Mutex<Vec<String>>>,
    pub log: Arc<Mutex<String>>,
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
        {
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
            });
        }
        Daemon {
            child,
            notes,
            log,
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

    /// Waits until the log satisfies `pred`.
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
                // Let the stderr reader catch up with the last lines.
                thread::sleep(Duration::from_millis(50));
                return (status, start.elapsed());
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
