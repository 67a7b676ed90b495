//! `spoold top`: a live terminal view of a queue, read through `source::Admin` as `spoold
//! status` reads it: jobs per state, the rates of done and failed jobs over the last minute,
//! the running jobs with their age and attempt, the oldest queued job, and the pause. It only
//! reads, so a member of the spool's group can run it; `q` quits.

use std::collections::VecDeque;
use std::io::{self, IsTerminal};
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

/// Runs the view until `q` (or Esc, Ctrl-C, SIGTERM, SIGHUP), refreshing every `interval`.
pub fn run(queue: &impl Admin, interval: Duration) -> io::Result<ExitCode> {
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        eprintln!("spoold: top needs a terminal; use `spoold status` in scripts");
        return Ok(ExitCode::FAILURE);
    }
    // Raw mode takes Ctrl-C from the terminal, but a signal from elsewhere must still end the
    // view through the restore below, not leave the terminal raw.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let mut terminal = ratatui::try_init()?;
    let result = view(queue, interval, &mut terminal, &stop);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

/// What one refresh read.
struct Snapshot {
    counts: Result<Counts, String>,
    running: Result<Vec<RunningJob>, String>,
    oldest: Result<Option<Queued>, String>,
}

/// Done and failed counts over time, for the rates.
#[derive(Default)]
struct Rates {
    samples: VecDeque<(Instant, u64, u64)>,
}

impl Rates {
    fn add(&mut self, at: Instant, counts: &Counts) {
        self.samples.push_back((at, counts.done, counts.failed));
        // Keep one sample at least RATE_WINDOW old as the base of the window, when there is one.
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// (done per second, failed per second) over the window; None before two samples. A
    /// count that went down (a purge, `spoold retry`) counts as no progress.
    fn per_second(&self) -> Option<(f64, f64)> {
        let (t0, done0, failed0) = *self.samples.front()?;
        let (t1, done1, failed1) = *self.samples.back()?;
        let span = t1.duration_since(t0).as_secs_f64();
        (span > 0.0).then(|| {
            (
                done1.saturating_sub(done0) as f64 / span,
                failed1.saturating_sub(failed0) as f64 / span,
            )
        })
    }
}

fn view(
    queue: &impl Admin,
    interval: Duration,
    terminal: &mut DefaultTerminal,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut rates = Rates::default();
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
                rates.add(now, counts);
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

fn draw(frame: &mut Frame, address: &(&str, String), snapshot: &Snapshot, rates: &Rates) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let [header, middle, running] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(5),
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
        Layout::horizontal([Constraint::Min(40), Constraint::Length(28)]).areas(middle);
    let mut lines = Vec::new();
    if let Ok(c) = &snapshot.counts {
        lines.push(Line::from(format!(
            "queued {:<8} active {:<8} retry {:<8}",
            c.queued, c.active, c.retry
        )));
        lines.push(Line::from(format!(
            "held {:<10} done {:<10} failed {:<8}",
            c.held, c.done, c.failed
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
    let rate_lines = match rates.per_second() {
        Some((done, failed)) => vec![
            Line::from(format!("done   {done:>8.2}/s")),
            Line::from(format!("failed {failed:>8.2}/s")),
        ],
        None => vec![Line::from("measuring...")],
    };
    frame.render_widget(
        Paragraph::new(rate_lines).block(Block::bordered().title(" Last minute ")),
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
        let mut rates = Rates::default();
        let t0 = Instant::now();
        let counts = |done, failed| Counts {
            done,
            failed,
            ..Counts::default()
        };
        rates.add(t0, &counts(0, 0));
        assert_eq!(rates.per_second(), None);
        rates.add(t0 + Duration::from_secs(10), &counts(20, 1));
        assert_eq!(rates.per_second(), Some((2.0, 0.1)));
        // Two minutes on, the window starts a minute back: the first 20 no longer count.
        rates.add(t0 + Duration::from_secs(70), &counts(20, 1));
        rates.add(t0 + Duration::from_secs(130), &counts(80, 1));
        let (done, _) = rates.per_second().unwrap();
        assert!((done - 1.0).abs() < 1e-9, "{done}");
        // A purge does not make a negative rate.
        rates.add(t0 + Duration::from_secs(131), &counts(0, 0));
        assert_eq!(rates.per_second().map(|r| r.0 >= 0.0), Some(true));
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
