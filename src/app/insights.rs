//! Analyses of the open session that several views share, each computed in the background when a view needs
//! it and its inputs changed: the PCA map of the features ([`crate::embedding_map`]) for the map view, and the
//! k-fold cross-validation of the labels ([`crate::review`]) for the review filter and the training view's
//! accuracy plot and confusion matrix.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::embedding_map::{pca_map, Map2d};
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
    cv: Option<Arc<CvResult>>,
    cv_job: Option<Job<CvResult>>,
    /// A training finished: the next cross-validation is recorded in the project's accuracy history.
    record_next: bool,
    pub bulk: Option<bulk_accept::BulkAccept>,
    pub map_ui: map_view::MapUi,
}

impl Insights {
    pub fn busy(&self) -> bool {
        self.map_job.is_some() || self.cv_job.is_some()
    }

    /// A training finished: its accuracy is measured by the next cross-validation and kept.
    pub fn record_after_training(&mut self) {
        self.record_next = true;
    }
}

impl HeGraphApp {
    /// The PCA map of the images (once the map view asked for it).
    pub fn map(&self) -> Option<&MapResult> {
        self.insight.map.as_deref()
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

    fn poll_map(&mut self) {
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
