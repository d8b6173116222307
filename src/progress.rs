//! Progress reporting and cancellation for long work (embedding, training), shared by the CLI's progress
//! bar and the GUI's background jobs, so the engine never needs to know which one is listening.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A cheap, clonable cancellation flag checked between units of work (an image batch, a training step).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Receives progress of one job. `done`/`total` are in the job's own units (images, steps).
/// Implementations must be cheap: they are called once per batch or step.
pub trait Progress: Send + Sync {
    fn set_stage(&self, _stage: &str) {}
    /// A stage whose counts are in `unit` ("images", "steps", "MB"), so a display can say what it counts.
    fn set_stage_counting(&self, stage: &str, unit: &str) {
        let _ = unit;
        self.set_stage(stage);
    }
    fn update(&self, done: usize, total: usize);
    /// A line worth showing the person (a skipped bad file, a backend fallback).
    fn message(&self, _msg: &str) {}
}

/// For callers that do not care (tests, library use).
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _done: usize, _total: usize) {}
}
