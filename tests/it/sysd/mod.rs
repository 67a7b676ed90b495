//! A throwaway systemd for end-to-end tests: boots systemd as PID 1 of fresh namespaces on an overlay of the host's root, drives it, and throws it away.
//!
//! The recipe is issue 3's, carried out by `boot.sh` beside this file: `unshare` new PID, mount,
//! UTS, IPC, network and cgroup namespaces; a tmpfs holding an overlayfs with `lowerdir=/`; a
//! fresh `/dev`; the test's bind mounts; masks for the host's timers and services; `pivot_root`;
//! and `exec /lib/systemd/systemd`. Everything the guest writes lands in that tmpfs, which
//! exists only in the machine's mount namespace, so the host's files (its /tmp in particular,
//! which systemd cleans at boot) are never touched, except through the bind mounts a test asks
//! for. Each machine also gets a cgroup of its own, so several machines can run at once (cargo
//! runs tests in parallel threads) without sharing a `system.slice`.
//!
//! Use from a test module (sysd skips through `crate::util::skip`):
//!
//! ```ignore
//! use crate::sysd;
//! if sysd::skipped("my_test") {
//!     return; // it printed `SKIPPED: my_test: ...` past libtest's capture (CI=true: it failed)
//! }
//! let m = sysd::Machine::boot(&[(Path::new(BIN), "/usr/local/bin/spoold")]);
//! m.write("/etc/systemd/system/x.service", "...");
//! m.sh_ok("systemctl daemon-reload && systemctl start x");
//! ```
//!
//! Besides the interface other tests code against (`skip_reason`, `Machine::boot`, `sh`,
//! `sh_ok`, `write`, `Drop`): `skipped`, `sh_within` (a bound of your own), `write_exec`,
//! `read` and `console` (what systemd printed, for a failed boot).
//!
//! A `Machine` must be dropped by the thread that booted it (keep it a local of the test
//! function): the machine's `unshare` runs with a parent-death signal, so that a test binary that
//! is killed takes its machines with it, and the kernel delivers that signal when the booting
//! thread ends.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The systemd binary the guest runs as PID 1.
const SYSTEMD: &str = "/lib/systemd/systemd";
/// How long a boot may take before the test fails: a boot takes about a second on an idle
/// machine, but a shared 2-core machine under a parallel build can be far slower.
const BOOT_WITHIN: Duration = Duration::from_secs(90);
/// The bound on one `sh` call, so that a hung command fails the test instead of hanging it.
pub const SH_WITHIN: Duration = Duration::from_secs(300);
/// The environment guest commands run with: the test's own (cargo's variables, RUST_LOG and
/// the like) must not leak into the guest, and systemctl and journalctl must not page or colour.
const GUEST_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
    ("SYSTEMD_PAGER", ""),
    ("SYSTEMD_COLORS", "0"),
    ("SYSTEMD_LESS", ""),
];

/// Why the harness cannot run here, or None when it can. Checked once per test process: it
/// boots nothing, but tries the namespaces and mounts the recipe needs.
pub fn skip_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON.get_or_init(probe).clone()
}

/// For a test's first line: when the harness cannot run here, skips `test` through the helper
/// every suite shares (`util::skip`)
/// and returns true. Under `CI=true` that fails the test instead.
pub fn skipped(test: &str) -> bool {
    let Some(why) = skip_reason() else {
        return false;
    };
    crate::util::skip(
        test,
        &format!("the throwaway systemd cannot run here: {why}"),
    );
    true
}

fn probe() -> Option<String> {
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some(format!(
            "the systemd harness needs root (effective uid is {uid})"
        ));
    }
    // CAP_SYS_ADMIN is bit 21 of the effective set.
    let cap_eff = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    if cap_eff & (1 << 21) == 0 {
        return Some("the systemd harness needs CAP_SYS_ADMIN".to_owned());
    }
    if !Path::new(SYSTEMD).is_file() {
        return Some(format!("{SYSTEMD} is missing (apt-get install systemd)"));
    }
    for tool in [
        "unshare",
        "nsenter",
        "setpriv",
        "mknod",
        "pivot_root",
        "timeout",
    ] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` is not on PATH (apt-get install util-linux coreutils)"
            ));
        }
    }
    if !fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay")) {
        return Some("the kernel has no overlayfs".to_owned());
    }
    // Each machine gets a cgroup of its own in the host's cgroup2 hierarchy (see boot.sh).
    if let Some(cg) = cgroup2_mount() {
        let probe = cg.join(format!("spoold-sysd-probe.{}", std::process::id()));
        if let Err(e) = fs::create_dir(&probe) {
            return Some(format!("cannot make a cgroup under {}: {e}", cg.display()));
        }
        let _ = fs::remove_dir(&probe);
    }
    // The namespaces and the kinds of mount the recipe uses, tried for real in a throwaway
    // mount namespace (a container may allow root everything but unshare).
    let dir = match tempfile::Builder::new()
        .prefix("spoold-sysd-probe.")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => return Some(format!("cannot make a temporary directory: {e}")),
    };
    let script = r#"set -e
mount -t tmpfs probe "$1"
mkdir "$1/u" "$1/w" "$1/m"
mount -t overlay -o "lowerdir=/,upperdir=$1/u,workdir=$1/w" probe "$1/m"
mount -t proc proc "$1/m/proc"
"#;
    let out = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--cgroup",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "probe",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "unshare with a tmpfs, an overlay of / and a /proc fails here ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// Where the host mounted the cgroup2 (unified) hierarchy, if it did.
fn cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// A booted throwaway systemd. Dropping it kills its PID 1 (and with it every process of the
/// machine), which also unmounts everything it mounted, and removes its cgroup and state.
pub struct Machine {
    /// `unshare`, whose only child is the guest's PID 1.
    unshare: Child,
    /// The guest's PID 1 as the host sees it.
    pid: u32,
    /// Host-side state: the mount point of the guest's tmpfs (empty on the host) and the
    /// console log (what systemd and the boot script printed).
    state: tempfile::TempDir,
    /// The machine's own cgroup (cgroup2), removed at drop.
    cgroup: Option<PathBuf>,
    /// Held for the machine's life on a host without a cgroup2 mount, where boot.sh cannot give
    /// the machine a cgroup of its own and two machines would share one cgroup tree. Dropped
    /// last, after the machine is gone.
    _alone: Option<MutexGuard<'static, ()>>,
}

impl Machine {
    /// Boots a machine and waits until systemd reports `running` or `degraded`. `binds` are
    /// (host path, guest path) pairs, bind-mounted read-write before systemd starts; a guest
    /// path must be absolute and must not be under /tmp, /var/tmp or /run (systemd cleans the
    /// first two at boot, through the bind into the host, and mounts a tmpfs over the last).
    /// Panics, with the console log, when the boot fails or takes longer than 90 s.
    pub fn boot(binds: &[(&Path, &str)]) -> Machine {
        if let Some(why) = skip_reason() {
            panic!("the systemd harness cannot run here: {why} (call skip_reason() first)");
        }
        static ALONE: Mutex<()> = Mutex::new(());
        let alone = cgroup2_mount().is_none().then(|| {
            ALONE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        });
        let state = tempfile::Builder::new()
            .prefix("spoold-sysd.")
            .tempdir()
            .expect("a state directory for the machine");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/sysd/boot.sh");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "sh"])
            .arg(&script)
            .arg("outer")
            .arg(state.path());
        for (host, guest) in binds {
            assert!(
                guest.starts_with('/')
                    && !["/tmp", "/var/tmp", "/run"]
                        .iter()
                        .any(|bad| guest == bad || guest.starts_with(&format!("{bad}/"))),
                "bind target {guest:?} must be absolute and outside /tmp, /var/tmp and /run"
            );
            assert!(host.exists(), "bind source {} is missing", host.display());
            cmd.arg(host).arg(guest);
        }
        let console = fs::File::create(state.path().join("console.log")).unwrap();
        let unshare = cmd
            .env_clear()
            .envs(GUEST_ENV.iter().copied())
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("run tests/it/sysd/boot.sh");
        let mut machine = Machine {
            pid: 0,
            unshare,
            cgroup: None,
            state,
            _alone: alone,
        };
        let began = Instant::now();
        // The outer stage execs unshare, whose one child is the guest's PID 1: first the inner
        // stage of boot.sh, then, after pivot_root, systemd. Nothing may be entered before
        // that exec, or it would run on the host's root.
        let pid = loop {
            if let Some(pid) = machine.guest_init()
                && fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            {
                break pid;
            }
            if let Ok(Some(status)) = machine.unshare.try_wait() {
                panic!(
                    "the machine's boot script ended with {status}; console:\n{}",
                    machine.console()
                );
            }
            if began.elapsed() > BOOT_WITHIN {
                panic!(
                    "systemd did not start within {BOOT_WITHIN:?}; console:\n{}",
                    machine.console()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        machine.pid = pid;
        machine.cgroup = fs::read_to_string(machine.state.path().join("cgroup"))
            .ok()
            .map(|s| PathBuf::from(s.trim()));
        // Until systemd has opened its private socket, systemctl fails at once; then
        // `--wait` blocks until the boot is done.
        loop {
            let left = BOOT_WITHIN.saturating_sub(began.elapsed());
            let out = machine.sh_within("systemctl is-system-running --wait", left);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break;
            }
            if began.elapsed() > BOOT_WITHIN {
                let failed = machine
                    .sh("systemctl --failed --no-pager; journalctl -b --no-pager | tail -n 50");
                panic!(
                    "systemd did not finish booting within {BOOT_WITHIN:?} (state {state:?}); \
                     console:\n{}\n{}",
                    machine.console(),
                    String::from_utf8_lossy(&failed.stdout)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        machine
    }

    /// What systemd and the boot script printed on the machine's console.
    pub fn console(&self) -> String {
        fs::read_to_string(self.state.path().join("console.log")).unwrap_or_default()
    }

    /// Runs `sh -c script` inside the machine (all its namespaces and its root), with a clean
    /// environment and stdin from /dev/null; bounded by [`SH_WITHIN`].
    pub fn sh(&self, script: &str) -> Output {
        self.sh_within(script, SH_WITHIN)
    }

    /// [`Machine::sh`] with a bound of the caller's choosing; past it the command is killed
    /// and the output has a failed status (124 or 137, from `timeout`).
    pub fn sh_within(&self, script: &str, within: Duration) -> Output {
        self.run(script, within, None)
    }

    /// Runs `script` like [`Machine::sh`], asserts it succeeded, and returns its stdout. The
    /// panic message holds the script, its status, its stdout and its stderr.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        check(script, &out)
    }

    /// Writes `contents` to `guest_path` inside the machine, creating the parent directories.
    pub fn write(&self, guest_path: &str, contents: &str) {
        let script = "mkdir -p \"$(dirname \"$0\")\" && cat >\"$0\"";
        let out = self.run_args(script, &[guest_path], SH_WITHIN, Some(contents.as_bytes()));
        check(&format!("write {guest_path}"), &out);
    }

    /// Writes an executable file (mode 0755) inside the machine.
    pub fn write_exec(&self, guest_path: &str, contents: &str) {
        self.write(guest_path, contents);
        self.sh_ok(&format!("chmod 0755 '{guest_path}'"));
    }

    /// Reads a file inside the machine (empty when it cannot be read).
    pub fn read(&self, guest_path: &str) -> String {
        let out = self.run_args("cat \"$0\"", &[guest_path], SH_WITHIN, None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run(&self, script: &str, within: Duration, input: Option<&[u8]>) -> Output {
        self.run_args(script, &[], within, input)
    }

    fn run_args(
        &self,
        script: &str,
        args: &[&str],
        within: Duration,
        input: Option<&[u8]>,
    ) -> Output {
        // `timeout` signals its whole process group, which includes the child nsenter forks
        // to enter the PID namespace.
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5"])
            .arg(format!("{}", within.as_secs().max(1)))
            .args(["nsenter", "-t"])
            .arg(self.pid.to_string())
            .args(["-a", "sh", "-c", script])
            .args(args)
            .env_clear()
            .envs(GUEST_ENV.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().expect("run nsenter");
        if let Some(input) = input {
            let mut stdin = child.stdin.take().unwrap();
            // A script that does not read its input is not an error here.
            let _ = stdin.write_all(input);
        }
        child.wait_with_output().expect("wait for nsenter")
    }

    /// The child of `unshare`: the guest's PID 1.
    fn guest_init(&self) -> Option<u32> {
        let id = self.unshare.id();
        fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

fn check(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "in the machine, `{what}` failed with {}\n--- stdout:\n{stdout}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init from outside kills every process in the namespace;
        // the last one out takes the mount namespace, and with it every guest mount, along.
        if let Some(pid) = self.guest_init() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        // The cgroup empties once the killed processes are reaped; until then rmdir says EBUSY.
        if let Some(cg) = &self.cgroup {
            let began = Instant::now();
            while cg.exists() && began.elapsed() < Duration::from_secs(10) {
                remove_cgroup(cg);
                if cg.exists() {
                    thread::sleep(Duration::from_millis(20));
                }
            }
            if cg.exists() {
                eprintln!(
                    "warning: could not remove the machine's cgroup {}",
                    cg.display()
                );
            }
        }
    }
}

/// Removes a cgroup and its descendants, deepest first (a cgroup goes only once it is empty).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
