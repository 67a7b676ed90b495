//! Generates the man pages spoold(8) and spoold-SUBCOMMAND(8), and the bash, zsh and fish
//! completions, from the clap definition in src/cli.rs: the same source as `--help`, so the
//! three can never disagree.
//!
//! The files land in the profile's directory (`target/release/man/` and
//! `target/release/completions/`), not only in OUT_DIR, because OUT_DIR carries a hash that a
//! packaging tool cannot name: cargo-deb's assets refer to them as `target/release/...`, which it
//! maps to the real target directory (CARGO_TARGET_DIR, --target and profile included).
//! The man pages in the profile's directory are gzipped (`spoold.8.gz`), as Debian policy wants
//! them installed: cargo-deb compresses the man pages it copies from the source tree, but not
//! those it finds under `target/`, which it takes for build products. OUT_DIR keeps them plain,
//! for the tests to read.
//! spoold.toml(5) is hand-written (packaging/man/spoold.toml.5), since serde has no schema to
//! generate it from; tests/packaging.rs checks it documents every key and its default.

use std::env;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use flate2::{Compression, GzBuilder};

// The CLI module, compiled here as it is in the crate. Only its types are used, to build the
// clap::Command.
#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

/// src/cli.rs refers to `crate::config::DEFAULT_PATH`; src/config.rs needs serde and toml, so
/// the build script gets its own copy of the one constant. tests/packaging.rs checks that the
/// generated man page shows the same default as the crate's.
mod config {
    pub const DEFAULT_PATH: &str = "/etc/spoold/spoold.toml";
}

/// Sections of spoold(8) that clap has no place for: what a sysadmin looks for in a daemon's
/// page. Raw roff.
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
.I /etc/spoold/spoold.toml
The configuration of the default instance; see
.BR spoold.toml (5).
.TP
.I /etc/spoold/NAME.toml
The configuration of the instance
.BR spoold@NAME.service .
.TP
.I /var/spool/spoold
The spool of the default instance: \fBtmp/\fR, \fBnew/\fR, \fBactive/\fR, \fBretry/\fR,
\fBdone/\fR, \fBfailed/\fR, \fBstate/\fR, \fBreasons/\fR and the lock file \fBspoold.lock\fR.
An instance NAME uses \fI/var/spool/spoold/NAME\fR.
.SH SUBMITTING JOBS
A job is a file. Members of the group \fBspoold\fR submit one with
\fBspoold enqueue\fR \fIFILE\fR, or by writing it into \fItmp/\fR and renaming it into
\fInew/\fR (a rename within one filesystem, so that spoold never sees half a file). Names in
\fInew/\fR that start with a dot are ignored. A job's name is its ID, in the journal as
\fBJOB_ID=\fR.
.SH SIGNALS
.TP
.B SIGTERM, SIGINT
Stop: no new job starts, and jobs in flight may finish for \fBshutdown.drain_timeout\fR; then
they are aborted (SIGTERM to each handler's process group, SIGKILL after
\fBhandler.kill_grace\fR) and put back in \fInew/\fR. A second signal aborts at once.
.TP
.B SIGHUP
Reload the configuration (\fBsystemctl reload spoold\fR). An invalid file is logged and the
old configuration stays in force.
.SH EXIT STATUS
.TP
.B 0
A clean stop, or a client command that succeeded.
.TP
.B 1
A client command failed.
.TP
.B 2
A usage error: an unknown subcommand or option, a missing or extra argument.
.TP
.B 69
A JetStream cluster cannot be reached (\fBspoold run\fR waits \fBjetstream.connect_timeout\fR
first; systemd restarts the unit).
.TP
.B 70
A panic: a bug. It is logged, the jobs in flight are aborted, and systemd restarts spoold.
.TP
.B 73
The spool cannot be opened.
.TP
.B 74
Job discovery failed, or the metrics address cannot be bound.
.TP
.B 75
Another spoold owns the spool; or \fBspoold enqueue\fR found the queue full
(\fBspool.max_queued\fR) and submitted nothing.
.TP
.B 78
The configuration is invalid (systemd does not restart the unit for it).
.SH ENVIRONMENT
.TP
.B SPOOLD_CONFIG
The config file, when \fB--config\fR is not given.
.TP
.B RUST_LOG
Overrides \fBlog.level\fR.
.SH SEE ALSO
.BR spoold.toml (5),
.BR systemctl (1),
.BR journalctl (1),
.BR systemd.service (5)
"#;

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cli.rs");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is target/<profile>/build/spoold-<hash>/out.
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR is three levels below the profile directory")
        .to_path_buf();

    let mut cmd = cli::Cli::command();
    cmd.build();
    // The `help` subcommand is only a way to reach --help; it needs no man page of its own.
    let mut man_cmd = cli::Cli::command().disable_help_subcommand(true);
    man_cmd.build();
    for (dir, gzipped) in [(out_dir.as_path(), false), (profile_dir.as_path(), true)] {
        write_man_pages(&man_cmd, &dir.join("man"), gzipped)?;
        write_completions(&cmd, &dir.join("completions"))?;
    }
    Ok(())
}

/// Writes each page as `NAME.8`, or as `NAME.8.gz` when `gzipped`.
fn write_man_pages(cmd: &clap::Command, dir: &Path, gzipped: bool) -> io::Result<()> {
    let write_page = |name: &str, page: &[u8]| {
        if gzipped {
            write_if_changed(&dir.join(format!("{name}.gz")), &gzip(page)?)
        } else {
            write_if_changed(&dir.join(name), page)
        }
    };
    fs::create_dir_all(dir)?;
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let source = format!("spoold {version}");
    let man = |cmd: clap::Command| {
        Man::new(cmd)
            .section("8")
            .source(source.clone())
            .manual("System Administration")
    };

    // spoold(8): the overview, the subcommand list, then the daemon's files, signals and exit
    // statuses.
    let top = man(cmd.clone());
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    top.render_name_section(&mut page)?;
    top.render_synopsis_section(&mut page)?;
    top.render_description_section(&mut page)?;
    top.render_options_section(&mut page)?;
    top.render_subcommands_section(&mut page)?;
    page.write_all(EXTRA_SECTIONS.as_bytes())?;
    top.render_version_section(&mut page)?;
    write_page("spoold.8", &page)?;

    // spoold-run(8), spoold-enqueue(8), ...: each subcommand's options in full.
    // clap names a built subcommand "spoold-run" (its display name), and its synopsis
    // "spoold run".
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub = man(sub.clone());
        let mut page = Vec::new();
        sub.render(&mut page)?;
        write_page(&sub.get_filename(), &page)?;
    }
    Ok(())
}

fn write_completions(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "spoold", &mut text);
        let name = match shell {
            Shell::Bash => "spoold.bash",
            Shell::Zsh => "_spoold",
            _ => "spoold.fish",
        };
        write_if_changed(&dir.join(name), &text)?;
    }
    Ok(())
}

/// Gzip at the best compression, with no file name and a zero timestamp in the header, so that
/// the same page always gives the same bytes (a reproducible package, and no lintian tag for a
/// timestamped gzip).
fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(data)?;
    gz.finish()
}

/// Leaves an identical file untouched, so that its mtime does not change on every build.
fn write_if_changed(path: &Path, contents: &[u8]) -> io::Result<()> {
    if fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    fs::write(path, contents)
}
