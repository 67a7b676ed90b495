//! The client subcommands (enqueue, status, failed, retry, pause, resume, hold, release,
//! show, cancel, purge, check-config): short-lived, no runtime.
//!
//! The commands work through `source::Admin`, so they name no directory and no on-disk record:
//! only `with_spool` knows that the queue is a spool, because the config says so.

use std::fs::File;
use std::io::{self, BufRead, IsTerminal, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::cli::{Command, FinishedState};
use crate::config::{Config, EX_CONFIG};
use nix::unistd::{Group, User};
use std::time::SystemTime;

use crate::job::{Failure, History, JobId, display_name, escape_bytes, escape_text};
use crate::source::Admin;
use crate::source::admin::{
    Finished, Moved, Operation, OperatorError, Partial, PublishError, Retried, Submission,
    SubmitError, new_job_id, waits_until,
};
use crate::source::spool::{Spool, SpoolError};

/// A line of what an action did, for the operator: unlike `println!`, a reader that went away
/// does not end the command (with a panic) half-way, before the journal record of what it did
/// is written.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stdout(), $($arg)*);
    }};
}

/// Runs a client subcommand and returns the process exit status.
pub fn run(mut command: Command) -> ExitCode {
    match ids_from_stdin(&mut command) {
        Ok(true) => {}
        Ok(false) => {
            println!("no job IDs on standard input; nothing to do");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("spoold: cannot read job IDs from standard input: {e}; nothing was done");
            return ExitCode::FAILURE;
        }
    }
    if let Some(code) = broker_command(&command) {
        return code;
    }
    match command {
        Command::Run(_) => unreachable!("`run` is the daemon, handled in main"),
        Command::CheckConfig { config, path } => {
            check_config(&Command::check_config_path(config, path))
        }
        Command::Enqueue {
            config,
            files,
            delay,
            at,
            ttl,
        } => {
            let timing = match timing(delay.as_deref(), at.as_deref(), ttl.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("spoold: {e}");
                    return ExitCode::from(2);
                }
            };
            with_spool_config(&config.config, Layout::CreateIfOwner, |s, c| {
                let submission = Submission {
                    max_queued: c.spool.max_queued,
                    ..timing
                };
                enqueue(s, &files, &submission)
            })
        }
        Command::Purge {
            config,
            state,
            older_than,
            dry_run,
        } => {
            let age = match crate::config::parse_cli_duration(&older_than) {
                Ok(age) => age,
                Err(e) => {
                    eprintln!("spoold: --older-than: {e}");
                    return ExitCode::from(2);
                }
            };
            let state = match state {
                FinishedState::Done => Finished::Done,
                FinishedState::Failed => Finished::Failed,
            };
            with_spool(&config.config, Layout::Existing, |s| {
                purge(s, state, age, dry_run)
            })
        }
        Command::Status { config, json } => with_spool(&config.config, Layout::Existing, |s| {
            listing(status(s, json))
        }),
        Command::Failed { config, json } => with_spool(&config.config, Layout::Existing, |s| {
            listing(failed(s, json))
        }),
        Command::Retry { config, ids, all } => {
            with_spool(&config.config, Layout::Existing, |s| retry(s, &ids, all))
        }
        // A pause needs no daemon: the client creates the layout as enqueue does, so that a
        // spool can be paused before its first start.
        Command::Pause { config, reason } => {
            with_spool(&config.config, Layout::CreateIfOwner, |s| {
                pause(s, reason.as_deref())
            })
        }
        Command::Resume { config } => with_spool(&config.config, Layout::Existing, resume),
        Command::Hold { config, ids, all } => with_spool(&config.config, Layout::Existing, |s| {
            hold_or_release(s, Action::Hold, &ids, all)
        }),
        Command::Cancel { config, ids } => {
            with_spool(&config.config, Layout::Existing, |s| cancel(s, &ids))
        }
        Command::Release { config, ids, all } => {
            with_spool(&config.config, Layout::Existing, |s| {
                hold_or_release(s, Action::Release, &ids, all)
            })
        }
        Command::Top(config) => {
            // The daemon's metrics endpoint, when its config turns it on: top's rates then come
            // from the daemon's counters. with_spool reports a config that cannot be loaded.
            let metrics = Config::load(&config.config)
                .ok()
                .and_then(|c| c.metrics.listen);
            with_spool(&config.config, Layout::Existing, |s| {
                crate::top::run(s, metrics, std::time::Duration::from_secs(1))
            })
        }
        Command::Show { config, id, json } => {
            let unit = unit_of(&config.config);
            with_spool(&config.config, Layout::Existing, |s| {
                listing(show(s, &id, json, &unit))
            })
        }
    }
}

/// An ID argument `-` stands for the IDs on standard input, one per line, as `postsuper -h -`
/// takes them: `spoold failed | awk ... | spoold retry -`. Blank lines are skipped; each line is
/// an ID in the form `spoold failed` and `spoold enqueue` print, checked like any argument.
/// Returns false when `-` was given and standard input held no ID.
fn ids_from_stdin(command: &mut Command) -> io::Result<bool> {
    let ids = match command {
        Command::Hold { ids, .. }
        | Command::Release { ids, .. }
        | Command::Retry { ids, .. }
        | Command::Cancel { ids, .. } => ids,
        _ => return Ok(true),
    };
    if !ids.iter().any(|id| id == "-") {
        return Ok(true);
    }
    let mut read = Vec::new();
    for id in ids.drain(..) {
        if id != "-" {
            read.push(id);
            continue;
        }
        for line in io::stdin().lock().lines() {
            let line = line?;
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if !line.trim().is_empty() {
                read.push(line.to_owned());
            }
        }
    }
    *ids = read;
    Ok(!ids.is_empty())
}

/// A command against a JetStream queue (`backend.kind = "jetstream"`); None when the config
/// names a spool (or cannot be read: the spool path reports that).
fn broker_command(command: &Command) -> Option<ExitCode> {
    use crate::config::BackendKind;
    use crate::source::jetstream::admin::BrokerAdmin;
    let (config_path, name) = match command {
        Command::Enqueue { config, .. } => (&config.config, "enqueue"),
        Command::Status { config, .. } => (&config.config, "status"),
        Command::Failed { config, .. } => (&config.config, "failed"),
        Command::Retry { config, .. } => (&config.config, "retry"),
        Command::Pause { config, .. } => (&config.config, "pause"),
        Command::Resume { config } => (&config.config, "resume"),
        Command::Hold { config, .. } => (&config.config, "hold"),
        Command::Release { config, .. } => (&config.config, "release"),
        Command::Cancel { config, .. } => (&config.config, "cancel"),
        Command::Show { config, .. } => (&config.config, "show"),
        Command::Purge { config, .. } => (&config.config, "purge"),
        Command::Top(config) => (&config.config, "top"),
        _ => return None,
    };
    let config = Config::load(config_path).ok()?;
    if config.backend.kind != BackendKind::Jetstream {
        return None;
    }
    if !matches!(name, "enqueue" | "status" | "failed" | "retry") {
        eprintln!(
            "spoold: `{name}` works on a spool; it is not available with backend.kind = \
             \"jetstream\" ({})",
            config_path.display()
        );
        return Some(ExitCode::FAILURE);
    }
    let admin = match BrokerAdmin::connect(&config) {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("spoold: {e}");
            return Some(ExitCode::from(e.exit_code()));
        }
    };
    let result = match command {
        // A delay or a time to live needs the daemon's schedule and expiry, which only the
        // spool has so far: refused, and nothing is published.
        Command::Enqueue { delay, at, ttl, .. }
            if delay.is_some() || at.is_some() || ttl.is_some() =>
        {
            eprintln!(
                "spoold: enqueue --in, --at and --ttl work on a spool; they are not available \
                 with backend.kind = \"jetstream\" ({}); nothing was submitted",
                config_path.display()
            );
            return Some(ExitCode::from(2));
        }
        Command::Enqueue { files, .. } if !files.iter().any(|f| f.as_os_str() == "-") => {
            enqueue_many(&admin, files)
        }
        Command::Enqueue { files, .. } => enqueue(&admin, files, &Submission::default()),
        Command::Status { json, .. } => admin.print_status(*json).map(|()| ExitCode::SUCCESS),
        Command::Failed { json, .. } => failed(&admin, *json),
        Command::Retry { ids, all, .. } => retry(&admin, ids, *all),
        _ => unreachable!("only the commands above reach here"),
    };
    Some(result.unwrap_or_else(|e| {
        eprintln!("spoold: {e}");
        ExitCode::FAILURE
    }))
}

/// `enqueue` of files to a JetStream queue, many publishes in flight at once: each ID is
/// printed once the cluster acknowledged its job, in the order of the files, as `enqueue` does.
fn enqueue_many(
    admin: &crate::source::jetstream::admin::BrokerAdmin,
    files: &[PathBuf],
) -> io::Result<ExitCode> {
    use std::io::Read as _;
    let mut generator = ulid::Generator::new();
    let mut code = ExitCode::SUCCESS;
    // Buffered unless a terminal shows it, as C's stdio is: a line at a time would be a write
    // per job. What is buffered is written at the end, a failure or not.
    let stdout = io::stdout();
    let terminal = stdout.is_terminal();
    let mut out = io::BufWriter::new(stdout.lock());
    // The files whose jobs await their fate: `submit_many` tells it in the order given, so the
    // first is always the one a report is about.
    let pending = std::cell::RefCell::new(std::collections::VecDeque::new());
    let mut files = files.iter();
    let mut failed_write = None;
    admin.submit_many(
        || {
            let file = files.next()?;
            let id = new_job_id(&mut generator);
            pending.borrow_mut().push_back(file);
            // Sized from the one fstat that `open_regular` makes: read_to_end on a File would
            // make another to size its buffer.
            let body = open_regular_sized(file).and_then(|(f, len)| {
                let mut body = Vec::with_capacity(len.saturating_add(1));
                f.take(u64::MAX).read_to_end(&mut body).map(|_| body)
            });
            Some((id, body))
        },
        |id, result| {
            let file = pending.borrow_mut().pop_front();
            match result {
                Ok(()) => {
                    let written = writeln!(out, "{id}");
                    if let Err(e) =
                        written.and_then(|()| if terminal { out.flush() } else { Ok(()) })
                    {
                        failed_write.get_or_insert(e);
                    }
                }
                Err(e) => {
                    let file = file.map(|f| shown_path(f)).unwrap_or_default();
                    eprintln!("spoold: {file}: not submitted: {e}");
                    code = ExitCode::FAILURE;
                }
            }
        },
    );
    if let Err(e) = out.flush() {
        failed_write.get_or_insert(e);
    }
    match failed_write {
        Some(e) => Err(e),
        None => Ok(code),
    }
}

fn check_config(path: &Path) -> ExitCode {
    match load_config(path) {
        Ok(config) => {
            if let Err(problem) = crate::runner::handler::check_program(&config.handler) {
                eprintln!(
                    "spoold: warning: {}: {problem}; jobs will fail until that is fixed",
                    path.display()
                );
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Loads the config for a client command. A file this user may not read is a permission
/// problem, not an invalid config: the packaged config is `root:spoold 0640` (it may hold
/// secrets in `handler.env`), so a user outside the group is told how to join it, and the exit
/// status is 1, not 78. Anything else wrong with the file is EX_CONFIG, as for the daemon.
fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        if e.unreadable == Some(io::ErrorKind::PermissionDenied) {
            let hint = rustix::fs::stat(path)
                .map(|st| membership_hint(st.st_gid))
                .unwrap_or_else(|_| "check its mode".to_owned());
            eprintln!(
                "spoold: permission denied on {}: {hint}",
                escape_bytes(path.as_os_str().as_encoded_bytes())
            );
            ExitCode::FAILURE
        } else {
            eprintln!("spoold: {}", e.invalid());
            ExitCode::from(EX_CONFIG)
        }
    })
}

/// What a client command may do about a spool whose layout is missing (no daemon opened it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Only report it.
    Existing,
    /// Create it, when this user owns the spool root (a spool in the user's own directory, as
    /// the example config's). Anyone else would create directories the daemon's user might not
    /// be able to use, so they are told to start the daemon instead.
    CreateIfOwner,
}

fn with_spool(
    config_path: &Path,
    layout: Layout,
    f: impl FnOnce(&Spool) -> io::Result<ExitCode>,
) -> ExitCode {
    with_spool_config(config_path, layout, |s, _| f(s))
}

/// [`with_spool`] for a command that also needs the config.
fn with_spool_config(
    config_path: &Path,
    layout: Layout,
    f: impl FnOnce(&Spool, &Config) -> io::Result<ExitCode>,
) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let root = &config.spool.dir;
    let attached = match Spool::attach(root) {
        Err(SpoolError::NotSetUp { .. }) if layout == Layout::CreateIfOwner && owns(root) => {
            Spool::open(root)
        }
        other => other,
    };
    let spool = match attached {
        Ok(s) => s,
        Err(SpoolError::Denied { path, group }) => {
            eprintln!(
                "spoold: permission denied on {}: {}",
                path.display(),
                membership_hint(group)
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("spoold: {e} (config {})", config_path.display());
            return ExitCode::FAILURE;
        }
    };
    match f(&spool, &config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spoold: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The result of a command that only lists (status, failed, show): a reader that went away
/// (`spoold failed | head`) has all it wanted, as grep's and ripgrep's users expect, and the
/// command succeeded. A command that acts keeps its own status.
fn listing(result: io::Result<ExitCode>) -> io::Result<ExitCode> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        other => other,
    }
}

/// Whether this user owns `path`.
fn owns(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.uid() == rustix::process::geteuid().as_raw())
}

/// Why this user may not use a spool whose root belongs to group `gid`, and what to do, as
/// "user alice is not in group spoold (sudo adduser alice spoold, then log in again)".
fn membership_hint(gid: u32) -> String {
    let uid = rustix::process::geteuid().as_raw();
    let user = User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    let Some(group) = Group::from_gid(gid.into()).ok().flatten() else {
        return format!("user {user} may not use it (its group, gid {gid}, has no name)");
    };
    let in_session = rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups()
            .is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid));
    if in_session {
        // Membership is not the problem: a mode or an ACL was changed by hand.
        format!(
            "user {user} is in group {} but may still not use it: check its mode",
            group.name
        )
    } else if group.mem.contains(&user) {
        format!(
            "user {user} was added to group {0} after this session began: log in again (or run \
             `newgrp {0}`)",
            group.name
        )
    } else {
        format!(
            "user {user} is not in group {0} (sudo adduser {user} {0}, then log in again)",
            group.name
        )
    }
}

/// The exit status of `spoold enqueue` when the queue is full (`spool.max_queued`):
/// EX_TEMPFAIL, "try again later".
const EX_TEMPFAIL: u8 = 75;

/// When the jobs of `spoold enqueue` may start and expire, from `--in`, `--at` and `--ttl`.
fn timing(delay: Option<&str>, at: Option<&str>, ttl: Option<&str>) -> Result<Submission, String> {
    let now = SystemTime::now();
    let not_before = match (delay, at) {
        (Some(d), _) => {
            let d = crate::config::parse_cli_duration(d).map_err(|e| format!("--in: {e}"))?;
            Some(now + d)
        }
        (None, Some(t)) => {
            let when = parse_time(t).map_err(|e| format!("--at {}: {e}", escape_text(t)))?;
            if when <= now {
                return Err(format!(
                    "--at {}: that time is in the past (it is {} now, UTC); give a later one, or \
                     submit without --at to run the job at once",
                    escape_text(t),
                    humantime::format_rfc3339_seconds(now)
                ));
            }
            if when.duration_since(now).unwrap_or_default() > crate::config::MAX_AGE.max {
                return Err(format!(
                    "--at {}: that is more than {} from now",
                    escape_text(t),
                    crate::config::MAX_AGE.text
                ));
            }
            Some(when)
        }
        (None, None) => None,
    };
    let expires = match ttl {
        Some(d) => {
            let d = crate::config::parse_cli_duration(d).map_err(|e| format!("--ttl: {e}"))?;
            Some(not_before.unwrap_or(now) + d)
        }
        None => None,
    };
    Ok(Submission {
        not_before,
        expires,
        max_queued: None,
    })
}

/// An RFC 3339 time: `2026-01-31T18:00:00Z`, with fractions of a second or an offset
/// (`+01:00`) if wanted. A time without a zone is refused: it would be read as UTC, which is
/// not what someone who wrote their local time meant.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    let bad = || {
        "not an RFC 3339 time; write for example 2026-01-31T18:00:00Z or \
         2026-01-31T19:00:00+01:00"
            .to_owned()
    };
    let t = text.trim();
    let (local, offset_s): (&str, i64) = if let Some(rest) = t.strip_suffix(['Z', 'z']) {
        (rest, 0)
    } else if t.len() > 6 && matches!(t.as_bytes()[t.len() - 6], b'+' | b'-') {
        let (rest, zone) = t.split_at(t.len() - 6);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (h, m) = zone[1..].split_once(':').ok_or_else(bad)?;
        let h: i64 = h.parse().map_err(|_| bad())?;
        let m: i64 = m.parse().map_err(|_| bad())?;
        if h > 23 || m > 59 {
            return Err(bad());
        }
        (rest, sign * (h * 3600 + m * 60))
    } else {
        return Err(format!("{}; it needs a zone (Z or +HH:MM)", bad()));
    };
    if !local.contains(['T', 't']) {
        return Err(bad());
    }
    let utc = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let shift = std::time::Duration::from_secs(offset_s.unsigned_abs());
    let when = if offset_s >= 0 {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    };
    when.ok_or_else(bad)
}

/// A path given on the command line, as a message shows it: escaped, since a file name may
/// hold control characters (one a member of the group chose, in a directory root submits).
fn shown_path(path: &Path) -> String {
    escape_bytes(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
}

fn enqueue(queue: &impl Admin, files: &[PathBuf], submission: &Submission) -> io::Result<ExitCode> {
    let partial = Arc::new(Partial::default());
    remove_partial_on_signal(&partial)?;
    let mut generator = ulid::Generator::new();
    let mut code = ExitCode::SUCCESS;
    // Every file is written first; then all are published together (see `Admin::publish`).
    let mut staged: Vec<(String, &PathBuf)> = Vec::with_capacity(files.len());
    for file in files {
        let id = new_job_id(&mut generator);
        let result = if file.as_os_str() == "-" {
            queue.stage(&mut io::stdin().lock(), &id, &partial, submission)
        } else {
            open_regular(file)
                .map_err(SubmitError::Io)
                .and_then(|mut f| queue.stage(&mut f, &id, &partial, submission))
        };
        match result {
            Ok(()) => staged.push((id, file)),
            // Refused by the queue itself, rather than by the file being submitted: say why.
            Err(SubmitError::Denied { err, group }) => {
                eprintln!(
                    "spoold: {}: not submitted: {err}; {}",
                    shown_path(file),
                    membership_hint(group)
                );
                code = ExitCode::FAILURE;
            }
            Err(SubmitError::Io(e)) => {
                eprintln!("spoold: {}: not submitted: {e}", shown_path(file));
                code = ExitCode::FAILURE;
            }
        }
    }
    if staged.is_empty() {
        return Ok(code);
    }
    let ids: Vec<String> = staged.iter().map(|(id, _)| id.clone()).collect();
    let mut out = io::stdout().lock();
    match queue.publish(&ids, &partial, submission) {
        Ok(()) => {
            for id in &ids {
                writeln!(out, "{id}")?;
            }
        }
        Err(PublishError::Full {
            waiting,
            adding,
            limit,
        }) => {
            eprintln!(
                "spoold: the queue is full: {waiting} jobs wait, and spool.max_queued is \
                 {limit}; nothing was submitted ({adding} job{}); try again later",
                if adding == 1 { "" } else { "s" }
            );
            return Ok(ExitCode::from(EX_TEMPFAIL));
        }
        Err(PublishError::Denied { err, group }) => {
            eprintln!(
                "spoold: nothing was submitted: {err}; {}",
                membership_hint(group)
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(PublishError::Io { err, published }) => {
            for id in &ids[..published] {
                writeln!(out, "{id}")?;
            }
            for (_, file) in &staged[published..] {
                eprintln!("spoold: {}: not submitted: {err}", shown_path(file));
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(code)
}

/// Removes (or lists, in a dry run) finished jobs, and logs each removal to the journal with
/// the caller's uid.
fn purge(
    queue: &impl Admin,
    state: Finished,
    age: std::time::Duration,
    dry_run: bool,
) -> io::Result<ExitCode> {
    let before = SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let what = match state {
        Finished::Done => "done",
        Finished::Failed => "failed",
    };
    let purged = match queue.purge(state, before, dry_run) {
        Ok(purged) => purged,
        // A member of the group may read done/ and failed/ but not remove from them: the
        // daemon removes the jobs a dry run lists, for them, and logs it.
        Err(OperatorError::Denied { .. }) if !dry_run => {
            return purge_through_daemon(queue, state, before, what);
        }
        Err(e) => {
            operator_error("nothing purged", e);
            return Ok(ExitCode::FAILURE);
        }
    };
    // Each removal goes to the journal through the daemon, like every operator's action, so
    // that `journalctl -u spoold OPERATOR_UID=...` finds it; root's purge works without a
    // daemon, which logs the record when it next starts. Recorded before anything is printed:
    // a reader that stops early (`| head`) must not cost the record.
    let code = if dry_run {
        ExitCode::SUCCESS
    } else {
        let removed: Vec<JobId> = purged
            .iter()
            .filter_map(|job| JobId::parse(&display_name(&job.name)).ok())
            .collect();
        record_operation(queue, Operation::Purge, &removed, &[]).unwrap_or(ExitCode::SUCCESS)
    };
    let mut out = io::stdout().lock();
    for job in &purged {
        let id = display_name(&job.name);
        let verb = if dry_run {
            "would be removed"
        } else {
            "removed"
        };
        writeln!(out, "{id}: {verb} ({what} since {})", job.finished)?;
    }
    let verb = if dry_run {
        "would be removed"
    } else {
        "removed"
    };
    writeln!(
        out,
        "{} {what} job{} {verb}",
        purged.len(),
        if purged.len() == 1 { "" } else { "s" }
    )?;
    Ok(code)
}

/// A member's purge: lists what is old enough, and asks the daemon to remove those jobs. The
/// daemon removes each only if it is still in `done/` or `failed/` when it acts.
fn purge_through_daemon(
    queue: &impl Admin,
    state: Finished,
    before: SystemTime,
    what: &str,
) -> io::Result<ExitCode> {
    let listed = match queue.purge(state, before, true) {
        Ok(listed) => listed,
        Err(e) => {
            operator_error("nothing purged", e);
            return Ok(ExitCode::FAILURE);
        }
    };
    let asked: Vec<JobId> = listed
        .iter()
        .filter_map(|job| JobId::parse(&display_name(&job.name)).ok())
        .collect();
    for id in &asked {
        println!("{id}: purge requested; {ASKED}");
    }
    println!(
        "{} {what} job{} to be removed by the daemon",
        asked.len(),
        if asked.len() == 1 { "" } else { "s" }
    );
    Ok(record_operation(queue, Operation::Purge, &[], &asked).unwrap_or(ExitCode::SUCCESS))
}

/// Opens a file to submit, refusing anything but a regular file (or a link to one): a FIFO
/// would block without a writer, and a device such as /dev/zero never ends. The open does not
/// block (O_NONBLOCK, which a regular file ignores) and the type is read from the open file,
/// so nothing can swap a FIFO in between.
fn open_regular(path: &Path) -> io::Result<File> {
    open_regular_sized(path).map(|(file, _)| file)
}

/// [`open_regular`], with the file's size when it was opened.
fn open_regular_sized(path: &Path) -> io::Result<(File, usize)> {
    let file = File::options()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok((file, usize::try_from(meta.len()).unwrap_or(usize::MAX)));
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}: only regular files are submitted (use `-` to read standard input)"),
    ))
}

/// O_NONBLOCK | O_NOCTTY, as the raw flags `custom_flags` takes.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32
}

/// Starts a thread that, at SIGINT, SIGTERM or SIGHUP, undoes the submission in progress (the
/// spool removes the file it is writing) and ends the process by that signal, as it would have ended without a handler.
/// The thread does the work rather than a flag checked between reads: the main thread may be
/// blocked in a read of standard input for as long as the writer at the other end likes.
/// SIGXFSZ is caught and ignored, so that a write past the file size limit fails with EFBIG,
/// and the enqueue undoes its submission, instead of the process being killed half-way.
fn remove_partial_on_signal(partial: &Arc<Partial>) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGXFSZ])?;
    let partial = Arc::clone(partial);
    std::thread::Builder::new()
        .name("spoold-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGXFSZ {
                    continue;
                }
                // Held until the process ends, so that no enqueue publishes a job meanwhile.
                let _held = partial.discard();
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                // Only reached if the default action did not end the process.
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

fn status(queue: &impl Admin, json: bool) -> io::Result<ExitCode> {
    let counts = queue.counts()?;
    if json {
        println!("{}", serde_json::to_string(&counts)?);
    } else {
        let age = counts
            .oldest_queued_age_s
            .map(|a| {
                format!(
                    " (oldest waiting {})",
                    humantime::format_duration(std::time::Duration::from_secs(a as u64))
                )
            })
            .unwrap_or_default();
        let (kind, address) = queue.address();
        println!("{kind:<7} {address}");
        match counts.daemon_pid {
            Some(pid) => println!("daemon  running (pid {pid})"),
            None => println!("daemon  not running"),
        }
        match queue.paused()? {
            Some(p) => println!(
                "paused  yes, since {} by uid {}{}",
                escape_text(&p.since),
                p.by_uid,
                p.reason
                    .map(|r| format!(": {}", escape_text(&r)))
                    .unwrap_or_default()
            ),
            None => println!("paused  no"),
        }
        println!("queued  {}{age}", counts.queued);
        println!("active  {}", counts.active);
        println!("retry   {}", counts.retry);
        println!("done    {}", counts.done);
        println!("failed  {}", counts.failed);
        println!("held    {}", counts.held);
        println!("scheduled {}", counts.scheduled);
    }
    Ok(ExitCode::SUCCESS)
}

fn failed(queue: &impl Admin, json: bool) -> io::Result<ExitCode> {
    let jobs = queue.failed()?;
    let mut out = io::stdout().lock();
    if json {
        let list: Vec<_> = jobs
            .iter()
            .map(|j| {
                let mut entry = serde_json::json!({
                    "id": display_name(&j.name),
                    "record": j.history.as_ref().map(history_json),
                });
                if let Some(payload) = &j.payload {
                    entry["payload"] = payload.as_str().into();
                }
                entry
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        writeln!(out, "no failed jobs")?;
    }
    for job in &jobs {
        let id = display_name(&job.name);
        let Some(record) = &job.history else {
            writeln!(out, "{id}\n    (no reason recorded)")?;
            if let Some(payload) = &job.payload {
                writeln!(out, "    payload:  {}", escape_text(payload))?;
            }
            continue;
        };
        let last = record.last_failure.clone().unwrap_or_default();
        writeln!(out, "{id}")?;
        writeln!(out, "    reason:   {}", escape_text(&last.reason))?;
        writeln!(out, "    attempts: {}{}", record.attempts, for_good(record))?;
        if let Some(at) = &record.first_attempt_at {
            writeln!(out, "    first:    {}", escape_text(at))?;
        }
        if let Some(at) = &record.failed_at {
            writeln!(out, "    failed:   {}", escape_text(at))?;
        }
        if last.timed_out {
            writeln!(out, "    timed out: yes")?;
        }
        if let Some(payload) = &job.payload {
            writeln!(out, "    payload:  {}", escape_text(payload))?;
        }
        for line in &last.stderr_tail {
            writeln!(out, "    stderr| {}", escape_text(line))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A history as `spoold failed --json` shows it, under "record": the fields and names of the
/// spool's reason records, which that output has always shown as they are.
fn history_json(h: &History) -> serde_json::Value {
    serde_json::json!({
        "id": h.id,
        "attempts": h.attempts,
        "first_attempt_at": h.first_attempt_at,
        "next_attempt_unix_ms": h.next_attempt_unix_ms,
        "next_attempt_at": h.next_attempt_at,
        "failed_at": h.failed_at,
        "permanent": h.permanent,
        "last_failure": h.last_failure.as_ref().map(failure_json),
    })
}

fn failure_json(f: &Failure) -> serde_json::Value {
    serde_json::json!({
        "attempt": f.attempt,
        "started_at": f.started_at,
        "ended_at": f.ended_at,
        "duration_ms": f.duration_ms,
        "exit_code": f.exit_code,
        "signal": f.signal,
        "timed_out": f.timed_out,
        "reason": f.reason,
        "stderr_tail": f.stderr_tail,
    })
}

fn retry(queue: &impl Admin, ids: &[String], all: bool) -> io::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    // Every argument is checked before anything moves: a typo among many IDs must not leave
    // the operator guessing which of them were acted on.
    let ids: Vec<JobId> = if all {
        let jobs = queue.failed()?;
        if jobs.is_empty() {
            say!("no failed jobs to retry");
            return Ok(code);
        }
        // A cancel is an operator's decision that the job must not run: `--all` (after an
        // outage, say) leaves it, and says so. Named, or read from stdin, it is retried.
        let cancelled = |j: &&crate::source::admin::FailedJob| {
            j.history
                .as_ref()
                .and_then(|h| h.last_failure.as_ref())
                .is_some_and(|f| f.reason == crate::source::spool::CANCELLED)
        };
        let kept = jobs.iter().filter(cancelled).count();
        if kept > 0 {
            say!(
                "{kept} cancelled job{} left in failed/ (name {} to retry {})",
                if kept == 1 { "" } else { "s" },
                if kept == 1 { "it" } else { "them" },
                if kept == 1 { "it" } else { "them" },
            );
        }
        jobs.iter()
            .filter(|j| !cancelled(j))
            .filter_map(|j| JobId::parse(&display_name(&j.name)).ok())
            .collect()
    } else {
        let mut parsed = Vec::with_capacity(ids.len());
        for arg in ids {
            match JobId::parse(arg) {
                Ok(id) => match queue.refuses(&id) {
                    None => parsed.push(id),
                    Some(why) => {
                        eprintln!("spoold: {}: not a job ID: {why}", escape_text(arg));
                        code = ExitCode::FAILURE;
                    }
                },
                Err(e) => {
                    eprintln!("spoold: {e}");
                    code = ExitCode::FAILURE;
                }
            }
        }
        if code != ExitCode::SUCCESS {
            eprintln!("spoold: nothing was retried");
            return Ok(code);
        }
        parsed
    };
    let (mut done, mut asked) = (Vec::new(), Vec::new());
    for id in ids {
        match queue.retry(&id) {
            Ok(Retried::Queued { name, place }) if name == id.as_os_str() => {
                say!("{id}: back in {place}");
                done.push(id);
            }
            Ok(Retried::Queued { name, place }) => {
                say!(
                    "{id}: back in {place} as {} ({place} already held a job of that name)",
                    display_name(&name)
                );
                done.push(id);
            }
            // A member of the group may not move failed jobs: the daemon does it for them.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                say!("{id}: retry requested; {ASKED}");
                asked.push(id);
            }
            Ok(Retried::NoSuchJob) => {
                eprintln!(
                    "spoold: {id}: no failed job of that name{}",
                    elsewhere(queue, &id)
                );
                code = ExitCode::FAILURE;
            }
            Ok(Retried::NotAJob { kind, place }) => {
                eprintln!(
                    "spoold: {id}: not retried: it is {kind}, not a job file; spoold never \
                     follows or opens such an entry (remove it from {place} by hand)"
                );
                code = ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("spoold: {id}: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(record_operation(queue, Operation::Retry, &done, &asked).unwrap_or(code))
}

/// What the client says of a job it asked the daemon to move.
const ASKED: &str = "a running daemon does it within a second, else the next to start";

/// Hands the daemon the record of an operator's action, for its journal (`done`), and the jobs
/// it is asked to act on (`asked`). The daemon writes the journal, not the client: its lines
/// belong to the unit, so `journalctl -u spoold OPERATOR_UID=...` shows every operator's
/// actions, and the moves a member may not make reach the daemon the same way. Returns the
/// failure status when the record could not be written: an action that goes unrecorded, or a
/// request that never reaches the daemon, must not look like a success.
fn record_operation(
    queue: &impl Admin,
    op: Operation,
    done: &[JobId],
    asked: &[JobId],
) -> Option<ExitCode> {
    if done.is_empty() && asked.is_empty() {
        return None;
    }
    record_with_reason(queue, op, None, done, asked)
}

/// [`record_operation`], with the operator's reason (a pause's), and for an action that names
/// no job.
fn record_with_reason(
    queue: &impl Admin,
    op: Operation,
    reason: Option<&str>,
    done: &[JobId],
    asked: &[JobId],
) -> Option<ExitCode> {
    match queue.record_operation(op, reason, done, asked) {
        Ok(()) => None,
        Err(e) => {
            let what = if done.is_empty() && asked.is_empty() {
                format!("{}, but the journal will not show it", op.done_verb())
            } else if asked.is_empty() {
                format!(
                    "{} {} job(s), but the journal will not show it",
                    op.done_verb(),
                    done.len()
                )
            } else {
                format!("{} of {} job(s) not requested", op.name(), asked.len())
            };
            operator_error(&what, e);
            Some(ExitCode::FAILURE)
        }
    }
}

/// Says why an operator action was refused, with what to do about it.
fn operator_error(what: &str, e: OperatorError) {
    match e {
        OperatorError::Denied {
            err,
            root_only: true,
            ..
        } => eprintln!("spoold: {what}: {err}; only root (or the user spoold) may do this"),
        OperatorError::Denied { err, group, .. } => {
            eprintln!("spoold: {what}: {err}; {}", membership_hint(group))
        }
        OperatorError::Io(e) => eprintln!("spoold: {what}: {e}"),
    }
}

fn pause(queue: &impl Admin, reason: Option<&str>) -> io::Result<ExitCode> {
    match queue.pause(reason) {
        Ok((p, true)) => println!(
            "already paused since {} by uid {}; left as it was",
            escape_text(&p.since),
            p.by_uid
        ),
        Ok((_, false)) => {
            println!("paused: no new job starts until `spoold resume`");
            return Ok(
                record_with_reason(queue, Operation::Pause, reason, &[], &[])
                    .unwrap_or(ExitCode::SUCCESS),
            );
        }
        Err(e) => {
            operator_error("not paused", e);
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn resume(queue: &impl Admin) -> io::Result<ExitCode> {
    match queue.resume() {
        Ok(true) => {
            println!("resumed: jobs start again");
            return Ok(record_with_reason(queue, Operation::Resume, None, &[], &[])
                .unwrap_or(ExitCode::SUCCESS));
        }
        Ok(false) => println!("not paused; nothing to do"),
        Err(e) => {
            operator_error("not resumed", e);
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy)]
enum Action {
    Hold,
    Release,
}

fn hold_or_release(
    queue: &impl Admin,
    action: Action,
    ids: &[String],
    all: bool,
) -> io::Result<ExitCode> {
    let (verb, none, op) = match action {
        Action::Hold => ("held", "no waiting job", Operation::Hold),
        Action::Release => ("released", "no held job", Operation::Release),
    };
    // As for retry: every argument is checked before anything moves.
    let ids: Vec<JobId> = if all {
        let ids = match action {
            Action::Hold => queue.waiting()?,
            Action::Release => queue.held()?,
        };
        if ids.is_empty() {
            say!("{none}; nothing {verb}");
            return Ok(ExitCode::SUCCESS);
        }
        ids
    } else {
        let mut parsed = Vec::with_capacity(ids.len());
        let mut bad = false;
        for arg in ids {
            match JobId::parse(arg) {
                Ok(id) => parsed.push(id),
                Err(e) => {
                    eprintln!("spoold: {e}");
                    bad = true;
                }
            }
        }
        if bad {
            eprintln!("spoold: nothing was {verb}");
            return Ok(ExitCode::FAILURE);
        }
        parsed
    };
    let mut code = ExitCode::SUCCESS;
    let (mut done, mut asked) = (Vec::new(), Vec::new());
    // Ctrl-C (or a hang-up) between two moves must not leave the moves made so far without
    // their record: the daemon schedules a released job from it. The signal ends the loop
    // instead, and the record of what was done is written.
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, interrupted.clone())?;
    }
    for id in ids {
        if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("spoold: interrupted; the jobs not named above were not {verb}");
            code = ExitCode::from(130);
            break;
        }
        let result = match action {
            Action::Hold => queue.hold(&id),
            Action::Release => queue.release(&id),
        };
        match result {
            Ok(Moved::To { name, place, until }) if name == id.as_os_str() => {
                say!("{id}: {verb}, in {place}{}", waits_until(until));
                done.push(id);
            }
            Ok(Moved::To { name, place, until }) => {
                say!(
                    "{id}: {verb}, in {place} as {}{} ({place} already held a job of that name)",
                    display_name(&name),
                    waits_until(until)
                );
                done.push(id);
            }
            // A member of the group may not move other members' jobs, nor any that waits for
            // a retry or is held: the daemon does it for them, and logs it.
            Err(OperatorError::Denied { .. }) => {
                say!("{id}: {} requested; {ASKED}", op.name());
                asked.push(id);
            }
            Ok(Moved::NoSuchJob) => {
                eprintln!("spoold: {id}: {none} of that name{}", elsewhere(queue, &id));
                code = ExitCode::FAILURE;
            }
            Err(e) => {
                operator_error(&format!("{id}: not {verb}"), e);
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(record_operation(queue, op, &done, &asked).unwrap_or(code))
}

/// Where a job that an action did not find is instead, for its error line: "; it is running
/// (in active/): `spoold cancel` ends it", say. `ALL`, which postsuper takes for every job, gets
/// the option that does that here.
fn elsewhere(queue: &impl Admin, id: &JobId) -> String {
    if id.as_os_str() == "ALL" {
        return " (for every job: --all)".to_owned();
    }
    match queue.show(id) {
        Ok(Some(job)) if job.place.to_string() == "active/" => {
            "; it is running (in active/): `spoold cancel` ends it".to_owned()
        }
        Ok(Some(job)) => format!("; it is in {}", job.place),
        Ok(None) | Err(_) => String::new(),
    }
}

/// The packaged unit whose config is `config`: `spoold@NAME` for `/etc/spoold/NAME.toml`
/// (`spoold@.service`'s rule), else `spoold`.
fn unit_of(config: &Path) -> String {
    let stem = config.file_stem().and_then(|s| s.to_str());
    match stem {
        Some(name)
            if config.parent() == Some(Path::new("/etc/spoold"))
                && config.extension().is_some_and(|e| e == "toml")
                && name != "spoold"
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) =>
        {
            format!("spoold@{name}")
        }
        _ => "spoold".to_owned(),
    }
}

/// The command that shows a job's log: spoold logs every line of a job with its JOB_ID field,
/// in the journal of `unit`.
fn journalctl_line(unit: &str, id: &str) -> String {
    // Quoted for a shell when the ID holds anything but the characters a ULID is made of.
    let plain = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        format!("journalctl -u {unit} JOB_ID={id}")
    } else {
        format!(
            "journalctl -u {unit} 'JOB_ID={}'",
            id.replace('\'', "'\\''")
        )
    }
}

fn show(queue: &impl Admin, arg: &str, json: bool, unit: &str) -> io::Result<ExitCode> {
    let id = match JobId::parse(arg) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("spoold: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let Some(job) = queue.show(&id)? else {
        eprintln!(
            "spoold: {id}: no job of that ID in the queue (waiting, running, held, done or failed)"
        );
        return Ok(ExitCode::FAILURE);
    };
    let shown = display_name(&job.name);
    let journal = journalctl_line(unit, &shown);
    let history = job.history.clone().unwrap_or_default();
    let failures = if history.failures.is_empty() {
        // A record from a spoold that kept only the last failure.
        history.last_failure.iter().cloned().collect()
    } else {
        history.failures.clone()
    };
    let mut out = io::stdout().lock();
    if json {
        let value = serde_json::json!({
            "id": shown,
            "place": job.place.to_string(),
            "since": job.since,
            "attempts": history.attempts,
            "first_attempt_at": history.first_attempt_at,
            "next_attempt_at": history.next_attempt_at,
            "failed_at": history.failed_at,
            "permanent": history.permanent,
            "reason": history
                .failed_at
                .as_ref()
                .and(history.last_failure.as_ref())
                .map(|last| last.reason.clone()),
            "history": failures.iter().map(failure_json).collect::<Vec<_>>(),
            "record_error": job.record_error,
            "scheduled": job.scheduled,
            "expires_at": history.expires_unix_ms.map(time_of_ms),
            "journalctl": journal,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_shown(&mut out, &shown, &job, &history, &failures, &journal)?;
    Ok(ExitCode::SUCCESS)
}

/// What `failed` and `show` say of a job that failed for good: a permanent exit code is one
/// thing, a cancel or an expiry (also marked permanent: never retried) another.
fn for_good(h: &History) -> &'static str {
    match &h.last_failure {
        _ if !h.permanent => "",
        Some(last) if last.exit_code.is_some() => " (permanent exit code)",
        _ => " (not retried)",
    }
}

/// A time in ms since the epoch as RFC 3339, UTC.
fn time_of_ms(ms: u64) -> String {
    crate::clock::rfc3339_ms(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// `spoold show`'s text: every value escaped for a terminal.
fn print_shown(
    out: &mut impl Write,
    shown: &str,
    job: &crate::source::admin::ShownJob,
    history: &History,
    failures: &[Failure],
    journal: &str,
) -> io::Result<()> {
    writeln!(out, "{shown}")?;
    writeln!(
        out,
        "    place:    {} since {}",
        job.place,
        escape_text(&job.since)
    )?;
    writeln!(
        out,
        "    failed attempts: {}{}",
        history.attempts,
        for_good(history)
    )?;
    // Why it failed, when that was no run of its own (a cancel, an expiry) and so is not
    // among the attempts below.
    if history.failed_at.is_some()
        && let Some(last) = &history.last_failure
    {
        writeln!(out, "    reason:   {}", escape_text(&last.reason))?;
    }
    if let Some(at) = &history.first_attempt_at {
        writeln!(out, "    first:    {}", escape_text(at))?;
    }
    if job.scheduled {
        let at = history.next_attempt_at.as_deref().unwrap_or("?");
        writeln!(out, "    scheduled: not before {}", escape_text(at))?;
    } else if let Some(at) = &history.next_attempt_at {
        writeln!(out, "    next:     {}", escape_text(at))?;
    }
    if let Some(ms) = history.expires_unix_ms {
        writeln!(out, "    expires:  {}", time_of_ms(ms))?;
    }
    if let Some(at) = &history.failed_at {
        writeln!(out, "    failed:   {}", escape_text(at))?;
    }
    if let Some(e) = &job.record_error {
        writeln!(out, "    record:   unreadable: {}", escape_text(e))?;
    }
    // A cancel or an expiry is recorded as a failure with no start: it was no run.
    for f in failures.iter().filter(|f| !f.started_at.is_empty()) {
        let status = match (f.exit_code, f.signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no exit status".to_owned(),
        };
        writeln!(
            out,
            "    attempt {}: started {}, {} ms, {status}{}: {}",
            f.attempt,
            escape_text(&f.started_at),
            f.duration_ms,
            if f.timed_out { ", timed out" } else { "" },
            escape_text(&f.reason)
        )?;
        for line in &f.stderr_tail {
            writeln!(out, "        stderr| {}", escape_text(line))?;
        }
    }
    writeln!(out, "    log:      {}", escape_text(journal))?;
    Ok(())
}

/// Asks for each job to be cancelled. As for retry, every argument is checked before any
/// request is written.
fn cancel(queue: &impl Admin, ids: &[String]) -> io::Result<ExitCode> {
    let mut parsed = Vec::with_capacity(ids.len());
    for arg in ids {
        match JobId::parse(arg) {
            Ok(id) => parsed.push(id),
            Err(e) => eprintln!("spoold: {e}"),
        }
    }
    if parsed.len() != ids.len() {
        eprintln!("spoold: nothing was cancelled");
        return Ok(ExitCode::FAILURE);
    }
    let mut code = ExitCode::SUCCESS;
    for id in parsed {
        match queue.cancel(&id) {
            Ok(true) => say!(
                "{id}: cancel requested; a running daemon acts on it within a second, else the \
                 next to start"
            ),
            Ok(false) => {
                eprintln!(
                    "spoold: {id}: no waiting, held or running job of that name{}",
                    elsewhere(queue, &id)
                );
                code = ExitCode::FAILURE;
            }
            Err(e) => {
                operator_error(&format!("{id}: not cancelled"), e);
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_names_the_unit_whose_config_it_read() {
        let unit = |p: &str| unit_of(Path::new(p));
        assert_eq!(unit("/etc/spoold/spoold.toml"), "spoold");
        assert_eq!(unit("/etc/spoold/mail.toml"), "spoold@mail");
        assert_eq!(unit("config/spoold.toml"), "spoold");
        assert_eq!(unit("/etc/spoold/odd name.toml"), "spoold");
        assert_eq!(
            journalctl_line("spoold@mail", "01ABC"),
            "journalctl -u spoold@mail JOB_ID=01ABC"
        );
    }
}
