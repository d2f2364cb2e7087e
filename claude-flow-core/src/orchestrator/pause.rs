//! Quota pauses (CONTRACT section 4): how long the service starts nothing
//! after a workflow said its agent's quota is exhausted.

use std::time::{Duration, SystemTime};

use super::Settings;

/// When a pause after the `exits`-th quota exit in a row ends, for a
/// marker naming `asked`: at least `retry_backoff`, doubled per exit in a
/// row up to `retry_backoff_max`, at most `max_pause`, whatever the marker
/// says (a past time, `0`, a time years away).
pub(super) fn pause_end(
    settings: &Settings,
    exits: u32,
    asked: SystemTime,
    now: SystemTime,
) -> SystemTime {
    let factor = 2u32.saturating_pow(exits.saturating_sub(1));
    let floor = settings
        .retry_backoff
        .saturating_mul(factor)
        .min(settings.retry_backoff_max)
        .max(settings.retry_backoff);
    let wanted = asked.duration_since(now).unwrap_or_default();
    now + wanted.max(floor).min(settings.max_pause)
}

/// `d` to the second, as people read it.
pub(super) fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            retry_backoff: Duration::from_secs(60),
            retry_backoff_max: Duration::from_secs(600),
            max_pause: Duration::from_secs(3600),
            ..Settings::default()
        }
    }

    #[test]
    fn pauses_are_at_least_the_backoff_doubled_per_exit_and_at_most_max_pause() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = settings();
        let secs = |t: SystemTime| t.duration_since(now).unwrap().as_secs();
        // A marker in the past, or `0`: the backoff.
        assert_eq!(secs(pause_end(&s, 1, SystemTime::UNIX_EPOCH, now)), 60);
        assert_eq!(secs(pause_end(&s, 2, now, now)), 120);
        assert_eq!(secs(pause_end(&s, 9, now, now)), 600);
        // A reasonable marker is honoured.
        let asked = now + Duration::from_secs(1800);
        assert_eq!(secs(pause_end(&s, 1, asked, now)), 1800);
        // A marker years away: max_pause.
        let far = now + Duration::from_secs(10 * 365 * 86400);
        assert_eq!(secs(pause_end(&s, 1, far, now)), 3600);
    }
}
