//! The client subcommands (enqueue, status, failed, retry, pause, resume, hold, release,
//! show, cancel, check-config): short-lived, no runtime.
//!
//! The commands work through `source::Admin`, so they name no directory and no on-disk record:
//! only `with_spool` knows that the queue is a spool, because the config says so.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::cli::Command;
use crate::config::{Config, EX_CONFIG};
use nix::unistd::{Group, User};

use crate::job::{Failure, History, JobId, display_name, escape_bytes, escape_text};
use crate::source::Admin;
use crate::source::admin::{Moved, OperatorError, Partial, Retried, SubmitError, new_job_id};
use crate::source::spool::{Spool, SpoolError};

/// Runs a client subcommand and returns the process exit status.
pub fn run(command: Command) -> ExitCode {
    if let Some(code) = broker_command(&command) {
        return code;
    }
    match command {
        Command::Run(_) => unreachable!("`run` is the daemon, handled in main"),
        Command::CheckConfig { config, path } => {
            check_config(&Command::check_config_path(config, path))
        }
        Command::Enqueue { config, files } => {
            with_spool(&config.config, Layout::CreateIfOwner, |s| {
                enqueue(s, &files)
            })
        }
        Command::Status { config, json } => {
            with_spool(&config.config, Layout::Existing, |s| status(s, json))
        }
        Command::Failed { config, json } => {
            with_spool(&config.config, Layout::Existing, |s| failed(s, json))
        }
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
        Command::Show { config, id, json } => {
            with_spool(&config.config, Layout::Existing, |s| show(s, &id, json))
        }
    }
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
        Command::Enqueue { files, .. } if !files.iter().any(|f| f.as_os_str() == "-") => {
            enqueue_many(&admin, files)
        }
        Command::Enqueue { files, .. } => enqueue(&admin, files),
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
    let mut out = io::stdout().lock();
    // Which file each ID came from, for the error of a job not submitted.
    let names = std::cell::RefCell::new(std::collections::HashMap::new());
    let mut files = files.iter();
    let mut failed_write = None;
    admin.submit_many(
        || {
            let file = files.next()?;
            let id = new_job_id(&mut generator);
            names.borrow_mut().insert(id.clone(), file.clone());
            let body = open_regular(file).and_then(|mut f| {
                let mut body = Vec::new();
                f.read_to_end(&mut body).map(|_| body)
            });
            Some((id, body))
        },
        |id, result| match result {
            Ok(()) => {
                names.borrow_mut().remove(id);
                if let Err(e) = writeln!(out, "{id}") {
                    failed_write.get_or_insert(e);
                }
            }
            Err(e) => {
                let file = names
                    .borrow_mut()
                    .remove(id)
                    .map(|f| f.display().to_string())
                    .unwrap_or_default();
                eprintln!("spoold: {file}: not submitted: {e}");
                code = ExitCode::FAILURE;
            }
        },
    );
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
    match f(&spool) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spoold: {e}");
            ExitCode::FAILURE
        }
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

fn enqueue(queue: &impl Admin, files: &[PathBuf]) -> io::Result<ExitCode> {
    let partial = Arc::new(Partial::default());
    remove_partial_on_signal(&partial)?;
    let mut generator = ulid::Generator::new();
    let mut code = ExitCode::SUCCESS;
    let mut out = io::stdout().lock();
    for file in files {
        let id = new_job_id(&mut generator);
        let result = if file.as_os_str() == "-" {
            queue.submit(&mut io::stdin().lock(), &id, &partial)
        } else {
            open_regular(file)
                .map_err(SubmitError::Io)
                .and_then(|mut f| queue.submit(&mut f, &id, &partial))
        };
        match result {
            Ok(()) => writeln!(out, "{id}")?,
            // Refused by the queue itself, rather than by the file being submitted: say why.
            Err(SubmitError::Denied { err, group }) => {
                eprintln!(
                    "spoold: {}: not submitted: {err}; {}",
                    file.display(),
                    membership_hint(group)
                );
                code = ExitCode::FAILURE;
            }
            Err(SubmitError::Io(e)) => {
                eprintln!("spoold: {}: not submitted: {e}", file.display());
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

/// Opens a file to submit, refusing anything but a regular file (or a link to one): a FIFO
/// would block without a writer, and a device such as /dev/zero never ends. The open does not
/// block (O_NONBLOCK, which a regular file ignores) and the type is read from the open file,
/// so nothing can swap a FIFO in between.
fn open_regular(path: &Path) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
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
                serde_json::json!({
                    "id": display_name(&j.name),
                    "record": j.history.as_ref().map(history_json),
                })
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
            continue;
        };
        let last = record.last_failure.clone().unwrap_or_default();
        writeln!(out, "{id}")?;
        writeln!(out, "    reason:   {}", escape_text(&last.reason))?;
        writeln!(
            out,
            "    attempts: {}{}",
            record.attempts,
            if record.permanent {
                " (permanent exit code)"
            } else {
                ""
            }
        )?;
        if let Some(at) = &record.first_attempt_at {
            writeln!(out, "    first:    {}", escape_text(at))?;
        }
        if let Some(at) = &record.failed_at {
            writeln!(out, "    failed:   {}", escape_text(at))?;
        }
        if last.timed_out {
            writeln!(out, "    timed out: yes")?;
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
            println!("no failed jobs to retry");
            return Ok(code);
        }
        jobs.into_iter()
            .filter_map(|j| JobId::parse(&display_name(&j.name)).ok())
            .collect()
    } else {
        let mut parsed = Vec::with_capacity(ids.len());
        for arg in ids {
            match JobId::parse(arg) {
                Ok(id) => parsed.push(id),
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
    for id in ids {
        match queue.retry(&id) {
            Ok(Retried::Queued { name, place }) if name == id.as_os_str() => {
                println!("{id}: back in {place}")
            }
            Ok(Retried::Queued { name, place }) => println!(
                "{id}: back in {place} as {} ({place} already held a job of that name)",
                display_name(&name)
            ),
            Ok(Retried::NoSuchJob) => {
                eprintln!("spoold: {id}: no failed job of that name");
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
    Ok(code)
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
        Ok((_, false)) => println!("paused: no new job starts until `spoold resume`"),
        Err(e) => {
            operator_error("not paused", e);
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn resume(queue: &impl Admin) -> io::Result<ExitCode> {
    match queue.resume() {
        Ok(true) => println!("resumed: jobs start again"),
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
    let (verb, none) = match action {
        Action::Hold => ("held", "no waiting job"),
        Action::Release => ("released", "no held job"),
    };
    // As for retry: every argument is checked before anything moves.
    let ids: Vec<JobId> = if all {
        let ids = match action {
            Action::Hold => queue.waiting()?,
            Action::Release => queue.held()?,
        };
        if ids.is_empty() {
            println!("{none}; nothing {verb}");
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
    for id in ids {
        let result = match action {
            Action::Hold => queue.hold(&id),
            Action::Release => queue.release(&id),
        };
        match result {
            Ok(Moved::To { name, place }) if name == id.as_os_str() => {
                println!("{id}: {verb}, in {place}")
            }
            Ok(Moved::To { name, place }) => println!(
                "{id}: {verb}, in {place} as {} ({place} already held a job of that name)",
                display_name(&name)
            ),
            Ok(Moved::NoSuchJob) => {
                eprintln!("spoold: {id}: {none} of that name");
                code = ExitCode::FAILURE;
            }
            Err(e) => {
                operator_error(&format!("{id}: not {verb}"), e);
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

/// The command that shows a job's log: spoold logs every line of a job with its JOB_ID field.
/// The unit is the packaged one; an instance unit (`spoold@NAME`) is named the same way.
fn journalctl_line(id: &str) -> String {
    // Quoted for a shell when the ID holds anything but the characters a ULID is made of.
    let plain = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        format!("journalctl -u spoold JOB_ID={id}")
    } else {
        format!(
            "journalctl -u spoold 'JOB_ID={}'",
            id.replace('\'', "'\\''")
        )
    }
}

fn show(queue: &impl Admin, arg: &str, json: bool) -> io::Result<ExitCode> {
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
    let journal = journalctl_line(&shown);
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
            "history": failures.iter().map(failure_json).collect::<Vec<_>>(),
            "record_error": job.record_error,
            "journalctl": journal,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_shown(&mut out, &shown, &job, &history, &failures, &journal)?;
    Ok(ExitCode::SUCCESS)
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
        if history.permanent {
            " (permanent exit code)"
        } else {
            ""
        }
    )?;
    if let Some(at) = &history.first_attempt_at {
        writeln!(out, "    first:    {}", escape_text(at))?;
    }
    if let Some(at) = &history.next_attempt_at {
        writeln!(out, "    next:     {}", escape_text(at))?;
    }
    if let Some(at) = &history.failed_at {
        writeln!(out, "    failed:   {}", escape_text(at))?;
    }
    if let Some(e) = &job.record_error {
        writeln!(out, "    record:   unreadable: {}", escape_text(e))?;
    }
    for f in failures {
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
            Ok(true) => println!(
                "{id}: cancel requested; a running daemon acts on it within a second, else the \
                 next to start"
            ),
            Ok(false) => {
                eprintln!("spoold: {id}: no waiting, held or running job of that name");
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
