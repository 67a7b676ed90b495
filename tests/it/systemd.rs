//! End-to-end tests of spoold under a real (throwaway) systemd, driven as a user drives it: systemctl start, status, reload and stop, and journalctl.
//!
//! Each test boots its own machine (tests/it/sysd), bind-mounts the built `spoold` binary into it,
//! installs a Type=notify unit and a config written here, and asserts what systemd and the
//! journal say, and where every job ended up in the spool. Where the harness cannot run (not
//! root, no CAP_SYS_ADMIN, no systemd) each test skips through `util::skip`: it prints
//! `SKIPPED: <test>: <reason>` and returns, or fails under `CI=true`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sysd::{self, Machine};

const BIN: &str = env!("CARGO_BIN_EXE_spoold");
const SPOOL: &str = "/var/spool/spoold";
const CONFIG: &str = "/etc/spoold/spoold.toml";
const EVENTS: &str = "/var/lib/spoold-test/events";
/// A generous bound for anything that should happen "soon" on a loaded, shared machine.
const SOON: Duration = Duration::from_secs(60);

/// The handler: its job file's first line says what to do (`sleep SECONDS`, or
/// `stubborn SECONDS` to also ignore SIGTERM, it and its child). It appends `start ID` and
/// `end ID` to EVENTS, so a test can tell which jobs ran, how often, and whether to the end.
const HANDLER: &str = r#"#!/bin/sh
set -eu
id=$2
echo "start $id" >>/var/lib/spoold-test/events
set -- $(head -n 1 "$1")
case "$1" in
  sleep) sleep "$2" ;;
  stubborn) trap '' TERM; sleep "$2" ;;
esac
echo "end $id" >>/var/lib/spoold-test/events
"#;

/// A config for the guest's spool; `extra` continues the file (more tables).
fn config(workers: usize, drain: &str, kill_grace: &str) -> String {
    format!(
        r#"[spool]
dir = "{SPOOL}"

[workers]
count = {workers}

[handler]
command = ["/usr/local/lib/spoold-test/handler.sh", "{{path}}", "{{id}}"]
kill_grace = "{kill_grace}"

[shutdown]
drain_timeout = "{drain}"

[log]
level = "info"
"#
    )
}

/// Where the unit's ExecStopPost= appends systemd's verdict on each stop.
const STOP_RESULT: &str = "/run/spoold-test/stop-result";
/// An ExecStopPost= line that records `$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS` in
/// STOP_RESULT: systemd's own view of how the main process ended, which `systemctl show`
/// cannot give after a clean stop (see `stop`).
const RECORD_STOP: &str = "ExecStopPost=/bin/sh -c 'mkdir -p /run/spoold-test && \
                           echo \"$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS\" >>/run/spoold-test/stop-result'";

/// The unit under test, as issue 3 describes it, plus RECORD_STOP; `extra` adds [Service]
/// lines.
fn unit(extra: &str) -> String {
    format!(
        "[Unit]\n\
         Description=spoold under test\n\
         \n\
         [Service]\n\
         Type=notify\n\
         ExecStart=/usr/local/bin/spoold run --config {CONFIG}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         KillMode=mixed\n\
         {RECORD_STOP}\n\
         {extra}\n"
    )
}

/// Boots a machine with spoold, its handler, `config` and a unit with `unit_extra`, loaded but
/// not started.
fn machine(config: &str, unit_extra: &str) -> Machine {
    let m = Machine::boot(&[(Path::new(BIN), "/usr/local/bin/spoold")]);
    m.write_exec("/usr/local/lib/spoold-test/handler.sh", HANDLER);
    m.write(CONFIG, config);
    m.write("/etc/systemd/system/spoold.service", &unit(unit_extra));
    m.sh_ok(&format!(
        "mkdir -p /var/lib/spoold-test {SPOOL}/tmp {SPOOL}/new && : >{EVENTS} && systemctl daemon-reload"
    ));
    m
}

/// Submits jobs the Maildir way (write in tmp/, rename into new/), each `job-N` for N in
/// `range`, with `body` as its first line.
fn submit(m: &Machine, range: std::ops::RangeInclusive<u32>, body: &str) {
    m.sh_ok(&format!(
        "cd {SPOOL} && for i in $(seq {} {}); do echo '{body}' >tmp/job-$i && mv tmp/job-$i new/job-$i; done",
        range.start(),
        range.end()
    ));
}

/// The job names in a spool subdirectory.
fn names(m: &Machine, sub: &str) -> Vec<String> {
    let out = m.sh_ok(&format!("ls -1 {SPOOL}/{sub} 2>/dev/null || true"));
    out.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('.'))
        .map(str::to_owned)
        .collect()
}

/// How often each job started and ended, from the handler's EVENTS file.
fn events(m: &Machine) -> (BTreeMap<String, u32>, BTreeMap<String, u32>) {
    let (mut starts, mut ends) = (BTreeMap::new(), BTreeMap::new());
    for line in m.read(EVENTS).lines() {
        match line.split_once(' ') {
            Some(("start", id)) => *starts.entry(id.to_owned()).or_default() += 1,
            Some(("end", id)) => *ends.entry(id.to_owned()).or_default() += 1,
            _ => panic!("odd line in {EVENTS}: {line:?}"),
        }
    }
    (starts, ends)
}

/// One property of the unit, as `systemctl show -p NAME --value` prints it.
fn prop(m: &Machine, name: &str) -> String {
    m.sh_ok(&format!("systemctl show -p {name} --value spoold"))
        .trim()
        .to_owned()
}

/// Polls the guest until `cond` (a shell condition) holds, or panics with `what` after
/// `within`. The loop runs inside the guest, so a poll costs no nsenter.
fn wait_until(m: &Machine, what: &str, cond: &str, within: Duration) {
    wait_until_unless(m, what, cond, "false", within);
}

/// [`wait_until`], but fails at once when `give_up` (a shell condition) holds first.
fn wait_until_unless(m: &Machine, what: &str, cond: &str, give_up: &str, within: Duration) {
    let script = format!(
        "end=$(($(date +%s) + {})); until {cond}; do \
           ! {give_up} || exit 2; [ $(date +%s) -lt $end ] || exit 1; sleep 0.05; done",
        within.as_secs()
    );
    let out = m.sh(&script);
    let why = match out.status.code() {
        Some(2) => format!("gave up (`{give_up}`) before"),
        _ => format!("waited {within:?} for"),
    };
    assert!(
        out.status.success(),
        "{why} {what} (`{cond}`); status {}; unit:\n{}",
        out.status,
        status_and_journal(m)
    );
}

/// `systemctl status` and the unit's journal, for failure messages.
fn status_and_journal(m: &Machine) -> String {
    let out =
        m.sh("systemctl status --no-pager -l spoold; journalctl -u spoold --no-pager | tail -n 60");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The journal entries of the unit, as JSON objects (journalctl -o json), filtered by
/// `matches` (journalctl match arguments such as `JOB_ID=job-1`).
fn journal(m: &Machine, matches: &str) -> Vec<serde_json::Value> {
    let out = m.sh_ok(&format!(
        "journalctl --sync 2>/dev/null; journalctl -u spoold -o json --no-pager {matches}"
    ));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn field<'a>(entry: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    entry.get(name).and_then(|v| v.as_str())
}

/// How the invocation `invocation` of the unit ended, as systemd (PID 1) logged it: one
/// closing message per invocation, "Deactivated successfully" (MESSAGE_ID
/// 7ad2d189f7e94e70a38c781354912448: `success`) or "Failed with result '...'"
/// (d9b373ed55a64feb8242e02dbe79a49c, whose UNIT_RESULT is returned).
fn stop_result(m: &Machine, invocation: &str) -> String {
    let success = "7ad2d189f7e94e70a38c781354912448";
    let failure = "d9b373ed55a64feb8242e02dbe79a49c";
    let mut found = None;
    let ok = sysd_wait(SOON, || {
        let entries = journal(m, &format!("INVOCATION_ID={invocation}"));
        found = entries.iter().find_map(|e| match field(e, "MESSAGE_ID") {
            Some(id) if id == success => Some("success".to_owned()),
            Some(id) if id == failure => Some(
                field(e, "UNIT_RESULT")
                    .unwrap_or("(no UNIT_RESULT)")
                    .to_owned(),
            ),
            _ => None,
        });
        found.is_some()
    });
    assert!(
        ok,
        "no closing message for invocation {invocation} in the journal:\n{}",
        status_and_journal(m)
    );
    found.unwrap()
}

fn sysd_wait(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let began = Instant::now();
    while !f() {
        if began.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Stops the unit and asserts that the stop was clean in every way systemd can tell, and
/// that spoold logged its stop summary; returns how long `systemctl stop` took.
///
/// On systemd 252 `systemctl show -p Result` alone cannot tell: `systemctl stop` exits 0
/// even when the stop timed out and ended in SIGKILL, and after a clean stop the unit is
/// inactive, garbage-collected at once and, loaded again for `systemctl show`, reports the
/// defaults (Result=success, an empty InvocationID, ExecMainStatus=0) whatever happened. Only
/// a failed unit keeps its Result. So the verdict is read from what systemd recorded at the
/// time: ExecStopPost='s $SERVICE_RESULT, $EXIT_CODE and $EXIT_STATUS, and PID 1's closing
/// journal message for the invocation; `Result` and `ActiveState` are checked as well.
fn stop(m: &Machine) -> Duration {
    stop_watching(m, &[])
}

/// A shell condition: the unit's stop is over (or it never ran).
const STOPPED: &str = "systemctl show -p ActiveState --value spoold | grep -qx 'inactive\\|failed'";

/// [`stop`], and while the stop runs, waits until each of `during` (what, a shell condition)
/// holds in turn: the stop is then requested with `systemctl stop --no-block` and its end
/// awaited by polling ActiveState.
fn stop_watching(m: &Machine, during: &[(&str, &str)]) -> Duration {
    let invocation = prop(m, "InvocationID");
    assert!(!invocation.is_empty(), "the unit has no invocation ID");
    let stops_before = m.read(STOP_RESULT).lines().count();
    let began = Instant::now();
    let out = match during {
        [] => m.sh("systemctl stop spoold"),
        during => {
            let out = m.sh("systemctl stop --no-block spoold");
            for (what, cond) in during {
                wait_until_unless(m, what, cond, STOPPED, SOON);
            }
            wait_until(m, "the stop to end", STOPPED, SOON);
            out
        }
    };
    let took = began.elapsed();
    assert!(
        out.status.success(),
        "systemctl stop failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        status_and_journal(m)
    );
    let shown = m.sh_ok("systemctl show -p ActiveState,Result spoold");
    assert!(
        shown.contains("ActiveState=inactive\n") && shown.contains("Result=success\n"),
        "after the stop, systemctl show says:\n{shown}\n{}",
        status_and_journal(m)
    );
    let recorded = m.read(STOP_RESULT);
    assert_eq!(
        recorded.lines().nth(stops_before),
        Some("success exited 0"),
        "ExecStopPost's $SERVICE_RESULT $EXIT_CODE $EXIT_STATUS (all stops: {recorded:?}); \
         the stop took {took:?}\n{}",
        status_and_journal(m)
    );
    assert_eq!(
        stop_result(m, &invocation),
        "success",
        "systemd's closing message for the invocation"
    );
    let summary = journal(m, &format!("_SYSTEMD_INVOCATION_ID={invocation}"))
        .into_iter()
        .any(|e| field(&e, "MESSAGE").is_some_and(|msg| msg.starts_with("spoold stopped")));
    assert!(summary, "spoold logged no 'spoold stopped' summary");
    let killed = kill_messages(m);
    assert!(killed.is_empty(), "systemd had to kill: {killed:?}");
    took
}

/// Journal lines in which systemd reports having to kill or time out the unit.
fn kill_messages(m: &Machine) -> Vec<String> {
    journal(m, "_PID=1")
        .iter()
        .filter_map(|e| field(e, "MESSAGE"))
        .filter(|msg| {
            msg.contains("timed out") || msg.contains("Killing process") || msg.contains("SIGKILL")
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn start_returns_after_ready_and_status_shows_the_status_line() {
    if sysd::skipped("start_returns_after_ready_and_status_shows_the_status_line") {
        return;
    }
    let m = machine(&config(2, "10s", "2s"), "TimeoutStartSec=60");
    submit(&m, 1..=3, "sleep 0");
    m.sh_ok("systemctl start spoold");
    // Type=notify: `systemctl start` returns only once READY=1 arrived, and the unit is
    // "activating" until then. READY=1 and the first STATUS= travel in one datagram.
    let shown = m.sh_ok("systemctl show -p ActiveState,SubState,StatusText,MainPID spoold");
    assert!(
        shown.contains("ActiveState=active\n") && shown.contains("SubState=running\n"),
        "right after `systemctl start` returned:\n{shown}"
    );
    let status_text = shown
        .lines()
        .find_map(|l| l.strip_prefix("StatusText="))
        .unwrap_or_default();
    assert!(
        status_text.contains(" busy, ") && status_text.contains(" queued, "),
        "STATUS= was not in with READY=1: StatusText={status_text:?}"
    );
    // The status line stays current: once the three jobs are done, it says so (the exact
    // line is awaited: a refresh may catch a worker between counting its job done and
    // becoming idle, and the next one, 0.5 s later, corrects it).
    wait_until(
        &m,
        "the status line to count 3 done jobs and nothing else",
        "systemctl show -p StatusText --value spoold | grep -qx '0/2 busy, 0 queued, 3 done, 0 failed'",
        SOON,
    );
    let status = m.sh_ok("systemctl status --no-pager spoold");
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with("Status:"))
        .unwrap_or_else(|| panic!("no Status: line in systemctl status:\n{status}"));
    assert!(
        line.contains("\"0/2 busy, 0 queued, 3 done, 0 failed\""),
        "systemctl status shows {line:?}"
    );
    let took = stop(&m);
    assert!(took < Duration::from_secs(5), "an idle stop took {took:?}");
}

#[test]
fn reload_changes_workers_count_without_losing_work() {
    if sysd::skipped("reload_changes_workers_count_without_losing_work") {
        return;
    }
    let m = machine(&config(1, "30s", "2s"), "");
    m.sh_ok("systemctl start spoold");
    let main_pid = prop(&m, "MainPID");
    submit(&m, 1..=12, "sleep 1");
    wait_until(
        &m,
        "one job to be running",
        &format!("[ $(ls {SPOOL}/active | wc -l) -eq 1 ]"),
        SOON,
    );
    wait_until(
        &m,
        "the status line to show one busy worker of one",
        "systemctl show -p StatusText --value spoold | grep -q '^1/1 busy'",
        SOON,
    );
    m.write(CONFIG, &config(3, "30s", "2s"));
    m.sh_ok("systemctl reload spoold");
    // The pool grows at once: three jobs run side by side while the one that was running
    // during the reload goes on.
    wait_until(
        &m,
        "three workers busy after the reload",
        &format!(
            "[ $(ls {SPOOL}/active | wc -l) -eq 3 ] && systemctl show -p StatusText --value spoold | grep -q '^3/3 busy'"
        ),
        SOON,
    );
    // An invalid config is refused: spoold keeps running on the previous one and says so in
    // its status line; nothing restarts and the jobs go on.
    m.write(CONFIG, "[workers]\ncount = 0\n");
    m.sh_ok("systemctl reload spoold");
    wait_until(
        &m,
        "the status line to report the failed reload",
        "systemctl show -p StatusText --value spoold | grep -q 'reload failed, running on the previous config'",
        SOON,
    );
    assert_eq!(prop(&m, "ActiveState"), "active");
    wait_until(
        &m,
        "all 12 jobs done",
        &format!("[ $(ls {SPOOL}/done | wc -l) -eq 12 ]"),
        SOON,
    );
    assert_eq!(
        prop(&m, "MainPID"),
        main_pid,
        "a reload must not restart spoold"
    );
    assert_eq!(prop(&m, "NRestarts"), "0");
    let (starts, ends) = events(&m);
    assert_eq!(starts.len(), 12, "jobs started: {starts:?}");
    assert!(
        starts.values().chain(ends.values()).all(|&n| n == 1) && ends.len() == 12,
        "every job runs once, to the end, across the reload: starts {starts:?}, ends {ends:?}"
    );
    assert!(names(&m, "new").is_empty() && names(&m, "active").is_empty());
    let reloaded = journal(&m, "").into_iter().any(|e| {
        field(&e, "MESSAGE").is_some_and(|msg| msg.starts_with("configuration reloaded"))
            && field(&e, "WORKERS") == Some("3")
    });
    assert!(
        reloaded,
        "no 'configuration reloaded' record with WORKERS=3"
    );
    stop(&m);
}

#[test]
fn stop_under_load_drains_and_loses_no_job() {
    if sysd::skipped("stop_under_load_drains_and_loses_no_job") {
        return;
    }
    // WatchdogSec: spoold must keep pinging through the load and the stops.
    let m = machine(&config(2, "30s", "2s"), "TimeoutStopSec=60\nWatchdogSec=1");
    m.sh_ok("systemctl start spoold");
    submit(&m, 1..=20, "sleep 0.5");
    wait_until(
        &m,
        "a few jobs done and two running",
        &format!("[ $(ls {SPOOL}/done | wc -l) -ge 3 ] && [ $(ls {SPOOL}/active | wc -l) -eq 2 ]"),
        SOON,
    );
    // systemd handed spoold a watchdog. The second run below lasts at least three of its
    // intervals (job-21 sleeps 3 s), so a missed WATCHDOG=1 would end the unit with
    // Result=watchdog, which the final `stop` would report.
    assert_eq!(prop(&m, "WatchdogUSec"), "1s");
    let took = stop(&m);
    // The jobs in flight were drained: each that started also ended, exactly once; the ones
    // not yet claimed wait in new/, untouched; none is anywhere else.
    let (starts, ends) = events(&m);
    assert_eq!(starts, ends, "a job in flight did not finish: {took:?}");
    let done = names(&m, "done");
    let new = names(&m, "new");
    assert!(names(&m, "active").is_empty(), "active/ is not empty");
    assert_eq!(
        done.len(),
        starts.len(),
        "done/ {done:?}, started {starts:?}"
    );
    assert_eq!(done.len() + new.len(), 20, "done/ {done:?}, new/ {new:?}");
    assert!(!new.is_empty(), "the stop came too late to test anything");
    // The next start finishes the rest, and no job ran twice.
    m.sh_ok("systemctl start spoold");
    submit(&m, 21..=21, "sleep 3");
    wait_until(
        &m,
        "all 21 jobs done after a restart",
        &format!("[ $(ls {SPOOL}/done | wc -l) -eq 21 ]"),
        SOON,
    );
    let (starts, ends) = events(&m);
    assert!(
        starts.len() == 21 && starts.values().all(|&n| n == 1) && starts == ends,
        "every job exactly once: starts {starts:?}, ends {ends:?}"
    );
    stop(&m);
}

#[test]
fn stop_past_the_drain_deadline_within_a_short_timeout_stop_sec() {
    if sysd::skipped("stop_past_the_drain_deadline_within_a_short_timeout_stop_sec") {
        return;
    }
    // TimeoutStopSec=2 is shorter than drain_timeout + kill_grace (3 s + 2 s): only the
    // EXTEND_TIMEOUT_USEC= messages keep systemd from timing the stop out and sending SIGKILL.
    let m = machine(&config(2, "3s", "2s"), "TimeoutStopSec=2");
    m.sh_ok("systemctl start spoold");
    submit(&m, 1..=1, "sleep 300");
    submit(&m, 2..=2, "stubborn 300");
    submit(&m, 3..=4, "sleep 0");
    wait_until(
        &m,
        "both long jobs running",
        &format!("[ -e {SPOOL}/active/job-1 ] && [ -e {SPOOL}/active/job-2 ]"),
        SOON,
    );
    // While it drains, the status line counts the jobs and the time left; then it says it
    // aborts them (the count is taken as the abort begins, when the plain `sleep` may already
    // have died of its SIGTERM, so it may say 1).
    let took = stop_watching(
        &m,
        &[
            (
                "the status line to show the drain",
                "systemctl show -p StatusText --value spoold | grep -q '^stopping: draining 2 jobs, [0-3]s left$'",
            ),
            (
                "the status line to show the abort",
                "systemctl show -p StatusText --value spoold | grep -q '^stopping: aborting \\(1 job\\|2 jobs\\)$'",
            ),
        ],
    );
    // The stop waited for the drain deadline and the stubborn job's kill_grace, well past
    // TimeoutStopSec, and no more than that (plus a loaded machine's slack).
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(30),
        "the stop took {took:?}"
    );
    // The aborted jobs went back to new/, nothing is left running in the unit's cgroup.
    // The two jobs never claimed are there too, untouched.
    assert_eq!(
        names(&m, "new"),
        ["job-1", "job-2", "job-3", "job-4"],
        "aborted jobs are not back in new/"
    );
    assert!(names(&m, "active").is_empty(), "active/ is not empty");
    assert!(
        names(&m, "failed").is_empty(),
        "an aborted attempt counted as a failure"
    );
    let (_, ends) = events(&m);
    assert!(!ends.contains_key("job-1") && !ends.contains_key("job-2"));
    assert_eq!(
        m.sh_ok("ps -eo args= | grep -c '[s]leep 300' || true")
            .trim(),
        "0",
        "a handler outlived the stop"
    );
}

#[test]
fn journal_has_structured_job_fields() {
    if sysd::skipped("journal_has_structured_job_fields") {
        return;
    }
    let m = machine(&config(1, "10s", "2s"), "");
    m.sh_ok("systemctl start spoold");
    submit(&m, 1..=1, "sleep 0");
    wait_until(
        &m,
        "job-1 done",
        &format!("[ -e {SPOOL}/done/job-1 ]"),
        SOON,
    );
    let mut entries = Vec::new();
    let found = sysd_wait(SOON, || {
        entries = journal(&m, "JOB_ID=job-1");
        entries.iter().any(|e| field(e, "OUTCOME").is_some())
    });
    assert!(
        found,
        "`journalctl -u spoold JOB_ID=job-1` has no record with OUTCOME: {entries:#?}\n{}",
        status_and_journal(&m)
    );
    let started = entries
        .iter()
        .find(|e| field(e, "MESSAGE") == Some("job started"))
        .unwrap_or_else(|| panic!("no 'job started' record: {entries:#?}"));
    assert_eq!(field(started, "ATTEMPT"), Some("1"));
    assert_eq!(field(started, "PRIORITY"), Some("6"), "INFO is priority 6");
    let done = entries
        .iter()
        .find(|e| field(e, "OUTCOME").is_some())
        .unwrap();
    assert_eq!(field(done, "OUTCOME"), Some("done"), "{done:#}");
    assert_eq!(field(done, "ATTEMPT"), Some("1"), "{done:#}");
    assert_eq!(field(done, "EXIT_STATUS"), Some("0"), "{done:#}");
    assert!(
        field(done, "DURATION_MS").is_some_and(|d| d.parse::<u64>().is_ok()),
        "{done:#}"
    );
    assert_eq!(field(done, "PRIORITY"), Some("6"), "{done:#}");
    assert!(
        entries
            .iter()
            .all(|e| e.as_object().unwrap().keys().all(|k| !k.starts_with("F_"))),
        "fields keep tracing-journald's F_ prefix: {entries:#?}"
    );
    // The stop leaves one summary record.
    stop(&m);
    let summary = journal(&m, "")
        .into_iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|msg| msg.starts_with("spoold stopped")));
    let summary = summary.expect("no 'spoold stopped' summary in the journal");
    assert!(
        field(&summary, "DRAINED").is_some() && field(&summary, "REQUEUED").is_some(),
        "{summary:#}"
    );
}

/// The oracle must be able to fail: a unit that ignores SIGTERM past a 1 s TimeoutStopSec is
/// killed by systemd, and `stop_result` and `kill_messages` say so.
#[test]
fn harness_sees_a_stop_that_times_out() {
    if sysd::skipped("harness_sees_a_stop_that_times_out") {
        return;
    }
    let m = Machine::boot(&[]);
    m.write(
        "/etc/systemd/system/spoold.service",
        &format!(
            "[Service]\nExecStart=/bin/sh -c \"trap '' TERM; while :; do sleep 1; done\"\n\
             KillMode=mixed\nTimeoutStopSec=1\n{RECORD_STOP}\n"
        ),
    );
    m.sh_ok("systemctl daemon-reload && systemctl start spoold");
    let invocation = prop(&m, "InvocationID");
    let out = m.sh("systemctl stop spoold");
    eprintln!("systemctl stop of a stubborn unit: {}", out.status);
    assert_eq!(stop_result(&m, &invocation), "timeout");
    assert!(
        !kill_messages(&m).is_empty(),
        "no kill message in the journal"
    );
    assert_eq!(m.read(STOP_RESULT).trim(), "timeout killed KILL");
    let shown = m.sh_ok("systemctl show -p ActiveState,Result spoold");
    assert!(
        shown.contains("ActiveState=failed") && shown.contains("Result=timeout"),
        "{shown}"
    );
}

/// Issue 6's soak under systemd: 50 `systemctl restart` cycles while jobs keep arriving,
/// some of them longer than the drain deadline. Every stop must end as systemd's success, and
/// afterwards every job submitted must have run to its end exactly once and be in done/.
/// `SPOOLD_SYSTEMD_RESTARTS` sets the number of cycles (default 50).
#[test]
fn fifty_restarts_under_load_lose_nothing() {
    if sysd::skipped("fifty_restarts_under_load_lose_nothing") {
        return;
    }
    let cycles: usize = std::env::var("SPOOLD_SYSTEMD_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // A short drain and grace, so that the jobs that sleep 1 s outlast the drain and are
    // aborted and requeued by some of the stops; StartLimitIntervalSec=0 (a [Unit] setting,
    // hence the drop-in) because 50 restarts in a minute is the point here, not a crash loop.
    let m = machine(&config(3, "300ms", "300ms"), "TimeoutStopSec=30");
    m.write(
        "/etc/systemd/system/spoold.service.d/soak.conf",
        "[Unit]\nStartLimitIntervalSec=0\n",
    );
    m.sh_ok("systemctl daemon-reload && systemctl start spoold");
    // The submitter runs inside the machine, so the load does not pause while the test
    // talks to systemd. One job in twenty is long.
    m.write_exec(
        "/usr/local/lib/spoold-test/submit.sh",
        &format!(
            "#!/bin/sh\ncd {SPOOL}\ni=0\nwhile [ -e /run/spoold-test/submit ]; do\n  \
             i=$((i+1))\n  if [ $((i % 20)) -eq 0 ]; then b='sleep 1'; else b='sleep 0.02'; fi\n  \
             echo \"$b\" >tmp/load-$i && mv tmp/load-$i new/load-$i\n  echo $i >/run/spoold-test/submitted\n  \
             sleep 0.03\ndone\n"
        ),
    );
    m.sh_ok(
        "mkdir -p /run/spoold-test && touch /run/spoold-test/submit && \
         systemd-run --unit=submitter --quiet /usr/local/lib/spoold-test/submit.sh",
    );
    let stops_before = m.read(STOP_RESULT).lines().count();
    for cycle in 0..cycles {
        // Restart at a moment that varies with the cycle, never in lockstep with the load.
        std::thread::sleep(Duration::from_millis(37 * (cycle as u64 % 9)));
        let out = m.sh("systemctl restart spoold");
        assert!(
            out.status.success(),
            "restart {cycle} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            status_and_journal(&m)
        );
    }
    m.sh_ok("rm /run/spoold-test/submit");
    wait_until(
        &m,
        "the submitter to end",
        "! systemctl is-active --quiet submitter",
        SOON,
    );
    let submitted: usize = m.read("/run/spoold-test/submitted").trim().parse().unwrap();
    wait_until(
        &m,
        "every submitted job done",
        &format!("[ $(ls {SPOOL}/done | wc -l) -eq {submitted} ]"),
        SOON * 3,
    );
    stop(&m);

    let results = m.read(STOP_RESULT);
    let stops: Vec<&str> = results.lines().skip(stops_before).collect();
    assert_eq!(stops.len(), cycles + 1, "one ExecStopPost record per stop");
    assert!(
        stops.iter().all(|r| *r == "success exited 0"),
        "every stop a success: {stops:?}"
    );
    assert!(kill_messages(&m).is_empty(), "{:?}", kill_messages(&m));
    let (starts, ends) = events(&m);
    let expected: Vec<String> = (1..=submitted).map(|i| format!("load-{i}")).collect();
    let mut done = names(&m, "done");
    done.sort_by_key(|n| n.trim_start_matches("load-").parse::<usize>().unwrap_or(0));
    assert_eq!(
        done, expected,
        "done/ holds each job once, under its own name"
    );
    assert!(
        expected.iter().all(|id| ends.get(id) == Some(&1)),
        "every job ran to its end exactly once"
    );
    let requeued = starts.values().filter(|&&n| n > 1).count();
    for dir in ["new", "active", "retry", "failed"] {
        assert!(names(&m, dir).is_empty(), "{dir}/ is not empty");
    }
    eprintln!(
        "{cycles} restarts under load: {submitted} jobs, all done once; {requeued} were \
         aborted by a stop and ran again"
    );
    assert!(
        requeued > 0,
        "no stop met a long job: the soak tested no abort"
    );
}
