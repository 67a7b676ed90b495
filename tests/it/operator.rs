//! The operator's commands on a running queue, as an operator runs them: `spoold pause` and
//! `resume` (state of the spool: they work with or without a daemon, and survive restarts), and
//! `spoold hold` and `release` (a waiting job is set aside, and comes back with its attempt
//! count kept).

use std::fs;
use std::time::Duration;

use crate::util::{Env, SOON, describe, wait_for};

/// How long a paused daemon is watched for a job it must not start. A paused daemon acts within
/// a second; three give a loaded machine room to show a bug.
const QUIET: Duration = Duration::from_secs(3);

/// A spool whose handler appends "ID ATTEMPT" to `runs`. A job whose body says `wait` runs
/// until the file `go` exists; one whose body says `flaky` fails its first attempt, and its
/// retry waits an hour.
fn operator_env() -> Env {
    let env = Env::new(&["/bin/true"], "");
    let dir = env.dir.path().display().to_string();
    let h = env.script(
        "handler.sh",
        &format!(
            "printf '%s %s\\n' \"$SPOOLD_JOB_ID\" \"$SPOOLD_ATTEMPT\" >> {dir}/runs\n\
             if grep -q wait \"$SPOOLD_JOB_PATH\"; then\n\
               while [ ! -e {dir}/go ]; do sleep 0.05; done\n\
             fi\n\
             if grep -q flaky \"$SPOOLD_JOB_PATH\" && [ \"$SPOOLD_ATTEMPT\" = 1 ]; then exit 1; fi\n\
             exit 0"
        ),
    );
    env.write_config(
        &[&h],
        "[workers]\ncount = 2\n[retry]\nbackoff_initial = \"1h\"\nmax_attempts = 3\n",
    );
    env
}

/// Each "ID ATTEMPT" line the handler wrote.
fn runs(env: &Env) -> Vec<String> {
    fs::read_to_string(env.dir.path().join("runs"))
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn ran(env: &Env, id: &str) -> bool {
    runs(env).iter().any(|l| l.split(' ').next() == Some(id))
}

fn status_json(env: &Env) -> serde_json::Value {
    let out = env.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits QUIET and says whether `id` started meanwhile.
fn starts_within_quiet(env: &Env, id: &str) -> bool {
    wait_for(QUIET, || ran(env, id).then_some(())).is_some()
}

#[test]
fn a_spool_paused_before_start_runs_nothing_until_resumed() {
    let env = operator_env();
    // No daemon has ever opened this spool: the pause sets it up, as enqueue does.
    let out = env.cli(&["pause", "--reason", "migrating the database"]);
    assert!(out.status.success(), "{}", describe(&out));
    env.submit("a", "1");
    env.submit("b", "2");

    let mut d = env.start();
    d.wait_note(|n| n.contains("STATUS=") && n.contains("paused"), SOON)
        .unwrap_or_else(|| panic!("no STATUS= saying paused: {:?}", d.notes()));
    assert!(!starts_within_quiet(&env, "a"), "a job ran while paused");
    assert_eq!(env.count("new"), 2);

    let s = status_json(&env);
    assert_eq!(s["paused"], true, "{s}");
    assert_eq!(s["paused_reason"], "migrating the database", "{s}");
    assert!(
        s["paused_since"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{s}"
    );
    assert_eq!(
        s["paused_by_uid"],
        rustix::process::geteuid().as_raw(),
        "{s}"
    );
    assert_eq!(s["queued"], 2, "{s}");
    let out = env.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("paused  yes") && text.contains("migrating the database"),
        "{text}"
    );

    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until_within(
        Duration::from_secs(10),
        "both jobs to run after the resume",
        || env.count("done") == 2,
    );
    assert!(
        d.wait_log(|l| l.contains("resumed by uid"), SOON),
        "{}",
        d.log()
    );
    assert_eq!(status_json(&env)["paused"], false);
    d.stop();
}

#[test]
fn a_pause_lets_the_job_in_flight_finish_starts_nothing_new_and_survives_a_restart() {
    let env = operator_env();
    let mut d = env.start();
    env.submit("slow", "wait");
    d.wait_until("the slow job to start", || ran(&env, "slow"));

    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    // The daemon logs who paused, with the uid the client recorded.
    let uid = rustix::process::geteuid().as_raw();
    assert!(
        d.wait_log(|l| l.contains(&format!("paused by uid {uid}")), SOON),
        "{}",
        d.log()
    );
    env.submit("next", "x");
    fs::write(env.dir.path().join("go"), "").unwrap();
    d.wait_until("the job in flight to finish", || env.count("done") == 1);
    assert!(
        !starts_within_quiet(&env, "next"),
        "a job started while paused"
    );
    assert_eq!(env.names("new"), ["next".to_owned()].into());

    // A SIGTERM while paused stops at once, cleanly.
    d.term();
    let (status, took) = d.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");

    // The pause is the spool's: the next daemon starts paused.
    let mut d = env.start();
    assert!(
        !starts_within_quiet(&env, "next"),
        "a restart undid the pause"
    );
    assert!(
        d.wait_log(|l| l.contains("the spool is paused"), SOON),
        "{}",
        d.log()
    );
    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until_within(
        Duration::from_secs(10),
        "the waiting job to run after the resume",
        || env.count("done") == 2,
    );
    d.stop();
}

#[test]
fn held_jobs_never_start_and_release_keeps_their_attempts() {
    let env = operator_env();
    let mut d = env.start();
    // A job waiting for its retry (an hour away), after one failed attempt.
    env.submit("flaky", "flaky");
    d.wait_until("the flaky job to wait for its retry", || {
        env.count("retry") == 1
    });
    // A queued job: the pause keeps it queued until it is held.
    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    env.submit("queued", "x");

    let out = env.cli(&["hold", "queued", "flaky"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        env.names("hold"),
        ["flaky".to_owned(), "queued".to_owned()].into()
    );
    assert_eq!(status_json(&env)["held"], 2);
    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("resumed by uid"));
    assert!(!starts_within_quiet(&env, "queued"), "a held job started");
    assert_eq!(env.count("hold"), 2);

    let out = env.cli(&["release", "--all"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the released queued job to run", || env.count("done") == 1);
    let runs = runs(&env);
    assert!(runs.contains(&"queued 1".to_owned()), "{runs:?}");
    // The flaky job goes back to wait out the rest of its backoff (schedule.rs tests when it
    // runs), with its failed attempt still counted.
    assert!(env.names("retry").contains("flaky"), "{runs:?}");
    let shown: serde_json::Value =
        serde_json::from_slice(&env.cli(&["show", "flaky", "--json"]).stdout).unwrap();
    assert_eq!(
        (shown["place"].as_str(), shown["attempts"].as_u64()),
        (Some("retry/"), Some(1)),
        "{shown}"
    );
    assert_eq!(status_json(&env)["held"], 0);
    d.stop();
}

/// As `postsuper -h -` does, an ID argument `-` reads the IDs from standard input, one per
/// line; an ID that names no job the command can act on says where that job is instead (a
/// running one: `spoold cancel` ends it), and postsuper's `ALL` gets the option it needs here.
#[test]
fn ids_come_from_stdin_and_a_job_not_found_says_where_it_is() {
    let env = operator_env();
    let mut d = env.start();
    env.submit("running", "wait");
    d.wait_until("the job to run", || ran(&env, "running"));
    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    for name in ["a", "b", "c"] {
        env.submit(name, "x");
    }

    let out = env.cli_with_stdin(&["hold", "-", "c"], b"a\n\nb\r\n");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        env.names("hold"),
        ["a".to_owned(), "b".to_owned(), "c".to_owned()].into(),
        "{}",
        describe(&out)
    );
    let out = env.cli_with_stdin(&["hold", "-"], b"");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no job IDs on standard input"),
        "{}",
        describe(&out)
    );

    let out = env.cli(&["hold", "running"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("it is running (in active/): `spoold cancel` ends it"),
        "{}",
        describe(&out)
    );
    let out = env.cli(&["release", "ALL"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(for every job: --all)"),
        "{}",
        describe(&out)
    );

    let out = env.cli_with_stdin(&["release", "-"], b"a\nb\nc\n");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(env.count("hold"), 0, "{}", describe(&out));
    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    fs::write(env.dir.path().join("go"), "").unwrap();
    d.wait_until("every job done", || env.count("done") == 4);
    let out = env.cli(&["cancel", "a"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("; it is in done/"),
        "{}",
        describe(&out)
    );
    d.stop();
}

/// A job cancelled while it waited for its retry: `show` says it was cancelled, as `failed`
/// does, not that it failed with a permanent exit code, and lists its one real attempt and no
/// attempt for the cancel, which was no run.
#[test]
fn show_tells_a_cancel_after_a_failed_attempt() {
    let env = operator_env();
    let mut d = env.start();
    env.submit("flaky", "flaky");
    d.wait_until("the job to wait for its retry", || env.count("retry") == 1);
    let out = env.cli(&["cancel", "flaky"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the cancelled job in failed/", || env.count("failed") == 1);

    let out = env.cli(&["show", "flaky"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("reason:   cancelled"), "{text}");
    assert!(text.contains("failed attempts: 1 (not retried)"), "{text}");
    assert!(!text.contains("permanent exit code"), "{text}");
    assert!(text.contains("attempt 1: started "), "{text}");
    assert!(!text.contains("attempt 0"), "{text}");
    let out = env.cli(&["show", "flaky", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reason"], "cancelled", "{v}");
    let out = env.cli(&["failed"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("attempts: 1 (not retried)"), "{text}");
    d.stop();
}

/// A record in `control/` may name a job in any escaped form (`\x72eport` for `report`, as a
/// member could write by hand): the journal names the job as every other line does, so that
/// `journalctl JOB_ID=report` finds the hold.
#[test]
fn an_operators_record_is_logged_under_the_jobs_own_name() {
    let env = operator_env();
    let mut d = env.start();
    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    env.submit("report", "x");
    fs::write(
        env.path("control").join("op-01ZZZZZZZZZZZZZZZZZZZZZZZZ"),
        r#"{"uid":4242,"action":"hold","asked":["\\x72eport"]}"#,
    )
    .unwrap();
    d.wait_until("the job held", || env.names("hold").contains("report"));
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("held by uid 4242"))
        .unwrap_or_else(|| panic!("no hold line: {log}"));
    assert!(line.contains("job_id=\"report\""), "{line}");
    d.stop();
}

/// A member of the spool's group holds a job whose name has a backslash in it, typed as
/// `spoold failed` shows it (`a\\nb`): the daemon, which carries out a member's request, holds
/// that job and not `a` newline `b`, the job that the backslash escape would otherwise name.
#[test]
fn a_member_holds_the_job_it_names_even_with_a_backslash_in_its_name() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let test = "operator::a_member_holds_the_job_it_names_even_with_a_backslash_in_its_name";
    if !crate::util::is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        return crate::util::skip(
            test,
            "needs root and setpriv to run as a member of the group",
        );
    }
    let env = operator_env();
    let mut d = env.start();
    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    let (backslash, newline) = ("a\\nb", "a\nb");
    env.submit(backslash, "x");
    env.submit(newline, "x");
    // The spool as the package gives it to its group (here nogroup, 65534).
    for (dir, mode) in [
        ("", 0o2750),
        ("new", 0o3770),
        ("hold", 0o2750),
        ("control", 0o2770),
    ] {
        let path = env.spool.join(dir);
        std::os::unix::fs::chown(&path, Some(0), Some(65534)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    for dir in [
        "tmp", "active", "retry", "done", "failed", "state", "reasons",
    ] {
        std::os::unix::fs::chown(env.spool.join(dir), Some(0), Some(65534)).unwrap();
    }
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&env.config, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(crate::util::BIN)
        .args(["hold", "a\\\\nb", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "hold as a member: {}", describe(&out));
    d.wait_until("the job named with a backslash held", || {
        env.names("hold").contains(backslash)
    });
    assert!(
        env.names("new").contains(newline),
        "the other job stays queued"
    );
    assert_eq!(env.count("hold"), 1);
    d.stop();
}

/// A reload while the spool is paused (the runner then drops each worker's wait for its next
/// job) loses no job: once resumed, the queued jobs start at once, not at the next rescan
/// (an hour here). Before, each waiting worker had taken a name from discovery and held it
/// through the pause, and the reload dropped it.
#[test]
fn a_reload_while_paused_leaves_the_queued_jobs_to_start_at_the_resume() {
    let env = operator_env();
    env.set_spool("rescan_interval = \"1h\"");
    let mut d = env.start();
    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    env.submit("first", "x");
    env.submit("second", "x");
    d.wait_until("both jobs counted as queued", || {
        status_json(&env)["queued"] == 2
    });
    d.signal(1);
    d.wait_until("the reload applied", || {
        d.log().contains("configuration reloaded")
    });
    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("both jobs done after the resume", || env.count("done") == 2);
    d.stop();
}

/// `spoold hold --all` holds the jobs waiting in `new/`, not a file a producer is still
/// writing there under a name that starts with a dot (its rename to its real name would then
/// find nothing, and the job would be lost).
#[test]
fn hold_all_leaves_a_file_a_producer_is_still_writing() {
    let env = operator_env();
    let mut d = env.start();
    let out = env.cli(&["pause"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    env.submit("queued", "x");
    fs::write(env.path("new").join(".being-written"), "half a jo").unwrap();
    let out = env.cli(&["hold", "--all"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(env.names("hold"), ["queued".to_owned()].into());
    assert!(env.path("new").join(".being-written").exists());
    // The producer finishes its job and renames it to its name.
    fs::rename(
        env.path("new").join(".being-written"),
        env.path("new").join("written"),
    )
    .unwrap();
    assert!(env.cli(&["resume"]).status.success());
    d.wait_until("the producer's job done", || {
        env.names("done").contains("written")
    });
    d.stop();
}

#[test]
fn hold_and_release_refuse_a_path() {
    let env = operator_env();
    let mut d = env.start();
    d.stop();
    env.submit("job", "x");
    for command in ["hold", "release"] {
        for arg in ["/etc/passwd", "../new/job", ".."] {
            let out = env.cli(&[command, arg]);
            let shown = describe(&out);
            assert_eq!(out.status.code(), Some(1), "{command} {arg}: {shown}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("not a job ID"),
                "{command} {arg}: {shown}"
            );
        }
    }
    assert_eq!(env.names("new"), ["job".to_owned()].into());
    assert_eq!(env.count("hold"), 0);
    // And an ID that names no waiting job says so.
    let out = env.cli(&["hold", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

/// A spool whose handler fails a job's first two attempts (exit 3, then killed by SIGKILL),
/// writing "oops N" to stderr each time, and succeeds on the third; a job whose body says
/// `fatal` exits 9, a permanent failure. Retries wait 100 ms.
fn show_env() -> Env {
    let env = Env::new(&["/bin/true"], "");
    let h = env.script(
        "handler.sh",
        "if grep -q fatal \"$SPOOLD_JOB_PATH\"; then echo 'not today' >&2; exit 9; fi\n\
         echo \"oops $SPOOLD_ATTEMPT\" >&2\n\
         case \"$SPOOLD_ATTEMPT\" in 1) exit 3 ;; 2) kill -9 $$ ;; esac\n\
         exit 9",
    );
    env.write_config(
        &[&h],
        "[retry]\nbackoff_initial = \"100ms\"\nbackoff_max = \"100ms\"\nmax_attempts = 5\n\
         permanent_exit_codes = [9]\n",
    );
    env
}

fn show(env: &Env, args: &[&str]) -> std::process::Output {
    let mut all = vec!["show"];
    all.extend_from_slice(args);
    env.cli(&all)
}

#[test]
fn show_tells_every_failed_attempt_not_only_the_last() {
    // Attempt 1 exits 3, attempt 2 is killed by SIGKILL, attempt 3 exits 9 (permanent): the
    // record of the failed job holds all three, each with its own stderr tail.
    let env = show_env();
    env.submit("flaky", "x");
    let mut d = env.start();
    d.wait_until("flaky in failed/", || env.count("failed") == 1);

    let out = show(&env, &["flaky", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], "flaky", "{v}");
    assert_eq!(v["place"], "failed/", "{v}");
    assert!(v["since"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    assert_eq!(v["attempts"], 3, "{v}");
    let history = v["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "every failure, not only the last: {v}");
    assert_eq!(history[0]["attempt"], 1, "{v}");
    assert_eq!(history[0]["exit_code"], 3, "{v}");
    assert_eq!(history[0]["stderr_tail"][0], "oops 1", "{v}");
    assert_eq!(history[1]["attempt"], 2, "{v}");
    assert_eq!(history[1]["signal"], 9, "{v}");
    assert_eq!(history[1]["stderr_tail"][0], "oops 2", "{v}");
    assert_eq!(history[2]["exit_code"], 9, "{v}");
    assert_eq!(v["journalctl"], "journalctl -u spoold JOB_ID=flaky", "{v}");

    let out = show(&env, &["flaky"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("place:    failed/ since "), "{text}");
    assert!(text.contains("failed attempts: 3"), "{text}");
    assert!(
        text.contains("attempt 1: ") && text.contains("exit 3"),
        "{text}"
    );
    assert!(
        text.contains("attempt 2: ") && text.contains("signal 9"),
        "{text}"
    );
    assert!(
        text.contains("stderr| oops 1") && text.contains("stderr| oops 2"),
        "{text}"
    );
    assert!(text.contains("journalctl -u spoold JOB_ID=flaky"), "{text}");
    d.stop();
}

#[test]
fn show_tells_why_a_job_failed_and_refuses_paths_and_unknown_ids() {
    let env = show_env();
    // A name with an escape sequence (ESC) and a newline in it, as a producer might write.
    let odd = "odd\u{1b}]0;pwned\u{7}\nname";
    env.submit("fatal", "fatal");
    env.submit(odd, "fatal");
    let mut d = env.start();
    d.wait_until("both in failed/", || env.count("failed") == 2);

    let out = show(&env, &["fatal"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("place:    failed/"), "{text}");
    assert!(text.contains("(permanent exit code)"), "{text}");
    assert!(
        text.contains("exit 9") && text.contains("stderr| not today"),
        "{text}"
    );

    // The odd name is given as `spoold failed` shows it, and shown escaped; --json is exact.
    let escaped = r"odd\u{1b}]0;pwned\u{7}\nname";
    let out = show(&env, &[escaped]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(&format!("{escaped}\n")), "{text:?}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    let out = show(&env, &[escaped, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], escaped, "{v}");
    assert_eq!(v["place"], "failed/", "{v}");

    // A path is refused, naming the ID to give instead.
    let path = env.path("failed/fatal").display().to_string();
    let out = show(&env, &[&path]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a job ID") && err.contains("the ID here is fatal"),
        "{err}"
    );

    // An ID no directory holds says so, with exit 1.
    let out = show(&env, &["01NOSUCHJOB"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("01NOSUCHJOB: no job of that ID"), "{err}");
    d.stop();
}
