//! The Prometheus endpoint (`[metrics] listen`), as an operator meets it: the text at
//! `/metrics` after jobs ran, a real Prometheus scraping it and answering a query, an address in
//! use or malformed refused at start with the address named, and a stop that the endpoint does
//! not delay.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{self, BIN, Env, SOON, describe, free_port, run_to_exit, wait_for};

/// One HTTP/1.1 GET: (status code, body), or None when nothing answered.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(SOON)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The value of the sample named exactly `series` (name and labels) in the exposition text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A spool with 2 workers whose handler exits 65 (a permanent failure) for a job that says
/// `bad`, 1 for one that says `flaky` (its retry waits an hour), and 0 otherwise; metrics on
/// `port`.
fn metrics_env(port: u16) -> Env {
    let env = Env::new(&["/bin/true"], "");
    let h = env.script(
        "handler.sh",
        "if grep -q bad \"$SPOOLD_JOB_PATH\"; then exit 65; fi\n\
         if grep -q flaky \"$SPOOLD_JOB_PATH\"; then exit 1; fi\nexit 0",
    );
    env.write_config(
        &[&h],
        &format!(
            "[workers]\ncount = 2\n[retry]\npermanent_exit_codes = [65]\nbackoff_initial = \"1h\"\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    );
    env
}

/// A client that opens a hundred connections to the endpoint and keeps them open takes no
/// more than a few of the daemon's descriptors: the jobs still run (their pipes and pidfds
/// need descriptors too), and once those connections close a scrape is answered again.
#[test]
fn many_open_connections_do_not_use_up_the_daemons_descriptors() {
    let port = free_port();
    let env = metrics_env(port);
    let d = env.start();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let before = fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect();
    assert_eq!(
        held.len(),
        100,
        "the connections were accepted by the kernel"
    );
    // The daemon has accepted what it will (and closed the rest) once its count settles.
    let mut last = 0;
    let settled = wait_for(SOON, || {
        std::thread::sleep(Duration::from_millis(200));
        let now = fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count();
        let same = now == last;
        last = now;
        same.then_some(now)
    })
    .unwrap();
    assert!(
        settled <= before + 20,
        "{settled} descriptors with 100 connections open, {before} before"
    );
    env.submit("while-held", "x");
    d.wait_until("a job done while the connections are held", || {
        env.names("done").contains("while-held")
    });
    drop(held);
    let answered = wait_for(SOON, || {
        http_get(addr, "/metrics").filter(|(code, _)| *code == 200)
    });
    assert!(answered.is_some(), "a scrape after the connections closed");
}

/// Jobs run, then `/metrics` says how they ended, how many are in each state, the workers,
/// the pause, and the histograms' counts; another path is a 404. A stop is not held up by a
/// client that keeps a connection open.
#[test]
fn metrics_endpoint_reports_jobs_states_workers_and_pause() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let env = metrics_env(port);
    let mut daemon = env.start();
    for i in 0..3 {
        env.submit(&format!("ok-{i}"), "fine");
    }
    env.submit("bad-1", "bad");
    daemon.wait_until("3 done and 1 failed", || {
        env.names("done").len() == 3 && env.names("failed").len() == 1
    });

    let (status, text) = http_get(addr, "/metrics").expect("an answer from /metrics");
    assert_eq!(status, 200, "{text}");
    for (series, want) in [
        ("spoold_jobs_finished_total{outcome=\"done\"}", 3.0),
        ("spoold_jobs_finished_total{outcome=\"failed\"}", 1.0),
        ("spoold_jobs_finished_total{outcome=\"retried\"}", 0.0),
        ("spoold_jobs_finished_total{outcome=\"cancelled\"}", 0.0),
        ("spoold_jobs_finished_total{outcome=\"aborted\"}", 0.0),
        ("spoold_jobs{state=\"done\"}", 3.0),
        ("spoold_jobs{state=\"failed\"}", 1.0),
        ("spoold_jobs{state=\"queued\"}", 0.0),
        ("spoold_jobs{state=\"held\"}", 0.0),
        ("spoold_jobs{state=\"scheduled\"}", 0.0),
        ("spoold_jobs_finished_total{outcome=\"expired\"}", 0.0),
        ("spoold_workers", 2.0),
        ("spoold_workers_busy", 0.0),
        ("spoold_paused", 0.0),
        ("spoold_oldest_queued_age_seconds", 0.0),
        ("spoold_job_run_seconds_count", 4.0),
        ("spoold_job_run_seconds_bucket{le=\"+Inf\"}", 4.0),
        ("spoold_job_queue_wait_seconds_count", 4.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }
    assert!(
        text.contains("# TYPE spoold_job_run_seconds histogram"),
        "{text}"
    );
    let (status, _) = http_get(addr, "/").expect("an answer from /");
    assert_eq!(status, 404);

    // A pause shows within a second or so; a queued job's age with it.
    let out = env.cli(&["pause", "--reason", "metrics test"]);
    assert!(out.status.success(), "{}", describe(&out));
    env.submit("waiting", "fine");
    // Submitted two minutes ago, as its mtime says: the age the gauge gives.
    fs::File::options()
        .write(true)
        .open(env.path("new").join("waiting"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
        .unwrap();
    let text = wait_for(SOON, || {
        let (_, text) = http_get(addr, "/metrics")?;
        (sample(&text, "spoold_paused") == Some(1.0)
            && sample(&text, "spoold_jobs{state=\"queued\"}") == Some(1.0)
            && sample(&text, "spoold_oldest_queued_age_seconds")
                .is_some_and(|age| (120.0..300.0).contains(&age)))
        .then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "no paused=1 with one queued job two minutes old; log:\n{}",
            daemon.log()
        )
    });
    assert!(text.contains("spoold_oldest_queued_age_seconds"), "{text}");

    // A cancel of the waiting job, and a failed attempt that waits for its retry, each count
    // under their own outcome.
    let out = env.cli(&["cancel", "waiting"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    env.submit("flaky-1", "flaky");
    let text = wait_for(SOON, || {
        let (_, text) = http_get(addr, "/metrics")?;
        (sample(&text, "spoold_jobs_finished_total{outcome=\"cancelled\"}") == Some(1.0)
            && sample(&text, "spoold_jobs_finished_total{outcome=\"retried\"}") == Some(1.0)
            // The directories are counted before the counters are read: a scrape may see the
            // counter of a move that its count of the directories missed.
            && sample(&text, "spoold_jobs{state=\"retry\"}") == Some(1.0))
        .then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "no cancelled 1, retried 1, 1 in retry; log:\n{}",
            daemon.log()
        )
    });
    for (series, want) in [
        ("spoold_jobs{state=\"failed\"}", 2.0),
        ("spoold_jobs_finished_total{outcome=\"failed\"}", 1.0),
        ("spoold_paused", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }

    // An idle connection, left open, does not hold the stop.
    let idle = TcpStream::connect(addr).unwrap();
    let took = daemon.stop();
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
    drop(idle);
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the endpoint outlived the daemon"
    );
}

/// An address already in use is a start-up error that names the address and the key; no job
/// starts. A malformed one is a config error with the file, line and key.
#[test]
fn metrics_address_in_use_or_malformed_is_refused_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let env = metrics_env(port);
    env.submit("job", "fine");
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&env.config);
    let out = run_to_exit(cmd, SOON);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{}", describe(&out));
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("[metrics] listen"),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    assert_eq!(env.names("new").len(), 1, "a job ran: {err}");
    drop(taken);

    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(&format!("\"127.0.0.1:{port}\""), "\"localhost:9465\"");
    std::fs::write(&env.config, &text).unwrap();
    let line = text.lines().position(|l| l.starts_with("listen")).unwrap() + 1;
    let out = env.cli(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{}", describe(&out));
    let at = format!("{}:{line}:", env.config.display());
    assert!(err.contains(&at), "expected {at:?}: {err}");
    assert!(err.contains("key `metrics.listen`"), "{err}");
    assert!(err.contains("is not an address and port"), "{err}");
}

/// Ends the Prometheus the test started, whatever happens to the test.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Prometheus server binary: Debian's package, or the one `SPOOLD_PROMETHEUS` names.
fn prometheus_binary() -> Option<String> {
    if let Ok(path) = std::env::var("SPOOLD_PROMETHEUS") {
        return Some(path);
    }
    Path::new("/usr/bin/prometheus")
        .exists()
        .then(|| "/usr/bin/prometheus".to_owned())
}

/// Prometheus's HTTP API answer to `path`, parsed; None until it answers 200.
fn prometheus_api(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(addr, path)?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// A real Prometheus scrapes spoold: the target is up, and a query returns the number of jobs
/// that ran.
#[test]
fn a_real_prometheus_scrapes_the_number_of_jobs_run() {
    let test = "metrics::a_real_prometheus_scrapes_the_number_of_jobs_run";
    let Some(binary) = prometheus_binary() else {
        return util::skip(
            test,
            "no Prometheus server (apt-get install prometheus, or set SPOOLD_PROMETHEUS)",
        );
    };
    let port = free_port();
    let env = metrics_env(port);
    let mut daemon = env.start();
    for i in 0..5 {
        env.submit(&format!("ok-{i}"), "fine");
    }
    daemon.wait_until("5 done", || env.names("done").len() == 5);

    let dir = env.dir.path();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: spoold\n    static_configs:\n      \
             - targets: [\"127.0.0.1:{port}\"]\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(&binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let _prometheus = Prometheus(child);
    let prometheus_log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();

    let up = wait_for(SOON, || {
        let targets = prometheus_api(web, "/api/v1/targets")?;
        let target = targets["data"]["activeTargets"]
            .as_array()?
            .first()?
            .clone();
        (target["health"] == "up").then_some(target)
    });
    assert!(
        up.is_some(),
        "the spoold target is not up in Prometheus; its log:\n{}",
        prometheus_log()
    );
    let query = "/api/v1/query?query=spoold_jobs_finished_total%7Boutcome%3D%22done%22%7D";
    let value = wait_for(SOON, || {
        let answer = prometheus_api(web, query)?;
        let result = answer["data"]["result"].as_array()?.first()?.clone();
        result["value"][1].as_str().map(str::to_owned)
    });
    assert_eq!(
        value.as_deref(),
        Some("5"),
        "the query's answer; Prometheus log:\n{}",
        prometheus_log()
    );
    daemon.stop();
}

/// Under a real systemd, the packaged unit with the README's drop-in (config/metrics.conf)
/// serves `/metrics` to a scraper on loopback, and refuses one from another address of the
/// machine: the drop-in's IP filter is in force, and the endpoint works through it.
#[test]
fn packaged_unit_with_the_metrics_drop_in_serves_loopback_only() {
    use crate::sysd::{self, Machine};
    let test = "metrics::packaged_unit_with_the_metrics_drop_in_serves_loopback_only";
    if sysd::skipped(test) {
        return;
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(source.join(p)).unwrap();
    let m = Machine::boot(&[(Path::new(BIN), "/usr/local/bin/spoold")]);
    m.write(
        "/etc/systemd/system/spoold.service",
        &read("packaging/spoold.service").replace("/usr/bin/spoold", "/usr/local/bin/spoold"),
    );
    m.write(
        "/etc/systemd/system/spoold.service.d/metrics.conf",
        &read("config/metrics.conf"),
    );
    m.write(
        "/usr/lib/sysusers.d/spoold.conf",
        &read("packaging/spoold.sysusers"),
    );
    m.write(
        "/usr/lib/tmpfiles.d/spoold.conf",
        &read("packaging/spoold.tmpfile"),
    );
    // Listening on every address, so that the filter, not the socket, decides who gets in. A
    // second address on lo, outside 127.0.0.0/8, is one the drop-in does not allow.
    m.write(
        "/etc/spoold/spoold.toml",
        "[spool]\ndir = \"/var/spool/spoold\"\n[workers]\ncount = 2\n\
         [handler]\ncommand = [\"/bin/true\"]\n[metrics]\nlisten = \"0.0.0.0:9465\"\n",
    );
    m.sh_ok(
        "systemd-sysusers && systemd-tmpfiles --create && chgrp spoold /etc/spoold/spoold.toml \
         && chmod 0640 /etc/spoold/spoold.toml && ip addr add 10.9.9.1/32 dev lo \
         && systemctl daemon-reload && systemctl start spoold",
    );
    m.sh_ok("for i in 1 2 3; do echo job | spoold enqueue -c /etc/spoold/spoold.toml -; done");
    // bash's /dev/tcp: the guest has no HTTP client of its own.
    m.write_exec(
        "/usr/local/bin/scrape",
        "#!/bin/bash\ntimeout 10 bash -c 'exec 3<>\"/dev/tcp/$0/9465\" && printf \
         \"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n\" >&3 && \
         cat <&3' \"$1\"\n",
    );
    let scrape = |host: &str| m.sh_within(&format!("scrape {host}"), Duration::from_secs(60));
    let text = wait_for(SOON, || {
        let out = scrape("127.0.0.1");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .any(|l| l == "spoold_jobs_finished_total{outcome=\"done\"} 3")
            .then_some(text)
    });
    assert!(
        text.is_some(),
        "no scrape counted 3 done jobs; the last: {}\nstatus:\n{}",
        describe(&scrape("127.0.0.1")),
        String::from_utf8_lossy(
            &m.sh("systemctl status --no-pager spoold; journalctl --no-pager -u spoold | tail -20")
                .stdout
        )
    );
    // From 10.9.9.1, which IPAddressAllow=localhost does not name: no answer comes back.
    let out = scrape("10.9.9.1");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        !answer.contains("spoold_jobs"),
        "a scraper outside the allow list got the metrics:\n{answer}"
    );
    m.sh_ok("systemctl stop spoold");
}
