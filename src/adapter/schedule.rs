//! The training schedule shared by every trainer and backend: which rows each step sees and with which
//! learning rate. It depends only on the seed, so a run resumed from a snapshot (device lost) replays exactly
//! the steps an uninterrupted run would have taken.

use crate::features::LabelledSplit;
use crate::linalg::Mat;
use crate::rng::Rng;

/// Stream id of the batch order in [`Rng::derive`].
const STREAM_BATCHES: u64 = 0xBA7C;

/// One step's rows (into the stacked query matrix, `view * M + image`) and their labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: Vec<u32>,
    pub labels: Vec<u32>,
}

/// `lr · ½(1 + cos(π t / T))`: PyTorch's `CosineAnnealingLR(T_max = T, eta_min = 0)` stepped once per step.
pub fn cosine_lr(lr: f32, step: usize, total: usize) -> f32 {
    if total == 0 {
        return lr;
    }
    let t = step as f64 / total as f64;
    (lr as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
}

/// The batches of one epoch: the `M` images shuffled with `Rng::derive(seed, [STREAM, epoch])`, cut into
/// consecutive chunks of `batch` (the last may be smaller), and for each image (in batch order) one of its
/// `A` views drawn with `below(A)` from the same generator.
pub fn epoch_batches(
    seed: u64,
    epoch: usize,
    labels: &[usize],
    views: usize,
    batch: usize,
) -> Vec<Batch> {
    let m = labels.len();
    let mut rng = Rng::derive(seed, &[STREAM_BATCHES, epoch as u64]);
    let mut order: Vec<usize> = (0..m).collect();
    rng.shuffle(&mut order);
    order
        .chunks(batch.max(1))
        .map(|chunk| {
            let rows = chunk
                .iter()
                .map(|&i| (rng.below(views.max(1)) * m + i) as u32)
                .collect();
            let labels = chunk.iter().map(|&i| labels[i] as u32).collect();
            Batch { rows, labels }
        })
        .collect()
}

pub fn steps_per_epoch(m: usize, batch: usize) -> usize {
    m.div_ceil(batch.max(1))
}

/// The batch of each step, drawing each epoch's batches ([`epoch_batches`]) when the step enters it: what
/// every training loop over the labelled images walks through.
pub struct StepBatches<'a> {
    seed: u64,
    labels: &'a [usize],
    views: usize,
    batch_size: usize,
    per_epoch: usize,
    current: Option<(usize, Vec<Batch>)>,
}

impl<'a> StepBatches<'a> {
    pub fn new(seed: u64, labels: &'a [usize], views: usize, batch_size: usize) -> Self {
        Self {
            seed,
            labels,
            views,
            batch_size,
            per_epoch: steps_per_epoch(labels.len(), batch_size),
            current: None,
        }
    }

    /// Steps per epoch.
    pub fn per_epoch(&self) -> usize {
        self.per_epoch
    }

    /// The epoch of `step` and its batch.
    pub fn get(&mut self, step: usize) -> (usize, &Batch) {
        let spe = self.per_epoch.max(1);
        let epoch = step / spe;
        if self.current.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.current = None;
        }
        let (seed, labels, views, batch) = (self.seed, self.labels, self.views, self.batch_size);
        let (_, batches) = self
            .current
            .get_or_insert_with(|| (epoch, epoch_batches(seed, epoch, labels, views, batch)));
        (epoch, &batches[step % spe])
    }
}

/// All views of all images stacked view-major (`row = view * M + image`), rows normalised; a split without
/// views contributes its features as the single view. Returns the matrix and the number of views.
pub fn stack_queries(split: &LabelledSplit) -> (Mat, usize) {
    let views: Vec<&Mat> = match &split.views {
        Some(v) if !v.is_empty() => v.iter().collect(),
        _ => vec![&split.features],
    };
    let d = split.features.cols;
    let mut data = Vec::with_capacity(views.len() * split.features.rows * d);
    for v in &views {
        data.extend_from_slice(&v.data);
    }
    let mut q = Mat::from_vec(views.len() * split.features.rows, d, data);
    q.l2_normalize_rows();
    (q, views.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_image_once_per_epoch() {
        let labels: Vec<usize> = (0..10).map(|i| i % 3).collect();
        let b = epoch_batches(7, 2, &labels, 4, 4);
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].rows.len(), 2);
        let mut imgs: Vec<u32> = b
            .iter()
            .flat_map(|x| x.rows.iter().map(|r| r % 10))
            .collect();
        imgs.sort();
        assert_eq!(imgs, (0..10).collect::<Vec<u32>>());
        for x in &b {
            for (r, l) in x.rows.iter().zip(&x.labels) {
                assert!(*r < 40);
                assert_eq!(*l as usize, labels[(*r % 10) as usize]);
            }
        }
        assert_eq!(b, epoch_batches(7, 2, &labels, 4, 4));
        assert_ne!(b, epoch_batches(7, 3, &labels, 4, 4));
    }

    #[test]
    fn cosine_starts_at_lr_and_ends_near_zero() {
        assert_eq!(cosine_lr(1e-3, 0, 10), 1e-3);
        assert!((cosine_lr(1e-3, 5, 10) - 5e-4).abs() < 1e-9);
        assert!(cosine_lr(1e-3, 9, 10) < 3e-5);
    }
}
