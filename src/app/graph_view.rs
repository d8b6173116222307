//! The graph view: the heterogeneous graph drawn as nodes (positive text, negative text, visual; one per class
//! and type) and the six edge types.
//!
//! Split in two so the part that decides *what* is drawn can be tested without a window:
//! - [`GraphLayout`] (pure): nodes, every non-zero edge, the edge selection (type toggles, a |weight|
//!   threshold, top-k per node), hit testing and a force layout that cools down and then stops, so an idle
//!   graph costs no frames.
//! - [`GraphView`] (egui): camera (zoom, pan), node dragging, hover labels, and the drawing: one
//!   [`egui::Mesh`] per edge type (5,000 edges are 5,000 quads in six meshes, not 5,000 shapes).
//!
//! Choices:
//! - Edge width and opacity follow |weight| *normalised within its edge type* (min..max of that type's visible
//!   weights): text–text cosines of CLIP sit around 0.8 and image–text ones around 0.3, so one absolute
//!   scale would make every cross-modal edge invisible.
//! - Top-k keeps, for every target node and edge type, the k edges of largest |weight|; the default 3 keeps
//!   a 100-class graph readable. The threshold applies to the raw |weight|.
//! - `R_PP` and `R_VV` are symmetric, so only one direction is kept; `R_PN` and `R_NP` join the same node
//!   pairs in opposite directions and are drawn as two parallel lanes (each edge is shifted to its own side).
//! - Forces: all-pairs repulsion (`k²/d`), springs along the edges that were visible when the layout last
//!   started (strength grows with the normalised |weight|), and a weak pull to the centre; the step size is
//!   capped by a temperature that decays every step.
//! - The layout runs only for a new graph, an explicit re-layout and (locally) a dragged node. Changing the
//!   edge selection (type toggles, threshold, top-k) only changes what is drawn: re-running the layout there
//!   moved every node the person had learned to find, and with fewer springs pushed the graph off-screen.
//!   After a re-layout the view fits itself while the layout settles.
//! - Names are placed greedily, most important first (the hovered node, then positive text, then larger
//!   nodes); a name that would overlap one already placed tries the other sides of its node and is skipped
//!   when all four collide.

use std::collections::HashMap;

use egui::{Color32, Mesh, Pos2, Rect, Sense, Shape, Stroke, Vec2};

use crate::graph::{EdgeType, HeteroGraph, NodeType};
use crate::linalg::Mat;
use crate::rng::Rng;

/// Node types in drawing order; the index is used for per-type arrays.
pub const NODE_TYPES: [NodeType; 3] = [
    NodeType::PositiveText,
    NodeType::NegativeText,
    NodeType::Visual,
];

pub fn node_type_index(t: NodeType) -> usize {
    match t {
        NodeType::PositiveText => 0,
        NodeType::NegativeText => 1,
        NodeType::Visual => 2,
    }
}

pub fn edge_type_index(t: EdgeType) -> usize {
    EdgeType::ALL.iter().position(|&e| e == t).unwrap_or(0)
}

/// A short name of a node type for labels and the legend.
pub fn node_type_name(t: NodeType) -> &'static str {
    match t {
        NodeType::PositiveText => "positive text",
        NodeType::NegativeText => "negative text",
        NodeType::Visual => "visual",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayoutNode {
    pub kind: NodeType,
    pub class: usize,
    pub pos: [f32; 2],
    /// Set while dragged and after: a node the person placed stays where it was put.
    pub pinned: bool,
    /// A visual node of a class without labelled images (it stands in for the text node; drawn hollow).
    pub placeholder: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayoutEdge {
    pub kind: EdgeType,
    pub from: usize,
    pub to: usize,
    pub weight: f32,
}

/// Which edges are shown (and pull on the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeFilter {
    /// Indexed like [`EdgeType::ALL`].
    pub enabled: [bool; 6],
    /// Edges with |weight| below this are hidden.
    pub min_abs_weight: f32,
    /// Per target node and edge type, keep the `top_k` strongest edges; 0 = no limit.
    pub top_k: usize,
}

impl Default for EdgeFilter {
    fn default() -> Self {
        Self {
            enabled: [true; 6],
            min_abs_weight: 0.0,
            top_k: 3,
        }
    }
}

/// A visible edge with its width/opacity factor in `0..=1` (|weight| normalised within its type).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VisibleEdge {
    pub edge: usize,
    pub strength: f32,
}

/// The testable half of the graph view.
#[derive(Clone, Debug)]
pub struct GraphLayout {
    pub classes: usize,
    pub nodes: Vec<LayoutNode>,
    pub edges: Vec<LayoutEdge>,
    /// `offsets[type]` = index of the type's first node, `None` when the graph has no nodes of that type.
    offsets: [Option<usize>; 3],
    velocity: Vec<[f32; 2]>,
    visible: Vec<VisibleEdge>,
    /// The edges that pull in the force layout: the visible ones when the layout last (re)started, so that
    /// changing the selection does not move nodes.
    springs: Vec<VisibleEdge>,
    filter: EdgeFilter,
    temperature: f32,
    settled: bool,
    steps: usize,
}

/// Ideal edge length in layout units.
const SPRING: f32 = 60.0;
/// Below this temperature (max displacement per step) the layout counts as settled.
const COLD: f32 = 0.05;
const START_TEMPERATURE: f32 = 30.0;
const COOLING: f32 = 0.96;

impl GraphLayout {
    /// `present[t]` says whether nodes of type `NODE_TYPES[t]` exist; `edges` gives each available edge type's
    /// `C×C` matrix (`R[i, j]`: into node `i` of the target type from node `j` of the source type).
    pub fn new(
        classes: usize,
        present: [bool; 3],
        matrices: &[(EdgeType, &Mat)],
        seed: u64,
    ) -> Self {
        let mut offsets = [None; 3];
        let mut nodes = Vec::new();
        let mut rng = Rng::new(seed);
        // Start each class's nodes next to each other on a circle, types on three rings: the layout then only
        // has to refine, which settles quickly and keeps the picture stable from run to run.
        let radius = SPRING * 0.5 * (classes.max(1) as f32 * 3.0).sqrt() + SPRING;
        for (t, kind) in NODE_TYPES.iter().enumerate() {
            if !present[t] {
                continue;
            }
            offsets[t] = Some(nodes.len());
            let ring = [1.0, 0.72, 1.28][t];
            for c in 0..classes {
                let a = std::f32::consts::TAU * c as f32 / classes.max(1) as f32 + 0.1 * t as f32;
                let r = radius * ring;
                nodes.push(LayoutNode {
                    kind: *kind,
                    class: c,
                    pos: [
                        r * a.cos() + rng.uniform(-2.0, 2.0),
                        r * a.sin() + rng.uniform(-2.0, 2.0),
                    ],
                    pinned: false,
                    placeholder: false,
                });
            }
        }
        let mut edges = Vec::new();
        for &(kind, m) in matrices {
            let (Some(to0), Some(from0)) = (
                offsets[node_type_index(kind.target())],
                offsets[node_type_index(kind.source())],
            ) else {
                continue;
            };
            if m.rows != classes || m.cols != classes {
                continue;
            }
            let same_type = kind.target() == kind.source();
            for i in 0..classes {
                for j in 0..classes {
                    if same_type && j <= i {
                        continue;
                    }
                    let w = m.get(i, j);
                    if w != 0.0 && w.is_finite() {
                        edges.push(LayoutEdge {
                            kind,
                            from: from0 + j,
                            to: to0 + i,
                            weight: w,
                        });
                    }
                }
            }
        }
        let n = nodes.len();
        let mut layout = Self {
            classes,
            nodes,
            edges,
            offsets,
            velocity: vec![[0.0; 2]; n],
            visible: Vec::new(),
            springs: Vec::new(),
            filter: EdgeFilter::default(),
            temperature: START_TEMPERATURE,
            settled: false,
            steps: 0,
        };
        layout.visible = layout.select(&EdgeFilter::default());
        layout.springs = layout.visible.clone();
        layout
    }

    /// The layout of a trained adapter's graph.
    pub fn from_graph(g: &HeteroGraph, seed: u64) -> Self {
        // Classes without a labelled image still have a visual node (V_c = P_c, see `graph`); it is drawn
        // hollow.
        let present = [true, g.n.is_some(), true];
        let mats: Vec<(EdgeType, &Mat)> = EdgeType::ALL
            .iter()
            .filter_map(|&t| g.edges(t).map(|m| (t, m)))
            .collect();
        let mut layout = Self::new(g.classes.len(), present, &mats, seed);
        for (c, has) in g.has_visual.iter().enumerate() {
            if let (false, Some(i)) = (*has, layout.node_index(NodeType::Visual, c)) {
                layout.nodes[i].placeholder = true;
            }
        }
        layout
    }

    pub fn node_index(&self, kind: NodeType, class: usize) -> Option<usize> {
        self.offsets[node_type_index(kind)]
            .map(|o| o + class)
            .filter(|_| class < self.classes)
    }

    pub fn has_type(&self, kind: NodeType) -> bool {
        self.offsets[node_type_index(kind)].is_some()
    }

    pub fn filter(&self) -> &EdgeFilter {
        &self.filter
    }

    /// Changes which edges are drawn. Node positions stay as they are: only [`GraphLayout::relayout`] lets
    /// the new selection pull on the layout.
    pub fn set_filter(&mut self, filter: &EdgeFilter) {
        if *filter == self.filter {
            return;
        }
        self.filter = filter.clone();
        self.visible = self.select(filter);
    }

    pub fn visible_edges(&self) -> &[VisibleEdge] {
        &self.visible
    }

    /// The edges `filter` keeps, with their normalised strength, in edge order.
    pub fn select(&self, filter: &EdgeFilter) -> Vec<VisibleEdge> {
        let mut keep: Vec<usize> = (0..self.edges.len())
            .filter(|&e| {
                let edge = &self.edges[e];
                filter.enabled[edge_type_index(edge.kind)]
                    && edge.weight.abs() >= filter.min_abs_weight
            })
            .collect();
        if filter.top_k > 0 {
            // Group by (target node, type), keep the strongest k of each group. Same-type edges were stored
            // once, so they count for both of their ends.
            let mut groups: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
            for &e in &keep {
                let edge = &self.edges[e];
                let t = edge_type_index(edge.kind);
                groups.entry((edge.to, t)).or_default().push(e);
                if edge.kind.target() == edge.kind.source() {
                    groups.entry((edge.from, t)).or_default().push(e);
                }
            }
            let mut chosen = vec![false; self.edges.len()];
            for list in groups.values_mut() {
                list.sort_by(|&a, &b| {
                    self.edges[b]
                        .weight
                        .abs()
                        .total_cmp(&self.edges[a].weight.abs())
                        .then(a.cmp(&b))
                });
                for &e in list.iter().take(filter.top_k) {
                    chosen[e] = true;
                }
            }
            keep.retain(|&e| chosen[e]);
        }
        let mut lo = [f32::INFINITY; 6];
        let mut hi = [0.0f32; 6];
        for &e in &keep {
            let t = edge_type_index(self.edges[e].kind);
            let w = self.edges[e].weight.abs();
            lo[t] = lo[t].min(w);
            hi[t] = hi[t].max(w);
        }
        keep.into_iter()
            .map(|e| {
                let t = edge_type_index(self.edges[e].kind);
                let w = self.edges[e].weight.abs();
                let span = hi[t] - lo[t];
                let strength = if span > 1e-6 { (w - lo[t]) / span } else { 1.0 };
                VisibleEdge { edge: e, strength }
            })
            .collect()
    }

    pub fn is_settled(&self) -> bool {
        self.settled
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    pub fn reheat(&mut self, temperature: f32) {
        self.temperature = self.temperature.max(temperature);
        self.settled = false;
    }

    /// One step of the force layout. Returns whether the layout still moves (the caller repaints only then).
    pub fn step(&mut self) -> bool {
        if self.settled {
            return false;
        }
        let n = self.nodes.len();
        let mut force = vec![[0.0f32; 2]; n];
        let k2 = SPRING * SPRING;
        for i in 0..n {
            let pi = self.nodes[i].pos;
            for j in i + 1..n {
                let pj = self.nodes[j].pos;
                let dx = pi[0] - pj[0];
                let dy = pi[1] - pj[1];
                let d2 = (dx * dx + dy * dy).max(1.0);
                // Repulsion k²/d along the unit vector = k²·(dx, dy)/d².
                let f = k2 / d2;
                force[i][0] += f * dx;
                force[i][1] += f * dy;
                force[j][0] -= f * dx;
                force[j][1] -= f * dy;
            }
        }
        for v in &self.springs {
            let e = &self.edges[v.edge];
            let (a, b) = (e.from, e.to);
            let dx = self.nodes[b].pos[0] - self.nodes[a].pos[0];
            let dy = self.nodes[b].pos[1] - self.nodes[a].pos[1];
            let d = (dx * dx + dy * dy).sqrt().max(1e-3);
            // Attraction d²/k, scaled by the edge's strength (at least a little, so every shown edge pulls).
            let f = (0.2 + 0.8 * v.strength) * d / SPRING;
            force[a][0] += f * dx;
            force[a][1] += f * dy;
            force[b][0] -= f * dx;
            force[b][1] -= f * dy;
        }
        let mut max_move = 0.0f32;
        for ((node, vel), f) in self
            .nodes
            .iter_mut()
            .zip(self.velocity.iter_mut())
            .zip(&force)
        {
            if node.pinned {
                *vel = [0.0; 2];
                continue;
            }
            let p = node.pos;
            let fx = f[0] - 0.02 * p[0];
            let fy = f[1] - 0.02 * p[1];
            vel[0] = 0.5 * vel[0] + fx * 0.1;
            vel[1] = 0.5 * vel[1] + fy * 0.1;
            let len = (vel[0] * vel[0] + vel[1] * vel[1]).sqrt();
            let scale = if len > self.temperature {
                self.temperature / len
            } else {
                1.0
            };
            let mv = [vel[0] * scale, vel[1] * scale];
            if mv[0].is_finite() && mv[1].is_finite() {
                node.pos[0] += mv[0];
                node.pos[1] += mv[1];
                max_move = max_move.max((mv[0] * mv[0] + mv[1] * mv[1]).sqrt());
            }
        }
        self.temperature *= COOLING;
        self.steps += 1;
        if self.temperature < COLD || max_move < COLD {
            self.settled = true;
            self.velocity.iter_mut().for_each(|v| *v = [0.0; 2]);
        }
        !self.settled
    }

    /// Runs the layout until it settles (at most `max_steps`); returns the steps taken.
    pub fn settle(&mut self, max_steps: usize) -> usize {
        let mut taken = 0;
        while taken < max_steps && self.step() {
            taken += 1;
        }
        taken
    }

    /// The node whose centre is nearest to `pos` within `radius` (layout units).
    pub fn node_at(&self, pos: [f32; 2], radius: f32) -> Option<usize> {
        let mut best = None;
        let mut best_d = radius * radius;
        for (i, n) in self.nodes.iter().enumerate() {
            let d = (n.pos[0] - pos[0]).powi(2) + (n.pos[1] - pos[1]).powi(2);
            if d <= best_d {
                best_d = d;
                best = Some(i);
            }
        }
        best
    }

    /// Moves a node (dragging) and pins it; the rest of the layout adapts.
    pub fn move_node(&mut self, node: usize, pos: [f32; 2]) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.pos = pos;
            n.pinned = true;
            self.reheat(START_TEMPERATURE * 0.3);
        }
    }

    /// Releases every dragged node and lays the graph out again, now pulled by the edges currently shown.
    pub fn relayout(&mut self) {
        self.nodes.iter_mut().for_each(|n| n.pinned = false);
        self.springs = self.visible.clone();
        self.reheat(START_TEMPERATURE);
    }

    /// Bounding box of the nodes `(min, max)`; a unit box around the origin when there are none.
    pub fn bounds(&self) -> ([f32; 2], [f32; 2]) {
        if self.nodes.is_empty() {
            return ([-1.0, -1.0], [1.0, 1.0]);
        }
        let mut lo = [f32::INFINITY; 2];
        let mut hi = [f32::NEG_INFINITY; 2];
        for n in &self.nodes {
            for k in 0..2 {
                lo[k] = lo[k].min(n.pos[k]);
                hi[k] = hi[k].max(n.pos[k]);
            }
        }
        (lo, hi)
    }

    /// Number of visible edges per edge type (legend counts).
    pub fn visible_counts(&self) -> [usize; 6] {
        let mut c = [0; 6];
        for v in &self.visible {
            c[edge_type_index(self.edges[v.edge].kind)] += 1;
        }
        c
    }
}

/// Space between a name and its plate's edge.
const LABEL_PAD: Vec2 = Vec2::new(3.0, 1.0);

/// Where a name of `size` may go around a node at `p` of radius `r`, in order of preference: right (reads
/// as a list), left, above, below. Each rectangle is the plate, padding included.
pub fn label_candidates(p: Pos2, r: f32, size: Vec2) -> [Rect; 4] {
    // A diamond reaches 1.3·r; the gap clears every node shape.
    let gap = r * 1.3 + 3.0;
    let plate = size + 2.0 * LABEL_PAD;
    let at = |min: Pos2| Rect::from_min_size(min, plate);
    [
        at(p + Vec2::new(gap, -plate.y / 2.0)),
        at(p + Vec2::new(-gap - plate.x, -plate.y / 2.0)),
        at(p + Vec2::new(-plate.x / 2.0, -gap - plate.y)),
        at(p + Vec2::new(-plate.x / 2.0, gap)),
    ]
}

/// A uniform grid of rectangles: near-linear overlap queries for hundreds of labels.
#[derive(Default)]
struct RectGrid {
    buckets: HashMap<(i32, i32), Vec<Rect>>,
}

impl RectGrid {
    const CELL: f32 = 64.0;

    fn cells(r: &Rect) -> impl Iterator<Item = (i32, i32)> {
        let (x0, x1) = (
            (r.min.x / Self::CELL).floor() as i32,
            (r.max.x / Self::CELL).floor() as i32,
        );
        let (y0, y1) = (
            (r.min.y / Self::CELL).floor() as i32,
            (r.max.y / Self::CELL).floor() as i32,
        );
        (x0..=x1).flat_map(move |x| (y0..=y1).map(move |y| (x, y)))
    }

    fn insert(&mut self, r: Rect) {
        for c in Self::cells(&r) {
            self.buckets.entry(c).or_default().push(r);
        }
    }

    fn hits(&self, r: &Rect) -> bool {
        Self::cells(r).any(|c| {
            self.buckets
                .get(&c)
                .is_some_and(|list| list.iter().any(|kept| kept.intersects(*r)))
        })
    }
}

/// Greedy label placement: in the given order (most important first), each label takes its first candidate
/// rectangle that overlaps no rectangle kept before, or none (`None`: the label is left out). Among those,
/// a candidate that also covers none of `obstacles` (the nodes) is preferred, so names hide as few nodes as
/// they can. The result depends only on the input, so the same frame always shows the same names.
pub fn place_labels<C: AsRef<[Rect]>>(candidates: &[C], obstacles: &[Rect]) -> Vec<Option<usize>> {
    let mut kept = RectGrid::default();
    let mut nodes = RectGrid::default();
    obstacles.iter().for_each(|r| nodes.insert(*r));
    candidates
        .iter()
        .map(|cands| {
            let cands = cands.as_ref();
            let free = |r: &Rect| !kept.hits(r);
            let k = cands
                .iter()
                .position(|r| free(r) && !nodes.hits(r))
                .or_else(|| cands.iter().position(free))?;
            kept.insert(cands[k]);
            Some(k)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing (egui).

pub fn node_color(t: NodeType) -> Color32 {
    match t {
        NodeType::PositiveText => Color32::from_rgb(66, 135, 245),
        NodeType::NegativeText => Color32::from_rgb(235, 87, 87),
        NodeType::Visual => Color32::from_rgb(80, 200, 120),
    }
}

pub fn edge_color(t: EdgeType) -> Color32 {
    [
        Color32::from_rgb(110, 160, 255), // PP
        Color32::from_rgb(120, 220, 200), // PV
        Color32::from_rgb(200, 130, 255), // PN
        Color32::from_rgb(255, 150, 90),  // NP
        Color32::from_rgb(240, 200, 80),  // NV
        Color32::from_rgb(120, 215, 120), // VV
    ][edge_type_index(t)]
}

/// What to scale nodes by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeSizing {
    Uniform,
    /// The per-class confidence of the selected image.
    Selected,
    /// The mean per-class confidence over the folder.
    FolderMean,
}

/// Something the person asked for in the graph view that the rest of the app acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphAction {
    /// A class node was clicked: filter the grid to this class.
    ShowClass(usize),
}

/// Camera, interaction state and drawing options of the graph view.
pub struct GraphView {
    pub layout: Option<GraphLayout>,
    pub filter: EdgeFilter,
    pub sizing: NodeSizing,
    pub show_labels: bool,
    /// Layout units → points.
    zoom: f32,
    /// Layout point shown at the centre of the canvas.
    center: [f32; 2],
    fitted: bool,
    dragging: Option<usize>,
    pub hovered: Option<usize>,
    /// Where the canvas was drawn last frame (for [`GraphView::screen_pos`]).
    canvas_rect: Option<Rect>,
    /// The names drawn in the last frame.
    drawn_labels: Vec<DrawnLabel>,
}

/// A node name as drawn: the node and its plate on screen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DrawnLabel {
    pub node: usize,
    pub rect: Rect,
}

impl Default for GraphView {
    fn default() -> Self {
        Self {
            layout: None,
            filter: EdgeFilter::default(),
            sizing: NodeSizing::FolderMean,
            show_labels: true,
            zoom: 1.0,
            center: [0.0, 0.0],
            fitted: false,
            dragging: None,
            hovered: None,
            canvas_rect: None,
            drawn_labels: Vec::new(),
        }
    }
}

impl GraphView {
    pub fn set_graph(&mut self, g: &HeteroGraph) {
        let mut layout = GraphLayout::from_graph(g, 7);
        layout.set_filter(&self.filter);
        // The first layout is pulled by what is shown, as every re-layout is.
        layout.relayout();
        self.layout = Some(layout);
        self.fitted = false;
        self.dragging = None;
        self.hovered = None;
    }

    pub fn clear(&mut self) {
        self.layout = None;
        self.drawn_labels.clear();
    }

    /// Fits the whole graph into the canvas at the next frame.
    pub fn fit(&mut self) {
        self.fitted = false;
    }

    /// Releases dragged nodes and lays the graph out again with the edges now shown; the view follows the
    /// layout until it settles, so the graph is on screen without pressing Fit.
    pub fn relayout(&mut self) {
        if let Some(l) = self.layout.as_mut() {
            l.relayout();
        }
        self.fit();
    }

    /// The canvas of the last frame (`None` before the first).
    pub fn canvas_rect(&self) -> Option<Rect> {
        self.canvas_rect
    }

    /// The names drawn in the last frame, in placement order (most important first).
    pub fn drawn_labels(&self) -> &[DrawnLabel] {
        &self.drawn_labels
    }

    /// Where node `i` was drawn in the last frame (scripted clicks in tests, and tooltips).
    pub fn screen_pos(&self, i: usize) -> Option<Pos2> {
        let rect = self.canvas_rect?;
        let n = self.layout.as_ref()?.nodes.get(i)?;
        Some(self.to_screen(rect, n.pos))
    }

    fn to_screen(&self, rect: Rect, p: [f32; 2]) -> Pos2 {
        rect.center()
            + Vec2::new(
                (p[0] - self.center[0]) * self.zoom,
                (p[1] - self.center[1]) * self.zoom,
            )
    }

    fn to_layout(&self, rect: Rect, p: Pos2) -> [f32; 2] {
        let d = p - rect.center();
        [
            d.x / self.zoom + self.center[0],
            d.y / self.zoom + self.center[1],
        ]
    }

    fn fit_now(&mut self, rect: Rect) {
        if let Some(l) = &self.layout {
            let (lo, hi) = l.bounds();
            let w = (hi[0] - lo[0]).max(1.0);
            let h = (hi[1] - lo[1]).max(1.0);
            self.center = [(lo[0] + hi[0]) * 0.5, (lo[1] + hi[1]) * 0.5];
            // Room for the names, which extend to the right of their nodes.
            let (left, right, vertical) = (40.0, 150.0, 60.0);
            self.zoom = ((rect.width() - left - right).max(40.0) / w)
                .min((rect.height() - vertical).max(40.0) / h)
                .clamp(0.05, 4.0);
            self.center[0] += (right - left) * 0.5 / self.zoom;
        }
    }

    /// Draws the canvas into the remaining space of `ui`. `confidence` is per class (for node sizing).
    pub fn canvas(
        &mut self,
        ui: &mut egui::Ui,
        classes: &[String],
        confidence: Option<&[f32]>,
    ) -> Option<GraphAction> {
        let (response, painter) = ui.allocate_painter(ui.available_size(), Sense::click_and_drag());
        let rect = response.rect;
        self.canvas_rect = Some(rect);
        let visuals = ui.visuals().clone();
        painter.rect_filled(rect, 6.0, visuals.extreme_bg_color);
        let Some(layout) = self.layout.as_mut() else {
            painter.text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                "No graph yet: label a few images and train the HeGraph adapter (T).",
                egui::FontId::proportional(16.0),
                visuals.weak_text_color(),
            );
            self.drawn_labels.clear();
            return None;
        };
        layout.set_filter(&self.filter);
        if layout.step() {
            ui.ctx().request_repaint();
        }
        if !self.fitted {
            // Fit once the layout has taken shape; until then keep fitting so nothing flies off-screen.
            self.fit_now(rect);
            let settled = self.layout.as_ref().is_some_and(GraphLayout::is_settled);
            self.fitted = settled;
        }
        let mut action = None;

        // Zoom around the pointer, pan with the background drag.
        if response.hovered() {
            let (scroll, zoom) = ui.input(|i| (i.smooth_scroll_delta, i.zoom_delta()));
            let factor = zoom * (scroll.y * 0.0015).exp();
            if (factor - 1.0).abs() > 1e-4 {
                if let Some(p) = response.hover_pos() {
                    let before = self.to_layout(rect, p);
                    self.zoom = (self.zoom * factor).clamp(0.02, 20.0);
                    let after = self.to_layout(rect, p);
                    self.center[0] += before[0] - after[0];
                    self.center[1] += before[1] - after[1];
                    self.fitted = true;
                }
            }
        }
        let node_radius_pts = (6.0 * self.zoom.sqrt()).clamp(3.0, 14.0);
        let pointer = response.hover_pos().or(response.interact_pointer_pos());
        let hit = |view: &Self, p: Pos2| -> Option<usize> {
            let lp = view.to_layout(rect, p);
            view.layout
                .as_ref()?
                .node_at(lp, (node_radius_pts + 4.0) / view.zoom)
        };
        if response.drag_started() {
            self.dragging = response.interact_pointer_pos().and_then(|p| hit(self, p));
        }
        if response.dragged() {
            match self.dragging {
                Some(node) => {
                    if let Some(p) = response.interact_pointer_pos() {
                        let lp = self.to_layout(rect, p);
                        if let Some(l) = self.layout.as_mut() {
                            l.move_node(node, lp);
                        }
                    }
                }
                None => {
                    let d = response.drag_delta();
                    self.center[0] -= d.x / self.zoom;
                    self.center[1] -= d.y / self.zoom;
                    self.fitted = true;
                }
            }
        }
        if response.drag_stopped() {
            self.dragging = None;
        }
        self.hovered = pointer.and_then(|p| hit(self, p));
        if response.clicked() {
            if let Some(node) = response.interact_pointer_pos().and_then(|p| hit(self, p)) {
                if let Some(l) = &self.layout {
                    action = Some(GraphAction::ShowClass(l.nodes[node].class));
                }
            }
        }
        if self.hovered.is_some() {
            ui.ctx().set_cursor_icon(egui::CursorIcon::PointingHand);
        }

        let Some(layout) = self.layout.as_ref() else {
            return action;
        };
        let painter = painter.with_clip_rect(rect);
        // Edges: one mesh per type, each edge a quad shifted to its own lane.
        let mut meshes: Vec<Mesh> = (0..6).map(|_| Mesh::default()).collect();
        let hovered = self.hovered;
        for v in layout.visible_edges() {
            let e = &layout.edges[v.edge];
            let a = self.to_screen(rect, layout.nodes[e.from].pos);
            let b = self.to_screen(rect, layout.nodes[e.to].pos);
            let dir = b - a;
            let len = dir.length();
            if len < 1e-3 {
                continue;
            }
            let normal = Vec2::new(-dir.y, dir.x) / len;
            let touches_hover = hovered.is_some_and(|h| h == e.from || h == e.to);
            let dim = hovered.is_some() && !touches_hover;
            let width = 0.6 + 2.4 * v.strength;
            let mut alpha = 0.18 + 0.62 * v.strength;
            if dim {
                alpha *= 0.25;
            } else if touches_hover {
                alpha = 1.0;
            }
            let lane = normal * 1.2;
            let half = normal * (width * 0.5);
            let color = edge_color(e.kind).gamma_multiply(alpha);
            let mesh = &mut meshes[edge_type_index(e.kind)];
            let base = mesh.vertices.len() as u32;
            mesh.colored_vertex(a + lane - half, color);
            mesh.colored_vertex(a + lane + half, color);
            mesh.colored_vertex(b + lane + half, color);
            mesh.colored_vertex(b + lane - half, color);
            mesh.add_triangle(base, base + 1, base + 2);
            mesh.add_triangle(base, base + 2, base + 3);
        }
        for mesh in meshes {
            if !mesh.is_empty() {
                painter.add(Shape::mesh(mesh));
            }
        }
        // Nodes: circle = positive text, square = negative text, diamond = visual.
        let mut max_conf = 0.0f32;
        if let Some(c) = confidence {
            max_conf = c.iter().copied().fold(0.0, f32::max);
        }
        let outline = Stroke::new(1.0, visuals.extreme_bg_color);
        let radii: Vec<f32> = layout
            .nodes
            .iter()
            .map(|n| {
                let scale = match (self.sizing, confidence) {
                    (NodeSizing::Uniform, _) | (_, None) => 1.0,
                    (_, Some(c)) => {
                        let v = c.get(n.class).copied().unwrap_or(0.0);
                        0.6 + 1.2 * if max_conf > 0.0 { v / max_conf } else { 0.0 }
                    }
                };
                node_radius_pts * scale
            })
            .collect();
        for (i, n) in layout.nodes.iter().enumerate() {
            let p = self.to_screen(rect, n.pos);
            if !rect.expand(20.0).contains(p) {
                continue;
            }
            let r = radii[i];
            let fill = if n.placeholder {
                visuals.extreme_bg_color
            } else {
                node_color(n.kind)
            };
            let stroke = if Some(i) == hovered {
                Stroke::new(2.0, visuals.strong_text_color())
            } else if n.placeholder {
                Stroke::new(1.5, node_color(n.kind))
            } else {
                outline
            };
            draw_node(&painter, n.kind, p, r, fill, stroke);
        }
        // Names: the hovered node first (so hovering always shows its name), then positive text, visual,
        // negative, larger nodes first within a type; each name takes the first side of its node where it
        // overlaps no name already placed and fits in the canvas, or is left out, so dense graphs stay
        // legible and zooming in reveals more names.
        let mut drawn = Vec::new();
        if self.show_labels {
            let mut order: Vec<usize> = (0..layout.nodes.len())
                .filter(|&i| rect.contains(self.to_screen(rect, layout.nodes[i].pos)))
                .collect();
            let rank = |k: NodeType| match k {
                NodeType::PositiveText => 0,
                NodeType::Visual => 1,
                NodeType::NegativeText => 2,
            };
            order.sort_by(|&a, &b| {
                (hovered != Some(a))
                    .cmp(&(hovered != Some(b)))
                    .then(rank(layout.nodes[a].kind).cmp(&rank(layout.nodes[b].kind)))
                    .then(radii[b].total_cmp(&radii[a]))
                    .then(a.cmp(&b))
            });
            let mut labels = Vec::with_capacity(order.len());
            let mut candidates = Vec::with_capacity(order.len());
            for &i in &order {
                let n = &layout.nodes[i];
                let class = classes.get(n.class).map_or("?", String::as_str);
                let (name, size, color) = match n.kind {
                    NodeType::PositiveText => {
                        (class.to_string(), 12.5, visuals.strong_text_color())
                    }
                    NodeType::NegativeText => {
                        (format!("no {class}"), 11.0, visuals.weak_text_color())
                    }
                    NodeType::Visual => (class.to_string(), 11.0, visuals.weak_text_color()),
                };
                let galley = painter.layout_no_wrap(name, egui::FontId::proportional(size), color);
                let p = self.to_screen(rect, n.pos);
                // A name cut by the canvas edge reads as a different name: only whole ones are drawn.
                let mut cands = label_candidates(p, radii[i], galley.size()).to_vec();
                cands.retain(|r| rect.contains_rect(*r));
                candidates.push(cands);
                labels.push((i, galley, color));
            }
            // Each node's footprint (diamonds reach 1.3·r), for names to avoid where they can.
            let footprints: Vec<Rect> = order
                .iter()
                .map(|&i| {
                    let p = self.to_screen(rect, layout.nodes[i].pos);
                    Rect::from_center_size(p, Vec2::splat(2.6 * radii[i]))
                })
                .collect();
            let chosen = place_labels(&candidates, &footprints);
            for (((i, galley, color), cands), choice) in
                labels.into_iter().zip(&candidates).zip(chosen)
            {
                let Some(k) = choice else { continue };
                let plate = cands[k];
                // A translucent plate keeps names readable over the edges.
                painter.rect_filled(plate, 3.0, visuals.extreme_bg_color.gamma_multiply(0.8));
                painter.galley(plate.min + LABEL_PAD, galley, color);
                drawn.push(DrawnLabel {
                    node: i,
                    rect: plate,
                });
            }
        }
        self.drawn_labels = drawn;
        if let Some(h) = hovered {
            let n = &layout.nodes[h];
            let name = classes.get(n.class).map_or("?", String::as_str);
            let mut text = format!("{name} · {} node", node_type_name(n.kind));
            if n.placeholder {
                text.push_str(" (no labelled image yet: stands in for the text node)");
            }
            if let Some(c) = confidence.and_then(|c| c.get(n.class)) {
                text.push_str(&format!("\nconfidence {:.1} %", c * 100.0));
            }
            let strongest: Vec<String> = layout
                .visible_edges()
                .iter()
                .filter(|v| layout.edges[v.edge].to == h)
                .take(3)
                .map(|v| {
                    let e = &layout.edges[v.edge];
                    let src = &layout.nodes[e.from];
                    format!(
                        "{} from {} ({}): {:+.3}",
                        e.kind.label(),
                        classes.get(src.class).map_or("?", String::as_str),
                        node_type_name(src.kind),
                        e.weight
                    )
                })
                .collect();
            if !strongest.is_empty() {
                text.push('\n');
                text.push_str(&strongest.join("\n"));
            }
            text.push_str("\nclick: show this class in the grid");
            let p = self.to_screen(rect, n.pos) + Vec2::new(14.0, 14.0);
            let galley = painter.layout_no_wrap(
                text,
                egui::FontId::proportional(13.0),
                visuals.text_color(),
            );
            let bg = Rect::from_min_size(p, galley.size()).expand(6.0);
            let bg = bg.translate(Vec2::new(
                (rect.right() - bg.right()).min(0.0),
                (rect.bottom() - bg.bottom()).min(0.0),
            ));
            painter.rect_filled(bg, 4.0, visuals.window_fill);
            painter.rect_stroke(bg, 4.0, visuals.window_stroke, egui::StrokeKind::Inside);
            painter.galley(bg.min + Vec2::splat(6.0), galley, visuals.text_color());
        }
        action
    }
}

/// What each edge type joins, for the legend.
pub fn edge_description(t: EdgeType) -> &'static str {
    match t {
        EdgeType::PP => "positive text ↔ positive text",
        EdgeType::PV => "positive text ← visual",
        EdgeType::PN => "positive text ← negative text",
        EdgeType::NP => "negative text ← positive text",
        EdgeType::NV => "negative text ← visual",
        EdgeType::VV => "visual ↔ visual",
    }
}

impl GraphView {
    /// The side panel: legend, edge toggles, threshold, top-k, node sizing, layout buttons.
    pub fn controls(&mut self, ui: &mut egui::Ui, selected_image: Option<&str>) {
        let strong = ui.visuals().strong_text_color();
        ui.heading("Heterogeneous graph");
        ui.add_space(4.0);
        ui.label(egui::RichText::new("Nodes (one per class and type)").strong());
        for t in NODE_TYPES {
            ui.horizontal(|ui| {
                let (rect, _) = ui.allocate_exact_size(Vec2::new(18.0, 18.0), Sense::hover());
                draw_node(
                    ui.painter(),
                    t,
                    rect.center(),
                    6.0,
                    node_color(t),
                    Stroke::NONE,
                );
                let present = self.layout.as_ref().is_none_or(|l| l.has_type(t));
                let mut text = egui::RichText::new(node_type_name(t));
                if !present {
                    text = text.weak().strikethrough();
                }
                ui.label(text);
            });
        }
        ui.add_space(6.0);
        ui.label(egui::RichText::new("Edges (click to show or hide)").strong());
        let counts = self
            .layout
            .as_ref()
            .map(GraphLayout::visible_counts)
            .unwrap_or_default();
        for (k, t) in EdgeType::ALL.iter().enumerate() {
            ui.horizontal(|ui| {
                let (rect, _) = ui.allocate_exact_size(Vec2::new(18.0, 18.0), Sense::hover());
                ui.painter().line_segment(
                    [rect.left_center(), rect.right_center()],
                    Stroke::new(3.0, edge_color(*t)),
                );
                let exists = self
                    .layout
                    .as_ref()
                    .is_none_or(|l| l.has_type(t.source()) && l.has_type(t.target()));
                ui.add_enabled(
                    exists,
                    egui::Checkbox::new(
                        &mut self.filter.enabled[k],
                        egui::RichText::new(t.label()).color(strong).monospace(),
                    ),
                )
                .on_hover_text(edge_description(*t))
                .on_disabled_hover_text(format!(
                    "{}: this graph has no such nodes",
                    edge_description(*t)
                ));
                ui.label(egui::RichText::new(format!("{}", counts[k])).weak().small());
            });
        }
        ui.add_space(6.0);
        ui.add(egui::Slider::new(&mut self.filter.min_abs_weight, 0.0..=1.0).text("min |weight|"))
            .on_hover_text("Hide edges whose |cosine| is below this");
        ui.horizontal(|ui| {
            let l = ui.label("top-k per node");
            ui.add(egui::DragValue::new(&mut self.filter.top_k).range(0..=100))
                .labelled_by(l.id)
                .on_hover_text("Keep the k strongest edges of each type into each node (0 = all)");
        });
        ui.add_space(6.0);
        ui.label(egui::RichText::new("Node size").strong());
        ui.radio_value(
            &mut self.sizing,
            NodeSizing::FolderMean,
            "mean confidence over the folder",
        );
        let sel = match selected_image {
            Some(n) => format!("confidence for {n}"),
            None => "confidence for the selected image".into(),
        };
        ui.radio_value(&mut self.sizing, NodeSizing::Selected, sel);
        ui.radio_value(&mut self.sizing, NodeSizing::Uniform, "uniform");
        ui.checkbox(&mut self.show_labels, "class names");
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            if ui
                .button("Fit")
                .on_hover_text("Show the whole graph")
                .clicked()
            {
                self.fit();
            }
            if ui
                .button("Re-layout")
                .on_hover_text("Release dragged nodes and lay out again")
                .clicked()
            {
                self.relayout();
            }
        });
        ui.add_space(6.0);
        ui.label(
            egui::RichText::new(
                "Wheel: zoom · drag background: pan · drag a node: move it · click a node: show its class in the \
                 grid. Edge width and opacity follow |weight| within its type.",
            )
            .small()
            .weak(),
        );
    }
}

/// One node shape; shared with the legend so both always agree.
pub fn draw_node(
    painter: &egui::Painter,
    kind: NodeType,
    p: Pos2,
    r: f32,
    fill: Color32,
    stroke: Stroke,
) {
    match kind {
        NodeType::PositiveText => {
            painter.circle(p, r, fill, stroke);
        }
        NodeType::NegativeText => {
            let rect = Rect::from_center_size(p, Vec2::splat(r * 1.7));
            painter.rect(rect, 1.5, fill, stroke, egui::StrokeKind::Middle);
        }
        NodeType::Visual => {
            let d = r * 1.3;
            let pts = vec![
                p + Vec2::new(0.0, -d),
                p + Vec2::new(d, 0.0),
                p + Vec2::new(0.0, d),
                p + Vec2::new(-d, 0.0),
            ];
            painter.add(Shape::convex_polygon(pts, fill, stroke));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_graph(c: usize) -> (Mat, Mat, Mat) {
        // PP and VV: neighbours on a ring are similar; PV: each class's text is near its own image.
        let mut pp = Mat::zeros(c, c);
        let mut vv = Mat::zeros(c, c);
        let mut pv = Mat::zeros(c, c);
        for i in 0..c {
            for j in 0..c {
                let d = (i as isize - j as isize)
                    .unsigned_abs()
                    .min(c - (i as isize - j as isize).unsigned_abs());
                if i != j {
                    pp.set(i, j, 0.9 - 0.05 * d as f32);
                    vv.set(i, j, 0.7 - 0.05 * d as f32);
                }
                pv.set(i, j, if i == j { 0.35 } else { 0.2 });
            }
        }
        (pp, vv, pv)
    }

    #[test]
    fn edges_skip_zeros_and_mirror_duplicates_and_absent_types() {
        let (pp, vv, pv) = ring_graph(5);
        let l = GraphLayout::new(
            5,
            [true, false, true],
            &[
                (EdgeType::PP, &pp),
                (EdgeType::VV, &vv),
                (EdgeType::PV, &pv),
                (EdgeType::NP, &pp),
            ],
            1,
        );
        assert_eq!(l.nodes.len(), 10);
        assert!(!l.has_type(NodeType::NegativeText));
        let count = |t| l.edges.iter().filter(|e| e.kind == t).count();
        assert_eq!(count(EdgeType::PP), 10); // 5·4/2: one direction of a symmetric matrix
        assert_eq!(count(EdgeType::VV), 10);
        assert_eq!(count(EdgeType::PV), 25);
        assert_eq!(count(EdgeType::NP), 0); // no negative nodes
        let pv_edge = l.edges.iter().find(|e| e.kind == EdgeType::PV).unwrap();
        assert_eq!(l.nodes[pv_edge.to].kind, NodeType::PositiveText);
        assert_eq!(l.nodes[pv_edge.from].kind, NodeType::Visual);
    }

    #[test]
    fn filter_toggles_threshold_and_top_k() {
        let (pp, vv, pv) = ring_graph(8);
        let mut l = GraphLayout::new(
            8,
            [true, false, true],
            &[
                (EdgeType::PP, &pp),
                (EdgeType::VV, &vv),
                (EdgeType::PV, &pv),
            ],
            1,
        );
        let all = EdgeFilter {
            top_k: 0,
            ..Default::default()
        };
        assert_eq!(l.select(&all).len(), l.edges.len());
        let mut only_pv = all.clone();
        only_pv.enabled = [false; 6];
        only_pv.enabled[edge_type_index(EdgeType::PV)] = true;
        assert_eq!(l.select(&only_pv).len(), 64);
        let mut strong = all.clone();
        strong.min_abs_weight = 0.3;
        let kept = l.select(&strong);
        assert!(kept.iter().all(|v| l.edges[v.edge].weight.abs() >= 0.3));
        // PV: only the diagonal (0.35) is strong enough; PP all (≥ 0.7); VV ≥ 0.5.
        assert_eq!(
            kept.iter()
                .filter(|v| l.edges[v.edge].kind == EdgeType::PV)
                .count(),
            8
        );
        let mut top1 = only_pv.clone();
        top1.top_k = 1;
        let kept = l.select(&top1);
        assert_eq!(kept.len(), 8);
        assert!(kept.iter().all(|v| {
            let e = &l.edges[v.edge];
            l.nodes[e.from].class == l.nodes[e.to].class
        }));
        // Strength is normalised within a type: min → 0, max → 1.
        let s: Vec<f32> = l.select(&only_pv).iter().map(|v| v.strength).collect();
        assert!(s.contains(&0.0) && s.contains(&1.0));
        l.set_filter(&top1);
        assert_eq!(l.visible_edges().len(), 8);
    }

    #[test]
    fn labels_are_placed_without_overlap_in_priority_order() {
        let r = |x: f32, y: f32| Rect::from_min_size(Pos2::new(x, y), Vec2::new(50.0, 14.0));
        let single = |rects: &[Rect]| rects.iter().map(|r| vec![*r]).collect::<Vec<_>>();
        let rects = vec![
            r(0.0, 0.0),
            r(30.0, 5.0),
            r(60.0, 0.0),
            r(200.0, 200.0),
            r(210.0, 205.0),
        ];
        assert_eq!(
            place_labels(&single(&rects), &[]),
            vec![Some(0), None, Some(0), Some(0), None]
        );
        let many: Vec<Rect> = (0..400)
            .map(|i| r((i % 20) as f32 * 25.0, (i / 20) as f32 * 10.0))
            .collect();
        let keep = place_labels(&single(&many), &[]);
        let kept: Vec<&Rect> = many
            .iter()
            .zip(&keep)
            .filter(|(_, k)| k.is_some())
            .map(|(r, _)| r)
            .collect();
        assert!(kept.len() > 20);
        for (a, x) in kept.iter().enumerate() {
            for y in &kept[a + 1..] {
                assert!(!x.intersects(**y));
            }
        }
    }

    #[test]
    fn a_colliding_label_moves_to_a_free_side_of_its_node() {
        let size = Vec2::new(60.0, 14.0);
        // Two nodes far apart both keep the right side; a third node just right of the first collides there
        // on its right and its left (both overlap the first name) and goes above.
        let a = label_candidates(Pos2::new(0.0, 0.0), 6.0, size);
        let b = label_candidates(Pos2::new(200.0, 0.0), 6.0, size);
        let c = label_candidates(Pos2::new(40.0, 0.0), 6.0, size);
        let chosen = place_labels(&[a, b, c], &[]);
        assert_eq!(chosen, vec![Some(0), Some(0), Some(2)]);
        // No candidate overlaps its own node (radius 6, diamonds reach 7.8).
        let node = Rect::from_center_size(Pos2::ZERO, Vec2::splat(2.0 * 7.8));
        assert!(a.iter().all(|r| !r.intersects(node)));
        // Boxed in on all four sides (by a name placed before, covering the node's surroundings): left out.
        let around = Rect::from_center_size(Pos2::new(20.0, 0.0), Vec2::new(260.0, 80.0));
        let d = label_candidates(Pos2::new(20.0, 0.0), 6.0, size);
        let all = vec![vec![around], d.to_vec(), b.to_vec()];
        let chosen = place_labels(&all, &[]);
        assert_eq!(chosen, vec![Some(0), None, Some(0)]);
        // Same input, same answer.
        assert_eq!(place_labels(&all, &[]), chosen);
        // A node under the right side: the name goes left rather than hide it; covered everywhere, it goes
        // right after all (a name over a node beats no name).
        let node_right = Rect::from_center_size(Pos2::new(230.0, 0.0), Vec2::splat(12.0));
        assert_eq!(place_labels(&[b], &[node_right]), vec![Some(1)]);
        assert_eq!(
            place_labels(&[b], &[around.translate(Vec2::new(180.0, 0.0))]),
            vec![Some(0)]
        );
    }

    #[test]
    fn changing_the_selection_moves_no_node_until_relayout() {
        let c = 10;
        let (pp, vv, pv) = ring_graph(c);
        let mats = [
            (EdgeType::PP, &pp),
            (EdgeType::VV, &vv),
            (EdgeType::PV, &pv),
        ];
        let mut l = GraphLayout::new(c, [true, false, true], &mats, 5);
        let mut twin = l.clone();
        let mut enabled = [false; 6];
        enabled[edge_type_index(EdgeType::PV)] = true;
        let only_pv = EdgeFilter {
            enabled,
            ..Default::default()
        };
        // Mid-layout: hiding edges changes what is drawn, not where the layout goes.
        for _ in 0..20 {
            l.step();
            twin.step();
        }
        l.set_filter(&only_pv);
        assert_eq!(l.visible_counts()[edge_type_index(EdgeType::PP)], 0);
        l.settle(5_000);
        twin.settle(5_000);
        assert_eq!(l.nodes, twin.nodes);
        assert!(l.is_settled());
        l.set_filter(&EdgeFilter::default());
        assert!(
            l.is_settled(),
            "a selection change must not restart the layout"
        );
        l.set_filter(&only_pv);
        // A re-layout lets the shown edges (P←V only) pull: the picture changes.
        l.relayout();
        assert!(!l.is_settled());
        l.settle(5_000);
        assert_ne!(l.nodes, twin.nodes);
    }

    #[test]
    fn layout_settles_keeps_pins_and_groups_neighbours() {
        let c = 12;
        let (pp, vv, pv) = ring_graph(c);
        let mut l = GraphLayout::new(
            c,
            [true, false, true],
            &[
                (EdgeType::PP, &pp),
                (EdgeType::VV, &vv),
                (EdgeType::PV, &pv),
            ],
            3,
        );
        let steps = l.settle(5_000);
        assert!(l.is_settled(), "not settled after {steps} steps");
        assert!(!l.step(), "a settled layout must not ask for frames");
        for n in &l.nodes {
            assert!(n.pos[0].is_finite() && n.pos[1].is_finite());
        }
        // A class's text node ends nearer its own visual node than the average other visual node.
        let dist = |a: usize, b: usize| {
            let (p, q) = (l.nodes[a].pos, l.nodes[b].pos);
            ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt()
        };
        let mut own = 0.0;
        let mut other = 0.0;
        for i in 0..c {
            let p = l.node_index(NodeType::PositiveText, i).unwrap();
            own += dist(p, l.node_index(NodeType::Visual, i).unwrap());
            other += (0..c)
                .filter(|&j| j != i)
                .map(|j| dist(p, l.node_index(NodeType::Visual, j).unwrap()))
                .sum::<f32>()
                / (c - 1) as f32;
        }
        assert!(own < other, "own {own} vs other {other}");
        // Dragging pins a node and wakes the layout; the pinned node stays put.
        let n = l.node_index(NodeType::Visual, 0).unwrap();
        l.move_node(n, [500.0, 500.0]);
        assert!(!l.is_settled());
        l.settle(5_000);
        assert_eq!(l.nodes[n].pos, [500.0, 500.0]);
        assert_eq!(l.node_at([503.0, 498.0], 10.0), Some(n));
        assert_eq!(l.node_at([600.0, 600.0], 10.0), None);
    }
}
