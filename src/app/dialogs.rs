//! Dialogs and side windows: new project (class names), the searchable class picker, the class and template
//! editors, export, settings, keyboard help and error messages.

use std::path::{Path, PathBuf};

use egui::{Key, Modifiers, RichText};

use super::path_prompt::{self, Picked};
use super::prefs::ModelChoice;
use super::{style, HeGraphApp, Level};
use crate::adapter::{Method, TrainParams};
use crate::data;
use crate::project::export::{self, RowOptions, TreeMode};
use crate::project::{self, DEFAULT_TEMPLATE};

/// What the mouse does; the keys come from [`super::shortcuts::BINDINGS`].
const MOUSE_HELP: &[(&str, &str)] = &[
    (
        "Ctrl+click, Shift+click",
        "select several images (labels then apply to all)",
    ),
    (
        "double-click an image",
        "open it at full size (wheel zooms, drag pans)",
    ),
    ("drop a folder", "open it"),
];

pub(super) struct NewProject {
    pub folder: PathBuf,
    pub images: usize,
    pub classes_text: String,
    pub templates_text: String,
    pub error: Option<String>,
}

impl NewProject {
    pub fn new(folder: &Path, images: usize) -> Self {
        Self {
            folder: folder.to_path_buf(),
            images,
            classes_text: String::new(),
            templates_text: DEFAULT_TEMPLATE.to_string(),
            error: None,
        }
    }
}

pub(super) struct ErrorDialog {
    pub title: String,
    pub message: String,
    /// An unreadable project file the person may move aside.
    pub set_aside: Option<PathBuf>,
}

#[derive(Default)]
pub(super) struct ClassPicker {
    pub query: String,
    pub highlighted: usize,
}

pub(super) struct ClassRow {
    pub original: Option<String>,
    pub name: String,
    pub remove: bool,
}

pub(super) struct ClassEditor {
    pub rows: Vec<ClassRow>,
    pub new_name: String,
    pub error: Option<String>,
}

pub(super) struct TemplateEditor {
    pub text: String,
    pub error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ExportFormat {
    Csv,
    Json,
    TreeCopy,
    TreeLink,
}

pub(super) struct ExportDialog {
    pub open: bool,
    /// Where to write, typed; empty = ask with the system's dialog.
    pub target: String,
    pub format: ExportFormat,
    pub include_predicted: bool,
    pub min_confidence: f32,
}

impl Default for ExportDialog {
    fn default() -> Self {
        Self {
            open: false,
            target: String::new(),
            format: ExportFormat::Csv,
            include_predicted: false,
            min_confidence: 0.5,
        }
    }
}

#[derive(Default)]
pub(super) struct Dialogs {
    pub new_project: Option<NewProject>,
    pub error: Option<ErrorDialog>,
    pub picker: Option<ClassPicker>,
    pub classes: Option<ClassEditor>,
    pub templates: Option<TemplateEditor>,
    pub export: ExportDialog,
    pub settings: bool,
    pub help: bool,
    /// Text of the model folder field in the settings window.
    pub model_dir_text: Option<String>,
    /// A bulk relabel waiting for the person's yes.
    pub relabel: Option<ConfirmRelabel>,
    /// "Stop training?" is asked.
    pub stop_training: bool,
    /// Labels cannot be saved where the project is: where else?
    pub cannot_save: Option<CannotSave>,
    /// Where should CLIP's weights come from?
    pub model_choice: Option<ModelChooser>,
    /// A folder or project to open, typed.
    pub open: Option<OpenPrompt>,
    /// A native file dialog just closed: the input that queued up meanwhile is dropped.
    pub drop_input: bool,
}

/// The first folder that needs CLIP weights, when none are on disk and none were chosen.
#[derive(Default)]
pub(super) struct ModelChooser {
    pub folder_text: String,
    pub error: Option<String>,
}

/// "Open a folder or project": a typed path (Tab completes), or the system's dialog.
pub(super) struct OpenPrompt {
    pub text: String,
    /// Why the prompt is shown (e.g. the system dialog did not open).
    pub note: Option<String>,
    /// The field gets the keyboard when the prompt opens.
    pub focus: bool,
}

/// The project could not be saved where it is, so the last labelling action was not taken.
pub(super) struct CannotSave {
    pub error: String,
    /// hegraph's own place for this folder's project, when it is not the place that failed.
    pub fallback: Option<PathBuf>,
}

/// Labelling several images of which `overwrites` already carry another label.
pub(super) struct ConfirmRelabel {
    pub targets: Vec<usize>,
    pub class: Option<usize>,
    pub overwrites: usize,
}

impl Dialogs {
    /// A modal dialog has the keyboard: the labelling keys are off.
    pub fn modal_open(&self) -> bool {
        self.new_project.is_some()
            || self.error.is_some()
            || self.picker.is_some()
            || self.classes.is_some()
            || self.templates.is_some()
            || self.relabel.is_some()
            || self.stop_training
            || self.cannot_save.is_some()
            || self.model_choice.is_some()
            || self.open.is_some()
    }

    pub fn close_top(&mut self) {
        if self.open.take().is_some() {
            return;
        }
        if self.model_choice.take().is_some() {
            return;
        }
        if self.cannot_save.take().is_some() {
            return;
        }
        if self.relabel.take().is_some() {
            return;
        }
        if std::mem::take(&mut self.stop_training) {
            return;
        }
        if self.picker.take().is_some() {
            return;
        }
        if self.error.take().is_some() {
            return;
        }
        if self.classes.take().is_some() {
            return;
        }
        if self.templates.take().is_some() {
            return;
        }
        self.new_project = None;
    }
}

/// A yes/no question in a modal: `Some(true)` on the first button or Enter, `Some(false)` on the second (Esc
/// closes the top dialog through [`Dialogs::close_top`]), `None` while unanswered.
fn ask(
    ctx: &egui::Context,
    id: &str,
    title: &str,
    text: &str,
    (yes, no): (&str, &str),
) -> Option<bool> {
    let mut answer = None;
    egui::Modal::new(egui::Id::unique(id)).show(ctx, |ui| {
        ui.set_width(460.0);
        ui.heading(title);
        ui.add_space(4.0);
        ui.label(text);
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui.button(format!("{yes} (Enter)")).clicked() {
                answer = Some(true);
            }
            if ui.button(format!("{no} (Esc)")).clicked() {
                answer = Some(false);
            }
        });
        if ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Enter)) {
            answer = Some(true);
        }
    });
    answer
}

impl HeGraphApp {
    pub(super) fn open_class_editor(&mut self) {
        let Some(s) = &self.session else { return };
        self.dialogs.classes = Some(ClassEditor {
            rows: s
                .classes()
                .iter()
                .map(|c| ClassRow {
                    original: Some(c.clone()),
                    name: c.clone(),
                    remove: false,
                })
                .collect(),
            new_name: String::new(),
            error: None,
        });
    }

    pub(super) fn open_template_editor(&mut self) {
        let Some(s) = &self.session else { return };
        self.dialogs.templates = Some(TemplateEditor {
            text: s.project.templates.join("\n"),
            error: None,
        });
    }

    pub(super) fn show_dialogs(&mut self, ctx: &egui::Context) {
        self.new_project_dialog(ctx);
        self.error_dialog(ctx);
        self.open_prompt_dialog(ctx);
        self.model_choice_dialog(ctx);
        self.cannot_save_dialog(ctx);
        self.relabel_dialog(ctx);
        self.stop_training_dialog(ctx);
        self.picker_dialog(ctx);
        self.class_editor_dialog(ctx);
        self.template_dialog(ctx);
        self.export_window(ctx);
        self.settings_window(ctx);
        self.help_window(ctx);
    }

    fn new_project_dialog(&mut self, ctx: &egui::Context) {
        let Some(d) = self.dialogs.new_project.as_mut() else {
            return;
        };
        let mut create = false;
        let mut cancel = false;
        let mut load_file = false;
        egui::Modal::new(egui::Id::unique("hegraph-new-project")).show(ctx, |ui| {
            ui.set_width(520.0);
            ui.heading("New project");
            ui.label(format!("{} · {} images", d.folder.display(), d.images));
            ui.add_space(6.0);
            let l = ui.label("Class names, one per line (the order gives the number keys 1–9):");
            ui.add(
                egui::TextEdit::multiline(&mut d.classes_text)
                    .desired_rows(8)
                    .desired_width(f32::INFINITY)
                    .hint_text("cat\ndog\nbird"),
            )
            .labelled_by(l.id);
            if ui.button("Load class names from a file…").clicked() {
                load_file = true;
            }
            ui.add_space(6.0);
            let l = ui.label("Prompt templates, one per line ({} is the class name):");
            ui.add(
                egui::TextEdit::multiline(&mut d.templates_text)
                    .desired_rows(2)
                    .desired_width(f32::INFINITY),
            )
            .labelled_by(l.id);
            if let Some(e) = &d.error {
                ui.colored_label(style::WARNING_FG, e);
            }
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                if ui
                    .button(RichText::new("Create project").strong())
                    .clicked()
                {
                    create = true;
                }
                if ui.button("Cancel").clicked() {
                    cancel = true;
                }
            });
        });
        if load_file {
            self.dialogs.drop_input = true;
            if let Some(f) = rfd::FileDialog::new()
                .set_title("Class names (one per line)")
                .pick_file()
            {
                match std::fs::read_to_string(&f) {
                    Ok(t) => d.classes_text = t,
                    Err(e) => d.error = Some(format!("cannot read {}: {e}", f.display())),
                }
            }
        }
        if cancel {
            self.dialogs.new_project = None;
            return;
        }
        if create {
            let names = match data::parse_class_names(&d.classes_text, "the class list") {
                Ok(n) => n.names,
                Err(e) => {
                    d.error = Some(e.to_string());
                    return;
                }
            };
            let templates: Vec<String> = d
                .templates_text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if let Some(bad) = templates.iter().find(|t| !t.contains("{}")) {
                d.error = Some(format!(
                    "the template '{bad}' has no {{}} for the class name"
                ));
                return;
            }
            let folder = d.folder.clone();
            match self.create_project(&folder, names, templates) {
                Ok(()) => self.dialogs.new_project = None,
                Err(e) => {
                    if let Some(d) = self.dialogs.new_project.as_mut() {
                        d.error = Some(e.to_string());
                    }
                }
            }
        }
    }

    /// A path field with completion, the system's dialog behind "Browse…".
    fn open_prompt_dialog(&mut self, ctx: &egui::Context) {
        let Some(d) = self.dialogs.open.as_mut() else {
            return;
        };
        let mut open = None;
        let mut browse = false;
        let mut close = false;
        egui::Modal::new(egui::Id::unique("hegraph-open-path")).show(ctx, |ui| {
            ui.set_width(560.0);
            ui.heading("Open a folder or project");
            if let Some(n) = &d.note {
                ui.colored_label(style::WARNING_FG, n);
            }
            let l = ui.label("Image folder, or a project .json (Tab completes, Enter opens):");
            // Tab must reach us, not move the focus.
            if ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Tab)) {
                if let Some(c) = path_prompt::complete(&d.text) {
                    d.text = c;
                }
            }
            let r = ui
                .add(
                    egui::TextEdit::singleline(&mut d.text)
                        .desired_width(f32::INFINITY)
                        .lock_focus(true),
                )
                .labelled_by(l.id);
            if std::mem::take(&mut d.focus) {
                r.request_focus();
            }
            if r.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter)) {
                open = Some(path_prompt::expand(&d.text));
            }
            let options = path_prompt::candidates(&d.text);
            if options.len() > 1 {
                for c in options.iter().take(8) {
                    if ui.small_button(c.as_str()).clicked() {
                        d.text = c.clone();
                        d.focus = true;
                    }
                }
                if options.len() > 8 {
                    ui.small(format!("… {} more", options.len() - 8));
                }
            }
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                if ui.button(RichText::new("Open").strong()).clicked() {
                    open = Some(path_prompt::expand(&d.text));
                }
                if ui.button("Browse…").clicked() {
                    browse = true;
                }
                if ui.button("Cancel (Esc)").clicked() {
                    close = true;
                }
            });
        });
        if browse {
            self.dialogs.drop_input = true;
            match path_prompt::native(|| {
                rfd::FileDialog::new()
                    .set_title("Open an image folder")
                    .pick_folder()
            }) {
                Picked::Path(p) => open = Some(p),
                Picked::Cancelled => {}
                Picked::Unavailable => {
                    if let Some(d) = self.dialogs.open.as_mut() {
                        d.note = Some(path_prompt::NATIVE_UNAVAILABLE.to_string());
                        d.focus = true;
                    }
                }
            }
        }
        if close {
            self.dialogs.open = None;
        }
        if let Some(p) = open {
            match self.open_path(&p) {
                Ok(()) => self.dialogs.open = None,
                Err(e) => {
                    if let Some(d) = self.dialogs.open.as_mut() {
                        d.note = Some(e.to_string());
                        d.focus = true;
                    }
                }
            }
        }
    }

    /// Download, a folder, or the test checkpoint: asked once, remembered for every project.
    fn model_choice_dialog(&mut self, ctx: &egui::Context) {
        let Some(d) = self.dialogs.model_choice.as_mut() else {
            return;
        };
        let mut choice = None;
        let mut close = false;
        let mut browse = false;
        egui::Modal::new(egui::Id::unique("hegraph-model-choice")).show(ctx, |ui| {
            ui.set_width(560.0);
            ui.heading("Which CLIP weights?");
            ui.add_space(4.0);
            ui.label(
                "hegraph embeds the images with CLIP. Choose where its weights come from; the choice holds \
                 for every project (Settings changes it).",
            );
            ui.add_space(8.0);
            if ui
                .button(RichText::new(format!(
                    "Download {} (about 600 MB, once)",
                    crate::clip::DEFAULT_MODEL_REPO
                )).strong())
                .on_hover_text("Needs network access to the Hugging Face hub; the progress shows in the status bar")
                .clicked()
            {
                choice = Some(ModelChoice::Download);
            }
            ui.add_space(6.0);
            let l = ui.label("Or a model folder on disk (config.json, model.safetensors, tokenizer.json):");
            ui.horizontal(|ui| {
                ui.add(
                    egui::TextEdit::singleline(&mut d.folder_text)
                        .hint_text("/path/to/clip-vit-base-patch32")
                        .desired_width(330.0),
                )
                .labelled_by(l.id);
                if ui.button("Browse…").clicked() {
                    browse = true;
                }
                if ui.button("Use this folder").clicked() {
                    let dir = PathBuf::from(d.folder_text.trim());
                    let missing = crate::clip::hub::missing_files(&dir);
                    if d.folder_text.trim().is_empty() {
                        d.error = Some("type or browse to a folder first".into());
                    } else if missing.is_empty() {
                        choice = Some(ModelChoice::Folder { path: dir });
                    } else {
                        d.error = Some(format!("{} lacks {}", dir.display(), missing.join(", ")));
                    }
                }
            });
            if let Some(e) = &d.error {
                ui.colored_label(style::WARNING_FG, e);
            }
            ui.add_space(6.0);
            if ui.button("Use the test checkpoint").clicked() {
                choice = Some(ModelChoice::TestCheckpoint);
            }
            ui.colored_label(
                style::WARNING_FG,
                "The test checkpoint has random weights in CLIP's layout: every part of the app works, but \
                 its predictions mean nothing. It is marked in red wherever it is used.",
            );
            ui.add_space(8.0);
            if ui.button("Not now (Esc)").clicked() {
                close = true;
            }
        });
        if browse {
            self.dialogs.drop_input = true;
            if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                if let Some(d) = self.dialogs.model_choice.as_mut() {
                    d.folder_text = dir.display().to_string();
                }
            }
        }
        if close {
            self.dialogs.model_choice = None;
        }
        if let Some(c) = choice {
            self.dialogs.model_choice = None;
            self.choose_model(c);
        }
    }

    /// Offers another place for the project. Until one works every label is refused (and this comes back), so
    /// a label on screen is always a label on disk.
    fn cannot_save_dialog(&mut self, ctx: &egui::Context) {
        let Some(d) = self.dialogs.cannot_save.as_ref() else {
            return;
        };
        enum Choice {
            Fallback(PathBuf),
            SaveAs,
            Close,
        }
        let mut choice = None;
        egui::Modal::new(egui::Id::unique("hegraph-cannot-save")).show(ctx, |ui| {
            ui.set_width(560.0);
            ui.heading("Labels cannot be saved here");
            ui.add_space(4.0);
            ui.colored_label(style::WARNING_FG, &d.error);
            ui.add_space(4.0);
            ui.label(
                "A label is only kept once it is saved, so nothing was labelled. Choose another place for this \
                 folder's project; opening the folder again finds it there.",
            );
            ui.add_space(8.0);
            if let Some(f) = &d.fallback {
                if ui
                    .button(RichText::new("Save in hegraph's folder (Enter)").strong())
                    .on_hover_text(f.display().to_string())
                    .clicked()
                    || ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Enter))
                {
                    choice = Some(Choice::Fallback(f.clone()));
                }
                ui.small(f.display().to_string());
            }
            ui.horizontal(|ui| {
                if ui.button("Save as…").clicked() {
                    choice = Some(Choice::SaveAs);
                }
                if ui.button("Not now (Esc)").clicked() {
                    choice = Some(Choice::Close);
                }
            });
        });
        match choice {
            Some(Choice::Fallback(path)) => {
                let Some(s) = self.session.as_mut() else {
                    return;
                };
                match s.relocate(path.clone()) {
                    Ok(()) => {
                        self.dialogs.cannot_save = None;
                        self.remember_project();
                        self.notify(
                            Level::Info,
                            format!("the project is saved in {}", path.display()),
                        );
                    }
                    Err(e) => {
                        self.dialogs.cannot_save = Some(CannotSave {
                            error: e.to_string(),
                            fallback: None,
                        })
                    }
                }
            }
            Some(Choice::SaveAs) => {
                self.dialogs.cannot_save = None;
                self.save_as();
            }
            Some(Choice::Close) => self.dialogs.cannot_save = None,
            None => {}
        }
    }

    /// "Relabel 12 images, 5 of which you labelled otherwise?" Enter relabels, Esc keeps the labels.
    fn relabel_dialog(&mut self, ctx: &egui::Context) {
        let Some(d) = self.dialogs.relabel.as_ref() else {
            return;
        };
        let to = match d.class {
            Some(c) => {
                let name = self
                    .session
                    .as_ref()
                    .and_then(|s| s.classes().get(c).cloned())
                    .unwrap_or_default();
                format!("as “{name}”")
            }
            None => "as unlabelled".into(),
        };
        let text = format!(
            "Label {} images {to}? {} of them already have another label, which this replaces.",
            d.targets.len(),
            d.overwrites
        );
        let answer = ask(
            ctx,
            "hegraph-relabel",
            "Overwrite labels?",
            &text,
            ("Relabel", "Keep the labels"),
        );
        match answer {
            Some(true) => {
                if let Some(d) = self.dialogs.relabel.take() {
                    self.apply_labels(&d.targets, d.class);
                }
            }
            Some(false) => self.dialogs.relabel = None,
            None => {}
        }
    }

    /// Cancelling a training throws its steps away, so it is asked; the previous adapter stays.
    fn stop_training_dialog(&mut self, ctx: &egui::Context) {
        if self.engine.train_job.is_none() {
            self.dialogs.stop_training = false;
        }
        if !self.dialogs.stop_training {
            return;
        }
        let answer = ask(
            ctx,
            "hegraph-stop-training",
            "Stop training?",
            "The steps done so far are discarded; the predictions stay those of the last training.",
            ("Stop training", "Keep training"),
        );
        if let Some(stop) = answer {
            self.dialogs.stop_training = false;
            if stop {
                if let Some(j) = &self.engine.train_job {
                    j.cancel();
                }
            }
        }
    }

    fn error_dialog(&mut self, ctx: &egui::Context) {
        let Some(d) = self.dialogs.error.as_ref() else {
            return;
        };
        let mut close = false;
        let mut set_aside = None;
        egui::Modal::new(egui::Id::unique("hegraph-error")).show(ctx, |ui| {
            ui.set_width(520.0);
            ui.heading(&d.title);
            ui.add_space(4.0);
            ui.label(&d.message);
            ui.add_space(8.0);
            ui.horizontal(|ui| {
                if let Some(p) = &d.set_aside {
                    if ui
                        .button("Move the file aside and start again")
                        .on_hover_text("Renames it to a .bak file (nothing is deleted) and opens the folder anew")
                        .clicked()
                    {
                        set_aside = Some(p.clone());
                    }
                }
                if ui.button("Close").clicked() {
                    close = true;
                }
            });
        });
        if close {
            self.dialogs.error = None;
        }
        if let Some(p) = set_aside {
            self.dialogs.error = None;
            match project::set_aside(&p) {
                Ok(moved) => {
                    self.notify(
                        Level::Info,
                        format!("moved the unreadable project to {}", moved.display()),
                    );
                    // The default layout `<folder>/.hegraph/project.json`: reopen the folder.
                    let folder = p
                        .parent()
                        .filter(|d| d.file_name().is_some_and(|n| n == ".hegraph"))
                        .and_then(Path::parent)
                        .map(Path::to_path_buf);
                    if let Some(f) = folder {
                        if let Err(e) = self.open_path(&f) {
                            self.notify(Level::Error, e.to_string());
                        }
                    }
                }
                Err(e) => self.notify(Level::Error, e.to_string()),
            }
        }
    }

    fn picker_dialog(&mut self, ctx: &egui::Context) {
        let Some(p) = self.dialogs.picker.as_mut() else {
            return;
        };
        let classes: Vec<String> = self
            .session
            .as_ref()
            .map(|s| s.classes().to_vec())
            .unwrap_or_default();
        let q = p.query.to_lowercase();
        let matches: Vec<usize> = (0..classes.len())
            .filter(|&i| q.is_empty() || classes[i].to_lowercase().contains(&q))
            .collect();
        let (down, up, enter) = ctx.input_mut(|i| {
            (
                i.consume_key(Modifiers::NONE, Key::ArrowDown),
                i.consume_key(Modifiers::NONE, Key::ArrowUp),
                i.consume_key(Modifiers::NONE, Key::Enter),
            )
        });
        if down {
            p.highlighted = (p.highlighted + 1).min(matches.len().saturating_sub(1));
        }
        if up {
            p.highlighted = p.highlighted.saturating_sub(1);
        }
        p.highlighted = p.highlighted.min(matches.len().saturating_sub(1));
        let mut chosen = if enter {
            matches.get(p.highlighted).copied()
        } else {
            None
        };
        let mut close = false;
        egui::Modal::new(egui::Id::unique("hegraph-picker")).show(ctx, |ui| {
            ui.set_width(380.0);
            ui.heading("Label as…");
            let l = ui.label("Type to search, ↑↓ to choose, Enter to label, Esc to close");
            let r = ui.add(
                egui::TextEdit::singleline(&mut p.query)
                    .hint_text("class name")
                    .desired_width(f32::INFINITY),
            );
            r.clone().labelled_by(l.id);
            r.request_focus();
            if r.changed() {
                p.highlighted = 0;
            }
            egui::ScrollArea::vertical()
                .max_height(320.0)
                .show(ui, |ui| {
                    for (k, &c) in matches.iter().enumerate() {
                        let text = format!(
                            "{}{}",
                            if c < 9 {
                                format!("{}  ", c + 1)
                            } else {
                                "    ".into()
                            },
                            classes[c]
                        );
                        let resp = ui.add(egui::Button::selectable(
                            k == p.highlighted,
                            RichText::new(text).color(style::class_color(c)),
                        ));
                        if k == p.highlighted {
                            resp.scroll_to_me(None);
                        }
                        if resp.clicked() {
                            chosen = Some(c);
                        }
                    }
                    if matches.is_empty() {
                        ui.weak("no class matches");
                    }
                });
            if ui.button("Close").clicked() {
                close = true;
            }
        });
        if let Some(c) = chosen {
            self.dialogs.picker = None;
            self.label_with(Some(c));
        } else if close {
            self.dialogs.picker = None;
        }
    }

    fn class_editor_dialog(&mut self, ctx: &egui::Context) {
        let Some(ed) = self.dialogs.classes.as_mut() else {
            return;
        };
        let counts: std::collections::HashMap<String, usize> = self
            .session
            .as_ref()
            .map(|s| {
                s.classes()
                    .iter()
                    .cloned()
                    .zip(s.counts_per_class())
                    .collect()
            })
            .unwrap_or_default();
        let mut apply = false;
        let mut cancel = false;
        egui::Modal::new(egui::Id::unique("hegraph-classes")).show(ctx, |ui| {
            ui.set_width(520.0);
            ui.heading("Classes");
            ui.label(
                RichText::new("Renaming keeps the labels; removing a class unlabels its images.")
                    .weak(),
            );
            ui.add_space(4.0);
            let mut swap: Option<(usize, usize)> = None;
            let n = ed.rows.len();
            egui::ScrollArea::vertical()
                .max_height(360.0)
                .show(ui, |ui| {
                    egui::Grid::new("hegraph-class-grid")
                        .num_columns(4)
                        .spacing([8.0, 4.0])
                        .show(ui, |ui| {
                            for (i, row) in ed.rows.iter_mut().enumerate() {
                                let key = if i < 9 {
                                    format!("{}", i + 1)
                                } else {
                                    String::new()
                                };
                                let l = ui.label(
                                    RichText::new(key).color(style::class_color(i)).strong(),
                                );
                                // Sized, not just desired: a grid column otherwise shrinks the field
                                // to a few letters in a narrow window.
                                ui.add_sized(
                                    [200.0, 22.0],
                                    egui::TextEdit::singleline(&mut row.name),
                                )
                                .labelled_by(l.id)
                                .on_hover_text("class name");
                                let labelled = row
                                    .original
                                    .as_ref()
                                    .and_then(|o| counts.get(o))
                                    .copied()
                                    .unwrap_or(0);
                                ui.checkbox(&mut row.remove, format!("remove ({labelled} labels)"));
                                ui.horizontal(|ui| {
                                    if ui
                                        .add_enabled(i > 0, egui::Button::new("↑"))
                                        .on_hover_text("move up")
                                        .clicked()
                                    {
                                        swap = Some((i - 1, i));
                                    }
                                    if ui
                                        .add_enabled(i + 1 < n, egui::Button::new("↓"))
                                        .on_hover_text("move down")
                                        .clicked()
                                    {
                                        swap = Some((i, i + 1));
                                    }
                                });
                                ui.end_row();
                            }
                        });
                });
            if let Some((a, b)) = swap {
                ed.rows.swap(a, b);
            }
            ui.horizontal(|ui| {
                let l = ui.label("New class:");
                let r = ui
                    .add(egui::TextEdit::singleline(&mut ed.new_name).desired_width(220.0))
                    .labelled_by(l.id);
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                if (ui.button("Add").clicked() || enter) && !ed.new_name.trim().is_empty() {
                    ed.rows.push(ClassRow {
                        original: None,
                        name: ed.new_name.trim().to_string(),
                        remove: false,
                    });
                    ed.new_name.clear();
                }
            });
            if let Some(e) = &ed.error {
                ui.colored_label(style::WARNING_FG, e);
            }
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                if ui.button(RichText::new("Apply").strong()).clicked() {
                    apply = true;
                }
                if ui.button("Cancel").clicked() {
                    cancel = true;
                }
            });
        });
        if cancel {
            self.dialogs.classes = None;
            return;
        }
        if apply {
            let rows = std::mem::take(&mut ed.rows);
            match self.apply_class_edits(&rows) {
                Ok(()) => {
                    self.dialogs.classes = None;
                    self.classes_changed();
                }
                Err(e) => {
                    if let Some(ed) = self.dialogs.classes.as_mut() {
                        ed.rows = rows;
                        ed.error = Some(e);
                    }
                }
            }
        }
    }

    /// Applies removals, renames (through temporary names, so swaps work), additions and the new order.
    fn apply_class_edits(&mut self, rows: &[ClassRow]) -> Result<(), String> {
        let kept: Vec<&ClassRow> = rows.iter().filter(|r| !r.remove).collect();
        if kept.is_empty() {
            return Err("keep at least one class".into());
        }
        let names: Vec<String> = kept.iter().map(|r| r.name.trim().to_string()).collect();
        data::parse_class_names(&names.join("\n"), "the class list").map_err(|e| e.to_string())?;
        if names.iter().any(String::is_empty) || names.len() != kept.len() {
            return Err("a class name cannot be empty".into());
        }
        let Some(s) = self.session.as_mut() else {
            return Err("nothing is open".into());
        };
        let mut p = s.project.clone();
        for r in rows.iter().filter(|r| r.remove) {
            if let Some(o) = &r.original {
                p.remove_class(o).map_err(|e| e.to_string())?;
            }
        }
        for (i, r) in kept.iter().enumerate() {
            if let Some(o) = &r.original {
                p.rename_class(o, &format!("\u{1}tmp{i}"))
                    .map_err(|e| e.to_string())?;
            }
        }
        for (i, r) in kept.iter().enumerate() {
            if r.original.is_some() {
                p.rename_class(&format!("\u{1}tmp{i}"), &names[i])
                    .map_err(|e| e.to_string())?;
            } else {
                p.add_class(&names[i]).map_err(|e| e.to_string())?;
            }
        }
        p.classes = names;
        s.project = p;
        Ok(())
    }

    fn template_dialog(&mut self, ctx: &egui::Context) {
        let Some(ed) = self.dialogs.templates.as_mut() else {
            return;
        };
        let mut apply = false;
        let mut cancel = false;
        egui::Modal::new(egui::Id::unique("hegraph-templates")).show(ctx, |ui| {
            ui.set_width(520.0);
            ui.heading("Prompt templates");
            let l = ui.label(
                "One per line; {} is replaced by the class name. The negative prompts (\"a photo of no {}\") \
                 are derived from these.",
            );
            ui.add(
                egui::TextEdit::multiline(&mut ed.text)
                    .desired_rows(6)
                    .desired_width(f32::INFINITY),
            )
            .labelled_by(l.id);
            if let Some(e) = &ed.error {
                ui.colored_label(style::WARNING_FG, e);
            }
            ui.horizontal(|ui| {
                if ui.button(RichText::new("Apply").strong()).clicked() {
                    apply = true;
                }
                if ui.button("Cancel").clicked() {
                    cancel = true;
                }
            });
        });
        if cancel {
            self.dialogs.templates = None;
        } else if apply {
            let t: Vec<String> = ed
                .text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if t.is_empty() {
                ed.error = Some("give at least one template".into());
            } else if let Some(bad) = t.iter().find(|x| !x.contains("{}")) {
                ed.error = Some(format!("'{bad}' has no {{}} for the class name"));
            } else {
                self.dialogs.templates = None;
                if let Some(s) = self.session.as_mut() {
                    s.project.templates = t;
                }
                self.classes_changed();
            }
        }
    }

    fn export_window(&mut self, ctx: &egui::Context) {
        if !self.dialogs.export.open {
            return;
        }
        let mut open = true;
        let mut run = false;
        let has_preds = self
            .session
            .as_ref()
            .is_some_and(|s| s.predictions().is_some());
        let d = &mut self.dialogs.export;
        egui::Window::new("Export labels")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .default_width(380.0)
            .show(ctx, |ui| {
                ui.label("Format");
                ui.radio_value(
                    &mut d.format,
                    ExportFormat::Csv,
                    "CSV: path,label,confidence,source",
                );
                ui.radio_value(&mut d.format, ExportFormat::Json, "JSON");
                ui.radio_value(
                    &mut d.format,
                    ExportFormat::TreeCopy,
                    "Folder tree (class/image), copies",
                );
                ui.radio_value(
                    &mut d.format,
                    ExportFormat::TreeLink,
                    "Folder tree (class/image), symbolic links",
                );
                ui.separator();
                ui.add_enabled(
                    has_preds,
                    egui::Checkbox::new(
                        &mut d.include_predicted,
                        "also unlabelled images, with their predicted class",
                    ),
                );
                ui.add_enabled_ui(has_preds && d.include_predicted, |ui| {
                    ui.add(
                        egui::Slider::new(&mut d.min_confidence, 0.0..=1.0)
                            .text("minimum confidence"),
                    );
                });
                ui.add_space(6.0);
                ui.horizontal(|ui| {
                    let l = ui.label("to:");
                    ui.add(
                        egui::TextEdit::singleline(&mut d.target)
                            .hint_text("a path, or empty to choose")
                            .desired_width(250.0),
                    )
                    .labelled_by(l.id);
                });
                if ui.button(RichText::new("Export…").strong()).clicked() {
                    run = true;
                }
            });
        self.dialogs.export.open = open;
        if run {
            self.run_export();
        }
    }

    fn run_export(&mut self) {
        let Some(s) = self.session.as_ref() else {
            return;
        };
        let d = &self.dialogs.export;
        let target = if d.target.trim().is_empty() {
            self.dialogs.drop_input = true;
            let picked = path_prompt::native(|| match d.format {
                ExportFormat::Csv => rfd::FileDialog::new()
                    .set_file_name("labels.csv")
                    .add_filter("CSV", &["csv"])
                    .save_file(),
                ExportFormat::Json => rfd::FileDialog::new()
                    .set_file_name("labels.json")
                    .add_filter("JSON", &["json"])
                    .save_file(),
                ExportFormat::TreeCopy | ExportFormat::TreeLink => rfd::FileDialog::new()
                    .set_title("An empty folder for the class folders")
                    .pick_folder(),
            });
            match picked {
                Picked::Path(p) => p,
                Picked::Cancelled => return,
                Picked::Unavailable => {
                    self.notify(
                        Level::Warn,
                        format!(
                            "{}: into the export window's 'to:' field",
                            path_prompt::NATIVE_UNAVAILABLE
                        ),
                    );
                    return;
                }
            }
        } else {
            path_prompt::expand(&d.target)
        };
        let opts = RowOptions {
            include_predicted: d.include_predicted,
            min_confidence: d.min_confidence,
        };
        let result = export_session(s, d.format, &opts, &target);
        match result {
            Ok(msg) => self.notify(Level::Info, msg),
            Err(e) => self.notify(Level::Error, e),
        }
    }

    fn settings_window(&mut self, ctx: &egui::Context) {
        if !self.dialogs.settings {
            return;
        }
        let Some(s) = self.session.as_mut() else {
            self.dialogs.settings = false;
            return;
        };
        let mut open = true;
        let before = s.project.settings.clone();
        let text = self.dialogs.model_dir_text.get_or_insert_with(|| {
            s.project
                .settings
                .model_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        });
        let mut reload_model = false;
        let mut browsed = false;
        let mut change_default = false;
        let mut clip_device = self.prefs.clip_device;
        let encoder_now = self
            .engine
            .embedder
            .as_ref()
            .map(|e| e.image_encoder().describe());
        let default_model = match &self.prefs.model {
            ModelChoice::Unset => "not chosen (the default look-up)".to_string(),
            ModelChoice::Download => {
                format!("{} (downloaded once)", crate::clip::DEFAULT_MODEL_REPO)
            }
            ModelChoice::Folder { path } => path.display().to_string(),
            ModelChoice::TestCheckpoint => "the test checkpoint (random weights)".to_string(),
        };
        egui::Window::new("Settings")
            .open(&mut open)
            .collapsible(false)
            .default_width(440.0)
            .show(ctx, |ui| {
                let st = &mut s.project.settings;
                ui.heading("Model");
                ui.horizontal(|ui| {
                    ui.label("For every project:");
                    ui.label(RichText::new(&default_model).strong());
                    if ui.button("Change…").clicked() {
                        change_default = true;
                    }
                });
                ui.horizontal(|ui| {
                    let l = ui.label("This project only:");
                    ui.add(
                        egui::TextEdit::singleline(text)
                            .hint_text("default look-up (HEGRAPH_MODEL_DIR, user cache)")
                            .desired_width(250.0),
                    )
                    .labelled_by(l.id);
                    if ui.button("Browse…").clicked() {
                        browsed = true;
                        if let Some(d) = rfd::FileDialog::new().pick_folder() {
                            *text = d.display().to_string();
                        }
                    }
                });
                ui.checkbox(
                    &mut st.allow_download,
                    "download the default CLIP model when none is found",
                );
                ui.horizontal(|ui| {
                    ui.label("Embed images on:");
                    for (d, label, hover) in [
                        (
                            crate::clip::ClipDevice::Auto,
                            "auto",
                            "a hardware GPU when there is one, else the CPU",
                        ),
                        (crate::clip::ClipDevice::Cpu, "CPU", "candle on the CPU"),
                        (
                            crate::clip::ClipDevice::Gpu,
                            "GPU",
                            "the GPU through wgpu, even a software one",
                        ),
                    ] {
                        ui.radio_value(&mut clip_device, d, label)
                            .on_hover_text(hover);
                    }
                });
                if let Some(now) = &encoder_now {
                    ui.label(RichText::new(format!("images are embedded on the {now}")).weak());
                }
                if ui
                    .button("Use this model")
                    .on_hover_text("Load the model and embed the folder again")
                    .clicked()
                {
                    st.model_dir = (!text.trim().is_empty()).then(|| PathBuf::from(text.trim()));
                    reload_model = true;
                }
                ui.separator();
                ui.heading("Labelling");
                ui.checkbox(
                    &mut st.auto_advance,
                    "move to the next image after labelling",
                );
                ui.horizontal(|ui| {
                    let l = ui.label("retrain automatically after");
                    ui.add(egui::DragValue::new(&mut st.auto_train_every).range(0..=10_000))
                        .labelled_by(l.id);
                    ui.label("new labels (0 = only with T)");
                });
                ui.add(
                    egui::Slider::new(&mut st.held_out_percent, 0..=50)
                        .text("% of labels held out for accuracy"),
                );
                ui.add(egui::Slider::new(&mut st.thumb_size, 64.0..=240.0).text("thumbnail size"));
            });
        if s.project.settings != before {
            if let Err(e) = s.save() {
                let t = e.to_string();
                self.notify(Level::Error, t);
            }
        }
        if browsed {
            self.dialogs.drop_input = true;
        }
        if clip_device != self.prefs.clip_device {
            self.choose_clip_device(clip_device);
        }
        if change_default {
            self.dialogs.settings = false;
            self.dialogs.model_choice = Some(ModelChooser::default());
        }
        if reload_model {
            self.engine.embedder = None;
            self.engine.model = None;
            self.engine.centre = None;
            self.engine.text = None;
            self.start_embedding();
        }
        if !open {
            self.dialogs.settings = false;
            self.dialogs.model_dir_text = None;
        }
    }

    fn help_window(&mut self, ctx: &egui::Context) {
        let mut open = self.dialogs.help;
        // The list outgrew an 800 px window: it scrolls, and the window stays on screen with its note.
        let list_height = (ctx.content_rect().height() - 300.0).max(120.0);
        egui::Window::new("Keyboard shortcuts")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .default_width(520.0)
            .show(ctx, |ui| {
                egui::ScrollArea::vertical()
                    .max_height(list_height)
                    .show(ui, |ui| {
                        egui::Grid::new("hegraph-help")
                            .num_columns(2)
                            .striped(true)
                            .spacing([16.0, 6.0])
                            .show(ui, |ui| {
                                let keys = super::shortcuts::help_rows();
                                let viewer = super::shortcuts::viewer_help_rows();
                                let mouse = MOUSE_HELP.iter().map(|&(k, w)| (k.to_string(), w));
                                for (k, what) in keys.into_iter().chain(viewer).chain(mouse) {
                                    ui.label(RichText::new(k).monospace().color(style::ACCENT));
                                    ui.label(what);
                                    ui.end_row();
                                }
                            });
                    });
                ui.add_space(6.0);
                ui.label(
                    RichText::new(
                        "Labels are saved after every change. Training runs in the background; the grid's \
                         predictions update when it ends.",
                    )
                    .weak(),
                );
            });
        self.dialogs.help = open;
    }
}

/// Writes an export of the session (shared by the export window and tests). Returns a summary line.
pub(super) fn export_session(
    s: &super::state::Session,
    format: ExportFormat,
    opts: &RowOptions,
    target: &Path,
) -> Result<String, String> {
    let rels: Vec<String> = s.images.iter().map(|i| i.rel.clone()).collect();
    let rows =
        export::export_rows(&s.project, &rels, s.predictions(), opts).map_err(|e| e.to_string())?;
    match format {
        ExportFormat::Csv => export::write_csv(&rows, target).map_err(|e| e.to_string())?,
        ExportFormat::Json => {
            export::write_json(&s.project, &rows, target).map_err(|e| e.to_string())?
        }
        ExportFormat::TreeCopy | ExportFormat::TreeLink => {
            let mode = if format == ExportFormat::TreeCopy {
                TreeMode::Copy
            } else {
                TreeMode::Symlink
            };
            export::export_tree(&s.project.folder, &rows, target, mode)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(format!(
        "exported {} images to {}",
        rows.len(),
        target.display()
    ))
}

/// Hyperparameter widgets of the training view.
pub(super) fn method_combo(ui: &mut egui::Ui, method: &mut Method) {
    egui::ComboBox::from_id_salt("hegraph-method")
        .selected_text(method.title())
        .width(200.0)
        .show_ui(ui, |ui| {
            for m in Method::ALL {
                ui.selectable_value(method, m, m.title());
            }
        });
}

/// A labelled numeric field as one row of a two-column [`egui::Grid`].
pub(super) fn param<N: egui::emath::Numeric>(
    ui: &mut egui::Ui,
    value: &mut N,
    label: &str,
    speed: f64,
    help: &str,
) {
    let l = ui.label(label).on_hover_text(help);
    ui.add(
        egui::DragValue::new(value)
            .speed(speed)
            .min_decimals(if speed < 1.0 { 2 } else { 0 }),
    )
    .labelled_by(l.id)
    .on_hover_text(help);
    ui.end_row();
}

/// A two-column grid of [`param`] rows under a heading.
pub(super) fn param_group(ui: &mut egui::Ui, title: &str, rows: impl FnOnce(&mut egui::Ui)) {
    ui.add_space(4.0);
    ui.label(RichText::new(title).strong());
    egui::Grid::new(("hegraph-params", title))
        .num_columns(2)
        .spacing([14.0, 5.0])
        .min_col_width(175.0)
        .show(ui, rows);
}

/// The defaults button of the training view.
pub(super) fn reset_params(ui: &mut egui::Ui, params: &mut TrainParams) {
    ui.horizontal(|ui| {
        if ui
            .button("Reset to the defaults")
            .on_hover_text("The settings that won on real CLIP features (logit fusion, zero-initialised graph)")
            .clicked()
        {
            *params = TrainParams::default();
        }
        if ui
            .button("The paper's reading (SPEC)")
            .on_hover_text("Probability fusion, uniform initial weights, the graph trained 20 epochs")
            .clicked()
        {
            *params = TrainParams::spec();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::state::{ImageItem, Session};
    use crate::app::AppOptions;
    use crate::project::Project;

    fn app() -> HeGraphApp {
        let mut a = HeGraphApp::new(AppOptions {
            auto_embed: false,
            ..AppOptions::default()
        });
        let mut p = Project::new(
            PathBuf::from("/x"),
            vec!["a".into(), "b".into(), "c".into()],
        );
        p.labels.insert("1.png".into(), "a".into());
        p.labels.insert("2.png".into(), "b".into());
        p.labels.insert("3.png".into(), "c".into());
        let images = ["1.png", "2.png", "3.png"]
            .iter()
            .map(|r| ImageItem {
                rel: r.to_string(),
                path: PathBuf::from("/x").join(r),
            })
            .collect();
        a.session = Some(Session::new(p, None, images));
        a
    }

    fn row(original: Option<&str>, name: &str, remove: bool) -> ClassRow {
        ClassRow {
            original: original.map(String::from),
            name: name.into(),
            remove,
        }
    }

    #[test]
    fn class_edits_reorder_rename_remove_and_add_keeping_labels() {
        let mut a = app();
        // b renamed to "bee" and moved first, c removed, d added.
        let rows = vec![
            row(Some("b"), "bee", false),
            row(Some("a"), "a", false),
            row(Some("c"), "c", true),
            row(None, "d", false),
        ];
        a.apply_class_edits(&rows).unwrap();
        a.classes_changed();
        let s = a.session().unwrap();
        assert_eq!(s.classes(), &["bee", "a", "d"]);
        assert_eq!(s.label(0), Some(1), "1.png keeps class a, now second");
        assert_eq!(s.label(1), Some(0), "2.png follows the rename to bee");
        assert_eq!(s.label(2), None, "3.png lost its removed class");
        assert_eq!(s.project.labels.len(), 2);
    }

    #[test]
    fn class_edits_swap_names_and_refuse_bad_lists() {
        let mut a = app();
        // Swapping two names must not collide half-way.
        let swap = vec![
            row(Some("a"), "b", false),
            row(Some("b"), "a", false),
            row(Some("c"), "c", false),
        ];
        a.apply_class_edits(&swap).unwrap();
        a.classes_changed();
        let s = a.session().unwrap();
        assert_eq!(s.project.labels["1.png"], "b");
        assert_eq!(s.project.labels["2.png"], "a");
        let dup = vec![row(Some("a"), "x", false), row(Some("b"), "X", false)];
        assert!(a.apply_class_edits(&dup).is_err());
        let none = vec![row(Some("a"), "a", true)];
        assert!(a
            .apply_class_edits(&none)
            .unwrap_err()
            .contains("at least one"));
        let empty = vec![row(Some("a"), "  ", false)];
        assert!(a.apply_class_edits(&empty).is_err());
        // A refused edit changes nothing.
        assert_eq!(a.session().unwrap().classes(), &["b", "a", "c"]);
    }

    #[test]
    fn export_of_a_session_writes_every_format() {
        let a = app();
        let dir = tempfile::tempdir().unwrap();
        let s = a.session().unwrap();
        let opts = RowOptions::default();
        let msg = export_session(s, ExportFormat::Csv, &opts, &dir.path().join("l.csv")).unwrap();
        assert!(msg.contains("exported 3 images"), "{msg}");
        let csv = std::fs::read_to_string(dir.path().join("l.csv")).unwrap();
        assert!(
            csv.starts_with("path,label,confidence,source\n1.png,a,,human\n"),
            "{csv}"
        );
        export_session(s, ExportFormat::Json, &opts, &dir.path().join("l.json")).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("l.json")).unwrap())
                .unwrap();
        assert_eq!(v["images"].as_array().unwrap().len(), 3);
    }
}
