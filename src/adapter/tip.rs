//! The baselines: zero-shot CLIP, Tip-Adapter (training-free) and Tip-Adapter-F (trained cache keys), as in
//! Tip-Adapter's code (arXiv 2207.09519), plus their visual-only "cache only" forms for features without text.

use super::keys::{train_keys, KeyTraining};
use super::select::{
    cache_scores, search_leave_one_out, search_validation, Choice, LeaveOneOut, SearchResult,
    Selection,
};
use super::{
    accuracy_of, AdapterError, AdapterTensors, Method, TrainEvent, TrainInput, TrainParams,
    TrainedAdapter,
};
use crate::graph::{build_cache, CacheKeys, LabelledViewsRef};
use crate::linalg::Mat;
use crate::progress::CancelToken;

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
    key_image: Vec<usize>,
    text: Option<Mat>,
    notes: Vec<String>,
}

/// The labelled image each cache key comes from ([`build_cache`]'s layouts).
pub(crate) fn key_images(cache_keys: CacheKeys, num_keys: usize, num_images: usize) -> Vec<usize> {
    match cache_keys {
        CacheKeys::MeanOfViews => (0..num_keys).collect(),
        CacheKeys::PerView => (0..num_keys).map(|k| k % num_images.max(1)).collect(),
    }
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
    let key_image = key_images(params.cache_keys, keys.rows, input.train.len());
    let mut notes = Vec::new();
    let text = input.text.map(|t| t.normalized_rows());
    if text.is_none() {
        notes.push(format!(
            "no text features: {} runs on its cache alone (logits α·exp(−β(1 − z Xᵀ)) L, α a temperature)",
            method.title()
        ));
    }
    Ok(TipSetup {
        keys,
        key_labels,
        key_image,
        text,
        notes,
    })
}

/// The cache a Tip-style classifier is chosen for: keys, their labels, the image each key comes from.
pub(crate) struct CacheRef<'a> {
    pub keys: &'a Mat,
    pub labels: &'a [usize],
    pub image: &'a [usize],
}

/// `(α, β)` for the normalised text classifier `text` (None: cache only) and `cache`: searched on the
/// validation split when there is one, else by leave-one-out over the labelled images, else the prior
/// ([`super::select`]).
pub(crate) fn choose(
    params: &TrainParams,
    input: &TrainInput,
    text: Option<&Mat>,
    cache: &CacheRef,
) -> (SearchResult, Selection) {
    let c = input.classes.len();
    let done = |found: SearchResult, how: Choice| {
        let sel = Selection {
            alpha: found.alpha,
            beta: found.beta,
            how,
        };
        (found, sel)
    };
    if let Some(val) = input.val.filter(|v| !v.is_empty()) {
        let found = search_validation(
            &val.features.normalized_rows(),
            &val.labels,
            text,
            cache.keys,
            cache.labels,
            c,
            params.logit_scale,
            &params.search,
        );
        return done(found, Choice::Validation { images: val.len() });
    }
    let why = if params.leave_one_out {
        let queries = input.train.features.normalized_rows();
        let loo = LeaveOneOut {
            queries: &queries,
            labels: &input.train.labels,
            keys: cache.keys,
            key_labels: cache.labels,
            key_image: cache.image,
        };
        match search_leave_one_out(&loo, text, c, params.logit_scale, &params.search) {
            Some((found, images, classes)) => {
                return done(found, Choice::LeaveOneOut { images, classes })
            }
            None => "no validation split and no class with two labels to hold one out",
        }
    } else {
        "no validation split (leave-one-out disabled)"
    };
    let alpha = if text.is_some() {
        params.prior_alpha
    } else {
        params.tip_alpha
    };
    done(
        SearchResult {
            alpha,
            beta: params.tip_beta,
            accuracy: f32::NAN,
        },
        Choice::Prior { why: why.into() },
    )
}

fn finish(
    method: Method,
    params: &TrainParams,
    input: &TrainInput,
    s: TipSetup,
    found: SearchResult,
    selection: Selection,
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
    a.selection = Some(selection);
    a.val_accuracy = (input.val.is_some() && found.accuracy.is_finite()).then_some(found.accuracy);
    a.notes = notes;
    a.backend = Some("cpu".into());
    a
}

impl TipSetup {
    fn cache(&self) -> CacheRef<'_> {
        CacheRef {
            keys: &self.keys,
            labels: &self.key_labels,
            image: &self.key_image,
        }
    }
}

pub(crate) fn train_tip_adapter(
    params: &TrainParams,
    input: &TrainInput,
) -> Result<TrainedAdapter, AdapterError> {
    let s = setup(Method::TipAdapter, params, input)?;
    let notes = s.notes.clone();
    let (found, sel) = choose(params, input, s.text.as_ref(), &s.cache());
    Ok(finish(
        Method::TipAdapter,
        params,
        input,
        s,
        found,
        sel,
        notes,
    ))
}

/// Tip-Adapter-F ([`super::keys`]): the keys trained with the `(α, β)` chosen for the training-free cache,
/// then, with a validation split, `(α, β)` searched again with the trained keys (without one the first
/// choice stays: the trained keys have seen every labelled image).
pub(crate) fn train_tip_adapter_f(
    params: &TrainParams,
    input: &TrainInput,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedAdapter, AdapterError> {
    let mut s = setup(Method::TipAdapterF, params, input)?;
    let mut notes = s.notes.clone();
    let (initial, initial_sel) = choose(params, input, s.text.as_ref(), &s.cache());
    let (keys, losses) = train_keys(
        params,
        KeyTraining {
            text: s.text.as_ref(),
            keys: &s.keys,
            key_labels: &s.key_labels,
            key_image: &s.key_image,
            train: input.train,
            num_classes: input.classes.len(),
            alpha: initial.alpha,
            beta: initial.beta,
            exclude_self: false,
            what: "the Tip-Adapter-F cache keys",
        },
        cancel,
        on_event,
    )?;
    s.keys = keys;
    let (found, sel) = match input.val.filter(|v| !v.is_empty()) {
        Some(_) => choose(params, input, s.text.as_ref(), &s.cache()),
        None => (initial, initial_sel),
    };
    if input.train.views.is_none() {
        notes.push("the training images have no augmented views: the keys were trained on their own features".into());
    }
    let mut adapter = finish(Method::TipAdapterF, params, input, s, found, sel, notes);
    adapter.losses = losses;
    if let Some(val) = input.val.filter(|v| !v.is_empty()) {
        let p = adapter.predict(&val.features)?;
        adapter.val_accuracy = Some(accuracy_of(&p, &val.labels));
    }
    Ok(adapter)
}
