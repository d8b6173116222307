//! The map view: every image as a point of the 2-D PCA map of its features ([`crate::embedding_map`]),
//! coloured by its label or its prediction, with the class text nodes placed on the same map. A drag draws a
//! box that selects the images inside it (Shift adds to the selection); a click selects one image; the
//! selection is the grid's, so the digits label it from here as from the grid and a selection made in the grid
//! shows here.

use egui::{Align2, Color32, FontId, Pos2, Rect, RichText, Sense, Shape, Stroke, Vec2};

use super::{style, HeGraphApp};

/// What the map view keeps between frames.
pub struct MapUi {
    /// Colour unlabelled images by their prediction (labelled ones always show their label).
    pub by_prediction: bool,
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
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let classes = s.classes().to_vec();
        let ui_state = &mut self.insight.map_ui;
        ui.horizontal(|ui| {
            ui.heading("Map");
            ui.label("colour by");
            ui.selectable_value(&mut ui_state.by_prediction, false, "label");
            ui.selectable_value(&mut ui_state.by_prediction, true, "prediction");
            if let Some((m, e)) = self
                .insight
                .map
                .as_ref()
                .and_then(|m| m.map.explained().map(|e| (m, e)))
            {
                ui.label(
                    RichText::new(format!(
                        "PCA of {} images in {:.0} ms · the axes explain {:.0} % and {:.0} % of the variance",
                        m.map.points.len(),
                        m.seconds * 1000.0,
                        e[0] * 100.0,
                        e[1] * 100.0
                    ))
                    .weak(),
                );
            }
        });
        ui.label(
            RichText::new(
                "drag: box-select (Shift adds) · click: one image · 1–9: label the selection · ◆ class text",
            )
            .small()
            .weak(),
        );
        let Some(result) = self.insight.map.clone() else {
            let why = if self.engine.centre.is_none() {
                "The map appears once the images are embedded."
            } else if busy {
                "Computing the map…"
            } else {
                "The map could not be made (see the message)."
            };
            ui.label(RichText::new(why).weak());
            return;
        };
        let map = &result.map;
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
        for (c, &p) in map.text.iter().enumerate() {
            let pos = to_screen(p);
            let color = style::class_color(c);
            let d = 7.0;
            painter.add(Shape::convex_polygon(
                vec![
                    pos + Vec2::new(0.0, -d),
                    pos + Vec2::new(d, 0.0),
                    pos + Vec2::new(0.0, d),
                    pos + Vec2::new(-d, 0.0),
                ],
                color,
                Stroke::new(1.5, Color32::BLACK),
            ));
            if let Some(name) = classes.get(c) {
                painter.text(
                    pos + Vec2::new(10.0, 0.0),
                    Align2::LEFT_CENTER,
                    name,
                    FontId::proportional(14.0),
                    ui.visuals().strong_text_color(),
                );
            }
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
    }
}
