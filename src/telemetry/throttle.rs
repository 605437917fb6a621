//! Log lines that one failure repeats for every request (Redis down: each check, each
//! API call) are throttled per call site: at most [`LINES_PER_SITE_MAX`] lines per
//! [`THROTTLE_INTERVAL`], the rest counted. The next line the site logs carries that count
//! as `suppressed`; if none comes (the flood ended), the health watcher's next round after
//! the window logs it ([`log_suppressed`]: `log lines left out`, at the site's level, with
//! its `site` and `suppressed`), so no occurrence goes unreported. A Redis outage under
//! load would otherwise write a line per request, thousands a second, burying everything
//! else and costing CPU and log storage at the worst moment; the metrics count every
//! occurrence, and the health watcher logs each outage once when it starts and once when
//! it ends.
//!
//! [`log_throttled!`](crate::log_throttled) gives each call site its own [`Throttle`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Level;

/// The window a site's line budget applies to.
pub const THROTTLE_INTERVAL: Duration = Duration::from_secs(10);
/// Lines one site logs per [`THROTTLE_INTERVAL`]: a few, so that the first failures keep
/// their request ids for whoever looks for them.
pub const LINES_PER_SITE_MAX: u32 = 10;

/// The sites that have logged, for [`log_suppressed`]. Bounded by the number of
/// [`log_throttled!`](crate::log_throttled) call sites in the code.
static SITES: Mutex<Vec<&'static Throttle>> = Mutex::new(Vec::new());

/// One call site's line budget.
pub struct Throttle {
    /// `file:line` of the call site.
    site: &'static str,
    level: Level,
    state: Mutex<State>,
}

struct State {
    /// When the current window began; None before the first line.
    window_started: Option<Instant>,
    /// Lines logged in the current window.
    lines: u32,
    /// Occurrences not logged since the last line that was.
    suppressed: u64,
}

impl Throttle {
    pub const fn new(site: &'static str, level: Level) -> Self {
        Self {
            site,
            level,
            state: Mutex::new(State {
                window_started: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether this occurrence is logged: `Some(suppressed)` (the occurrences left out
    /// since the site's last line, None if there were none) when it is, None when it is
    /// only counted.
    pub fn admit(&'static self) -> Option<Option<u64>> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&'static self, now: Instant) -> Option<Option<u64>> {
        // A poisoned lock only means a panic elsewhere while holding it: the counts are
        // still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.window_started.is_none() {
            SITES.lock().unwrap_or_else(|e| e.into_inner()).push(self);
        }
        let window_over = state
            .window_started
            .is_none_or(|started| now.saturating_duration_since(started) >= THROTTLE_INTERVAL);
        if window_over {
            state.window_started = Some(now);
            state.lines = 0;
        }
        if state.lines >= LINES_PER_SITE_MAX {
            state.suppressed += 1;
            return None;
        }
        state.lines += 1;
        let suppressed = std::mem::take(&mut state.suppressed);
        Some((suppressed > 0).then_some(suppressed))
    }

    /// The count left out, taken, once the window it was left out in is over (or at
    /// once with `now` None).
    fn take_suppressed_at(&self, now: Option<Instant>) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let window_over = state.window_started.is_some_and(|started| {
            now.is_none_or(|now| now.saturating_duration_since(started) >= THROTTLE_INTERVAL)
        });
        if window_over {
            std::mem::take(&mut state.suppressed)
        } else {
            0
        }
    }
}

/// Logs, for each site whose last window is over, the occurrences it left out that no
/// later line of its own reported (`log lines left out`, at the site's level). The health
/// watcher calls it every round.
pub fn log_suppressed() {
    log_suppressed_at(Some(Instant::now()));
}

/// Logs every count left out, windows over or not: at the end of a process, once nothing
/// calls [`log_suppressed`] any more.
pub fn log_all_suppressed() {
    log_suppressed_at(None);
}

fn log_suppressed_at(now: Option<Instant>) {
    let sites = SITES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for throttle in sites {
        let suppressed = throttle.take_suppressed_at(now);
        if suppressed == 0 {
            continue;
        }
        let site = throttle.site;
        let message = "log lines left out";
        match throttle.level {
            Level::ERROR => tracing::error!(site, suppressed, "{message}"),
            Level::WARN => tracing::warn!(site, suppressed, "{message}"),
            Level::INFO => tracing::info!(site, suppressed, "{message}"),
            Level::DEBUG => tracing::debug!(site, suppressed, "{message}"),
            _ => tracing::trace!(site, suppressed, "{message}"),
        }
    }
}

/// `tracing::event!` at `$level` (`WARN`, `ERROR`, …) through this call site's own
/// [`Throttle`]; a line logged after some were left out carries `suppressed = N`.
#[macro_export]
macro_rules! log_throttled {
    ($level:ident, $($arg:tt)+) => {{
        static THROTTLE: $crate::telemetry::throttle::Throttle =
            $crate::telemetry::throttle::Throttle::new(
                concat!(file!(), ":", line!()),
                tracing::Level::$level,
            );
        if let Some(suppressed) = THROTTLE.admit() {
            tracing::event!(tracing::Level::$level, suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_its_budget_per_interval_and_then_the_count_it_left_out() {
        static THROTTLE: Throttle = Throttle::new("here", Level::WARN);
        let throttle = &THROTTLE;
        let start = Instant::now();
        for _ in 0..LINES_PER_SITE_MAX {
            assert_eq!(throttle.admit_at(start), Some(None));
        }
        for _ in 0..25 {
            assert_eq!(throttle.admit_at(start + Duration::from_secs(1)), None);
        }
        // Still the same window.
        assert_eq!(
            throttle.admit_at(start + THROTTLE_INTERVAL - Duration::from_millis(1)),
            None
        );
        // The next window's first line says how many the last one left out, once.
        let next = start + THROTTLE_INTERVAL;
        assert_eq!(throttle.admit_at(next), Some(Some(26)));
        assert_eq!(throttle.admit_at(next), Some(None));
        // A count no later line reports is taken once its window is over, once.
        for _ in 0..LINES_PER_SITE_MAX + 3 {
            throttle.admit_at(next);
        }
        assert_eq!(throttle.take_suppressed_at(Some(next)), 0);
        let after = next + THROTTLE_INTERVAL;
        assert_eq!(throttle.take_suppressed_at(Some(after)), 5);
        assert_eq!(throttle.take_suppressed_at(Some(after)), 0);
        // At the end, whatever the window: taken at once.
        for _ in 0..LINES_PER_SITE_MAX + 2 {
            throttle.admit_at(after);
        }
        assert_eq!(throttle.take_suppressed_at(Some(after)), 0);
        assert_eq!(throttle.take_suppressed_at(None), 2);
        assert_eq!(throttle.take_suppressed_at(None), 0);
    }
}
