//! The training run of HeGraphAdapter over any [`HeGraphBackend`]: the schedule, progress events,
//! cancellation, recovery from a non-finite step (the last good weights are handed back), and the classifier
//! that follows the graph layers.

use super::{forward_graph, HeGraphHyper, HeGraphState};
use crate::adapter::schedule::{cosine_lr, stack_queries, steps_per_epoch, StepBatches};
use crate::adapter::{
    AdapterError, AdapterTensors, BackendChoice, Fusion, HeGraphBackend, Method, TrainEvent,
    TrainInput, TrainParams, TrainedAdapter,
};
use crate::graph::{HeteroGraph, LabelledViewsRef};
use crate::progress::CancelToken;

fn adapter_from_state(
    graph: &HeteroGraph,
    params: &TrainParams,
    state: &HeGraphState,
    notes: &[String],
    losses: &[(usize, f32)],
    backend: &str,
) -> TrainedAdapter {
    let tensors = AdapterTensors {
        text: Some(graph.p.clone()),
        text_neg: graph.n.clone(),
        keys: Some(graph.cache_keys.clone()),
        fused_keys: None,
        key_labels: graph.cache_labels.clone(),
        visual: Some(graph.v.clone()),
        has_visual: graph.has_visual.clone(),
        w_p: Some(state.p.w.clone()),
        w_n: state.n.as_ref().map(|n| n.w.clone()),
        w_v: Some(state.v.w.clone()),
    };
    let mut a = TrainedAdapter::new(Method::HeGraph, &graph.classes, params, tensors);
    a.notes = notes.to_vec();
    a.losses = losses.to_vec();
    a.backend = Some(backend.to_string());
    a
}

pub(crate) fn train_hegraph(
    params: &TrainParams,
    input: &TrainInput,
    backend: BackendChoice,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedAdapter, AdapterError> {
    let text = input.text.ok_or(AdapterError::NeedsText {
        method: Method::HeGraph,
    })?;
    let train = input.train;
    if train.is_empty() {
        return Err(AdapterError::Input(
            "HeGraphAdapter needs at least one labelled image".into(),
        ));
    }
    let mut notes = Vec::new();
    let text_neg = if params.use_negative {
        input.text_neg
    } else {
        None
    };
    if input.text_neg.is_none() {
        notes.push(
            "no negative-text features: the graph was built without negative nodes (N, R_NP, R_NV and R_PN dropped)"
                .to_string(),
        );
    } else if !params.use_negative {
        notes.push("negative nodes disabled in the settings".to_string());
    }
    let labelled = LabelledViewsRef::from_split(train);
    let graph = HeteroGraph::build(
        input.classes,
        text,
        text_neg,
        &labelled,
        &params.graph_options(),
    )?;
    let without: Vec<&str> = graph
        .classes
        .iter()
        .zip(&graph.has_visual)
        .filter(|(_, &h)| !h)
        .map(|(c, _)| c.as_str())
        .collect();
    if !without.is_empty() {
        notes.push(format!(
            "{} class(es) without labelled images use their text node as visual node: {}",
            without.len(),
            without.join(", ")
        ));
    }
    if train.views.is_none() {
        notes.push(
            "the training images have no augmented views: every step uses each image's own feature as its query"
                .to_string(),
        );
    }

    let (queries, a) = stack_queries(train);
    let m = train.len();
    let spe = steps_per_epoch(m, params.batch_size);
    let total = params.epochs * spe;
    let init = HeGraphState::init_as(
        params.weight_init,
        graph.dim(),
        graph.has_negative(),
        params.seed,
    );
    if total == 0 {
        // The graph layers stay as they start (the adopted reading: zero, the identity graph).
        let mut adapter = adapter_from_state(&graph, params, &init, &notes, &[], "cpu");
        finish_classifier(&mut adapter, &graph, &init, params, input, cancel, on_event)?;
        return Ok(adapter);
    }

    let cpu = |state: HeGraphState| -> Result<Box<dyn HeGraphBackend>, AdapterError> {
        Ok(Box::new(crate::adapter::CpuBackend::new(
            &graph,
            &queries,
            params,
            Some(state),
        )?))
    };
    let (mut be, mut custom): (Box<dyn HeGraphBackend>, bool) = match backend {
        BackendChoice::Cpu => (cpu(init.clone())?, false),
        BackendChoice::Custom(f) => match f.create(&graph, &queries, params, init.clone()) {
            Ok(b) => (b, true),
            Err(e) => {
                let msg = format!(
                    "{} backend unavailable ({e}); training on the CPU",
                    f.name()
                );
                on_event(&TrainEvent::Message(msg.clone()));
                notes.push(msg);
                (cpu(init.clone())?, false)
            }
        },
    };
    let mut snapshot: Option<HeGraphState> = custom.then(|| init.clone());
    let mut losses: Vec<(usize, f32)> = Vec::new();
    let mut batches = StepBatches::new(params.seed, &train.labels, a, params.batch_size);
    let mut step = 0usize;
    let mut backend_name = be.name();

    while step < total {
        if cancel.is_cancelled() {
            return Err(AdapterError::Cancelled);
        }
        let (epoch, batch) = batches.get(step);
        let lr = cosine_lr(params.lr, step, total);
        let want =
            (params.loss_every > 0 && step.is_multiple_of(params.loss_every)) || step + 1 == total;

        let result = be
            .step(&batch.rows, &batch.labels, lr, want)
            .and_then(|loss| {
                if custom
                    && params.snapshot_every > 0
                    && (step + 1).is_multiple_of(params.snapshot_every)
                {
                    snapshot = Some(be.state()?);
                }
                Ok(loss)
            });
        match result {
            Ok(loss) => {
                if let Some(l) = loss {
                    if !l.is_finite() {
                        let good = be.state().ok().or(snapshot.take());
                        return Err(non_finite(
                            step,
                            "the training loss",
                            good,
                            &graph,
                            params,
                            &notes,
                            &losses,
                            &backend_name,
                        ));
                    }
                    losses.push((step, l));
                }
                step += 1;
                on_event(&TrainEvent::Step {
                    step,
                    total,
                    epoch,
                    loss,
                });
            }
            Err(AdapterError::DeviceLost(msg)) if custom => {
                let Some(st) = snapshot.take() else {
                    return Err(AdapterError::DeviceLost(msg));
                };
                let resume = st.step as usize;
                let text = format!(
                    "{backend_name}: device lost ({msg}); continuing on the CPU from step {resume} of {total}"
                );
                on_event(&TrainEvent::Message(text.clone()));
                notes.push(text);
                be = cpu(st)?;
                backend_name = format!("{} after {backend_name} was lost", be.name());
                custom = false;
                step = resume;
                losses.retain(|(s, _)| *s < resume);
            }
            Err(AdapterError::NonFinite { what, .. }) => {
                let good = be.state().ok().or(snapshot.take());
                return Err(non_finite(
                    step,
                    &what,
                    good,
                    &graph,
                    params,
                    &notes,
                    &losses,
                    &backend_name,
                ));
            }
            Err(e) => return Err(e),
        }
    }

    let state = be.state()?;
    drop(be);
    let mut adapter = adapter_from_state(&graph, params, &state, &notes, &losses, &backend_name);
    finish_classifier(
        &mut adapter,
        &graph,
        &state,
        params,
        input,
        cancel,
        on_event,
    )?;
    Ok(adapter)
}

/// What follows the graph layers: in the logit reading, `(α, β)` chosen and the cache keys trained on the
/// graph's outputs (module docs of [`crate::adapter`]); in the SPEC's, the fusion weight searched on validation.
fn finish_classifier(
    adapter: &mut TrainedAdapter,
    graph: &HeteroGraph,
    state: &HeGraphState,
    params: &TrainParams,
    input: &TrainInput,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(), AdapterError> {
    let val = input.val.filter(|v| !v.is_empty());
    if params.fusion == Fusion::Probability {
        if let Some(val) = val {
            if params.search_fusion_weight {
                let (w, acc) = search_fusion_weight(adapter, val, params.fusion_weight)?;
                adapter.fusion_weight = Some(w);
                adapter.val_accuracy = Some(acc);
            } else {
                adapter.val_accuracy = Some(adapter.accuracy(val)?);
            }
        }
        return Ok(());
    }
    let out = forward_graph(graph, &HeGraphHyper::test(params), &state.weights())?;
    let text = out.p_prime.normalized_rows();
    let keys0 = out.x_prime.normalized_rows();
    let key_labels = graph.cache_labels.clone();
    let key_image =
        crate::adapter::tip::key_images(params.cache_keys, keys0.rows, input.train.len());
    let cache = |k| crate::adapter::tip::CacheRef {
        keys: k,
        labels: &key_labels,
        image: &key_image,
    };
    let (initial, initial_sel) = {
        let c0 = cache(&keys0);
        crate::adapter::tip::choose(params, input, Some(&text), &c0)
    };
    let (keys, key_losses) = crate::adapter::keys::train_keys(
        params,
        crate::adapter::keys::KeyTraining {
            text: Some(&text),
            keys: &keys0,
            key_labels: &key_labels,
            key_image: &key_image,
            train: input.train,
            num_classes: input.classes.len(),
            alpha: initial.alpha,
            beta: initial.beta,
            exclude_self: params.self_exclude,
            what: "HeGraphAdapter's cache keys",
        },
        cancel,
        on_event,
    )?;
    let (found, sel) = match val {
        Some(_) => crate::adapter::tip::choose(params, input, Some(&text), &cache(&keys)),
        None => (initial, initial_sel),
    };
    let offset = state.step as usize;
    adapter
        .losses
        .extend(key_losses.into_iter().map(|(s, l)| (s + offset, l)));
    adapter.tensors.fused_keys = Some(keys);
    adapter.alpha = Some(found.alpha);
    adapter.beta = Some(found.beta);
    adapter.selection = Some(sel);
    if let Some(val) = val {
        adapter.val_accuracy = Some(adapter.accuracy(val)?);
    }
    Ok(())
}

/// The fusion weights tried on validation: 0 (text branch alone) and 24 values log-spaced from 0.01 to 10.
pub fn fusion_weight_grid() -> Vec<f32> {
    std::iter::once(0.0)
        .chain((0..25).map(|i| 10f32.powf(-2.0 + i as f32 / 8.0)))
        .collect()
}

/// The `w` with the best validation accuracy; among ties (frequent with a few validation images per class)
/// the one whose fused probabilities give the lowest validation cross-entropy. Returns `(w, accuracy)`.
fn search_fusion_weight(
    adapter: &TrainedAdapter,
    val: &crate::features::LabelledSplit,
    default: f32,
) -> Result<(f32, f32), AdapterError> {
    let z = val.features.normalized_rows();
    let (pt, pc) = adapter.hegraph_branches(&z)?;
    let c = pt.cols;
    let mut grid = fusion_weight_grid();
    grid.push(default.max(0.0));
    let mut best: Option<(f32, usize, f64)> = None;
    for w in grid {
        let mut hits = 0usize;
        let mut nll = 0.0f64;
        for (r, &y) in val.labels.iter().enumerate() {
            let f: Vec<f32> = (0..c)
                .map(|k| (pt.get(r, k) + w * pc.get(r, k)) / (1.0 + w))
                .collect();
            if crate::linalg::argmax(&f) == y {
                hits += 1;
            }
            nll -= (f[y].max(1e-30) as f64).ln();
        }
        let better = match best {
            None => true,
            Some((_, bh, bn)) => hits > bh || (hits == bh && nll < bn),
        };
        if better {
            best = Some((w, hits, nll));
        }
    }
    let (w, hits, _) = best.unwrap_or((default, 0, 0.0));
    Ok((w, hits as f32 / z.rows.max(1) as f32))
}

#[allow(clippy::too_many_arguments)]
fn non_finite(
    step: usize,
    what: &str,
    good: Option<HeGraphState>,
    graph: &HeteroGraph,
    params: &TrainParams,
    notes: &[String],
    losses: &[(usize, f32)],
    backend: &str,
) -> AdapterError {
    AdapterError::NonFinite {
        step,
        what: what.to_string(),
        last_good: good.filter(|s| s.is_finite()).map(|s| {
            Box::new(adapter_from_state(
                graph, params, &s, notes, losses, backend,
            ))
        }),
    }
}
