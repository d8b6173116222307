//! The training view: method and hyperparameters (left), the live loss curve, the cross-validated accuracy
//! across retrains, the history of runs with their held-out accuracy, the labels per class and the confusion
//! matrix of the cross-validated predictions (centre). Both charts export as PNG ([`crate::chart_png`]).

use std::path::PathBuf;

use egui::{Align2, Color32, FontId, Pos2, Rect, RichText, Sense, Stroke, Vec2};
use egui_plot::{Legend, Line, Plot, Points};

use super::dialogs::{method_combo, param, param_group, reset_params};
use super::{style, HeGraphApp, Level};
use crate::adapter::{Fusion, Method, TrainParams, WeightInit};
use crate::chart_png::{accuracy_chart, confusion_chart, save_png};

/// Which chart to write as PNG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chart {
    Accuracy,
    Confusion,
}

impl HeGraphApp {
    pub(super) fn train_view(&mut self, ui: &mut egui::Ui) {
        if self.session.is_none() {
            self.label_view(ui);
            return;
        }
        egui::Panel::left("hegraph-train-settings")
            .resizable(false)
            .exact_size(320.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.train_settings(ui));
            });
        egui::CentralPanel::default()
            .frame(
                egui::Frame::central_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(14, 10)),
            )
            .show(ui, |ui| self.train_results(ui));
    }

    fn train_settings(&mut self, ui: &mut egui::Ui) {
        let running = self.engine.train_job.is_some();
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let before = s.project.settings.clone();
        let st = &mut s.project.settings;
        ui.add_space(6.0);
        ui.heading("Method");
        method_combo(ui, &mut st.method);
        let about = match st.method {
            Method::ZeroShot => {
                "CLIP alone: class prompts against each image. Needs no labels (the labels only \
                                 measure it)."
            }
            Method::TipAdapter => {
                "Training-free: a cache of the labelled images' features added to CLIP's \
                                   prediction."
            }
            Method::TipAdapterF => {
                "Tip-Adapter with the cache keys fine-tuned (AdamW, cosine schedule)."
            }
            Method::HeGraph => {
                "Heterogeneous graph of positive-text, negative-text and visual nodes per class (Zhao et \
                 al. 2024); its text and cache classifiers fused in logit space, the cache keys fine-tuned."
            }
        };
        ui.label(RichText::new(about).small().weak());
        ui.add_space(6.0);
        let p = &mut st.train;
        match st.method {
            Method::ZeroShot => {}
            Method::TipAdapter => param_group(ui, "Cache", |ui| tip_cache_params(ui, p)),
            Method::TipAdapterF => param_group(ui, "Fine-tuning", |ui| {
                key_training_params(ui, p);
                tip_cache_params(ui, p);
            }),
            Method::HeGraph => {
                param_group(ui, "Classifier", |ui| {
                    ui.label("fusion")
                        .on_hover_text("How the text and cache classifiers are combined");
                    egui::ComboBox::from_id_salt("hegraph-fusion")
                        .width(100.0)
                        .selected_text(match p.fusion {
                            Fusion::Logit => "logit",
                            Fusion::Probability => "probability (paper)",
                        })
                        .show_ui(ui, |ui| {
                            ui.selectable_value(&mut p.fusion, Fusion::Logit, "logit");
                            ui.selectable_value(
                                &mut p.fusion,
                                Fusion::Probability,
                                "probability (paper)",
                            );
                        });
                    ui.end_row();
                    if p.fusion == Fusion::Logit {
                        key_training_params(ui, p);
                        ui.checkbox(&mut p.self_exclude, "own key left out")
                            .on_hover_text(
                                "In training, each labelled image's own key is left out of its cache sum: an \
                                 image is not its own neighbour at prediction time either",
                            );
                        ui.end_row();
                        tip_cache_params(ui, p);
                    }
                });
                param_group(ui, "Graph layers", |ui| {
                    ui.label("initial weights")
                        .on_hover_text("How W_P, W_N, W_V start");
                    egui::ComboBox::from_id_salt("hegraph-weight-init")
                        .selected_text(match p.weight_init {
                            WeightInit::Zero => "zero (identity)",
                            WeightInit::Uniform => "uniform (the paper's)",
                        })
                        .show_ui(ui, |ui| {
                            ui.selectable_value(
                                &mut p.weight_init,
                                WeightInit::Zero,
                                "zero (identity)",
                            );
                            ui.selectable_value(
                                &mut p.weight_init,
                                WeightInit::Uniform,
                                "uniform (the paper's)",
                            );
                        });
                    ui.end_row();
                    param(
                        ui,
                        &mut p.epochs,
                        "epochs",
                        1.0,
                        "passes over the labelled images (0: the graph layers stay as they start; training \
                         them lost accuracy on real CLIP features)",
                    );
                    param(
                        ui,
                        &mut p.lr,
                        "learning rate",
                        0.0001,
                        "AdamW learning rate (cosine schedule)",
                    );
                    param(
                        ui,
                        &mut p.batch_size,
                        "batch size",
                        1.0,
                        "views per step (all of them when fewer)",
                    );
                });
                param_group(ui, "Meta-path weights", |ui| {
                    param(
                        ui,
                        &mut p.alpha_pp,
                        "α_pp  (P ← P)",
                        0.01,
                        "positive ← positive",
                    );
                    param(
                        ui,
                        &mut p.alpha_vp,
                        "α_vp  (P ← V)",
                        0.01,
                        "positive ← visual",
                    );
                    param(
                        ui,
                        &mut p.alpha_np_train,
                        "α_np  (P ← N), train",
                        0.01,
                        "positive ← negative, in training",
                    );
                    param(
                        ui,
                        &mut p.alpha_np_test,
                        "α_np  (P ← N), test",
                        0.01,
                        "positive ← negative, at prediction",
                    );
                    param(
                        ui,
                        &mut p.beta_pn,
                        "β_pn  (N ← P)",
                        0.01,
                        "negative ← positive",
                    );
                    param(
                        ui,
                        &mut p.beta_vn,
                        "β_vn  (N ← V)",
                        0.01,
                        "negative ← visual",
                    );
                    param(
                        ui,
                        &mut p.gamma,
                        "γ  (cache bias)",
                        0.01,
                        "weight of the visual bias added to the cache keys",
                    );
                });
                param_group(ui, "Loss and prediction", |ui| {
                    param(
                        ui,
                        &mut p.lambda,
                        "λ  (cache loss)",
                        0.01,
                        "weight of the cache classifier's loss",
                    );
                    param(
                        ui,
                        &mut p.fusion_weight,
                        "w  (cache in prediction)",
                        0.01,
                        "weight of the cache classifier",
                    );
                });
                ui.checkbox(
                    &mut p.use_negative,
                    "negative-text nodes (\"a photo of no …\")",
                );
            }
        }
        if st.method != Method::ZeroShot || st.transductive {
            ui.add_space(4.0);
            ui.label(RichText::new("Unlabelled images").strong());
            {
                ui.checkbox(
                    &mut st.transductive,
                    "refine predictions with the unlabelled images",
                )
                .on_hover_text(
                    "After each training, a Gaussian mixture over the unlabelled images' features refines \
                     their predictions, kept close to the adapter's (transductive, TransCLIP-style)",
                );
            }
        }
        ui.add_space(4.0);
        reset_params(ui, &mut st.train);
        ui.separator();
        ui.label(RichText::new("When to train").strong());
        ui.horizontal(|ui| {
            let l = ui.label("retrain after");
            ui.add(egui::DragValue::new(&mut st.auto_train_every).range(0..=10_000))
                .labelled_by(l.id)
                .on_hover_text("0 = only when you press T");
            ui.label("new labels");
        });
        ui.add(egui::Slider::new(&mut st.held_out_percent, 0..=50).text("% held out"))
            .on_hover_text("Labelled images left out of training to measure accuracy (a stable choice per image)");
        let changed = s.project.settings != before;
        if changed {
            if let Err(e) = s.save() {
                let t = e.to_string();
                self.notify(super::Level::Error, t);
            }
        }
        ui.add_space(10.0);
        let label = if running {
            "Training…"
        } else {
            "▶ Train now (T)"
        };
        let b = egui::Button::new(RichText::new(label).strong().size(15.0))
            .fill(style::ACCENT.gamma_multiply(0.45))
            .min_size(Vec2::new(200.0, 32.0));
        if ui.add_enabled(!running, b).clicked() {
            if let Err(e) = self.start_training() {
                self.notify(super::Level::Warn, e);
            }
        }
    }

    fn train_results(&mut self, ui: &mut egui::Ui) {
        let live = self.engine.train_job.as_ref().map(|j| j.losses.clone());
        let last = self.engine.history.last().map(|r| r.losses.clone());
        let previous = if live.is_some() {
            self.engine.history.last().map(|r| r.losses.clone())
        } else {
            self.engine
                .history
                .iter()
                .rev()
                .nth(1)
                .map(|r| r.losses.clone())
        };
        let current = live.clone().or(last).unwrap_or_default();
        let to_points = |l: &[(usize, f32)]| -> Vec<[f64; 2]> {
            l.iter().map(|&(s, v)| [s as f64, v as f64]).collect()
        };
        let height = (ui.available_height() * 0.40).clamp(160.0, 320.0);
        let mut export = None;
        ui.columns(2, |cols| {
            let ui = &mut cols[0];
            ui.horizontal(|ui| {
                ui.heading("Loss");
                let note = if live.is_some() {
                    "training now".to_string()
                } else if current.is_empty() {
                    "train (T) to see the curve".to_string()
                } else {
                    "last training".to_string()
                };
                ui.label(RichText::new(note).weak());
            });
            Plot::new("hegraph-loss")
                .height(height)
                .legend(Legend::default())
                .x_axis_label("step")
                .y_axis_label("loss")
                .include_y(0.0)
                .allow_scroll(false)
                .show(ui, |plot| {
                    if let Some(prev) = &previous {
                        if !prev.is_empty() {
                            plot.line(
                                Line::new("previous run", to_points(prev))
                                    .color(egui::Color32::from_gray(120))
                                    .width(1.5),
                            );
                        }
                    }
                    if !current.is_empty() {
                        let name = if live.is_some() {
                            "this run"
                        } else {
                            "last run"
                        };
                        plot.line(
                            Line::new(name, to_points(&current))
                                .color(style::ACCENT)
                                .width(2.5),
                        );
                    }
                });
            export = export.or(self.accuracy_plot(&mut cols[1], height));
        });
        if let Some(r) = self.engine.history.last() {
            let mut how = r.selection.clone().unwrap_or_default();
            if r.refined > 0 {
                if !how.is_empty() {
                    how.push_str("; ");
                }
                how.push_str(&format!(
                    "{} unlabelled predictions refined transductively",
                    r.refined
                ));
            }
            if !how.is_empty() {
                ui.label(RichText::new(format!("Last training: {how}")).small());
            }
        }
        ui.add_space(10.0);
        // Runs over labels per class on the left, the confusion matrix on the right: three side by side
        // left the runs table's five columns too little width, and it ran under the class counts.
        ui.columns(2, |cols| {
            self.runs_table(&mut cols[0]);
            cols[0].add_space(10.0);
            self.class_counts(&mut cols[0]);
            export = export.or(self.confusion_matrix(&mut cols[1]));
        });
        if let Some(chart) = export {
            match self.export_chart(chart) {
                Ok(p) => self.notify(Level::Info, format!("saved {}", p.display())),
                Err(e) => self.notify(Level::Error, e),
            }
        }
    }

    /// Where a chart's PNG goes: next to the project file.
    fn chart_path(&self, chart: Chart) -> Option<PathBuf> {
        let dir = self.session.as_ref()?.project_path.as_ref()?.parent()?;
        Some(dir.join(match chart {
            Chart::Accuracy => "accuracy.png",
            Chart::Confusion => "confusion.png",
        }))
    }

    /// Writes a chart of the training view as a PNG next to the project file and returns its path.
    pub fn export_chart(&mut self, chart: Chart) -> Result<PathBuf, String> {
        let path = self
            .chart_path(chart)
            .ok_or("the project has no folder to save the chart in")?;
        let img = match chart {
            Chart::Accuracy => {
                let points: Vec<(usize, f32)> = self
                    .session
                    .as_ref()
                    .map(|s| {
                        s.project
                            .accuracy_history
                            .iter()
                            .map(|p| (p.labels, p.accuracy))
                            .collect()
                    })
                    .unwrap_or_default();
                accuracy_chart(&points)
            }
            Chart::Confusion => match self.cross_validation() {
                Some(cv) => confusion_chart(&cv.confusion()),
                None => confusion_chart(&[]),
            },
        }
        .map_err(|e| e.to_string())?;
        save_png(&img, &path).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// Cross-validated accuracy against the number of labels, one point per training (kept in the project).
    fn accuracy_plot(&self, ui: &mut egui::Ui, height: f32) -> Option<Chart> {
        let points: Vec<[f64; 2]> = self
            .session
            .as_ref()
            .map(|s| {
                s.project
                    .accuracy_history
                    .iter()
                    .map(|p| [p.labels as f64, p.accuracy as f64 * 100.0])
                    .collect()
            })
            .unwrap_or_default();
        let mut export = None;
        ui.horizontal(|ui| {
            ui.heading("Accuracy");
            ui.label(
                RichText::new("5-fold cross-validated, after each training")
                    .weak()
                    .small(),
            );
            if !points.is_empty() && ui.small_button("Export PNG").clicked() {
                export = Some(Chart::Accuracy);
            }
        });
        Plot::new("hegraph-cv-accuracy")
            .height(height)
            .x_axis_label("labelled images")
            .y_axis_label("accuracy %")
            .include_y(0.0)
            .include_y(100.0)
            .allow_scroll(false)
            .show(ui, |plot| {
                if !points.is_empty() {
                    plot.line(
                        Line::new("cross-validated", points.clone())
                            .color(style::OK)
                            .width(2.5),
                    );
                    plot.points(
                        Points::new("trainings", points)
                            .radius(4.0)
                            .color(style::OK),
                    );
                }
            });
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.project.accuracy_history.is_empty())
        {
            ui.label(RichText::new("Train (T) to measure the first point.").weak());
        }
        export
    }

    /// Rows: the label; columns: the cross-validated prediction; each row coloured by its share.
    fn confusion_matrix(&self, ui: &mut egui::Ui) -> Option<Chart> {
        let mut export = None;
        let cv = self.cross_validation();
        ui.horizontal(|ui| {
            ui.heading("Confusion");
            if cv.is_some() && ui.small_button("Export PNG").clicked() {
                export = Some(Chart::Confusion);
            }
        });
        let Some(cv) = cv else {
            ui.label(RichText::new("Needs two labels; computed in the background.").weak());
            return export;
        };
        let classes = self
            .session
            .as_ref()
            .map(|s| s.classes().to_vec())
            .unwrap_or_default();
        let m = cv.confusion();
        let c = m.len().max(1);
        let side = ui.available_width().min(260.0);
        let cell = ((side - 24.0) / c as f32).max(2.0);
        let (rect, resp) =
            ui.allocate_exact_size(Vec2::splat(cell * c as f32 + 24.0), Sense::hover());
        let p = ui.painter();
        let origin = rect.min + Vec2::splat(24.0);
        let mut hovered = None;
        for (i, row) in m.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f32;
            for (j, &n) in row.iter().enumerate() {
                let share = n as f32 / total;
                let base = if i == j {
                    style::ACCENT
                } else {
                    Color32::from_rgb(230, 80, 70)
                };
                let r = Rect::from_min_size(
                    origin + Vec2::new(j as f32 * cell, i as f32 * cell),
                    Vec2::splat(cell - 1.0),
                );
                p.rect_filled(r, 1.0, ui.visuals().extreme_bg_color);
                p.rect_filled(r, 1.0, base.gamma_multiply(share));
                if n > 0 && cell >= 18.0 {
                    p.text(
                        r.center(),
                        Align2::CENTER_CENTER,
                        n.to_string(),
                        FontId::monospace((cell * 0.4).min(13.0)),
                        ui.visuals().strong_text_color(),
                    );
                }
                if resp.hover_pos().is_some_and(|h| r.contains(h)) {
                    hovered = Some((i, j, n));
                }
            }
        }
        for k in 0..c.min(classes.len()) {
            if cell >= 12.0 {
                let t = (k + 1).to_string();
                let f = FontId::monospace(11.0);
                let weak = ui.visuals().weak_text_color();
                p.text(
                    origin + Vec2::new((k as f32 + 0.5) * cell, -10.0),
                    Align2::CENTER_CENTER,
                    &t,
                    f.clone(),
                    weak,
                );
                p.text(
                    origin + Vec2::new(-10.0, (k as f32 + 0.5) * cell),
                    Align2::CENTER_CENTER,
                    &t,
                    f,
                    weak,
                );
            }
        }
        p.rect_stroke(
            Rect::from_min_size(origin, Vec2::splat(cell * c as f32)),
            1.0,
            Stroke::new(1.0, ui.visuals().weak_text_color()),
            egui::StrokeKind::Outside,
        );
        let name = |k: usize| classes.get(k).cloned().unwrap_or_default();
        let text = match hovered {
            Some((i, j, n)) => format!("{n} labelled “{}”, predicted “{}”", name(i), name(j)),
            None => format!(
                "rows: label · columns: prediction · {:.1} % of {} labels ({} folds)",
                cv.accuracy() * 100.0,
                cv.images.len(),
                cv.folds
            ),
        };
        ui.label(RichText::new(text).small());
        export
    }

    fn runs_table(&self, ui: &mut egui::Ui) {
        ui.heading("Runs");
        if self.engine.history.is_empty() {
            ui.label(RichText::new("No training in this session yet.").weak());
            if let Some(r) = self
                .session
                .as_ref()
                .and_then(|s| s.project.last_training.as_ref())
            {
                let acc = r
                    .held_out_accuracy
                    .map_or("—".into(), |a| format!("{:.1} %", a * 100.0));
                ui.label(format!(
                    "Saved with the project: {} · {} labels · held-out accuracy {acc}",
                    r.method, r.labelled
                ));
            }
            return;
        }
        // Both ways: a narrow window clips the table inside its column instead of drawing over its neighbour.
        egui::ScrollArea::both()
            .id_salt("hegraph-runs")
            .max_height(140.0)
            .show(ui, |ui| {
                egui::Grid::new("hegraph-runs-grid")
                    .striped(true)
                    .num_columns(5)
                    .spacing([14.0, 4.0])
                    .show(ui, |ui| {
                        for h in ["method", "trained on", "held-out acc.", "time", "backend"] {
                            ui.label(RichText::new(h).strong());
                        }
                        ui.end_row();
                        for r in self.engine.history.iter().rev() {
                            let method = ui.label(&r.method);
                            if let Some(sel) = &r.selection {
                                method.on_hover_text(sel);
                            }
                            ui.label(format!("{}", r.trained_on));
                            let acc = r.accuracy.map_or("—".into(), |a| {
                                format!("{:.1} % of {}", a * 100.0, r.held_out)
                            });
                            ui.label(acc);
                            ui.label(style::short_duration(r.seconds));
                            ui.label(RichText::new(&r.backend).small());
                            ui.end_row();
                        }
                    });
            });
    }

    fn class_counts(&self, ui: &mut egui::Ui) {
        ui.heading("Labels per class");
        let Some(s) = &self.session else { return };
        let counts = s.counts_per_class();
        let max = counts.iter().copied().max().unwrap_or(0).max(1);
        egui::ScrollArea::vertical()
            .id_salt("hegraph-class-counts")
            .max_height(ui.available_height().clamp(80.0, 260.0))
            .show(ui, |ui| {
                for (c, name) in s.classes().iter().enumerate() {
                    let (rect, _) = ui
                        .allocate_exact_size(Vec2::new(ui.available_width(), 20.0), Sense::hover());
                    let p = ui.painter();
                    p.text(
                        Pos2::new(rect.min.x, rect.center().y),
                        Align2::LEFT_CENTER,
                        name,
                        FontId::proportional(13.0),
                        ui.visuals().text_color(),
                    );
                    let bar = Rect::from_min_max(
                        Pos2::new(rect.min.x + 110.0, rect.min.y + 4.0),
                        Pos2::new(rect.max.x - 40.0, rect.max.y - 4.0),
                    );
                    p.rect_filled(bar, 3.0, ui.visuals().extreme_bg_color);
                    let w = bar.width() * counts[c] as f32 / max as f32;
                    p.rect_filled(
                        Rect::from_min_size(bar.min, Vec2::new(w, bar.height())),
                        3.0,
                        style::class_color(c),
                    );
                    p.text(
                        Pos2::new(rect.max.x, rect.center().y),
                        Align2::RIGHT_CENTER,
                        counts[c].to_string(),
                        FontId::monospace(12.0),
                        ui.visuals().weak_text_color(),
                    );
                }
            });
    }
}

/// How the cache's weight α and sharpness β are chosen, shared by the Tip-style classifiers.
fn tip_cache_params(ui: &mut egui::Ui, p: &mut TrainParams) {
    ui.checkbox(&mut p.leave_one_out, "α, β by leave-one-out")
        .on_hover_text(
            "Each labelled image is classified without its own key; the (α, β) that predict them best are \
             used. Needs two labels in some class.",
        );
    ui.end_row();
    param(
        ui,
        &mut p.prior_alpha,
        "α without a choice",
        0.01,
        "cache weight used when α cannot be chosen (one label per class, or leave-one-out off); 0 = CLIP alone",
    );
    param(
        ui,
        &mut p.tip_beta,
        "β without a choice",
        0.01,
        "sharpness of the cache affinities when β cannot be chosen",
    );
}

/// The cache keys' fine-tuning (Tip-Adapter-F, and HeGraphAdapter's logit fusion).
fn key_training_params(ui: &mut egui::Ui, p: &mut TrainParams) {
    param(
        ui,
        &mut p.tip_epochs,
        "key epochs",
        1.0,
        "passes over the labelled images when fine-tuning the cache keys",
    );
    param(
        ui,
        &mut p.tip_lr,
        "key learning rate",
        0.0001,
        "AdamW learning rate of the cache keys",
    );
}
