//! What the persistent-handler section (issue 16) measures spoold against: the floors (the
//! claim and completion renames with a JSON-line round trip to a persistent child, the renames
//! alone, and `posix_spawn` of `/bin/true` with the renames), and two job queues run on the
//! same machine, Sidekiq (Debian's ruby-sidekiq with redis-server) and Celery (PyPI, Redis
//! broker). A peer whose software is missing is skipped with the command that installs it;
//! with `SPOOLD_BENCH_INSTALL=1` the section installs it itself.

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags, RenameFlags, open, renameat_with};

/// The minimal persistent handler the benchmark runs under spoold and in its floor: it answers
/// each JSON line with `{"id":…,"status":0}` and does nothing else.
pub fn persistent_handler_main() {
    let stdin = std::io::stdin().lock();
    let mut out = std::io::stdout().lock();
    for line in stdin.lines() {
        let Ok(line) = line else { return };
        let job: serde_json::Value = serde_json::from_str(&line).expect("a JSON job line");
        let answer = serde_json::json!({ "id": job["id"], "status": 0 });
        writeln!(out, "{answer}").expect("answer");
        out.flush().expect("flush the answer");
    }
}

/// A child answering JSON lines in Python, the least a Python handler can do.
pub const PYTHON_CHILD: &str = r#"import json, sys
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.write(json.dumps({'id': job['id'], 'status': 0}, separators=(',', ':')) + '\n')
    sys.stdout.flush()
"#;

/// Whether `SPOOLD_BENCH_INSTALL=1` lets the section install what a peer needs.
fn may_install() -> bool {
    std::env::var("SPOOLD_BENCH_INSTALL").is_ok_and(|v| v == "1")
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Opens the three spool directories a floor moves jobs through.
fn dirs(root: &Path) -> [rustix::fd::OwnedFd; 3] {
    ["new", "active", "done"].map(|sub| {
        open(
            root.join(sub),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open a spool directory")
    })
}

/// The names in `new/`, split between two threads.
fn split_names(root: &Path) -> [Vec<std::ffi::OsString>; 2] {
    let mut names: Vec<_> = fs::read_dir(root.join("new"))
        .expect("list new/")
        .map(|e| e.expect("a directory entry").file_name())
        .collect();
    names.sort();
    let odd = names.iter().skip(1).step_by(2).cloned().collect();
    let even = names.into_iter().step_by(2).collect();
    [even, odd]
}

/// A floor run: two threads, each taking half of `new/` through `per_job` between the claim
/// and the completion rename. Returns jobs/s and this process's CPU seconds per job (its
/// children excluded).
fn two_threads<S>(
    root: &Path,
    setup: impl Fn() -> S + Sync,
    per_job: impl Fn(&mut S, &Path, &std::ffi::OsStr) + Sync,
) -> (f64, f64) {
    let [new, active, done] = dirs(root);
    let halves = split_names(root);
    let n = halves[0].len() + halves[1].len();
    // Each thread sets up (a child to start) before the clock: the barrier starts it.
    let go = std::sync::Barrier::new(3);
    let (cpu_before, started) = thread::scope(|s| {
        for names in &halves {
            let (new, active, done, per_job, setup, go) =
                (&new, &active, &done, &per_job, &setup, &go);
            s.spawn(move || {
                let mut state = setup();
                go.wait();
                for name in names {
                    renameat_with(new, name, active, name, RenameFlags::NOREPLACE).expect("claim");
                    per_job(&mut state, &root.join("active").join(name), name);
                    renameat_with(active, name, done, name, RenameFlags::NOREPLACE)
                        .expect("complete");
                }
            });
        }
        go.wait();
        (super::own_cpu(), Instant::now())
    });
    let took = started.elapsed();
    let cpu = super::own_cpu() - cpu_before;
    (n as f64 / took.as_secs_f64(), cpu / n as f64)
}

/// The renames alone, from two threads.
pub fn renames_floor(root: &Path) -> f64 {
    two_threads(root, || (), |(), _, _| {}).0
}

/// A persistent child and spoold's ends of its pipes.
pub struct Persistent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: String,
}

impl Persistent {
    fn start(argv: &[String]) -> Persistent {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the persistent child");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Persistent {
            child,
            stdin,
            stdout,
            line: String::new(),
        }
    }

    fn round_trip(&mut self, path: &Path, name: &std::ffi::OsStr) {
        let request = serde_json::json!({
            "id": name.to_str().expect("a UTF-8 name"),
            "path": path.to_str().expect("a UTF-8 path"),
            "attempt": 1,
        });
        writeln!(self.stdin, "{request}").expect("write the job");
        self.line.clear();
        self.stdout
            .read_line(&mut self.line)
            .expect("read the answer");
        assert!(self.line.contains("\"status\":0"), "{}", self.line);
    }
}

impl Drop for Persistent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The renames plus a JSON-line round trip per job to a persistent child started from `argv`
/// (one per thread).
pub fn json_floor(root: &Path, argv: &[String]) -> (f64, f64) {
    two_threads(
        root,
        || Persistent::start(argv),
        |child, path, name| child.round_trip(path, name),
    )
}

/// The renames plus `posix_spawn` of `/bin/true` per job, with an environment and spawn
/// attributes prepared once, and a `waitpid`: the cheapest a process per job can be.
pub fn posix_spawn_floor(root: &Path) -> (f64, f64) {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, posix_spawn};
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let env = &env;
    two_threads(
        root,
        || {
            (
                PosixSpawnFileActions::init().expect("file actions"),
                PosixSpawnAttr::init().expect("spawn attributes"),
            )
        },
        |(actions, attr), _, _| {
            let program = c"/bin/true";
            let pid = posix_spawn(program, actions, attr, &[program], env).expect("posix_spawn");
            let pid = rustix::process::Pid::from_raw(pid.as_raw()).expect("a pid");
            let (_, status) =
                rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                    .expect("waitpid")
                    .expect("a status");
            assert_eq!(status.exit_status(), Some(0));
        },
    )
}

/// A free TCP port on loopback (for a throwaway Redis).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A throwaway redis-server on loopback, without persistence; killed when dropped.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start(dir: &Path) -> Option<Redis> {
        if !runs("redis-server", &["--version"]) {
            return None;
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let redis = Redis { child, port };
        let give_up = Instant::now() + Duration::from_secs(20);
        while Instant::now() < give_up {
            if redis.command(&["PING"]).is_some_and(|r| r == "+PONG") {
                return Some(redis);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One command; its reply's first line (`+PONG`, `:42`), or None if Redis did not answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            reply.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&reply[..reply.len() - 2]).into_owned())
    }

    /// An integer reply (`LLEN`, `HLEN`), 0 for a missing key.
    pub fn int(&self, args: &[&str]) -> i64 {
        self.command(args)
            .and_then(|r| r.strip_prefix(':').and_then(|n| n.parse().ok()))
            .unwrap_or(-1)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `empty` holds (polling every 2 ms, so that the clock's error stays small);
/// returns when it first held.
fn drained(patience: Duration, mut empty: impl FnMut() -> bool) -> Option<Instant> {
    let give_up = Instant::now() + patience;
    while Instant::now() < give_up {
        if empty() {
            return Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(c),
            rustix::process::Signal::TERM,
        );
    }
    let give_up = Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        while Instant::now() < give_up && matches!(c.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Checks for Sidekiq and Redis, installing them with apt-get when allowed.
fn sidekiq_ready() -> bool {
    let have = || runs("sidekiq", &["--help"]) || Path::new("/usr/bin/sidekiq").exists();
    if have() && runs("redis-server", &["--version"]) {
        return true;
    }
    if may_install() {
        let _ = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "ruby-sidekiq",
                "redis-server",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        return have() && runs("redis-server", &["--version"]);
    }
    println!(
        "  Sidekiq or Redis is missing: apt-get install -y ruby-sidekiq redis-server (or run \
         with SPOOLD_BENCH_INSTALL=1); Sidekiq skipped"
    );
    false
}

const SIDEKIQ_JOB: &str = r#"require 'sidekiq'
class NoopJob
  include Sidekiq::Worker
  def perform; end
end
"#;

const SIDEKIQ_PUSH: &str = r#"n = ARGV[0].to_i
(0...n).step(1000) { |i| Sidekiq::Client.push_bulk('class' => NoopJob, 'args' => Array.new([1000, n - i].min) { [] }) }
"#;

/// Sidekiq from Debian: `n` no-op jobs pushed in bulk before the clock; then 2 processes of 5
/// threads each, timed from their start until the queue is empty. Returns jobs/s.
pub fn sidekiq(dir: &Path, n: usize) -> Option<f64> {
    if !sidekiq_ready() {
        return None;
    }
    fs::create_dir_all(dir).expect("create the Sidekiq directory");
    let redis = Redis::start(dir)?;
    fs::write(dir.join("noop.rb"), SIDEKIQ_JOB).expect("write noop.rb");
    fs::write(dir.join("push.rb"), SIDEKIQ_PUSH).expect("write push.rb");
    let pushed = Command::new("ruby")
        .args(["-r", "./noop.rb", "push.rb", &n.to_string()])
        .current_dir(dir)
        .env("REDIS_URL", redis.url())
        .status()
        .is_ok_and(|s| s.success());
    let queued = redis.int(&["LLEN", "queue:default"]);
    if !pushed || queued != n as i64 {
        println!("  Sidekiq: the push left {queued} jobs queued, not {n}; skipped");
        return None;
    }
    let started = Instant::now();
    let mut workers: Vec<Child> = (0..2)
        .filter_map(|_| {
            Command::new("sidekiq")
                .args(["-c", "5", "-r", "./noop.rb"])
                .current_dir(dir)
                .env("REDIS_URL", redis.url())
                .env("RAILS_ENV", "production")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect();
    // The queue is a list; an empty list leaves at most the 10 jobs in flight, each a no-op.
    let done = drained(Duration::from_secs(600), || {
        redis.int(&["LLEN", "queue:default"]) == 0
    });
    stop(&mut workers);
    done.map(|at| n as f64 / (at - started).as_secs_f64())
}

const CELERY_TASKS: &str = r#"import os
from celery import Celery
app = Celery('tasks', broker=os.environ['BROKER'])
app.conf.task_acks_late = True
app.conf.task_ignore_result = True
@app.task
def noop():
    pass
"#;

const CELERY_PUSH: &str = r#"import sys
from tasks import app, noop
with app.producer_or_acquire() as producer:
    for _ in range(int(sys.argv[1])):
        noop.apply_async(producer=producer)
"#;

/// The virtualenv with Celery and the Redis client, under the target directory; created (with
/// pip, from PyPI) only when allowed.
fn celery_env(target: &Path) -> Option<PathBuf> {
    let venv = target.join("bench").join("celery-venv");
    let python = venv.join("bin").join("python");
    let ready = || {
        runs(
            python.to_str().unwrap_or(""),
            &["-c", "import celery, redis"],
        )
    };
    if ready() {
        return Some(venv);
    }
    if !may_install() {
        println!(
            "  Celery is missing: python3 -m venv {0} && {0}/bin/pip install 'celery[redis]' \
             (or run with SPOOLD_BENCH_INSTALL=1); Celery skipped",
            venv.display()
        );
        return None;
    }
    let _ = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status();
    let _ = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "celery[redis]"])
        .status();
    ready().then_some(venv)
}

/// Celery with the Redis broker and `acks_late`: `n` no-op tasks sent before the clock; then
/// one prefork worker with 2 processes, timed from its start until the queue and the unacked
/// set are empty. Returns jobs/s.
pub fn celery(dir: &Path, target: &Path, n: usize) -> Option<f64> {
    if !runs("redis-server", &["--version"]) {
        println!("  Redis is missing for Celery (apt-get install -y redis-server); skipped");
        return None;
    }
    let venv = celery_env(target)?;
    fs::create_dir_all(dir).expect("create the Celery directory");
    let redis = Redis::start(dir)?;
    fs::write(dir.join("tasks.py"), CELERY_TASKS).expect("write tasks.py");
    fs::write(dir.join("push.py"), CELERY_PUSH).expect("write push.py");
    let pushed = Command::new(venv.join("bin").join("python"))
        .args(["push.py", &n.to_string()])
        .current_dir(dir)
        .env("BROKER", redis.url())
        .status()
        .is_ok_and(|s| s.success());
    let queued = redis.int(&["LLEN", "celery"]);
    if !pushed || queued != n as i64 {
        println!("  Celery: the push left {queued} tasks queued, not {n}; skipped");
        return None;
    }
    let started = Instant::now();
    let mut worker = vec![
        Command::new(venv.join("bin").join("celery"))
            .args([
                "-A", "tasks", "worker", "-P", "prefork", "-c", "2", "-l", "warning",
            ])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .current_dir(dir)
            .env("BROKER", redis.url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?,
    ];
    // With acks_late a task leaves the `unacked` hash only once it has run.
    let done = drained(Duration::from_secs(1200), || {
        redis.int(&["LLEN", "celery"]) == 0 && redis.int(&["HLEN", "unacked"]) <= 0
    });
    stop(&mut worker);
    done.map(|at| n as f64 / (at - started).as_secs_f64())
}
