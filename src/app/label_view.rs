//! The labelling view: classes and filters (left), the virtualised thumbnail grid (centre), the preview with
//! per-class confidence bars (right), and the welcome page when nothing is open.

use std::path::PathBuf;

use egui::{Align2, Color32, FontId, Pos2, Rect, RichText, Sense, Stroke, Vec2};

use super::state::{GridFilter, Show, SortKey};
use super::thumbs::{Thumb, ThumbKey};
use super::{style, HeGraphApp, Level};

/// Space under a thumbnail for its caption.
const CAPTION: f32 = 22.0;
const GAP: f32 = 8.0;

impl HeGraphApp {
    pub(super) fn label_view(&mut self, ui: &mut egui::Ui) {
        if self.session.is_none() {
            self.welcome(ui);
            return;
        }
        egui::Panel::left("hegraph-classes")
            .resizable(false)
            .exact_size(250.0)
            .show(ui, |ui| self.class_panel(ui));
        egui::Panel::right("hegraph-preview")
            .resizable(false)
            .exact_size(350.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("hegraph-preview-scroll")
                    .auto_shrink([false, false])
                    .show(ui, |ui| self.preview_panel(ui));
            });
        egui::CentralPanel::default()
            .frame(
                egui::Frame::central_panel(ui.style()).inner_margin(egui::Margin::symmetric(10, 8)),
            )
            .show(ui, |ui| self.grid(ui));
    }

    fn welcome(&mut self, ui: &mut egui::Ui) {
        egui::CentralPanel::default().show(ui, |ui| {
            ui.vertical_centered(|ui| {
                ui.add_space(ui.available_height() * 0.22);
                ui.label(RichText::new("hegraph").size(40.0).strong().color(style::ACCENT));
                ui.label(RichText::new("few-shot image labelling with CLIP and the Heterogeneous Graph Adapter").size(16.0));
                ui.add_space(24.0);
                if ui
                    .add(egui::Button::new(RichText::new("Open an image folder…").size(17.0)).min_size(Vec2::new(260.0, 40.0)))
                    .clicked()
                {
                    self.pick_folder();
                }
                ui.add_space(8.0);
                ui.label(RichText::new("or drop a folder on this window").weak());
                let recent: Vec<PathBuf> = self.prefs.existing_recent().cloned().collect();
                let mut open = None;
                if let Some(last) = recent.first() {
                    // Most people come back to the project they left: it is one key away (Enter).
                    ui.add_space(14.0);
                    let text = format!("Continue with {}  (Enter)", project_title(last));
                    if ui
                        .add(egui::Button::new(RichText::new(text).size(15.0)).min_size(Vec2::new(260.0, 32.0)))
                        .on_hover_text(last.display().to_string())
                        .clicked()
                        || (!self.dialogs.modal_open()
                            && ui.memory(|m| m.focused().is_none())
                            && ui.input_mut(|i| i.consume_key(egui::Modifiers::NONE, egui::Key::Enter)))
                    {
                        open = Some(last.clone());
                    }
                    ui.add_space(20.0);
                    ui.label(RichText::new("Recent projects").strong());
                    for (k, p) in recent.iter().enumerate() {
                        let shown = project_title(p);
                        let key = if k < 9 { format!("{}  ", k + 1) } else { String::new() };
                        if ui
                            .link(format!("{key}{shown}"))
                            .on_hover_text(p.display().to_string())
                            .clicked()
                        {
                            open = Some(p.clone());
                        }
                    }
                    // The digits open them from the keyboard (a modal, e.g. the model question, has it first).
                    if !self.dialogs.modal_open() {
                        for (k, p) in recent.iter().enumerate().take(9) {
                            let key = super::shortcuts::DIGITS[k];
                            if ui.input_mut(|i| i.consume_key(egui::Modifiers::NONE, key)) {
                                open = Some(p.clone());
                            }
                        }
                    }
                }
                if let Some(p) = open {
                    if let Err(e) = self.open_path(&p) {
                        self.notify(Level::Error, e.to_string());
                    }
                }
                ui.add_space(28.0);
                for line in [
                    "1.  Open a folder of photos (class sub-folders, or give the class names).",
                    "2.  Label a few images with the number keys; N jumps to the most uncertain one.",
                    "3.  Press T to train; every image gets a prediction you can sort and filter by.",
                    "4.  Export the labels as CSV, JSON or a folder per class.",
                ] {
                    ui.label(RichText::new(line).size(14.5));
                }
            });
        });
    }

    fn class_panel(&mut self, ui: &mut egui::Ui) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let classes = s.classes().to_vec();
        let counts = s.counts_per_class();
        let mut predicted = vec![0usize; classes.len()];
        for i in 0..s.len() {
            if s.label(i).is_none() {
                if let Some((c, _, _)) = s.prediction(i) {
                    if let Some(x) = predicted.get_mut(c) {
                        *x += 1;
                    }
                }
            }
        }
        let mut filter = s.filter().clone();
        let mut label_as = None;
        let mut edit = false;
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            ui.heading("Classes");
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui
                    .small_button("Edit…")
                    .on_hover_text("Add, rename, reorder or remove classes")
                    .clicked()
                {
                    edit = true;
                }
            });
        });
        ui.label(
            RichText::new("counts: labelled · predicted among unlabelled")
                .small()
                .weak(),
        );
        ui.add_space(2.0);
        let list_height = (ui.available_height() - 330.0).max(120.0);
        egui::ScrollArea::vertical()
            .id_salt("hegraph-class-list")
            .max_height(list_height)
            .auto_shrink([false, true])
            .show(ui, |ui| {
                for (c, name) in classes.iter().enumerate() {
                    let selected = filter.class == Some(c);
                    let (rect, resp) = ui
                        .allocate_exact_size(Vec2::new(ui.available_width(), 26.0), Sense::click());
                    let resp = resp.on_hover_text(format!(
                        "Click: show only the images labelled '{name}'.\n{}Right-click: more.",
                        if c < 9 {
                            format!(
                                "Press {} to label the selected image(s) as '{name}'.\n",
                                c + 1
                            )
                        } else {
                            "Press / to pick this class by name.\n".to_string()
                        }
                    ));
                    let visuals = ui.visuals();
                    if selected {
                        ui.painter()
                            .rect_filled(rect, 5.0, style::ACCENT.gamma_multiply(0.25));
                    } else if resp.hovered() {
                        ui.painter()
                            .rect_filled(rect, 5.0, visuals.widgets.hovered.weak_bg_fill);
                    }
                    let color = style::class_color(c);
                    let key = if c < 9 {
                        format!("{}", c + 1)
                    } else {
                        String::new()
                    };
                    let p = ui.painter();
                    let badge =
                        Rect::from_min_size(rect.min + Vec2::new(4.0, 4.0), Vec2::splat(18.0));
                    if !key.is_empty() {
                        p.rect_filled(badge, 4.0, color.gamma_multiply(0.25));
                        p.text(
                            badge.center(),
                            Align2::CENTER_CENTER,
                            key,
                            FontId::monospace(12.0),
                            color,
                        );
                    }
                    p.circle_filled(Pos2::new(rect.min.x + 32.0, rect.center().y), 4.5, color);
                    p.text(
                        Pos2::new(rect.min.x + 42.0, rect.center().y),
                        Align2::LEFT_CENTER,
                        name,
                        FontId::proportional(14.0),
                        visuals.strong_text_color(),
                    );
                    p.text(
                        Pos2::new(rect.max.x - 6.0, rect.center().y),
                        Align2::RIGHT_CENTER,
                        format!("{}  ·  {}", counts[c], predicted[c]),
                        FontId::proportional(12.0),
                        visuals.weak_text_color(),
                    );
                    if resp.clicked() {
                        filter.class = if selected { None } else { Some(c) };
                    }
                    resp.context_menu(|ui| {
                        if ui
                            .button(format!("Label the selection as '{name}'"))
                            .clicked()
                        {
                            label_as = Some(c);
                            ui.close();
                        }
                        if ui
                            .button(format!("Show images predicted as '{name}'"))
                            .clicked()
                        {
                            filter.predicted = Some(c);
                            filter.class = None;
                            ui.close();
                        }
                    });
                }
            });
        ui.separator();
        ui.label(RichText::new("Show").strong());
        ui.horizontal(|ui| {
            for (v, t) in [
                (Show::All, "all"),
                (Show::Unlabelled, "unlabelled"),
                (Show::Labelled, "labelled"),
                (Show::Review, "review"),
            ] {
                let r = ui.selectable_value(&mut filter.show, v, t);
                if v == Show::Review {
                    r.on_hover_text(
                        "Likely mistakes: labels that a confident prediction of a model that did not see \
                         them disagrees with (5-fold cross-validation), most confident first",
                    );
                }
            }
        });
        if filter.show == Show::Review {
            let n = s.review().len();
            ui.label(
                RichText::new(format!(
                    "{n} label(s) a held-out prediction ≥ {:.0} % disagrees with",
                    super::insights::REVIEW_MIN_CONFIDENCE * 100.0
                ))
                .small()
                .weak(),
            );
        }
        ui.horizontal(|ui| {
            let l = ui.label("predicted as");
            let text = filter
                .predicted
                .and_then(|c| classes.get(c).cloned())
                .unwrap_or_else(|| "any class".into());
            egui::ComboBox::from_id_salt("hegraph-pred-filter")
                .selected_text(text)
                .width(140.0)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut filter.predicted, None, "any class");
                    for (c, name) in classes.iter().enumerate() {
                        ui.selectable_value(&mut filter.predicted, Some(c), name);
                    }
                })
                .response
                .labelled_by(l.id);
        });
        ui.horizontal(|ui| {
            let l = ui.label("sort by");
            egui::ComboBox::from_id_salt("hegraph-sort")
                .selected_text(filter.sort.label())
                .width(ui.available_width().min(170.0))
                .show_ui(ui, |ui| {
                    for k in SortKey::ALL {
                        ui.selectable_value(&mut filter.sort, k, k.label());
                    }
                    if s.similarity_query().is_some() {
                        let k = SortKey::Similarity;
                        ui.selectable_value(&mut filter.sort, k, k.label());
                    }
                })
                .response
                .labelled_by(l.id);
        });
        let test_checkpoint = self
            .engine
            .model
            .as_ref()
            .is_some_and(|m| m.is_test_checkpoint);
        let search = super::search::search_row(
            ui,
            &mut self.search,
            &mut filter,
            &mut self.grid.focus_search,
            s.similarity_query(),
            test_checkpoint,
        );
        let mut bulk = false;
        ui.horizontal(|ui| {
            if filter != GridFilter::default() && ui.small_button("clear filters").clicked() {
                filter = GridFilter::default();
            }
            bulk = ui
                .small_button("Accept predictions… (A)")
                .on_hover_text("Label every unlabelled image predicted at least X % surely")
                .clicked();
        });
        ui.add_space(8.0);
        let (done, total) = (s.labelled_count(), s.len());
        ui.add(
            egui::ProgressBar::new(if total == 0 {
                0.0
            } else {
                done as f32 / total as f32
            })
            .text(format!("{done} / {total} labelled"))
            .desired_height(18.0),
        );
        s.set_filter(filter);
        if search.clear {
            s.clear_similarity();
        }
        if search.submit {
            self.start_phrase_query();
        }
        if let Some(c) = label_as {
            self.label_with(Some(c));
        }
        if edit {
            self.open_class_editor();
        }
        if bulk {
            self.open_bulk_accept();
        }
    }

    fn grid(&mut self, ui: &mut egui::Ui) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let Some(thumbs) = self.thumbs.as_mut() else {
            return;
        };
        let size = s.project.settings.thumb_size.clamp(48.0, 320.0);
        let visible = s.visible().to_vec();
        ui.horizontal(|ui| {
            let mut text = format!("showing {} of {}", visible.len(), s.len());
            if !s.selection.is_empty() {
                text.push_str(&format!(" · {} selected", s.selection.len()));
            }
            ui.label(RichText::new(text).weak());
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(
                    RichText::new("N: next most uncertain · 1–9: label · F1: all keys")
                        .small()
                        .weak(),
                );
            });
        });
        ui.add_space(4.0);
        // Columns of at least the chosen size, stretched to fill the width (minus the scroll bar).
        let avail = (ui.available_width() - 12.0).max(size);
        let cols = (((avail + GAP) / (size + GAP)).floor() as usize).max(1);
        let tile_w = ((avail - GAP * (cols - 1) as f32) / cols as f32).floor();
        let tile = Vec2::new(tile_w, tile_w + CAPTION);
        self.grid.cols = cols;
        let rows = visible.len().div_ceil(cols);
        let cursor_pos = s.cursor.and_then(|c| visible.iter().position(|&x| x == c));
        let mut area = egui::ScrollArea::vertical()
            .id_salt("hegraph-grid")
            .auto_shrink([false, false]);
        let row_h = tile.y;
        let spacing_y = ui.spacing().item_spacing.y;
        if self.grid.scroll_to_cursor {
            self.grid.scroll_to_cursor = false;
            if let Some(p) = cursor_pos {
                let r = p / cols;
                let shown = &self.grid.rows_shown;
                // Rows at the edges of the shown range may be cut off: keep one row of margin.
                if r <= shown.start || r + 2 >= shown.end || shown.is_empty() {
                    let target = (r as f32 * (row_h + spacing_y) - row_h * 0.5).max(0.0);
                    area = area.vertical_scroll_offset(target);
                }
            }
        }
        let mut clicked: Option<(usize, egui::Modifiers)> = None;
        let mut double: Option<usize> = None;
        let mut menu: Option<(usize, TileMenu)> = None;
        let mut wanted: Vec<ThumbKey> = Vec::new();
        if let Some(c) = s.cursor {
            wanted.push(ThumbKey {
                image: c,
                large: true,
            });
            wanted.push(ThumbKey {
                image: c,
                large: false,
            });
        }
        let labels: Vec<Option<usize>> = s.labels().to_vec();
        let classes = s.classes().to_vec();
        let cursor = s.cursor;
        let selection = s.selection.clone();
        let out = area.show_rows(ui, row_h, rows, |ui, range| {
            self.grid.rows_shown = range.clone();
            for r in range {
                ui.horizontal(|ui| {
                    ui.spacing_mut().item_spacing.x = GAP;
                    for &i in visible.iter().skip(r * cols).take(cols) {
                        let key = ThumbKey {
                            image: i,
                            large: false,
                        };
                        wanted.push(key);
                        let (rect, resp) = ui.allocate_exact_size(tile, Sense::click());
                        let rel = &s.images[i].rel;
                        let resp = resp.on_hover_text(rel.as_str());
                        if ui.is_rect_visible(rect) {
                            let info = TileInfo {
                                label: labels[i],
                                prediction: s.prediction(i),
                                is_cursor: cursor == Some(i),
                                selected: selection.contains(&i),
                                hovered: resp.hovered(),
                                card: self.features_file.as_ref().map(|f| f.card(i, &classes)),
                            };
                            draw_tile(ui, rect, tile_w, thumbs.get(key), &info, &classes);
                        }
                        if resp.clicked() {
                            clicked = Some((i, ui.input(|inp| inp.modifiers)));
                        }
                        if resp.double_clicked() {
                            double = Some(i);
                        }
                        resp.context_menu(|ui| {
                            if ui.button("More like this (M)").clicked() {
                                menu = Some((i, TileMenu::MoreLikeThis));
                                ui.close();
                            }
                            if ui.button("Near-duplicates… (D)").clicked() {
                                menu = Some((i, TileMenu::Duplicates));
                                ui.close();
                            }
                        });
                    }
                });
            }
        });
        let _ = out;
        if visible.is_empty() {
            ui.label(RichText::new("No image matches the filters.").weak());
        }
        wanted.extend(self.search.duplicates.wanted.iter().copied());
        if self.features_file.is_none() {
            thumbs.want(&wanted);
        }
        if let Some((i, m)) = clicked {
            if m.command {
                s.ctrl_click(i);
            } else if m.shift {
                s.shift_click(i);
            } else {
                s.click(i);
            }
        }
        if let Some((i, _)) = menu {
            // A right-click on an image outside the selection acts on that image alone.
            if !s.targets().contains(&i) {
                s.click(i);
            }
        }
        if let Some(i) = double {
            s.click(i);
            self.open_viewer();
        }
        if let Some((_, what)) = menu {
            match what {
                TileMenu::MoreLikeThis => self.more_like_this(),
                TileMenu::Duplicates => self.open_duplicates(),
            }
        }
    }

    fn preview_panel(&mut self, ui: &mut egui::Ui) {
        let method = self.engine.adapter.as_ref().map(|a| a.title());
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let Some(thumbs) = self.thumbs.as_mut() else {
            return;
        };
        let classes = s.classes().to_vec();
        let mut label_as: Option<Option<usize>> = None;
        ui.add_space(8.0);
        let Some(c) = s.cursor else {
            ui.label(RichText::new("Select an image").weak());
            return;
        };
        let box_size = Vec2::new(ui.available_width(), 280.0);
        let (rect, picture) = ui.allocate_exact_size(box_size, Sense::click());
        let open_viewer = picture
            .on_hover_text("Double-click (or Space): full size")
            .double_clicked();
        ui.painter()
            .rect_filled(rect, 8.0, ui.visuals().extreme_bg_color);
        let card = self.features_file.as_ref().map(|f| f.card(c, &classes));
        if let Some(text) = &card {
            ui.painter().text(
                rect.center(),
                Align2::CENTER_CENTER,
                text,
                FontId::proportional(18.0),
                ui.visuals().strong_text_color(),
            );
        }
        let tex = match thumbs.preview(c) {
            _ if card.is_some() => None,
            Thumb::Ready(t) => Some(t.clone()),
            Thumb::Failed(e) => {
                ui.painter().text(
                    rect.center(),
                    Align2::CENTER_CENTER,
                    format!("cannot show this image:\n{e}"),
                    FontId::proportional(13.0),
                    style::WARNING_FG,
                );
                None
            }
            Thumb::Loading => None,
        };
        if let Some(t) = tex {
            let r = fit(t.size_vec2(), rect.shrink(8.0));
            ui.painter().image(
                t.id(),
                r,
                Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                Color32::WHITE,
            );
        }
        ui.add_space(6.0);
        ui.label(RichText::new(&s.images[c].rel).strong());
        match s.label(c) {
            Some(l) => {
                ui.horizontal(|ui| {
                    ui.label("labelled");
                    ui.label(
                        RichText::new(&classes[l])
                            .color(style::class_color(l))
                            .strong(),
                    );
                    if let Some(o) = s.origin(c) {
                        ui.label(RichText::new(format!("· {}", o.describe())).weak());
                    }
                });
            }
            None => {
                ui.label(RichText::new("unlabelled").weak());
            }
        }
        if s.selection.len() > 1 {
            ui.label(
                RichText::new(format!(
                    "{} images selected: a label applies to all",
                    s.selection.len()
                ))
                .color(style::ACCENT),
            );
        }
        ui.add_space(4.0);
        ui.horizontal_wrapped(|ui| {
            ui.spacing_mut().item_spacing = Vec2::new(4.0, 4.0);
            for (k, name) in classes.iter().enumerate() {
                let text = if k < 9 {
                    format!("{} {name}", k + 1)
                } else {
                    name.clone()
                };
                let b =
                    egui::Button::new(RichText::new(text).color(style::class_color(k)).size(13.0));
                if ui
                    .add(b)
                    .on_hover_text(format!(
                        "Label as '{name}'{}",
                        if k < 9 {
                            format!(" (key {})", k + 1)
                        } else {
                            String::new()
                        }
                    ))
                    .clicked()
                {
                    label_as = Some(Some(k));
                }
            }
            if s.label(c).is_some()
                && ui
                    .button("⨯ unlabel")
                    .on_hover_text("Remove the label (0)")
                    .clicked()
            {
                label_as = Some(None);
            }
        });
        ui.add_space(8.0);
        ui.separator();
        let source = method.unwrap_or_else(|| "zero-shot CLIP".into());
        ui.horizontal(|ui| {
            ui.label(RichText::new("Confidence").strong());
            ui.label(RichText::new(format!("({source})")).small().weak());
        });
        match s.predictions() {
            Some(p) => {
                let row = p.row(c).to_vec();
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let shown = order.len().min(10);
                for &k in &order[..shown] {
                    confidence_bar(
                        ui,
                        &classes[k],
                        row[k],
                        style::class_color(k),
                        s.label(c) == Some(k),
                    );
                }
                if order.len() > shown {
                    ui.label(
                        RichText::new(format!("… and {} more classes", order.len() - shown))
                            .small()
                            .weak(),
                    );
                }
            }
            None => {
                ui.label(
                    RichText::new("No predictions yet: they appear once the folder is embedded.")
                        .weak(),
                );
            }
        }
        if let Some(l) = label_as {
            // The preview's buttons label the shown image (and the selection), without moving on.
            let advance = s.project.settings.auto_advance;
            s.project.settings.auto_advance = false;
            self.label_with(l);
            if let Some(s) = self.session.as_mut() {
                s.project.settings.auto_advance = advance;
            }
        }
        if open_viewer {
            self.open_viewer();
        }
    }
}

/// What a tile's context menu asked for.
#[derive(Clone, Copy)]
enum TileMenu {
    MoreLikeThis,
    Duplicates,
}

struct TileInfo {
    label: Option<usize>,
    prediction: Option<(usize, f32, f32)>,
    is_cursor: bool,
    selected: bool,
    hovered: bool,
    /// Instead of a picture (a features file has none): the row's split and class.
    card: Option<String>,
}

fn draw_tile(
    ui: &egui::Ui,
    rect: Rect,
    size: f32,
    thumb: Thumb<'_>,
    info: &TileInfo,
    classes: &[String],
) {
    let p = ui.painter();
    let v = ui.visuals();
    let bg = if info.selected {
        style::ACCENT.gamma_multiply(0.22)
    } else if info.hovered {
        v.widgets.hovered.weak_bg_fill
    } else {
        v.faint_bg_color
    };
    p.rect_filled(rect, 6.0, bg);
    let img_rect = Rect::from_min_size(rect.min, Vec2::splat(size)).shrink(5.0);
    match thumb {
        _ if info.card.is_some() => {
            p.rect_filled(img_rect, 4.0, v.extreme_bg_color);
            if let Some(text) = &info.card {
                p.with_clip_rect(img_rect).text(
                    img_rect.center(),
                    Align2::CENTER_CENTER,
                    text,
                    FontId::proportional(12.5),
                    v.text_color(),
                );
            }
        }
        Thumb::Ready(t) => {
            let r = fit(t.size_vec2(), img_rect);
            p.image(
                t.id(),
                r,
                Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                Color32::WHITE,
            );
        }
        Thumb::Loading => {
            p.rect_filled(img_rect, 4.0, v.extreme_bg_color);
        }
        Thumb::Failed(_) => {
            p.rect_filled(img_rect, 4.0, v.extreme_bg_color);
            p.text(
                img_rect.center(),
                Align2::CENTER_CENTER,
                "unreadable",
                FontId::proportional(12.0),
                style::WARNING_FG,
            );
        }
    }
    let cap = Rect::from_min_max(
        Pos2::new(rect.min.x + 5.0, rect.max.y - CAPTION),
        rect.max - Vec2::new(5.0, 3.0),
    );
    match (info.label, info.prediction) {
        (Some(l), _) => {
            let color = style::class_color(l);
            let name = classes.get(l).map_or("?", String::as_str);
            let galley = p.layout_no_wrap(
                name.to_string(),
                FontId::proportional(12.5),
                Color32::from_gray(20),
            );
            let w = (galley.size().x + 14.0).min(cap.width());
            let pill = Rect::from_min_size(cap.min, Vec2::new(w, cap.height() - 2.0));
            p.rect_filled(pill, 9.0, color);
            p.with_clip_rect(pill).galley(
                Pos2::new(pill.min.x + 7.0, pill.center().y - galley.size().y / 2.0),
                galley,
                Color32::from_gray(20),
            );
        }
        (None, Some((c, conf, _))) => {
            let color = style::class_color(c);
            p.circle_filled(Pos2::new(cap.min.x + 5.0, cap.center().y), 4.0, color);
            let name = classes.get(c).map_or("?", String::as_str);
            p.with_clip_rect(cap).text(
                Pos2::new(cap.min.x + 14.0, cap.center().y),
                Align2::LEFT_CENTER,
                format!("{name} {:.0}%", conf * 100.0),
                FontId::proportional(12.0),
                v.weak_text_color(),
            );
        }
        (None, None) => {}
    }
    let stroke = if info.is_cursor {
        Stroke::new(2.5, style::ACCENT)
    } else if info.selected {
        Stroke::new(1.5, style::ACCENT.gamma_multiply(0.8))
    } else {
        Stroke::NONE
    };
    if stroke != Stroke::NONE {
        p.rect_stroke(rect, 6.0, stroke, egui::StrokeKind::Inside);
    }
}

/// The largest rect of `size`'s aspect ratio centred in `bounds`.
fn fit(size: Vec2, bounds: Rect) -> Rect {
    if size.x <= 0.0 || size.y <= 0.0 {
        return bounds;
    }
    let s = (bounds.width() / size.x).min(bounds.height() / size.y);
    Rect::from_center_size(bounds.center(), size * s)
}

fn confidence_bar(ui: &mut egui::Ui, name: &str, p: f32, color: Color32, is_label: bool) {
    let (rect, resp) =
        ui.allocate_exact_size(Vec2::new(ui.available_width(), 22.0), Sense::hover());
    resp.on_hover_text(format!("{name}: {:.2} %", p * 100.0));
    let painter = ui.painter();
    let name_w = 110.0;
    let bar = Rect::from_min_max(
        Pos2::new(rect.min.x + name_w, rect.min.y + 4.0),
        Pos2::new(rect.max.x - 52.0, rect.max.y - 4.0),
    );
    painter.text(
        Pos2::new(rect.min.x, rect.center().y),
        Align2::LEFT_CENTER,
        if is_label {
            format!("● {name}")
        } else {
            name.to_string()
        },
        FontId::proportional(13.0),
        if is_label {
            color
        } else {
            ui.visuals().text_color()
        },
    );
    painter.rect_filled(bar, 3.0, ui.visuals().extreme_bg_color);
    let filled = Rect::from_min_size(
        bar.min,
        Vec2::new(bar.width() * p.clamp(0.0, 1.0), bar.height()),
    );
    painter.rect_filled(filled, 3.0, color);
    painter.text(
        Pos2::new(rect.max.x, rect.center().y),
        Align2::RIGHT_CENTER,
        format!("{:.1}%", p * 100.0),
        FontId::monospace(12.0),
        ui.visuals().weak_text_color(),
    );
}

/// A project as a person knows it: its folder's name (the default layout `<folder>/.hegraph/project.json`),
/// else the file's path.
fn project_title(p: &std::path::Path) -> String {
    let parent = p.parent();
    match parent.filter(|d| {
        d.file_name()
            .is_some_and(|n| n == crate::data::PROJECT_DIR_NAME)
    }) {
        Some(d) => d
            .parent()
            .map_or_else(|| p.display().to_string(), |f| f.display().to_string()),
        None => p.display().to_string(),
    }
}
