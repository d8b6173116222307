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
//! only ever push keys away). Measured with `hegraph eval` (3 seeds, against the same training with the key
//! kept): stanford_cars_even −0.2 / +0.9 / +1.4 / 0 points at 2 / 4 / 8 / 16 shots without a validation
//! split and +0.7 / 0 / +1.0 / −0.7 with one; oxford_pets25 within ±0.4. Tip-Adapter-F itself keeps
//! Tip-Adapter's recipe (`self_exclude` applies to HeGraphAdapter only).

//!
//! The step is written by hand on `gemm` (two products per step, `z Kᵀ` and the keys' gradient `Gᵀ z`; the
//! text logits of every training query are computed once, since `P` is fixed): with candle's autodiff the
//! interactive retrain (50 classes × 16 shots × 10 views) spent 1.2 s here, most of it per-operation
//! overhead. The test holds it to candle's autodiff of the same loss.

use super::hegraph::{adamw_into, AdamStep, ParamState};
use super::schedule::{cosine_lr, stack_queries, StepBatches};
use super::{AdapterError, TrainEvent, TrainParams};
use crate::features::LabelledSplit;
use crate::linalg::{fast_exp, gemm, Mat, Tr};
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

/// The operands of one step: the batch's queries, their fixed text logits, mask and rescaling.
struct StepInput<'a> {
    z: &'a Mat,
    text_logits: Option<&'a Mat>,
    labels: &'a [u32],
    /// B×M, 0 where a key is the query's own (self-exclusion), else 1; None: all 1.
    mask: Option<&'a [f32]>,
    /// B×C factors of the cache sums; None: all 1.
    rescale: Option<&'a [f32]>,
}

/// Mean cross-entropy of `α · rescale ⊙ (exp(β(z Kᵀ − 1)) ⊙ mask) L + text_logits` over the batch, and its
/// gradient with respect to `K` (written into `grad`, M×D).
fn loss_and_grad(
    x: &Mat,
    key_labels: &[usize],
    c: usize,
    alpha: f32,
    beta: f32,
    s: &StepInput,
    grad: &mut [f32],
) -> f32 {
    let (b, d, mk) = (s.z.rows, s.z.cols, x.rows);
    let mut e = vec![0.0f32; b * mk];
    gemm(
        &mut e,
        (b, mk, d),
        &s.z.data,
        Tr::N,
        &x.data,
        Tr::T,
        1.0,
        0.0,
    );
    for (i, v) in e.iter_mut().enumerate() {
        let m = s.mask.map_or(1.0, |mask| mask[i]);
        *v = m * fast_exp(beta * (*v - 1.0));
    }
    let mut logits = vec![0.0f32; b * c];
    for r in 0..b {
        let row = &mut logits[r * c..(r + 1) * c];
        for (m, &v) in e[r * mk..(r + 1) * mk].iter().enumerate() {
            row[key_labels[m]] += v;
        }
        for (k, o) in row.iter_mut().enumerate() {
            let f = s.rescale.map_or(1.0, |rs| rs[r * c + k]);
            *o *= alpha * f;
            if let Some(t) = s.text_logits {
                *o += t.get(r, k);
            }
        }
    }
    // Softmax cross-entropy; `logits` becomes ∂loss/∂logits.
    let mut loss = 0.0f64;
    let inv_b = 1.0 / b.max(1) as f32;
    for r in 0..b {
        let row = &mut logits[r * c..(r + 1) * c];
        let y = s.labels[r] as usize;
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = fast_exp(*v - mx);
            sum += *v;
        }
        loss += (sum.ln() - (row[y].ln())) as f64;
        for (k, v) in row.iter_mut().enumerate() {
            *v = (*v / sum - if k == y { 1.0 } else { 0.0 }) * inv_b;
        }
    }
    // ∂loss/∂(z Kᵀ)[r, m] = α · rescale[r, label m] · ∂loss/∂logits[r, label m] · β · e[r, m].
    for r in 0..b {
        let g = &logits[r * c..(r + 1) * c];
        for (m, v) in e[r * mk..(r + 1) * mk].iter_mut().enumerate() {
            let k = key_labels[m];
            let f = s.rescale.map_or(1.0, |rs| rs[r * c + k]);
            *v *= alpha * f * g[k] * beta;
        }
    }
    gemm(grad, (mk, d, b), &e, Tr::T, &s.z.data, Tr::N, 1.0, 0.0);
    (loss / b.max(1) as f64) as f32
}

pub(crate) fn train_keys(
    params: &TrainParams,
    kt: KeyTraining,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedKeys, AdapterError> {
    let c = kt.num_classes;
    let train = kt.train;
    let (queries, a) = stack_queries(train);
    let m = train.len();
    let d = queries.cols;
    let mk = kt.keys.rows;
    // The text logits of every training query, once: `P` does not change.
    let text_logits = kt.text.map(|p| {
        let mut l = queries.matmul_t(p);
        l.data.iter_mut().for_each(|x| *x *= params.logit_scale);
        l
    });
    let mut per_class = vec![0usize; c];
    for &l in &train.labels {
        per_class[l] += 1;
    }
    let mut state = ParamState {
        m: Mat::zeros(mk, d),
        v: Mat::zeros(mk, d),
        w: kt.keys.clone(),
    };
    let mut next = state.clone();
    let mut grad = vec![0.0f32; mk * d];
    let mut batches = StepBatches::new(params.seed, &train.labels, a, params.batch_size);
    let total = params.tip_epochs * batches.per_epoch();
    let mut losses = Vec::new();
    if kt.alpha == 0.0 {
        // The cache has no weight (α = 0): nothing to learn.
        return Ok((state.w, losses));
    }
    for step in 0..total {
        if cancel.is_cancelled() {
            return Err(AdapterError::Cancelled);
        }
        let (epoch, batch) = batches.get(step);
        let rows: Vec<usize> = batch.rows.iter().map(|&r| r as usize).collect();
        let z = queries.select_rows(&rows);
        let tl = text_logits.as_ref().map(|t| t.select_rows(&rows));
        let exclusion = kt
            .exclude_self
            .then(|| self_exclusion(&batch.rows, &batch.labels, m, &per_class, &kt));
        let input = StepInput {
            z: &z,
            text_logits: tl.as_ref(),
            labels: &batch.labels,
            mask: exclusion.as_ref().map(|(mask, _)| mask.as_slice()),
            rescale: exclusion.as_ref().map(|(_, r)| r.as_slice()),
        };
        let lv = loss_and_grad(
            &state.w,
            kt.key_labels,
            c,
            kt.alpha,
            kt.beta,
            &input,
            &mut grad,
        );
        let h = AdamStep {
            lr: cosine_lr(params.tip_lr, step, total),
            beta1: params.adam_betas.0,
            beta2: params.adam_betas.1,
            eps: params.tip_eps,
            weight_decay: params.tip_weight_decay,
            t: step as u64 + 1,
        };
        if !lv.is_finite() || !adamw_into(&state, &grad, &h, &mut next) {
            return Err(AdapterError::NonFinite {
                step,
                what: kt.what.to_string(),
                last_good: None,
            });
        }
        std::mem::swap(&mut state, &mut next);
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
    use crate::rng::Rng;
    use candle_core::{DType, Device, Tensor, Var};

    /// The same loss through candle's autodiff: the oracle of the hand-written step.
    fn candle_loss_and_grad(
        x: &Mat,
        key_labels: &[usize],
        c: usize,
        alpha: f32,
        beta: f32,
        s: &StepInput,
    ) -> (f32, Vec<f32>) {
        let dev = Device::Cpu;
        let (b, d, mk) = (s.z.rows, s.z.cols, x.rows);
        let z = Tensor::from_slice(&s.z.data, (b, d), &dev).unwrap();
        let xv = Var::from_slice(&x.data, (mk, d), &dev).unwrap();
        let kl: Vec<u32> = key_labels.iter().map(|&l| l as u32).collect();
        let kl = Tensor::from_slice(&kl, mk, &dev).unwrap();
        let aff = z.matmul(&xv.as_tensor().t().unwrap()).unwrap();
        let mut e = aff
            .affine(beta as f64, -(beta as f64))
            .unwrap()
            .exp()
            .unwrap();
        if let Some(mask) = s.mask {
            e = (e * Tensor::from_slice(mask, (b, mk), &dev).unwrap()).unwrap();
        }
        let mut cache = Tensor::zeros((b, c), DType::F32, &dev)
            .unwrap()
            .index_add(&kl, &e, 1)
            .unwrap();
        if let Some(r) = s.rescale {
            cache = (cache * Tensor::from_slice(r, (b, c), &dev).unwrap()).unwrap();
        }
        let mut logits = cache.affine(alpha as f64, 0.0).unwrap();
        if let Some(t) = s.text_logits {
            logits = (logits + Tensor::from_slice(&t.data, (b, c), &dev).unwrap()).unwrap();
        }
        let y = Tensor::from_slice(s.labels, b, &dev).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let g = loss.backward().unwrap();
        let grad = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (loss.to_scalar::<f32>().unwrap(), grad)
    }

    /// The hand-written step against candle's autodiff: 1×1, 7×7×7 and odd shapes, with and without text,
    /// mask and rescaling.
    #[test]
    fn the_key_step_matches_candles_autodiff() {
        let mut rng = Rng::new(41);
        for &(b, mk, d, c) in &[
            (1usize, 1usize, 1usize, 1usize),
            (7, 7, 7, 3),
            (13, 29, 17, 5),
        ] {
            for with_extras in [false, true] {
                let mut z = Mat::from_vec(b, d, rng.normal_vec(b * d));
                z.l2_normalize_rows();
                let mut x = Mat::from_vec(mk, d, rng.normal_vec(mk * d));
                x.l2_normalize_rows();
                let key_labels: Vec<usize> = (0..mk).map(|m| m % c).collect();
                let labels: Vec<u32> = (0..b).map(|r| (r % c) as u32).collect();
                let tl = Mat::from_vec(b, c, rng.normal_vec(b * c));
                let mask: Vec<f32> = (0..b * mk)
                    .map(|i| if i % 5 == 0 { 0.0 } else { 1.0 })
                    .collect();
                let rescale: Vec<f32> = (0..b * c).map(|i| 1.0 + (i % 3) as f32 * 0.5).collect();
                let s = StepInput {
                    z: &z,
                    text_logits: with_extras.then_some(&tl),
                    labels: &labels,
                    mask: with_extras.then_some(mask.as_slice()),
                    rescale: with_extras.then_some(rescale.as_slice()),
                };
                let (alpha, beta) = (1.7, 5.5);
                let mut grad = vec![f32::NAN; mk * d];
                let loss = loss_and_grad(&x, &key_labels, c, alpha, beta, &s, &mut grad);
                let (want_loss, want_grad) =
                    candle_loss_and_grad(&x, &key_labels, c, alpha, beta, &s);
                assert!(
                    (loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
                    "{b}×{mk}×{d}: {loss} vs {want_loss}"
                );
                let scale = want_grad.iter().fold(1e-6f32, |a, g| a.max(g.abs()));
                for (g, w) in grad.iter().zip(&want_grad) {
                    assert!((g - w).abs() <= 1e-4 * scale, "{b}×{mk}×{d}: {g} vs {w}");
                }
            }
        }
    }

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
