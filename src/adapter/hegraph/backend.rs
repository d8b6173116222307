//! The seam the CPU backends ([`crate::adapter::CpuBackend`] and [`super::CandleBackend`]) share: each builds
//! its own step, and starts it, checks its batches and commits its update through these, so that they
//! refuse the same inputs and recover from the same non-finite steps in the same way.

use super::{adamw_into, check_weights, AdamStep, HeGraphState};
use crate::adapter::{AdapterError, TrainParams};
use crate::graph::HeteroGraph;
use crate::linalg::Mat;

/// The state a CPU backend starts from (`None`: drawn from the seed), checked against the graph and queries.
pub(crate) fn starting_state(
    graph: &HeteroGraph,
    queries: &Mat,
    params: &TrainParams,
    state: Option<HeGraphState>,
) -> Result<HeGraphState, AdapterError> {
    let d = graph.dim();
    if queries.cols != d {
        return Err(AdapterError::Input(format!(
            "queries have dimension {} but the graph has {d}",
            queries.cols
        )));
    }
    let state = state.unwrap_or_else(|| HeGraphState::init(d, graph.has_negative(), params.seed));
    check_weights(graph.has_negative(), d, &state.weights())?;
    if graph.has_negative() != state.n.is_some() {
        return Err(AdapterError::Input(
            "the training state and the graph disagree on negative nodes".into(),
        ));
    }
    Ok(state)
}

/// A batch's rows index `n_rows` stacked queries and its labels `classes` classes.
pub(crate) fn check_batch(
    rows: &[u32],
    labels: &[u32],
    n_rows: usize,
    classes: usize,
) -> Result<(), AdapterError> {
    if rows.len() != labels.len() || rows.is_empty() {
        return Err(AdapterError::Input(format!(
            "a step needs as many labels as rows (got {} rows, {} labels)",
            rows.len(),
            labels.len()
        )));
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= n_rows) {
        return Err(AdapterError::Input(format!(
            "query row {r} is out of range ({n_rows} rows)"
        )));
    }
    if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(AdapterError::Input(format!(
            "label {l} is out of range ({classes} classes)"
        )));
    }
    Ok(())
}

/// Ends a CPU step: refuses a non-finite batch `loss`, else one AdamW update of all three weights from
/// gradients `(W_P, W_N, W_V)`, all or nothing: the new values go to `scratch` and are swapped in only when
/// every one is finite, so a diverging step leaves the last good weights in place (and says so).
pub(crate) fn commit_step(
    state: &mut HeGraphState,
    scratch: &mut HeGraphState,
    loss: f32,
    (gp, gn, gv): (&[f32], Option<&[f32]>, &[f32]),
    params: &TrainParams,
    lr: f32,
) -> Result<(), AdapterError> {
    if !loss.is_finite() {
        return Err(AdapterError::NonFinite {
            step: state.step as usize,
            what: "the training loss".into(),
            last_good: None,
        });
    }
    let h = AdamStep {
        lr,
        beta1: params.adam_betas.0,
        beta2: params.adam_betas.1,
        eps: params.adam_eps,
        weight_decay: params.weight_decay,
        t: state.step + 1,
    };
    let mut ok = adamw_into(&state.p, gp, &h, &mut scratch.p);
    ok &= adamw_into(&state.v, gv, &h, &mut scratch.v);
    if let (Some(n), Some(g), Some(out)) = (state.n.as_ref(), gn, scratch.n.as_mut()) {
        ok &= adamw_into(n, g, &h, out);
    }
    if !ok {
        return Err(AdapterError::NonFinite {
            step: state.step as usize,
            what: "the weights".into(),
            last_good: None,
        });
    }
    std::mem::swap(&mut state.p, &mut scratch.p);
    std::mem::swap(&mut state.v, &mut scratch.v);
    std::mem::swap(&mut state.n, &mut scratch.n);
    state.step += 1;
    Ok(())
}
