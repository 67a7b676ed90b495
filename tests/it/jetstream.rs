//! The JetStream source (issue 14) against real 3-node clusters: the runner's contract, failures
//! and the dead-letter stream, stops that drain or hand jobs to another host, a stop while the
//! cluster is down, and start-up errors. Each "host" is a `spoold run` with a spool directory
//! of its own; all share one queue in the cluster.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::nats;
use crate::util::{self, Daemon, Env, SOON};

/// One line per handler run, `ID HOST ATTEMPT BODY`, appended by every host's handler.
struct Runs(PathBuf);

impl Runs {
    fn lines(&self) -> Vec<(String, String, u32, String)> {
        fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((
                    f.next()?.to_owned(),
                    f.next()?.to_owned(),
                    f.next()?.parse().ok()?,
                    f.next().unwrap_or("").to_owned(),
                ))
            })
            .collect()
    }

    /// The (host, attempt) of each run of `id`, in order.
    fn of(&self, id: &str) -> Vec<(String, u32)> {
        self.lines()
            .into_iter()
            .filter(|(i, ..)| i == id)
            .map(|(_, h, a, _)| (h, a))
            .collect()
    }
}

/// The handler every host runs: it records its run, then acts on the job's body: `ok` exits
/// 0, `fail` exits 3, `perm` exits 65, `slow` sleeps (on host A only, else exits 0), `hang`
/// sleeps on every host.
const HANDLER: &str = r#"body=$(cat "$SPOOLD_JOB_PATH")
printf '%s %s %s %s\n' "$SPOOLD_JOB_ID" "$HOST" "$SPOOLD_ATTEMPT" "$body" >> "$RUNS"
case "$body" in
  ok) exit 0 ;;
  fail) echo "it went wrong" >&2; exit 3 ;;
  perm) echo "cannot ever work" >&2; exit 65 ;;
  slow) if [ "$HOST" = A ]; then sleep 60; fi; exit 0 ;;
  hang) sleep 60 ;;
esac
exit 0"#;

/// A host named `name` (A, B, ...) on `cluster`'s queue; `extra` is more config (tables after
/// `[jetstream]`, or keys of it).
fn host(dir: &Path, cluster: &nats::Cluster, name: &str, extra: &str) -> Env {
    let runs = dir.join("runs");
    let env = Env::new(&["/bin/true"], "");
    let handler = env.script("handler.sh", HANDLER);
    let servers: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    env.write_config(
        &[&handler],
        &format!(
            "kill_grace = \"1s\"\nenv = {{ HOST = {name:?}, RUNS = {:?} }}\n\
             [workers]\ncount = 2\n\
             [retry]\nmax_attempts = 2\nbackoff_initial = \"200ms\"\nbackoff_max = \"200ms\"\n\
             permanent_exit_codes = [65]\n\
             [shutdown]\ndrain_timeout = \"0s\"\n\
             [backend]\nkind = \"jetstream\"\n\
             [jetstream]\nservers = [{}]\nack_wait = \"6s\"\nprogress_interval = \"1s\"\n\
             connect_timeout = \"20s\"\n{extra}",
            runs.display().to_string(),
            servers.join(", ")
        ),
    );
    env
}

/// Submits a job whose body is `body` through `spoold enqueue` on `env`; returns its ID.
fn enqueue(env: &Env, body: &str) -> String {
    let file = env.dir.path().join("job");
    fs::write(&file, body).unwrap();
    let out = env.cli(&["enqueue", file.to_str().unwrap()]);
    assert!(out.status.success(), "enqueue: {}", util::describe(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn status(env: &Env) -> serde_json::Value {
    let out = env.cli(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", util::describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `spoold failed --json` as ID → record.
fn failed(env: &Env) -> BTreeMap<String, serde_json::Value> {
    let out = env.cli(&["failed", "--json"]);
    assert!(out.status.success(), "failed: {}", util::describe(&out));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter()
        .map(|j| (j["id"].as_str().unwrap().to_owned(), j["record"].clone()))
        .collect()
}

/// Waits until `cond` holds, for up to `within`; panics naming `what` with the hosts' logs.
#[track_caller]
fn wait(within: Duration, what: &str, daemons: &[&Daemon], mut cond: impl FnMut() -> bool) {
    if util::wait_for(within, || cond().then_some(())).is_none() {
        let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
        panic!(
            "{what}: not within {within:?}; logs:\n{}",
            logs.join("\n----\n")
        );
    }
}

fn idle(env: &Env) -> bool {
    let s = status(env);
    s["queued"] == 0 && s["active"] == 0 && s["retry"] == 0
}

fn scratch_is_empty(env: &Env) -> bool {
    fs::read_dir(env.spool.join("jetstream/active")).is_ok_and(|mut d| d.next().is_none())
}

/// Issue 14 test 6, the runner's contract (`source::contract`) through the binary: a job is
/// handed out as attempt 1 with its data in a local file; one handed back at a stop comes
/// again as the same attempt; a failure comes again as the next attempt; a job failed for
/// good or done is not handed out again; and the scratch file is gone once it settled.
fn contract(test: &str, find: fn() -> Result<PathBuf, String>) {
    let Some(server) = nats::server_or_skip(test, find) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let mut da = a.start();

    // Done: one run, attempt 1, its body read from the local file.
    let ok = enqueue(&a, "ok");
    wait(SOON, "the job done", &[&da], || {
        runs.of(&ok).len() == 1 && idle(&a)
    });
    assert_eq!(runs.of(&ok), [("A".to_owned(), 1)]);
    assert!(
        runs.lines()
            .iter()
            .any(|(i, _, _, b)| *i == ok && b == "ok")
    );
    wait(SOON, "the scratch file removed", &[&da], || {
        scratch_is_empty(&a)
    });

    // Released at a stop (drain_timeout 0s: abort at once), then run again by host B as the
    // same attempt.
    let slow = enqueue(&a, "slow");
    wait(SOON, "the slow job running on A", &[&da], || {
        runs.of(&slow).len() == 1
    });
    let b = host(shared.path(), &cluster, "B", "");
    let db = b.start();
    da.stop();
    wait(SOON, "the released job run on B", &[&db], || {
        runs.of(&slow).len() == 2
    });
    assert_eq!(
        runs.of(&slow),
        [("A".to_owned(), 1), ("B".to_owned(), 1)],
        "a stop does not use up an attempt"
    );

    // Retried: attempt 2, then failed for good (max_attempts 2), never handed out again.
    let fail = enqueue(&b, "fail");
    wait(SOON, "the failing job dead-lettered", &[&db], || {
        failed(&b).contains_key(&fail)
    });
    assert_eq!(runs.of(&fail), [("B".to_owned(), 1), ("B".to_owned(), 2)]);
    wait(SOON, "the queue idle", &[&db], || idle(&b));
    assert_eq!(runs.of(&fail).len(), 2, "a dead letter is not run again");
    assert_eq!(runs.of(&ok).len(), 1, "a done job is not run again");
    wait(SOON, "the scratch file removed", &[&db], || {
        scratch_is_empty(&b)
    });
    drop(db);
}

#[test]
fn contract_holds_on_pinned_pypi_server() {
    contract("contract_holds_on_pinned_pypi_server", nats::current_server);
}

#[test]
fn contract_holds_on_debian_server() {
    contract("contract_holds_on_debian_server", nats::debian_server);
}
