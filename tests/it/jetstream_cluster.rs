//! The NATS cluster harness (tests/nats) against real 3-node JetStream clusters, on the pinned PyPI server and on Debian 12's: no acknowledged message is lost when the stream leader is SIGKILLed.
//!
//! These tests prove the ground issue 14's broker backend will stand on, with the official
//! client: what a PubAck promises survives the crash of the node that gave it, a new leader
//! takes over, and the killed node rejoins on restart.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures_util::StreamExt as _;

use crate::nats;
use crate::util::{self, SOON};

/// Messages published before the kill, and after it (while the new leader settles in).
const BEFORE_KILL: usize = 300;
const AFTER_KILL: usize = 100;
/// How long one JetStream request may wait for its answer; an election makes requests fail or
/// time out, and each call below is retried up to a bound of its own.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_kill_loses_no_acked_message_on_pinned_pypi_server() {
    leader_kill_loses_nothing(
        "stream_leader_kill_loses_no_acked_message_on_pinned_pypi_server",
        nats::current_server,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_kill_loses_no_acked_message_on_debian_server() {
    leader_kill_loses_nothing(
        "stream_leader_kill_loses_no_acked_message_on_debian_server",
        nats::debian_server,
    )
    .await;
}

/// The variable that makes `cluster_for_a_killed_test_process` boot a cluster; without it that
/// test returns at once, so `cargo test -- --ignored` does not hang on it.
const KILLED_PROCESS_VAR: &str = "SPOOLD_NATS_KILLED_PROCESS";

/// A test process that is SIGKILLed runs no Drop: its nodes must still go, and with them
/// their ports and stores' locks. This test runs this very test binary as such a process,
/// kills it once its cluster is up, and waits for the nodes to end.
#[test]
fn nodes_die_with_a_killed_test_process() {
    let test = "nodes_die_with_a_killed_test_process";
    let Some(server) = nats::server_or_skip(test, nats::debian_server) else {
        return;
    };
    // /proc/self/exe rather than current_exe(): it still runs this binary if a rebuild has
    // replaced the file meanwhile, where the path would name the new one, or nothing.
    let mut child = Command::new("/proc/self/exe")
        // A filter, not --exact: the name has a module path when this file is a module of a
        // larger test crate.
        .args(["cluster_for_a_killed_test_process", "--ignored"])
        .args(["--nocapture", "--test-threads", "1"])
        .env(KILLED_PROCESS_VAR, &server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        // libtest prints the test's name first, on the same line.
        let line = line.unwrap();
        if let Some((_, rest)) = line.split_once("NODE PIDS ") {
            pids = rest.split(' ').map(|p| p.parse::<i32>().unwrap()).collect();
            break;
        }
    }
    assert_eq!(pids.len(), 3, "the child test process printed no node pids");
    assert!(pids.iter().all(|&p| util::process_alive(p)));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = util::wait_for(SOON, || {
        let alive: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&p| util::process_alive(p))
            .collect();
        alive.is_empty().then_some(())
    });
    if left.is_none() {
        // This test's failure must not leave servers behind either.
        for &p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        panic!("NATS nodes {pids:?} outlived their SIGKILLed test process by {SOON:?}");
    }
}

/// The process `nodes_die_with_a_killed_test_process` kills: boots a cluster, prints its
/// pids, and waits on its stdin, which stays open until the process is killed.
#[test]
#[ignore = "run by nodes_die_with_a_killed_test_process"]
fn cluster_for_a_killed_test_process() {
    let Some(server) = std::env::var_os(KILLED_PROCESS_VAR) else {
        return;
    };
    let cluster = nats::Cluster::start(std::path::Path::new(&server));
    let pids: Vec<String> = (1..=3)
        .map(|n| cluster.pid(n).unwrap().to_string())
        .collect();
    println!("NODE PIDS {}", pids.join(" "));
    let _ = std::io::stdin().read_line(&mut String::new());
}

/// Boots a cluster of the server `find` names, fills an R3 work-queue stream, SIGKILLs its
/// leader, and checks that a new leader takes over, that every acknowledged message is
/// delivered, and that the killed node rejoins the stream once restarted.
///
/// The cluster's calls block the test's thread while they poll; the client's connection runs
/// on the runtime's worker threads meanwhile.
async fn leader_kill_loses_nothing(test: &str, find: fn() -> Result<PathBuf, String>) {
    let Some(server) = nats::server_or_skip(test, find) else {
        return;
    };
    let began = Instant::now();
    let mut cluster = nats::Cluster::start(&server);
    let version = nats::version(&server);
    eprintln!("{version}: ready in {:?}", began.elapsed());

    let client = async_nats::ConnectOptions::new()
        .connection_timeout(REQUEST_TIMEOUT)
        .connect(cluster.urls().as_slice())
        .await
        .unwrap_or_else(|e| panic!("connect to {:?}: {e}", cluster.urls()));
    let mut js = jetstream::new(client);
    js.set_timeout(REQUEST_TIMEOUT);

    let config = stream::Config {
        name: "JOBS".to_owned(),
        subjects: vec!["jobs.>".to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: 3,
        ..Default::default()
    };
    let stream = retry(SOON, "create the R3 stream", async || {
        js.create_stream(config.clone()).await
    })
    .await;
    let consumer_config = consumer::pull::Config {
        durable_name: Some("workers".to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let consumer = retry(SOON, "create the consumer", async || {
        stream.create_consumer(consumer_config.clone()).await
    })
    .await;

    let mut acked = BTreeSet::new();
    for i in 0..BEFORE_KILL {
        acked.insert(publish(&js, &format!("job-{i:04}")).await);
    }

    let leader = stream_leader(&stream, |_| true).await;
    let killed = cluster.number(&leader);
    cluster.kill(killed);
    let killed_at = Instant::now();
    eprintln!("{version}: killed the stream leader {leader}");

    let new_leader = stream_leader(&stream, |l| l != leader).await;
    eprintln!(
        "{version}: {new_leader} leads the stream {:?} after the kill",
        killed_at.elapsed()
    );
    // Each publish is retried with its Nats-Msg-Id until a PubAck arrives, as spoold's
    // enqueue will: the stream's duplicate window keeps a retry whose first try was stored
    // from adding a second copy.
    for i in BEFORE_KILL..BEFORE_KILL + AFTER_KILL {
        acked.insert(publish(&js, &format!("job-{i:04}")).await);
    }
    let stored = retry(SOON, "read the stream's state", async || {
        stream.get_info().await
    })
    .await
    .state
    .messages;
    assert_eq!(
        stored,
        acked.len() as u64,
        "{version}: the stream holds {stored} messages after the leader kill, but {} were \
         acknowledged",
        acked.len()
    );

    // Every acknowledged message is delivered; each is acked with a confirmed ack (the
    // server's answer awaited), as spoold acks a job's outcome.
    let mut seen = BTreeSet::new();
    let mut deliveries = 0;
    let deadline = Instant::now() + SOON;
    while seen.len() < acked.len() && Instant::now() < deadline {
        let batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let Ok(mut batch) = batch else {
            continue;
        };
        while let Some(Ok(message)) = batch.next().await {
            deliveries += 1;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_else(|| panic!("{version}: a message without a Nats-Msg-Id"));
            retry(SOON, &format!("ack {id}"), async || {
                message.double_ack().await
            })
            .await;
            seen.insert(id);
        }
    }
    let missing: Vec<&String> = acked.difference(&seen).collect();
    let unknown: Vec<&String> = seen.difference(&acked).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{version}: after killing the stream leader {leader}, {} of {} acknowledged messages \
         were not delivered within {SOON:?} ({missing:?}), and {} never acknowledged were \
         ({unknown:?})",
        missing.len(),
        acked.len(),
        unknown.len()
    );
    eprintln!(
        "{version}: {} distinct messages in {deliveries} deliveries",
        seen.len()
    );
    // A work-queue stream deletes a message once its ack is confirmed, through a proposal of
    // its own after the consumer's: the count may lag the acks by a moment (seen on 2.9.10).
    let deadline = Instant::now() + SOON;
    loop {
        let left = retry(SOON, "read the stream's state", async || {
            stream.get_info().await
        })
        .await
        .state
        .messages;
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{version}: {left} messages are still in the work-queue stream {SOON:?} after \
             every message was acked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.restart(killed);
    let restarted_at = Instant::now();
    let deadline = Instant::now() + nats::READY_WITHIN;
    loop {
        let info = stream.get_info().await;
        let peers = info
            .as_ref()
            .ok()
            .and_then(|i| i.cluster.as_ref())
            .map(|c| c.replicas.clone())
            .unwrap_or_default();
        if peers
            .iter()
            .any(|p| p.name == leader && p.current && !p.offline)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{version}: the restarted {leader} is not a current replica of the stream within \
             {:?}; stream info: {info:?}",
            nats::READY_WITHIN
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The restarted node's /healthz. On 2.9.10 it says "JetStream consumer ... is not current"
    // for over a minute in about one run in six, with the node a current replica of the
    // stream, no error in its log, and even after messages flowed through the consumer (seen
    // while writing this test; not on 2.15.1). That is the server's defect, to be noted for
    // issue 14, not this harness's: on 2.9.x that one answer is tolerated after 20 s.
    let old_server = version.contains("v2.9.");
    let bound = if old_server {
        Duration::from_secs(20)
    } else {
        nats::READY_WITHIN
    };
    let healthy = util::wait_for(bound, || cluster.healthz(killed).ok());
    if healthy.is_none() {
        let why = cluster.healthz(killed).unwrap_err();
        assert!(
            old_server && why.contains("consumer") && why.contains("is not current"),
            "{version}: the restarted {leader} is not healthy within {bound:?}: {why}\n{}",
            cluster.logs()
        );
        eprintln!("{version}: tolerated on 2.9.x: {why}");
    } else {
        cluster.wait_ready(nats::READY_WITHIN);
    }
    eprintln!(
        "{version}: {leader} current again {:?} after its restart; the test took {:?}",
        restarted_at.elapsed(),
        began.elapsed()
    );
}

/// Publishes `id` (as payload and `Nats-Msg-Id`) until the stream acknowledges it; returns
/// the id.
async fn publish(js: &jetstream::Context, id: &str) -> String {
    retry(SOON, &format!("publish {id}"), async || {
        let publish = PublishMessage::build()
            .payload(id.to_owned().into())
            .message_id(id);
        js.send_publish("jobs.new", publish).await?.await
    })
    .await;
    id.to_owned()
}

/// The stream's leader, once one is elected that `accept` takes.
async fn stream_leader(stream: &stream::Stream, accept: impl Fn(&str) -> bool) -> String {
    retry(nats::READY_WITHIN, "find the stream leader", async || {
        let info = stream.get_info().await.map_err(|e| e.to_string())?;
        match info.cluster.and_then(|c| c.leader) {
            Some(l) if accept(&l) => Ok(l),
            other => Err(format!("the stream's leader is {other:?}")),
        }
    })
    .await
}

/// Calls `f` until it succeeds; panics with the last error past `within`. The 100 ms between
/// tries is a polling interval, not a wait for an event: each try is itself bounded by the
/// JetStream request timeout.
async fn retry<T, E: Display>(
    within: Duration,
    what: &str,
    mut f: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let began = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if began.elapsed() > within => {
                panic!("{what}: still failing after {within:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
