//! A rate limit for log lines a guest can trigger (a bad descriptor chain, a
//! driver that breaks the status protocol): the VMM's stderr is its log file,
//! and a guest must not be able to grow it at the speed it can post buffers.

use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

/// Lines each limiter lets through per window.
pub const DEFAULT_BURST: u32 = 10;
/// The window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// At most `burst` lines per `window`; the first line after a window with
/// suppressed lines says how many were dropped.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl LogLimiter {
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` with the number of
    /// lines suppressed since the last one written, `None` to drop it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= self.burst {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Writes `kubevmm-vmm: <line>` to `out` if the limit allows it.
    pub fn write_to(&mut self, out: &mut dyn Write, now: Instant, line: fmt::Arguments<'_>) {
        let Some(suppressed) = self.admit(now) else {
            return;
        };
        // A failed write to our own log has nowhere better to go.
        let _ = if suppressed > 0 {
            writeln!(
                out,
                "kubevmm-vmm: {line} ({suppressed} similar messages suppressed)"
            )
        } else {
            writeln!(out, "kubevmm-vmm: {line}")
        };
    }

    /// Writes the line to stderr (the VMM's log) if the limit allows it.
    pub fn warn(&mut self, line: fmt::Arguments<'_>) {
        let mut out = Vec::new();
        self.write_to(&mut out, Instant::now(), line);
        if !out.is_empty() {
            // eprint!, not a raw stderr write, so test harnesses capture it.
            eprint!("{}", String::from_utf8_lossy(&out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[u8]) -> Vec<String> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_flood_writes_at_most_the_burst_per_window() {
        let mut l = LogLimiter::new(3, Duration::from_secs(60));
        let mut out = Vec::new();
        let t0 = Instant::now();
        for i in 0..100_000 {
            l.write_to(&mut out, t0, format_args!("bad chain {i}"));
        }
        assert_eq!(
            lines(&out),
            [
                "kubevmm-vmm: bad chain 0",
                "kubevmm-vmm: bad chain 1",
                "kubevmm-vmm: bad chain 2"
            ]
        );
        // Still inside the window: nothing more.
        l.write_to(&mut out, t0 + Duration::from_secs(59), format_args!("x"));
        assert_eq!(lines(&out).len(), 3);
    }

    #[test]
    fn the_next_window_reports_what_was_suppressed() {
        let mut l = LogLimiter::new(1, Duration::from_secs(10));
        let mut out = Vec::new();
        let t0 = Instant::now();
        for _ in 0..5 {
            l.write_to(&mut out, t0, format_args!("bad"));
        }
        l.write_to(&mut out, t0 + Duration::from_secs(10), format_args!("bad"));
        l.write_to(&mut out, t0 + Duration::from_secs(25), format_args!("bad"));
        assert_eq!(
            lines(&out),
            [
                "kubevmm-vmm: bad",
                "kubevmm-vmm: bad (4 similar messages suppressed)",
                "kubevmm-vmm: bad",
            ]
        );
    }

    #[test]
    fn log_volume_is_bounded_by_time_not_by_guest_events() {
        // One line per millisecond of guest events for an hour of simulated
        // time, through the default limiter: at most 10 lines a minute.
        let mut l = LogLimiter::default();
        let mut out = Vec::new();
        let t0 = Instant::now();
        for ms in 0..3_600_000u64 {
            l.write_to(&mut out, t0 + Duration::from_millis(ms), format_args!("e"));
        }
        let n = lines(&out).len();
        assert!(n <= 60 * DEFAULT_BURST as usize, "{n} lines");
        assert!(out.len() < 64 * 1024, "{} bytes", out.len());
    }
}
