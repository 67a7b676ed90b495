//! Persistent handlers (issue 16): the documented Python example serves jobs, names JSON cannot
//! carry arrive escaped with a path that opens the job, and every exec-mode guarantee holds:
//! the time limit (a fresh process for the next job), a handler that dies, answers twice,
//! answers for another job or writes garbage, one that floods stderr (spoold's memory stays
//! bounded), one that stops reading its stdin (the stop still ends in its bound), the abort
//! (the job goes back, uncounted), no process left behind, a handler that dies while idle
//! (restarted without waiting for a job), a handler that cannot start
//! (restarted with a growing delay, not in a busy loop), and a reload that changes the handler.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{Env, SOON, pids_in, process_alive, wait_for};

/// A handler whose behaviour each job's text chooses. It records each process's pid in
/// `PIDS` (children too) and, per job, `OUT/ID` = "PID GREETING" (who served it, in which
/// config).
const HANDLER: &str = r#"
import json, os, signal, subprocess, sys, time
PIDS, OUT = sys.argv[1], sys.argv[2]
def record(pid):
    with open(PIDS, "a") as f:
        f.write(f"{pid}\n")
record(os.getpid())
def answer(job_id, status=0, twice=False, reason=None):
    reply = {"id": job_id, "status": status}
    if reason is not None:
        reply["reason"] = reason
    line = json.dumps(reply) + "\n"
    sys.stdout.write(line * (2 if twice else 1))
    sys.stdout.flush()
for line in sys.stdin:
    job = json.loads(line)
    with open(job["path"]) as f:
        body = f.read().strip()
    with open(os.path.join(OUT, job["id"]), "w") as f:
        f.write(f"{os.getpid()} {os.environ.get('GREETING', '')}\n")
    print(f"working on {body}", file=sys.stderr, flush=True)
    if body == "hang":
        time.sleep(3600)
    elif body == "die":
        os._exit(3)
    elif body == "twice":
        answer(job["id"], twice=True)
    elif body == "wrongid":
        answer("someone-else")
    elif body == "garbage":
        print("hello, spoold", flush=True)
    elif body == "status7":
        answer(job["id"], 7)
    elif body == "longexit":
        # A long answer (several of spoold's reads), then an exit at once, as a handler that
        # serves a number of jobs and then recycles itself does.
        answer(job["id"], reason="traceback " * 3000)
        os._exit(0)
    elif body == "closeexit":
        # Recycles, but closes its stdin first and takes a moment to exit: the next job's
        # line meets a closed pipe before the exit can be seen.
        answer(job["id"])
        os.close(0)
        time.sleep(0.5)
        os._exit(0)
    elif body == "flood":
        chunk = b"x" * (1 << 20)
        for _ in range(1024):
            os.write(2, chunk)
        os.write(2, b"\nflooded\n")
        answer(job["id"])
    elif body == "child":
        # A child in the handler's group that ignores SIGTERM: only SIGKILL ends it.
        child = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 3600"])
        record(child.pid)
        answer(job["id"])
    elif body == "deaf":
        answer(job["id"])
        # Stop reading stdin, and fill the pipe so that spoold cannot write the next job.
        fd = os.open("/proc/self/fd/0", os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except BlockingIOError:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    else:
        answer(job["id"])
"#;

struct Case {
    env: Env,
    pids: PathBuf,
    out: PathBuf,
}

/// A spool with the handler above in persistent mode, and `extra` config after the command.
fn case(extra: &str) -> Case {
    let env = Env::new(&["/bin/true"], "");
    let pids = env.dir.path().join("pids");
    let out = env.dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let script = env.dir.path().join("handler.py");
    fs::write(&script, HANDLER).unwrap();
    write_config(&env, &script, &pids, &out, extra);
    Case { env, pids, out }
}

fn write_config(env: &Env, script: &Path, pids: &Path, out: &Path, extra: &str) {
    env.write_config(
        &[
            "python3",
            &script.display().to_string(),
            &pids.display().to_string(),
            &out.display().to_string(),
        ],
        &format!("mode = \"persistent\"\n{extra}"),
    );
}

impl Case {
    /// The pid of the handler process that served job `id`.
    fn served_by(&self, id: &str) -> i32 {
        let text = fs::read_to_string(self.out.join(id)).unwrap();
        text.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// Every pid the handlers recorded is gone.
fn assert_no_survivors(pids_file: &Path) {
    let pids = pids_in(pids_file);
    assert!(!pids.is_empty(), "the handler recorded no pids");
    let gone = wait_for(Duration::from_secs(2), || {
        pids.iter().all(|p| !process_alive(*p)).then_some(())
    });
    let alive: Vec<i32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    assert!(gone.is_some(), "processes outlived spoold: {alive:?}");
}

/// The reason recorded for failed job `id`.
fn reason_of(env: &Env, id: &str) -> String {
    crate::util::failed_reasons(env)
        .into_iter()
        .find(|(j, _)| j == id)
        .and_then(|(_, r)| r)
        .unwrap_or_else(|| panic!("{id} is not in `spoold failed`"))
}

fn wait_path(path: &Path) -> bool {
    wait_for(SOON, || path.exists().then_some(())).is_some()
}

fn vm_kb(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn the_documented_python_example_serves_many_jobs_with_one_process_per_worker() {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example-persistent-handler.py");
    let env = Env::new(
        &["python3", &example.display().to_string()],
        "mode = \"persistent\"\n[workers]\ncount = 2\n",
    );
    let mut d = env.start();
    for i in 0..20 {
        env.submit(&format!("job-{i:02}"), "hello");
    }
    // A name JSON cannot carry as it is: a control character and a byte that is not UTF-8.
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"odd\x01name\xff");
        let tmp = env.path("tmp").join(odd);
        fs::write(&tmp, "odd data").unwrap();
        fs::rename(&tmp, env.path("new").join(odd)).unwrap();
    }
    d.wait_until("21 jobs done", || env.count("done") == 21);
    let log = d.log();
    assert_eq!(
        log.matches("persistent handler started").count(),
        2,
        "one handler per worker:\n{log}"
    );
    assert!(log.contains("got 5 bytes, attempt 1"), "{log}");
    assert!(
        log.contains("got 8 bytes, attempt 1"),
        "the odd name's file was read:\n{log}"
    );
    assert_eq!(env.count("failed"), 0);
    d.stop();
}

#[test]
fn a_handler_that_never_answers_times_out_and_a_fresh_process_serves_the_next_job() {
    // Long enough for Python to start and read the job on a loaded machine.
    let c = case("timeout = \"3s\"\nkill_grace = \"300ms\"\n[retry]\nmax_attempts = 1\n");
    let mut d = c.env.start();
    c.env.submit("a-hang", "hang");
    assert!(wait_path(&c.env.path("failed/a-hang")), "{}", d.log());
    let reason = reason_of(&c.env, "a-hang");
    assert!(reason.starts_with("timed out after 3s"), "{reason}");
    c.env.submit("b-next", "plain");
    assert!(wait_path(&c.env.path("done/b-next")), "{}", d.log());
    assert_ne!(
        c.served_by("a-hang"),
        c.served_by("b-next"),
        "a fresh process"
    );
    d.stop();
    assert_no_survivors(&c.pids);
}

#[test]
fn a_handler_that_dies_or_breaks_the_protocol_fails_that_job_and_is_restarted() {
    // One worker, so that "the same process served the next job" does not depend on which of
    // two idle workers claimed it.
    let c = case("[retry]\nmax_attempts = 1\npermanent_exit_codes = [7]\n[workers]\ncount = 1\n");
    let mut d = c.env.start();
    let cases = [
        (
            "a-die",
            "die",
            "the persistent handler exited before answering: exit status 3",
        ),
        (
            "b-wrongid",
            "wrongid",
            "the handler answered for job \"someone-else\"",
        ),
        (
            "c-garbage",
            "garbage",
            "the handler answered with something that is not a JSON answer",
        ),
        ("d-status7", "status7", "exit status 7"),
    ];
    for (id, body, why) in cases {
        c.env.submit(id, body);
        assert!(
            wait_path(&c.env.path(&format!("failed/{id}"))),
            "{}",
            d.log()
        );
        let reason = reason_of(&c.env, id);
        assert!(reason.starts_with(why), "{id}: {reason}");
        // The next job is served, by a new process after a failure of the handler.
        let next = format!("{id}-next");
        c.env.submit(&next, "plain");
        assert!(
            wait_path(&c.env.path(&format!("done/{next}"))),
            "{}",
            d.log()
        );
        if body == "status7" {
            assert_eq!(
                c.served_by(id),
                c.served_by(&next),
                "an answer keeps the handler"
            );
        } else {
            assert_ne!(c.served_by(id), c.served_by(&next), "{id}: restarted");
        }
    }
    // A long answer written just before the handler exits still counts: the job is done, and
    // a fresh process serves the next. Queued together, each next job may be handed to the
    // handler in the instant before its exit is seen: it has not read it, so the job goes back
    // without an attempt counted (one attempt is all these jobs get) and a fresh one runs it.
    // The same with a handler that closes its stdin before it exits: the next job's line
    // meets a closed pipe, no byte of it got in, and it goes back uncounted too.
    let settled = |id: &String| {
        c.env.path(&format!("done/{id}")).exists() || c.env.path(&format!("failed/{id}")).exists()
    };
    for (body, count) in [("longexit", 5), ("closeexit", 3)] {
        let ids: Vec<String> = (0..count).map(|i| format!("f-{body}-{i}")).collect();
        for id in &ids {
            c.env.submit(id, body);
        }
        assert!(
            wait_for(SOON, || ids.iter().all(settled).then_some(())).is_some(),
            "{}",
            d.log()
        );
        for id in &ids {
            assert!(
                c.env.path(&format!("done/{id}")).exists(),
                "{id} failed: {}; log:\n{}",
                reason_of(&c.env, id),
                d.log()
            );
        }
    }
    // An answer given twice: the job is done, and the handler, whose extra line would answer
    // the next job, is restarted before it.
    c.env.submit("e-twice", "twice");
    assert!(wait_path(&c.env.path("done/e-twice")), "{}", d.log());
    c.env.submit("e-twice-next", "plain");
    assert!(wait_path(&c.env.path("done/e-twice-next")), "{}", d.log());
    assert_ne!(c.served_by("e-twice"), c.served_by("e-twice-next"));
    let log = d.log();
    assert!(
        log.contains("wrote to stdout with no job in flight"),
        "{log}"
    );
    assert!(log.contains("restarting it in"), "{log}");
    // The permanent code (7) went to failed/ at once, as exit status 7 would.
    assert_eq!(c.env.count("retry"), 0);
    d.stop();
    assert_no_survivors(&c.pids);
}

#[test]
fn a_handler_that_dies_while_idle_is_restarted_without_waiting_for_a_job() {
    let c = case("[workers]\ncount = 1\n");
    let mut d = c.env.start();
    c.env.submit("a-first", "plain");
    assert!(wait_path(&c.env.path("done/a-first")), "{}", d.log());
    let first = c.served_by("a-first");
    // Killed while no job is in flight, and no job comes after: the worker notices by itself.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = wait_for(SOON, || {
        pids_in(&c.pids)
            .into_iter()
            .find(|p| *p != first && process_alive(*p))
    });
    let log = d.log();
    let Some(second) = restarted else {
        panic!("no new handler started after the idle one died:\n{log}")
    };
    assert!(
        log.contains("the persistent handler exited between jobs (killed by SIGKILL)"),
        "{log}"
    );
    assert_eq!(c.env.count("new"), 0, "no job was submitted meanwhile");
    // The next job goes to the process that was started then.
    c.env.submit("b-next", "plain");
    assert!(wait_path(&c.env.path("done/b-next")), "{}", d.log());
    assert_eq!(c.served_by("b-next"), second);
    d.stop();
    assert_no_survivors(&c.pids);
}

#[test]
fn a_gigabyte_on_stderr_keeps_spoold_memory_bounded() {
    let c = case("");
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    c.env.submit("flood", "flood");
    d.wait_until_within(Duration::from_secs(300), "the flood job done", || {
        c.env.path("done/flood").exists()
    });
    let peak = vm_kb(d.pid(), "VmHWM");
    println!("spoold memory: {rss} kB at start, peak {peak} kB");
    assert!(peak <= rss + 8 * 1024, "peak {peak} kB from {rss} kB");
    // The log is read from spoold's stderr by a thread of the test: wait for it.
    assert!(
        d.wait_log(
            |l| l.contains("flooded") && l.contains("more bytes of this line dropped"),
            SOON
        ),
        "{}",
        &d.log()[d.log().len().saturating_sub(2000)..]
    );
    d.stop();
    assert_no_survivors(&c.pids);
}

#[test]
fn a_handler_that_stops_reading_its_stdin_never_blocks_a_stop() {
    let c = case("kill_grace = \"1s\"\n[workers]\ncount = 1\n[shutdown]\ndrain_timeout = \"1s\"\n");
    let mut d = c.env.start();
    c.env.submit("a-deaf", "deaf");
    assert!(wait_path(&c.env.path("done/a-deaf")), "{}", d.log());
    c.env.submit("b-blocked", "plain");
    d.wait_until("the next job claimed", || {
        c.env.path("active/b-blocked").exists()
    });
    // Let spoold try to write the job into the full pipe.
    std::thread::sleep(Duration::from_millis(300));
    d.term();
    let (status, took) = d.wait_exit(SOON);
    assert!(status.success(), "{}", d.log());
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?}, beyond drain_timeout + kill_grace"
    );
    assert!(c.env.path("new/b-blocked").exists(), "the job went back");
    assert!(
        !c.env.path("state/b-blocked").exists(),
        "its attempt did not count"
    );
    assert_no_survivors(&c.pids);
}

#[test]
fn an_abort_puts_the_job_back_uncounted_and_leaves_no_process() {
    let c = case("kill_grace = \"1s\"\n[workers]\ncount = 1\n[shutdown]\ndrain_timeout = \"0s\"\n");
    let mut d = c.env.start();
    c.env.submit("a-child", "child");
    assert!(wait_path(&c.env.path("done/a-child")), "{}", d.log());
    c.env.submit("b-hang", "hang");
    assert!(wait_path(&c.out.join("b-hang")), "{}", d.log());
    let started = Instant::now();
    d.stop();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(c.env.path("new/b-hang").exists(), "the job went back");
    assert!(
        !c.env.path("state/b-hang").exists(),
        "its attempt did not count"
    );
    assert!(
        d.wait_log(
            |l| l.contains("job_id=\"b-hang\" attempt=1 outcome=\"requeued\""),
            SOON
        ),
        "{}",
        d.log()
    );
    // The handler, and the child it left in its group, are gone.
    assert_eq!(
        pids_in(&c.pids).len(),
        2,
        "the handler and its child: {}",
        d.log()
    );
    assert_no_survivors(&c.pids);
}

#[test]
fn a_handler_that_cannot_start_is_restarted_with_a_growing_delay() {
    let env = Env::new(&["/bin/true"], "");
    let starts = env.dir.path().join("starts");
    let script = env.script(
        "exits.sh",
        &format!("echo $$ >> {}\nexit 1", starts.display()),
    );
    // Jobs that come back soon after each failed attempt, so that there is always one to
    // serve: the handler's delay, not the jobs' backoff, paces the restarts.
    env.write_config(
        &[&script],
        "mode = \"persistent\"\n[workers]\ncount = 1\n\
         [retry]\nmax_attempts = 1000\nbackoff_initial = \"10ms\"\nbackoff_max = \"10ms\"\n",
    );
    let mut d = env.start();
    for i in 0..5 {
        env.submit(&format!("waiting-{i}"), "x");
    }
    let watched = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let count = pids_in(&starts).len();
    let elapsed = watched.elapsed();
    let log = d.log();
    // Delays of 0.1, 0.2, 0.4, 0.8 and 1.6 s fit in 3 s: about 6 starts; a busy loop makes
    // hundreds.
    assert!(
        (2..=9).contains(&count),
        "{count} starts in {elapsed:?}:\n{log}"
    );
    assert!(log.contains("restarting it in 800ms"), "{log}");
    // `systemctl status` says so too (STATUS=).
    assert!(
        d.notes()
            .iter()
            .any(|n| n.contains("persistent handler(s) failing, restarting with a growing delay")),
        "{:?}",
        d.notes()
    );
    assert_eq!(env.count("failed"), 0, "{log}");
    d.stop();
}

#[test]
fn a_reload_that_changes_the_handler_restarts_it_between_jobs() {
    let c = case("env = { GREETING = \"first\" }\n[workers]\ncount = 1\n");
    let mut d = c.env.start();
    c.env.submit("a-before", "plain");
    assert!(wait_path(&c.env.path("done/a-before")), "{}", d.log());
    let script = c.env.dir.path().join("handler.py");
    write_config(
        &c.env,
        &script,
        &c.pids,
        &c.out,
        "env = { GREETING = \"second\" }\n[workers]\ncount = 1\n",
    );
    d.signal(1);
    assert!(
        d.wait_log(|l| l.contains("configuration reloaded"), SOON),
        "{}",
        d.log()
    );
    c.env.submit("b-after", "plain");
    assert!(wait_path(&c.env.path("done/b-after")), "{}", d.log());
    let greeting = |id: &str| fs::read_to_string(c.out.join(id)).unwrap();
    assert!(greeting("a-before").ends_with(" first\n"));
    assert!(
        greeting("b-after").ends_with(" second\n"),
        "{}",
        greeting("b-after")
    );
    assert!(d.log().contains("the handler config changed: restarting"));
    // An unchanged reload keeps the process.
    d.signal(1);
    assert!(
        d.wait_log(|l| l.matches("configuration reloaded").count() == 2, SOON),
        "{}",
        d.log()
    );
    c.env.submit("c-again", "plain");
    assert!(wait_path(&c.env.path("done/c-again")), "{}", d.log());
    assert_eq!(c.served_by("b-after"), c.served_by("c-again"));
    d.stop();
    assert_no_survivors(&c.pids);
}

#[test]
fn a_cancel_ends_the_job_in_flight_and_a_fresh_process_serves_the_next() {
    let c = case("kill_grace = \"500ms\"\n[workers]\ncount = 1\n");
    let mut d = c.env.start();
    c.env.submit("a-hang", "hang");
    assert!(wait_path(&c.out.join("a-hang")), "{}", d.log());
    let asked = Instant::now();
    let out = c.env.cli(&["cancel", "a-hang"]);
    assert!(out.status.success(), "{}", crate::util::describe(&out));
    assert!(wait_path(&c.env.path("failed/a-hang")), "{}", d.log());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(reason_of(&c.env, "a-hang"), "cancelled");
    c.env.submit("b-next", "plain");
    assert!(wait_path(&c.env.path("done/b-next")), "{}", d.log());
    assert_ne!(c.served_by("a-hang"), c.served_by("b-next"));
    d.stop();
    assert_no_survivors(&c.pids);
}
