//! The map view: every image as a point of a 2-D map of its features ([`crate::embedding_map`]), coloured by
//! its label or its prediction, with the class text nodes placed on the same map. A drag draws a box that
//! selects the images inside it (Shift adds to the selection); a click selects one image; the selection is the
//! grid's, so the digits label it from here as from the grid and a selection made in the grid shows here.
//!
//! Two layouts: PCA, there at once, whose axes mean something (the directions of largest spread), and t-SNE,
//! which keeps look-alike images together, so a box selects a group of similar images, but takes seconds to a
//! minute; it is computed after PCA and the view switches to it when it is done, unless the person chose PCA
//! ("Layout: PCA | t-SNE", or the key of [`super::shortcuts`]). A switch waits while a box is being drawn, so
//! the box selects on the map it was drawn on. Selection works on whichever layout is drawn: it tests the
//! points' screen positions.

use egui::{Align2, Color32, FontId, Pos2, Rect, RichText, Sense, Shape, Stroke, Vec2};

use super::{style, HeGraphApp};

/// The layouts the map view can draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapLayout {
    Pca,
    Tsne,
}

/// What the map view keeps between frames.
pub struct MapUi {
    /// Colour unlabelled images by their prediction (labelled ones always show their label).
    pub by_prediction: bool,
    /// The layout the person chose; `None`: t-SNE once it is done, PCA until then.
    pub chosen: Option<MapLayout>,
    /// The layout drawn in the last frame.
    pub shown: MapLayout,
    /// Where the box selection's drag started.
    drag_from: Option<Pos2>,
    /// Screen position of every image's point in the last frame drawn (tests aim at them).
    pub screen: Vec<Pos2>,
    /// The canvas of the last frame.
    pub canvas: Rect,
}

impl Default for MapUi {
    fn default() -> Self {
        Self {
            by_prediction: false,
            chosen: None,
            shown: MapLayout::Pca,
            drag_from: None,
            screen: Vec::new(),
            canvas: Rect::NOTHING,
        }
    }
}

const RADIUS: f32 = 4.0;

impl HeGraphApp {
    /// Screen positions of the images' points and the canvas, as last drawn.
    pub fn map_screen(&self) -> (&[Pos2], Rect) {
        (&self.insight.map_ui.screen, self.insight.map_ui.canvas)
    }

    /// The layout the map view draws.
    pub fn map_layout(&self) -> MapLayout {
        self.insight.map_ui.shown
    }

    /// Switches the map to the other layout (the key of the map view): the person's choice from then on.
    pub(super) fn toggle_map_layout(&mut self) {
        let other = match self.insight.map_ui.shown {
            MapLayout::Pca => MapLayout::Tsne,
            MapLayout::Tsne => MapLayout::Pca,
        };
        self.choose_map_layout(other);
    }

    fn choose_map_layout(&mut self, layout: MapLayout) {
        self.insight.map_ui.chosen = Some(layout);
        if layout == MapLayout::Tsne {
            self.insight.want_tsne();
        }
    }

    /// What the header says about the layout drawn and the t-SNE layout's progress.
    fn layout_note(&self, shown: MapLayout) -> String {
        let pca = self.insight.map.as_ref();
        let tsne = self.tsne_map();
        let mut parts = Vec::new();
        match (shown, pca, tsne) {
            (MapLayout::Tsne, _, Some(t)) => {
                let how = if t.from_cache {
                    "read from the cache".to_string()
                } else if t.seconds < 1.0 {
                    format!("in {:.0} ms", t.seconds * 1000.0)
                } else {
                    format!("in {:.1} s", t.seconds)
                };
                let perplexity = match t.map.layout {
                    crate::embedding_map::Layout::Tsne { perplexity, .. } => perplexity,
                    crate::embedding_map::Layout::Pca { .. } => 0.0,
                };
                parts.push(format!(
                    "t-SNE of {} images (perplexity {perplexity:.0}) {how} · distances between clusters mean little",
                    t.map.points.len()
                ));
            }
            (_, Some(m), _) => {
                if let Some(e) = m.map.explained() {
                    parts.push(format!(
                        "PCA of {} images in {:.0} ms · the axes explain {:.0} % and {:.0} % of the variance",
                        m.map.points.len(),
                        m.seconds * 1000.0,
                        e[0] * 100.0,
                        e[1] * 100.0
                    ));
                }
            }
            _ => {}
        }
        if let Some(job) = &self.insight.tsne_job {
            if job.unit.as_deref() == Some("iterations") {
                parts.push(format!("t-SNE · {}/{} iterations", job.done, job.total));
            } else {
                parts.push(format!("{}…", job.stage));
            }
        } else if let Some(why) = self.insight.tsne_stopped(self.engine.serial) {
            parts.push(format!("t-SNE: {why}"));
        }
        parts.join(" · ")
    }

    pub(super) fn map_view(&mut self, ui: &mut egui::Ui) {
        if self.session.is_none() {
            self.label_view(ui);
            return;
        }
        egui::CentralPanel::default()
            .frame(
                egui::Frame::central_panel(ui.style()).inner_margin(egui::Margin::symmetric(12, 8)),
            )
            .show(ui, |ui| self.map_canvas(ui));
    }

    fn map_canvas(&mut self, ui: &mut egui::Ui) {
        let busy = self.insight.busy();
        let pca = self.insight.map.clone();
        let tsne = self.tsne_map_arc();
        // The layout to draw: the person's choice, else t-SNE once it is there; kept while a box is drawn.
        let ui_state = &self.insight.map_ui;
        let want = ui_state.chosen.unwrap_or(if tsne.is_some() {
            MapLayout::Tsne
        } else {
            MapLayout::Pca
        });
        let drawable = if want == MapLayout::Tsne && tsne.is_some() {
            MapLayout::Tsne
        } else {
            MapLayout::Pca
        };
        let shown = match ui_state.shown {
            // A t-SNE map of features that changed during the drag is gone: PCA is what there is.
            MapLayout::Tsne if ui_state.drag_from.is_some() && tsne.is_some() => MapLayout::Tsne,
            MapLayout::Pca if ui_state.drag_from.is_some() => MapLayout::Pca,
            _ => drawable,
        };
        let note = self.layout_note(shown);
        let running = self.insight.tsne_job.is_some();
        let mut chose = None;
        let mut cancel = false;
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let classes = s.classes().to_vec();
        let ui_state = &mut self.insight.map_ui;
        ui_state.shown = shown;
        ui.horizontal(|ui| {
            ui.heading("Map");
            ui.label("Layout:");
            for (layout, name) in [(MapLayout::Pca, "PCA"), (MapLayout::Tsne, "t-SNE")] {
                if ui
                    .selectable_label(shown == layout, name)
                    .on_hover_text("P switches the layout")
                    .clicked()
                {
                    chose = Some(layout);
                }
            }
            ui.separator();
            ui.label("colour by");
            ui.selectable_value(&mut ui_state.by_prediction, false, "label");
            ui.selectable_value(&mut ui_state.by_prediction, true, "prediction");
            ui.separator();
            ui.label(RichText::new(note).weak());
            if running && ui.small_button("Cancel t-SNE").clicked() {
                cancel = true;
            }
        });
        ui.label(
            RichText::new(
                "drag: box-select (Shift adds) · click: one image · 1–9: label the selection · ◆ class text · P: layout",
            )
            .small()
            .weak(),
        );
        let map: &crate::embedding_map::Map2d = match (shown, &tsne, &pca) {
            (MapLayout::Tsne, Some(t), _) => &t.map,
            (_, _, Some(m)) => &m.map,
            _ => {
                let why = if self.engine.centre.is_none() {
                    "The map appears once the images are embedded."
                } else if busy {
                    "Computing the map…"
                } else {
                    "The map could not be made (see the message)."
                };
                ui.label(RichText::new(why).weak());
                self.after_map_header(chose, cancel);
                return;
            }
        };

        let (rect, resp) = ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
        let painter = ui.painter_at(rect);
        painter.rect_filled(rect, 6.0, ui.visuals().extreme_bg_color);
        // Fit every point and text node into the canvas, equal scale on both axes.
        let all = map.points.iter().chain(map.text.iter());
        let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
        for p in all {
            for k in 0..2 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        let inner = rect.shrink(28.0);
        let span = [(hi[0] - lo[0]).max(1e-6), (hi[1] - lo[1]).max(1e-6)];
        let scale = (inner.width() / span[0]).min(inner.height() / span[1]);
        let mid = [(lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0];
        let to_screen = |p: [f32; 2]| -> Pos2 {
            // y up, as in a plot.
            Pos2::new(
                inner.center().x + (p[0] - mid[0]) * scale,
                inner.center().y - (p[1] - mid[1]) * scale,
            )
        };
        let screen: Vec<Pos2> = map.points.iter().map(|&p| to_screen(p)).collect();
        let n = screen.len().min(s.len());
        // Points: unlabelled (and without prediction colour) first, so labelled ones stay on top.
        let mut shapes = Vec::with_capacity(n + 16);
        for pass in 0..2 {
            for (i, &pos) in screen.iter().enumerate().take(n) {
                let label = s.label(i);
                if (pass == 1) != label.is_some() {
                    continue;
                }
                let (fill, r) = match (label, s.prediction(i)) {
                    (Some(c), _) => (style::class_color(c), RADIUS),
                    (None, Some((c, _, _))) if ui_state.by_prediction => {
                        (style::class_color(c).gamma_multiply(0.55), RADIUS - 1.0)
                    }
                    _ => (Color32::from_gray(110), RADIUS - 1.0),
                };
                shapes.push(Shape::circle_filled(pos, r, fill));
            }
        }
        let selected: Vec<usize> = s.targets();
        for &i in selected.iter().filter(|&&i| i < n) {
            shapes.push(Shape::circle_stroke(
                screen[i],
                RADIUS + 2.5,
                Stroke::new(2.0, Color32::WHITE),
            ));
        }
        if let Some(c) = s.cursor.filter(|&c| c < n) {
            shapes.push(Shape::circle_stroke(
                screen[c],
                RADIUS + 5.0,
                Stroke::new(2.0, style::ACCENT),
            ));
        }
        painter.extend(shapes);
        // Class names never cover each other: nodes of similar classes often land together (on t-SNE, on
        // the same look-alike image), so each name takes the nearest free line above or below its node, with
        // a thin line to the node when it moved.
        let d = 7.0;
        let nodes: Vec<Pos2> = map.text.iter().map(|&p| to_screen(p)).collect();
        for (c, &pos) in nodes.iter().enumerate() {
            painter.add(Shape::convex_polygon(
                vec![
                    pos + Vec2::new(0.0, -d),
                    pos + Vec2::new(d, 0.0),
                    pos + Vec2::new(0.0, d),
                    pos + Vec2::new(-d, 0.0),
                ],
                style::class_color(c),
                Stroke::new(1.5, Color32::BLACK),
            ));
        }
        let mut taken: Vec<Rect> = nodes
            .iter()
            .map(|&p| Rect::from_center_size(p, Vec2::splat(2.0 * d)))
            .collect();
        for (c, &pos) in nodes.iter().enumerate() {
            let color = style::class_color(c);
            let Some(name) = classes.get(c) else {
                continue;
            };
            let text_color = ui.visuals().strong_text_color();
            let galley =
                painter.layout_no_wrap(name.clone(), FontId::proportional(14.0), text_color);
            let size = galley.size();
            let at = |line: i32| {
                Rect::from_min_size(
                    pos + Vec2::new(10.0, line as f32 * (size.y + 1.0) - size.y / 2.0),
                    size,
                )
            };
            let line = (0..=2 * map.text.len() as i32)
                .map(|k| if k % 2 == 1 { (k + 1) / 2 } else { -k / 2 })
                .find(|&l| !taken.iter().any(|r| r.intersects(at(l))))
                .unwrap_or(0);
            let r = at(line);
            if line != 0 {
                painter.line_segment(
                    [pos + Vec2::new(d, 0.0), r.left_center()],
                    Stroke::new(1.0, color.gamma_multiply(0.7)),
                );
            }
            painter.galley(r.min, galley, text_color);
            taken.push(r);
        }
        // Input: a drag selects a box, a click the nearest point.
        let shift = ui.input(|i| i.modifiers.shift);
        if resp.drag_started() {
            // Where the button went down, not where the drag was recognised (a few pixels on).
            ui_state.drag_from = ui
                .input(|i| i.pointer.press_origin())
                .or(resp.interact_pointer_pos());
        }
        if let (Some(from), Some(now)) = (ui_state.drag_from, resp.interact_pointer_pos()) {
            let r = Rect::from_two_pos(from, now);
            painter.rect_stroke(
                r,
                0.0,
                Stroke::new(1.5, style::ACCENT),
                egui::StrokeKind::Inside,
            );
            painter.rect_filled(r, 0.0, style::ACCENT.gamma_multiply(0.12));
        }
        if resp.drag_stopped() {
            if let (Some(from), Some(to)) = (ui_state.drag_from.take(), resp.interact_pointer_pos())
            {
                let r = Rect::from_two_pos(from, to);
                let inside: Vec<usize> = (0..n).filter(|&i| r.contains(screen[i])).collect();
                if !shift {
                    s.selection.clear();
                }
                if let Some(&first) = inside.first() {
                    if s.selection.is_empty() {
                        s.click(first);
                    }
                    s.selection.extend(inside.iter().copied());
                    if let Some(c) = s.cursor {
                        s.selection.insert(c);
                    }
                }
            }
        } else if resp.clicked() {
            if let Some(at) = resp.interact_pointer_pos() {
                let nearest = (0..n)
                    .map(|i| (i, screen[i].distance(at)))
                    .filter(|&(_, d)| d <= RADIUS * 2.5)
                    .min_by(|a, b| a.1.total_cmp(&b.1));
                if let Some((i, _)) = nearest {
                    if ui.input(|inp| inp.modifiers.command) {
                        s.ctrl_click(i);
                    } else {
                        s.click(i);
                    }
                }
            }
        }
        if let Some(c) = s.cursor.filter(|&c| c < n) {
            if resp.hovered() {
                let name = &s.images[c].rel;
                painter.text(
                    rect.left_bottom() + Vec2::new(10.0, -10.0),
                    Align2::LEFT_BOTTOM,
                    format!("{name} · {} selected", s.targets().len()),
                    FontId::proportional(13.0),
                    ui.visuals().text_color(),
                );
            }
        }
        ui_state.screen = screen;
        ui_state.canvas = rect;
        self.after_map_header(chose, cancel);
    }

    /// What the header's buttons asked for, applied once the frame's borrows are over.
    fn after_map_header(&mut self, chose: Option<MapLayout>, cancel: bool) {
        if let Some(l) = chose {
            self.choose_map_layout(l);
        }
        if cancel {
            self.insight.cancel_tsne();
        }
    }
}
