//! Time and limits as an operator sees them: delayed jobs (`spoold enqueue --in`/`--at`),
//! expiry (`--ttl`, `retry.max_age`), backpressure (`spool.max_queued`) and the purge of
//! finished jobs (`spoold purge`, `done.max_age`).

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::{BIN, Env, SOON, describe, failed_reasons, spool_listing, wait_for};

/// A spool whose handler appends "ID ATTEMPT MS" (the start, in ms since the epoch) to `runs`;
/// a job whose body says `fail` exits 1 and waits an hour for its retry. `extra` goes after
/// the handler's table.
fn timed_env(extra: &str) -> Env {
    let env = Env::new(&["/bin/true"], "");
    let dir = env.dir.path().display().to_string();
    let h = env.script(
        "handler.sh",
        &format!(
            "printf '%s %s %s\\n' \"$SPOOLD_JOB_ID\" \"$SPOOLD_ATTEMPT\" \"$(date +%s%3N)\" >> {dir}/runs\n\
             if grep -q fail \"$SPOOLD_JOB_PATH\"; then exit 1; fi\n\
             exit 0"
        ),
    );
    env.write_config(
        &[&h],
        &format!(
            "[workers]\ncount = 2\n[retry]\nbackoff_initial = \"1h\"\nmax_attempts = 3\n{extra}"
        ),
    );
    env
}

/// Each run of job `id`: (attempt, start in ms since the epoch).
fn runs_of(env: &Env, id: &str) -> Vec<(u32, u64)> {
    fs::read_to_string(env.dir.path().join("runs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            if f.next()? != id {
                return None;
            }
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Submits `body` from stdin with `flags`; returns the job ID it printed.
fn enqueue(env: &Env, flags: &[&str], body: &str) -> String {
    let out = enqueue_raw(env, flags, body);
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn enqueue_raw(env: &Env, flags: &[&str], body: &str) -> std::process::Output {
    let mut args = vec!["enqueue"];
    args.extend_from_slice(flags);
    args.push("-");
    env.cli_with_stdin(&args, body.as_bytes())
}

fn status_json(env: &Env) -> serde_json::Value {
    let out = env.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn reason_of(env: &Env, id: &str) -> Option<String> {
    failed_reasons(env)
        .into_iter()
        .find(|(name, _)| name == id)
        .and_then(|(_, reason)| reason)
}

/// A delayed job is counted as scheduled, shown as scheduled with its time, does not start
/// before its time, and starts when it comes, across a restart of the daemon; one submitted
/// while no daemon runs is filed when one starts.
#[test]
fn a_delayed_job_starts_when_due_not_before_and_survives_a_restart() {
    let env = timed_env("");
    let mut d = env.start();

    let a_submitted = now_ms();
    // Long enough to still be due later when the restart below happens on a loaded machine.
    let a = enqueue(&env, &["--in", "8s"], "a");
    let s = status_json(&env);
    assert_eq!(
        (s["scheduled"].as_u64(), s["retry"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
    d.wait_until("the daemon to file the delayed job into retry/", || {
        env.names("retry").contains(&a)
    });
    let out = env.cli(&["show", &a, "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["scheduled"], true, "{shown}");
    assert!(shown["next_attempt_at"].as_str().is_some(), "{shown}");
    let text = String::from_utf8(env.cli(&["show", &a]).stdout).unwrap();
    assert!(text.contains("scheduled: not before"), "{text}");
    d.stop();
    assert!(runs_of(&env, &a).is_empty(), "ran before its time");

    // Submitted with no daemon running: it waits to be filed, and counts as scheduled.
    let b_submitted = now_ms();
    let b = enqueue(&env, &["--in", "2s"], "b");
    assert_eq!(status_json(&env)["scheduled"].as_u64(), Some(2));
    let text = String::from_utf8(env.cli(&["show", &b]).stdout).unwrap();
    assert!(
        text.contains("tmp/") && text.contains("scheduled: not before"),
        "{text}"
    );
    // A third, cancelled before any daemon filed it, never runs.
    let c = enqueue(&env, &["--in", "1s"], "c");
    let out = env.cli(&["cancel", &c]);
    assert!(out.status.success(), "{}", describe(&out));

    let d = env.start();
    d.wait_until("both delayed jobs to run", || {
        !runs_of(&env, &a).is_empty() && !runs_of(&env, &b).is_empty()
    });
    for (id, submitted, delay) in [(&a, a_submitted, 8000), (&b, b_submitted, 2000)] {
        let runs = runs_of(&env, id);
        assert_eq!(runs.len(), 1, "{id}: {runs:?}");
        assert_eq!(runs[0].0, 1, "{id}: attempt {}", runs[0].0);
        assert!(
            runs[0].1 >= submitted + delay,
            "{id} started {} ms after its submission, before its delay of {delay} ms",
            runs[0].1 - submitted
        );
    }
    let s = status_json(&env);
    assert_eq!(s["scheduled"].as_u64(), Some(0), "{s}");
    d.wait_until("the cancelled delayed job to fail", || {
        reason_of(&env, &c).as_deref() == Some("cancelled")
    });
    assert!(runs_of(&env, &c).is_empty(), "a cancelled delayed job ran");
    assert_eq!(env.count("control"), 0, "{}", spool_listing(&env.spool));
}

/// `--at` takes RFC 3339 with a zone; a time in the past, a time without a zone or garbage,
/// and a duration without a unit are refused with a clear message, and nothing is submitted.
#[test]
fn bad_times_are_refused_and_submit_nothing() {
    let env = timed_env("");
    let cases: [(&[&str], &str); 5] = [
        (&["--at", "2001-01-01T00:00:00Z"], "in the past"),
        (&["--at", "tomorrow"], "not an RFC 3339 time"),
        (&["--at", "2099-01-01T00:00:00"], "needs a zone"),
        (&["--in", "10"], "has no unit"),
        (&["--ttl", "0s"], "greater than zero"),
    ];
    for (flags, expected) in cases {
        let out = enqueue_raw(&env, flags, "x");
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
    for dir in ["tmp", "new", "retry", "control"] {
        assert_eq!(env.count(dir), 0, "{dir}/: {}", spool_listing(&env.spool));
    }
    // A time with an offset is understood: an hour from now, written in UTC+02:00.
    let at =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600 + 7200))
            .to_string()
            .replace('Z', "+02:00");
    let id = enqueue(&env, &["--at", &at], "later");
    let d = env.start();
    d.wait_until("the job to be filed into retry/", || {
        env.names("retry").contains(&id)
    });
    let shown: serde_json::Value =
        serde_json::from_slice(&env.cli(&["show", &id, "--json"]).stdout).unwrap();
    let due = humantime::parse_rfc3339(shown["next_attempt_at"].as_str().unwrap()).unwrap();
    let from_now = due.duration_since(SystemTime::now()).unwrap();
    assert!(
        from_now > Duration::from_secs(3000) && from_now < Duration::from_secs(3700),
        "due in {from_now:?}, not in about an hour"
    );
}

/// A job held past its time to live goes to failed/ with the reason `expired`, logged with
/// its ID; a job held within it stays held.
#[test]
fn a_held_job_expires_at_its_ttl() {
    let env = timed_env("");
    // Paused, so that the jobs can be held before a worker takes them.
    assert!(env.cli(&["pause"]).status.success());
    let d = env.start();
    let short = enqueue(&env, &["--ttl", "2s"], "short");
    let long = enqueue(&env, &["--ttl", "1h"], "long");
    d.wait_until("both jobs to be filed into new/", || {
        let new = env.names("new");
        new.contains(&short) && new.contains(&long)
    });
    let out = env.cli(&["hold", &short, &long]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(env.cli(&["resume"]).status.success());

    d.wait_until("the held job to expire", || {
        reason_of(&env, &short).as_deref() == Some("expired")
    });
    assert!(d.wait_log(
        |log| {
            log.lines()
                .any(|l| l.contains(&short) && l.contains("expired"))
        },
        SOON
    ));
    assert!(
        env.names("hold").contains(&long),
        "{}",
        spool_listing(&env.spool)
    );
    assert!(runs_of(&env, &short).is_empty());
    let shown: serde_json::Value =
        serde_json::from_slice(&env.cli(&["show", &long, "--json"]).stdout).unwrap();
    assert!(shown["expires_at"].as_str().is_some(), "{shown}");
}

/// A hold sets a job aside without moving its time: a delayed job, held and released before
/// its time, still starts at its time, not at the release; a job waiting out a retry's backoff,
/// held and released, goes back to wait for the rest of it; both across a restart while held.
#[test]
fn a_released_job_keeps_its_time() {
    let env = timed_env("");
    let mut d = env.start();
    let submitted = now_ms();
    // Long enough for a failed run, two holds, a restart and two releases on a loaded machine.
    let delayed = enqueue(&env, &["--in", "20s"], "delayed");
    let failing = enqueue(&env, &[], "fail");
    d.wait_until(
        "the delayed job in retry/ and the failing one's first run",
        || env.names("retry").contains(&delayed) && runs_of(&env, &failing).len() == 1,
    );
    d.wait_until("the failing job to wait for its retry (1h)", || {
        env.names("retry").contains(&failing)
    });

    for id in [&delayed, &failing] {
        let out = env.cli(&["hold", id]);
        assert!(out.status.success(), "hold: {}", describe(&out));
    }
    // A daemon started while they are held has never seen their times (it reads retry/ at its
    // start, not hold/): the release must tell it.
    d.stop();
    let d = env.start();
    for id in [&delayed, &failing] {
        let out = env.cli(&["release", id]);
        assert!(out.status.success(), "release: {}", describe(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("released, in retry/ until "),
            "release of {id} does not say it waits for its time:\n{}",
            describe(&out)
        );
    }
    assert!(
        runs_of(&env, &delayed).is_empty(),
        "the delayed job ran at its release"
    );

    d.wait_until("the delayed job to run at its time", || {
        !runs_of(&env, &delayed).is_empty()
    });
    let runs = runs_of(&env, &delayed);
    assert!(
        runs[0].1 >= submitted + 20_000,
        "the released delayed job started {} ms after its submission, before its time (20 s)",
        runs[0].1 - submitted
    );
    // Released before the delayed job's time: had it gone to new/, it would have run again
    // long before that.
    assert_eq!(
        runs_of(&env, &failing).len(),
        1,
        "the released job did not wait out its backoff"
    );
    assert!(
        env.names("retry").contains(&failing),
        "{}",
        spool_listing(&env.spool)
    );
}

/// With `retry.max_age`, a job waiting for its retry past that age (counted from its
/// submission) goes to failed/ with the reason `expired`, its failed attempt kept.
#[test]
fn a_job_waiting_for_its_retry_expires_at_max_age() {
    let env = timed_env("max_age = \"3s\"\n");
    let d = env.start();
    let id = enqueue(&env, &[], "fail");
    d.wait_until("the job's first attempt to fail into retry/", || {
        env.names("retry").contains(&id)
    });
    d.wait_until("the job to expire", || {
        reason_of(&env, &id).as_deref() == Some("expired")
    });
    assert_eq!(runs_of(&env, &id).len(), 1, "retried instead of expired");
    let shown: serde_json::Value =
        serde_json::from_slice(&env.cli(&["show", &id, "--json"]).stdout).unwrap();
    assert_eq!(shown["attempts"], 1, "{shown}");

    // `spoold retry` gives it a new life: paused, so that it waits in new/, it expires again
    // only max_age after the retry, not at the next look.
    assert!(env.cli(&["pause"]).status.success());
    let retried = std::time::Instant::now();
    let out = env.cli(&["retry", &id]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the retried job to expire again", || {
        env.names("failed").contains(&id)
    });
    assert!(
        retried.elapsed() >= Duration::from_millis(2500),
        "the retried job expired {:?} after its retry, before max_age",
        retried.elapsed()
    );
}

/// Eight `spoold enqueue`s of two files each race for a queue of five: never more than five
/// wait, each enqueue submits both its files or neither (exit 75, saying why), and no partial
/// file is left in tmp/ or new/.
#[test]
fn concurrent_enqueues_never_pass_max_queued() {
    let env = timed_env("");
    env.set_spool("max_queued = 5");
    let files: Vec<String> = (0..2)
        .map(|i| {
            let path = env.dir.path().join(format!("job{i}"));
            fs::write(&path, "x".repeat(100_000)).unwrap();
            path.display().to_string()
        })
        .collect();
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(BIN)
                .args(["enqueue", "--config"])
                .arg(&env.config)
                .args(&files)
                // Each holds its count this long before it publishes: without the lock, they
                // would all count the same few jobs and pass the limit together.
                .env("SPOOLD_TEST_PUBLISH_PAUSE", "200ms")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    let full: Vec<_> = outs
        .iter()
        .filter(|o| o.status.code() == Some(75))
        .collect();
    assert_eq!(
        (ok.len(), full.len()),
        (2, 6),
        "{:?}",
        outs.iter().map(describe).collect::<Vec<_>>()
    );
    for o in &full {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("queue is full")
                && err.contains("max_queued")
                && err.contains("nothing was submitted"),
            "{err}"
        );
        assert!(o.stdout.is_empty(), "a refused enqueue printed IDs");
    }
    let printed: std::collections::BTreeSet<String> = ok
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(printed, env.names("new"));
    assert_eq!(env.count("new"), 4);
    assert_eq!(env.count("tmp"), 0, "{}", spool_listing(&env.spool));
    for name in env.names("new") {
        assert_eq!(
            fs::metadata(env.path("new").join(&name)).unwrap().len(),
            100_000
        );
    }
    // One more fits; the next does not.
    enqueue(&env, &[], "fifth");
    let out = enqueue_raw(&env, &[], "sixth");
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    assert_eq!(env.count("new"), 5);
}

/// A submission under `spool.max_queued` waits for the lock on `tmp/` that another holds (a
/// `spoold enqueue` stopped with Ctrl-Z in the middle, say) for 30 s, not for ever: then it
/// says who is in the way, submits nothing and exits non-zero.
#[test]
fn a_submission_waits_a_bounded_time_for_the_lock_another_holds() {
    let env = timed_env("");
    env.set_spool("max_queued = 5");
    // The first submission makes the spool's layout.
    enqueue(&env, &[], "first");
    let tmp = env.path("tmp");
    // -o: sleep does not inherit the lock, so that the kill below ends it.
    let mut holder = Command::new("flock")
        .args(["-x", "-o"])
        .arg(&tmp)
        .args(["sleep", "300"])
        .spawn()
        .expect("flock(1), from util-linux");
    let held = wait_for(SOON, || {
        let free = Command::new("flock")
            .arg("-n")
            .arg(&tmp)
            .arg("true")
            .status()
            .unwrap();
        (!free.success()).then_some(())
    });
    assert!(held.is_some(), "flock(1) did not take the lock");
    let began = std::time::Instant::now();
    let out = enqueue_raw(&env, &[], "second");
    let took = began.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another submission has held it for 30s"),
        "{err}"
    );
    assert!(took >= Duration::from_secs(29), "gave up after {took:?}");
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert_eq!(env.count("new"), 1, "{}", spool_listing(&env.spool));
    assert_eq!(env.count("tmp"), 0, "{}", spool_listing(&env.spool));
    // Once the lock is free, submissions go through again.
    enqueue(&env, &[], "third");
    assert_eq!(env.count("new"), 2);
}

/// `spoold purge --dry-run` lists the old finished jobs and changes nothing; without it, the
/// jobs and their reason records go, and younger ones stay.
#[test]
fn purge_dry_run_changes_nothing_and_purge_removes_with_records() {
    let env = timed_env("");
    // One attempt: the job that fails goes to failed/ at once.
    let cfg = fs::read_to_string(&env.config).unwrap();
    fs::write(
        &env.config,
        cfg.replace("max_attempts = 3", "max_attempts = 1"),
    )
    .unwrap();
    let mut d = env.start();
    let done = enqueue(&env, &[], "ok");
    let failed = enqueue(&env, &[], "fail");
    d.wait_until("one job done and one failed", || {
        env.names("done").contains(&done) && env.names("failed").contains(&failed)
    });
    d.stop();
    let before = spool_listing(&env.spool);
    // Wait until both are more than a second old, as purge sees them.
    let listed = wait_for(SOON, || {
        let out = env.cli(&[
            "purge",
            "--state",
            "failed",
            "--older-than",
            "1s",
            "--dry-run",
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        text.contains(&failed).then_some(text)
    })
    .expect("the failed job never old enough");
    assert!(listed.contains("would be removed"), "{listed}");
    let out = env.cli(&[
        "purge",
        "--state",
        "done",
        "--older-than",
        "1s",
        "--dry-run",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&done));
    assert_eq!(
        spool_listing(&env.spool),
        before,
        "a dry run changed the spool"
    );

    // Nothing is a day old: a real purge with that bound removes nothing.
    let out = env.cli(&["purge", "--state", "failed", "--older-than", "1d"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(spool_listing(&env.spool), before);

    // A directory that is not empty (one a member dropped in new/, refused unopened) is left
    // for a person to look at; the purge goes on past it. It sorts before the job.
    let odd = env.path("failed").join("0-odd");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join("inside"), "x").unwrap();
    wait_for(SOON, || {
        let out = env.cli(&[
            "purge",
            "--state",
            "failed",
            "--older-than",
            "1s",
            "--dry-run",
        ]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .any(|l| l.starts_with("0-odd:"))
            .then_some(())
    })
    .expect("the directory never old enough");

    // The removal is in the daemon's journal with the operator's uid and the job's ID, as
    // every operator's action is: the client leaves a record in control/ that the daemon logs.
    let out = env.cli(&["purge", "--state", "failed", "--older-than", "1s"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&failed));
    assert!(odd.join("inside").exists());
    let uid = rustix::process::geteuid().as_raw();
    // The daemon was stopped for the listings above: it logs the record when it starts.
    let d = env.start();
    d.wait_until(
        "the purge in the daemon's log, with the uid and the job",
        || {
            d.log().lines().any(|l| {
                l.contains(&format!("purged by uid {uid}"))
                    && l.contains(&failed)
                    && l.contains(&format!("operator_uid={uid}"))
            })
        },
    );
    assert!(!env.names("failed").contains(&failed));
    assert!(
        !env.names("reasons").contains(&failed),
        "its reason record stayed"
    );
    assert!(
        env.names("done").contains(&done),
        "purging failed/ touched done/"
    );

    let out = env.cli(&["purge", "--state", "done", "--older-than", "bad"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"));
}

/// With `done.max_age`, the daemon removes finished jobs from done/ once they are that old,
/// and logs each with its ID.
#[test]
fn the_daemon_purges_done_at_max_age() {
    let env = timed_env("[done]\nmax_age = \"1s\"\n");
    let d = env.start();
    let id = enqueue(&env, &[], "ok");
    d.wait_until("the job to be done", || env.names("done").contains(&id));
    d.wait_until("done/ to be purged", || env.count("done") == 0);
    assert!(
        d.wait_log(
            |log| log
                .lines()
                .any(|l| l.contains(&id) && l.contains("done.max_age")),
            SOON
        ),
        "no log line of the purge: {}",
        d.log()
    );
}

/// A member of the spool's group, in a spool with the packaged modes (tmp/ and new/ `3770`,
/// control/ `2770`, the rest `2750`: no write in retry/ or state/), submits a delayed job with a
/// time to live and a job under the limit: the daemon files the delayed one and runs both.
#[test]
fn a_member_submits_delayed_jobs_and_jobs_under_the_limit() {
    use std::os::unix::fs::PermissionsExt;
    if !crate::util::is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        return crate::util::skip(
            "a_member_submits_delayed_jobs_and_jobs_under_the_limit",
            "needs root and setpriv to run as a member of the spool's group",
        );
    }
    let env = timed_env("");
    env.set_spool("max_queued = 10");
    let d = env.start();
    d.wait_until("the spool's layout", || env.path("control").is_dir());
    // The member is nobody, in the group nogroup (65534), which owns the spool as the group
    // spoold owns the packaged one.
    let modes = [
        ("", 0o2750),
        ("tmp", 0o3770),
        ("new", 0o3770),
        ("active", 0o2750),
        ("retry", 0o2750),
        ("done", 0o2750),
        ("failed", 0o2750),
        ("state", 0o2750),
        ("reasons", 0o2750),
        ("hold", 0o2750),
        ("control", 0o2770),
    ];
    for (dir, mode) in modes {
        let path = env.spool.join(dir);
        std::os::unix::fs::chown(&path, Some(0), Some(65534)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&env.config, fs::Permissions::from_mode(0o644)).unwrap();
    let as_member = |args: &[&str]| {
        use std::io::Write;
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                BIN,
            ])
            .args(args)
            .arg("--config")
            .arg(&env.config)
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(b"member job");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let submitted = now_ms();
    let delayed = as_member(&["enqueue", "--in", "2s", "--ttl", "1h"]);
    let plain = as_member(&["enqueue"]);
    d.wait_until("the member's jobs to run", || {
        !runs_of(&env, &delayed).is_empty() && !runs_of(&env, &plain).is_empty()
    });
    let runs = runs_of(&env, &delayed);
    assert!(
        runs[0].1 >= submitted + 2000,
        "the member's delayed job started {} ms after its submission",
        runs[0].1 - submitted
    );
    assert_eq!(env.count("tmp"), 0, "{}", spool_listing(&env.spool));
    assert_eq!(env.count("control"), 0, "{}", spool_listing(&env.spool));

    // The member may not remove from done/, so the daemon purges for them, and logs it with
    // their uid.
    d.wait_until("both jobs in done/", || {
        let names = env.names("done");
        names.contains(&delayed) && names.contains(&plain)
    });
    let purge = |extra: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(BIN)
            .args(["purge", "--state", "done", "--older-than", "1s", "--config"])
            .arg(&env.config)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "purge: {}", describe(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    // The two finished seconds apart: a dry run (which a member may make) waits until both are
    // old enough, so that one purge names both.
    let mut last = String::new();
    wait_for(SOON, || {
        last = purge(&["--dry-run"]);
        (last.contains(&delayed) && last.contains(&plain)).then_some(())
    })
    .unwrap_or_else(|| panic!("the member's dry run never listed both jobs:\n{last}"));
    let asked = purge(&[]);
    assert!(
        asked.contains(&delayed) && asked.contains(&plain),
        "{asked}"
    );
    assert!(asked.contains("purge requested"), "{asked}");
    d.wait_until("the daemon to purge done/ for the member", || {
        env.count("done") == 0
    });
    d.wait_until("the member's purge in the log", || {
        d.log().lines().any(|l| {
            l.contains("purged by uid 65534") && l.contains(&plain) && l.contains("removed from")
        })
    });
}

/// A submission request that names a time past year 9999 (forged by a member of the spool's
/// group, who may write `control/`, or damaged) is filed like any other: the job waits in
/// `retry/` for that time, and `spoold show` says when. Before, writing that time as text
/// panicked: the daemon aborted its jobs and exited 70 at every start.
#[test]
fn a_request_for_a_time_past_year_9999_does_not_stop_the_daemon() {
    let env = timed_env("");
    // The layout is made by a first start.
    let mut d = env.start();
    d.stop();
    let id = "01FORGEDTIMEJOB0000000000";
    fs::write(env.path("tmp").join(id), "far").unwrap();
    fs::write(
        env.path("control").join(format!("submit-{id}")),
        r#"{"uid":0,"not_before_unix_ms":300000000000000,"expires_unix_ms":null}"#,
    )
    .unwrap();
    let d = env.start();
    let other = enqueue(&env, &[], "near");
    d.wait_until("the other job done", || env.names("done").contains(&other));
    d.wait_until("the far job filed into retry/", || {
        env.names("retry").contains(id)
    });
    let out = env.cli(&["show", id, "--json"]);
    assert!(out.status.success(), "show: {}", describe(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["next_attempt_at"], "9999-12-31T23:59:59.999Z",
        "{shown}"
    );
    assert!(runs_of(&env, id).is_empty());
}

/// A job whose time to live ran out while no daemon ran does not start when one starts: it goes
/// to `failed/` as `expired`, although the daemon hands out the jobs of `new/` before its first
/// look for expired jobs. Before, the claim did not look at the time to live.
#[test]
fn a_job_whose_ttl_ran_out_while_no_daemon_ran_does_not_start() {
    let env = timed_env("");
    let mut d = env.start();
    d.stop();
    let submitted = now_ms();
    let id = enqueue(&env, &["--ttl", "1s"], "late");
    // The time to live runs out.
    wait_for(SOON, || (now_ms() > submitted + 1_500).then_some(())).unwrap();
    let d = env.start();
    d.wait_until("the job in failed/", || env.names("failed").contains(&id));
    assert_eq!(reason_of(&env, &id).as_deref(), Some("expired"));
    assert!(
        runs_of(&env, &id).is_empty(),
        "it ran: {:?}",
        runs_of(&env, &id)
    );
}

/// A job with a time to live waits for its retry when a producer drops another job of the same
/// name into `new/`: at the end of its time to live the job that expires is the one the record
/// belongs to, the one in `retry/`, and the newcomer stays queued, and runs.
#[test]
fn the_job_that_expires_is_the_one_its_record_belongs_to() {
    let env = timed_env("");
    let d = env.start();
    let id = enqueue(&env, &["--ttl", "3s"], "fail");
    d.wait_until("the job waiting for its retry", || {
        env.names("retry").contains(&id)
    });
    assert!(env.cli(&["pause"]).status.success());
    d.wait_until("the pause", || d.log().contains("paused by uid"));
    env.submit(&id, "x");
    d.wait_until("the first job expired", || {
        env.names("failed").contains(&id) && !env.names("retry").contains(&id)
    });
    assert_eq!(reason_of(&env, &id).as_deref(), Some("expired"));
    assert!(
        env.names("new").contains(&id),
        "the newcomer stays queued: {}",
        crate::util::spool_listing(&env.spool)
    );
    assert!(env.cli(&["resume"]).status.success());
    d.wait_until("the newcomer done", || env.names("done").contains(&id));
}
