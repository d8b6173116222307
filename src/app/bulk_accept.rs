//! "Accept every prediction ≥ X % for class C (or all classes)": the unlabelled images the model is sure
//! about get their predicted class as a label, marked as accepted predictions (the project file and the
//! exports keep the difference from the person's own labels), in one undoable step. The count is shown before
//! anything is applied; images that carry a label keep it.

use egui::{Key, Modifiers, RichText};

use super::{HeGraphApp, Level};
use crate::project::LabelOrigin;

/// Thresholds offered as buttons (the slider sets any other).
const PRESETS: [f32; 5] = [50.0, 80.0, 90.0, 95.0, 99.0];

/// The dialog's choices.
pub(super) struct BulkAccept {
    /// Minimum top-1 probability, in percent.
    pub percent: f32,
    /// Only images predicted as this class; `None` = every class.
    pub class: Option<usize>,
}

impl Default for BulkAccept {
    fn default() -> Self {
        Self {
            percent: 90.0,
            class: None,
        }
    }
}

impl HeGraphApp {
    /// Opens the dialog (for the class the grid is filtered to by prediction, when it is).
    pub(super) fn open_bulk_accept(&mut self) {
        let Some(s) = &self.session else { return };
        self.insight.bulk = Some(BulkAccept {
            class: s.filter().predicted,
            ..Default::default()
        });
    }

    pub(super) fn bulk_accept_dialog(&mut self, ctx: &egui::Context) {
        let (Some(d), Some(s)) = (self.insight.bulk.as_mut(), self.session.as_ref()) else {
            self.insight.bulk = None;
            return;
        };
        let classes = s.classes().to_vec();
        let has_predictions = s.predictions().is_some();
        let mut apply = false;
        let mut close = false;
        let candidates = s.acceptable(d.percent / 100.0, d.class);
        egui::Modal::new(egui::Id::unique("hegraph-bulk-accept")).show(ctx, |ui| {
            ui.set_width(480.0);
            ui.heading("Accept predictions");
            ui.label(
                "Unlabelled images whose top prediction is at least this sure get that class as a label, \
                 marked “accepted prediction” in the project and the exports. Labelled images keep theirs.",
            );
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                let l = ui.label("confidence at least");
                ui.add(
                    egui::Slider::new(&mut d.percent, 0.0..=100.0)
                        .suffix(" %")
                        .fixed_decimals(0),
                )
                .labelled_by(l.id);
            });
            ui.horizontal(|ui| {
                for p in PRESETS {
                    if ui
                        .selectable_label(d.percent == p, format!("{p:.0} %"))
                        .clicked()
                    {
                        d.percent = p;
                    }
                }
            });
            ui.horizontal(|ui| {
                let l = ui.label("predicted as");
                let text = d
                    .class
                    .and_then(|c| classes.get(c).cloned())
                    .unwrap_or_else(|| "any class".into());
                egui::ComboBox::from_id_salt("hegraph-bulk-class")
                    .selected_text(text)
                    .width(200.0)
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut d.class, None, "any class");
                        for (c, name) in classes.iter().enumerate() {
                            ui.selectable_value(&mut d.class, Some(c), name);
                        }
                    })
                    .response
                    .labelled_by(l.id);
            });
            ui.add_space(6.0);
            let summary = if !has_predictions {
                "There are no predictions yet (they come with the embedding).".to_string()
            } else {
                let mut per_class = vec![0usize; classes.len()];
                for &(_, c) in &candidates {
                    per_class[c] += 1;
                }
                let parts: Vec<String> = per_class
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(c, n)| format!("{n} {}", classes[c]))
                    .collect();
                if parts.is_empty() {
                    "No unlabelled image is predicted that surely.".to_string()
                } else {
                    format!(
                        "{} unlabelled images would be labelled: {}.",
                        candidates.len(),
                        parts.join(", ")
                    )
                }
            };
            ui.label(RichText::new(summary).strong());
            ui.add_space(8.0);
            ui.horizontal(|ui| {
                let accept = egui::Button::new(format!(
                    "Accept {} predictions (Enter)",
                    candidates.len()
                ));
                if ui.add_enabled(!candidates.is_empty(), accept).clicked() {
                    apply = true;
                }
                if ui.button("Cancel (Esc)").clicked() {
                    close = true;
                }
            });
            if ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Enter)) && !candidates.is_empty()
            {
                apply = true;
            }
        });
        if apply {
            self.insight.bulk = None;
            self.accept_predictions(&candidates);
        } else if close {
            self.insight.bulk = None;
        }
    }

    /// Labels each `(image, class)` as an accepted prediction, in one undoable step.
    fn accept_predictions(&mut self, labels: &[(usize, usize)]) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let out = s.label_each_unlabelled(labels, LabelOrigin::Accepted);
        match out.saved {
            Err(e) => self.cannot_save(e),
            Ok(()) => self.notify(
                Level::Info,
                format!(
                    "accepted {} predictions as labels (Ctrl+Z undoes them all)",
                    out.changed
                ),
            ),
        }
    }
}
