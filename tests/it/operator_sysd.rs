//! Operator actions by a member of the spool's group, under a real (throwaway) systemd with the packaged unit, sysusers and tmpfiles: each works, and each is in the unit's journal with the caller's uid and the job's ID.
//!
//! The machine gets the built binary as `/usr/bin/spoold` and the files of packaging/ where
//! the Debian package puts them, so the spool has the package's owners and modes and spoold
//! runs in the package's sandbox (`PrivateUsers=yes` among it: the daemon cannot tell who
//! owns a member's file, which is why the client's records carry its uid). A user `op` in
//! group spoold runs every command through `runuser`, as an operator would; a user `outsider`
//! is refused. Where the harness cannot run, the test skips through `util::skip`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sysd::{self, Machine};

const BIN: &str = env!("CARGO_BIN_EXE_spoold");
const SPOOL: &str = "/var/spool/spoold";
/// A generous bound for anything that should happen "soon" on a loaded, shared machine.
const SOON: Duration = Duration::from_secs(60);

/// The handler: a job's first line is `sleep SECONDS`.
const HANDLER: &str = "#!/bin/sh\nset -eu\nset -- $(head -n 1 \"$1\")\nsleep \"$2\"\n";

const CONFIG: &str = r#"[spool]
dir = "/var/spool/spoold"

[workers]
count = 2

[handler]
command = ["/usr/local/lib/spoold-test/handler.sh", "{path}"]
kill_grace = "1s"
"#;

fn packaging(file: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "packaging", file]
        .iter()
        .collect();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls the guest until `cond` (a shell condition) holds, or fails with `what` and the unit's
/// journal.
fn wait_until(m: &Machine, what: &str, cond: &str) {
    let script = format!(
        "end=$(($(date +%s) + {})); until {cond}; do [ $(date +%s) -lt $end ] || exit 1; sleep 0.05; done",
        SOON.as_secs()
    );
    let out = m.sh(&script);
    assert!(
        out.status.success(),
        "waited {SOON:?} for {what} (`{cond}`); journal:\n{}",
        m.sh_ok("journalctl -u spoold --no-pager -o cat | tail -n 40")
    );
}

/// Runs `args` as the user `op` (a member of group spoold); asserts success, returns stdout.
fn as_op(m: &Machine, args: &str) -> String {
    m.sh_ok(&format!("runuser -u op -- spoold {args}"))
}

/// The unit's journal lines with `OPERATOR_UID=uid`: (OPERATOR_ACTION or "", JOB_ID or "",
/// MESSAGE).
fn audit(m: &Machine, uid: &str) -> Vec<(String, String, String)> {
    let out = m.sh_ok(&format!(
        "journalctl --sync 2>/dev/null; journalctl -u spoold OPERATOR_UID={uid} -o json --no-pager"
    ));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let f = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
            (f("OPERATOR_ACTION"), f("JOB_ID"), f("MESSAGE"))
        })
        .collect()
}

/// Asserts that the audit lines hold one for `job` whose message contains `text`.
fn logged(lines: &[(String, String, String)], job: &str, text: &str) {
    assert!(
        lines
            .iter()
            .any(|(_, id, msg)| id == job && msg.contains(text)),
        "no line for job {job:?} saying {text:?} in `journalctl -u spoold OPERATOR_UID=...`:\n{lines:#?}"
    );
}

#[test]
fn a_member_pauses_holds_releases_cancels_and_retries_and_the_journal_names_them() {
    if sysd::skipped(
        "a_member_pauses_holds_releases_cancels_and_retries_and_the_journal_names_them",
    ) {
        return;
    }
    let m = Machine::boot(&[(Path::new(BIN), "/usr/bin/spoold")]);
    m.write(
        "/etc/systemd/system/spoold.service",
        &packaging("spoold.service"),
    );
    m.write(
        "/usr/lib/sysusers.d/spoold.conf",
        &packaging("spoold.sysusers"),
    );
    m.write(
        "/usr/lib/tmpfiles.d/spoold.conf",
        &packaging("spoold.tmpfile"),
    );
    m.write_exec("/usr/local/lib/spoold-test/handler.sh", HANDLER);
    m.write("/etc/spoold/spoold.toml", CONFIG);
    // As the package's postinst does: the user, the spool, the config root:spoold 0640; then
    // op in the group, outsider not.
    m.sh_ok(
        "systemd-sysusers && systemd-tmpfiles --create /usr/lib/tmpfiles.d/spoold.conf \
         && chgrp spoold /etc/spoold/spoold.toml && chmod 0640 /etc/spoold/spoold.toml \
         && useradd -M -G spoold op && useradd -M outsider \
         && systemctl daemon-reload && systemctl start spoold",
    );
    let uid = m.sh_ok("id -u op").trim().to_owned();

    // Pause: nothing submitted afterwards starts.
    as_op(&m, "pause --reason 'maintenance'");
    wait_until(
        &m,
        "the daemon to log the pause",
        &format!("journalctl -u spoold OPERATOR_UID={uid} -o cat | grep -q 'paused by uid {uid}'"),
    );
    // Jobs of root's, not op's: sticky new/ forbids op to move them itself.
    let enqueue = |body: &str| {
        m.sh_ok(&format!("echo '{body}' | spoold enqueue -"))
            .trim()
            .to_owned()
    };
    let a = enqueue("sleep 0");
    let b = enqueue("sleep 0");

    // Hold, release, cancel, retry by the member: each reaches the daemon, which moves the job.
    let out = as_op(&m, &format!("hold {a}"));
    assert!(out.contains("hold requested"), "{out}");
    wait_until(&m, "a held job", &format!("test -f {SPOOL}/hold/{a}"));
    as_op(&m, &format!("release {a}"));
    wait_until(&m, "a released job", &format!("test -f {SPOOL}/new/{a}"));
    as_op(&m, &format!("cancel {a}"));
    wait_until(
        &m,
        "a cancelled job",
        &format!("test -f {SPOOL}/failed/{a}"),
    );
    as_op(&m, &format!("retry {a}"));
    wait_until(&m, "a retried job", &format!("test -f {SPOOL}/new/{a}"));

    // Root moves a job itself; the daemon still logs it, with uid 0.
    m.sh_ok(&format!("spoold hold {b} && spoold release {b}"));

    // Resume, then cancel a running job: its handler's group goes, and it fails for good.
    let c = enqueue("sleep 300");
    as_op(&m, "resume");
    wait_until(
        &m,
        "the long job to start",
        &format!("test -f {SPOOL}/active/{c}"),
    );
    as_op(&m, &format!("cancel {c}"));
    wait_until(
        &m,
        "a cancelled running job",
        &format!("test -f {SPOOL}/failed/{c}"),
    );
    assert_eq!(
        m.sh("pgrep -x sleep").status.code(),
        Some(1),
        "a handler survived"
    );
    wait_until(
        &m,
        "the other jobs to run",
        &format!("test -f {SPOOL}/done/{a} && test -f {SPOOL}/done/{b}"),
    );

    // What an operator searches: the unit's journal, by the member's uid.
    let lines = audit(&m, &uid);
    assert!(
        lines.iter().any(|(action, _, msg)| action == "pause"
            && msg.contains(&format!("paused by uid {uid}: maintenance"))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|(action, _, msg)| action == "resume"
                && msg.contains(&format!("resumed by uid {uid}"))),
        "{lines:#?}"
    );
    logged(&lines, &a, &format!("held by uid {uid}"));
    logged(&lines, &a, &format!("released by uid {uid}"));
    logged(&lines, &a, &format!("cancelled by uid {uid}"));
    logged(&lines, &a, &format!("retried by uid {uid}"));
    logged(
        &lines,
        &c,
        &format!("cancel by uid {uid}: stopping the running handler"),
    );
    let actions: Vec<&str> = lines
        .iter()
        .filter(|(_, id, _)| id == &a)
        .map(|(action, _, _)| action.as_str())
        .filter(|action| !action.is_empty())
        .collect();
    assert_eq!(
        actions,
        ["hold", "release", "cancel", "retry"],
        "{lines:#?}"
    );
    let root = audit(&m, "0");
    logged(&root, &b, "held by uid 0");
    logged(&root, &b, "released by uid 0");

    // With no daemon running, a member's hold waits in control/; the next daemon carries it
    // out before it hands out any job, so the job never starts.
    m.sh_ok("systemctl stop spoold");
    let d = enqueue("sleep 0");
    let out = as_op(&m, &format!("hold {d}"));
    assert!(out.contains("hold requested"), "{out}");
    m.sh_ok(&format!("test -f {SPOOL}/new/{d}"));
    // A pause and a resume while no daemon runs are logged too, when the next one starts.
    as_op(&m, "pause --reason 'while stopped'");
    as_op(&m, "resume");
    m.sh_ok("systemctl start spoold");
    wait_until(
        &m,
        "a job held at start",
        &format!("test -f {SPOOL}/hold/{d}"),
    );
    let lines = audit(&m, &uid);
    logged(&lines, &d, &format!("held by uid {uid}"));
    let count = |action: &str| lines.iter().filter(|(a, _, _)| a == action).count();
    assert_eq!((count("pause"), count("resume")), (2, 2), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|(_, _, msg)| msg == &format!("paused by uid {uid}: while stopped")),
        "{lines:#?}"
    );

    // Someone outside the group is refused, with the file or directory that refused them.
    let out = m.sh(&format!("runuser -u outsider -- spoold hold {b}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/etc/spoold/spoold.toml") && err.contains("spoold"),
        "{err}"
    );
    m.sh_ok("install -m 0644 /etc/spoold/spoold.toml /etc/spoold/public.toml");
    for cmd in ["hold", "release", "retry", "cancel"] {
        let out = m.sh(&format!(
            "runuser -u outsider -- spoold {cmd} --config /etc/spoold/public.toml {b}"
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains(SPOOL) && err.contains("not in group spoold"),
            "{cmd}: {err}"
        );
    }
    assert_eq!(
        m.sh_ok(&format!("ls {SPOOL}/control")).trim(),
        "pause",
        "a request was left behind"
    );
}
