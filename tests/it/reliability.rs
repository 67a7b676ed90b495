//! Soaks of the real daemon under continuous submission (issue 6): stop/start with SIGTERM at
//! random moments and random drain deadlines, and kill -9 at random moments.
//!
//! In CI (the default) the stop/start soak runs 200 cycles and the crash soak 100, which takes
//! a few minutes on two cores in a debug build. To soak for longer, set the duration of each
//! soak in seconds; the cycle counts then become minimums:
//!
//! ```text
//! SPOOLD_SOAK_SECS=3600 cargo test --release --test it reliability:: -- --nocapture
//! ```
//!
//! Afterwards the daemon drains the spool, and every job submitted must be in `done/` exactly
//! once. The handler appends its job's ID to a log as it starts, which counts runs: in the crash
//! soak only a job that was in `active/` at a kill may have run more than once (once more per
//! such kill).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::util::{Daemon, Env, SOON, runs, wait_for};

/// Cycles in CI mode.
const STOP_START_CYCLES: usize = 200;
const CRASH_CYCLES: usize = 100;
/// What a stop may take beyond drain_timeout + kill_grace: the supervisor's own slack, the
/// runtime's shutdown, process exit, and a busy shared machine.
const STOP_SLACK: Duration = Duration::from_millis(1500);
const KILL_GRACE: Duration = Duration::from_millis(200);

/// The soak length from SPOOLD_SOAK_SECS, if set.
fn soak_duration() -> Option<Duration> {
    std::env::var("SPOOLD_SOAK_SECS")
        .ok()
        .map(|s| Duration::from_secs(s.trim().parse().expect("SPOOLD_SOAK_SECS: seconds")))
}

/// Whether another cycle should run.
fn more(cycle: usize, minimum: usize, started: Instant) -> bool {
    cycle < minimum || soak_duration().is_some_and(|d| started.elapsed() < d)
}

/// A producer that submits jobs the Maildir way at a random pace, whether a daemon runs or not.
struct Submitter {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<BTreeSet<String>>,
}

impl Submitter {
    fn start(env: &Env) -> Submitter {
        let stop = Arc::new(AtomicBool::new(false));
        let tmp = env.path("tmp");
        let new = env.path("new");
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut names = BTreeSet::new();
            let mut seq = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let name = format!("job-{seq:07}");
                seq += 1;
                fs::write(tmp.join(&name), &name).unwrap();
                fs::rename(tmp.join(&name), new.join(&name)).unwrap();
                names.insert(name);
                thread::sleep(Duration::from_millis(fastrand::u64(10..40)));
            }
            names
        });
        Submitter { stop, handle }
    }

    /// Stops submitting and returns every name submitted.
    fn finish(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// A spool whose handler logs its job's ID to `runs` as it starts, then works for 0 to 90 ms
/// (by the job's last digit). A job whose ID ends in 7 fails its first run (so that stops and
/// kills also meet jobs waiting in retry/ with their records); every other run succeeds.
fn soak_env() -> (Env, String) {
    let env = Env::new(&["/bin/true"], "");
    let runs = env.runs_file();
    let marks = env.dir.path().join("failed-once");
    fs::create_dir(&marks).unwrap();
    let h = env.script(
        "work.sh",
        &format!(
            "printf '%s\\n' \"$SPOOLD_JOB_ID\" >> {runs}\n\
             case \"$SPOOLD_JOB_ID\" in *7)\n\
               [ -e {marks}/\"$SPOOLD_JOB_ID\" ] || {{ : > {marks}/\"$SPOOLD_JOB_ID\"; exit 1; }};;\n\
             esac\n\
             sleep 0.0${{SPOOLD_JOB_ID#job-??????}}",
            runs = runs.display(),
            marks = marks.display()
        ),
    );
    for dir in ["tmp", "new"] {
        fs::create_dir_all(env.path(dir)).unwrap();
    }
    (env, h)
}

fn config(env: &Env, handler: &str, drain: Duration) {
    env.write_config(
        &[handler],
        &format!(
            "timeout = \"30s\"\nkill_grace = \"{}ms\"\n[workers]\ncount = 4\n\
             [retry]\nmax_attempts = 5\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n\
             [shutdown]\ndrain_timeout = \"{}ms\"\n",
            KILL_GRACE.as_millis(),
            drain.as_millis()
        ),
    );
    // The kills catch innocent jobs in flight, some of them at several kills in a row (a job
    // recovered at a start runs first, and the next kill may come within its run): the soaks
    // check that nothing is lost, so the bound on recoveries, which has a test of its own
    // (core::a_job_that_keeps_killing_the_daemon_is_failed_after_max_recoveries), is set out
    // of their reach.
    let text = fs::read_to_string(&env.config).unwrap();
    fs::write(
        &env.config,
        text.replacen("\n\n[handler]", "\nmax_recoveries = 1000\n\n[handler]", 1),
    )
    .unwrap();
}

/// Starts a daemon and waits until `done/` holds every submitted job, then stops it; checks
/// that every job is in done/ exactly once and nowhere else.
fn drain_and_check(env: &Env, submitted: &BTreeSet<String>) {
    let mut d = env.start();
    let drained = wait_for(Duration::from_secs(240), || {
        (env.count("done") >= submitted.len()).then_some(())
    });
    assert!(
        drained.is_some(),
        "only {} of {} jobs reached done/; new {}, active {}, retry {}, failed {}",
        env.count("done"),
        submitted.len(),
        env.count("new"),
        env.count("active"),
        env.count("retry"),
        env.count("failed")
    );
    d.stop();
    assert!(!d.log().contains("ERROR"), "{}", d.log());
    let done = env.names("done");
    assert_eq!(
        done.len(),
        env.count("done"),
        "unexpected dot-files in done/"
    );
    let missing: Vec<_> = submitted.difference(&done).collect();
    let extra: Vec<_> = done.difference(submitted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "lost {missing:?}; unexpected (duplicates?) {extra:?}"
    );
    for dir in ["new", "active", "retry", "failed", "tmp"] {
        assert_eq!(env.count(dir), 0, "{dir}/ not empty: {:?}", env.names(dir));
    }
}

#[test]
fn stop_start_soak_loses_nothing_and_every_stop_is_within_its_bound() {
    let (env, handler) = soak_env();
    let submitter = Submitter::start(&env);
    let started = Instant::now();
    let mut cycle = 0;
    let mut worst_margin = Duration::MAX;
    let mut aborted_stops = 0;
    let (mut early_stops, mut killed_by_term) = (0, 0);
    while more(cycle, STOP_START_CYCLES, started) {
        let drain = Duration::from_millis(fastrand::u64(0..=500));
        config(&env, &handler, drain);
        // One cycle in five stops the daemon while it starts (crash recovery, the first scan),
        // before READY; the others at a random moment of its run.
        let early = fastrand::u8(0..5) == 0;
        let mut d = if early {
            let d = Daemon::spawn(&env.config, &[]);
            thread::sleep(Duration::from_millis(fastrand::u64(0..30)));
            d
        } else {
            let d = env.start();
            thread::sleep(Duration::from_millis(fastrand::u64(0..300)));
            d
        };
        d.term();
        let bound = drain + KILL_GRACE + STOP_SLACK;
        let (status, took) = d.wait_exit(bound + SOON);
        let log = d.log();
        // Before its signal handlers are installed (the first milliseconds) the daemon dies of
        // the SIGTERM itself, which systemd counts as a clean stop too; nothing is claimed yet.
        let clean = status.success()
            || (early && std::os::unix::process::ExitStatusExt::signal(&status) == Some(15));
        assert!(clean, "cycle {cycle}: exit {status}; log:\n{log}");
        if early {
            early_stops += 1;
            if !status.success() {
                killed_by_term += 1;
            }
        }
        assert!(
            took <= bound,
            "cycle {cycle}: the stop took {took:?}, more than drain {drain:?} + kill_grace \
             {KILL_GRACE:?} + slack {STOP_SLACK:?}; log:\n{log}"
        );
        assert!(!log.contains("ERROR"), "cycle {cycle}: log:\n{log}");
        if log.contains("drain timeout reached") {
            aborted_stops += 1;
        }
        worst_margin = worst_margin.min(bound - took);
        cycle += 1;
    }
    let submitted = submitter.finish();
    println!(
        "stop/start soak: {cycle} cycles in {:?}, {} jobs, {aborted_stops} stops aborted jobs \
         at the drain deadline, {early_stops} stops before READY ({killed_by_term} of them \
         before the signal handlers), smallest margin to the stop bound {worst_margin:?}",
        started.elapsed(),
        submitted.len()
    );
    // The soak must have exercised both kinds of stop, or it showed little.
    assert!(aborted_stops > 0, "no stop ever reached its drain deadline");
    drain_and_check(&env, &submitted);
}

#[test]
fn crash_soak_loses_nothing_and_reruns_only_jobs_in_flight() {
    let (env, handler) = soak_env();
    config(&env, &handler, Duration::from_secs(5));
    let submitter = Submitter::start(&env);
    let started = Instant::now();
    // Per job, how many kills found it in active/: each allows one more run.
    let mut in_flight_at_kill: BTreeMap<String, usize> = BTreeMap::new();
    let mut cycle = 0;
    while more(cycle, CRASH_CYCLES, started) {
        // One kill in five lands while the daemon starts (during crash recovery, say).
        let mut d: Daemon = if fastrand::u8(0..5) == 0 {
            let d = Daemon::spawn(&env.config, &[]);
            thread::sleep(Duration::from_millis(fastrand::u64(0..30)));
            d
        } else {
            let d = env.start();
            thread::sleep(Duration::from_millis(fastrand::u64(0..300)));
            d
        };
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        assert!(!d.log().contains("ERROR"), "cycle {cycle}: {}", d.log());
        // With the daemon dead, active/ holds exactly the jobs it had claimed.
        for name in env.names("active") {
            *in_flight_at_kill.entry(name).or_default() += 1;
        }
        cycle += 1;
    }
    let submitted = submitter.finish();
    drain_and_check(&env, &submitted);
    let runs = runs(&env);
    let mut reruns = 0;
    for name in &submitted {
        let ran = runs.get(name).copied().unwrap_or(0);
        // A job ending in 7 runs once more by design (its first run fails).
        let by_design = if name.ends_with('7') { 2 } else { 1 };
        let kills = in_flight_at_kill.get(name).copied().unwrap_or(0);
        assert!(
            ran >= by_design,
            "{name} is in done/ but its handler ran only {ran} times"
        );
        assert!(
            ran <= by_design + kills,
            "{name} ran {ran} times but was in flight at only {kills} kills"
        );
        reruns += ran - by_design;
    }
    println!(
        "crash soak: {cycle} kills in {:?}, {} jobs, {} in flight at a kill, {reruns} reruns",
        started.elapsed(),
        submitted.len(),
        in_flight_at_kill.len()
    );
    assert!(
        !in_flight_at_kill.is_empty(),
        "no kill ever caught a job in flight"
    );
}
