//! The timeline: every attempt of the last hours as a bar in a workflow
//! slot, drawn server-side as SVG. Records do not say which slot ran an
//! attempt, so attempts are laid out in as few lanes as their overlaps
//! need (at least `max_concurrent`), which is what the slots held.
//! Dashed lines join a failed attempt to the retry that followed it (the
//! backoff) or to the retry still to come; shaded bands are quota pauses.

use std::time::{Duration, SystemTime};

use claude_flow_core::{Attempt, AttemptOutcome, IssueKey, IssueRecord, IssueStatus, Status};
use maud::{Markup, html};

use super::layout::{outcome_class, outcome_text, timestamp};

/// The window sizes offered, smallest first: the first that holds every
/// attempt started in the largest is used.
const WINDOWS: [Duration; 6] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(3600),
    Duration::from_secs(3 * 3600),
    Duration::from_secs(6 * 3600),
];

/// Tick steps, smallest first: the first giving at most [`MAX_TICKS`].
const TICKS: [u64; 11] = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];
const MAX_TICKS: u64 = 8;

/// Lanes drawn at most; a service with more slots shows the busiest.
const MAX_LANES: usize = 24;

const WIDTH: f64 = 960.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 8.0;
const LANE: f64 = 24.0;
const GAP: f64 = 6.0;
const AXIS: f64 = 24.0;

/// One attempt placed on the chart.
struct Bar<'a> {
    key: &'a IssueKey,
    attempt: &'a Attempt,
    lane: usize,
}

/// The chart of the last hours, ending a little after `now` so that
/// retries to come and the end of a pause show.
pub(super) fn render(
    records: &[IssueRecord],
    status: &Status,
    slots: u32,
    now: SystemTime,
) -> Markup {
    let oldest = now
        .checked_sub(WINDOWS[WINDOWS.len() - 1])
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut attempts: Vec<(&IssueKey, &Attempt)> = records
        .iter()
        .flat_map(|r| r.attempts.iter().map(move |a| (r.key(), a)))
        .filter(|(_, a)| a.finished_at.unwrap_or(now) >= oldest)
        .collect();
    attempts.sort_by_key(|(_, a)| a.started_at);
    let earliest = attempts.first().map_or(now, |(_, a)| a.started_at);
    let window = WINDOWS
        .into_iter()
        .find(|w| now.duration_since(earliest).unwrap_or_default() <= *w)
        .unwrap_or(WINDOWS[WINDOWS.len() - 1]);
    let start = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
    let end = now + window / 8;
    let bars = lay_out(&attempts, now);
    let lanes = bars
        .iter()
        .map(|b| b.lane + 1)
        .max()
        .unwrap_or(0)
        .max(slots as usize)
        .clamp(1, MAX_LANES);
    let x = |t: SystemTime| -> f64 {
        let t = t.clamp(start, end);
        let full = end.duration_since(start).unwrap_or_default().as_secs_f64();
        let at = t.duration_since(start).unwrap_or_default().as_secs_f64();
        LEFT + (WIDTH - LEFT - RIGHT) * at / full.max(1.0)
    };
    let y = |lane: usize| TOP + lane as f64 * (LANE + GAP);
    let height = y(lanes) + AXIS;
    let bottom = y(lanes) - GAP;
    let pauses = pauses(records, status, now);
    let waits = retries_to_come(records, &bars, now);
    let backoffs = backoffs(&bars);
    html! {
        svg.timeline viewBox={ "0 0 " (WIDTH) " " (height) } role="img"
            aria-label={ "attempts over the last " (super::layout::span(window)) } {
            @for lane in 0..lanes {
                rect.lane x=(LEFT) y=(y(lane)) width=(WIDTH - LEFT - RIGHT) height=(LANE) {}
                text.lane-label x="4" y=(y(lane) + LANE * 0.68) { "slot " (lane + 1) }
            }
            rect.future x=(x(now)) y=(TOP) width=(x(end) - x(now)) height=(bottom - TOP) {}
            @for (from, to, why) in &pauses {
                rect.pause x=(x(*from)) y=(TOP) width=((x(*to) - x(*from)).max(2.0)) height=(bottom - TOP) {
                    title { "paused " (timestamp(*from)) " to " (timestamp(*to)) ": " (why) }
                }
            }
            @let (ticks, step) = ticks(start, end);
            @for t in ticks {
                line.tick x1=(x(t)) x2=(x(t)) y1=(TOP) y2=(bottom + 4.0) {}
                text.tick-label x=(x(t)) y=(bottom + 16.0) {
                    // Seconds only when ticks are less than a minute apart.
                    (timestamp(t).get(11..if step < 60 { 19 } else { 16 }).unwrap_or(""))
                }
            }
            @for (from, to, lane_from, lane_to) in &backoffs {
                line.backoff x1=(x(*from)) y1=(y(*lane_from) + LANE / 2.0)
                    x2=(x(*to)) y2=(y(*lane_to) + LANE / 2.0) {}
            }
            @for (from, to, lane, key) in &waits {
                line.backoff x1=(x(*from)) y1=(y(*lane) + LANE / 2.0) x2=(x(*to)) y2=(y(*lane) + LANE / 2.0) {}
                circle.retry cx=(x(*to)) cy=(y(*lane) + LANE / 2.0) r="4" {
                    title { (key) ": next retry at " (timestamp(*to)) }
                }
            }
            @for bar in bars.iter().filter(|b| b.lane < lanes) {
                @let x0 = x(bar.attempt.started_at);
                @let w = (x(bar.attempt.finished_at.unwrap_or(now)) - x0).max(3.0);
                a href=(super::layout::issue_href(bar.key)) {
                    rect class={ "bar " (outcome_class(bar.attempt)) } x=(x0) y=(y(bar.lane) + 2.0)
                        width=(w) height=(LANE - 4.0) rx="3" {
                        title {
                            (bar.key) ", round " (bar.attempt.round) ", attempt " (bar.attempt.number)
                            ": " (outcome_text(bar.attempt, now)) " (from " (timestamp(bar.attempt.started_at)) ")"
                        }
                    }
                    @if w > 70.0 {
                        text.bar-label x=(x0 + 4.0) y=(y(bar.lane) + LANE * 0.68) {
                            "#" (bar.key.number) " r" (bar.attempt.round) " a" (bar.attempt.number)
                        }
                    }
                }
            }
            line.now x1=(x(now)) x2=(x(now)) y1=(TOP - 4.0) y2=(bottom + 4.0) {}
        }
        p.legend {
            span.key.running {} "running "
            span.key.done {} "succeeded "
            span.key.failed {} "failed "
            span.key.interrupted {} "interrupted or cancelled "
            span.key.pause {} "quota pause "
            span.key.backoff {} "backoff to the next attempt "
            "· last " (super::layout::span(window)) ", times in UTC"
        }
    }
}

/// Each attempt in the first lane free at its start.
fn lay_out<'a>(attempts: &[(&'a IssueKey, &'a Attempt)], now: SystemTime) -> Vec<Bar<'a>> {
    let mut free_at: Vec<SystemTime> = Vec::new();
    let mut bars = Vec::with_capacity(attempts.len());
    for (key, attempt) in attempts {
        let lane = match free_at.iter().position(|t| *t <= attempt.started_at) {
            Some(lane) => lane,
            None => {
                free_at.push(SystemTime::UNIX_EPOCH);
                free_at.len() - 1
            }
        };
        free_at[lane] = attempt.finished_at.unwrap_or(now);
        bars.push(Bar { key, attempt, lane });
    }
    bars
}

/// From a failed attempt's end to the start of the next attempt of the
/// same issue and round, with their lanes.
fn backoffs(bars: &[Bar<'_>]) -> Vec<(SystemTime, SystemTime, usize, usize)> {
    let mut lines = Vec::new();
    for (i, bar) in bars.iter().enumerate() {
        let (Some(end), Some(AttemptOutcome::Failed { .. })) =
            (bar.attempt.finished_at, &bar.attempt.outcome)
        else {
            continue;
        };
        let next = bars[i + 1..].iter().find(|b| {
            b.key == bar.key
                && b.attempt.round == bar.attempt.round
                && b.attempt.number > bar.attempt.number
        });
        if let Some(next) = next {
            lines.push((end, next.attempt.started_at, bar.lane, next.lane));
        }
    }
    lines
}

/// Retries still to come: from the last attempt's end to the retry's
/// time, in that attempt's lane.
fn retries_to_come<'a>(
    records: &'a [IssueRecord],
    bars: &[Bar<'_>],
    now: SystemTime,
) -> Vec<(SystemTime, SystemTime, usize, &'a IssueKey)> {
    records
        .iter()
        .filter(|r| r.status == IssueStatus::Retrying)
        .filter_map(|r| {
            let at = r.next_retry_at.filter(|t| *t > now)?;
            let last = r.last_attempt()?;
            let bar = bars
                .iter()
                .find(|b| b.key == r.key() && std::ptr::eq(b.attempt, last))?;
            Some((last.finished_at?, at, bar.lane, r.key()))
        })
        .collect()
}

/// Quota pauses: from each quota exit to the time it named, and the
/// current pause.
fn pauses(
    records: &[IssueRecord],
    status: &Status,
    now: SystemTime,
) -> Vec<(SystemTime, SystemTime, String)> {
    let mut pauses: Vec<_> = records
        .iter()
        .flat_map(|r| &r.attempts)
        .filter_map(|a| match (&a.outcome, a.finished_at) {
            (Some(AttemptOutcome::QuotaExhausted { until }), Some(end)) => {
                Some((end, *until, "the workflow ran out of quota".to_owned()))
            }
            _ => None,
        })
        .collect();
    if let Some(until) = status.paused_until.filter(|t| *t > now) {
        let why = status.pause_reason.clone().unwrap_or_default();
        // Usually the pause of the last quota exit: one band, its reason.
        match pauses.iter_mut().find(|(_, to, _)| *to == until) {
            Some(band) => band.2 = why,
            None => pauses.push((now, until, why)),
        }
    }
    pauses
}

/// Tick times (whole multiples of a step, in UTC) between `start` and
/// `end`, and the step in seconds.
fn ticks(start: SystemTime, end: SystemTime) -> (Vec<SystemTime>, u64) {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    let (from, to) = (secs(start), secs(end));
    let step = TICKS
        .into_iter()
        .find(|s| (to - from) / s <= MAX_TICKS)
        .unwrap_or(TICKS[TICKS.len() - 1]);
    let ticks = (from.div_ceil(step)..=to / step)
        .map(|k| SystemTime::UNIX_EPOCH + Duration::from_secs(k * step))
        .collect();
    (ticks, step)
}

#[cfg(test)]
mod tests {
    use claude_flow_core::Issue;

    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn attempt(number: u32, from: u64, to: u64, outcome: AttemptOutcome) -> Attempt {
        Attempt {
            number,
            round: 1,
            run_id: String::new(),
            started_at: t(from),
            finished_at: Some(t(to)),
            outcome: Some(outcome),
            exit_code: None,
            signal: None,
            log_path: None,
            pr_url: None,
            node: None,
        }
    }

    fn failed() -> AttemptOutcome {
        AttemptOutcome::Failed {
            reason: "exit code 1".into(),
        }
    }

    fn key(n: u64) -> IssueKey {
        format!("o/r#{n}").parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn overlapping_attempts_take_separate_lanes_and_a_free_lane_is_reused() {
        let key = key(1);
        let (a, b, c) = (
            attempt(1, 0, 10, failed()),
            attempt(2, 5, 20, failed()),
            attempt(3, 12, 30, failed()),
        );
        let bars = lay_out(&[(&key, &a), (&key, &b), (&key, &c)], t(100));
        let lanes: Vec<usize> = bars.iter().map(|b| b.lane).collect();
        assert_eq!(lanes, [0, 1, 0]);
    }

    #[test]
    fn backoffs_retries_to_come_and_pauses_are_drawn() {
        let now = t(600);
        // Issue 1 failed, waited, failed again, and waits for its third.
        let mut retrying = IssueRecord::new(Issue::new(key(1), "one"));
        retrying.attempts = vec![
            attempt(1, 100, 110, failed()),
            attempt(2, 170, 180, failed()),
        ];
        retrying.status = IssueStatus::Retrying;
        retrying.next_retry_at = Some(t(640));
        // Issue 2 ran out of quota: nothing starts until t(700).
        let mut paused = IssueRecord::new(Issue::new(key(2), "two"));
        let quota = AttemptOutcome::QuotaExhausted { until: t(700) };
        paused.attempts = vec![attempt(1, 300, 310, quota)];
        paused.status = IssueStatus::Queued;
        let status = Status {
            paused_until: Some(t(700)),
            pause_reason: Some("quota".into()),
            ..Status::default()
        };
        let svg = render(&[retrying, paused], &status, 2, now).into_string();
        assert_eq!(svg.matches("<line class=\"backoff\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("<circle class=\"retry\"").count(), 1, "{svg}");
        assert!(svg.contains("o/r#1: next retry at"), "{svg}");
        // The quota exit's pause and the current one are the same band.
        assert_eq!(svg.matches("<rect class=\"pause\"").count(), 1, "{svg}");
        assert!(svg.contains(": quota</title>"), "{svg}");
        assert_eq!(svg.matches("class=\"bar failed\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("class=\"bar quota\"").count(), 1, "{svg}");
    }
}
