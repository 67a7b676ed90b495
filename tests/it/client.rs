//! The client commands as an operator runs them, often as root: an ID is never a path, and
//! nothing a job or its handler wrote can drive the terminal of whoever reads the output.

use std::fs;
use std::os::unix::fs::symlink;

use crate::util::{Env, describe};

/// A spool with one failed job (`bad`) and one done job (`good`), and no daemon running.
fn spool_with_a_failed_job() -> Env {
    let env = Env::new(
        &["/bin/sh", "-c", "grep -q good \"$SPOOLD_JOB_PATH\""],
        "[retry]\nmax_attempts = 1\n",
    );
    let mut d = env.start();
    env.submit("bad", "bad input");
    env.submit("good", "good input");
    d.wait_until(
        "the jobs to settle: failed/ to hold 1 and done/ to hold 1",
        || env.count("failed") == 1 && env.count("done") == 1,
    );
    d.stop();
    env
}

/// Every path given where an ID belongs is refused before anything moves: a file outside the
/// spool, a tab-completed path to a failed job, and a path into a sibling directory.
#[test]
fn retry_refuses_a_path_and_touches_nothing() {
    let env = spool_with_a_failed_job();
    let outside = env.dir.path().join("elsewhere");
    fs::create_dir(&outside).unwrap();
    let decoy = outside.join("decoy.txt");
    fs::write(&decoy, "not a job").unwrap();
    let failed_path = env.path("failed").join("bad");
    let before = listing(&env, &outside);

    let cases = [
        (decoy.display().to_string(), None),
        (failed_path.display().to_string(), Some("spoold retry bad")),
        ("../done/good".to_owned(), Some("spoold retry good")),
        ("..".to_owned(), None),
        (".".to_owned(), None),
        ("bad\\x2f..".to_owned(), None),
        ("bad\\x00".to_owned(), None),
    ];
    for (arg, hint) in cases {
        let out = env.cli(&["retry", &arg]);
        let shown = describe(&out);
        assert_eq!(out.status.code(), Some(1), "retry {arg:?}: {shown}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not a job ID"), "retry {arg:?}: {shown}");
        if let Some(hint) = hint {
            let id = hint.rsplit(' ').next().unwrap();
            assert!(
                stderr.contains(&format!("the ID here is {id}")),
                "retry {arg:?} gives no hint: {shown}"
            );
        }
        assert!(
            out.stdout.is_empty(),
            "retry {arg:?} reported success: {shown}"
        );
        assert_eq!(
            listing(&env, &outside),
            before,
            "retry {arg:?} changed something"
        );
    }
    assert_eq!(fs::read_to_string(&decoy).unwrap(), "not a job");
    // A bad ID among good ones: nothing moves, so the operator need not guess what happened.
    let out = env.cli(&["retry", "bad", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(listing(&env, &outside), before);
    // The job's own ID still works, and its reason does not stay behind.
    let out = env.cli(&["retry", "bad"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(env.names("new"), ["bad".to_owned()].into());
    assert_eq!(env.count("failed") + env.count("reasons"), 0);
}

/// A link in failed/ named like a job is not followed: neither it nor its target moves.
#[test]
fn retry_does_not_follow_a_link_in_failed() {
    let env = spool_with_a_failed_job();
    let target = env.dir.path().join("secret");
    fs::write(&target, "keep me").unwrap();
    symlink(&target, env.path("failed").join("01JLINK")).unwrap();

    for args in [&["retry", "01JLINK"][..], &["retry", "--all"]] {
        let out = env.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("a symbolic link"),
            "{args:?}: {}",
            describe(&out)
        );
        assert!(fs::symlink_metadata(env.path("failed").join("01JLINK")).is_ok());
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        assert!(!env.names("new").contains("01JLINK"), "the link moved");
    }
    // --all still retried the real job.
    assert_eq!(env.names("new"), ["bad".to_owned()].into());
}

#[test]
fn retry_all_with_nothing_failed_says_so() {
    let env = Env::new(&["/bin/true"], "");
    env.start().stop();
    let out = env.cli(&["retry", "--all"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no failed jobs to retry"),
        "{}",
        describe(&out)
    );
}

/// A handler whose stderr holds terminal escape sequences (a job from an untrusted producer is
/// enough) cannot set the title, clear the screen or hide text for whoever runs `spoold failed`
/// or `spoold status`; `--json` keeps the exact text, as valid JSON.
#[test]
fn failed_and_status_escape_what_a_handler_wrote() {
    let payload = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\r\u{9b}1A\u{202e}gpj.exe";
    let env = Env::new(
        &[
            "/bin/sh",
            "-c",
            "printf '\\033]0;PWNED\\007\\033[2J\\033[31mred\\r\\302\\2331A\\342\\200\\256gpj.exe\\n\\377end\\n' >&2; exit 3",
        ],
        "[retry]\nmax_attempts = 1\n",
    );
    let mut d = env.start();
    env.submit("job\x1b[2Jname", "x");
    d.wait_until("failed/ to hold 1", || env.count("failed") == 1);
    d.stop();

    let out = env.cli(&["failed"]);
    assert!(out.status.success(), "{}", describe(&out));
    let shown = String::from_utf8(out.stdout.clone()).expect("the output is UTF-8");
    for c in shown.chars() {
        assert!(
            c == '\n' || !(c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
            "`spoold failed` printed {c:?}:\n{shown}"
        );
    }
    assert!(shown.contains("\\u{1b}]0;PWNED\\u{7}\\u{1b}[2J"), "{shown}");
    assert!(shown.contains("job\\u{1b}[2Jname"), "{shown}");
    assert!(shown.contains("\\u{202e}gpj.exe"), "{shown}");

    let out = env.cli(&["failed", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let tail = list[0]["record"]["last_failure"]["stderr_tail"][0]
        .as_str()
        .unwrap();
    assert_eq!(tail, payload, "--json keeps the exact text");
}

/// `spoold status` shows the spool's path, which may hold any byte: it is escaped too.
#[test]
fn status_escapes_the_spool_path() {
    let env = Env::new(&["/bin/true"], "");
    let odd = env.dir.path().join("spool\x1b]0;PWNED\x07");
    fs::create_dir(&odd).unwrap();
    let config = env.dir.path().join("odd.toml");
    fs::write(
        &config,
        format!(
            "[spool]\ndir = {}\n[handler]\ncommand = [\"/bin/true\"]\n",
            // TOML spells the escapes \u001b, where Rust's {:?} gives \u{1b}.
            format!("{:?}", odd.display().to_string())
                .replace("\\u{1b}", "\\u001b")
                .replace("\\u{7}", "\\u0007")
        ),
    )
    .unwrap();
    let mut d = crate::util::Daemon::start(&config, &[]);
    d.stop();
    let out = std::process::Command::new(crate::util::BIN)
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let shown = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "{}",
        describe(&out)
    );
    assert!(
        shown.contains("spool\\u{1b}]0;PWNED\\u{7}"),
        "{}",
        describe(&out)
    );
}

/// The names in `dir` and in every spool directory, to show that nothing moved.
fn listing(env: &Env, dir: &std::path::Path) -> Vec<String> {
    let mut all: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for sub in [
        "new", "active", "retry", "done", "failed", "state", "reasons",
    ] {
        all.extend(env.names(sub).into_iter().map(|n| format!("{sub}/{n}")));
    }
    all.sort();
    all
}

/// `spoold enqueue` names a file it refuses with the name escaped: a file named with terminal
/// escape sequences (one a member of the group left in a directory root submits from) cannot
/// drive root's terminal through the message.
#[test]
fn enqueue_escapes_the_name_of_a_file_it_refuses() {
    let env = Env::new(&["/bin/true"], "");
    let fifo = env.dir.path().join("job\x1b]0;owned\x07\x1b[2J");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = env.cli(&["enqueue", fifo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not submitted"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
    assert!(err.contains("\\u{1b}"), "{err:?}");
}
