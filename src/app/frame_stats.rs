//! How long the UI takes to build a frame, measured in the app itself (F12 or `HEGRAPH_FRAME_STATS=1` shows
//! it): the part of a frame's cost that is ours, as opposed to the renderer's. Printed at exit when shown, so a
//! session on a slow machine leaves a number to compare.

use std::collections::VecDeque;
use std::time::Duration;

/// Frames kept for the percentiles (a few seconds at 60 Hz).
const KEPT: usize = 240;

#[derive(Debug, Default)]
pub struct FrameStats {
    times: VecDeque<Duration>,
    /// The overlay is on.
    pub shown: bool,
}

/// Percentiles of the kept frames.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameSummary {
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
            "UI build per frame: median {:.2} ms, p95 {:.2} ms, max {:.2} ms over {} frames",
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
        if self.times.len() == KEPT {
            self.times.pop_front();
        }
        self.times.push_back(d);
    }

    /// Forgets what was measured (e.g. before timing an idle stretch).
    pub fn clear(&mut self) {
        self.times.clear();
    }

    pub fn summary(&self) -> Option<FrameSummary> {
        let mut v: Vec<Duration> = self.times.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some(FrameSummary {
            frames: v.len(),
            p50: at(0.5),
            p95: at(0.95),
            max: at(1.0),
        })
    }
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
}
