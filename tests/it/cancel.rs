//! `spoold cancel ID...` as an operator runs it: a waiting or held job goes to failed/ with the
//! reason `cancelled`, a running handler (and everything it started) is stopped within
//! kill_grace, nothing cancelled is retried, and `spoold retry` brings a cancelled job back.

use std::fs;
use std::time::{Duration, Instant};

use crate::util::{Env, SOON, describe, failed_reasons, pids_in, process_alive, wait_for};

/// A spool whose handler appends its job's ID to `runs` and its pid (and that of a child that
/// also ignores SIGTERM) to `pids`; a job whose body says `wait` runs until the file `go`
/// exists, ignoring SIGTERM meanwhile; a job whose body says `fail` exits 1, and waits an hour
/// for its retry.
fn cancel_env() -> Env {
    let env = Env::new(&["/bin/true"], "");
    let dir = env.dir.path().display().to_string();
    let h = env.script(
        "handler.sh",
        &format!(
            "printf '%s\\n' \"$SPOOLD_JOB_ID\" >> {dir}/runs\n\
             if grep -q fail \"$SPOOLD_JOB_PATH\"; then exit 1; fi\n\
             if grep -q wait \"$SPOOLD_JOB_PATH\"; then\n\
               trap '' TERM\n\
               sh -c 'trap \"\" TERM; echo $$ >> {dir}/pids; exec sleep 1000' &\n\
               echo $$ >> {dir}/pids\n\
               while [ ! -e {dir}/go ]; do sleep 0.05; done\n\
             fi\n\
             exit 0"
        ),
    );
    env.write_config(
        &[&h],
        "kill_grace = \"500ms\"\n[workers]\ncount = 2\n[retry]\nbackoff_initial = \"1h\"\nmax_attempts = 3\n",
    );
    env
}

/// How many times job `id` started.
fn starts(env: &Env, id: &str) -> usize {
    fs::read_to_string(env.dir.path().join("runs"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == id)
        .count()
}

fn reason_of(env: &Env, id: &str) -> Option<String> {
    failed_reasons(env)
        .into_iter()
        .find(|(name, _)| name == id)
        .and_then(|(_, reason)| reason)
}

fn cancel(env: &Env, ids: &[&str]) {
    let mut args = vec!["cancel"];
    args.extend_from_slice(ids);
    let out = env.cli(&args);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn waiting_retrying_and_held_jobs_are_cancelled_and_not_retried() {
    let env = cancel_env();
    let mut d = env.start();
    // A job waiting for its retry (an hour away).
    env.submit("flaky", "fail");
    d.wait_until("the failing job to wait in retry/", || {
        env.names("retry").contains("flaky")
    });
    // A held job, and a queued one behind a pause (so that no worker takes it first).
    assert!(env.cli(&["pause"]).status.success());
    env.submit("held", "x");
    env.submit("queued", "x");
    let out = env.cli(&["hold", "held"]);
    assert!(out.status.success(), "{}", describe(&out));

    cancel(&env, &["flaky", "held", "queued"]);
    d.wait_until("the three jobs to be in failed/", || {
        env.count("failed") == 3
    });
    for id in ["flaky", "held", "queued"] {
        assert_eq!(reason_of(&env, id).as_deref(), Some("cancelled"), "{id}");
    }
    assert!(env.names("retry").is_empty() && env.names("hold").is_empty());
    // The journal names the operator and the job.
    let uid = rustix::process::geteuid().as_raw();
    assert!(
        d.wait_log(
            |l| l.contains("cancelled by uid")
                && l.contains(&format!("{uid}"))
                && l.contains("queued"),
            SOON
        ),
        "{}",
        d.log()
    );
    // Nothing cancelled runs after a resume.
    assert!(env.cli(&["resume"]).status.success());
    assert!(
        wait_for(Duration::from_secs(3), || (starts(&env, "queued") > 0)
            .then_some(()))
        .is_none(),
        "a cancelled job ran"
    );
    assert_eq!(starts(&env, "flaky"), 1);

    // `retry --all` (after an outage, say) leaves the cancelled jobs, and says so ...
    let out = env.cli(&["retry", "--all"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 cancelled jobs left in failed/"),
        "{}",
        describe(&out)
    );
    assert_eq!(env.count("failed"), 3);
    // ... and a cancelled job named is retried like any failed one.
    let out = env.cli(&["retry", "queued"]);
    assert!(out.status.success(), "{}", describe(&out));
    d.wait_until("the retried job to run", || {
        env.names("done").contains("queued")
    });
    d.stop();
}

#[test]
fn a_running_handler_and_its_child_are_stopped_and_the_job_fails_for_good() {
    let env = cancel_env();
    let mut d = env.start();
    env.submit("slow", "wait");
    let pids_file = env.dir.path().join("pids");
    d.wait_until("the handler and its child to start", || {
        pids_in(&pids_file).len() == 2
    });

    let asked = Instant::now();
    cancel(&env, &["slow"]);
    d.wait_until("the cancelled job to be in failed/", || {
        env.names("failed").contains("slow")
    });
    let took = asked.elapsed();
    // A second to see the request, kill_grace (500ms) for the SIGKILL, and room for a loaded
    // machine.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    for pid in pids_in(&pids_file) {
        assert!(
            wait_for(Duration::from_secs(5), || (!process_alive(pid))
                .then_some(()))
            .is_some(),
            "pid {pid} survived the cancel"
        );
    }
    assert_eq!(reason_of(&env, "slow").as_deref(), Some("cancelled"));
    assert!(env.names("active").is_empty() && env.names("retry").is_empty());
    assert!(env.names("new").is_empty());
    assert_eq!(starts(&env, "slow"), 1, "a cancelled job was retried");
    // The journal tells the cancel as a cancel, with how the handler ended; the runner's
    // name for it (a lost lease) is the broker's, not the operator's.
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("cancelled by uid") && l.contains("slow"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no cancel line: {}", d.log()));
    assert!(
        line.contains("while running (the handler killed by SIGKILL)"),
        "{line}"
    );
    assert!(!line.contains("lease"), "{line}");
    d.stop();
    assert_eq!(starts(&env, "slow"), 1);
}

/// A cancel request written by hand with the largest uid there is (4294967295, which is
/// `(uid_t) -1`) cancels the running job like any other, and the jobs after it run: the
/// daemon's own marks on an attempt are not uids. Before, that uid was taken for the daemon's
/// mark: the cancel was lost, and the attempt's switch went back into use still raised, so
/// every later job that got it was stopped at once.
#[test]
fn a_cancel_by_the_largest_uid_is_a_cancel_and_spares_the_next_jobs() {
    let env = cancel_env();
    let mut d = env.start();
    env.submit("slow", "wait");
    let pids_file = env.dir.path().join("pids");
    d.wait_until("the handler and its child to start", || {
        pids_in(&pids_file).len() == 2
    });
    fs::write(
        env.path("control").join("cancel-slow"),
        r#"{"uid":4294967295}"#,
    )
    .unwrap();
    d.wait_until("the cancelled job in failed/", || {
        env.names("failed").contains("slow")
    });
    assert_eq!(reason_of(&env, "slow").as_deref(), Some("cancelled"));
    fs::write(env.dir.path().join("go"), "").unwrap();
    for i in 0..4 {
        env.submit(&format!("after{i}"), "x");
    }
    d.wait_until("the jobs after it done", || env.count("done") == 4);
    assert_eq!(env.count("failed"), 1);
    d.stop();
}

/// A cancel of a hundred queued jobs is carried out over several turns of the daemon's loop
/// (a few at a time, since each writes and flushes a record on its main thread), and every
/// one of them reaches `failed/`.
#[test]
fn a_cancel_of_many_jobs_is_carried_out_in_turns_to_the_last() {
    let env = cancel_env();
    let mut d = env.start();
    assert!(env.cli(&["pause"]).status.success());
    d.wait_until("the log to show it", || d.log().contains("paused by uid"));
    let ids: Vec<String> = (0..100).map(|i| format!("job{i:03}")).collect();
    for id in &ids {
        env.submit(id, "x");
    }
    let args: Vec<&str> = ids.iter().map(String::as_str).collect();
    cancel(&env, &args);
    d.wait_until("all hundred in failed/", || env.count("failed") == 100);
    assert_eq!(
        env.count("new") + env.count("control"),
        1,
        "only the pause record is left"
    );
    assert!(ids.iter().all(|id| starts(&env, id) == 0));
    d.stop();
}

/// A cancel that comes while a failed attempt is being settled (its handler has ended, the
/// job is on its way to retry/) is not lost: the request waits for the next look, which finds
/// the job in retry/ and fails it as cancelled. Before, the cancel was taken as one of a
/// running job, its request removed, and the job ran again. The test-only switch
/// `SPOOLD_TEST_SETTLE_PAUSE` holds the settling open long enough to send the cancel into it.
#[test]
fn a_cancel_that_comes_as_an_attempt_is_settled_is_not_lost() {
    let env = cancel_env();
    let d = crate::util::Daemon::start(&env.config, &[("SPOOLD_TEST_SETTLE_PAUSE", "2s")]);
    env.submit("flaky", "fail");
    // The handler exits 1 at once; its settling then pauses 2 s.
    d.wait_until("the failed attempt's settling to begin", || {
        d.log().contains("SPOOLD_TEST_SETTLE_PAUSE")
    });
    cancel(&env, &["flaky"]);
    d.wait_until("the job in failed/", || {
        env.names("failed").contains("flaky")
    });
    assert_eq!(reason_of(&env, "flaky").as_deref(), Some("cancelled"));
    assert_eq!(env.count("retry"), 0, "{}", d.log());
    assert_eq!(env.count("control"), 0, "the request was acted on");
}

#[test]
fn a_path_or_an_unknown_id_is_refused_and_nothing_is_requested() {
    let env = cancel_env();
    env.submit("job", "x");
    // Set the layout up without running anything: a pause does, as enqueue does.
    assert!(env.cli(&["pause"]).status.success());
    assert!(env.cli(&["resume"]).status.success());
    for bad in ["../new/job", "/etc/passwd", "new/job", "..", ""] {
        let out = env.cli(&["cancel", "job", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nothing was cancelled"), "{bad:?}: {err}");
    }
    let out = env.cli(&["cancel", "nosuchjob"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuchjob"),
        "{}",
        describe(&out)
    );
    let requests: Vec<_> = fs::read_dir(env.path("control"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cancel"))
        .collect();
    assert!(requests.is_empty(), "{requests:?}");
    // The job is still there, to run.
    let mut d = env.start();
    d.wait_until("the job to run", || env.names("done").contains("job"));
    d.stop();
}
