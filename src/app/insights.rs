//! Analyses of the open session that several views share, each computed in the background when a view needs
//! it and its inputs changed: the maps of the features ([`crate::embedding_map`]) for the map view, and the
//! k-fold cross-validation of the labels ([`crate::review`]) for the review filter and the training view's
//! accuracy plot and confusion matrix.
//!
//! The map comes in two jobs, one after the other: PCA (milliseconds, so the view has a map at once), then
//! t-SNE (seconds to a minute, read from the layout cache when this folder's features were laid out before).
//! The t-SNE job is cancelled when the features change, when the folder closes, or by the person; a cancelled
//! or failed one is not restarted until the features change or the person asks for t-SNE again.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::cache::FeatureCache;
use crate::embedding_map::{
    cached_tsne_map, check_tsne_size, pca_map, tsne_map, Map2d, TsneParams,
};
use crate::linalg::Mat;
use crate::project::AccuracyPoint;
use crate::review::{cross_validate, CrossValidation, CvOptions};

use super::jobs::{Job, Polled};
use super::state::Show;
use super::{bulk_accept, map_view, HeGraphApp, Level, View};

/// A held-out prediction at least this sure that disagrees with a label puts the label on the review list.
pub const REVIEW_MIN_CONFIDENCE: f32 = 0.5;

/// The map of the features with the features' serial it was made from and how long it took.
pub struct MapResult {
    pub map: Map2d,
    pub seconds: f64,
    serial: u64,
}

/// The t-SNE map with the features' serial it was made from, how long it took and whether it came from the
/// layout cache.
pub struct TsneResult {
    pub map: Map2d,
    pub seconds: f64,
    pub from_cache: bool,
    serial: u64,
}

/// Why there is no t-SNE map for a serial, so the job is not restarted every frame.
struct TsneStopped {
    serial: u64,
    why: String,
    /// The person may ask again (cancelled, failed); not when the folder is too small or too large.
    retry: bool,
}

/// A cross-validation with the (label generation, features serial) it was made from.
struct CvResult {
    cv: CrossValidation,
    key: (u64, u64),
}

#[derive(Default)]
pub(super) struct Insights {
    pub map: Option<Arc<MapResult>>,
    map_job: Option<Job<MapResult>>,
    /// The features' serial whose map failed (not retried until the features change).
    map_failed: Option<u64>,
    tsne: Option<Arc<TsneResult>>,
    pub tsne_job: Option<Job<TsneResult>>,
    /// The features' serial the running t-SNE job lays out.
    tsne_job_serial: u64,
    tsne_stopped: Option<TsneStopped>,
    cv: Option<Arc<CvResult>>,
    cv_job: Option<Job<CvResult>>,
    /// A training finished: the next cross-validation is recorded in the project's accuracy history.
    record_next: bool,
    pub bulk: Option<bulk_accept::BulkAccept>,
    pub map_ui: map_view::MapUi,
}

impl Insights {
    pub fn busy(&self) -> bool {
        self.map_job.is_some() || self.cv_job.is_some() || self.tsne_job.is_some()
    }

    /// Why the t-SNE map of these features is not there and will not come by itself (cancelled, failed, too
    /// few or too many images).
    pub fn tsne_stopped(&self, serial: u64) -> Option<&str> {
        self.tsne_stopped
            .as_ref()
            .filter(|t| t.serial == serial)
            .map(|t| t.why.as_str())
    }

    /// The person asked for the t-SNE layout: one that was cancelled or failed is tried again.
    pub fn want_tsne(&mut self) {
        if self.tsne_stopped.as_ref().is_some_and(|t| t.retry) {
            self.tsne_stopped = None;
        }
    }

    pub fn cancel_tsne(&self) {
        if let Some(job) = &self.tsne_job {
            job.cancel();
        }
    }

    /// A training finished: its accuracy is measured by the next cross-validation and kept.
    pub fn record_after_training(&mut self) {
        self.record_next = true;
    }
}

impl Drop for Insights {
    /// A t-SNE job runs for up to a minute: it must not go on for a folder that was closed.
    fn drop(&mut self) {
        self.cancel_tsne();
    }
}

impl HeGraphApp {
    /// The PCA map of the images (once the map view asked for it).
    pub fn map(&self) -> Option<&MapResult> {
        self.insight.map.as_deref()
    }

    /// The t-SNE map of the images (once the map view asked for it and it is done).
    pub fn tsne_map(&self) -> Option<&TsneResult> {
        self.insight
            .tsne
            .as_deref()
            .filter(|t| t.serial == self.engine.serial)
    }

    pub(super) fn tsne_map_arc(&self) -> Option<Arc<TsneResult>> {
        self.insight
            .tsne
            .clone()
            .filter(|t| t.serial == self.engine.serial)
    }

    /// The last cross-validation of the labels (once the review filter or the training view asked for it).
    pub fn cross_validation(&self) -> Option<&CrossValidation> {
        self.insight.cv.as_ref().map(|r| &r.cv)
    }

    /// The class prompts' text features.
    pub fn text_features(&self) -> Option<&Mat> {
        self.engine.text.as_deref()
    }

    /// The labelled images that take part in the cross-validation: `(image, class)`, readable ones only.
    pub fn cross_validation_input(&self) -> Vec<(usize, usize)> {
        let Some(s) = &self.session else {
            return Vec::new();
        };
        (0..s.len())
            .filter(|&i| self.engine.ok.get(i).copied().unwrap_or(true))
            .filter_map(|i| s.label(i).map(|l| (i, l)))
            .collect()
    }

    /// Takes in finished analyses and starts the ones a view now needs. Called every frame by `show`.
    pub(super) fn poll_insights(&mut self) {
        self.poll_map();
        self.poll_cv();
    }

    /// The PCA map, then (in the same frame it arrives, so the map is never idle in between) the t-SNE map.
    fn poll_map(&mut self) {
        self.poll_pca();
        self.poll_tsne();
    }

    fn poll_pca(&mut self) {
        if let Some(job) = self.insight.map_job.as_mut() {
            if let Polled::Finished(r) = job.poll() {
                self.insight.map_job = None;
                match r {
                    Ok(m) => {
                        self.insight.map = Some(Arc::new(m));
                        self.insight.map_failed = None;
                    }
                    Err(e) => {
                        self.notify(Level::Warn, format!("the map could not be made: {e}"));
                        self.insight.map_failed = Some(self.engine.serial);
                    }
                }
            }
            return;
        }
        let serial = self.engine.serial;
        let (Some(centre), true) = (self.engine.centre.clone(), self.view == View::Map) else {
            return;
        };
        let fresh = self
            .insight
            .map
            .as_ref()
            .is_some_and(|m| m.serial == serial);
        if fresh || self.insight.map_failed == Some(serial) {
            return;
        }
        let text = self.engine.text.clone();
        self.insight.map_job = Some(Job::spawn("map", self.ctx.clone(), move |p, _, _| {
            p.set_stage("principal components");
            let t = Instant::now();
            let map = pca_map(&centre, text.as_deref()).map_err(|e| e.to_string())?;
            Ok(MapResult {
                map,
                seconds: t.elapsed().as_secs_f64(),
                serial,
            })
        }));
    }

    /// Takes in a finished t-SNE map, cancels one whose features changed, and starts one once the PCA map
    /// of the current features is there.
    fn poll_tsne(&mut self) {
        let serial = self.engine.serial;
        if let Some(job) = self.insight.tsne_job.as_mut() {
            let polled = job.poll();
            let messages: Vec<String> = job.messages.drain(..).collect();
            let (cancelled, job_serial) = (job.is_cancelled(), self.insight.tsne_job_serial);
            for m in messages {
                self.notify(Level::Warn, m);
            }
            let Polled::Finished(r) = polled else {
                if job_serial != serial {
                    // Its map would be of the old features; the new one starts when this one has stopped.
                    self.insight.cancel_tsne();
                }
                return;
            };
            self.insight.tsne_job = None;
            match r {
                Ok(t) if t.serial == serial => self.insight.tsne = Some(Arc::new(t)),
                Ok(_) => {}
                Err(e) => {
                    if !cancelled {
                        self.notify(Level::Warn, format!("no t-SNE map: {e}"));
                    }
                    self.insight.tsne_stopped = Some(TsneStopped {
                        serial: job_serial,
                        why: if cancelled { "cancelled".into() } else { e },
                        retry: true,
                    });
                }
            }
        }
        let fresh = self.tsne_map().is_some();
        let pca_ready = self
            .insight
            .map
            .as_ref()
            .is_some_and(|m| m.serial == serial);
        let stopped = self.insight.tsne_stopped(serial).is_some();
        let (Some(centre), true) = (
            self.engine.centre.clone(),
            self.view == View::Map && pca_ready && !fresh && !stopped,
        ) else {
            return;
        };
        // Too few or too many images: said once, without a job.
        if let Err(e) = check_tsne_size(centre.rows) {
            self.insight.tsne_stopped = Some(TsneStopped {
                serial,
                why: e.to_string(),
                retry: false,
            });
            return;
        }
        let text = self.engine.text.clone();
        let cache_dir = self
            .opts
            .cache_dir
            .clone()
            .or_else(FeatureCache::default_dir);
        let params = TsneParams::default();
        self.insight.tsne_job_serial = serial;
        self.insight.tsne_job = Some(Job::spawn(
            "t-SNE",
            self.ctx.clone(),
            move |p, cancel, _| {
                let t = Instant::now();
                let (map, from_cache) = match &cache_dir {
                    Some(dir) => {
                        let out =
                            cached_tsne_map(&centre, text.as_deref(), &params, dir, p, cancel)
                                .map_err(|e| e.to_string())?;
                        (out.map, out.from_cache)
                    }
                    None => {
                        let map = tsne_map(&centre, text.as_deref(), &params, p, cancel)
                            .map_err(|e| e.to_string())?;
                        (map, false)
                    }
                };
                Ok(TsneResult {
                    map,
                    seconds: t.elapsed().as_secs_f64(),
                    from_cache,
                    serial,
                })
            },
        ));
    }

    fn poll_cv(&mut self) {
        if let Some(job) = self.insight.cv_job.as_mut() {
            if let Polled::Finished(r) = job.poll() {
                self.insight.cv_job = None;
                match r {
                    Ok(res) => self.cv_done(res),
                    Err(e) => {
                        self.insight.cv = None;
                        self.insight.record_next = false;
                        if let Some(s) = self.session.as_mut() {
                            s.set_review(Vec::new());
                        }
                        self.notify(Level::Warn, format!("cross-validation failed: {e}"));
                    }
                }
            }
            return;
        }
        let Some(s) = &self.session else { return };
        let wanted =
            self.insight.record_next || self.view == View::Train || s.filter().show == Show::Review;
        let key = (s.label_generation, self.engine.serial);
        let fresh = self.insight.cv.as_ref().is_some_and(|r| r.key == key);
        if fresh && self.insight.record_next {
            // Trained on the labels the last cross-validation saw: its accuracy is this training's.
            self.insight.record_next = false;
            if let Some(cv) = self.insight.cv.clone() {
                self.record_accuracy(&cv.cv);
            }
            return;
        }
        let (Some(centre), true) = (self.engine.centre.clone(), wanted && !fresh) else {
            return;
        };
        let labelled = self.cross_validation_input();
        if labelled.len() < 2 {
            self.insight.cv = None;
            self.insight.record_next = false;
            if let Some(s) = self.session.as_mut() {
                s.set_review(Vec::new());
            }
            return;
        }
        let text = self.engine.text.clone();
        let classes = s.classes().len();
        let opts = CvOptions {
            scale: s.project.settings.train.logit_scale,
            ..Default::default()
        };
        self.insight.cv_job = Some(Job::spawn("review", self.ctx.clone(), move |p, _, _| {
            p.set_stage("cross-validating the labels");
            let cv = cross_validate(&centre, text.as_deref(), &labelled, classes, &opts)
                .map_err(|e| e.to_string())?;
            Ok(CvResult { cv, key })
        }));
    }

    fn cv_done(&mut self, res: CvResult) {
        let list = res
            .cv
            .suspects(REVIEW_MIN_CONFIDENCE)
            .iter()
            .map(|s| (s.image, s.predicted))
            .collect();
        if let Some(s) = self.session.as_mut() {
            s.set_review(list);
        }
        if std::mem::take(&mut self.insight.record_next) {
            self.record_accuracy(&res.cv);
        }
        self.insight.cv = Some(Arc::new(res));
    }

    /// Appends a cross-validated accuracy to the project's history and saves it.
    fn record_accuracy(&mut self, cv: &CrossValidation) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let finished_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        s.project.accuracy_history.push(AccuracyPoint {
            finished_unix,
            labels: cv.images.len(),
            accuracy: cv.accuracy(),
            folds: cv.folds,
        });
        if let Err(e) = s.save() {
            let text = e.to_string();
            self.notify(Level::Error, text);
        }
    }
}
