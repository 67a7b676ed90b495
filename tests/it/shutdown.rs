//! Stopping right, on the real binary: the sd_notify datagrams, drain, abort at the deadline, a
//! second signal, the full-channel deadlock, reload, and the watchdog.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::util::{self, Daemon, Env, SOON, pids_in, process_alive, wait_for};

/// A handler that records its pid, then sleeps for `secs` (in the shell's own process, so a
/// SIGTERM to the group ends it).
fn sleeper(env: &Env, secs: f64) -> String {
    let pids = env.dir.path().join("pids");
    env.script(
        "sleeper.sh",
        &format!("echo $$ >> {}\nsleep {secs}\necho slept", pids.display()),
    )
}

#[test]
fn notifications_ready_status_stopping_and_summary() {
    let env = Env::new(&["/bin/true"], "");
    let mut d = env.start();
    let ready = d.wait_note(|n| n.contains("READY=1"), SOON).unwrap();
    assert!(
        ready.contains("STATUS=0/"),
        "READY=1 carries the first STATUS: {ready:?}"
    );
    for i in 0..5 {
        env.submit(&format!("j{i}"), "x");
    }
    assert!(
        d.wait_note(|n| n.contains("STATUS=") && n.contains("5 done"), SOON)
            .is_some(),
        "STATUS is kept current: {:?}",
        d.notes()
    );
    d.stop();
    let notes = d.notes();
    let stopping = notes.iter().find(|n| n.contains("STOPPING=1")).unwrap();
    assert!(
        stopping.contains("STATUS=stopping: draining 0 jobs"),
        "{stopping}"
    );
    assert!(
        d.log()
            .contains("spoold stopped: 0 jobs drained, 0 requeued"),
        "{}",
        d.log()
    );
}

#[test]
fn idle_stop_is_immediate_and_clean() {
    let env = Env::new(&["/bin/true"], "[shutdown]\ndrain_timeout = \"1h\"\n");
    let mut d = env.start();
    // With nothing in flight, no timer may stand between the signal and the exit: an hour of
    // drain_timeout must not matter. The bound is generous for a loaded machine; the benchmark
    // measures the real latency.
    let took = d.stop();
    assert!(took < Duration::from_secs(10), "idle stop took {took:?}");
}

#[test]
fn drain_lets_jobs_in_flight_finish_and_leaves_the_rest() {
    let env = Env::new(&["/bin/true"], "");
    let handler = sleeper(&env, 1.5);
    env.write_config(
        &[&handler],
        "[workers]\ncount = 2\n[shutdown]\ndrain_timeout = \"60s\"\n",
    );
    let mut d = env.start();
    for i in 0..6 {
        env.submit(&format!("d{i}"), "x");
    }
    d.wait_until("active/ to hold 2", || env.count("active") == 2);
    d.term();
    let (status, _) = d.wait_exit(SOON);
    assert!(status.success(), "{}", d.log());
    assert_eq!(env.count("done"), 2, "the two jobs in flight finished");
    assert_eq!(env.count("new"), 4, "the jobs not yet claimed stay in new/");
    assert_eq!(env.count("active"), 0);
    assert!(
        d.log().contains("2 jobs drained, 0 requeued"),
        "{}",
        d.log()
    );
    let notes = d.notes();
    assert!(
        notes.iter().any(|n| n.starts_with("EXTEND_TIMEOUT_USEC=")),
        "EXTEND_TIMEOUT_USEC while draining: {notes:?}"
    );
}

#[test]
fn abort_at_the_deadline_kills_stubborn_handlers_and_requeues() {
    let env = Env::new(&["/bin/true"], "");
    let pids = env.dir.path().join("pids");
    // Three kinds of handler, by job name: one that sleeps, one that ignores SIGTERM, and one
    // whose child ignores SIGTERM.
    let handler = env.script(
        "mixed.sh",
        &format!(
            "echo $$ >> {p}
case \"$SPOOLD_JOB_ID\" in
  sleeps) exec sleep 1000 ;;
  ignores) trap '' TERM; sleep 1000 & echo $! >> {p}; wait ;;
  child-ignores) sh -c \"trap '' TERM; echo \\$\\$ >> {p}; while :; do sleep 1; done\" & wait ;;
esac",
            p = pids.display()
        ),
    );
    env.write_config(
        &[&handler],
        "kill_grace = \"500ms\"\n[workers]\ncount = 3\n[shutdown]\ndrain_timeout = \"500ms\"\n",
    );
    let mut d = env.start();
    for name in ["sleeps", "ignores", "child-ignores"] {
        env.submit(name, "x");
    }
    d.wait_until("the handlers to record at least 5 pids", || {
        pids_in(&pids).len() >= 5
    });
    d.term();
    let (status, _) = d.wait_exit(SOON);
    assert!(status.success(), "{}", d.log());
    assert_eq!(env.names("new").len(), 3, "all three back in new/");
    assert_eq!(
        env.count("active") + env.count("failed") + env.count("retry"),
        0
    );
    assert_eq!(env.count("state"), 0, "an aborted attempt does not count");
    let pids = pids_in(&pids);
    d.wait_until_within(
        Duration::from_secs(5),
        &format!("every handler process ({pids:?}) to be gone after the stop"),
        || pids.iter().all(|p| !process_alive(*p)),
    );
    let log = d.log();
    assert!(log.contains("0 jobs drained, 3 requeued"), "{log}");
    assert!(log.contains("outcome=\"requeued\""), "{log}");
    // The next start runs them with attempt 1 again.
    let mut d = env.start();
    assert!(d.wait_log(|l| l.matches("attempt=1").count() >= 3, SOON));
    d.term();
    d.term();
    d.wait_exit(SOON);
}

/// A job keeps the config it started with: after a reload lowers `kill_grace`, a stop still
/// waits for the SIGKILL that the job in flight is owed under the old, longer grace, and then
/// releases the job; no process outlives spoold. Before, the stop gave up after the new grace
/// and exited 0 with the handler alive and its job left in `active/`.
#[test]
fn a_stop_waits_out_the_kill_grace_a_job_started_with() {
    let env = Env::new(&["/bin/true"], "");
    let pids = env.dir.path().join("pids");
    let handler = env.script(
        "stubborn.sh",
        &format!(
            "echo $$ >> {}\ntrap '' TERM\nwhile :; do sleep 0.1; done",
            pids.display()
        ),
    );
    let config =
        |grace: &str| format!("kill_grace = \"{grace}\"\n[shutdown]\ndrain_timeout = \"0s\"\n");
    env.write_config(&[&handler], &config("3s"));
    let mut d = env.start();
    env.submit("stubborn", "x");
    d.wait_until("the handler to start", || !pids_in(&pids).is_empty());
    env.write_config(&[&handler], &config("200ms"));
    d.signal(1);
    d.wait_until("the reload applied", || {
        d.log().contains("configuration reloaded")
    });
    d.term();
    let (status, took) = d.wait_exit(SOON);
    assert!(status.success(), "{}", d.log());
    let log = d.log();
    assert!(!log.contains("did not finish"), "{log}");
    assert!(
        took >= Duration::from_millis(2_500),
        "the stop took {took:?}, less than the 3 s grace the job started with: {log}"
    );
    assert_eq!(
        env.names("new").len(),
        1,
        "the job went back to new/: {log}"
    );
    assert_eq!(env.count("active"), 0);
    let pids = pids_in(&pids);
    assert!(
        pids.iter().all(|p| !process_alive(*p)),
        "the handler ({pids:?}) outlived spoold"
    );
}

#[test]
fn second_signal_aborts_at_once() {
    let env = Env::new(&["/bin/true"], "");
    let handler = sleeper(&env, 1000.0);
    env.write_config(
        &[&handler],
        "kill_grace = \"1s\"\n[shutdown]\ndrain_timeout = \"1h\"\n",
    );
    let mut d = env.start();
    env.submit("long", "x");
    d.wait_until("active/ to hold 1", || env.count("active") == 1);
    d.term();
    assert!(d.wait_note(|n| n.contains("STOPPING=1"), SOON).is_some());
    d.signal(2); // SIGINT counts as the second stop signal too.
    let (status, took) = d.wait_exit(SOON);
    assert!(status.success(), "{}", d.log());
    assert!(
        took < Duration::from_secs(60),
        "an hour of drain_timeout was not cut short"
    );
    assert_eq!(env.names("new").len(), 1);
    assert!(
        d.log().contains("aborting the jobs in flight"),
        "{}",
        d.log()
    );
}

#[test]
fn stop_while_the_dispatcher_is_blocked_on_a_full_channel() {
    // One worker busy for a while and a backlog far larger than the channel: the dispatcher is
    // parked on a send. The classic bug is that it never wakes once the worker has left, and the
    // stop hangs until systemd's SIGKILL.
    let env = Env::new(&["/bin/true"], "");
    let handler = sleeper(&env, 1.0);
    env.write_config(
        &[&handler],
        "[workers]\ncount = 1\n[shutdown]\ndrain_timeout = \"60s\"\n",
    );
    for i in 0..200 {
        env.submit(&format!("q{i:03}"), "x");
    }
    let mut d = env.start();
    d.wait_until("active/ to hold 1", || env.count("active") == 1);
    // STATUS counts the backlog, which the test knows to within the jobs already run.
    let queued = |n: &str| -> Option<u64> {
        n.split("STATUS=1/1 busy, ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse()
            .ok()
    };
    let note = d
        .wait_note(|n| queued(n).is_some_and(|q| (150..200).contains(&q)), SOON)
        .unwrap_or_else(|| panic!("no STATUS with the backlog: {:?}", d.notes()));
    assert!(note.contains(" done, 0 failed"), "{note}");
    d.term();
    let (status, took) = d.wait_exit(SOON);
    assert!(status.success(), "{}", d.log());
    assert!(took < Duration::from_secs(20), "stop took {took:?}");
    assert_eq!(env.count("done") + env.count("new"), 200, "nothing lost");
    assert_eq!(env.count("active"), 0);
}

#[test]
fn reload_grows_workers_and_survives_a_bad_config() {
    let env = Env::new(&["/bin/true"], "");
    let handler = sleeper(&env, 2.0);
    env.write_config(&[&handler], "[workers]\ncount = 1\n");
    let mut d = env.start();
    for i in 0..6 {
        env.submit(&format!("r{i}"), "x");
    }
    d.wait_until("active/ to hold 1", || env.count("active") == 1);

    env.write_config(&[&handler], "[workers]\ncount = 3\n");
    d.signal(1);
    let reloading = d
        .wait_note(|n| n.contains("RELOADING=1"), SOON)
        .expect("RELOADING=1");
    assert!(
        reloading.contains("MONOTONIC_USEC="),
        "RELOADING=1 and MONOTONIC_USEC= in one datagram: {reloading:?}"
    );
    d.wait_until(
        "three jobs at once after the reload (active/ to hold 3)",
        || env.count("active") == 3,
    );
    assert_eq!(d.worker_threads(), 3, "a thread for each worker");
    // The new workers run on threads of their own and may claim their jobs before the
    // supervisor has sent READY=1 for the reload, so wait for it rather than expect it.
    let ready_after_reload = wait_for(SOON, || {
        let notes = d.notes();
        let at = notes.iter().position(|n| n.contains("RELOADING=1"))?;
        notes[at..]
            .iter()
            .any(|n| n.contains("READY=1"))
            .then_some(())
    });
    assert!(
        ready_after_reload.is_some(),
        "READY=1 after the reload: {:?}",
        d.notes()
    );

    // A broken edit: the daemon keeps running on the old config, and says so.
    std::fs::write(&env.config, "[spool]\ndir = 12\n").unwrap();
    d.signal(1);
    assert!(
        d.wait_note(
            |n| n.contains("STATUS=") && n.contains("reload failed"),
            SOON
        )
        .is_some(),
        "STATUS shows the failed reload: {:?}",
        d.notes()
    );
    assert!(d.wait_log(
        |l| l.contains("reload failed, still running on the previous config")
            && l.contains(&format!("{}:2:7", env.config.display())),
        SOON
    ));
    d.wait_until_within(
        SOON * 2,
        "work to go on after a failed reload (done/ to hold 6)",
        || env.count("done") == 6,
    );
    d.stop();
    assert_eq!(env.count("done"), 6, "no job dropped by either reload");
}

#[test]
fn reload_shrinks_workers_as_jobs_end() {
    let env = Env::new(&["/bin/true"], "");
    let handler = sleeper(&env, 1.0);
    env.write_config(&[&handler], "[workers]\ncount = 3\n");
    let mut d = env.start();
    for i in 0..9 {
        env.submit(&format!("s{i}"), "x");
    }
    d.wait_until("active/ to hold 3", || env.count("active") == 3);
    assert_eq!(d.worker_threads(), 3, "a thread for each worker");
    env.write_config(&[&handler], "[workers]\ncount = 1\n");
    d.signal(1);
    assert!(
        d.wait_note(|n| n.contains("STATUS=") && n.contains("/1 busy"), SOON * 2)
            .is_some(),
        "the pool shrinks to one worker as jobs end: {:?}",
        d.notes()
    );
    // From then on at most one job runs at a time.
    for _ in 0..20 {
        assert!(env.count("active") <= 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_until_within(SOON * 2, "done/ to hold 9", || env.count("done") == 9);
    // The retired workers' threads are gone, not parked.
    d.wait_until("one worker thread left", || d.worker_threads() == 1);
    d.stop();
}

/// The gaps between spoold's successive WATCHDOG=1 pings under `WATCHDOG_USEC=usec`, `count`
/// of them, timed as they arrive on a notify socket of the test's own (util::Daemon keeps no
/// arrival times).
fn watchdog_gaps(usec: u64, count: usize) -> Vec<Duration> {
    let env = Env::new(&["/bin/true"], "");
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(SOON)).unwrap();
    let child = std::process::Command::new(util::BIN)
        .args(["run", "--config"])
        .arg(&env.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", usec.to_string())
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed on every path out of here, a failed assertion included.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let mut pings = Vec::new();
    let mut buf = [0u8; 4096];
    while pings.len() < count + 1 {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {SOON:?}: {e}"));
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings.push(Instant::now());
        }
    }
    pings.windows(2).map(|w| w[1] - w[0]).collect()
}

fn median(mut gaps: Vec<Duration>) -> Duration {
    gaps.sort();
    gaps[gaps.len() / 2]
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    // Two intervals, so that a fixed ping period cannot pass for both: spoold must ping every
    // WATCHDOG_USEC / 2. The median gap is checked, so that one late wake-up on a loaded
    // machine does not fail the test; the bounds still fail a ping at the full interval, or at
    // a quarter of it.
    for (usec, pings) in [(400_000, 6), (1_600_000, 4)] {
        let half = Duration::from_micros(usec / 2);
        let gaps = watchdog_gaps(usec, pings);
        let typical = median(gaps.clone());
        assert!(
            typical >= half * 3 / 4 && typical <= half * 3 / 2,
            "WATCHDOG_USEC={usec}: pings should come every {half:?}, but the median gap is \
             {typical:?} (gaps {gaps:?})"
        );
    }
    // WATCHDOG_PID names another process: the watchdog is not ours, and nothing is sent.
    let env2 = Env::new(&["/bin/true"], "");
    let mut other = Daemon::start(
        &env2.config,
        &[("WATCHDOG_USEC", "400000"), ("WATCHDOG_PID", "1")],
    );
    other.stop();
    assert!(!other.notes().iter().any(|n| n.contains("WATCHDOG=1")));
}

#[test]
fn abstract_notify_socket_works() {
    let env = Env::new(&["/bin/true"], "");
    let name = format!("spoold-test-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(SOON)).unwrap();
    let mut child = std::process::Command::new(util::BIN)
        .args(["run", "--config"])
        .arg(&env.config)
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a datagram on the abstract socket");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

/// A notify socket that nobody reads (a supervisor that hung, a test harness that only waits
/// for READY=1) fills after a few datagrams. spoold must not block on it: jobs still run and a
/// SIGTERM still stops it.
#[test]
fn a_notify_socket_nobody_reads_never_blocks_the_daemon() {
    let env = Env::new(&["/bin/true"], "[workers]\ncount = 2\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let _unread = UnixDatagram::bind(&path).unwrap();
    let mut child = std::process::Command::new(util::BIN)
        .args(["run", "--config"])
        .arg(&env.config)
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Each finished job changes STATUS=, far more datagrams than the socket queues.
    for i in 0..300 {
        env.submit(&format!("n{i:03}"), "x");
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(600));
        }
    }
    env.wait_until(
        "the jobs to go on behind the unread notify socket (done/ to hold 300)",
        || env.count("done") == 300,
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let exited = wait_for(SOON, || child.try_wait().unwrap());
    if exited.is_none() {
        let _ = child.kill();
    }
    assert!(exited.expect("spoold hung on its notify socket").success());
}

/// An abort signals the handler's group and allows it kill_grace to end; a handler that ends on
/// SIGTERM must let the job go back to new/ at once, not when its SIGKILL would have been due.
#[test]
fn abort_of_a_handler_that_ends_on_sigterm_does_not_wait_for_kill_grace() {
    let env = Env::new(
        &["/bin/sh", "-c", "exec sleep 1000"],
        "kill_grace = \"30s\"\n[shutdown]\ndrain_timeout = \"200ms\"\n",
    );
    let mut d = env.start();
    env.submit("polite", "x");
    d.wait_until("active/ to hold 1", || env.count("active") == 1);
    d.term();
    let (status, took) = d.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{}", d.log());
    // Well under the 30 s kill_grace, with room for a loaded machine.
    assert!(took < Duration::from_secs(15), "took {took:?}: {}", d.log());
    assert_eq!(env.names("new").len(), 1, "back in new/: {}", d.log());
    assert!(
        !d.log().contains("keeps its output open"),
        "no process held the pipes: {}",
        d.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Panics (issue 12): never silent. SPOOLD_TEST_PANIC exists only in debug builds, which is what
// the tests run.
// ---------------------------------------------------------------------------------------------

/// The log line the panic hook writes: at error level, naming the thread.
fn panic_logged(log: &str, thread: &str) -> bool {
    log.lines()
        .any(|l| l.contains("ERROR") && l.contains(&format!("thread {thread} panicked at")))
}

/// A worker that panics while it holds a job does not leave a daemon that looks healthy with
/// the job stuck in active/: the panic is logged with the thread's name, spoold stops by itself
/// with status 70 (so that Restart=on-failure brings it back), and the next start runs the job.
#[test]
fn a_worker_panic_is_logged_and_stops_spoold_with_status_70_and_the_job_runs_again() {
    let env = Env::new(&["/bin/true"], "[workers]\ncount = 2\n");
    let mut d = Daemon::start(&env.config, &[("SPOOLD_TEST_PANIC", "worker")]);
    env.submit("job", "x");
    let (status, _) = d.wait_exit(SOON);
    let log = d.log();
    assert_eq!(status.code(), Some(70), "{log}");
    assert!(panic_logged(&log, "spoold-worker"), "{log}");
    assert!(log.contains("exiting with status 70"), "{log}");
    assert_eq!(env.names("active"), ["job".to_owned()].into(), "{log}");

    // The restart that systemd would do: crash recovery runs the job.
    let mut d = env.start();
    d.wait_until("done/job to exist", || env.path("done/job").exists());
    d.stop();
}

/// The dispatcher (a task on the main thread) takes the same path: logged, exit 70, and the
/// job it never dispatched is still in new/ for the next start.
#[test]
fn a_dispatcher_panic_is_logged_and_stops_spoold_with_status_70() {
    let env = Env::new(&["/bin/true"], "");
    env.submit("job", "x");
    let mut d = Daemon::spawn(&env.config, &[("SPOOLD_TEST_PANIC", "dispatcher")]);
    let (status, _) = d.wait_exit(SOON);
    let log = d.log();
    assert_eq!(status.code(), Some(70), "{log}");
    assert!(panic_logged(&log, "main"), "{log}");
    assert_eq!(env.names("new"), ["job".to_owned()].into(), "{log}");

    let mut d = env.start();
    d.wait_until("done/job to exist", || env.path("done/job").exists());
    d.stop();
}

/// A panic in the stop sequence itself (a huge drain_timeout used to cause one, exit 101):
/// the stop goes on as an abort, within kill_grace rather than the 20 s drain, leaves no
/// handler behind, puts the job back in new/, and exits 70.
#[test]
fn a_panic_in_the_stop_aborts_the_jobs_in_flight_and_exits_70_without_a_hang() {
    let env = Env::new(&["/bin/true"], "");
    let h = sleeper(&env, 60.0);
    env.write_config(
        &[&h],
        "kill_grace = \"1s\"\n[shutdown]\ndrain_timeout = \"20s\"\n",
    );
    let pids = env.dir.path().join("pids");
    let mut d = Daemon::start(&env.config, &[("SPOOLD_TEST_PANIC", "stop")]);
    env.submit("job", "x");
    let pid = wait_for(SOON, || pids_in(&pids).first().copied()).expect("the handler started");
    d.term();
    let (status, took) = d.wait_exit(SOON);
    let log = d.log();
    assert_eq!(status.code(), Some(70), "{log}");
    assert!(panic_logged(&log, "main"), "{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {log}");
    assert!(!process_alive(pid), "the handler outlived the stop: {log}");
    assert_eq!(env.names("new"), ["job".to_owned()].into(), "{log}");
    assert!(env.names("active").is_empty(), "{log}");
}
