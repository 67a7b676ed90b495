//! `spoold top`: a live terminal view of a queue, read through `source::Admin` as `spoold
//! status` reads it: jobs per state, the rates of finished jobs over the last minute, the
//! running jobs with their age and attempt, the oldest queued job, and the pause. It only
//! reads, so a member of the spool's group can run it; `q` quits.
//!
//! The rates come from the daemon's published counters when its metrics endpoint is on
//! (`[metrics] listen`), which count every outcome; otherwise from the changes in the spool's
//! `done/` and `failed/` counts, which a purge or `done.keep = false` hides.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{DefaultTerminal, Frame};

use crate::job::{display_name, escape_text};
use crate::source::admin::{Admin, Counts, Queued, RunningJob};

/// The window the rates are computed over.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// The longest the view waits for a key before it looks at the stop signals again.
const POLL_SLICE: Duration = Duration::from_millis(200);
/// How much of the time between refreshes a refresh may take: reading a huge spool takes
/// long, and `top` must not keep a disk busy for a view.
const REFRESH_SHARE: u32 = 4;
/// The longest a read of the daemon's metrics may take: a daemon that does not answer must not
/// freeze the view.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);
/// The outcomes the daemon counts (`spoold_jobs_finished_total{outcome}`), in the order shown.
const OUTCOMES: [&str; 6] = [
    "done",
    "retried",
    "failed",
    "cancelled",
    "expired",
    "aborted",
];

/// Runs the view until `q` (or Esc, Ctrl-C, SIGTERM; a SIGHUP ends it at once), refreshing every `interval`;
/// `metrics` is the daemon's metrics endpoint, when its config turns it on.
pub fn run(
    queue: &impl Admin,
    metrics: Option<SocketAddr>,
    interval: Duration,
) -> io::Result<ExitCode> {
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        eprintln!("spoold: top needs a terminal; use `spoold status` in scripts");
        return Ok(ExitCode::FAILURE);
    }
    // Raw mode takes Ctrl-C from the terminal, but a signal from elsewhere must still end the
    // view through the restore below, not leave the terminal raw.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    // A hangup means the terminal is gone (its window closed, its ssh session or tmux session
    // ended): there is nothing left to restore, and the terminal library would spin on the
    // end of its input instead of returning to the loop that looks at `stop`. So the view ends
    // here, at once, with the status a shell gives a process ended by SIGHUP.
    let mut hangup = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("spoold-top-hangup".into())
        .spawn(move || {
            if hangup.forever().next().is_some() {
                // A SIGHUP sent by hand leaves the terminal there: it gets back its modes and
                // its screen. On a terminal that is gone this fails at once, and is ignored
                // (`restore` would print the error, and printing to a gone terminal panics).
                let _ = ratatui::try_restore();
                std::process::exit(128 + signal_hook::consts::SIGHUP);
            }
        })?;
    let mut terminal = ratatui::try_init()?;
    let result = view(queue, metrics, interval, &mut terminal, &stop);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

/// What one refresh read.
struct Snapshot {
    counts: Result<Counts, String>,
    running: Result<Vec<RunningJob>, String>,
    oldest: Result<Option<Queued>, String>,
}

/// Counts over time, for the rates: `N` counters sampled together.
struct Rates<const N: usize> {
    samples: VecDeque<(Instant, [u64; N])>,
}

impl<const N: usize> Default for Rates<N> {
    fn default() -> Self {
        Rates {
            samples: VecDeque::new(),
        }
    }
}

impl<const N: usize> Rates<N> {
    fn add(&mut self, at: Instant, values: [u64; N]) {
        self.samples.push_back((at, values));
        // Keep one sample at least RATE_WINDOW old as the base of the window, when there is one.
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// Each counter's rise per second over the window; None before two samples. A count that
    /// went down (a purge, `spoold retry`, a daemon's restart) counts as no progress.
    fn per_second(&self) -> Option<[f64; N]> {
        let (t0, first) = self.samples.front()?;
        let (t1, last) = self.samples.back()?;
        let span = t1.duration_since(*t0).as_secs_f64();
        (span > 0.0)
            .then(|| std::array::from_fn(|i| last[i].saturating_sub(first[i]) as f64 / span))
    }
}

/// Where the rates come from.
#[derive(Default)]
struct Throughput {
    /// done/ and failed/ in the spool.
    spool: Rates<2>,
    /// The daemon's counters by outcome (`OUTCOMES`), while its endpoint answers.
    daemon: Rates<6>,
    /// Whether the last read of the daemon's counters worked.
    from_daemon: bool,
}

/// The daemon's `spoold_jobs_finished_total` by outcome, in `OUTCOMES` order; None when the
/// endpoint does not answer in time or says nothing of them.
fn daemon_counters(addr: SocketAddr) -> Option<[u64; 6]> {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: spoold\r\nConnection: close\r\n\r\n")
        .ok()?;
    // A body of a few kilobytes; the bound keeps a stranger on that port from filling memory,
    // and the deadline, for the whole answer rather than for each read, keeps one that sends a
    // byte at a time from holding the view (and its keys) for good.
    let deadline = std::time::Instant::now() + SCRAPE_TIMEOUT;
    let mut body = Vec::new();
    let mut chunk = [0u8; 8192];
    while body.len() < 1 << 20 {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    finished_counters(&String::from_utf8_lossy(&body))
}

/// The finished counters in an exposition text, in `OUTCOMES` order.
fn finished_counters(text: &str) -> Option<[u64; 6]> {
    let mut found = [None; 6];
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("spoold_jobs_finished_total{outcome=\"") else {
            continue;
        };
        let Some((outcome, value)) = rest.split_once("\"} ") else {
            continue;
        };
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            found[i] = value.trim().parse::<u64>().ok();
        }
    }
    // Every outcome present, or the text is not spoold's.
    let mut values = [0; 6];
    for (v, f) in values.iter_mut().zip(found) {
        *v = f?;
    }
    Some(values)
}

fn view(
    queue: &impl Admin,
    metrics: Option<SocketAddr>,
    interval: Duration,
    terminal: &mut DefaultTerminal,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut rates = Throughput::default();
    let mut next_refresh = Instant::now();
    let mut shown: Option<Snapshot> = None;
    loop {
        if stop.load(Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= next_refresh {
            let snapshot = read(queue);
            let took = now.elapsed();
            if let Ok(counts) = &snapshot.counts {
                rates.spool.add(now, [counts.done, counts.failed]);
            }
            let counters = metrics.and_then(daemon_counters);
            rates.from_daemon = counters.is_some();
            match counters {
                Some(counters) => rates.daemon.add(now, counters),
                // A daemon that restarts starts its counters again: the window does too.
                None => rates.daemon = Rates::default(),
            }
            shown = Some(snapshot);
            next_refresh = now + interval.max(took * REFRESH_SHARE);
            let address = queue.address();
            terminal
                .draw(|frame| draw(frame, &address, shown.as_ref().expect("set above"), &rates))?;
        }
        let wait = next_refresh
            .saturating_duration_since(Instant::now())
            .min(POLL_SLICE);
        if event::poll(wait)? {
            match event::read()? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                        && key.code == KeyCode::Char('c');
                    if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => {
                    if let Some(snapshot) = &shown {
                        let address = queue.address();
                        terminal.draw(|frame| draw(frame, &address, snapshot, &rates))?;
                    }
                }
                _ => {}
            }
        }
    }
}

fn read(queue: &impl Admin) -> Snapshot {
    Snapshot {
        counts: queue.counts().map_err(|e| e.to_string()),
        running: queue.running().map_err(|e| e.to_string()),
        oldest: queue.oldest_queued().map_err(|e| e.to_string()),
    }
}

/// "4s", "2m05s", "1h02m", "3d04h": wide enough to read, narrow enough for a column.
fn age(since: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(since)
        .unwrap_or_default()
        .as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn draw(frame: &mut Frame, address: &(&str, String), snapshot: &Snapshot, rates: &Throughput) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let [header, middle, running] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(8),
        Constraint::Min(3),
    ])
    .areas(frame.area());

    let (kind, place) = address;
    let (daemon, pause) = match &snapshot.counts {
        Ok(c) => (
            c.daemon_pid.map_or_else(
                || "no daemon running".to_owned(),
                |pid| format!("daemon pid {pid}"),
            ),
            if c.paused {
                let mut line = format!(
                    "PAUSED since {} by uid {}",
                    c.paused_since.as_deref().unwrap_or("?"),
                    c.paused_by_uid.map_or("?".to_owned(), |u| u.to_string())
                );
                if let Some(reason) = &c.paused_reason {
                    line.push_str(": ");
                    line.push_str(&escape_text(reason));
                }
                line.push_str(" (spoold resume to go on)");
                Span::styled(line, bold)
            } else {
                Span::raw("running: not paused")
            },
        ),
        Err(e) => (
            "daemon unknown".to_owned(),
            Span::raw(format!("cannot count the jobs: {e}")),
        ),
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(vec![
                Span::styled("spoold top", bold),
                Span::raw(format!("  {kind} {place}  {daemon}  (q quits)")),
            ]),
            Line::from(pause),
        ]),
        header,
    );

    let [jobs, rate] =
        Layout::horizontal([Constraint::Min(40), Constraint::Length(30)]).areas(middle);
    let mut lines = Vec::new();
    if let Ok(c) = &snapshot.counts {
        lines.push(Line::from(format!(
            "queued {:<8} active {:<8} retry {:<8}",
            c.queued, c.active, c.retry
        )));
        lines.push(Line::from(format!(
            "scheduled {:<5} held {:<10}",
            c.scheduled, c.held
        )));
        lines.push(Line::from(format!(
            "done {:<10} failed {:<8}",
            c.done, c.failed
        )));
    }
    lines.push(Line::from(match &snapshot.oldest {
        Ok(Some(q)) => format!(
            "oldest queued: {} ({})",
            display_name(&q.name),
            age(q.since)
        ),
        Ok(None) => "oldest queued: none".to_owned(),
        Err(e) => format!("oldest queued: cannot tell ({e})"),
    }));
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Jobs ")),
        jobs,
    );
    let (title, per_second) = if rates.from_daemon {
        (
            " Last minute (daemon) ",
            rates
                .daemon
                .per_second()
                .map(|r| OUTCOMES.iter().copied().zip(r).collect::<Vec<_>>()),
        )
    } else {
        (
            " Last minute (spool) ",
            rates
                .spool
                .per_second()
                .map(|[done, failed]| vec![("done", done), ("failed", failed)]),
        )
    };
    let rate_lines = match per_second {
        Some(rows) => rows
            .into_iter()
            .map(|(outcome, r)| Line::from(format!("{outcome:<10}{r:>8.2}/s")))
            .collect(),
        None => vec![Line::from("measuring...")],
    };
    frame.render_widget(
        Paragraph::new(rate_lines).block(Block::bordered().title(title)),
        rate,
    );

    let block = Block::bordered().title(match &snapshot.running {
        Ok(jobs) => format!(" Running ({}) ", jobs.len()),
        Err(_) => " Running ".to_owned(),
    });
    match &snapshot.running {
        Ok(jobs) => {
            let rows = jobs.iter().map(|j| {
                Row::new(vec![
                    display_name(&j.name),
                    j.attempt.map_or("?".to_owned(), |a| a.to_string()),
                    age(j.since),
                ])
            });
            let table = Table::new(
                rows,
                [
                    Constraint::Min(26),
                    Constraint::Length(8),
                    Constraint::Length(8),
                ],
            )
            .header(Row::new(vec!["JOB", "ATTEMPT", "AGE"]).style(bold))
            .block(block);
            frame.render_widget(table, running);
        }
        Err(e) => frame.render_widget(
            Paragraph::new(format!("cannot list the running jobs: {e}")).block(block),
            running,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_last_minute() {
        let mut rates = Rates::<2>::default();
        let t0 = Instant::now();
        rates.add(t0, [0, 0]);
        assert_eq!(rates.per_second(), None);
        rates.add(t0 + Duration::from_secs(10), [20, 1]);
        assert_eq!(rates.per_second(), Some([2.0, 0.1]));
        // Two minutes on, the window starts a minute back: the first 20 no longer count.
        rates.add(t0 + Duration::from_secs(70), [20, 1]);
        rates.add(t0 + Duration::from_secs(130), [80, 1]);
        let [done, _] = rates.per_second().unwrap();
        assert!((done - 1.0).abs() < 1e-9, "{done}");
        // A purge does not make a negative rate.
        rates.add(t0 + Duration::from_secs(131), [0, 0]);
        assert_eq!(rates.per_second().map(|r| r[0] >= 0.0), Some(true));
    }

    #[test]
    fn finished_counters_are_read_from_the_exposition_text() {
        let text = "# TYPE spoold_jobs_finished_total counter\n\
            spoold_jobs_finished_total{outcome=\"done\"} 7\n\
            spoold_jobs_finished_total{outcome=\"retried\"} 1\n\
            spoold_jobs_finished_total{outcome=\"failed\"} 2\n\
            spoold_jobs_finished_total{outcome=\"cancelled\"} 0\n\
            spoold_jobs_finished_total{outcome=\"expired\"} 0\n\
            spoold_jobs_finished_total{outcome=\"aborted\"} 3\n\
            spoold_workers 2\n";
        assert_eq!(finished_counters(text), Some([7, 1, 2, 0, 0, 3]));
        assert_eq!(
            finished_counters("HTTP/1.1 404 Not Found\r\n\r\nnope"),
            None
        );
    }

    #[test]
    fn ages_are_compact() {
        let ago = |s| SystemTime::now() - Duration::from_secs(s);
        assert_eq!(age(ago(4)), "4s");
        assert_eq!(age(ago(125)), "2m05s");
        assert_eq!(age(ago(3720)), "1h02m");
        assert_eq!(age(ago(3 * 86400 + 4 * 3600)), "3d04h");
    }
}
