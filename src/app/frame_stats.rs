//! How long a frame takes, measured in the app itself (F12 or `HEGRAPH_FRAME_STATS=1` shows it), in two
//! parts: the UI build (ours) and the whole frame, start to start, while the overlay redraws continuously
//! (ours plus tessellation, the renderer and presenting: what a key press waits for on a software renderer).
//! Printed at exit when shown, so a session on a slow machine leaves a number to compare.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Frames kept for the percentiles (a few seconds at 60 Hz).
const KEPT: usize = 240;

#[derive(Debug, Default)]
pub struct FrameStats {
    times: VecDeque<Duration>,
    /// Start-to-start intervals of consecutive frames, recorded while the overlay is on (it then asks for
    /// the next frame at once, so the interval is the cost of a frame, not the time between events).
    whole: VecDeque<Duration>,
    last_start: Option<Instant>,
    /// The overlay is on.
    pub shown: bool,
}

/// Percentiles of the kept frames.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameSummary {
    /// What was timed, as the overlay names it.
    pub what: &'static str,
    pub frames: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub max: Duration,
}

impl std::fmt::Display for FrameSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "{}: median {:.2} ms, p95 {:.2} ms, max {:.2} ms over {} frames",
            self.what,
            ms(self.p50),
            ms(self.p95),
            ms(self.max),
            self.frames
        )
    }
}

impl FrameStats {
    pub fn from_env() -> Self {
        Self {
            shown: std::env::var("HEGRAPH_FRAME_STATS").is_ok_and(|v| v == "1"),
            ..Self::default()
        }
    }

    pub fn record(&mut self, d: Duration) {
        push_kept(&mut self.times, d);
    }

    /// Called as a frame starts: while the overlay is on, the time since the previous frame's start is a whole
    /// frame's cost.
    pub fn frame_started(&mut self, now: Instant) {
        if !self.shown {
            self.last_start = None;
            return;
        }
        if let Some(prev) = self.last_start {
            push_kept(&mut self.whole, now.saturating_duration_since(prev));
        }
        self.last_start = Some(now);
    }

    /// Forgets what was measured (e.g. before timing an idle stretch).
    pub fn clear(&mut self) {
        self.times.clear();
        self.whole.clear();
        self.last_start = None;
    }

    /// The UI build per frame.
    pub fn summary(&self) -> Option<FrameSummary> {
        percentiles(&self.times, "UI build per frame")
    }

    /// The whole frame, start to start, while the overlay was on.
    pub fn whole_frames(&self) -> Option<FrameSummary> {
        percentiles(&self.whole, "whole frame (redrawing)")
    }

    /// The overlay's (and the exit report's) lines.
    pub fn report(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = self.summary() {
            out.push(s.to_string());
        }
        if let Some(w) = self.whole_frames() {
            out.push(
                w.to_string()
                    .replacen("UI build per frame", "whole frame (redrawing)", 1),
            );
        }
        out
    }
}

fn push_kept(q: &mut VecDeque<Duration>, d: Duration) {
    if q.len() == KEPT {
        q.pop_front();
    }
    q.push_back(d);
}

fn percentiles(q: &VecDeque<Duration>, what: &'static str) -> Option<FrameSummary> {
    let mut v: Vec<Duration> = q.iter().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some(FrameSummary {
        what,
        frames: v.len(),
        p50: at(0.5),
        p95: at(0.95),
        max: at(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_the_last_frames() {
        let mut s = FrameStats::default();
        assert!(s.summary().is_none());
        for ms in 1..=300u64 {
            s.record(Duration::from_millis(ms));
        }
        let sum = s.summary().unwrap();
        assert_eq!(sum.frames, KEPT, "only the last frames are kept");
        assert_eq!(sum.max, Duration::from_millis(300));
        assert_eq!(sum.p50, Duration::from_millis(181), "median of 61..=300");
        assert!(sum.to_string().contains("median 181.00 ms"));
    }

    #[test]
    fn whole_frames_are_start_to_start_and_only_while_shown() {
        let mut s = FrameStats::default();
        let t0 = Instant::now();
        s.frame_started(t0);
        s.frame_started(t0 + Duration::from_millis(5));
        assert!(
            s.whole_frames().is_none(),
            "not measured while the overlay is off"
        );
        s.shown = true;
        for k in 0..=10u64 {
            s.frame_started(t0 + Duration::from_millis(100 + 20 * k));
        }
        let w = s.whole_frames().unwrap();
        assert_eq!((w.frames, w.p50), (10, Duration::from_millis(20)));
        // Turning it off and on again does not count the pause as a frame.
        s.shown = false;
        s.frame_started(t0 + Duration::from_millis(1000));
        s.shown = true;
        s.frame_started(t0 + Duration::from_millis(2000));
        assert_eq!(s.whole_frames().unwrap().max, Duration::from_millis(20));
        assert!(s.report()[0].starts_with("whole frame (redrawing)"));
    }
}
