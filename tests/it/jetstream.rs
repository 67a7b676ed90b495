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
    host_with(dir, cluster, name, extra, HANDLER, LEASE)
}

/// The lease of the tests: short, so that a lost host's jobs come back soon.
const LEASE: &str = "ack_wait = \"6s\"\nprogress_interval = \"1s\"\n";

/// The retry policy of the tests: two attempts, close together.
const RETRY: &str = "max_attempts = 2\nbackoff_initial = \"200ms\"\nbackoff_max = \"200ms\"\n";

/// [`host`] with a handler script and a lease of the caller's.
fn host_with(
    dir: &Path,
    cluster: &nats::Cluster,
    name: &str,
    extra: &str,
    handler: &str,
    lease: &str,
) -> Env {
    host_retrying(dir, cluster, name, extra, handler, lease, RETRY)
}

/// [`host_with`] with the `[retry]` keys of the caller's (`permanent_exit_codes` is 65).
fn host_retrying(
    dir: &Path,
    cluster: &nats::Cluster,
    name: &str,
    extra: &str,
    handler: &str,
    lease: &str,
    retry: &str,
) -> Env {
    let runs = dir.join("runs");
    let env = Env::new(&["/bin/true"], "");
    let handler = env.script("handler.sh", handler);
    let servers: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    env.write_config(
        &[&handler],
        &format!(
            "kill_grace = \"1s\"\nenv = {{ HOST = {name:?}, RUNS = {:?} }}\n\
             [workers]\ncount = 2\n\
             [retry]\n{retry}permanent_exit_codes = [65]\n\
             [shutdown]\ndrain_timeout = \"0s\"\n\
             [backend]\nkind = \"jetstream\"\n\
             [jetstream]\nservers = [{}]\n{lease}connect_timeout = \"20s\"\n{extra}",
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
/// attempt count. Failures never count as deliveries without an outcome: with
/// `max_unsettled_deliveries = 1`, the tightest bound, every attempt still runs.
#[test]
fn failures_are_retried_then_dead_lettered_and_retried_from_any_host() {
    let test = "failures_are_retried_then_dead_lettered_and_retried_from_any_host";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(
        shared.path(),
        &cluster,
        "A",
        "max_unsettled_deliveries = 1\n",
    );
    let da = a.start();
    // Host B runs no daemon: it only asks.
    let b = host(shared.path(), &cluster, "B", "");

    let fail = enqueue(&a, "fail");
    let perm = enqueue(&a, "perm");

    // Many files at once (many publishes in flight): one that cannot be read is named and
    // left out, and the others are submitted, their IDs printed in the order of the files.
    let fifo = shared.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let files = ["first", "middle", "last"].map(|name| shared.path().join(name));
    for file in &files {
        fs::write(file, "ok").unwrap();
    }
    let out = b.cli(&[
        "enqueue",
        files[0].to_str().unwrap(),
        fifo.to_str().unwrap(),
        files[1].to_str().unwrap(),
        files[2].to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", util::describe(&out));
    assert!(err.contains("fifo: not submitted: is a FIFO"), "{err}");
    assert!(
        ["first", "middle", "last"]
            .iter()
            .all(|name| !err.contains(name)),
        "{err}"
    );
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 3, "{}", util::describe(&out));
    assert!(ids.is_sorted(), "IDs in the order of the files: {ids:?}");
    wait(SOON, "both jobs dead-lettered", &[&da], || {
        let f = failed(&b);
        f.contains_key(&fail) && f.contains_key(&perm)
    });
    wait(SOON, "both files' jobs done", &[&da], || {
        ids.iter().all(|id| runs.of(id) == [("A".to_owned(), 1)])
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
    // drain_timeout 0s + kill_grace 1s + the bounded hand-back (1 s) + the wait for the last
    // pull (1.5 s) + slack.
    assert!(
        took < Duration::from_millis(4500),
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

/// A stop while spoold waits for the cluster at start (here one that never answers, with a
/// minute's `connect_timeout`) ends it at once with exit 0; meanwhile it tells systemd to
/// extend its start timeout, and says in STATUS= what it waits for. Before, the stop waited out
/// the `connect_timeout`, past the unit's stop timeout, and systemd sent SIGKILL.
#[test]
fn a_stop_while_waiting_for_the_cluster_at_start_exits_0_at_once() {
    let env = Env::new(&["/bin/true"], "");
    env.write_config(
        &["/bin/true"],
        "[backend]\nkind = \"jetstream\"\n[jetstream]\nservers = [\"nats://127.0.0.1:1\"]\n\
         connect_timeout = \"60s\"\n",
    );
    let mut d = Daemon::spawn(&env.config, &[]);
    d.wait_note(|n| n.contains("EXTEND_TIMEOUT_USEC="), SOON)
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC= while starting; log:\n{}", d.log()));
    assert!(
        d.notes()
            .iter()
            .any(|n| n.contains("STATUS=waiting for the NATS cluster")),
        "{:?}",
        d.notes()
    );
    d.term();
    let (code, took) = d.wait_exit(SOON);
    assert_eq!(code.code(), Some(0), "log:\n{}", d.log());
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    assert!(!d.notes().iter().any(|n| n.contains("READY=1")));
}

/// The lease rule: while the whole cluster is down no heartbeat is confirmed, so after
/// `ack_wait - progress_interval` (5 s here) the host ends the handler and sends nothing for
/// that delivery; once the cluster is back the job runs again, as the same attempt, and the
/// daemon kept running throughout.
#[test]
fn a_lease_that_cannot_be_renewed_ends_the_handler_and_the_job_runs_again() {
    let test = "a_lease_that_cannot_be_renewed_ends_the_handler_and_the_job_runs_again";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let mut cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let da = a.start();
    let job = enqueue(&a, "hang");
    wait(SOON, "the job running", &[&da], || runs.of(&job).len() == 1);
    let down = Instant::now();
    for n in 1..=3 {
        cluster.kill(n);
    }
    wait(SOON, "the lease given up", &[&da], || {
        da.log().contains("lease lost")
    });
    let lost_after = down.elapsed();
    assert!(
        lost_after < Duration::from_secs(6),
        "the lease must be given up before the ack wait (6 s) ends, not after {lost_after:?}"
    );
    wait(SOON, "the handler ended", &[&da], || {
        da.log().contains("ended because the source lost its lease")
            || da
                .log()
                .contains("lease lost: the job was not acknowledged")
    });
    for n in 1..=3 {
        cluster.restart(n);
    }
    cluster.wait_ready(nats::READY_WITHIN);
    wait(
        Duration::from_secs(90),
        "the job run again after the outage",
        &[&da],
        || runs.of(&job).len() >= 2,
    );
    assert_eq!(
        runs.of(&job)[1].1,
        1,
        "a lost lease does not use up an attempt"
    );
}

/// Runs `f` with a JetStream context on `cluster`, on a runtime of its own: a test's look at
/// the cluster, or an operator's action on it, from outside spoold.
fn on_cluster<T>(
    cluster: &nats::Cluster,
    f: impl AsyncFnOnce(async_nats::jetstream::Context) -> T,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .connect(cluster.urls().as_slice())
            .await
            .unwrap();
        f(async_nats::jetstream::new(client)).await
    })
}

/// The stream leader's node number, from the stream's info.
fn stream_leader(cluster: &nats::Cluster) -> usize {
    let name = on_cluster(cluster, async |js| {
        let give_up = Instant::now() + SOON;
        loop {
            if let Ok(mut stream) = js.get_stream("SPOOLD_default").await
                && let Ok(info) = stream.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            {
                return leader;
            }
            assert!(Instant::now() < give_up, "no stream leader within {SOON:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    cluster.number(&name)
}

/// Issue 14 test 1: three hosts consume 5,000 jobs while one host is SIGKILLed, the stream
/// leader's node is SIGKILLed and restarted, and another host is stopped (SIGTERM) and started
/// again. Every job ends with a successful run; the only jobs run twice are jobs that were in
/// flight on the SIGKILLed host (at most its worker count); nothing is dead-lettered; every
/// SIGTERM exit is 0.
///
/// An acknowledgement that a dying leader confirmed and lost comes back as a redelivery; the
/// settled marker written beside it must keep that job from running again, or this test sees
/// it twice on a surviving host.
///
/// It keeps both cores busy for a minute, so it runs alone: `.ci/run` runs it after the suite,
/// and by hand `cargo test --test it -- --ignored three_hosts`.
#[test]
#[ignore = "heavy (3 hosts, 5,000 jobs, node kills): .ci/run runs it alone after the suite"]
fn three_hosts_lose_no_job_through_host_and_node_crashes() {
    const JOBS: usize = 5_000;
    let test = "three_hosts_lose_no_job_through_host_and_node_crashes";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let mut cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("chaos");
    let lease = "ack_wait = \"15s\"\nprogress_interval = \"2s\"\n";
    let hosts: Vec<Env> = ["A", "B", "C"]
        .iter()
        .map(|name| {
            let handler = format!(
                "printf 'start %s %s %s\\n' \"$SPOOLD_JOB_ID\" \"$HOST\" \"$SPOOLD_ATTEMPT\" >> {log:?}\n\
                 sleep 0.02\n\
                 printf 'end %s %s\\n' \"$SPOOLD_JOB_ID\" \"$HOST\" >> {log:?}\n",
                log = log.display().to_string()
            );
            let env = host_with(shared.path(), &cluster, name, "", &handler, lease);
            // A SIGTERM drains here: the jobs in flight finish and are acknowledged.
            let text = fs::read_to_string(&env.config)
                .unwrap()
                .replace("drain_timeout = \"0s\"", "drain_timeout = \"10s\"");
            fs::write(&env.config, text).unwrap();
            env
        })
        .collect();
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    // Each delivery's number is logged, for a failure's story to show how a job came back.
    let start = |env: &Env| {
        util::Daemon::start(
            &env.config,
            &[("RUST_LOG", "info,spoold::source::jetstream=debug")],
        )
    };
    let mut da = start(a);
    let mut db = start(b);
    let mut dc = start(c);

    let jobs = shared.path().join("jobs");
    fs::create_dir(&jobs).unwrap();
    let files: Vec<String> = (0..JOBS)
        .map(|i| {
            let f = jobs.join(format!("{i}"));
            fs::write(&f, format!("job {i}")).unwrap();
            f.display().to_string()
        })
        .collect();
    let mut args = vec!["enqueue"];
    args.extend(files.iter().map(String::as_str));
    let began = Instant::now();
    // In the background: the faults come while jobs are still being submitted. Its IDs go to
    // a file, which (unlike a pipe nobody reads yet) never blocks it.
    let printed = shared.path().join("ids");
    let enqueue = std::process::Command::new(util::BIN)
        .args(&args)
        .arg("--config")
        .arg(&a.config)
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&printed).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let ends = || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("end "))
            .count()
    };
    let all = [&da, &db, &dc];
    let long = Duration::from_secs(300);
    wait(long, "500 jobs done", &all, || ends() >= 500);
    db.child.kill().unwrap();
    db.child.wait().unwrap();
    eprintln!("B SIGKILLed after {:?}", began.elapsed());
    wait(long, "1,500 jobs done", &[&da, &dc], || ends() >= 1_500);
    let leader = stream_leader(&cluster);
    cluster.kill(leader);
    eprintln!(
        "stream leader n{leader} SIGKILLed after {:?}",
        began.elapsed()
    );
    wait(long, "2,500 jobs done", &[&da, &dc], || ends() >= 2_500);
    cluster.restart(leader);
    // C's SIGTERM comes once the cluster is whole again. A drain during the election that the
    // restart may start could not have its acknowledgements confirmed within its bound (a
    // broker that does not answer never holds up a stop), and those jobs would come back and
    // run again: at-least-once, but not the duplicate bound this test checks.
    cluster.wait_ready(nats::READY_WITHIN);
    dc.term();
    let (code, _) = dc.wait_exit(SOON);
    assert!(
        code.success(),
        "C's SIGTERM exit: {code}; log:\n{}",
        dc.log()
    );
    let first_c = dc.log();
    let mut dc = start(c);
    let out = enqueue.wait_with_output().unwrap();
    assert!(out.status.success(), "enqueue: {}", util::describe(&out));
    let ids: Vec<String> = fs::read_to_string(&printed)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        ids.len(),
        JOBS,
        "enqueue printed every ID, through the leader kill"
    );
    eprintln!("enqueued {JOBS} in {:?}", began.elapsed());
    wait(long, "every job done", &[&da, &dc], || {
        ends() >= JOBS && idle(a)
    });
    eprintln!("all done after {:?}", began.elapsed());

    let text = fs::read_to_string(&log).unwrap();
    let mut started: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut ended: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "start" => started.entry(f[1]).or_default().push(f[2]),
            "end" => *ended.entry(f[1]).or_default() += 1,
            _ => {}
        }
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !ended.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} jobs never ended: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(started.len(), JOBS, "only submitted jobs ran");
    let twice: Vec<(&str, &Vec<&str>)> = started
        .iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|(id, hosts)| (*id, hosts))
        .collect();
    eprintln!("jobs run more than once: {twice:?}");
    let logs = [
        ("A", da.log()),
        ("B", db.log()),
        ("C before its restart", first_c),
        ("C after it", dc.log()),
    ];
    // Each delivery of a settled job that was settled again, with the delivery's number: a
    // first delivery here is one whose record the cluster lost along with its acknowledgement.
    let resettled: Vec<String> = logs
        .iter()
        .flat_map(|(host, log)| {
            let lines: Vec<&str> = log.lines().collect();
            lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.contains("settled again without running it"))
                .map(|(i, l)| {
                    let id = l.split("job_id=").nth(1).unwrap_or("").split(' ').next();
                    let delivered = lines[..i]
                        .iter()
                        .rev()
                        .find(|e| {
                            e.contains("job delivered") && id.is_some_and(|id| e.contains(id))
                        })
                        .copied()
                        .unwrap_or("(no delivery line)");
                    format!("{host}: {delivered}\n  {l}")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!(
        "deliveries of settled jobs, settled again without a run: {}\n{}",
        resettled.len(),
        resettled.join("\n")
    );
    // What every host logged of each job that ran twice, for a failure to show.
    let story: Vec<String> = logs
        .iter()
        .flat_map(|(host, log)| {
            log.lines()
                .filter(|l| twice.iter().any(|(id, _)| l.contains(id)))
                .map(move |l| format!("{host}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        twice.iter().all(|(_, hosts)| hosts.contains(&"B")),
        "a job ran twice without having been on the SIGKILLed host: {twice:?}; the hosts' \
         lines about them:\n{}",
        story.join("\n")
    );
    assert!(
        twice.len() <= 2,
        "more reruns ({}) than B had workers (2): {twice:?}",
        twice.len()
    );
    assert!(failed(a).is_empty(), "the dead-letter stream is empty");
    da.stop();
    dc.stop();
}

/// Runs openssl with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        util::describe(&out)
    );
}

/// Writes into `d` a CA (`ca.pem`), a CA that signed nothing here (`wrong-ca.pem`), and a
/// server and a client certificate signed by the first (`server.pem`/`.key`,
/// `client.pem`/`.key`, both for IP 127.0.0.1 and localhost), all valid for two days.
fn certificates(d: &Path) {
    let subj = |cn: &str| format!("/CN={cn}");
    for ca in ["ca", "wrong-ca"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &subj(ca),
            ],
        );
    }
    fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &subj(who),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.pem"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
    }
}

/// The path of file `name` in `d`, as a TOML string (quoted, escaped).
fn toml_path(d: &Path, name: &str) -> String {
    format!("{:?}", d.join(name).display().to_string())
}

/// Issue 14 test 5: spoold connects to a 3-node cluster that requires mutual TLS on its client
/// port and a user JWT of the account it trusts (a `.creds` file), creates its streams, runs a
/// job, and the client commands work with the same config. What waiting cannot fix is a clear
/// start-up error, exit 78, at once rather than after `connect_timeout` (20 s here): a wrong
/// CA names `tls_ca_file`; no creds file, one of another operator, or one of an account the
/// cluster does not know names `jetstream.creds_file`; a missing creds file names the file.
fn creds_and_tls(test: &str, find: fn() -> Result<PathBuf, String>) {
    let Some(server) = nats::server_or_skip(test, find) else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    certificates(d);
    let trust = nats::jwt::Operator::new("spoold-test");
    // The permissions README.md tells an operator to give spoold's user, for the queue
    // `default`: enough for the daemon and every client command the test runs.
    trust.user_creds(
        &d.join("spoold.creds"),
        &[
            "spoold.default.>",
            "$O.SPOOLD_default_PAYLOADS.>",
            "$JS.API.>",
            "$JS.ACK.SPOOLD_default.>",
        ],
        &["_INBOX.>"],
    );
    nats::jwt::Operator::new("stranger").user_creds(&d.join("stranger.creds"), &[], &[]);
    trust.unknown_account_user_creds(&d.join("unknown-account.creds"));
    // Client TLS, mutual (`verify`), with a handshake allowed 5 s instead of the server's
    // default of 2 s, which a shared machine under a build can miss.
    let tls = format!(
        "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n  \
         timeout: 5\n}}\n",
        toml_path(d, "server.pem"),
        toml_path(d, "server.key"),
        toml_path(d, "ca.pem"),
    );
    let cluster = nats::Cluster::start_with(&server, &format!("{tls}{}", trust.server_config()));

    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    // A host on tls:// URLs with the client certificate, the CA `ca` and the creds file
    // `creds` (None: no creds_file key).
    let secure = |name: &str, ca: &str, creds: Option<&str>| {
        let mut extra = format!(
            "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}\n",
            toml_path(d, ca),
            toml_path(d, "client.pem"),
            toml_path(d, "client.key"),
        );
        if let Some(creds) = creds {
            extra.push_str(&format!("creds_file = {}\n", toml_path(d, creds)));
        }
        let env = host(shared.path(), &cluster, name, &extra);
        let text = fs::read_to_string(&env.config)
            .unwrap()
            .replace("\"nats://", "\"tls://");
        fs::write(&env.config, text).unwrap();
        env
    };

    let a = secure("A", "ca.pem", Some("spoold.creds"));
    let mut da = a.start();
    let job = enqueue(&a, "ok");
    wait(SOON, "the job run over TLS with the creds", &[&da], || {
        runs.of(&job).len() == 1 && idle(&a)
    });
    assert_eq!(runs.of(&job), [("A".to_owned(), 1)]);
    let s = status(&a);
    assert_eq!(s["backend"], "jetstream", "{s}");
    assert!(
        s["hosts"].as_array().is_some_and(|h| !h.is_empty()),
        "the hosts stream lists A: {s}"
    );
    let fail = enqueue(&a, "perm");
    wait(SOON, "the failing job dead-lettered", &[&da], || {
        failed(&a).contains_key(&fail)
    });
    let out = a.cli(&["retry", &fail]);
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    wait(SOON, "the retried job run again", &[&da], || {
        runs.of(&fail).len() == 2
    });
    da.stop();

    // Each refusal: exit 78 well before connect_timeout, the log naming what to check.
    let refused = |env: &Env, what: &str, names: &[&str]| {
        let mut daemon = Daemon::spawn(&env.config, &[]);
        let (code, took) = daemon.wait_exit(SOON);
        let log = daemon.log();
        assert_eq!(code.code(), Some(78), "{what}: log:\n{log}");
        assert!(
            took < Duration::from_secs(15),
            "{what} is not retried until connect_timeout: {took:?}\n{log}"
        );
        for name in names {
            assert!(log.contains(name), "{what}: the log names {name:?}:\n{log}");
        }
    };
    refused(
        &secure("W", "wrong-ca.pem", Some("spoold.creds")),
        "a wrong CA",
        &["tls_ca_file"],
    );
    let anonymous = secure("N", "ca.pem", None);
    refused(
        &anonymous,
        "no creds file",
        &["refused spoold's credentials", "jetstream.creds_file"],
    );
    // A client command says the same.
    let out = anonymous.cli(&["status"]);
    assert_eq!(out.status.code(), Some(78), "{}", util::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jetstream.creds_file"),
        "{}",
        util::describe(&out)
    );
    refused(
        &secure("S", "ca.pem", Some("stranger.creds")),
        "a user of another operator",
        &["refused spoold's credentials", "jetstream.creds_file"],
    );
    refused(
        &secure("U", "ca.pem", Some("unknown-account.creds")),
        "a user of an account the cluster does not know",
        &["refused spoold's credentials", "jetstream.creds_file"],
    );
    let missing = d.join("missing.creds").display().to_string();
    refused(
        &secure("M", "ca.pem", Some("missing.creds")),
        "a missing creds file",
        &["jetstream.creds_file", &missing],
    );
}

#[test]
fn creds_and_mutual_tls_connect_to_a_cluster_that_requires_them() {
    creds_and_tls(
        "creds_and_mutual_tls_connect_to_a_cluster_that_requires_them",
        nats::current_server,
    );
}

#[test]
fn creds_and_mutual_tls_connect_to_a_debian_cluster_that_requires_them() {
    creds_and_tls(
        "creds_and_mutual_tls_connect_to_a_debian_cluster_that_requires_them",
        nats::debian_server,
    );
}

/// A user whose JWT lacks a permission spoold needs (here `$JS.API.>`, so it cannot create
/// its streams) is a configuration error waiting cannot fix: exit 78 at start, naming the
/// refused subject and `jetstream.creds_file`, not a wait for `connect_timeout` ending in 69
/// (which systemd would restart without end). A client command says the same.
#[test]
fn a_user_without_the_permissions_spoold_needs_is_a_clear_start_up_error() {
    let test = "a_user_without_the_permissions_spoold_needs_is_a_clear_start_up_error";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let creds = files.path().join("narrow.creds");
    let trust = nats::jwt::Operator::new("spoold-test");
    trust.user_creds(
        &creds,
        &["spoold.default.>", "$JS.ACK.SPOOLD_default.>"],
        &["_INBOX.>"],
    );
    let cluster = nats::Cluster::start_with(&server, &trust.server_config());
    let shared = tempfile::tempdir().unwrap();
    let extra = format!("creds_file = {:?}\n", creds.display().to_string());
    let a = host(shared.path(), &cluster, "A", &extra);
    let mut daemon = Daemon::spawn(&a.config, &[]);
    let (code, took) = daemon.wait_exit(Duration::from_secs(60));
    let log = daemon.log();
    assert_eq!(code.code(), Some(78), "log:\n{log}");
    assert!(
        took < Duration::from_secs(15),
        "not retried until connect_timeout: {took:?}\n{log}"
    );
    assert!(
        log.contains("Permissions Violation") && log.contains("jetstream.creds_file"),
        "{log}"
    );
    let began = Instant::now();
    let out = a.cli(&["status"]);
    assert_eq!(out.status.code(), Some(78), "{}", util::describe(&out));
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "status retried until connect_timeout: {:?}",
        began.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jetstream.creds_file"), "{err}");
}

/// Runs `ip ARGS`; panics with its output when it fails.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        util::describe(&out)
    );
}

/// A network namespace joined to this one by a veth pair, removed when dropped.
struct Netns {
    name: String,
    link: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A job whose acknowledgement the cluster lost after confirming it (a consumer leader killed
/// in that instant; here the test-only switch `SPOOLD_TEST_LOSE_ACK` leaves the first job's ack
/// out, since the real loss is too rare to wait for) comes back an ack wait later, and its
/// settled marker has it acknowledged again without a second run.
#[test]
fn a_job_whose_acknowledgement_was_lost_is_not_run_again() {
    let test = "a_job_whose_acknowledgement_was_lost_is_not_run_again";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let mut da = Daemon::start(&a.config, &[("SPOOLD_TEST_LOSE_ACK", "1")]);
    let job = enqueue(&a, "ok");
    // The ack wait is 6 s: the redelivery comes then, and is settled at once.
    wait(
        Duration::from_secs(60),
        "the redelivery settled",
        &[&da],
        || da.log().contains("settled again without running it"),
    );
    wait(SOON, "the queue idle", &[&da], || idle(&a));
    assert_eq!(
        runs.of(&job),
        vec![("A".to_owned(), 1)],
        "the job ran once; log:\n{}",
        da.log()
    );
    assert!(failed(&a).is_empty());
    da.stop();
}

/// A consumer leader that dies can lose, with an acknowledgement it confirmed, the record of
/// the delivery itself: the job then comes back as a first delivery, on any host. (Here the
/// test-only switch `SPOOLD_TEST_LOSE_ACK` leaves the ack out, and the consumer is deleted and
/// made again, which forgets every delivery in the same way; the chaos test met the real case.)
/// The settled marker has the job acknowledged again without a second run.
#[test]
fn a_job_whose_delivery_the_cluster_forgot_is_not_run_again() {
    let test = "a_job_whose_delivery_the_cluster_forgot_is_not_run_again";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let b = host(shared.path(), &cluster, "B", "");
    let mut da = Daemon::start(&a.config, &[("SPOOLD_TEST_LOSE_ACK", "1")]);
    let job = enqueue(&a, "ok");
    wait(SOON, "the job done on A", &[&da], || {
        da.log().contains("job done")
    });
    da.stop();
    delete_consumer(&cluster);
    // B makes the consumer again, which delivers the job as if it had never been delivered.
    let mut db = b.start();
    wait(SOON, "the delivery settled", &[&db], || {
        db.log().contains("settled again without running it")
    });
    wait(SOON, "the queue idle", &[&db], || idle(&b));
    assert_eq!(
        runs.of(&job),
        vec![("A".to_owned(), 1)],
        "the job ran once, on A; B's log:\n{}",
        db.log()
    );
    assert!(failed(&b).is_empty());
    db.stop();
}

/// A delivery that reaches a worker just as the worker stops waiting for it (a reload, or a
/// stop, comes in that instant) goes back to the queue at once and runs; before, its
/// heartbeat kept it from every host for as long as the daemon ran. The test-only switch
/// `SPOOLD_TEST_DROP_DELIVERY` has the first delivery dropped that way.
#[test]
fn a_delivery_its_worker_dropped_goes_back_and_runs() {
    let test = "a_delivery_its_worker_dropped_goes_back_and_runs";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let mut da = Daemon::start(&a.config, &[("SPOOLD_TEST_DROP_DELIVERY", "1")]);
    let job = enqueue(&a, "ok");
    wait(SOON, "the job done", &[&da], || {
        da.log().contains("job done")
    });
    let log = da.log();
    assert!(
        log.contains("job handed back to the queue unsettled"),
        "the dropped delivery was handed back; A's log:\n{log}"
    );
    assert_eq!(runs.of(&job), vec![("A".to_owned(), 1)], "A's log:\n{log}");
    da.stop();
}

/// A job whose payload fills its message all but the room kept for headers, and whose handler
/// fails with a long stderr, still reaches the dead-letter stream: its record, which travels in
/// a header, is shortened to fit beside the payload. Before, the server refused the dead letter
/// at every try, and the job held its worker for good.
#[test]
fn a_full_sized_job_that_fails_loudly_is_dead_lettered() {
    let test = "a_full_sized_job_that_fails_loudly_is_dead_lettered";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let handler = "for i in 1 2 3 4 5 6 7 8 9 10; do printf 'line %s %0600d\\n' \"$i\" 0 >&2; done\n\
                   exit 65";
    let a = host_with(shared.path(), &cluster, "A", "", handler, LEASE);
    let mut da = a.start();
    // The largest payload that travels in the job's own message: the server's largest
    // message (1 MiB by default) less the 4 KiB that enqueue keeps for headers.
    let file = a.dir.path().join("big");
    fs::write(&file, vec![b'x'; 1024 * 1024 - 4096]).unwrap();
    let out = a.cli(&["enqueue", file.to_str().unwrap()]);
    assert!(out.status.success(), "enqueue: {}", util::describe(&out));
    let job = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    wait(SOON, "the job in the dead-letter stream", &[&da], || {
        failed(&a).contains_key(&job)
    });
    let record = &failed(&a)[&job];
    assert_eq!(record["attempts"], 1, "{record}");
    assert_eq!(record["permanent"], true, "{record}");
    let last = &record["last_failure"];
    assert_eq!(last["exit_code"], 65, "{record}");
    let tail = last["stderr_tail"].as_array().unwrap();
    assert!(
        tail.last()
            .and_then(|l| l.as_str())
            .is_some_and(|l| l.starts_with("line 10 ")),
        "the newest stderr line is kept: {record}"
    );
    assert!(da.log().contains("the dead letter's record was shortened"));
    da.stop();
}

/// The failed run that a forgotten delivery hides still counts: the job comes back as a first
/// delivery, at once, and its retry marker sends it to the attempts record, so it runs next as
/// attempt 2 and only once its backoff is over. (The consumer is deleted and made again, which
/// forgets the failed delivery and the delay of its nak, as a dying consumer leader can.)
#[test]
fn a_failed_run_the_cluster_forgot_still_counts_and_waits_out_its_backoff() {
    let test = "a_failed_run_the_cluster_forgot_still_counts_and_waits_out_its_backoff";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    // The first retry waits 5-10 s (the backoff's jitter takes up to half).
    let retry = "max_attempts = 2\nbackoff_initial = \"10s\"\nbackoff_max = \"10s\"\n";
    let a = host_retrying(shared.path(), &cluster, "A", "", HANDLER, LEASE, retry);
    let b = host_retrying(shared.path(), &cluster, "B", "", HANDLER, LEASE, retry);
    let mut da = a.start();
    let job = enqueue(&a, "fail");
    wait(SOON, "the first attempt failed on A", &[&da], || {
        da.log().contains("job failed; retry in")
    });
    da.stop();
    delete_consumer(&cluster);
    let mut db = b.start();
    wait(SOON, "the job dead-lettered", &[&db], || {
        failed(&b).contains_key(&job)
    });
    let log = db.log();
    assert_eq!(
        runs.of(&job),
        vec![("A".to_owned(), 1), ("B".to_owned(), 2)],
        "the attempt count went on from A's failed run; B's log:\n{log}"
    );
    assert!(
        log.contains("job delivered before its retry is due"),
        "B gave the early delivery back; its log:\n{log}"
    );
    let record = &failed(&b)[&job];
    assert_eq!(record["attempts"], 2, "{record}");
    let time = |v: &serde_json::Value| humantime::parse_rfc3339(v.as_str().unwrap()).unwrap();
    let gap = time(&record["last_failure"]["started_at"])
        .duration_since(time(&record["first_attempt_at"]))
        .unwrap_or_default();
    assert!(
        gap >= Duration::from_secs(4),
        "attempt 2 started {gap:?} after attempt 1, before its backoff of 5-10 s was over: \
         {record}"
    );
    db.stop();
}

/// `spoold retry` on the broker refuses an ID that is no subject token (`*` and `>` would
/// name every job's dead letter and record, `a.b` another subject) before anything moves; and a
/// retried job that runs and fails again before the command has removed its old dead letter
/// keeps its new one. Before, `retry '*'` removed every dead letter and attempts record, and
/// the quick failure's dead letter was removed with the old one: the job was lost. The
/// test-only switch `SPOOLD_TEST_RETRY_PAUSE` holds the command between the two steps.
#[test]
fn retry_refuses_wildcards_and_keeps_a_dead_letter_written_meanwhile() {
    let test = "retry_refuses_wildcards_and_keeps_a_dead_letter_written_meanwhile";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let mut da = a.start();
    let first = enqueue(&a, "perm");
    let second = enqueue(&a, "perm");
    wait(SOON, "both jobs dead-lettered", &[&da], || {
        let f = failed(&a);
        f.contains_key(&first) && f.contains_key(&second)
    });
    for id in ["*", ">", "a.b", &format!("{first}.*"), "\\x2a"] {
        let out = a.cli(&["retry", id, &first]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "retry {id}: {}",
            util::describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a job ID"), "retry {id}: {err}");
        assert!(err.contains("nothing was retried"), "retry {id}: {err}");
    }
    let left = failed(&a);
    assert!(
        left.contains_key(&first) && left.contains_key(&second),
        "{left:?}"
    );
    assert_eq!(runs.of(&first).len(), 1, "not retried");

    // The retried job fails again (exit 65, permanent) while the command pauses.
    let out = std::process::Command::new(util::BIN)
        .args(["retry", &first, "--config"])
        .arg(&a.config)
        .env("SPOOLD_TEST_RETRY_PAUSE", "3s")
        .output()
        .unwrap();
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    assert_eq!(runs.of(&first).len(), 2, "it ran again during the pause");
    let after = failed(&a);
    assert!(
        after.contains_key(&first),
        "the second dead letter was kept: {after:?}; log:\n{}",
        da.log()
    );
    assert_eq!(
        after[&first]["attempts"], 1,
        "a fresh count: {}",
        after[&first]
    );
    da.stop();
}

/// A handler may do what it likes with the file it is given, even put a FIFO in its place:
/// the job's dead letter carries the payload as the cluster delivered it, the daemon never
/// opens that file again (the open of a FIFO with no writer would never return, on the thread
/// that also answers a stop), and `spoold retry` runs the job again on its own bytes.
#[test]
fn a_handler_that_swaps_its_file_for_a_fifo_does_not_change_the_dead_letter() {
    let test = "a_handler_that_swaps_its_file_for_a_fifo_does_not_change_the_dead_letter";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let handler = r#"if [ -e "$RUNS.swapped" ]; then cat "$SPOOLD_JOB_PATH" > "$RUNS.body"; exit 0; fi
touch "$RUNS.swapped"
rm -f "$SPOOLD_JOB_PATH" && mkfifo "$SPOOLD_JOB_PATH"
exit 65"#;
    let a = host_with(shared.path(), &cluster, "A", "", handler, LEASE);
    let mut da = a.start();
    let job = enqueue(&a, "the payload as submitted");
    wait(SOON, "the job in the dead-letter stream", &[&da], || {
        failed(&a).contains_key(&job)
    });
    let out = a.cli(&["retry", &job]);
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    let body = shared.path().join("runs.body");
    wait(
        SOON,
        "the retried job to run on its payload",
        &[&da],
        || body.exists() && idle(&a),
    );
    assert_eq!(
        fs::read_to_string(&body).unwrap(),
        "the payload as submitted",
        "log:\n{}",
        da.log()
    );
    da.stop();
}

/// Deletes the queue's durable consumer, as an operator could; the next host to start makes it
/// again.
fn delete_consumer(cluster: &nats::Cluster) {
    on_cluster(cluster, async |js| {
        let stream = js.get_stream("SPOOLD_default").await.unwrap();
        stream.delete_consumer("spoold").await.unwrap();
    });
}

/// Forwards each connection made to `listener` (on an address the test assigned on its side of the
/// veth pair) to `to` on loopback, a thread per direction: the harness's cluster listens on
/// 127.0.0.1, which a network namespace cannot reach. With the link down the forwarded
/// connections stall as a real route would. The threads live until the test process ends.
fn forward(listener: std::net::TcpListener, to: std::net::SocketAddr) {
    use std::net::{Shutdown, TcpStream};
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = TcpStream::connect(to) else {
                continue;
            };
            for (mut from, mut into) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(Shutdown::Write);
                });
            }
        }
    });
}

/// Issue 14 test 4: a host cut off from the network while it runs a long job ends the handler
/// before its lease (the ack wait) can lapse; another host then runs the job; when the link
/// comes back the first host sends no late acknowledgement, and the job stays done once.
///
/// The host runs in a network namespace of its own, joined by a veth pair with addresses the
/// test assigns, and reaches the harness's 3-node cluster through a forwarder per node on the
/// host side of the pair ([`forward`]); the other host uses the cluster's loopback addresses.
#[test]
fn a_host_cut_off_from_the_network_gives_up_its_job_before_another_host_runs_it() {
    let test = "a_host_cut_off_from_the_network_gives_up_its_job_before_another_host_runs_it";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    if !util::is_root() {
        util::skip(test, "network namespaces need root");
        return;
    }
    let id = std::process::id() % 250;
    let ns = Netns {
        name: format!("spoold{}", std::process::id()),
        link: format!("spd{}h", std::process::id() % 100_000),
    };
    let peer = format!("spd{}n", std::process::id() % 100_000);
    let (host_ip, ns_ip) = (format!("10.201.{id}.1"), format!("10.201.{id}.2"));
    ip(&["netns", "add", &ns.name]);
    ip(&[
        "link", "add", &ns.link, "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["link", "set", &peer, "netns", &ns.name]);
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.link]);
    ip(&["link", "set", &ns.link, "up"]);
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{ns_ip}/30"),
        "dev",
        &peer,
    ]);
    ip(&["-n", &ns.name, "link", "set", &peer, "up"]);
    ip(&["-n", &ns.name, "link", "set", "lo", "up"]);

    let cluster = nats::Cluster::start(&server);
    // Through the veth pair, a forwarder per node: the namespace's way to the cluster.
    let through_veth: Vec<String> = cluster
        .urls()
        .iter()
        .map(|url| {
            let node: std::net::SocketAddr = url.trim_start_matches("nats://").parse().unwrap();
            let listener = std::net::TcpListener::bind((host_ip.as_str(), 0)).unwrap();
            let near = listener.local_addr().unwrap();
            forward(listener, node);
            format!("\"nats://{near}\"")
        })
        .collect();
    let direct: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();

    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    // Host A sleeps on the job and notes when its handler is ended; B just succeeds.
    let handler = r#"printf '%s %s %s start\n' "$SPOOLD_JOB_ID" "$HOST" "$SPOOLD_ATTEMPT" >> "$RUNS"
if [ "$HOST" = A ]; then
  trap 'printf "%s %s %s ended\n" "$SPOOLD_JOB_ID" "$HOST" "$SPOOLD_ATTEMPT" >> "$RUNS"; exit 143' TERM
  sleep 120 & wait
fi
exit 0"#;
    let config = |name: &str, servers: &[String]| {
        let env = Env::new(&["/bin/true"], "");
        let h = env.script("handler.sh", handler);
        env.write_config(
            &[&h],
            &format!(
                "kill_grace = \"1s\"\nenv = {{ HOST = {name:?}, RUNS = {:?} }}\n\
                 [backend]\nkind = \"jetstream\"\n\
                 [jetstream]\nservers = [{}]\n\
                 {LEASE}connect_timeout = \"20s\"\n",
                runs.0.display().to_string(),
                servers.join(", ")
            ),
        );
        env
    };
    let a = config("A", &through_veth);
    let b = config("B", &direct);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, util::BIN, "run", "--config"])
        .arg(&a.config);
    let da = Daemon::spawn_command(cmd);
    da.wait_note(|n| n.contains("READY=1"), SOON)
        .unwrap_or_else(|| panic!("A not ready; log:\n{}", da.log()));
    let job = enqueue(&b, "long");
    wait(SOON, "the job running on A", &[&da], || {
        runs.of(&job).len() == 1
    });
    let db = b.start();

    let cut = Instant::now();
    ip(&["link", "set", &ns.link, "down"]);
    let lines = || fs::read_to_string(&runs.0).unwrap_or_default();
    wait(SOON, "B running the job", &[&da, &db], || {
        lines().contains(&format!("{job} B 1 start"))
    });
    let b_after = cut.elapsed();
    let text = lines();
    let ended = text
        .find(&format!("{job} A 1 ended"))
        .unwrap_or_else(|| panic!("A's handler was not ended before B ran the job:\n{text}"));
    let b_started = text.find(&format!("{job} B 1 start")).unwrap();
    assert!(
        ended < b_started,
        "A's handler ended only after B started the job:\n{text}"
    );
    assert!(da.log().contains("lease lost"), "{}", da.log());
    eprintln!("B started the job {b_after:?} after A's link went down");

    // A notices the dead link (three unanswered pings) and says so ...
    wait(
        Duration::from_secs(60),
        "A noticing the dead link",
        &[&da],
        || da.log().contains("connection lost"),
    );
    // ... and when the link comes back, it reconnects and sends nothing for the job it gave up.
    ip(&["link", "set", &ns.link, "up"]);
    // A noticed the dead link (unanswered pings) and reconnects now.
    wait(Duration::from_secs(60), "A connected again", &[&da], || {
        da.log().contains("connected again")
    });
    wait(SOON, "the queue idle", &[&da, &db], || idle(&b));
    let s = status(&b);
    assert_eq!(s["failed"], 0, "{s}");
    assert!(
        !lines().contains(&format!("{job} A 2")) && !lines().contains(&format!("{job} B 2")),
        "{}",
        lines()
    );
}

/// Reload: `workers.count` applies at once; a change under `[jetstream]` needs a restart, is
/// said so in the journal, and is not applied (the daemon keeps its lease settings and runs on).
#[test]
fn a_reload_applies_workers_and_says_the_broker_settings_need_a_restart() {
    let test = "a_reload_applies_workers_and_says_the_broker_settings_need_a_restart";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(shared.path(), &cluster, "A", "");
    let mut da = a.start();
    let text = fs::read_to_string(&a.config)
        .unwrap()
        .replace("count = 2", "count = 3")
        .replace("ack_wait = \"6s\"", "ack_wait = \"9s\"");
    fs::write(&a.config, text).unwrap();
    da.signal(1);
    wait(SOON, "the reload logged", &[&da], || {
        da.log().contains("configuration reloaded")
    });
    assert!(
        da.log()
            .contains("[backend] or [jetstream] changed; that takes a restart"),
        "{}",
        da.log()
    );
    wait(SOON, "three workers", &[&da], || da.worker_threads() == 3);
    // The edited file now contradicts the cluster, so a client on it is refused (78); another
    // host's unchanged config submits.
    let out = a.cli(&["status"]);
    assert_eq!(out.status.code(), Some(78), "{}", util::describe(&out));
    let b = host(shared.path(), &cluster, "B", "");
    let job = enqueue(&b, "ok");
    wait(SOON, "a job still runs", &[&da], || {
        runs.of(&job).len() == 1
    });
    da.stop();
}

/// The handler of the large-payload test: it records the sha256 of the file it was given as
/// the run's body, and fails for good (65) while the flag file `$RUNS.perm` exists.
const SUM_HANDLER: &str = r#"sum=$(sha256sum < "$SPOOLD_JOB_PATH" | cut -d' ' -f1)
printf '%s %s %s %s\n' "$SPOOLD_JOB_ID" "$HOST" "$SPOOLD_ATTEMPT" "$sum" >> "$RUNS"
if [ -e "$RUNS.perm" ]; then echo "refused for now" >&2; exit 65; fi
exit 0"#;

/// `n` bytes that no compression or deduplication could shorten, different per `seed`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum: {}", util::describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

/// The payload bucket as `nats object` would show it: whether object `id` is there, and how
/// many messages the bucket's stream holds (0 once every object is gone, deletion markers
/// included).
///
/// A question the cluster cannot answer right now (a stream leader being elected: "no
/// responders") is asked again, for up to `SOON`, as spoold itself rides through elections.
fn payload_object(cluster: &nats::Cluster, id: &str) -> (bool, u64) {
    let mut last = String::new();
    let answer = util::wait_for(SOON, || {
        let asked = on_cluster(cluster, async |js| -> Result<(bool, u64), String> {
            let bucket = js
                .get_object_store("SPOOLD_default_PAYLOADS")
                .await
                .map_err(|e| e.to_string())?;
            let there = match bucket.info(id).await {
                Ok(info) => !info.deleted,
                Err(e)
                    if e.kind() == async_nats::jetstream::object_store::InfoErrorKind::NotFound =>
                {
                    false
                }
                Err(e) => return Err(format!("object {id}: {e}")),
            };
            let mut stream = js
                .get_stream("OBJ_SPOOLD_default_PAYLOADS")
                .await
                .map_err(|e| e.to_string())?;
            let messages = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .messages;
            Ok((there, messages))
        });
        asked.map_err(|e| last = e).ok()
    });
    answer.unwrap_or_else(|| panic!("the payload bucket did not answer within {SOON:?}: {last}"))
}

/// Issue 14, large payloads: a 5 MiB file (above the server's 1 MiB `max_payload`) goes
/// through the object store and the handler gets the very bytes; the object is gone once the
/// job is done. One submitted on stdin that fails for good keeps its object in the dead-letter
/// stream, and `spoold retry` runs it again with the same bytes, after which its object goes
/// too. A small job still travels in its message.
fn large_payloads(test: &str, find: fn() -> Result<PathBuf, String>) {
    let Some(server) = nats::server_or_skip(test, find) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host_with(shared.path(), &cluster, "A", "", SUM_HANDLER, LEASE);
    let da = a.start();
    let sum_of = |id: &str| -> Vec<String> {
        runs.lines()
            .into_iter()
            .filter(|(i, ..)| i == id)
            .map(|(.., sum)| sum)
            .collect()
    };

    // Small: in the message, as before; nothing in the bucket.
    let small = enqueue(&a, "ok");
    wait(SOON, "the small job done", &[&da], || {
        sum_of(&small).len() == 1 && idle(&a)
    });
    let small_file = shared.path().join("small");
    fs::write(&small_file, "ok").unwrap();
    assert_eq!(sum_of(&small), [sha256_of(&small_file)]);
    assert_eq!(payload_object(&cluster, &small), (false, 0));

    // Large, from a file: the handler sees the same bytes; the object goes once it is done.
    let big_file = shared.path().join("big");
    fs::write(&big_file, noise(5 << 20, 1)).unwrap();
    let out = a.cli(&["enqueue", big_file.to_str().unwrap()]);
    assert!(out.status.success(), "enqueue: {}", util::describe(&out));
    let big = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    wait(SOON, "the large job done", &[&da], || {
        sum_of(&big).len() == 1 && idle(&a)
    });
    assert_eq!(
        sum_of(&big),
        [sha256_of(&big_file)],
        "the handler got other bytes"
    );
    wait(SOON, "the large job's object deleted", &[&da], || {
        payload_object(&cluster, &big) == (false, 0)
    });
    wait(SOON, "the scratch file removed", &[&da], || {
        scratch_is_empty(&a)
    });

    // Large, on stdin, failing for good: dead-lettered with its object kept.
    fs::write(shared.path().join("runs.perm"), "").unwrap();
    let other_file = shared.path().join("other");
    fs::write(&other_file, noise(5 << 20, 2)).unwrap();
    let out = std::process::Command::new(util::BIN)
        .args(["enqueue", "-", "--config"])
        .arg(&a.config)
        .stdin(fs::File::open(&other_file).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "enqueue -: {}", util::describe(&out));
    let other = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    wait(SOON, "the failing large job dead-lettered", &[&da], || {
        failed(&a).contains_key(&other)
    });
    let want = sha256_of(&other_file);
    assert_eq!(sum_of(&other), std::slice::from_ref(&want));
    assert_eq!(failed(&a)[&other]["permanent"], true);
    assert!(
        payload_object(&cluster, &other).0,
        "a dead letter's object stays"
    );
    // `failed` says where the payload is, in both forms.
    let kept = format!("object \"{other}\" in the bucket SPOOLD_default_PAYLOADS, ");
    let out = a.cli(&["failed", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let entry = list.iter().find(|j| j["id"] == other.as_str()).unwrap();
    assert!(
        entry["payload"]
            .as_str()
            .is_some_and(|p| p.starts_with(&kept)),
        "{entry}"
    );
    let text = String::from_utf8_lossy(&a.cli(&["failed"]).stdout).into_owned();
    assert!(text.contains(&format!("payload:  {kept}")), "{text}");

    // Retried: the same bytes again, then the object goes.
    fs::remove_file(shared.path().join("runs.perm")).unwrap();
    let out = a.cli(&["retry", &other]);
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    wait(SOON, "the retried large job done", &[&da], || {
        sum_of(&other).len() == 2 && idle(&a)
    });
    assert_eq!(sum_of(&other), [want.clone(), want]);
    assert!(failed(&a).is_empty());
    wait(SOON, "the retried job's object deleted", &[&da], || {
        payload_object(&cluster, &other) == (false, 0)
    });
}

#[test]
fn large_payloads_go_through_the_object_store_on_pinned_pypi_server() {
    large_payloads(
        "large_payloads_go_through_the_object_store_on_pinned_pypi_server",
        nats::current_server,
    );
}

#[test]
fn large_payloads_go_through_the_object_store_on_debian_server() {
    large_payloads(
        "large_payloads_go_through_the_object_store_on_debian_server",
        nats::debian_server,
    );
}

/// A payload bucket that another program made with other settings (`nats object add` makes
/// one replica) stops `spoold run` with 78 naming the bucket and the setting; a job whose
/// object is gone is dead-lettered without running, with a reason that names the object.
#[test]
fn a_contradicting_payload_bucket_or_a_missing_object_is_a_clear_error() {
    let test = "a_contradicting_payload_bucket_or_a_missing_object_is_a_clear_error";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let js = runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .connect(cluster.urls().as_slice())
            .await
            .unwrap();
        async_nats::jetstream::new(client)
    });
    let bucket = "SPOOLD_default_PAYLOADS";
    runtime.block_on(async {
        js.create_object_store(async_nats::jetstream::object_store::Config {
            bucket: bucket.to_owned(),
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let a = host_with(shared.path(), &cluster, "A", "", SUM_HANDLER, LEASE);
    let mut d = Daemon::spawn(&a.config, &[]);
    let (code, _) = d.wait_exit(SOON);
    assert_eq!(code.code(), Some(78), "log:\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!("object store {bucket}"))
            && log.contains("replicas 1")
            && log.contains("jetstream.replicas"),
        "{log}"
    );

    // The bucket as spoold makes it; a large job whose object is deleted before it runs.
    runtime.block_on(async { js.delete_object_store(bucket).await.unwrap() });
    let big_file = shared.path().join("big");
    fs::write(&big_file, noise(2 << 20, 3)).unwrap();
    let out = a.cli(&["enqueue", big_file.to_str().unwrap()]);
    assert!(out.status.success(), "enqueue: {}", util::describe(&out));
    let big = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(payload_object(&cluster, &big).0, "the object is stored");
    runtime.block_on(async {
        let store = js.get_object_store(bucket).await.unwrap();
        store.delete(&big).await.unwrap();
    });
    let da = a.start();
    wait(
        SOON,
        "the job without its object dead-lettered",
        &[&da],
        || failed(&a).contains_key(&big),
    );
    let record = &failed(&a)[&big];
    let reason = record["last_failure"]["reason"].as_str().unwrap_or("");
    assert_eq!(
        reason,
        format!("payload object {bucket}/{big} missing"),
        "{record}"
    );
    assert_eq!(record["permanent"], true, "{record}");
    assert!(runs.of(&big).is_empty(), "the handler did not run");
    wait(SOON, "the queue idle", &[&da], || idle(&a));
}

/// The handler of the poison-pill test: it records its run, then, for the body `poison`, takes
/// its host down as the OOM killer would (SIGKILL to spoold, its parent: spoold spawns the
/// handler itself), unless the file `$RUNS.cured` exists; every other body exits 0.
const POISON_HANDLER: &str = r#"body=$(cat "$SPOOLD_JOB_PATH")
printf '%s %s %s %s\n' "$SPOOLD_JOB_ID" "$HOST" "$SPOOLD_ATTEMPT" "$body" >> "$RUNS"
if [ "$body" = poison ] && [ ! -e "$RUNS.cured" ]; then
  # A job beside this one has a moment to finish first.
  sleep 1
  parent=$(cat /proc/$PPID/comm)
  if [ "$parent" != spoold ]; then echo "the parent is $parent, not spoold" >&2; exit 3; fi
  kill -KILL "$PPID"
  sleep 2
fi
exit 0"#;

/// A poison pill: a job whose handler kills its host each time. With
/// `jetstream.max_unsettled_deliveries = 2` it runs twice, taking its host down twice (the test
/// restarts it, as systemd would), and its third delivery is dead-lettered without running,
/// with a reason that says what happened; a job enqueued beside it is done; `spoold retry`
/// puts it back with a fresh count (one more death is allowed again, then it is done).
#[test]
fn a_job_that_keeps_killing_its_host_is_dead_lettered_after_the_bound() {
    let test = "a_job_that_keeps_killing_its_host_is_dead_lettered_after_the_bound";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let cured = shared.path().join("runs.cured");
    let a = host_with(
        shared.path(),
        &cluster,
        "A",
        "max_unsettled_deliveries = 2\n",
        POISON_HANDLER,
        LEASE,
    );
    let mut da = a.start();
    let poison = enqueue(&a, "poison");
    let ok = enqueue(&a, "ok");

    // Each death leaves the job to come back an ack wait (6 s) later.
    let within = Duration::from_secs(90);
    let deaths = util::restarting(&a, &mut da, within, "the poison pill dead-lettered", || {
        failed(&a).contains_key(&poison)
    });
    assert_eq!(deaths, 2, "it took its host down twice");
    assert_eq!(
        runs.of(&poison),
        [("A".to_owned(), 1), ("A".to_owned(), 1)],
        "it ran exactly max_unsettled_deliveries times, each as attempt 1"
    );
    // Another host's `spoold failed` shows it, with the reason.
    let b = host_with(shared.path(), &cluster, "B", "", POISON_HANDLER, LEASE);
    let record = &failed(&b)[&poison];
    let reason = record["last_failure"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("2 deliveries ended without an outcome")
            && reason.contains("crashes its host")
            && reason.contains("jetstream.max_unsettled_deliveries"),
        "{record}"
    );
    assert_eq!(record["permanent"], true, "{record}");
    assert!(
        da.log().contains("job failed for good without running"),
        "{}",
        da.log()
    );
    wait(SOON, "the job beside it done", &[&da], || {
        !runs.of(&ok).is_empty() && idle(&a)
    });
    assert!(!failed(&a).contains_key(&ok));
    assert_eq!(runs.of(&poison).len(), 2, "a dead letter is not run again");

    // Retried: a fresh count, so after one more death it runs again (the bound is 2), and,
    // cured meanwhile, it is done.
    let out = b.cli(&["retry", &poison]);
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    util::restarting(&a, &mut da, within, "the retried job run again", || {
        runs.of(&poison).len() == 3
    });
    fs::write(&cured, "").unwrap();
    let deaths = util::restarting(&a, &mut da, within, "the retried job done", || {
        runs.of(&poison).len() == 4 && idle(&a)
    });
    assert_eq!(deaths, 1, "the retried job took its host down once more");
    assert!(failed(&b).is_empty(), "{:?}", failed(&b));
    da.stop();
}

/// A stop does not use up `jetstream.max_unsettled_deliveries`: a host with idle workers
/// aborts a job at a stop and hands it back, and its last pull, still registered at the
/// server for up to a second, catches it; caught a second time (no other host takes it), it
/// is handed back to come again only after that pull, so the stop costs the job three
/// deliveries at most, not one per idle worker. Started again, the host runs the job instead
/// of dead-lettering it.
#[test]
fn a_stop_uses_up_at_most_three_deliveries_of_a_job() {
    let test = "a_stop_uses_up_at_most_three_deliveries_of_a_job";
    let Some(server) = nats::server_or_skip(test, nats::current_server) else {
        return;
    };
    let cluster = nats::Cluster::start(&server);
    let shared = tempfile::tempdir().unwrap();
    let runs = Runs(shared.path().join("runs"));
    let a = host(
        shared.path(),
        &cluster,
        "A",
        "max_unsettled_deliveries = 4\n",
    );
    let text = fs::read_to_string(&a.config).unwrap();
    fs::write(
        &a.config,
        text.replacen("[workers]\ncount = 2\n", "[workers]\ncount = 16\n", 1),
    )
    .unwrap();
    let mut da = a.start();
    let job = enqueue(&a, "slow");
    wait(SOON, "the slow job running", &[&da], || {
        runs.of(&job).len() == 1
    });
    // drain_timeout 0s: the stop aborts the job and hands it back while 15 workers' pull waits.
    da.stop();
    let mut da = a.start();
    wait(SOON, "the job run again after the restart", &[&da], || {
        runs.of(&job).len() == 2 || failed(&a).contains_key(&job)
    });
    assert!(
        !failed(&a).contains_key(&job),
        "one stop used up the bound: {:?}; log:\n{}",
        failed(&a).get(&job),
        da.log()
    );
    assert_eq!(runs.of(&job), [("A".to_owned(), 1), ("A".to_owned(), 1)]);
    da.stop();
}
