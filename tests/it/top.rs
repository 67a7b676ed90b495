//! `spoold top` in a real terminal: tmux runs it in a detached session of a fixed size, the
//! test reads the screen as a person would (`tmux capture-pane -p`), presses `q`, and checks that
//! it exited and gave the terminal back (the main screen, cooked mode).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::{self, BIN, Env, SOON, describe, wait_for};

/// A tmux server of the test's own (its own socket), killed when the test ends.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux")
    }

    /// The text on the screen of the session's pane.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Waits until the screen shows everything in `want`; returns the screen, or panics with it.
    #[track_caller]
    fn wait_screen(&self, what: &str, want: &[&str]) -> String {
        let mut last = String::new();
        wait_for(SOON, || {
            last = self.screen();
            want.iter().all(|w| last.contains(w)).then(|| last.clone())
        })
        .unwrap_or_else(|| panic!("the screen never showed {what} ({want:?}); it shows:\n{last}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// A spool with one worker whose handler runs until the file `go` exists; metrics on a free
/// loopback port.
fn top_env() -> Env {
    let env = Env::new(&["/bin/true"], "");
    let dir = env.dir.path().display().to_string();
    let h = env.script(
        "handler.sh",
        &format!("while [ ! -e {dir}/go ]; do sleep 0.05; done"),
    );
    let port = util::free_port();
    env.write_config(
        &[&h],
        &format!("[workers]\ncount = 1\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    env
}

/// top shows the counts per state, the running job with its attempt (its name escaped: it
/// holds an escape sequence), the oldest queued job and the pause; `q` ends it with status 0
/// and gives back the main screen in cooked mode. Its rates come from the daemon's counters
/// while the daemon runs, and from the spool once it is gone. As root, the test runs top as a user who is
/// only a member of the spool's group (nobody, in group nogroup, the spool's group), as the
/// packaged spool's readers are: it needs no root and only reads.
#[test]
fn top_shows_states_running_job_and_pause_and_q_quits() {
    let test = "top::top_shows_states_running_job_and_pause_and_q_quits";
    if Command::new("tmux").arg("-V").output().is_err() {
        return util::skip(test, "tmux is not installed (apt-get install tmux)");
    }
    let env = top_env();
    let mut daemon = env.start();
    env.submit("run-\x1b[31m-1", "x");
    daemon.wait_until("the first job to run", || env.names("active").len() == 1);
    let out = env.cli(&["pause", "--reason", "top test"]);
    assert!(out.status.success(), "{}", describe(&out));
    env.submit("queued-1", "x");
    env.submit("queued-2", "x");
    let later = env.dir.path().join("later");
    fs::write(&later, "x").unwrap();
    let out = env.cli(&["enqueue", "--in", "1h", later.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));

    let as_member = if util::is_root() {
        member_of_the_spool_group(&env);
        "setpriv --reuid=65534 --regid=65534 --clear-groups "
    } else {
        ""
    };
    // The wrapper prints how top ended and the terminal's mode after it, then stays, so that
    // the pane can be read once top is gone.
    let wrapper = env.script(
        "top.sh",
        &format!(
            "{as_member}{BIN} top --config {}\necho \"top exited $?\"\nstty -a\nsleep 600",
            env.config.display()
        ),
    );
    let tmux = session(&env, &wrapper, 120);

    let screen = tmux.wait_screen(
        "the counts, the running job and the pause",
        &[
            "spoold top",
            "queued 2",
            "active 1",
            "scheduled 1",
            "held 0",
            "done 0",
            "failed 0",
            "Running (1)",
            "run-\\u{1b}[31m-1",
            "oldest queued: queued-",
            "PAUSED since",
            "top test",
            "Last minute (daemon)",
            "cancelled",
        ],
    );
    let row = screen
        .lines()
        .find(|l| l.contains("run-\\u{1b}"))
        .expect("the running job's row");
    assert!(
        row.split_whitespace().any(|w| w == "1"),
        "attempt 1 in its row: {row:?}"
    );
    assert!(
        !screen.contains('\x1b'),
        "a raw escape reached the screen:\n{screen}"
    );
    // The refresh goes on: the resume shows within a few seconds.
    let out = env.cli(&["resume"]);
    assert!(out.status.success(), "{}", describe(&out));
    tmux.wait_screen("the end of the pause", &["running: not paused"]);

    // The jobs finish: the daemon's done counter rises, and so does its rate.
    std::fs::write(env.dir.path().join("go"), "").unwrap();
    let mut last = String::new();
    let rising = wait_for(SOON, || {
        last = tmux.screen();
        // The rate's row reads "done      0.05/s"; the counts' row "done 3".
        let words: Vec<&str> = last
            .split(|c: char| c.is_whitespace() || c == '│')
            .filter(|w| !w.is_empty())
            .collect();
        words
            .windows(2)
            .any(|w| w[0] == "done" && w[1].ends_with("/s") && w[1] != "0.00/s")
            .then_some(())
    });
    assert!(rising.is_some(), "no done rate above zero:\n{last}");
    // Without a daemon, the rates come from the spool's counts.
    daemon.stop();
    tmux.wait_screen(
        "the spool's rates once the daemon is gone",
        &["Last minute (spool)", "no daemon running", "done 3"],
    );

    let out = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(out.status.success(), "{}", describe(&out));
    // "echoke" is on the last line `stty -a` prints ("-echoke" too): the whole listing is there.
    let screen = tmux.wait_screen("top's exit", &["top exited 0", "echoke"]);
    assert!(
        !screen.contains("spoold top") && !screen.contains("Running ("),
        "the main screen is not back:\n{screen}"
    );
    // `stty -a` lists "icanon" and "echo" in cooked mode, "-icanon" and "-echo" in raw mode.
    let words: Vec<&str> = screen.split_whitespace().collect();
    assert!(
        words.contains(&"icanon") && words.contains(&"echo"),
        "the terminal was left raw:\n{screen}"
    );
}

/// A tmux session named `top`, `width` columns by 30 rows, that runs `wrapper`.
fn session(env: &Env, wrapper: &str, width: u16) -> Tmux {
    let tmux = Tmux::new(env.dir.path());
    let width = width.to_string();
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        &width,
        "-y",
        "30",
        wrapper,
    ]);
    assert!(out.status.success(), "tmux: {}", describe(&out));
    tmux
}

/// Gives the spool to group nogroup (65534) the way the package gives it to group spoold: the
/// directories group-readable and setgid, so that what the daemon (root here) creates stays in
/// the group, and nothing for others. The test's directory and config become reachable.
fn member_of_the_spool_group(env: &Env) {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    chmod(env.dir.path(), 0o755).unwrap();
    chmod(&env.config, 0o644).unwrap();
    let out = Command::new("chgrp")
        .args(["-R", "65534"])
        .arg(&env.spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "chgrp: {}", describe(&out));
    let out = Command::new("chmod")
        .args(["-R", "g+rX,o-rwx"])
        .arg(&env.spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "chmod: {}", describe(&out));
    let out = Command::new("find")
        .arg(&env.spool)
        .args(["-type", "d", "-exec", "chmod", "g+s", "{}", "+"])
        .output()
        .unwrap();
    assert!(out.status.success(), "chmod g+s: {}", describe(&out));
}

/// A SIGHUP sent by hand, with the terminal still there, ends top as a hangup does (status
/// 129), and gives the terminal back its modes and its main screen. Before, top exited with
/// the terminal left raw, on the alternate screen.
#[test]
fn top_restores_the_terminal_on_a_sighup_sent_by_hand() {
    let test = "top::top_restores_the_terminal_on_a_sighup_sent_by_hand";
    if Command::new("tmux").arg("-V").output().is_err() {
        return util::skip(test, "tmux is not installed (apt-get install tmux)");
    }
    let env = top_env();
    let mut daemon = env.start();
    daemon.wait_until("the spool's layout", || env.path("control").is_dir());
    let pid_file = env.dir.path().join("top.pid");
    let wrapper = env.script(
        "top.sh",
        &format!(
            "sh -c 'echo $$ > {}; exec {BIN} top --config {}'\necho \"top exited $?\"\nstty -a\n\
             sleep 600",
            pid_file.display(),
            env.config.display()
        ),
    );
    let tmux = session(&env, &wrapper, 120);
    tmux.wait_screen("top's view", &["spoold top", "q quits"]);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let out = Command::new("kill")
        .args(["-HUP", pid.trim()])
        .output()
        .unwrap();
    assert!(out.status.success(), "kill -HUP: {}", describe(&out));
    let screen = tmux.wait_screen("top's exit", &["top exited 129", "echoke"]);
    assert!(
        !screen.contains("spoold top"),
        "the main screen is not back:\n{screen}"
    );
    let words: Vec<&str> = screen.split_whitespace().collect();
    assert!(
        words.contains(&"icanon") && words.contains(&"echo"),
        "the terminal was left raw:\n{screen}"
    );
    let _ = tmux.run(&["kill-server"]);
    daemon.stop();
}

/// When its terminal goes away (the window closed, the ssh or tmux session ended), top ends at
/// once instead of living on without a terminal: the kernel's SIGHUP ends it, with the status
/// of a process ended by that signal.
#[test]
fn top_ends_when_its_terminal_hangs_up() {
    let test = "top::top_ends_when_its_terminal_hangs_up";
    if Command::new("tmux").arg("-V").output().is_err() {
        return util::skip(test, "tmux is not installed (apt-get install tmux)");
    }
    let env = top_env();
    // The daemon sets the spool up; top reads it.
    let mut daemon = env.start();
    daemon.wait_until("the spool's layout", || env.path("control").is_dir());
    let pid_file = env.dir.path().join("top.pid");
    // The shell becomes top (exec), so the pid it writes is top's.
    let wrapper = env.script(
        "top.sh",
        &format!(
            "echo $$ > {}\nexec {BIN} top --config {}",
            pid_file.display(),
            env.config.display()
        ),
    );
    let tmux = session(&env, &wrapper, 100);
    tmux.wait_screen("top's view", &["spoold top", "q quits"]);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = tmux.run(&["kill-server"]);
    assert!(out.status.success(), "tmux kill-server: {}", describe(&out));
    // Gone, or a zombie that nobody has reaped yet: either way it has ended.
    let ended = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    };
    let gone = wait_for(SOON, || ended().then_some(()));
    if gone.is_none() {
        // Not left spinning behind the failed test.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("top (pid {pid}) lived on after its terminal hung up");
    }
    daemon.stop();
}
