//! Misbehaving handlers (issue 6): one that ignores SIGTERM, one whose grandchild ignores SIGTERM
//! and keeps stdout open, one that writes 1 GB, one that reads stdin to its end, one killed by a
//! signal, one that closes its output and runs on, one that exits before reading its input; group
//! members that outlive the handler without holding its output; a daemon started with SIGCHLD
//! ignored; and an abort in a PID namespace whose /proc is its parent's.
//!
//! For each: spoold's memory stays bounded (VmHWM of the daemon, from /proc), no process of the
//! handler outlives its job (every handler records its pids; /proc must not know them once the
//! job is recorded), and the recorded outcome is right (`spoold failed --json`, done/).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{self, Env, SOON, pids_in, process_alive, wait_for};
use serde_json::Value;

/// How much the daemon's peak resident memory may exceed what it used when it became ready.
/// The handler's output is read 8 KiB at a time and lines are cut at 4 KiB, so gigabytes of
/// output must fit in a few megabytes (measured: under 300 kB of growth for 1 GB); the bound
/// leaves room for allocator slack.
const MEMORY_HEADROOM_KB: u64 = 8 * 1024;

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
fn vm_kb(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A spool whose handler is `body` (a shell script that may use $PIDS, the file each process
/// appends its pid to, and $OUT, a scratch directory), and `extra` config.
struct Case {
    env: Env,
    pids: std::path::PathBuf,
    out: std::path::PathBuf,
}

fn case(body: &str, extra: &str) -> Case {
    let env = Env::new(&["/bin/true"], "");
    let pids = env.dir.path().join("pids");
    let out = env.dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let script = env.script(
        "handler.sh",
        &format!(
            "PIDS={}\nOUT={}\necho $$ >> \"$PIDS\"\n{body}",
            pids.display(),
            out.display()
        ),
    );
    env.write_config(&[&script], extra);
    Case { env, pids, out }
}

/// The failure record of `id` from `spoold failed --json`.
fn failure_of(env: &Env, id: &str) -> Value {
    let out = env.cli(&["failed", "--json"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in `spoold failed`: {list}"))["record"]
        .clone()
}

/// Waits until `path` exists.
fn wait_path(path: &Path, within: Duration) -> bool {
    wait_for(within, || path.exists().then_some(())).is_some()
}

/// Every pid the handler recorded is gone: none outlives its job. Reaping by the kernel may
/// take a moment after the group was killed, hence the short wait.
fn assert_no_survivors(pids_file: &Path) {
    let pids = pids_in(pids_file);
    assert!(!pids.is_empty(), "the handler recorded no pids");
    let survivors = wait_for(Duration::from_secs(2), || {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
        alive.is_empty().then_some(())
    });
    let alive: Vec<i32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    assert!(
        survivors.is_some(),
        "processes outlived their job: {alive:?}"
    );
}

/// The daemon's peak memory stayed within MEMORY_HEADROOM_KB of what it used at start.
fn assert_memory_bounded(pid: i32, at_start_kb: u64) {
    let peak = vm_kb(pid, "VmHWM");
    println!("spoold memory: {at_start_kb} kB at start, peak {peak} kB");
    assert!(
        peak <= at_start_kb + MEMORY_HEADROOM_KB,
        "spoold's peak memory grew to {peak} kB from {at_start_kb} kB at start"
    );
}

/// Starts the daemon on `c`, runs one job named `name` and returns how long it took to reach
/// done/ (at most `within`); then checks that nothing the handler started survived and that
/// spoold's memory stayed bounded.
fn run_to_done(c: &Case, name: &str, within: Duration) -> Duration {
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    c.env.submit(name, "x");
    let start = Instant::now();
    assert!(
        wait_path(&c.env.path(&format!("done/{name}")), within),
        "{}",
        d.log()
    );
    let took = start.elapsed();
    assert_no_survivors(&c.pids);
    assert_memory_bounded(d.pid(), rss);
    d.stop();
    took
}

#[test]
fn handler_that_ignores_sigterm_is_killed_at_the_timeout() {
    let c = case(
        "trap '' TERM\nsleep 30 &\necho $! >> \"$PIDS\"\nwait\nwait\nexit 0",
        "timeout = \"1s\"\nkill_grace = \"300ms\"\n[retry]\nmax_attempts = 1\n",
    );
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    c.env.submit("stubborn", "x");
    assert!(
        wait_path(&c.env.path("failed/stubborn"), SOON),
        "{}",
        d.log()
    );
    assert_no_survivors(&c.pids);
    assert_eq!(pids_in(&c.pids).len(), 2, "the handler and its child");
    let record = failure_of(&c.env, "stubborn");
    let last = &record["last_failure"];
    assert_eq!(last["timed_out"], true, "{record}");
    assert_eq!(last["signal"], 9, "{record}");
    assert_eq!(last["exit_code"], Value::Null, "{record}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("timed out after 1s") && reason.contains("killed by SIGKILL"),
        "{reason}"
    );
    // SIGKILL came kill_grace after the timeout's SIGTERM, not much later.
    let ms = last["duration_ms"].as_u64().unwrap();
    assert!((1300..3000).contains(&ms), "took {ms} ms");
    assert_memory_bounded(d.pid(), rss);
    d.stop();
}

#[test]
fn grandchild_that_ignores_sigterm_and_keeps_stdout_open_is_killed() {
    // The handler itself exits 0 at once; its grandchild (same process group) holds stdout.
    let c = case(
        "sh -c 'trap \"\" TERM; echo $$ >> \"$0\"; exec sleep 30' \"$PIDS\" &\n\
         while [ $(wc -l < \"$PIDS\") -lt 2 ]; do sleep 0.01; done\nexit 0",
        "timeout = \"20s\"\nkill_grace = \"500ms\"\n",
    );
    let took = run_to_done(&c, "parent-gone", SOON);
    // SIGTERM is ignored, so the job ends at SIGKILL, kill_grace after the handler exited.
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

#[test]
fn grandchild_that_left_the_group_cannot_hold_the_job() {
    // A process that called setsid is out of spoold's reach (it is no longer in the handler's
    // process group); spoold must still finish the job instead of waiting on its stdout. The
    // escaped process holds stdout for 300 s and the timeout is 120 s, so a job done within
    // 60 s was not held by either, however loaded the machine.
    let c = case(
        "setsid sh -c 'echo $$ >> \"$0\"; exec sleep 300' \"$PIDS\" &\n\
         while [ $(wc -l < \"$PIDS\") -lt 2 ]; do sleep 0.01; done\nexit 0",
        "timeout = \"120s\"\nkill_grace = \"500ms\"\n",
    );
    let mut d = c.env.start();
    c.env.submit("escaped", "x");
    let done = wait_path(&c.env.path("done/escaped"), Duration::from_secs(60));
    // Whatever happened, the escaped process is ours to clean up.
    for pid in pids_in(&c.pids) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
    assert!(done, "the job was held by an escaped process; {}", d.log());
    assert!(
        d.log()
            .contains("a process that left the handler's process group keeps its output open"),
        "{}",
        d.log()
    );
    d.stop();
}

#[test]
fn handler_that_writes_a_gigabyte_keeps_spoold_memory_bounded() {
    // 1 GB on stdout as one endless line (closed before the rest, so that the cut line is logged
    // before the cap on logged lines is reached), then 50 MB of short lines on stderr.
    let c = case(
        "head -c 1000000000 /dev/zero\nexec >&-\n\
         yes 'a line of handler output that goes on' | head -c 50000000 >&2\nexit 0",
        "timeout = \"5m\"\n",
    );
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    c.env.submit("loud", "x");
    assert!(
        wait_path(&c.env.path("done/loud"), Duration::from_secs(240)),
        "{}",
        &d.log()[..2000.min(d.log().len())]
    );
    assert_memory_bounded(d.pid(), rss);
    assert_no_survivors(&c.pids);
    // The daemon's log reaches the test through a pipe and a reader thread: the last lines
    // written before the job moved to done/ may still be on their way.
    d.wait_until("the cut line to be logged", || {
        d.log().contains("more bytes of this line dropped")
    });
    d.wait_until("the cap on logged lines to be reported", || {
        d.log()
            .contains("more lines of handler output were not logged")
    });
    d.stop();
}

#[test]
fn handler_that_reads_stdin_forever_gets_the_job_or_nothing_then_its_timeout() {
    // "reader" reads stdin to its end; "follower" (tail -f) waits for more input for ever.
    for (mode, expect_len) in [("job", 1_000_000u64), ("null", 0)] {
        let c = case(
            "case \"$SPOOLD_JOB_ID\" in\n\
             reader) cat > \"$OUT/copy\";;\n\
             follower) tail -f /dev/stdin > /dev/null;;\n\
             esac\nexit 0",
            &format!(
                "stdin = \"{mode}\"\ntimeout = \"3s\"\nkill_grace = \"500ms\"\n\
                 [retry]\nmax_attempts = 1\n"
            ),
        );
        let mut d = c.env.start();
        let rss = vm_kb(d.pid(), "VmRSS");
        c.env.submit("reader", &"z".repeat(1_000_000));
        c.env.submit("follower", &"z".repeat(1_000_000));
        // stdin ends (a file or /dev/null, never a pipe left open): the reader is done well
        // within its timeout, with the job's bytes or none.
        assert!(
            wait_path(&c.env.path("done/reader"), SOON),
            "stdin = {mode}: {}",
            d.log()
        );
        assert_eq!(
            fs::metadata(c.out.join("copy")).unwrap().len(),
            expect_len,
            "stdin = {mode}"
        );
        // The follower never ends by itself: its timeout ends it.
        assert!(
            wait_path(&c.env.path("failed/follower"), SOON),
            "stdin = {mode}: {}",
            d.log()
        );
        let record = failure_of(&c.env, "follower");
        assert_eq!(record["last_failure"]["timed_out"], true, "{record}");
        assert_no_survivors(&c.pids);
        assert_memory_bounded(d.pid(), rss);
        d.stop();
    }
}

#[test]
fn handler_killed_by_a_signal_is_recorded_with_the_signal() {
    let c = case(
        "case \"$SPOOLD_JOB_ID\" in\nusr1) kill -USR1 $$;;\nkill) kill -KILL $$;;\nesac\nsleep 5",
        "timeout = \"60s\"\n[retry]\nmax_attempts = 1\n",
    );
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    c.env.submit("usr1", "x");
    c.env.submit("kill", "x");
    d.wait_until("failed/ to hold 2", || c.env.count("failed") == 2);
    for (id, sig, name) in [("usr1", 10, "SIGUSR1"), ("kill", 9, "SIGKILL")] {
        let record = failure_of(&c.env, id);
        let last = &record["last_failure"];
        assert_eq!(last["signal"], sig, "{record}");
        assert_eq!(last["exit_code"], Value::Null, "{record}");
        assert_eq!(last["timed_out"], false, "{record}");
        assert_eq!(
            last["reason"].as_str().unwrap(),
            format!("killed by {name}"),
            "{record}"
        );
        assert!(
            d.log().contains(&format!("exit_status={}", 128 + sig)),
            "{}",
            d.log()
        );
    }
    assert_no_survivors(&c.pids);
    assert_memory_bounded(d.pid(), rss);
    d.stop();
}

#[test]
fn handler_that_closes_its_output_and_runs_on_is_waited_for() {
    // End of output is not the end of the handler: the outcome is its exit status, 1 s later.
    let c = case(
        "exec >&- 2>&-\nsleep 1\ntouch \"$OUT/exited\"\nexit 3",
        "timeout = \"60s\"\n[retry]\npermanent_exit_codes = [3]\n",
    );
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    c.env.submit("quiet", "x");
    assert!(wait_path(&c.env.path("failed/quiet"), SOON), "{}", d.log());
    assert!(
        c.out.join("exited").exists(),
        "recorded before the handler exited"
    );
    let record = failure_of(&c.env, "quiet");
    assert_eq!(record["last_failure"]["exit_code"], 3, "{record}");
    assert_eq!(record["permanent"], true, "{record}");
    assert!(record["last_failure"]["duration_ms"].as_u64().unwrap() >= 1000);
    assert_no_survivors(&c.pids);
    assert_memory_bounded(d.pid(), rss);
    d.stop();
}

#[test]
fn handler_that_exits_before_reading_its_input_is_recorded_by_its_status() {
    let c = case(
        "case \"$SPOOLD_JOB_ID\" in ok) exit 0;; *) exit 5;; esac",
        "stdin = \"job\"\n[retry]\nmax_attempts = 1\n",
    );
    let mut d = c.env.start();
    let rss = vm_kb(d.pid(), "VmRSS");
    let big = "b".repeat(20_000_000);
    c.env.submit("ok", &big);
    c.env.submit("bad", &big);
    assert!(
        wait_path(&c.env.path("done/ok"), SOON) && wait_path(&c.env.path("failed/bad"), SOON),
        "{}",
        d.log()
    );
    // The unread input is the job itself: untouched.
    assert_eq!(
        fs::metadata(c.env.path("done/ok")).unwrap().len(),
        big.len() as u64
    );
    let record = failure_of(&c.env, "bad");
    assert_eq!(record["last_failure"]["exit_code"], 5, "{record}");
    assert_eq!(
        record["last_failure"]["reason"], "exit status 5",
        "{record}"
    );
    assert_no_survivors(&c.pids);
    assert_memory_bounded(d.pid(), rss);
    d.stop();
}

#[test]
fn handler_inherits_no_descriptor_of_the_spool() {
    // A backlog of more than two scan batches keeps a scan of new/ open while the first handlers
    // start; none of spoold's descriptors (the scan, the lock, the spool's directories) may
    // leak into a handler.
    let c = case(
        "case \"$SPOOLD_JOB_ID\" in j000*) ls -l /proc/$$/fd/ > \"$OUT/fds.$SPOOLD_JOB_ID\";; esac",
        "[workers]\ncount = 2\n",
    );
    for i in 0..3000 {
        c.env.submit(&format!("j{i:04}"), "x");
    }
    let mut d = c.env.start();
    assert!(wait_path(&c.env.path("done/j0009"), SOON), "{}", d.log());
    d.stop();
    let spool = c.env.spool.display().to_string();
    let mut seen = 0;
    for i in 0..10 {
        let fds = fs::read_to_string(c.out.join(format!("fds.j{i:04}"))).unwrap();
        assert!(
            !fds.contains(&spool),
            "handler j{i:04} inherited a descriptor of the spool:\n{fds}"
        );
        seen += 1;
    }
    assert_eq!(seen, 10);
}

#[test]
fn group_member_that_ignores_sigterm_without_our_pipes_is_killed() {
    // The handler exits 0 at once; a member of its group has sent its output elsewhere, so no
    // pipe tells spoold it lives on, and it ignores SIGTERM.
    let c = case(
        "sh -c 'trap \"\" TERM; echo $$ >> \"$0\"; exec sleep 30' \"$PIDS\" \
         </dev/null >/dev/null 2>&1 &\n\
         while [ $(wc -l < \"$PIDS\") -lt 2 ]; do sleep 0.01; done\nexit 0",
        "timeout = \"20s\"\nkill_grace = \"500ms\"\n",
    );
    let took = run_to_done(&c, "quiet-member", SOON);
    // The job ends at the SIGKILL, kill_grace after the handler exited, not before.
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

#[test]
fn group_member_that_goes_on_sigterm_does_not_hold_the_job_for_kill_grace() {
    // The member holds no pipe of ours and ends on SIGTERM; the job must not wait the
    // 30 s kill_grace for it.
    let c = case(
        "sh -c 'echo $$ >> \"$0\"; exec sleep 30' \"$PIDS\" </dev/null >/dev/null 2>&1 &\n\
         while [ $(wc -l < \"$PIDS\") -lt 2 ]; do sleep 0.01; done\nexit 0",
        "timeout = \"60s\"\nkill_grace = \"30s\"\n",
    );
    let took = run_to_done(&c, "polite-member", Duration::from_secs(20));
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn handlers_run_when_spoold_was_started_with_sigchld_ignored() {
    // An ignored SIGCHLD survives exec; the kernel would then reap each handler before its
    // worker waits for it, and every job would fail.
    let env = util::Env::new(&["/bin/sh", "-c", "exit 0"], "");
    let mut cmd = std::process::Command::new("env");
    cmd.arg("--ignore-signal=CHLD")
        .arg(util::BIN)
        .arg("run")
        .arg("--config")
        .arg(&env.config);
    let mut d = util::Daemon::spawn_command(cmd);
    d.wait_note(|n| n.contains("READY=1"), SOON)
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", d.log()));
    let rss = vm_kb(d.pid(), "VmRSS");
    env.submit("reaped-by-us", "x");
    assert!(
        wait_path(&env.path("done/reaped-by-us"), SOON),
        "{}",
        d.log()
    );
    assert_memory_bounded(d.pid(), rss);
    d.stop();
}

/// The host pids of the processes in the PID namespace `ns` (a `/proc/PID/ns/pid` link) that are
/// alive, except its init, each with its command line.
fn live_processes_in_pid_namespace(ns: &Path) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let in_ns = fs::read_link(entry.path().join("ns/pid")).is_ok_and(|l| l == ns);
        // NSpid ends with the pid inside the namespace; the init there is 1.
        let is_init = fs::read_to_string(entry.path().join("status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|p| p.split_ascii_whitespace().last())
                == Some("1")
        });
        if in_ns && !is_init && process_alive(pid) {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

#[test]
fn abort_ends_the_group_where_proc_belongs_to_a_parent_pid_namespace() {
    // spoold runs in a PID namespace of its own whose /proc is the host's (`unshare --pid
    // --fork`, no --mount-proc): /proc's pids there are not the ones spoold's process groups
    // have. spoold is not the namespace's init, which outlives it (as a sandbox's would), so
    // whatever spoold leaves behind is still there to be seen after it exits.
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        return util::skip(
            "abort_ends_the_group_where_proc_belongs_to_a_parent_pid_namespace",
            &format!("cannot create a PID namespace (unshare --pid --fork): {probe:?}"),
        );
    }
    // Each handler starts a shell that ignores SIGTERM, as does its sleep (an ignored signal
    // stays ignored across exec), then waits; the abort's SIGTERM ends only the handler.
    let c = case(
        "sh -c 'trap \"\" TERM; echo started >> \"$0\"; sleep 30' \"$OUT/started\" &\nwait",
        "timeout = \"60s\"\nkill_grace = \"500ms\"\n\n[shutdown]\ndrain_timeout = \"500ms\"\n\n\
         [workers]\ncount = 2\n",
    );
    let exited = c.env.dir.path().join("spoold-exited");
    let mut cmd = std::process::Command::new("unshare");
    // --kill-child: when the test drops the daemon (kills unshare), the namespace's init gets
    // SIGKILL, and everything left in the namespace with it.
    cmd.args(["--pid", "--fork", "--kill-child", "sh", "-c"])
        .arg("\"$0\" run --config \"$1\"; echo $? > \"$2\"; exec sleep 600")
        .arg(util::BIN)
        .arg(&c.env.config)
        .arg(&exited);
    let d = util::Daemon::spawn_command(cmd);
    d.wait_note(|n| n.contains("READY=1"), SOON)
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", d.log()));
    // spoold is a child of the namespace's init, not the `unshare` the test started: find its
    // host pid, to signal it, and its namespace, to look for what it leaves behind.
    let bin = fs::canonicalize(util::BIN).unwrap();
    let config = c.env.config.display().to_string();
    let spoold = wait_for(SOON, || {
        fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            (fs::read_link(e.path().join("exe")).ok()? == bin
                && String::from_utf8_lossy(&cmdline).contains(&config))
            .then_some(pid)
        })
    })
    .expect("spoold's host pid");
    let ns = fs::read_link(format!("/proc/{spoold}/ns/pid")).unwrap();
    assert_ne!(
        ns,
        fs::read_link("/proc/self/ns/pid").unwrap(),
        "spoold runs in a PID namespace of its own"
    );

    c.env.submit("one", "x");
    c.env.submit("two", "x");
    let started = c.out.join("started");
    assert!(
        wait_for(SOON, || {
            (fs::read_to_string(&started)
                .unwrap_or_default()
                .lines()
                .count()
                == 2)
                .then_some(())
        })
        .is_some(),
        "both handlers started their shell; log:\n{}",
        d.log()
    );
    let status = std::process::Command::new("kill")
        .arg(spoold.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let code = wait_for(SOON, || {
        fs::read_to_string(&exited)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .unwrap_or_else(|| panic!("spoold did not exit; log:\n{}", d.log()));
    assert_eq!(code.trim(), "0", "spoold's exit status; log:\n{}", d.log());
    assert_eq!(
        c.env.names("new"),
        ["one", "two"].map(String::from).into(),
        "the aborted jobs went back to new/; log:\n{}",
        d.log()
    );
    // The SIGKILL came before spoold exited; the kernel may take a moment to end them.
    let survivors = wait_for(Duration::from_secs(2), || {
        live_processes_in_pid_namespace(&ns)
            .is_empty()
            .then_some(())
    });
    assert!(
        survivors.is_some(),
        "processes of the handlers outlived spoold: {:?}; log:\n{}",
        live_processes_in_pid_namespace(&ns),
        d.log()
    );
}
