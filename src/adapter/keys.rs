//! Fine-tuning the cache keys of a Tip-style classifier `ℓ = s·z Pᵀ + α·exp(−β(1 − z Kᵀ)) L` (Tip-Adapter-F's
//! training, arXiv 2207.09519): `K` starts at the cache and is trained with cross-entropy on the training
//! views, AdamW (`tip_lr`, `tip_eps`, `tip_weight_decay`), cosine schedule, `tip_epochs` epochs. The keys are
//! not renormalised, as in Tip-Adapter's code. Used by Tip-Adapter-F and by HeGraphAdapter's logit-fusion
//! reading (where `P` is the graph's `P'` and `K` starts at its `X'`).
//!
//! **Self-exclusion (choice, [`TrainParams::self_exclude`](super::TrainParams::self_exclude)).** A training
//! query is one of the labelled images (or a view of one), and its own key sits in the cache at affinity 1
//! (≈ 0.95 for a view): the cache term then classifies every training image correctly whatever the keys,
//! and training learns from a situation no test image is ever in. With self-exclusion a query's own key is
//! left out of its cache sum, and its class sum is rescaled by `n/(n − 1)` (as in the leave-one-out search,
//! [`super::select`]); classes with a single labelled image keep the key (without it their queries would
//! only ever push keys away). Measured in the interactive protocol on stanford_cars_even (Tip-Adapter-F,
//! 2–16 shots, 3 seeds): +0.1 to +1.0 points; Tip-Adapter-F itself keeps Tip-Adapter's recipe
//! (`self_exclude` applies to HeGraphAdapter only).

use candle_core::{DType, Device, Tensor, Var};

use super::hegraph::{adamw_update, AdamStep, ParamState};
use super::schedule::{cosine_lr, epoch_batches, stack_queries, steps_per_epoch, Batch};
use super::{AdapterError, TrainEvent, TrainParams};
use crate::features::LabelledSplit;
use crate::linalg::Mat;
use crate::progress::CancelToken;

/// What the keys are trained for.
pub(crate) struct KeyTraining<'a> {
    /// The normalised text classifier (None: the cache alone).
    pub text: Option<&'a Mat>,
    /// The initial keys, their labels and the labelled image each comes from.
    pub keys: &'a Mat,
    pub key_labels: &'a [usize],
    pub key_image: &'a [usize],
    pub train: &'a LabelledSplit,
    pub num_classes: usize,
    pub alpha: f32,
    pub beta: f32,
    pub exclude_self: bool,
    /// Names the keys in error messages.
    pub what: &'a str,
}

/// The trained keys and the `(step, loss)` of every step.
pub(crate) type TrainedKeys = (Mat, Vec<(usize, f32)>);

pub(crate) fn train_keys(
    params: &TrainParams,
    kt: KeyTraining,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedKeys, AdapterError> {
    let dev = Device::Cpu;
    let c = kt.num_classes;
    let train = kt.train;
    let (queries, a) = stack_queries(train);
    let m = train.len();
    let d = queries.cols;
    let mk = kt.keys.rows;
    let qt = Tensor::from_slice(&queries.data, (queries.rows, d), &dev)?;
    let text_t = kt
        .text
        .map(|p| Tensor::from_slice(&p.data, (p.rows, d), &dev))
        .transpose()?;
    let labels_u32: Vec<u32> = kt.key_labels.iter().map(|&l| l as u32).collect();
    let key_labels = Tensor::from_slice(&labels_u32, labels_u32.len(), &dev)?;
    let mut per_class = vec![0usize; c];
    for &l in &train.labels {
        per_class[l] += 1;
    }
    let mut state = ParamState {
        m: Mat::zeros(mk, d),
        v: Mat::zeros(mk, d),
        w: kt.keys.clone(),
    };
    let spe = steps_per_epoch(m, params.batch_size);
    let total = params.tip_epochs * spe;
    let mut losses = Vec::new();
    let mut epoch_cache: Option<(usize, Vec<Batch>)> = None;
    if kt.alpha == 0.0 {
        // The cache has no weight: nothing to learn (the zero-shot prior of the selection).
        return Ok((state.w, losses));
    }
    for step in 0..total {
        if cancel.is_cancelled() {
            return Err(AdapterError::Cancelled);
        }
        let epoch = step / spe;
        if epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            epoch_cache = Some((
                epoch,
                epoch_batches(params.seed, epoch, &train.labels, a, params.batch_size),
            ));
        }
        let Some((_, batches)) = epoch_cache.as_ref() else {
            continue;
        };
        let batch = &batches[step % spe];
        let b = batch.rows.len();
        let idx = Tensor::from_slice(&batch.rows, b, &dev)?;
        let z = qt.index_select(&idx, 0)?;
        let y = Tensor::from_slice(&batch.labels, b, &dev)?;
        let x = Var::from_slice(&state.w.data, (mk, d), &dev)?;
        let aff = z.matmul(&x.as_tensor().t()?)?;
        let mut e = aff.affine(kt.beta as f64, -(kt.beta as f64))?.exp()?;
        let mut cache_rescale = None;
        if kt.exclude_self {
            let (mask, rescale) = self_exclusion(&batch.rows, &batch.labels, m, &per_class, &kt);
            e = (e * Tensor::from_vec(mask, (b, mk), &dev)?)?;
            cache_rescale = Some(Tensor::from_vec(rescale, (b, c), &dev)?);
        }
        let mut cache = Tensor::zeros((b, c), DType::F32, &dev)?.index_add(&key_labels, &e, 1)?;
        if let Some(r) = cache_rescale {
            cache = (cache * r)?;
        }
        let mut logits = cache.affine(kt.alpha as f64, 0.0)?;
        if let Some(p) = &text_t {
            logits = (logits + z.matmul(&p.t()?)?.affine(params.logit_scale as f64, 0.0)?)?;
        }
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let lv = loss.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        let g = match grads.get(x.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; state.w.data.len()],
        };
        let h = AdamStep {
            lr: cosine_lr(params.tip_lr, step, total),
            beta1: params.adam_betas.0,
            beta2: params.adam_betas.1,
            eps: params.tip_eps,
            weight_decay: params.tip_weight_decay,
            t: step as u64 + 1,
        };
        if !lv.is_finite() || !adamw_update(&mut state, &g, &h) {
            return Err(AdapterError::NonFinite {
                step,
                what: kt.what.to_string(),
                last_good: None,
            });
        }
        losses.push((step, lv));
        on_event(&TrainEvent::Step {
            step: step + 1,
            total,
            epoch,
            loss: Some(lv),
        });
    }
    Ok((state.w, losses))
}

/// For a batch of stacked query rows (`row = view · m + image`): the B×M key mask that drops each query's
/// own keys, and the B×C factors that rescale its class sum by `n/(n − 1)` (module docs).
fn self_exclusion(
    rows: &[u32],
    labels: &[u32],
    m: usize,
    per_class: &[usize],
    kt: &KeyTraining,
) -> (Vec<f32>, Vec<f32>) {
    let (b, mk, c) = (rows.len(), kt.key_image.len(), kt.num_classes);
    let mut mask = vec![1.0f32; b * mk];
    let mut rescale = vec![1.0f32; b * c];
    for (r, (&row, &label)) in rows.iter().zip(labels).enumerate() {
        let n = per_class[label as usize];
        if n < 2 {
            continue;
        }
        let image = row as usize % m.max(1);
        for (k, &src) in kt.key_image.iter().enumerate() {
            if src == image {
                mask[r * mk + k] = 0.0;
            }
        }
        rescale[r * c + label as usize] = n as f32 / (n - 1) as f32;
    }
    (mask, rescale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_exclusion_drops_own_keys_only_for_classes_with_two_labels() {
        // 4 images (classes 0, 0, 1, 2), two views, per-view keys (key k comes from image k % 4).
        let key_image: Vec<usize> = (0..8).map(|k| k % 4).collect();
        let key_labels = [0, 0, 1, 2, 0, 0, 1, 2];
        let train = LabelledSplit::new(Mat::zeros(4, 2), vec![0, 0, 1, 2]);
        let kt = KeyTraining {
            text: None,
            keys: &Mat::zeros(8, 2),
            key_labels: &key_labels,
            key_image: &key_image,
            train: &train,
            num_classes: 3,
            alpha: 1.0,
            beta: 1.0,
            exclude_self: true,
            what: "keys",
        };
        // Rows: view 1 of image 1 (class 0, two labels), view 0 of image 2 (class 1, one label).
        let (mask, rescale) = self_exclusion(&[5, 2], &[0, 1], 4, &[2, 1, 1], &kt);
        assert_eq!(&mask[..8], &[1., 0., 1., 1., 1., 0., 1., 1.]);
        assert_eq!(&mask[8..], &[1.0; 8]);
        assert_eq!(rescale, vec![2.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
