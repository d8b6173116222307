//! The heterogeneous graph of HeGraphAdapter: `C` positive-text, `C` negative-text and `C` visual nodes, and
//! six typed edge sets between them (SPEC "Nodes", "Edges"). The GUI draws from this same type.
//!
//! Choices (the SPEC leaves them open):
//! - **Cache keys**: one key per labelled image, the normalised mean of its views ([`CacheKeys::MeanOfViews`],
//!   Tip-Adapter's cache); [`CacheKeys::PerView`] keeps every view as its own key.
//! - **Classes without a labelled image** (interactive use: a class was just added): the visual node is the
//!   class's positive text node, `V_c = P_c`, and `has_visual[c]` is false, so the class still takes part in
//!   the graph and can be predicted from text alone until images are labelled.
//! - **Degree normalisation** of a signed, possibly non-square-in-meaning edge matrix `R` (target rows `i`,
//!   source columns `j`): `dr_i = 1 + Σ_j |R_ij|`, `dc_j = 1 + Σ_i |R_ij|`, `Â = diag(dr^{-1/2}) R
//!   diag(dc^{-1/2})`, self coefficient `s_i = 1/dr_i`. Absolute values keep the degrees positive with the
//!   sign-flipped diagonals; the "+1" is the self loop of GCN. Everything here is frozen (no gradient).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::linalg::{mean_normalized, Mat};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("the graph needs at least one class")]
    NoClasses,
    #[error("{what} has {got} rows but there are {classes} classes")]
    RowsMismatch {
        what: &'static str,
        got: usize,
        classes: usize,
    },
    #[error("{what} has dimension {got} but the text features have {expected}; use features of one CLIP model")]
    DimMismatch {
        what: String,
        got: usize,
        expected: usize,
    },
    #[error("labelled image {index} has label {label}, but there are only {classes} classes")]
    LabelOutOfRange {
        index: usize,
        label: usize,
        classes: usize,
    },
    #[error("{what} contains NaN or infinity; re-extract the features")]
    NonFinite { what: String },
    #[error("labelled images: {0}")]
    Labelled(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum NodeType {
    PositiveText,
    NegativeText,
    Visual,
}

impl NodeType {
    pub const ALL: [NodeType; 3] = [
        NodeType::PositiveText,
        NodeType::NegativeText,
        NodeType::Visual,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            NodeType::PositiveText => "positive text",
            NodeType::NegativeText => "negative text",
            NodeType::Visual => "visual",
        }
    }
}

/// `R_ab`: edges into nodes of type `a` from nodes of type `b` (e.g. `PV`: into positive text from visual).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum EdgeType {
    PP,
    PV,
    PN,
    NP,
    NV,
    VV,
}

impl EdgeType {
    pub const ALL: [EdgeType; 6] = [
        EdgeType::PP,
        EdgeType::PV,
        EdgeType::PN,
        EdgeType::NP,
        EdgeType::NV,
        EdgeType::VV,
    ];

    pub fn target(&self) -> NodeType {
        match self {
            EdgeType::PP | EdgeType::PV | EdgeType::PN => NodeType::PositiveText,
            EdgeType::NP | EdgeType::NV => NodeType::NegativeText,
            EdgeType::VV => NodeType::Visual,
        }
    }

    pub fn source(&self) -> NodeType {
        match self {
            EdgeType::PP | EdgeType::NP => NodeType::PositiveText,
            EdgeType::PN => NodeType::NegativeText,
            EdgeType::PV | EdgeType::NV | EdgeType::VV => NodeType::Visual,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            EdgeType::PP => "P←P",
            EdgeType::PV => "P←V",
            EdgeType::PN => "P←N",
            EdgeType::NP => "N←P",
            EdgeType::NV => "N←V",
            EdgeType::VV => "V←V",
        }
    }

    /// Text ↔ image edges (the SPEC's "inter-modality"); P/N edges join two kinds of text.
    pub fn is_inter_modality(&self) -> bool {
        matches!(self, EdgeType::PV | EdgeType::NV)
    }

    /// Whether the diagonal (a class's edge to its own other-type node) has its sign flipped; the same-type
    /// edge sets instead have a zero diagonal (no self edge), see [`EdgeType::zero_diagonal`].
    pub fn flips_diagonal(&self) -> bool {
        matches!(self, EdgeType::PN | EdgeType::NP | EdgeType::NV)
    }

    pub fn zero_diagonal(&self) -> bool {
        matches!(self, EdgeType::PP | EdgeType::VV)
    }

    /// Edges that exist only when the graph has negative-text nodes.
    pub fn needs_negative(&self) -> bool {
        self.target() == NodeType::NegativeText || self.source() == NodeType::NegativeText
    }
}

/// Which rows make up the Tip-Adapter cache (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum CacheKeys {
    #[default]
    MeanOfViews,
    PerView,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct GraphOptions {
    pub cache_keys: CacheKeys,
}

/// The labelled images the visual side is built from: `views[a]` is M×D, view `a` of every image (a single
/// entry when only one feature per image exists), `labels[m]` the class of image `m`.
#[derive(Clone, Copy, Debug)]
pub struct LabelledViewsRef<'a> {
    pub views: &'a [Mat],
    pub labels: &'a [usize],
}

impl<'a> LabelledViewsRef<'a> {
    /// The split's views when it has them, else its features as a single view.
    pub fn from_split(split: &'a crate::features::LabelledSplit) -> Self {
        let views = match &split.views {
            Some(v) if !v.is_empty() => v.as_slice(),
            _ => std::slice::from_ref(&split.features),
        };
        Self {
            views,
            labels: &split.labels,
        }
    }

    pub fn num_images(&self) -> usize {
        self.labels.len()
    }

    pub fn num_views(&self) -> usize {
        self.views.len()
    }
}

/// A degree-normalised edge set: `a_hat` (C×C, target rows) and the self coefficient `s_i = 1/dr_i` of every
/// target node.
#[derive(Clone, Debug, PartialEq)]
pub struct NormEdges {
    pub a_hat: Mat,
    pub self_coef: Vec<f32>,
}

/// The graph. Node features are L2-normalised rows; edge matrices are `C×C` with target rows.
#[derive(Clone, Debug, PartialEq)]
pub struct HeteroGraph {
    pub classes: Vec<String>,
    pub p: Mat,
    pub n: Option<Mat>,
    pub v: Mat,
    pub cache_keys: Mat,
    pub cache_labels: Vec<usize>,
    pub has_visual: Vec<bool>,
    pub options: GraphOptions,
    edges: HashMap<EdgeType, Mat>,
}

impl HeteroGraph {
    pub fn build(
        classes: &[String],
        p: &Mat,
        n: Option<&Mat>,
        labelled: &LabelledViewsRef,
        opts: &GraphOptions,
    ) -> Result<Self, GraphError> {
        let c = classes.len();
        let d = p.cols;
        check_nodes(c, d, p, n)?;
        let m = labelled.num_images();
        if labelled.views.is_empty() {
            return Err(GraphError::Labelled("no view matrix given".into()));
        }
        for (a, v) in labelled.views.iter().enumerate() {
            if v.rows != m {
                return Err(GraphError::Labelled(format!(
                    "view {a} has {} rows for {m} labels",
                    v.rows
                )));
            }
            if v.cols != d {
                return Err(GraphError::DimMismatch {
                    what: format!("labelled view {a}"),
                    got: v.cols,
                    expected: d,
                });
            }
            if !v.is_finite() {
                return Err(GraphError::NonFinite {
                    what: format!("labelled view {a}"),
                });
            }
        }
        if let Some((index, &label)) = labelled.labels.iter().enumerate().find(|(_, &l)| l >= c) {
            return Err(GraphError::LabelOutOfRange {
                index,
                label,
                classes: c,
            });
        }

        // Visual nodes: mean over every view of every image of the class.
        let mut sums = vec![vec![0.0f32; d]; c];
        let mut counts = vec![0usize; c];
        for view in labelled.views {
            for (i, &l) in labelled.labels.iter().enumerate() {
                counts[l] += 1;
                for (s, x) in sums[l].iter_mut().zip(view.row(i)) {
                    *s += x;
                }
            }
        }
        let p_norm = p.normalized_rows();
        let mut v = Mat::zeros(c, d);
        let mut has_visual = vec![false; c];
        for k in 0..c {
            if counts[k] > 0 {
                let row = mean_normalized(&[&sums[k]], d);
                v.row_mut(k).copy_from_slice(&row);
                has_visual[k] = true;
            } else {
                v.row_mut(k).copy_from_slice(p_norm.row(k));
            }
        }

        let (keys, key_labels) = build_cache(labelled, opts);

        Self::from_nodes(classes, p, n, &v, has_visual, keys, key_labels, opts)
    }

    /// Rebuilds a graph from its nodes and cache (e.g. from a saved adapter); edges are recomputed, since they
    /// are a pure function of the node features.
    #[allow(clippy::too_many_arguments)]
    pub fn from_nodes(
        classes: &[String],
        p: &Mat,
        n: Option<&Mat>,
        v: &Mat,
        has_visual: Vec<bool>,
        cache_keys: Mat,
        cache_labels: Vec<usize>,
        opts: &GraphOptions,
    ) -> Result<Self, GraphError> {
        let c = classes.len();
        let d = p.cols;
        check_nodes(c, d, p, n)?;
        if v.rows != c {
            return Err(GraphError::RowsMismatch {
                what: "visual nodes",
                got: v.rows,
                classes: c,
            });
        }
        if v.cols != d || cache_keys.cols != d {
            return Err(GraphError::DimMismatch {
                what: "visual nodes / cache keys".into(),
                got: if v.cols != d { v.cols } else { cache_keys.cols },
                expected: d,
            });
        }
        if has_visual.len() != c || cache_labels.len() != cache_keys.rows {
            return Err(GraphError::Labelled(format!(
                "{} has_visual flags for {c} classes, {} cache labels for {} keys",
                has_visual.len(),
                cache_labels.len(),
                cache_keys.rows
            )));
        }
        if let Some((index, &label)) = cache_labels.iter().enumerate().find(|(_, &l)| l >= c) {
            return Err(GraphError::LabelOutOfRange {
                index,
                label,
                classes: c,
            });
        }
        if !v.is_finite() || !cache_keys.is_finite() {
            return Err(GraphError::NonFinite {
                what: "visual nodes or cache keys".into(),
            });
        }
        let p = p.normalized_rows();
        let n = n.map(|n| n.normalized_rows());
        let v = v.normalized_rows();
        let mut edges = HashMap::new();
        for t in EdgeType::ALL {
            let node = |ty: NodeType| match ty {
                NodeType::PositiveText => Some(&p),
                NodeType::NegativeText => n.as_ref(),
                NodeType::Visual => Some(&v),
            };
            let (Some(a), Some(b)) = (node(t.target()), node(t.source())) else {
                continue;
            };
            let mut r = a.matmul_t(b);
            for i in 0..c {
                if t.zero_diagonal() {
                    r.set(i, i, 0.0);
                } else if t.flips_diagonal() {
                    r.set(i, i, -r.get(i, i));
                }
            }
            edges.insert(t, r);
        }
        Ok(Self {
            classes: classes.to_vec(),
            p,
            n,
            v,
            cache_keys,
            cache_labels,
            has_visual,
            options: *opts,
            edges,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    pub fn dim(&self) -> usize {
        self.p.cols
    }

    pub fn has_negative(&self) -> bool {
        self.n.is_some()
    }

    pub fn node_features(&self, t: NodeType) -> Option<&Mat> {
        match t {
            NodeType::PositiveText => Some(&self.p),
            NodeType::NegativeText => self.n.as_ref(),
            NodeType::Visual => Some(&self.v),
        }
    }

    /// The raw signed weights `R_ab` (after the diagonal rules); `None` for the negative edge sets of a graph
    /// without negative nodes.
    pub fn edges(&self, t: EdgeType) -> Option<&Mat> {
        self.edges.get(&t)
    }

    /// The degree-normalised edges (module docs).
    pub fn normalized(&self, t: EdgeType) -> Option<NormEdges> {
        self.edges(t).map(normalize_edges)
    }
}

/// Tip-Adapter's cache from labelled views: keys (normalised rows) and their labels (module docs for
/// [`CacheKeys`]).
pub fn build_cache(labelled: &LabelledViewsRef, opts: &GraphOptions) -> (Mat, Vec<usize>) {
    let m = labelled.num_images();
    let d = labelled.views.first().map(|v| v.cols).unwrap_or(0);
    match opts.cache_keys {
        CacheKeys::MeanOfViews => {
            let mut keys = Mat::zeros(m, d);
            for i in 0..m {
                let rows: Vec<&[f32]> = labelled.views.iter().map(|vw| vw.row(i)).collect();
                keys.row_mut(i).copy_from_slice(&mean_normalized(&rows, d));
            }
            (keys, labelled.labels.to_vec())
        }
        CacheKeys::PerView => {
            let a = labelled.views.len();
            let mut keys = Mat::zeros(a * m, d);
            let mut labels = Vec::with_capacity(a * m);
            for (ai, vw) in labelled.views.iter().enumerate() {
                for i in 0..m {
                    keys.row_mut(ai * m + i).copy_from_slice(vw.row(i));
                    labels.push(labelled.labels[i]);
                }
            }
            keys.l2_normalize_rows();
            (keys, labels)
        }
    }
}

/// `Â = diag(dr^{-1/2}) R diag(dc^{-1/2})`, `s = 1/dr` (module docs).
pub fn normalize_edges(r: &Mat) -> NormEdges {
    let dr: Vec<f32> = (0..r.rows)
        .map(|i| 1.0 + r.row(i).iter().map(|x| x.abs()).sum::<f32>())
        .collect();
    let mut dc = vec![1.0f32; r.cols];
    for i in 0..r.rows {
        for (d, x) in dc.iter_mut().zip(r.row(i)) {
            *d += x.abs();
        }
    }
    let mut a_hat = r.clone();
    for (i, d) in dr.iter().enumerate() {
        let ri = 1.0 / d.sqrt();
        for (x, c) in a_hat.row_mut(i).iter_mut().zip(&dc) {
            *x *= ri / c.sqrt();
        }
    }
    NormEdges {
        a_hat,
        self_coef: dr.iter().map(|d| 1.0 / d).collect(),
    }
}

fn check_nodes(c: usize, d: usize, p: &Mat, n: Option<&Mat>) -> Result<(), GraphError> {
    if c == 0 {
        return Err(GraphError::NoClasses);
    }
    if p.rows != c {
        return Err(GraphError::RowsMismatch {
            what: "positive text features",
            got: p.rows,
            classes: c,
        });
    }
    if !p.is_finite() {
        return Err(GraphError::NonFinite {
            what: "positive text features".into(),
        });
    }
    if let Some(n) = n {
        if n.rows != c {
            return Err(GraphError::RowsMismatch {
                what: "negative text features",
                got: n.rows,
                classes: c,
            });
        }
        if n.cols != d {
            return Err(GraphError::DimMismatch {
                what: "negative text features".into(),
                got: n.cols,
                expected: d,
            });
        }
        if !n.is_finite() {
            return Err(GraphError::NonFinite {
                what: "negative text features".into(),
            });
        }
    }
    Ok(())
}
