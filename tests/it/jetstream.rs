//! The JetStream source (issue 14) against real 3-node clusters: the runner's contract, failures
//! and the dead-letter stream, stops that drain or hand jobs to another host, a stop while the
//! cluster is down, and start-up errors. Each "host" is a `spoold run` with a spool directory
//! of its own; all share one queue in the cluster.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
/// sleeps on every host, `sleep2` exits 0 after 2 s.
const HANDLER: &str = r#"body=$(cat "$SPOOLD_JOB_PATH")
printf '%s %s %s %s\n' "$SPOOLD_JOB_ID" "$HOST" "$SPOOLD_ATTEMPT" "$body" >> "$RUNS"
case "$body" in
  ok) exit 0 ;;
  fail) echo "it went wrong" >&2; exit 3 ;;
  perm) echo "cannot ever work" >&2; exit 65 ;;
  slow) if [ "$HOST" = A ]; then sleep 60; fi; exit 0 ;;
  hang) sleep 60 ;;
  sleep2) sleep 2; exit 0 ;;
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

/// Issue 14 test 2: a failing job is retried with backoff, then dead-lettered with the reason
/// (exit status, stderr tail, attempts, host), which another host's `spoold failed` shows; a
/// permanent exit code is dead-lettered at once; `spoold retry` queues it again with a fresh
/// attempt count.
#[test]
fn failures_are_retried_then_dead_lettered_and_retried_from_any_host() {
    let test = "failures_are_retried_then_dead_lettered_and_retried_from_any_host";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let da = a.start();
    // Host B runs no daemon: it only asks.
    let b = host(shared.path(), &cluster, "B", "");

    let fail = enqueue(&a, "fail");
    let perm = enqueue(&a, "perm");
    wait(SOON, "both jobs dead-lettered", &[&da], || {
        let f = failed(&b);
        f.contains_key(&fail) && f.contains_key(&perm)
    });
    assert_eq!(runs.of(&fail), [("A".to_owned(), 1), ("A".to_owned(), 2)]);
    assert_eq!(
        runs.of(&perm),
        [("A".to_owned(), 1)],
        "a permanent code is not retried"
    );
    let letters = failed(&b);
    let record = &letters[&fail];
    assert_eq!(record["attempts"], 2, "{record}");
    assert_eq!(record["permanent"], false, "{record}");
    let last = &record["last_failure"];
    assert_eq!(last["exit_code"], 3, "{record}");
    assert_eq!(last["reason"], "exit status 3", "{record}");
    assert_eq!(last["stderr_tail"][0], "it went wrong", "{record}");
    assert!(record["failed_at"].is_string(), "{record}");
    let record = &letters[&perm];
    assert_eq!(record["attempts"], 1, "{record}");
    assert_eq!(record["permanent"], true, "{record}");
    let text = b.cli(&["failed"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains(&fail) && text.contains("it went wrong"),
        "{text}"
    );
    let s = status(&b);
    assert_eq!(s["failed"], 2, "{s}");

    // Back with a fresh count: attempts 1 and 2 again, then the dead-letter stream again.
    let out = b.cli(&["retry", &fail]);
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    wait(SOON, "the retried job run twice more", &[&da], || {
        runs.of(&fail).len() == 4 && failed(&b).contains_key(&fail)
    });
    assert_eq!(
        runs.of(&fail)[2..],
        [("A".to_owned(), 1), ("A".to_owned(), 2)],
        "a retried job starts with a fresh attempt count"
    );
    let out = b.cli(&["retry", "NOSUCHJOB"]);
    assert!(!out.status.success(), "retry of an unknown ID must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no failed job"),
        "{}",
        util::describe(&out)
    );
}

/// Issue 14 test 3: a drain finishes the job in flight and acknowledges it; an abort hands the
/// job back at once and another host starts it within a second.
#[test]
fn a_stop_drains_or_hands_the_job_to_another_host_at_once() {
    let test = "a_stop_drains_or_hands_the_job_to_another_host_at_once";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));

    // Drain: the 2 s job finishes, is acknowledged, and runs once.
    let a = host(
        shared.path(),
        &cluster,
        "A",
        "[shutdown]\ndrain_timeout = \"20s\"\n",
    );
    let a = {
        // The extra [shutdown] table replaces the default one: write the config again with
        // only the drain that this part needs.
        let text = fs::read_to_string(&a.config).unwrap();
        let text = text.replacen("[shutdown]\ndrain_timeout = \"0s\"\n", "", 1);
        fs::write(&a.config, text).unwrap();
        a
    };
    let mut da = a.start();
    let job = enqueue(&a, "sleep2");
    wait(SOON, "the job running", &[&da], || runs.of(&job).len() == 1);
    let took = da.stop();
    assert!(took < Duration::from_secs(15), "the drain took {took:?}");
    assert!(
        da.log().contains("job done"),
        "the drained job was acknowledged before the exit:\n{}",
        da.log()
    );
    wait(SOON, "the queue idle", &[], || idle(&a));
    assert_eq!(runs.of(&job).len(), 1);

    // Abort: B is idle and waiting; A aborts at once (drain_timeout 0s) and hands the job back.
    let c = host(shared.path(), &cluster, "A", "");
    let mut dc = c.start();
    let job = enqueue(&c, "slow");
    wait(SOON, "the slow job running on A", &[&dc], || {
        runs.of(&job).len() == 1
    });
    let b = host(shared.path(), &cluster, "B", "");
    let db = b.start();
    // B's claimer is pulling once it is ready; give its first pull a moment to be registered
    // by waiting for the hosts stream to list both hosts.
    wait(SOON, "both hosts listed", &[&db], || {
        status(&b)["hosts"].as_array().is_some_and(|h| h.len() >= 2)
    });
    dc.term();
    let (code, _) = dc.wait_exit(SOON);
    assert!(code.success(), "A's exit: {code}; log:\n{}", dc.log());
    let exited = Instant::now();
    wait(SOON, "the job run on B", &[&db], || {
        runs.of(&job).len() == 2
    });
    let handover = exited.elapsed();
    assert_eq!(runs.of(&job)[1], ("B".to_owned(), 1), "same attempt on B");
    assert!(
        handover < Duration::from_secs(1),
        "B started the aborted job {handover:?} after A exited; the hand-back must not wait \
         for the ack wait"
    );
    eprintln!("abort hand-over: {handover:?} after A's exit");
}

/// Issue 14 test 3: a stop while the whole cluster is down exits 0 within the stop's bound,
/// with a job in flight that cannot be handed back.
#[test]
fn a_stop_while_the_cluster_is_down_exits_0_in_bound() {
    let test = "a_stop_while_the_cluster_is_down_exits_0_in_bound";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let mut cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let mut da = a.start();
    let job = enqueue(&a, "hang");
    wait(SOON, "the job running", &[&da], || runs.of(&job).len() == 1);
    for n in 1..=3 {
        cluster.kill(n);
    }
    // STATUS= tells the operator, and the journal says it too.
    let seen = da.wait_note(|n| n.contains("STATUS=broker: disconnected since"), SOON);
    assert!(
        seen.is_some(),
        "STATUS= shows the lost connection: {:?}",
        da.notes()
    );
    assert!(da.log().contains("connection lost"), "{}", da.log());
    da.term();
    let (code, took) = da.wait_exit(SOON);
    assert!(code.success(), "exit {code}; log:\n{}", da.log());
    // drain_timeout 0s + kill_grace 1s + the bounded hand-back (1 s) + slack.
    assert!(
        took < Duration::from_secs(4),
        "the stop took {took:?}; log:\n{}",
        da.log()
    );
}

/// Start-up: a cluster that cannot be reached within connect_timeout is exit 69 (systemd
/// retries); a consumer made with another ack_wait is exit 78 naming the setting, and is not
/// changed.
#[test]
fn start_up_refuses_an_unreachable_or_contradicting_cluster() {
    let test = "start_up_refuses_an_unreachable_or_contradicting_cluster";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let env = Env::new(&["/bin/true"], "");
    env.write_config(
        &["/bin/true"],
        "[backend]\nkind = \"jetstream\"\n[jetstream]\nservers = [\"nats://127.0.0.1:1\"]\n\
         connect_timeout = \"2s\"\n",
    );
    let mut d = Daemon::spawn(&env.config, &[]);
    let (code, took) = d.wait_exit(SOON);
    assert_eq!(code.code(), Some(69), "log:\n{}", d.log());
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        d.log().contains("nats://127.0.0.1:1") && d.log().contains("connect_timeout"),
        "{}",
        d.log()
    );

    let cluster = nats::Cluster::start(&server);
    let a = host(shared.path(), &cluster, "A", "");
    let da = a.start();
    drop(da);
    let c = host(shared.path(), &cluster, "C", "");
    let text = fs::read_to_string(&c.config)
        .unwrap()
        .replace("ack_wait = \"6s\"", "ack_wait = \"9s\"");
    fs::write(&c.config, text).unwrap();
    let mut dc = Daemon::spawn(&c.config, &[]);
    let (code, _) = dc.wait_exit(SOON);
    assert_eq!(code.code(), Some(78), "log:\n{}", dc.log());
    let log = dc.log();
    assert!(
        log.contains("ack_wait 6s") && log.contains("9s") && log.contains("jetstream.ack_wait"),
        "{log}"
    );
    // Unchanged: host A's config still starts.
    let da = a.start();
    drop(da);
}
