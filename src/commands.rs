//! The client subcommands (enqueue, status, failed, retry, check-config): short-lived, no runtime.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::Config;
use crate::spool::{self, Spool};

const EX_CONFIG: u8 = 78;

/// Runs a client subcommand and returns the process exit status.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Run(_) => unreachable!("`run` is the daemon, handled in main"),
        Command::CheckConfig { config, path } => {
            check_config(&Command::check_config_path(config, path))
        }
        Command::Enqueue { config, files } => with_spool(&config.config, |s| enqueue(s, &files)),
        Command::Status { config, json } => with_spool(&config.config, |s| status(s, json)),
        Command::Failed { config, json } => with_spool(&config.config, |s| failed(s, json)),
        Command::Retry { config, ids, all } => with_spool(&config.config, |s| retry(s, &ids, all)),
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            if let Err(problem) = crate::handler::check_program(&config.handler) {
                eprintln!(
                    "spoold: warning: {}: {problem}; jobs will fail until that is fixed",
                    path.display()
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
        println!("spool   {}", spool.root().display());
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
            .map(|j| serde_json::json!({ "id": spool::display_name(&j.name), "record": j.record }))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        writeln!(out, "no failed jobs")?;
    }
    for job in &jobs {
        let id = spool::display_name(&job.name);
        let Some(record) = &job.record else {
            writeln!(out, "{id}\n    (no reason recorded)")?;
            continue;
        };
        let last = record.last_failure.clone().unwrap_or_default();
        writeln!(out, "{id}")?;
        writeln!(out, "    reason:   {}", last.reason)?;
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
            writeln!(out, "    first:    {at}")?;
        }
        if let Some(at) = &record.failed_at {
            writeln!(out, "    failed:   {at}")?;
        }
        if last.timed_out {
            writeln!(out, "    timed out: yes")?;
        }
        for line in &last.stderr_tail {
            writeln!(out, "    stderr| {line}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn retry(spool: &Spool, ids: &[String], all: bool) -> io::Result<ExitCode> {
    let names: Vec<_> = if all {
        spool.failed_jobs()?.into_iter().map(|j| j.name).collect()
    } else {
        ids.iter().map(|id| spool::parse_display_name(id)).collect()
    };
    let mut code = ExitCode::SUCCESS;
    for name in names {
        let id = spool::display_name(&name);
        match spool.retry_failed(&name) {
            Ok(true) => println!("{id}: back in new/"),
            Ok(false) => {
                eprintln!("spoold: {id}: no failed job of that name");
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
