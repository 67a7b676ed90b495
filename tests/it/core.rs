//! The core queue, end to end on the real binary: throughput and exactly-once, retries, failed/,
//! timeouts, crash recovery, bursts past the inotify queue, and the client commands (bad entries,
//! names, handlers, roots and configs are in `bad_inputs`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::util::{self, Env, SOON, pids_in, process_alive, recording_env, runs};

#[test]
fn thousand_jobs_through_four_workers_run_exactly_once() {
    let env = recording_env("[workers]\ncount = 4\n");
    let mut d = env.start();
    for i in 0..1000 {
        env.submit(&format!("job-{i:04}"), "x");
    }
    d.wait_until_within(SOON * 4, "done/ to hold 1000", || env.count("done") == 1000);
    d.stop();
    let runs = runs(&env);
    assert_eq!(runs.len(), 1000);
    assert!(runs.values().all(|&n| n == 1), "some job ran twice");
    assert_eq!(
        env.count("new") + env.count("active") + env.count("failed"),
        0
    );
    let expected: std::collections::BTreeSet<String> =
        (0..1000).map(|i| format!("job-{i:04}")).collect();
    assert_eq!(env.names("done"), expected);
}

#[test]
fn failing_job_is_retried_with_backoff_then_failed_with_reason() {
    let env = Env::new(&["/bin/true"], "");
    let runs = env.dir.path().join("runs").display().to_string();
    let script = env.script(
        "fail.sh",
        &format!("echo \"attempt $SPOOLD_ATTEMPT\" >> {runs}\necho \"database unreachable on attempt $3\" >&2\nexit 3"),
    );
    env.write_config(
        &[&script, "{path}", "{id}", "{attempt}"],
        "[retry]\nmax_attempts = 3\nbackoff_initial = \"100ms\"\nbackoff_max = \"200ms\"\n",
    );
    let mut d = env.start();
    env.submit("doomed", "x");
    d.wait_until("failed/ to hold 1", || env.count("failed") == 1);
    assert_eq!(
        fs::read_to_string(&runs).unwrap(),
        "attempt 1\nattempt 2\nattempt 3\n"
    );
    let out = env.cli(&["failed", "--json"]);
    assert!(out.status.success());
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let record = &failed[0]["record"];
    assert_eq!(failed[0]["id"], "doomed");
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["permanent"], false);
    assert_eq!(record["last_failure"]["exit_code"], 3);
    assert_eq!(record["last_failure"]["reason"], "exit status 3");
    assert_eq!(
        record["last_failure"]["stderr_tail"][0],
        "database unreachable on attempt 3"
    );
    assert!(record["first_attempt_at"].is_string() && record["failed_at"].is_string());
    // The human listing says the same.
    let text = String::from_utf8(env.cli(&["failed"]).stdout).unwrap();
    assert!(
        text.contains("doomed") && text.contains("exit status 3") && text.contains("attempts: 3"),
        "{text}"
    );
    assert!(d.log().contains("next attempt in"), "{}", d.log());
    d.stop();
    // The state of live jobs is gone; only the reason stays.
    assert_eq!(env.count("retry") + env.count("state"), 0);
}

#[test]
fn permanent_exit_code_fails_at_once() {
    let env = Env::new(
        &["/bin/sh", "-c", "exit 65"],
        "[retry]\npermanent_exit_codes = [65]\n",
    );
    let mut d = env.start();
    env.submit("bad-input", "x");
    d.wait_until("failed/ to hold 1", || env.count("failed") == 1);
    let failed: serde_json::Value =
        serde_json::from_slice(&env.cli(&["failed", "--json"]).stdout).unwrap();
    assert_eq!(failed[0]["record"]["attempts"], 1);
    assert_eq!(failed[0]["record"]["permanent"], true);
    d.stop();
}

#[test]
fn timeout_kills_a_handler_that_ignores_sigterm_and_its_child() {
    let env = Env::new(&["/bin/true"], "");
    let pids = env.dir.path().join("pids");
    // The handler and its child both ignore SIGTERM (an ignored signal survives exec), so only
    // the SIGKILL after kill_grace, sent to the whole process group, can end them.
    let script = env.script(
        "stubborn.sh",
        &format!(
            "trap '' TERM\nsh -c 'echo $$ >> {p}; exec sleep 1000' &\necho $$ >> {p}\nwait",
            p = pids.display()
        ),
    );
    env.write_config(
        &[&script],
        "timeout = \"500ms\"\nkill_grace = \"300ms\"\n[retry]\nmax_attempts = 1\n",
    );
    let mut d = env.start();
    env.submit("slowpoke", "x");
    d.wait_until("failed/ to hold 1", || env.count("failed") == 1);
    let pids = pids_in(&pids);
    assert_eq!(pids.len(), 2, "handler and child pids: {pids:?}");
    d.wait_until(
        &format!("the timed-out handler and its child ({pids:?}) to be gone"),
        || pids.iter().all(|p| !process_alive(*p)),
    );
    let failed: serde_json::Value =
        serde_json::from_slice(&env.cli(&["failed", "--json"]).stdout).unwrap();
    let last = &failed[0]["record"]["last_failure"];
    assert_eq!(last["timed_out"], true);
    assert_eq!(last["signal"], 9);
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .starts_with("timed out after 500ms"),
        "{last}"
    );
    d.stop();
}

#[test]
fn crash_recovery_after_kill_9_loses_nothing() {
    let env = Env::new(&["/bin/true"], "");
    let script = env.script(
        "slow.sh",
        &format!(
            "sleep 0.2\nprintf '%s\\n' \"$SPOOLD_JOB_ID\" >> {}",
            env.runs_file().display()
        ),
    );
    env.write_config(&[&script], "[workers]\ncount = 3\n");
    let mut d = env.start();
    for i in 0..30 {
        env.submit(&format!("c{i:02}"), "x");
    }
    // Kill it while jobs are in flight.
    d.wait_until(
        "done/ to hold at least 3 and active/ to hold more than 0",
        || env.count("done") >= 3 && env.count("active") > 0,
    );
    d.signal(9);
    d.wait_exit(SOON);
    let stranded = env.count("active");
    assert!(stranded > 0, "nothing was in flight at the kill");
    let mut d = env.start();
    assert!(
        d.log()
            .contains("left by a daemon that did not stop cleanly"),
        "{}",
        d.log()
    );
    d.wait_until_within(SOON * 2, "done/ to hold 30", || env.count("done") == 30);
    d.stop();
    let runs = runs(&env);
    assert_eq!(runs.len(), 30, "every job ran");
    let twice = runs.values().filter(|&&n| n > 1).count();
    assert!(
        twice <= stranded,
        "{twice} jobs ran twice, but only {stranded} were in flight at the kill"
    );
    assert_eq!(env.count("active") + env.count("new"), 0);
}

/// A handler that kills its daemon (as the OOM killer would take spoold, or a kernel bug would
/// end it) on the first three runs of the job `poison`; it records each run as "ID ATTEMPT"
/// first. The runs that kill are counted, not signalled by the test, so that no race with a
/// handler that has already started decides the outcome.
const POISON_HANDLER: &str = r#"printf '%s %s\n' "$SPOOLD_JOB_ID" "$SPOOLD_ATTEMPT" >> "$0.runs"
runs=$(grep -c "^$SPOOLD_JOB_ID " "$0.runs")
if [ "$(cat "$SPOOLD_JOB_PATH")" = poison ] && [ "$runs" -le 3 ]; then
  # The job `ok` beside this one finishes first, however loaded the machine, so that no death
  # catches it in flight (each would charge it a recovery too).
  for _ in $(seq 300); do [ -e "${SPOOLD_JOB_PATH%/active/*}/done/ok" ] && break; sleep 0.1; done
  parent=$(cat /proc/$PPID/comm)
  if [ "$parent" != spoold ]; then echo "the parent is $parent, not spoold" >&2; exit 3; fi
  kill -KILL "$PPID"
  sleep 2
fi
exit 0"#;

/// A spool for the poison-pill tests: `script` as the handler, 2 workers and
/// `spool.max_recoveries = 2`. Returns it and the file the script appends its runs to.
fn poison_env(name: &str, script: &str) -> (Env, String) {
    let env = Env::new(&["/bin/true"], "");
    let handler = env.script(name, script);
    fs::write(
        &env.config,
        format!(
            "[spool]\ndir = {:?}\nmax_recoveries = 2\n[workers]\ncount = 2\n\
             [handler]\ncommand = [{handler:?}]\n",
            env.spool.display().to_string()
        ),
    )
    .unwrap();
    (env, format!("{handler}.runs"))
}

/// The attempt of each run of job `id` that a poison-pill handler recorded in `runs_file`.
fn runs_of(runs_file: &str, id: &str) -> Vec<String> {
    fs::read_to_string(runs_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{id} ")).map(str::to_owned))
        .collect()
}

/// A poison pill: a job whose handler kills the daemon each time it runs. With
/// `spool.max_recoveries = 2` it runs twice, taking the daemon down twice (the test restarts
/// it, as systemd would); the second recovery moves it to failed/ with a reason that says
/// what happened instead of running it again; a job beside it is done; and `spoold retry`
/// puts it back with a fresh count (one more death is allowed again, then it is done).
#[test]
fn a_job_that_keeps_killing_the_daemon_is_failed_after_max_recoveries() {
    let (env, runs_file) = poison_env("poison.sh", POISON_HANDLER);
    let runs = |id: &str| runs_of(&runs_file, id);
    let mut d = env.start();
    env.submit("poison", "poison");
    env.submit("ok", "ok");

    let within = SOON * 3;
    let deaths = util::restarting(&env, &mut d, within, "the poison pill in failed/", || {
        env.names("failed").contains("poison")
    });
    assert_eq!(deaths, 2, "it took the daemon down twice");
    assert_eq!(
        runs("poison"),
        ["1", "1"],
        "it ran exactly max_recoveries times, each as attempt 1"
    );
    let failed: serde_json::Value =
        serde_json::from_slice(&env.cli(&["failed", "--json"]).stdout).unwrap();
    let record = &failed[0]["record"];
    assert_eq!(failed[0]["id"], "poison", "{failed}");
    let reason = record["last_failure"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("the daemon died 2 times while it ran")
            && reason.contains("crashes spoold")
            && reason.contains("spool.max_recoveries"),
        "{record}"
    );
    assert_eq!(record["permanent"], true, "{record}");
    assert!(
        d.log()
            .contains("job failed for good without running again")
            && d.log().contains("job_id=\"poison\""),
        "{}",
        d.log()
    );
    d.wait_until("the job beside it done", || {
        env.names("done").contains("ok") && env.count("new") + env.count("active") == 0
    });
    assert_eq!(runs("poison").len(), 2, "a failed job is not run again");

    // Retried: a fresh count, so after one more death (its third run) it runs again, as the
    // bound is 2, and its fourth run, which the handler lets live, is done.
    let out = env.cli(&["retry", "poison"]);
    assert!(out.status.success(), "retry: {}", util::describe(&out));
    let deaths = util::restarting(&env, &mut d, within, "the retried job done", || {
        env.names("done").contains("poison")
    });
    assert_eq!(deaths, 1, "the retried job took the daemon down once more");
    assert_eq!(runs("poison"), ["1", "1", "1", "1"]);
    assert_eq!(env.count("failed") + env.count("state"), 0);
    d.stop();
}

/// A poison pill that kills the daemon while another job runs beside it: both are in flight at
/// the first death, so both are charged a recovery. With `spool.max_recoveries = 2` one more
/// would fail either, so each then runs alone: the next death is charged to the pill only,
/// which goes to failed/, and the job beside it is done.
const COMPANY_HANDLER: &str = r#"printf '%s %s\n' "$SPOOLD_JOB_ID" "$SPOOLD_ATTEMPT" >> "$0.runs"
case "$(cat "$SPOOLD_JOB_PATH")" in
  slow) sleep 3 ;;
  poison)
    # The slow job in flight beside it, if it can be (it cannot while this one runs alone).
    spool=${SPOOLD_JOB_PATH%/active/*}
    for _ in $(seq 50); do [ -e "$spool/active/slow" ] && break; sleep 0.1; done
    parent=$(cat /proc/$PPID/comm)
    if [ "$parent" != spoold ]; then echo "the parent is $parent, not spoold" >&2; exit 3; fi
    kill -KILL "$PPID"
    sleep 2 ;;
esac
exit 0"#;

#[test]
fn a_job_that_was_in_flight_beside_a_poison_pill_is_not_failed_with_it() {
    let (env, runs_file) = poison_env("company.sh", COMPANY_HANDLER);
    let runs = |id: &str| runs_of(&runs_file, id).len();
    let mut d = env.start();
    env.submit("poison", "poison");
    env.submit("slow", "slow");
    let deaths = util::restarting(
        &env,
        &mut d,
        SOON * 3,
        "the pill failed, the other done",
        || env.names("failed").contains("poison") && env.names("done").contains("slow"),
    );
    assert_eq!(deaths, 2, "log:\n{}", d.log());
    assert_eq!(runs("poison"), 2, "log:\n{}", d.log());
    assert_eq!(
        runs("slow"),
        2,
        "once cut short by the first death, once to the end"
    );
    let failed: serde_json::Value =
        serde_json::from_slice(&env.cli(&["failed", "--json"]).stdout).unwrap();
    assert_eq!(failed.as_array().map(Vec::len), Some(1), "{failed}");
    assert_eq!(failed[0]["id"], "poison", "{failed}");
    d.stop();
}

#[test]
fn burst_past_the_inotify_queue_loses_nothing() {
    let env = Env::new(&["/bin/true"], "[workers]\ncount = 4\n");
    // No rescan would come within the test: what the overflow dropped is found because the
    // overflow itself is acted on.
    env.set_spool("rescan_interval = \"1d\"");
    let mut d = env.start();
    let n = 50_000;
    let tmp = env.path("tmp");
    for i in 0..n {
        fs::write(tmp.join(format!("b{i:05}")), "").unwrap();
    }
    // All at once, far past the 16,384 events the kernel queues, while the daemon is stopped
    // (SIGSTOP), so that it cannot read them as they come: the queue overflows for sure.
    let pid = rustix::process::Pid::from_raw(d.pid()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    for i in 0..n {
        let name = format!("b{i:05}");
        fs::rename(tmp.join(&name), env.path("new").join(&name)).unwrap();
    }
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    d.wait_until_within(SOON * 10, &format!("done/ to hold {}", n), || {
        env.count("done") == n
    });
    d.stop();
    let log = d.log();
    let mut started = BTreeMap::<&str, usize>::new();
    for line in log.lines().filter(|l| l.contains("job started")) {
        let id = line
            .split("job_id=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        *started.entry(id).or_default() += 1;
    }
    assert_eq!(started.len(), n, "every job started");
    assert!(started.values().all(|&c| c == 1), "a job ran twice");
    assert_eq!(env.count("new") + env.count("active"), 0);
    assert!(env.names("done").iter().all(|n| !n.contains(".dup-")));
    assert!(
        log.contains("inotify queue overflowed; rescanning new/"),
        "the queue did not overflow: the test proved nothing"
    );
}

#[test]
fn oldest_job_runs_first() {
    let env = recording_env("[workers]\ncount = 1\n");
    for (name, age_s) in [("young", 10), ("oldest", 300), ("middle", 100)] {
        env.submit(name, "x");
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        fs::File::options()
            .write(true)
            .open(env.path("new").join(name))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    let mut d = env.start();
    d.wait_until("done/ to hold 3", || env.count("done") == 3);
    d.stop();
    let order: Vec<String> = fs::read_to_string(env.runs_file())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(order, ["oldest", "middle", "young"]);
}

#[test]
fn attempt_count_survives_a_restart() {
    let env = Env::new(&["/bin/true"], "");
    let log = env.dir.path().join("attempts").display().to_string();
    let script = env.script(
        "twice.sh",
        &format!("echo $SPOOLD_ATTEMPT >> {log}\n[ \"$SPOOLD_ATTEMPT\" -ge 2 ]"),
    );
    env.write_config(
        &[&script],
        "[retry]\nbackoff_initial = \"3s\"\nbackoff_max = \"3s\"\n",
    );
    let mut d = env.start();
    env.submit("persistent", "x");
    d.wait_until("retry/ to hold 1", || env.count("retry") == 1);
    d.stop();
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(env.path("state").join("persistent")).unwrap()).unwrap();
    assert_eq!(record["attempts"], 1);
    assert!(record["next_attempt_unix_ms"].is_u64());
    let mut d = env.start();
    d.wait_until("done/ to hold 1", || env.count("done") == 1);
    d.stop();
    assert_eq!(fs::read_to_string(&log).unwrap(), "1\n2\n");
}

#[test]
fn placeholders_environment_and_stdin() {
    let env = Env::new(&["/bin/true"], "");
    let script = env.script(
        "show.sh",
        "echo \"argv: $1 $2 $3\"\necho \"env: $SPOOLD_JOB_ID $SPOOLD_ATTEMPT $SPOOLD_JOB_PATH $EXTRA\"\necho \"notify: ${NOTIFY_SOCKET:-unset}\"\necho \"stdin: $(cat)\"",
    );
    env.write_config(
        &[&script, "{id}", "{attempt}", "x{path}"],
        "stdin = \"job\"\nenv = { EXTRA = \"extra-value\" }\n",
    );
    let mut d = env.start();
    env.submit("hello", "the job body");
    d.wait_until("done/ to hold 1", || env.count("done") == 1);
    d.stop();
    let active = fs::canonicalize(env.path("active")).unwrap().join("hello");
    let log = d.log();
    assert!(
        log.contains(&format!("argv: hello 1 x{}", active.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("env: hello 1 {} extra-value", active.display())),
        "{log}"
    );
    assert!(
        log.contains("notify: unset"),
        "the handler must not inherit NOTIFY_SOCKET: {log}"
    );
    assert!(log.contains("stdin: the job body"), "{log}");
}

/// What a handler inherits besides its job: spoold's environment with `[handler] env` on top,
/// the job's own variables (which the config cannot spoof), a bare command name looked up in
/// the PATH that `[handler] env` sets, no blocked signal, SIGPIPE at its default (spoold, a
/// Rust program, ignores it, and an ignored signal would stay ignored across exec), and a
/// process group of its own.
#[test]
fn handler_environment_path_lookup_and_signal_state() {
    let env = Env::new(&["/bin/true"], "");
    let bin = env.dir.path().join("handler-bin");
    fs::create_dir(&bin).unwrap();
    let script = env.script(
        "job-handler",
        "echo \"vars: $INHERITED $OVERRIDDEN $SPOOLD_JOB_ID\"\n\
         echo \"sigign: $(sed -n 's/^SigIgn:[[:space:]]*//p' /proc/$$/status)\"\n\
         echo \"sigblk: $(sed -n 's/^SigBlk:[[:space:]]*//p' /proc/$$/status)\"\n\
         echo \"pid: $$ pgid: $(cut -d' ' -f5 /proc/$$/stat)\"",
    );
    fs::rename(&script, bin.join("job-handler")).unwrap();
    env.write_config(
        &["job-handler"],
        &format!(
            "[handler.env]\nPATH = \"{}:/usr/bin:/bin\"\nOVERRIDDEN = \"from-config\"\n\
             SPOOLD_JOB_ID = \"spoofed\"\n",
            bin.display()
        ),
    );
    let mut d = util::Daemon::start(
        &env.config,
        &[("INHERITED", "from-spoold"), ("OVERRIDDEN", "from-spoold")],
    );
    env.submit("hello", "x");
    assert!(
        d.wait_log(|l| l.contains("outcome=\"done\""), SOON),
        "{}",
        d.log()
    );
    d.stop();
    let log = d.log();
    assert!(log.contains("vars: from-spoold from-config hello"), "{log}");
    let field = |name: &str| {
        let at = log
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {log}"))
            + name.len();
        log[at..].split_whitespace().next().unwrap().to_owned()
    };
    let ignored = u64::from_str_radix(&field("sigign: "), 16).unwrap();
    assert_eq!(
        ignored & (1 << (13 - 1)),
        0,
        "SIGPIPE ignored in the handler: {log}"
    );
    assert_eq!(
        u64::from_str_radix(&field("sigblk: "), 16).unwrap(),
        0,
        "signals blocked in the handler: {log}"
    );
    assert_eq!(field("pid: "), field("pgid: "), "not a group leader: {log}");
}

#[test]
fn done_keep_false_deletes_finished_jobs() {
    let env = Env::new(&["/bin/true"], "[done]\nkeep = false\n");
    let mut d = env.start();
    env.submit("gone", "x");
    assert!(d.wait_log(|l| l.contains("outcome=\"done\""), SOON));
    d.stop();
    assert_eq!(
        env.count("done") + env.count("new") + env.count("active"),
        0
    );
}

#[test]
fn only_one_daemon_per_spool() {
    let env = Env::new(&["/bin/true"], "");
    let mut first = env.start();
    let mut second = util::Daemon::spawn(&env.config, &[]);
    let (status, _) = second.wait_exit(SOON);
    assert_eq!(status.code(), Some(75));
    let log = second.log();
    assert!(
        log.contains("already owned by another spoold")
            && log.contains(&format!("pid {}", first.pid())),
        "{log}"
    );
    first.stop();
}

#[test]
fn enqueue_status_failed_and_retry() {
    let env = Env::new(
        &["/bin/sh", "-c", "grep -q good \"$SPOOLD_JOB_PATH\""],
        "[retry]\nmax_attempts = 1\n",
    );
    fs::create_dir_all(env.path("new")).unwrap();
    // With no daemon running: enqueue needs the spool's directories, created by the daemon or
    // the package; create them by starting and stopping once.
    let mut d = env.start();
    d.stop();
    let files: Vec<_> = ["good one", "bad one", "good two"]
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let p = env.dir.path().join(format!("in{i}"));
            fs::write(&p, body).unwrap();
            p.display().to_string()
        })
        .collect();
    let out = env.cli(&["enqueue", &files[0], &files[1], &files[2]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(ids.len(), 3);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "IDs sort by submit time");
    assert_eq!(
        fs::read_to_string(env.path("new").join(&ids[1])).unwrap(),
        "bad one"
    );
    // A missing file is reported by name; the others still go in.
    let out = env.cli(&["enqueue", "/nonexistent/job"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/job"));

    // The oldest queued job's age is that of the oldest file in new/ (its mtime).
    let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    fs::File::options()
        .write(true)
        .open(env.path("new").join(&ids[2]))
        .unwrap()
        .set_modified(two_minutes_ago)
        .unwrap();
    let status: serde_json::Value =
        serde_json::from_slice(&env.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["queued"], 3);
    for key in ["active", "retry", "done", "failed"] {
        assert_eq!(status[key], 0, "{key}");
    }
    let age = status["oldest_queued_age_s"].as_f64().unwrap();
    assert!((120.0..300.0).contains(&age), "{status}");
    assert!(status["daemon_pid"].is_null(), "no daemon runs: {status}");

    let mut d = env.start();
    d.wait_until("done/ to hold 2 and failed/ to hold 1", || {
        env.count("done") == 2 && env.count("failed") == 1
    });
    let status: serde_json::Value =
        serde_json::from_slice(&env.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(
        (
            status["queued"].as_u64(),
            status["done"].as_u64(),
            status["failed"].as_u64()
        ),
        (Some(0), Some(2), Some(1))
    );
    assert!(status["oldest_queued_age_s"].is_null());
    assert_eq!(status["daemon_pid"], d.pid());
    let text = String::from_utf8(env.cli(&["status"]).stdout).unwrap();
    assert!(
        text.contains(&format!("daemon  running (pid {})", d.pid())),
        "{text}"
    );
    let text = String::from_utf8(env.cli(&["failed"]).stdout).unwrap();
    assert!(
        text.contains(&ids[1]) && text.contains("exit status 1"),
        "{text}"
    );

    // Retry by ID: fixed input, fresh attempt count, and the daemon picks it up.
    fs::write(env.path("failed").join(&ids[1]), "good now").unwrap();
    let out = env.cli(&["retry", &ids[1]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_until("done/ to hold 3", || env.count("done") == 3);
    assert_eq!(env.count("failed"), 0);
    assert_eq!(env.count("reasons"), 0);
    let out = env.cli(&["retry", "no-such-job"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-job"));
    // enqueue from stdin.
    let out = env.cli_with_stdin(&["enqueue", "-"], b"bad from stdin");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    d.wait_until("failed/ to hold 1", || env.count("failed") == 1);
    // retry --all brings it back; it fails again (the input is still bad) with attempts = 1.
    let out = env.cli(&["retry", "--all"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    d.wait_until("the job back in failed/ after one more attempt", || {
        serde_json::from_slice::<serde_json::Value>(&env.cli(&["failed", "--json"]).stdout)
            .is_ok_and(|f| f[0]["record"]["attempts"] == 1 && f[0]["id"] == id.as_str())
    });
    d.stop();
    assert!(Path::new(&env.spool).join("spoold.lock").exists());
}

#[test]
fn usage_and_man_synopses_show_option_values_repeated_arguments_and_exit_status_2() {
    // build.rs writes the man pages plain into OUT_DIR; those beside the binary are gzipped
    // for the package.
    let man = Path::new(env!("OUT_DIR")).join("man");
    for (page, synopsis) in [
        ("spoold-retry.8", "<ID>..."),
        ("spoold-retry.8", "\\-\\-all"),
        ("spoold-enqueue.8", "<FILE>..."),
        ("spoold-check-config.8", "<PATH>"),
        ("spoold-status.8", "[\\-c|\\-\\-config <PATH>]"),
    ] {
        let text = fs::read_to_string(man.join(page)).unwrap();
        let section = text
            .split(".SH SYNOPSIS")
            .nth(1)
            .and_then(|s| s.split(".SH").next())
            .unwrap_or_else(|| panic!("{page} has no SYNOPSIS:\n{text}"));
        assert!(
            section.contains("[\\-c|\\-\\-config <PATH>]") && section.contains(synopsis),
            "{page}: expected {synopsis:?} in the synopsis:\n{section}"
        );
    }
    let top = fs::read_to_string(man.join("spoold.8")).unwrap();
    assert!(top.contains(".B 2\nA usage error"), "{top}");

    // A usage error exits 2, and --help says so.
    let out = std::process::Command::new(util::BIN)
        .args(["enqueue"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = std::process::Command::new(util::BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("2 for a usage error"));
}
