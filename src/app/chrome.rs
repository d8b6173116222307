//! The window's frame around the views: menus and view tabs, the train button with the running job's
//! progress (rate, ETA, cancel), the test-checkpoint banner, the status line, transient notices and the
//! drop-a-folder overlay.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use egui::{Color32, RichText};

use super::jobs::{self, Job};
use super::path_prompt::{self, Picked};
use super::state::Session;
use super::{dialogs, style, HeGraphApp, Level, Notice, View, TEST_CHECKPOINT_BANNER};

impl HeGraphApp {
    /// Ctrl+O: the typed-path prompt (the system dialog is one button away), so opening works from the
    /// keyboard and where no dialog backend exists.
    pub(super) fn pick_folder(&mut self) {
        self.open_prompt(None);
    }

    pub(super) fn open_prompt(&mut self, note: Option<String>) {
        let start = self
            .session
            .as_ref()
            .and_then(|s| s.project.folder.parent().map(Path::to_path_buf))
            .or_else(dirs::home_dir)
            .map(|d| format!("{}/", d.display().to_string().trim_end_matches('/')))
            .unwrap_or_default();
        self.dialogs.open = Some(dialogs::OpenPrompt {
            text: start,
            note,
            focus: true,
        });
    }

    pub(super) fn pick_project(&mut self) {
        self.dialogs.drop_input = true;
        match path_prompt::native(|| {
            rfd::FileDialog::new()
                .set_title("Open a hegraph project")
                .add_filter("hegraph project", &["json"])
                .pick_file()
        }) {
            Picked::Path(file) => {
                if let Err(e) = self.open_path(&file) {
                    self.notify(Level::Error, e.to_string());
                }
            }
            Picked::Cancelled => {}
            Picked::Unavailable => self.open_prompt(Some(path_prompt::NATIVE_UNAVAILABLE.into())),
        }
    }

    pub(super) fn save_as(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        self.dialogs.drop_input = true;
        if let Some(file) = rfd::FileDialog::new()
            .set_title("Save the project as")
            .add_filter("hegraph project", &["json"])
            .set_file_name("project.json")
            .save_file()
        {
            let old = s.project_path.replace(file.clone());
            if let Err(e) = s.save() {
                s.project_path = old;
                self.notify(Level::Error, e.to_string());
            } else {
                self.notify(Level::Info, format!("saved as {}", file.display()));
                self.remember_project();
            }
        }
    }

    pub(super) fn top_bar(&mut self, ui: &mut egui::Ui) {
        egui::Panel::top("hegraph-top")
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(10, 6)),
            )
            .show(ui, |ui| {
                egui::MenuBar::new().ui(ui, |ui| {
                    ui.menu_button("Project", |ui| {
                        if ui.button("Open folder…  (Ctrl+O)").clicked() {
                            self.pick_folder();
                        }
                        if ui.button("Open project file…").clicked() {
                            self.pick_project();
                        }
                        let open = self.session.is_some();
                        if ui
                            .add_enabled(open, egui::Button::new("Save as…"))
                            .clicked()
                        {
                            self.save_as();
                        }
                        ui.separator();
                        if ui
                            .add_enabled(open, egui::Button::new("Export labels…"))
                            .clicked()
                        {
                            self.dialogs.export.open = true;
                        }
                        ui.separator();
                        if ui.button("Settings…").clicked() {
                            self.dialogs.settings = true;
                        }
                        ui.separator();
                        if ui.button("Quit  (Ctrl+Q)").clicked() {
                            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                        }
                    });
                    ui.menu_button("Edit", |ui| {
                        let (u, r) = self
                            .session
                            .as_ref()
                            .map_or((false, false), |s| (s.can_undo(), s.can_redo()));
                        if ui
                            .add_enabled(u, egui::Button::new("Undo  (Ctrl+Z)"))
                            .clicked()
                        {
                            self.undo();
                        }
                        if ui
                            .add_enabled(r, egui::Button::new("Redo  (Ctrl+Shift+Z)"))
                            .clicked()
                        {
                            self.redo();
                        }
                        ui.separator();
                        let open = self.session.is_some();
                        if ui
                            .add_enabled(open, egui::Button::new("Classes…"))
                            .clicked()
                        {
                            self.open_class_editor();
                        }
                        if ui
                            .add_enabled(open, egui::Button::new("Prompt templates…"))
                            .clicked()
                        {
                            self.open_template_editor();
                        }
                    });
                    ui.menu_button("Help", |ui| {
                        if ui.button("Keyboard shortcuts  (F1)").clicked() {
                            self.dialogs.help = true;
                        }
                    });
                    ui.add_space(16.0);
                    for v in View::ALL {
                        let selected = self.view == v;
                        let text = RichText::new(v.title()).size(15.0);
                        let text = if selected {
                            text.strong().color(style::ACCENT)
                        } else {
                            text
                        };
                        if ui
                            .add(egui::Button::selectable(selected, text))
                            .on_hover_text(format!("{} view ({})", v.title(), v.shortcut()))
                            .clicked()
                        {
                            self.view = v;
                        }
                    }
                    if let Some(s) = &self.session {
                        ui.add_space(16.0);
                        // The last two parts of the path: "demo/images" says more than "images".
                        let parts: Vec<String> = s
                            .folder()
                            .components()
                            .rev()
                            .take(2)
                            .map(|c| c.as_os_str().to_string_lossy().to_string())
                            .collect();
                        let name = parts.into_iter().rev().collect::<Vec<_>>().join("/");
                        ui.label(RichText::new(name).weak())
                            .on_hover_text(s.folder().display().to_string());
                    }
                    ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                        self.job_controls(ui);
                    });
                });
            });
        let banner = self
            .engine
            .model
            .as_ref()
            .is_some_and(|m| m.is_test_checkpoint);
        if banner {
            egui::Panel::top("hegraph-banner")
                .frame(
                    egui::Frame::NONE
                        .fill(style::WARNING_BG)
                        .inner_margin(egui::Margin::symmetric(10, 4)),
                )
                .show(ui, |ui| {
                    ui.horizontal(|ui| {
                        ui.label(
                            RichText::new(format!("▲  {TEST_CHECKPOINT_BANNER}"))
                                .color(style::WARNING_FG)
                                .strong(),
                        );
                    });
                });
        }
    }

    /// Train button, progress of the running job with rate and ETA, cancel.
    fn job_controls(&mut self, ui: &mut egui::Ui) {
        if let Some(job) = &self.engine.train_job {
            if ui
                .button("Cancel")
                .on_hover_text("Stop training (asks first: the run so far is discarded)")
                .clicked()
            {
                self.dialogs.stop_training = true;
            }
            job_progress(ui, job, "steps");
        } else if let Some(job) = &self.engine.embed_job {
            if ui
                .button("Cancel")
                .on_hover_text("Stop embedding; what is done is kept (Resume or T goes on)")
                .clicked()
            {
                job.cancel();
            }
            job_progress(ui, job, "images");
        } else {
            let can = self
                .session
                .as_ref()
                .is_some_and(|s| s.labelled_count() > 0);
            let fresh = self
                .session
                .as_ref()
                .map_or(0, Session::labels_changed_since_training);
            let text = if fresh > 0 && !self.engine.history.is_empty() {
                let s = if fresh == 1 { "" } else { "s" };
                format!("▶ Train  ({fresh} label{s} changed)")
            } else {
                "▶ Train".to_string()
            };
            let b = egui::Button::new(RichText::new(text).strong())
                .fill(style::ACCENT.gamma_multiply(0.45));
            if ui
                .add_enabled(can, b)
                .on_hover_text("Train the adapter on the labelled images (T)")
                .on_disabled_hover_text("Label a few images first (keys 1–9)")
                .clicked()
            {
                if let Err(e) = self.start_training() {
                    self.notify(Level::Warn, e);
                }
            }
            if self.session.is_some() && !self.has_features() {
                if let Some(e) = &self.engine.model_error {
                    let short: String = e.chars().take(60).collect();
                    ui.label(RichText::new(format!("▲ {short}…")).color(style::WARNING_FG))
                        .on_hover_text(e);
                    if ui
                        .button("Retry")
                        .on_hover_text("Embed the folder again")
                        .clicked()
                    {
                        self.start_embedding();
                    }
                } else if ui
                    .button("▶ Resume embedding")
                    .on_hover_text("The embedding was stopped; the images done so far are cached")
                    .clicked()
                {
                    self.start_embedding();
                }
            }
        }
    }

    /// What trains the adapter: the backend of the last training, else what the next one will use.
    fn compute_label(&self) -> String {
        match self.engine.history.last() {
            Some(r) => format!("compute: {}", r.backend),
            None => format!(
                "compute: {}",
                match self.engine.backend.get() {
                    Some(b) => b.describe(),
                    None => jobs::planned_backend(self.opts.backend, self.gpu.as_ref()),
                }
            ),
        }
    }

    /// The status line. The training summary is placed first, from the right, and the rest fills what is
    /// left from the left, truncated: at 1024 px nothing overlaps, the details are in the tooltips.
    pub(super) fn status_bar(&mut self, ui: &mut egui::Ui) {
        egui::Panel::bottom("hegraph-status")
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(10, 5)),
            )
            .show(ui, |ui| {
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    self.status_training(ui);
                    ui.separator();
                    ui.with_layout(egui::Layout::left_to_right(egui::Align::Center), |ui| {
                        ui.style_mut().wrap_mode = Some(egui::TextWrapMode::Truncate);
                        self.status_left(ui);
                    });
                });
            });
    }

    fn status_training(&self, ui: &mut egui::Ui) {
        let weak = ui.visuals().weak_text_color();
        let small = |t: String| RichText::new(t).size(12.5);
        let Some(s) = &self.session else {
            return;
        };
        match &s.project.last_training {
            Some(r) => {
                let ago = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_sub(r.finished_unix);
                let acc = r
                    .held_out_accuracy
                    .map_or("no held-out images".into(), |a| {
                        format!("held-out accuracy {:.1} % ({})", a * 100.0, r.held_out)
                    });
                ui.label(small(format!(
                    "trained {} · {} · {acc}",
                    style::ago(ago),
                    r.method
                )))
                .on_hover_text(format!(
                    "{} labelled images, {} held out for the accuracy; took {}",
                    r.labelled,
                    r.held_out,
                    style::short_duration(r.seconds)
                ));
            }
            None => {
                ui.label(small("not trained yet (press T)".into()).color(weak));
            }
        }
    }

    fn status_left(&self, ui: &mut egui::Ui) {
        let weak = ui.visuals().weak_text_color();
        let small = |t: String| RichText::new(t).size(12.5);
        let gpu_line = self
            .gpu
            .as_ref()
            .map_or("the window has no GPU device".to_string(), |g| {
                format!("window GPU: {}", g.describe())
            });
        ui.label(small(self.compute_label()).color(weak))
            .on_hover_text(gpu_line);
        ui.separator();
        match &self.engine.model {
            Some(m) if m.is_test_checkpoint => {
                ui.label(
                    small(TEST_CHECKPOINT_BANNER.to_string())
                        .color(style::WARNING_FG)
                        .strong(),
                )
                .on_hover_text(m.banner());
            }
            Some(m) => {
                ui.label(small(format!("model: {}", m.name)).color(weak))
                    .on_hover_text(m.banner());
            }
            None if self.features_file.is_some() => {
                let name = self
                    .features_file
                    .as_ref()
                    .map(|f| f.file_name())
                    .unwrap_or_default();
                ui.label(
                    small(format!("features file {name}: read-only, labels stay in memory"))
                        .color(style::WARNING_FG),
                )
                .on_hover_text(
                    "No project file is written for a features file; its images are not here, so tiles \
                     show their split and class",
                );
            }
            None if self.engine.model_error.is_some() => {
                ui.label(small("no CLIP model".into()).color(style::WARNING_FG))
                    .on_hover_text(self.engine.model_error.clone().unwrap_or_default());
            }
            None => {
                // Said without looking on disk: this runs every frame.
                let state = if self.engine.embed_job.is_some() {
                    "model: loading…"
                } else {
                    "model: not loaded (Resume or T loads it)"
                };
                ui.label(small(state.into()).color(weak));
            }
        }
        ui.separator();
        let Some(s) = &self.session else {
            ui.label(
                small("no folder open: Project ▸ Open folder…, or drop a folder here".into())
                    .color(weak),
            );
            return;
        };
        let counts = s.counts_per_class();
        let per_class: Vec<String> = s
            .classes()
            .iter()
            .zip(&counts)
            .map(|(c, n)| format!("{c}: {n}"))
            .collect();
        ui.label(small(format!(
            "{} images · {} labelled",
            s.len(),
            s.labelled_count()
        )))
        .on_hover_text(format!("labelled per class\n{}", per_class.join("\n")));
        // Per class, as far as the width allows (the full list is in the tooltip).
        let compact: Vec<String> = s
            .classes()
            .iter()
            .zip(&counts)
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        if ui.available_width() > 60.0 {
            ui.add(
                egui::Label::new(small(format!("({})", compact.join(", "))).color(weak)).truncate(),
            )
            .on_hover_text(per_class.join("\n"));
        }
    }

    pub(super) fn show_notices(&mut self, ctx: &egui::Context) {
        let now = Instant::now();
        let life = Duration::from_secs(8);
        // Information fades sooner than warnings; the same text twice is shown once, with a count.
        let mut live: Vec<(&Notice, usize)> = Vec::new();
        for n in &self.notices {
            let life = if n.level == Level::Info {
                life / 2
            } else {
                life
            };
            if now.duration_since(n.at) >= life {
                continue;
            }
            match live.iter_mut().find(|(m, _)| m.text == n.text) {
                Some(entry) => *entry = (n, entry.1 + 1),
                None => live.push((n, 1)),
            }
        }
        if live.is_empty() {
            return;
        }
        // Over the grid's bottom edge, clear of the preview and confidence panel on the right.
        let width = (ctx.content_rect().width() * 0.4).clamp(240.0, 460.0);
        egui::Area::new(egui::Id::unique("hegraph-notices"))
            .anchor(egui::Align2::CENTER_BOTTOM, egui::vec2(0.0, -40.0))
            .interactable(false)
            .show(ctx, |ui| {
                ui.set_max_width(width);
                for (n, count) in live.iter().rev().take(3).rev() {
                    let (fill, fg) = match n.level {
                        Level::Info => (
                            Color32::from_rgb(38, 52, 70),
                            Color32::from_rgb(215, 228, 245),
                        ),
                        Level::Warn => (
                            Color32::from_rgb(74, 60, 28),
                            Color32::from_rgb(255, 226, 160),
                        ),
                        Level::Error => (
                            Color32::from_rgb(90, 32, 32),
                            Color32::from_rgb(255, 205, 205),
                        ),
                    };
                    egui::Frame::NONE
                        .fill(fill)
                        .corner_radius(6)
                        .inner_margin(egui::Margin::symmetric(10, 6))
                        .show(ui, |ui| {
                            let text = if *count > 1 {
                                format!("{} (×{count})", n.text)
                            } else {
                                n.text.clone()
                            };
                            ui.label(RichText::new(text).color(fg));
                        });
                }
            });
        ctx.request_repaint_after(Duration::from_millis(500));
    }
}

/// While files are dragged over the window, says what dropping does.
pub(super) fn drop_overlay(ctx: &egui::Context) {
    let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
    if !hovering {
        return;
    }
    let screen = ctx.content_rect();
    let painter = ctx.layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::unique("hegraph-drop"),
    ));
    painter.rect_filled(screen, 0.0, Color32::from_black_alpha(170));
    painter.rect_stroke(
        screen.shrink(16.0),
        12.0,
        egui::Stroke::new(3.0, style::ACCENT),
        egui::StrokeKind::Inside,
    );
    painter.text(
        screen.center(),
        egui::Align2::CENTER_CENTER,
        "Drop an image folder (or a project .json) to open it",
        egui::FontId::proportional(22.0),
        Color32::WHITE,
    );
}

/// "embedding 10 views of 11 images · 3/11 images · 2.1 images/s · 4 s left": the stage names its unit
/// when it counts something other than the job's usual one (`unit`).
fn job_progress<T: Send + 'static>(ui: &mut egui::Ui, job: &Job<T>, unit: &str) {
    let mut text = if job.stage.is_empty() {
        job.name.to_string()
    } else {
        job.stage.clone()
    };
    let unit = job.unit.as_deref().unwrap_or(unit);
    if job.total > 0 {
        text.push_str(&format!(" · {}/{} {unit}", job.done, job.total));
    }
    if let Some(r) = job.rate() {
        text.push_str(&format!(" · {r:.1} {unit}/s"));
    }
    if let Some(eta) = job.eta() {
        text.push_str(&format!(" · {} left", style::short_duration(eta)));
    }
    ui.add(
        egui::ProgressBar::new(job.fraction())
            .desired_width(360.0)
            .text(text)
            .animate(job.total == 0),
    );
}
