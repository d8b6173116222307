//! The baselines: zero-shot CLIP, Tip-Adapter (training-free) and Tip-Adapter-F (trained cache keys), as in
//! Tip-Adapter's code (arXiv 2207.09519), plus their visual-only "cache only" forms for features without text.

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use super::hegraph::{adamw_update, AdamStep, ParamState};
use super::schedule::{cosine_lr, epoch_batches, stack_queries, steps_per_epoch, Batch};
use super::{
    accuracy_of, AdapterError, AdapterTensors, Method, SearchGrid, TrainEvent, TrainInput,
    TrainParams, TrainedAdapter,
};
use crate::graph::{build_cache, LabelledViewsRef};
use crate::linalg::{argmax, Mat};
use crate::progress::CancelToken;

/// Best `(α, β)` found on validation and its accuracy (fraction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchResult {
    pub alpha: f32,
    pub beta: f32,
    pub accuracy: f32,
}

/// Tip-Adapter's search lists: `β_i = 0.1 + i (β_max − 0.1) / β_steps`, `i < β_steps`, likewise α.
pub fn search_grid(g: &SearchGrid) -> (Vec<f32>, Vec<f32>) {
    let list = |max: f32, steps: usize| -> Vec<f32> {
        (0..steps.max(1))
            .map(|i| i as f32 * (max - 0.1) / steps.max(1) as f32 + 0.1)
            .collect()
    };
    (
        list(g.beta_max, g.beta_steps),
        list(g.alpha_max, g.alpha_steps),
    )
}

/// Per-class sums of `exp(β (a − 1))` over the keys of each class, for each row of affinities `aff` (N×M).
fn cache_scores(aff: &Mat, key_labels: &[usize], c: usize, beta: f32) -> Mat {
    let mut out = Mat::zeros(aff.rows, c);
    out.data
        .par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(r, o)| {
            for (m, &a) in aff.row(r).iter().enumerate() {
                o[key_labels[m]] += (beta * (a - 1.0)).exp();
            }
        });
    out
}

/// `scale · z Pᵀ + α · exp(−β(1 − z Xᵀ)) L`; either term may be absent (`text` None: cache only).
pub fn tip_logits(
    z: &Mat,
    text: Option<&Mat>,
    cache: Option<(&Mat, &[usize])>,
    c: usize,
    scale: f32,
    alpha: f32,
    beta: f32,
) -> Mat {
    let mut out = match text {
        Some(p) => {
            let mut l = z.matmul_t(p);
            l.data.iter_mut().for_each(|x| *x *= scale);
            l
        }
        None => Mat::zeros(z.rows, c),
    };
    if let Some((keys, labels)) = cache {
        if keys.rows > 0 {
            let cs = cache_scores(&z.matmul_t(keys), labels, c, beta);
            for (o, s) in out.data.iter_mut().zip(&cs.data) {
                *o += alpha * s;
            }
        }
    }
    out
}

/// The temperatures tried for the cache-only logits `α · cache`: 49 values log-spaced from 0.1 to 1000.
pub fn cache_only_alpha_grid() -> Vec<f32> {
    (0..49)
        .map(|i| 10f32.powf(-1.0 + i as f32 / 12.0))
        .collect()
}

/// Mean cross-entropy of `softmax(α · scores)` against `labels`.
fn mean_xent(scores: &Mat, labels: &[usize], alpha: f32) -> f64 {
    let mut total = 0.0f64;
    for (r, &l) in labels.iter().enumerate() {
        let row = scores.row(r);
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(alpha * b));
        let lse = row
            .iter()
            .map(|&x| ((alpha * x - mx) as f64).exp())
            .sum::<f64>()
            .ln()
            + mx as f64;
        total += lse - (alpha * row[l]) as f64;
    }
    total / labels.len().max(1) as f64
}

/// Tip-Adapter's grid search (β outer, α inner, first best kept).
///
/// **(choice) Without text** the logits are `α · cache` alone: α no longer changes a prediction, only how sharp
/// the probabilities are, so it is chosen as a temperature (the lowest validation cross-entropy on
/// [`cache_only_alpha_grid`]), and among the β of equal validation accuracy the one with the lowest
/// cross-entropy wins. Fixing α = 1 instead left Tip-Adapter-F untrainable whenever the accuracy search
/// picked a small β: the class sums `Σ exp(β(a − 1))` are then almost equal, the softmax is flat, and the keys
/// learn nothing (oxford_flowers, 16 shots: 86.5 % after training, as before it; 94.4 % with the temperature).
#[allow(clippy::too_many_arguments)] // the operands of one formula, named as in the paper
fn search(
    val: &Mat,
    val_labels: &[usize],
    text: Option<&Mat>,
    keys: &Mat,
    key_labels: &[usize],
    c: usize,
    scale: f32,
    grid: &SearchGrid,
) -> SearchResult {
    let (betas, alphas) = search_grid(grid);
    let cache_only = text.is_none();
    let alphas = if cache_only {
        cache_only_alpha_grid()
    } else {
        alphas
    };
    let clip = text.map(|p| {
        let mut l = val.matmul_t(p);
        l.data.iter_mut().for_each(|x| *x *= scale);
        l
    });
    let aff = val.matmul_t(keys);
    // Best (α index, hits, cross-entropy) per β, computed in parallel, then reduced in Tip-Adapter's order.
    let per_beta: Vec<(usize, usize, f64)> = betas
        .par_iter()
        .map(|&beta| {
            let cs = cache_scores(&aff, key_labels, c, 0.0f32.max(beta));
            if cache_only {
                // The temperature is searched below, for the β of top accuracy only.
                let hits = val_labels
                    .iter()
                    .enumerate()
                    .filter(|&(r, &l)| argmax(cs.row(r)) == l)
                    .count();
                return (0, hits, f64::INFINITY);
            }
            let mut best = (0usize, 0usize, 0.0f64);
            let mut row = vec![0.0f32; c];
            for (ai, &alpha) in alphas.iter().enumerate() {
                let mut hits = 0usize;
                for (r, &l) in val_labels.iter().enumerate() {
                    for (k, o) in row.iter_mut().enumerate() {
                        *o = clip.as_ref().map(|m| m.get(r, k)).unwrap_or(0.0)
                            + alpha * cs.get(r, k);
                    }
                    if argmax(&row) == l {
                        hits += 1;
                    }
                }
                if ai == 0 || hits > best.1 {
                    best = (ai, hits, 0.0);
                }
            }
            best
        })
        .collect();
    let mut per_beta = per_beta;
    if cache_only {
        let top = per_beta.iter().map(|p| p.1).max().unwrap_or(0);
        per_beta
            .par_iter_mut()
            .zip(betas.par_iter())
            .filter(|(p, _)| p.1 == top)
            .for_each(|(p, &beta)| {
                let cs = cache_scores(&aff, key_labels, c, 0.0f32.max(beta));
                let (ai, nll) = alphas
                    .iter()
                    .enumerate()
                    .map(|(ai, &a)| (ai, mean_xent(&cs, val_labels, a)))
                    .fold((0, f64::INFINITY), |b, x| if x.1 < b.1 { x } else { b });
                p.0 = ai;
                p.2 = nll;
            });
    }
    let mut best = SearchResult {
        alpha: alphas[0],
        beta: betas[0],
        accuracy: -1.0,
    };
    let mut best_nll = f64::INFINITY;
    for (bi, &(ai, hits, nll)) in per_beta.iter().enumerate() {
        let acc = hits as f32 / val_labels.len().max(1) as f32;
        if acc > best.accuracy || (cache_only && acc == best.accuracy && nll < best_nll) {
            best = SearchResult {
                alpha: alphas[ai],
                beta: betas[bi],
                accuracy: acc,
            };
            best_nll = nll;
        }
    }
    best
}

pub(crate) fn train_zero_shot(
    params: &TrainParams,
    input: &TrainInput,
) -> Result<TrainedAdapter, AdapterError> {
    let text = input.text.ok_or(AdapterError::NeedsText {
        method: Method::ZeroShot,
    })?;
    let tensors = AdapterTensors {
        text: Some(text.normalized_rows()),
        ..Default::default()
    };
    let mut a = TrainedAdapter::new(Method::ZeroShot, input.classes, params, tensors);
    a.backend = Some("cpu".into());
    if let Some(val) = input.val.filter(|v| !v.is_empty()) {
        a.val_accuracy = Some(a.accuracy(val)?);
    }
    Ok(a)
}

/// The cache, the text classifier and the notes shared by both Tip-Adapters.
struct TipSetup {
    keys: Mat,
    key_labels: Vec<usize>,
    text: Option<Mat>,
    notes: Vec<String>,
}

fn setup(
    method: Method,
    params: &TrainParams,
    input: &TrainInput,
) -> Result<TipSetup, AdapterError> {
    if input.train.is_empty() {
        return Err(AdapterError::Input(format!(
            "{} needs at least one labelled image",
            method.title()
        )));
    }
    let labelled = LabelledViewsRef::from_split(input.train);
    let (keys, key_labels) = build_cache(&labelled, &params.graph_options());
    let mut notes = Vec::new();
    let text = input.text.map(|t| t.normalized_rows());
    if text.is_none() {
        notes.push(format!(
            "no text features: {} runs on its cache alone (logits α·exp(−β(1 − z Xᵀ)) L, α a temperature set on validation)",
            method.title()
        ));
    }
    Ok(TipSetup {
        keys,
        key_labels,
        text,
        notes,
    })
}

/// `(α, β)` on validation, or the defaults with a note.
fn search_or_default(
    params: &TrainParams,
    input: &TrainInput,
    s: &TipSetup,
    notes: &mut Vec<String>,
) -> SearchResult {
    let c = input.classes.len();
    match input.val.filter(|v| !v.is_empty()) {
        Some(val) => search(
            &val.features.normalized_rows(),
            &val.labels,
            s.text.as_ref(),
            &s.keys,
            &s.key_labels,
            c,
            params.logit_scale,
            &params.search,
        ),
        None => {
            notes.push(format!(
                "no validation images: α = {}, β = {} were not searched",
                params.tip_alpha, params.tip_beta
            ));
            SearchResult {
                alpha: params.tip_alpha,
                beta: params.tip_beta,
                accuracy: f32::NAN,
            }
        }
    }
}

fn finish(
    method: Method,
    params: &TrainParams,
    input: &TrainInput,
    s: TipSetup,
    found: SearchResult,
    notes: Vec<String>,
) -> TrainedAdapter {
    let cache_only = s.text.is_none();
    let tensors = AdapterTensors {
        text: s.text,
        keys: Some(s.keys),
        key_labels: s.key_labels,
        ..Default::default()
    };
    let mut a = TrainedAdapter::new(method, input.classes, params, tensors);
    a.cache_only = cache_only;
    a.alpha = Some(found.alpha);
    a.beta = Some(found.beta);
    a.val_accuracy = found.accuracy.is_finite().then_some(found.accuracy);
    a.notes = notes;
    a.backend = Some("cpu".into());
    a
}

pub(crate) fn train_tip_adapter(
    params: &TrainParams,
    input: &TrainInput,
) -> Result<TrainedAdapter, AdapterError> {
    let s = setup(Method::TipAdapter, params, input)?;
    let mut notes = s.notes.clone();
    let found = search_or_default(params, input, &s, &mut notes);
    Ok(finish(Method::TipAdapter, params, input, s, found, notes))
}

/// Tip-Adapter-F: the cache keys become trainable (initialised to the cache), trained with CE on
/// `scale · z Pᵀ + α exp(−β(1 − z Xᵀ)) L` (cache only: the second term alone) using the `(α, β)` of the
/// training-free search, then `(α, β)` are searched again with the trained keys. The keys are not
/// renormalised, as in Tip-Adapter's code.
pub(crate) fn train_tip_adapter_f(
    params: &TrainParams,
    input: &TrainInput,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedAdapter, AdapterError> {
    let mut s = setup(Method::TipAdapterF, params, input)?;
    let mut notes = s.notes.clone();
    let initial = search_or_default(params, input, &s, &mut notes);
    let alpha = initial.alpha;
    let beta = initial.beta;

    let dev = Device::Cpu;
    let c = input.classes.len();
    let (queries, a) = stack_queries(input.train);
    let m = input.train.len();
    let d = queries.cols;
    let qt = Tensor::from_slice(&queries.data, (queries.rows, d), &dev)?;
    let text_t = s
        .text
        .as_ref()
        .map(|p| Tensor::from_slice(&p.data, (p.rows, d), &dev))
        .transpose()?;
    let labels_u32: Vec<u32> = s.key_labels.iter().map(|&l| l as u32).collect();
    let key_labels = Tensor::from_slice(&labels_u32, labels_u32.len(), &dev)?;
    let mut state = ParamState {
        m: Mat::zeros(s.keys.rows, d),
        v: Mat::zeros(s.keys.rows, d),
        w: s.keys.clone(),
    };
    let spe = steps_per_epoch(m, params.batch_size);
    let total = params.tip_epochs * spe;
    let mut losses = Vec::new();
    let mut epoch_cache: Option<(usize, Vec<Batch>)> = None;
    for step in 0..total {
        if cancel.is_cancelled() {
            return Err(AdapterError::Cancelled);
        }
        let epoch = step / spe;
        if epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            epoch_cache = Some((
                epoch,
                epoch_batches(
                    params.seed,
                    epoch,
                    &input.train.labels,
                    a,
                    params.batch_size,
                ),
            ));
        }
        let Some((_, batches)) = epoch_cache.as_ref() else {
            continue;
        };
        let batch = &batches[step % spe];
        let idx = Tensor::from_slice(&batch.rows, batch.rows.len(), &dev)?;
        let z = qt.index_select(&idx, 0)?;
        let y = Tensor::from_slice(&batch.labels, batch.labels.len(), &dev)?;
        let x = Var::from_slice(&state.w.data, (state.w.rows, d), &dev)?;
        let aff = z.matmul(&x.as_tensor().t()?)?;
        let e = aff.affine(beta as f64, -(beta as f64))?.exp()?;
        let cache =
            Tensor::zeros((z.dim(0)?, c), DType::F32, &dev)?.index_add(&key_labels, &e, 1)?;
        let mut logits = cache.affine(alpha as f64, 0.0)?;
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
                what: "the Tip-Adapter-F cache keys".into(),
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
    s.keys = state.w;
    let found = match input.val.filter(|v| !v.is_empty()) {
        Some(_) => search_or_default(params, input, &s, &mut Vec::new()),
        None => SearchResult {
            alpha,
            beta,
            accuracy: f32::NAN,
        },
    };
    if input.train.views.is_none() {
        notes.push("the training images have no augmented views: the keys were trained on their own features".into());
    }
    let mut adapter = finish(Method::TipAdapterF, params, input, s, found, notes);
    adapter.losses = losses;
    if let Some(val) = input.val.filter(|v| !v.is_empty()) {
        let p = adapter.predict(&val.features)?;
        adapter.val_accuracy = Some(accuracy_of(&p, &val.labels));
    }
    Ok(adapter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::normalize;
    use crate::rng::Rng;

    /// Unit rows scattered around `centres` (one per label).
    fn around(rng: &mut Rng, centres: &Mat, labels: &[usize], noise: f32) -> Mat {
        let d = centres.cols;
        let mut m = Mat::zeros(labels.len(), d);
        for (r, &l) in labels.iter().enumerate() {
            let row = m.row_mut(r);
            for (o, (&c, n)) in row
                .iter_mut()
                .zip(centres.row(l).iter().zip(rng.normal_vec(d)))
            {
                *o = c + noise * n;
            }
            normalize(row);
        }
        m
    }

    /// A validation set every β classifies perfectly: β is then decided by cross-entropy alone, and α is the
    /// temperature of least cross-entropy. The search must find the pair a brute-force scan finds, and its
    /// softmax must be sharp (a flat one is what left Tip-Adapter-F untrained on oxford_flowers).
    #[test]
    fn cache_only_search_picks_a_temperature_and_breaks_beta_ties_by_cross_entropy() {
        let (c, d, shots) = (5, 16, 3);
        let mut rng = Rng::new(5);
        let mut centres = Mat::from_vec(c, d, rng.normal_vec(c * d));
        centres.l2_normalize_rows();
        let key_labels: Vec<usize> = (0..c * shots).map(|i| i / shots).collect();
        let val_labels: Vec<usize> = (0..c * 4).map(|i| i / 4).collect();
        let keys = around(&mut rng, &centres, &key_labels, 0.05);
        let val = around(&mut rng, &centres, &val_labels, 0.05);
        let grid = SearchGrid::default();
        let got = search(&val, &val_labels, None, &keys, &key_labels, c, 100.0, &grid);
        assert_eq!(got.accuracy, 1.0);

        let (betas, _) = search_grid(&grid);
        let alphas = cache_only_alpha_grid();
        let aff = val.matmul_t(&keys);
        let mut best = (f64::INFINITY, 0.0f32, 0.0f32);
        for &beta in &betas {
            let cs = cache_scores(&aff, &key_labels, c, beta);
            for &alpha in &alphas {
                let nll = mean_xent(&cs, &val_labels, alpha);
                if nll < best.0 {
                    best = (nll, beta, alpha);
                }
            }
        }
        assert_eq!(
            (got.beta, got.alpha),
            (best.1, best.2),
            "cross-entropy {}",
            best.0
        );
        assert!(
            best.0 < 0.5,
            "the chosen temperature leaves a flat softmax: {}",
            best.0
        );
    }

    /// With text the grid is Tip-Adapter's: α from its list, the first (β, α) of top accuracy.
    #[test]
    fn search_with_text_keeps_tip_adapters_grid() {
        let (c, d, shots) = (4, 12, 2);
        let mut rng = Rng::new(6);
        let mut centres = Mat::from_vec(c, d, rng.normal_vec(c * d));
        centres.l2_normalize_rows();
        let key_labels: Vec<usize> = (0..c * shots).map(|i| i / shots).collect();
        let val_labels: Vec<usize> = (0..c * 3).map(|i| i / 3).collect();
        let keys = around(&mut rng, &centres, &key_labels, 0.3);
        let val = around(&mut rng, &centres, &val_labels, 0.3);
        let grid = SearchGrid::default();
        let got = search(
            &val,
            &val_labels,
            Some(&centres),
            &keys,
            &key_labels,
            c,
            100.0,
            &grid,
        );
        let (betas, alphas) = search_grid(&grid);
        assert!(alphas.contains(&got.alpha) && betas.contains(&got.beta));
        assert!(got.accuracy > 0.5, "{got:?}");
    }
}
