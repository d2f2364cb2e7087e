//! GitHub's rate limits, as the answers' headers describe them, and the
//! decision of how long to stay quiet.
//!
//! Everything here is pure (the time is passed in) so that the rules can
//! be tested without a server or a clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The rate-limit headers of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LimitHeaders {
    /// `x-ratelimit-remaining`.
    pub remaining: Option<u64>,
    /// `x-ratelimit-reset`, epoch seconds.
    pub reset: Option<SystemTime>,
    /// `retry-after`.
    pub retry_after: Option<Duration>,
}

impl LimitHeaders {
    /// Reads the headers GitHub sends; malformed values count as absent.
    pub fn from_headers(headers: &reqwest::header::HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            remaining: text("x-ratelimit-remaining").and_then(|v| v.trim().parse().ok()),
            reset: text("x-ratelimit-reset").and_then(parse_reset),
            retry_after: text("retry-after").and_then(parse_retry_after),
        }
    }
}

/// `x-ratelimit-reset`: whole seconds since the epoch.
pub(crate) fn parse_reset(value: &str) -> Option<SystemTime> {
    let secs: u64 = value.trim().parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// `retry-after`: GitHub sends whole seconds. The HTTP-date form is not
/// used by GitHub; it counts as absent, which falls back to the
/// exponential backoff for secondary limits (the cautious choice).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// How the backoff for secondary limits without `retry-after` grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SecondaryBackoff {
    /// The first wait (GitHub: "at least one minute").
    pub base: Duration,
    /// The cap.
    pub max: Duration,
}

impl SecondaryBackoff {
    /// The wait after `strikes` consecutive secondary limits (0 = first).
    pub fn wait(&self, strikes: u32) -> Duration {
        let factor = 1u32.checked_shl(strikes.min(16)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Whether an error answer is a rate limit, and until when nothing may be
/// sent. `None`: an ordinary error (for example a 403 for lack of
/// permission), to be reported as such.
///
/// GitHub's documented order: `retry-after` first; else, when the primary
/// limit is used up, its reset; else a secondary limit, with a backoff.
pub(crate) fn limited_until(
    status: u16,
    headers: &LimitHeaders,
    message: &str,
    now: SystemTime,
    strikes: u32,
    backoff: SecondaryBackoff,
) -> Option<SystemTime> {
    if status != 403 && status != 429 {
        return None;
    }
    if let Some(wait) = headers.retry_after {
        return Some(now + wait);
    }
    if headers.remaining == Some(0)
        && let Some(reset) = headers.reset
    {
        // The reset is whole seconds; a second's margin keeps us from
        // arriving just before it.
        return Some(reset.max(now) + Duration::from_secs(1));
    }
    let lower = message.to_ascii_lowercase();
    if status == 429 || lower.contains("rate limit") || lower.contains("abuse") {
        return Some(now + backoff.wait(strikes));
    }
    None
}

/// After any answer (successful or not): when the primary limit is used
/// up, nothing more may be sent until its reset.
pub(crate) fn exhausted_until(headers: &LimitHeaders, now: SystemTime) -> Option<SystemTime> {
    match (headers.remaining, headers.reset) {
        (Some(0), Some(reset)) if reset > now => Some(reset + Duration::from_secs(1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: SecondaryBackoff = SecondaryBackoff {
        base: Duration::from_secs(60),
        max: Duration::from_secs(900),
    };

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_is_whole_seconds() {
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_reset("1700000000"), Some(at(1_700_000_000)));
        assert_eq!(parse_reset(""), None);
    }

    #[test]
    fn retry_after_wins_over_everything() {
        let h = LimitHeaders {
            remaining: Some(0),
            reset: Some(at(5000)),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            limited_until(429, &h, "", at(1000), 0, BACKOFF),
            Some(at(1007))
        );
    }

    #[test]
    fn exhausted_primary_limit_waits_for_the_reset() {
        let h = LimitHeaders {
            remaining: Some(0),
            reset: Some(at(1600)),
            retry_after: None,
        };
        let msg = "API rate limit exceeded for user ID 1.";
        assert_eq!(
            limited_until(403, &h, msg, at(1000), 0, BACKOFF),
            Some(at(1601))
        );
        assert_eq!(exhausted_until(&h, at(1000)), Some(at(1601)));
        assert_eq!(exhausted_until(&h, at(1700)), None);
    }

    #[test]
    fn secondary_limits_back_off_exponentially_from_a_minute() {
        let h = LimitHeaders {
            remaining: Some(4000),
            ..LimitHeaders::default()
        };
        let msg = "You have exceeded a secondary rate limit.";
        let wait = |strikes| {
            limited_until(403, &h, msg, at(0), strikes, BACKOFF)
                .and_then(|t| t.duration_since(at(0)).ok())
        };
        assert_eq!(wait(0), Some(Duration::from_secs(60)));
        assert_eq!(wait(1), Some(Duration::from_secs(120)));
        assert_eq!(wait(2), Some(Duration::from_secs(240)));
        assert_eq!(wait(10), Some(Duration::from_secs(900)));
        assert_eq!(wait(u32::MAX), Some(Duration::from_secs(900)));
    }

    #[test]
    fn a_plain_forbidden_is_not_a_rate_limit() {
        let h = LimitHeaders {
            remaining: Some(4000),
            ..LimitHeaders::default()
        };
        assert_eq!(
            limited_until(
                403,
                &h,
                "Resource not accessible by integration",
                at(0),
                0,
                BACKOFF
            ),
            None
        );
        assert_eq!(
            limited_until(500, &h, "rate limit", at(0), 0, BACKOFF),
            None
        );
    }
}
