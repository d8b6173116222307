//! Cross-validated predictions on the labelled images: every labelled image is classified by a model that
//! did not see its label (k-fold over the labels). They give the "likely mistakes" list (a label that a
//! confident held-out prediction disagrees with), the accuracy a person can expect on unseen images as labels
//! accumulate, and its confusion matrix.
//!
//! The model: CLIP's zero-shot classifier plus a class-prototype classifier (the normalised mean of each
//! class's training-fold features), `logits = s·(z·tᵀ + z·pᵀ)` with CLIP's logit scale `s`. It is the
//! training-free core of the family the app trains (Tip-Adapter's cache with a single key per class), chosen
//! because k folds must retrain k times after every label change and this takes milliseconds on thousands of
//! labels; training HeGraphAdapter k times would take the better part of a minute. The app's trained adapter
//! is usually more accurate, so the cross-validated accuracy is a conservative estimate.
//!
//! A class with no image in a fold's training part has no prototype there; its prototype term is the mean of
//! the other classes' for that image (neutral), so only the text decides about it. Without text features
//! (a features file without them) the prototypes alone decide.

use crate::linalg::{dot, normalize, softmax, Mat};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReviewError {
    #[error("cross-validation needs at least two labelled images; there are {0}")]
    TooFewLabels(usize),
    #[error("labelled image {image} is outside the {rows} feature rows")]
    NoSuchImage { image: usize, rows: usize },
    #[error("label {label} of image {image} is outside the {classes} classes")]
    NoSuchClass {
        image: usize,
        label: usize,
        classes: usize,
    },
    #[error("the text features have {text} dimensions, the image features {images}")]
    DimensionMismatch { images: usize, text: usize },
}

/// How the cross-validation runs.
#[derive(Clone, Debug, PartialEq)]
pub struct CvOptions {
    /// Folds; fewer when there are fewer labels.
    pub folds: usize,
    /// CLIP's logit scale.
    pub scale: f32,
}

impl Default for CvOptions {
    fn default() -> Self {
        Self {
            folds: 5,
            scale: 100.0,
        }
    }
}

/// The held-out predictions of every labelled image.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossValidation {
    /// Feature rows of the labelled images, in the order given.
    pub images: Vec<usize>,
    pub labels: Vec<usize>,
    /// `images.len() × classes` held-out probabilities.
    pub probs: Mat,
    pub folds: usize,
}

/// A labelled image whose held-out prediction disagrees with its label.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Suspect {
    pub image: usize,
    pub label: usize,
    pub predicted: usize,
    /// Probability of the predicted class.
    pub confidence: f32,
    /// Probability of the given label.
    pub label_prob: f32,
}

impl CrossValidation {
    pub fn predicted(&self, k: usize) -> usize {
        crate::linalg::argmax(self.probs.row(k))
    }

    /// Share of labelled images whose held-out prediction is their label.
    pub fn accuracy(&self) -> f32 {
        if self.images.is_empty() {
            return 0.0;
        }
        let right = (0..self.images.len())
            .filter(|&k| self.predicted(k) == self.labels[k])
            .count();
        right as f32 / self.images.len() as f32
    }

    /// `m[label][predicted]` counts.
    pub fn confusion(&self) -> Vec<Vec<usize>> {
        let c = self.probs.cols;
        let mut m = vec![vec![0usize; c]; c];
        for k in 0..self.images.len() {
            m[self.labels[k]][self.predicted(k)] += 1;
        }
        m
    }

    /// Labels that a held-out prediction of at least `min_confidence` disagrees with, the most confident
    /// disagreement (predicted minus label probability) first.
    pub fn suspects(&self, min_confidence: f32) -> Vec<Suspect> {
        let mut out: Vec<Suspect> = (0..self.images.len())
            .filter_map(|k| {
                let predicted = self.predicted(k);
                let row = self.probs.row(k);
                let s = Suspect {
                    image: self.images[k],
                    label: self.labels[k],
                    predicted,
                    confidence: row[predicted],
                    label_prob: row[self.labels[k]],
                };
                (predicted != s.label && s.confidence >= min_confidence).then_some(s)
            })
            .collect();
        out.sort_by(|a, b| {
            (b.confidence - b.label_prob)
                .total_cmp(&(a.confidence - a.label_prob))
                .then(a.image.cmp(&b.image))
        });
        out
    }
}

/// The fold of each labelled image: within each class, in the order given, round-robin over the folds, so
/// every fold holds each class in proportion and the assignment is the same on every run.
fn folds_of(labels: &[usize], classes: usize, folds: usize) -> Vec<usize> {
    let mut seen = vec![0usize; classes];
    labels
        .iter()
        .map(|&l| {
            let f = seen[l] % folds;
            seen[l] += 1;
            f
        })
        .collect()
}

/// Held-out predictions of the `labelled` images (`(feature row, class)`) of `features` (`N×D`,
/// L2-normalised rows), with the class `text` features (`C×D`) when there are any.
pub fn cross_validate(
    features: &Mat,
    text: Option<&Mat>,
    labelled: &[(usize, usize)],
    classes: usize,
    opts: &CvOptions,
) -> Result<CrossValidation, ReviewError> {
    if labelled.len() < 2 {
        return Err(ReviewError::TooFewLabels(labelled.len()));
    }
    for &(image, label) in labelled {
        if image >= features.rows {
            return Err(ReviewError::NoSuchImage {
                image,
                rows: features.rows,
            });
        }
        if label >= classes {
            return Err(ReviewError::NoSuchClass {
                image,
                label,
                classes,
            });
        }
    }
    if let Some(t) = text {
        if t.cols != features.cols {
            return Err(ReviewError::DimensionMismatch {
                images: features.cols,
                text: t.cols,
            });
        }
    }
    let text = text.filter(|t| t.rows == classes).map(Mat::normalized_rows);
    let labels: Vec<usize> = labelled.iter().map(|l| l.1).collect();
    let folds = opts.folds.clamp(2, labelled.len());
    let fold = folds_of(&labels, classes, folds);
    let d = features.cols;
    let mut probs = Mat::zeros(labelled.len(), classes);
    for f in 0..folds {
        // Prototypes of this fold's training part.
        let mut protos = vec![vec![0.0f32; d]; classes];
        let mut has = vec![false; classes];
        for (k, &(image, label)) in labelled.iter().enumerate() {
            if fold[k] != f {
                for (p, &x) in protos[label].iter_mut().zip(features.row(image)) {
                    *p += x;
                }
                has[label] = true;
            }
        }
        protos.iter_mut().for_each(|p| normalize(p));
        for (k, &(image, _)) in labelled.iter().enumerate() {
            if fold[k] != f {
                continue;
            }
            let z = features.row(image);
            let proto: Vec<Option<f32>> = (0..classes)
                .map(|c| has[c].then(|| dot(z, &protos[c])))
                .collect();
            let present: Vec<f32> = proto.iter().flatten().copied().collect();
            let neutral = if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f32>() / present.len() as f32
            };
            let logits: Vec<f32> = (0..classes)
                .map(|c| {
                    let t = text.as_ref().map_or(0.0, |t| dot(z, t.row(c)));
                    opts.scale * (t + proto[c].unwrap_or(neutral))
                })
                .collect();
            probs.row_mut(k).copy_from_slice(&softmax(&logits));
        }
    }
    Ok(CrossValidation {
        images: labelled.iter().map(|l| l.0).collect(),
        labels,
        probs,
        folds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tight clusters of 6 images each around two directions; text features agree with them.
    fn clusters() -> (Mat, Mat) {
        let mut rows = Vec::new();
        for i in 0..12 {
            let e = (i % 6) as f32 * 0.01;
            let mut r = if i < 6 {
                vec![1.0, e, 0.1]
            } else {
                vec![e, 1.0, 0.1]
            };
            normalize(&mut r);
            rows.push(r);
        }
        let text = Mat::from_rows(&[vec![0.6, 0.0, 0.8], vec![0.0, 0.6, 0.8]], 3);
        (Mat::from_rows(&rows, 3), text)
    }

    #[test]
    fn a_wrong_label_in_a_clean_cluster_is_the_top_suspect_and_accuracy_counts_it() {
        let (z, text) = clusters();
        let mut labelled: Vec<(usize, usize)> = (0..12).map(|i| (i, usize::from(i >= 6))).collect();
        labelled[3].1 = 1; // image 3 sits in cluster 0 but is labelled 1
        let cv = cross_validate(&z, Some(&text), &labelled, 2, &CvOptions::default()).unwrap();
        assert_eq!(cv.folds, 5);
        let s = cv.suspects(0.5);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].image, s[0].label, s[0].predicted), (3, 1, 0));
        assert!(s[0].confidence > 0.9);
        assert!((cv.accuracy() - 11.0 / 12.0).abs() < 1e-6);
        let m = cv.confusion();
        assert_eq!(m, vec![vec![5, 0], vec![1, 6]]);
        // Without text the prototypes alone find it too.
        let cv = cross_validate(&z, None, &labelled, 2, &CvOptions::default()).unwrap();
        assert_eq!(cv.suspects(0.5)[0].image, 3);
    }

    #[test]
    fn held_out_means_held_out_an_image_never_predicts_itself() {
        // Each class has one image only: in its fold the class has no prototype, so with uninformative text
        // (equal for both classes) the prediction is uniform, not the image's own label.
        let z = Mat::from_rows(&[vec![1.0, 0.0], vec![0.0, 1.0]], 2);
        let text = Mat::from_rows(&[vec![0.5, 0.5], vec![0.5, 0.5]], 2);
        let cv =
            cross_validate(&z, Some(&text), &[(0, 0), (1, 1)], 2, &CvOptions::default()).unwrap();
        for k in 0..2 {
            assert!((cv.probs.get(k, 0) - 0.5).abs() < 1e-5, "{:?}", cv.probs);
        }
        assert!(cv.suspects(0.6).is_empty());
    }

    #[test]
    fn bad_input_is_named() {
        let (z, text) = clusters();
        let opts = CvOptions::default();
        assert_eq!(
            cross_validate(&z, Some(&text), &[(0, 0)], 2, &opts),
            Err(ReviewError::TooFewLabels(1))
        );
        assert_eq!(
            cross_validate(&z, Some(&text), &[(0, 0), (99, 0)], 2, &opts),
            Err(ReviewError::NoSuchImage {
                image: 99,
                rows: 12
            })
        );
        assert_eq!(
            cross_validate(&z, Some(&text), &[(0, 0), (1, 2)], 2, &opts),
            Err(ReviewError::NoSuchClass {
                image: 1,
                label: 2,
                classes: 2
            })
        );
        assert_eq!(
            cross_validate(&z, Some(&Mat::zeros(2, 4)), &[(0, 0), (1, 1)], 2, &opts),
            Err(ReviewError::DimensionMismatch { images: 3, text: 4 })
        );
    }
}
