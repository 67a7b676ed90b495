//! The client subcommands (enqueue, status, failed, retry, check-config): short-lived, no runtime.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::Config;
use crate::job::{JobId, display_name, escape_bytes, escape_text};
use crate::spool::{self, Retried, Spool};

const EX_CONFIG: u8 = 78;

/// Runs a client subcommand and returns the process exit status.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Run(_) => unreachable!("`run` is the daemon, handled in main"),
        Command::CheckConfig { path } => check_config(&path),
        Command::Enqueue { config, files } => with_spool(&config.config, |s| enqueue(s, &files)),
        Command::Status { config, json } => with_spool(&config.config, |s| status(s, json)),
        Command::Failed { config, json } => with_spool(&config.config, |s| failed(s, json)),
        Command::Retry { config, ids, all } => with_spool(&config.config, |s| retry(s, &ids, all)),
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            if !crate::handler::program_exists(&config.handler.command[0]) {
                eprintln!(
                    "spoold: warning: {}: handler program {} is not found (jobs will fail until it exists)",
                    path.display(),
                    config.handler.command[0]
                );
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spoold: invalid config {e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

fn with_spool(config: &Path, f: impl FnOnce(&Spool) -> io::Result<ExitCode>) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spoold: invalid config {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let spool = match Spool::attach(&config.spool.dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("spoold: {e}");
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

fn enqueue(spool: &Spool, files: &[std::path::PathBuf]) -> io::Result<ExitCode> {
    let mut generator = ulid::Generator::new();
    let mut code = ExitCode::SUCCESS;
    let mut out = io::stdout().lock();
    for file in files {
        let id = spool::new_job_id(&mut generator);
        let result = if file.as_os_str() == "-" {
            spool.enqueue(&mut io::stdin().lock(), &id)
        } else {
            std::fs::File::open(file).and_then(|mut f| spool.enqueue(&mut f, &id))
        };
        match result {
            Ok(()) => writeln!(out, "{id}")?,
            Err(e) => {
                eprintln!("spoold: {}: not submitted: {e}", file.display());
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

fn status(spool: &Spool, json: bool) -> io::Result<ExitCode> {
    let counts = spool.counts(true)?;
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
        println!(
            "spool   {}",
            escape_bytes(spool.root().as_os_str().as_encoded_bytes())
        );
        match counts.daemon_pid {
            Some(pid) => println!("daemon  running (pid {pid})"),
            None => println!("daemon  not running"),
        }
        println!("queued  {}{age}", counts.queued);
        println!("active  {}", counts.active);
        println!("retry   {}", counts.retry);
        println!("done    {}", counts.done);
        println!("failed  {}", counts.failed);
    }
    Ok(ExitCode::SUCCESS)
}

fn failed(spool: &Spool, json: bool) -> io::Result<ExitCode> {
    let jobs = spool.failed_jobs()?;
    let mut out = io::stdout().lock();
    if json {
        let list: Vec<_> = jobs
            .iter()
            .map(|j| serde_json::json!({ "id": display_name(&j.name), "record": j.record }))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        writeln!(out, "no failed jobs")?;
    }
    for job in &jobs {
        let id = display_name(&job.name);
        let Some(record) = &job.record else {
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

fn retry(spool: &Spool, ids: &[String], all: bool) -> io::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    // Every argument is checked before anything moves: a typo among many IDs must not leave
    // the operator guessing which of them were acted on.
    let ids: Vec<JobId> = if all {
        let jobs = spool.failed_jobs()?;
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
        match spool.retry_failed(&id) {
            Ok(Retried::Queued(name)) if name == id.as_os_str() => println!("{id}: back in new/"),
            Ok(Retried::Queued(name)) => println!(
                "{id}: back in new/ as {} (new/ already held a job of that name)",
                display_name(&name)
            ),
            Ok(Retried::NoSuchJob) => {
                eprintln!("spoold: {id}: no failed job of that name");
                code = ExitCode::FAILURE;
            }
            Ok(Retried::NotAJob(kind)) => {
                eprintln!(
                    "spoold: {id}: not retried: it is {kind}, not a job file; spoold never \
                     follows or opens such an entry (remove it from failed/ by hand)"
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
