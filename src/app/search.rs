//! Searching by meaning: a phrase embedded with CLIP's text encoder ranks the grid by cosine to it; "more like
//! this" ranks it by cosine to the mean of the selected images; near-duplicates (cosine ≥ a threshold) are
//! listed as groups that can be labelled or skipped whole.
//!
//! Choices:
//! - A phrase is embedded on a worker thread (CLIP's text encoder takes 20–200 ms on a CPU) and kept per
//!   (model, phrase), in memory and in the feature cache; ranking by a known phrase runs on the UI thread,
//!   since a cosine over 10,000 features is a few milliseconds (the time is shown under the search box).
//! - The query sorts the grid ([`super::state::SortKey::Similarity`]) rather than filtering it: the filters
//!   (unlabelled, predicted as, class) still apply, and the best matches are at the top.
//! - The pairwise near-duplicate search runs on a worker, block by block (bounded memory, see
//!   [`crate::similarity`]), with progress and Cancel.
//! - Labelling a group is one labelling action (one undo step, saved, the person's own label); skipping a group
//!   only hides it from the list (no label changes, so nothing for undo): "show skipped" brings it back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use egui::{Color32, Pos2, Rect, RichText, Sense, Vec2};

use super::jobs::{Job, Polled};
use super::state::GridFilter;
use super::thumbs::{Thumb, ThumbKey};
use super::{style, HeGraphApp, Level};
use crate::similarity::{self, DuplicateGroup};

/// What the search box searches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SearchMode {
    /// A case-insensitive part of the file name (the grid filters as you type).
    #[default]
    FileName,
    /// A phrase, embedded with CLIP's text encoder; Enter ranks the grid by it.
    ClipText,
}

/// How the last similarity query went (shown under the search box, read by tests and the bench line).
#[derive(Clone, Debug, PartialEq)]
pub struct QueryTiming {
    pub what: String,
    pub images: usize,
    /// Scoring every image and sorting the grid, on the UI thread.
    pub rank_ms: f64,
    /// Embedding the phrase on the worker; `None` when it was known (or the query was images).
    pub embed_ms: Option<f64>,
}

struct PhraseJob {
    job: Job<Vec<f32>>,
    model: String,
    phrase: String,
    started: Instant,
}

/// The near-duplicates window.
pub struct DuplicateState {
    pub open: bool,
    pub threshold: f32,
    job: Option<(Job<Vec<DuplicateGroup>>, f32)>,
    /// The groups found, the threshold and the features' serial they were found for.
    found: Option<(Vec<DuplicateGroup>, f32, u64)>,
    /// Indices into the found groups that the person skipped.
    skipped: BTreeSet<usize>,
    show_skipped: bool,
    /// The class each group's "label as" offers.
    class_choice: HashMap<usize, usize>,
    /// Thumbnails the window draws; the grid asks the thumbnail cache for them with its own.
    pub(super) wanted: Vec<ThumbKey>,
}

impl Default for DuplicateState {
    fn default() -> Self {
        Self {
            open: false,
            threshold: similarity::DEFAULT_DUPLICATE_THRESHOLD,
            job: None,
            found: None,
            skipped: BTreeSet::new(),
            show_skipped: false,
            class_choice: HashMap::new(),
            wanted: Vec::new(),
        }
    }
}

/// The search box's and the similarity tools' state.
#[derive(Default)]
pub struct SearchState {
    pub mode: SearchMode,
    /// The phrase of the CLIP mode (the file-name text lives in the grid's filter).
    pub phrase: String,
    /// Text features of phrases already embedded, by (model id, phrase).
    phrases: HashMap<(String, String), Arc<Vec<f32>>>,
    phrase_job: Option<PhraseJob>,
    pub last: Option<QueryTiming>,
    pub duplicates: DuplicateState,
}

impl SearchState {
    pub fn busy(&self) -> bool {
        self.phrase_job.is_some() || self.duplicates.job.is_some()
    }

    /// A new project: its images differ, the phrases' features stay valid.
    pub(super) fn reset_for_new_project(&mut self) {
        let phrases = std::mem::take(&mut self.phrases);
        *self = Self {
            phrases,
            ..Self::default()
        };
    }

    /// The groups the window lists (skipped ones left out unless shown).
    pub fn duplicate_groups(&self) -> Vec<&DuplicateGroup> {
        let d = &self.duplicates;
        d.found.as_ref().map_or_else(Vec::new, |(groups, _, _)| {
            groups
                .iter()
                .enumerate()
                .filter(|(k, _)| d.show_skipped || !d.skipped.contains(k))
                .map(|(_, g)| g)
                .collect()
        })
    }
}

/// What the search row asked for.
#[derive(Default)]
pub(super) struct SearchRow {
    pub submit: bool,
    pub clear: bool,
}

/// The search box with its mode. Draws into the class panel while the session is borrowed, hence the
/// disjoint arguments.
pub(super) fn search_row(
    ui: &mut egui::Ui,
    st: &mut SearchState,
    filter: &mut GridFilter,
    focus: &mut bool,
    query: Option<&str>,
    test_checkpoint: bool,
) -> SearchRow {
    let mut out = SearchRow::default();
    let label = ui.horizontal(|ui| {
        let l = ui.label("search");
        ui.selectable_value(&mut st.mode, SearchMode::FileName, "file name")
            .on_hover_text("Filter by a part of the file name (Ctrl+F)");
        ui.selectable_value(&mut st.mode, SearchMode::ClipText, "CLIP text")
            .on_hover_text(
                "Rank the images by how well CLIP thinks they match a phrase (Ctrl+Shift+F; Enter searches)",
            );
        l.id
    });
    let label = label.inner;
    ui.horizontal(|ui| {
        let width = ui.available_width().min(220.0);
        let r = match st.mode {
            SearchMode::FileName => ui
                .add(
                    egui::TextEdit::singleline(&mut filter.search)
                        .id_salt("hegraph-search-name")
                        .hint_text("part of a file name")
                        .desired_width(width),
                )
                .labelled_by(label),
            SearchMode::ClipText => {
                let r = ui
                    .add(
                        egui::TextEdit::singleline(&mut st.phrase)
                            .id_salt("hegraph-search-clip")
                            .hint_text("a phrase, e.g. a dog on a beach")
                            .desired_width(width - 56.0),
                    )
                    .labelled_by(label);
                if r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    out.submit = true;
                }
                if ui
                    .small_button("Search")
                    .on_hover_text("Search (Enter)")
                    .clicked()
                {
                    out.submit = true;
                }
                r
            }
        };
        if std::mem::take(focus) {
            r.request_focus();
        }
    });
    if let Some(q) = query {
        ui.horizontal(|ui| {
            ui.label(RichText::new(format!("sorted by similarity to {q}")).small());
            if ui
                .small_button("clear")
                .on_hover_text("Back to folder order")
                .clicked()
            {
                out.clear = true;
            }
        });
        if let Some(t) = &st.last {
            let embed = t.embed_ms.map_or(String::new(), |e| {
                format!(" (phrase embedded in {e:.0} ms)")
            });
            ui.label(
                RichText::new(format!(
                    "{} images ranked in {:.1} ms{embed}",
                    t.images, t.rank_ms
                ))
                .small()
                .weak(),
            );
        }
        if test_checkpoint {
            ui.label(
                RichText::new("test checkpoint: this ranking means nothing")
                    .small()
                    .color(style::WARNING_FG),
            );
        }
    }
    if st.phrase_job.is_some() {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(RichText::new("embedding the phrase…").small().weak());
        });
    }
    out
}

impl HeGraphApp {
    /// The search state (tests read the timing and the groups).
    pub fn search(&self) -> &SearchState {
        &self.search
    }

    /// The centre-crop features of the session's images (rows aligned with it), once embedded.
    pub fn image_features(&self) -> Option<&crate::linalg::Mat> {
        self.engine.centre.as_deref()
    }

    /// Ranks the grid by the CLIP mode's phrase: at once when its feature is known, else after a worker has
    /// embedded it. Without a text encoder (a features file without its model), a class name is matched to
    /// the class's own text feature.
    pub(super) fn start_phrase_query(&mut self) {
        let phrase = self.search.phrase.trim().to_string();
        if phrase.is_empty() {
            if let Some(s) = self.session.as_mut() {
                s.clear_similarity();
            }
            return;
        }
        if self.engine.centre.is_none() {
            self.notify(
                Level::Info,
                "the images are not embedded yet: search again once they are".into(),
            );
            return;
        }
        let Some(embedder) = self.engine.embedder.clone() else {
            self.class_name_query(&phrase);
            return;
        };
        let model = embedder.model().info().id.clone();
        if let Some(q) = self.search.phrases.get(&(model.clone(), phrase.clone())) {
            let q = Arc::clone(q);
            self.rank_by(&q, format!("“{phrase}”"), None, true);
            return;
        }
        if let Some(old) = &self.search.phrase_job {
            old.job.cancel();
        }
        let p = phrase.clone();
        let job = Job::spawn("phrase", self.ctx.clone(), move |progress, _, _| {
            progress.set_stage("embedding the phrase with CLIP");
            embedder.embed_phrase(&p).map_err(|e| e.to_string())
        });
        self.search.phrase_job = Some(PhraseJob {
            job,
            model,
            phrase,
            started: Instant::now(),
        });
    }

    fn class_name_query(&mut self, phrase: &str) {
        let text = self.engine.text.clone();
        let class = self.session.as_ref().and_then(|s| {
            s.classes()
                .iter()
                .position(|c| c.eq_ignore_ascii_case(phrase))
        });
        match (class, text) {
            (Some(c), Some(t)) if c < t.rows => {
                let q = t.row(c).to_vec();
                self.rank_by(
                    &q,
                    format!("“{phrase}” (the class's text feature)"),
                    None,
                    true,
                );
            }
            _ => self.notify(
                Level::Warn,
                format!(
                    "no CLIP text encoder is loaded, so only a class name can be searched here; '{phrase}' is \
                     none"
                ),
            ),
        }
    }

    /// "More like this": ranks the grid by cosine to the mean feature of the selected image(s).
    pub fn more_like_this(&mut self) {
        let (Some(s), Some(centre)) = (self.session.as_ref(), self.engine.centre.clone()) else {
            self.notify(
                Level::Info,
                "the images are not embedded yet: try again once they are".into(),
            );
            return;
        };
        let targets = s.targets();
        let what = match targets.as_slice() {
            [one] => s.images[*one].rel.clone(),
            many => format!("{} selected images", many.len()),
        };
        match similarity::mean_query(&centre, &targets) {
            Ok(q) => self.rank_by(&q, what, None, false),
            Err(e) => self.notify(Level::Warn, format!("more like this: {e}")),
        }
    }

    /// Scores every image against `query`, sorts the grid by it and records the time it took. A text query
    /// moves the cursor to the best match; "more like this" keeps the images it started from selected.
    fn rank_by(&mut self, query: &[f32], what: String, embed_ms: Option<f64>, to_best: bool) {
        let (Some(centre), Some(s)) = (self.engine.centre.clone(), self.session.as_mut()) else {
            return;
        };
        let t = Instant::now();
        match similarity::cosine_scores(&centre, query) {
            Ok(scores) => {
                let images = scores.iter().flatten().count();
                s.set_similarity(scores, what.clone());
                let first = s.visible().first().copied();
                let rank_ms = t.elapsed().as_secs_f64() * 1e3;
                if to_best {
                    if let Some(f) = first {
                        s.click(f);
                    }
                }
                self.search.last = Some(QueryTiming {
                    what,
                    images,
                    rank_ms,
                    embed_ms,
                });
                self.grid.scroll_to_cursor = true;
            }
            Err(e) => self.notify(Level::Warn, format!("search: {e}")),
        }
    }

    /// Takes in finished phrase embeddings and near-duplicate searches (called with the other jobs).
    pub(super) fn poll_search(&mut self) {
        if let Some(pj) = self.search.phrase_job.as_mut() {
            if let Polled::Finished(r) = pj.job.poll() {
                let Some(pj) = self.search.phrase_job.take() else {
                    return;
                };
                match r {
                    Ok(q) => {
                        let ms = pj.started.elapsed().as_secs_f64() * 1e3;
                        let q = Arc::new(q);
                        self.search
                            .phrases
                            .insert((pj.model, pj.phrase.clone()), Arc::clone(&q));
                        // Only the phrase still in the box ranks the grid (the person may have typed on).
                        if self.search.phrase.trim() == pj.phrase {
                            self.rank_by(&q, format!("“{}”", pj.phrase), Some(ms), true);
                        }
                    }
                    Err(_) if pj.job.is_cancelled() => {}
                    Err(e) => self.notify(
                        Level::Error,
                        format!("the phrase could not be embedded: {e}"),
                    ),
                }
            }
        }
        if let Some((job, thr)) = self.search.duplicates.job.as_mut() {
            let thr = *thr;
            if let Polled::Finished(r) = job.poll() {
                let cancelled = job.is_cancelled();
                self.search.duplicates.job = None;
                match r {
                    Ok(groups) => {
                        let d = &mut self.search.duplicates;
                        d.found = Some((groups, thr, self.engine.serial));
                        d.skipped.clear();
                        d.class_choice.clear();
                    }
                    Err(_) if cancelled => {}
                    Err(e) => self.notify(Level::Error, format!("near-duplicates: {e}")),
                }
            }
        }
    }

    /// Opens the near-duplicates window and searches when nothing was found for these features yet.
    pub(super) fn open_duplicates(&mut self) {
        self.search.duplicates.open = true;
        let fresh = self
            .search
            .duplicates
            .found
            .as_ref()
            .is_some_and(|f| f.2 == self.engine.serial);
        if !fresh {
            self.find_duplicates();
        }
    }

    fn find_duplicates(&mut self) {
        let Some(centre) = self.engine.centre.clone() else {
            self.notify(
                Level::Info,
                "the images are not embedded yet: near-duplicates are found once they are".into(),
            );
            return;
        };
        if let Some((job, _)) = &self.search.duplicates.job {
            job.cancel();
        }
        let thr = self.search.duplicates.threshold;
        let job = Job::spawn("duplicates", self.ctx.clone(), move |p, c, _| {
            similarity::near_duplicate_groups(&centre, thr, p, c).map_err(|e| e.to_string())
        });
        self.search.duplicates.job = Some((job, thr));
    }

    pub(super) fn duplicates_window(&mut self, ctx: &egui::Context) {
        if !self.search.duplicates.open {
            return;
        }
        let mut open = true;
        let mut find = false;
        let mut cancel = false;
        let mut label: Option<(Vec<usize>, usize)> = None;
        let mut skip: Option<usize> = None;
        let mut select: Option<Vec<usize>> = None;
        let mut wanted = Vec::new();
        let classes: Vec<String> = self
            .session
            .as_ref()
            .map_or_else(Vec::new, |s| s.classes().to_vec());
        egui::Window::new("Near-duplicates")
            .open(&mut open)
            .collapsible(false)
            .default_width(560.0)
            .default_height(520.0)
            .default_pos(Pos2::new(330.0, 90.0))
            .show(ctx, |ui| {
                let d = &mut self.search.duplicates;
                ui.horizontal(|ui| {
                    let l = ui.label("cosine ≥");
                    ui.add(egui::Slider::new(&mut d.threshold, 0.80..=1.0).fixed_decimals(2))
                        .labelled_by(l.id);
                    if ui.button("Find").clicked() {
                        find = true;
                    }
                });
                if let Some((job, _)) = &d.job {
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::ProgressBar::new(job.fraction())
                                .text(format!("{} {}/{}", job.stage, job.done, job.total))
                                .desired_width(360.0),
                        );
                        if ui.button("Cancel").clicked() {
                            cancel = true;
                        }
                    });
                }
                let Some((groups, thr, _)) = &d.found else {
                    return;
                };
                let shown: Vec<usize> = (0..groups.len())
                    .filter(|k| d.show_skipped || !d.skipped.contains(k))
                    .collect();
                ui.horizontal(|ui| {
                    ui.label(format!(
                        "{} group(s) at cosine ≥ {thr:.2}, {} image(s)",
                        groups.len(),
                        groups.iter().map(|g| g.members.len()).sum::<usize>()
                    ));
                    if !d.skipped.is_empty() {
                        ui.checkbox(
                            &mut d.show_skipped,
                            format!("show skipped ({})", d.skipped.len()),
                        );
                    }
                });
                ui.separator();
                let Some(s) = self.session.as_ref() else {
                    return;
                };
                let thumbs = &mut self.thumbs;
                egui::ScrollArea::vertical()
                    .id_salt("hegraph-duplicates")
                    .auto_shrink([false, false])
                    .show(ui, |ui| {
                        for &k in &shown {
                            let g = &groups[k];
                            ui.horizontal(|ui| {
                                ui.label(
                                    RichText::new(format!(
                                        "group {} · {} images · cosine ≥ {:.3}",
                                        k + 1,
                                        g.members.len(),
                                        g.min_cosine
                                    ))
                                    .strong(),
                                );
                                if d.skipped.contains(&k) {
                                    ui.label(RichText::new("skipped").weak());
                                }
                            });
                            ui.horizontal_wrapped(|ui| {
                                for &i in g.members.iter().take(8) {
                                    let key = ThumbKey {
                                        image: i,
                                        large: false,
                                    };
                                    wanted.push(key);
                                    let (rect, resp) =
                                        ui.allocate_exact_size(Vec2::splat(64.0), Sense::click());
                                    ui.painter().rect_filled(
                                        rect,
                                        4.0,
                                        ui.visuals().extreme_bg_color,
                                    );
                                    if let Some(Thumb::Ready(t)) =
                                        thumbs.as_mut().map(|t| t.get(key))
                                    {
                                        ui.painter().image(
                                            t.id(),
                                            fit(t.size_vec2(), rect.shrink(2.0)),
                                            Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                                            Color32::WHITE,
                                        );
                                    }
                                    if let Some(l) = s.label(i) {
                                        let c = style::class_color(l);
                                        ui.painter().rect_stroke(
                                            rect,
                                            4.0,
                                            egui::Stroke::new(2.5, c),
                                            egui::StrokeKind::Inside,
                                        );
                                    }
                                    let tip = match s.label(i) {
                                        Some(l) => format!("{} · {}", s.images[i].rel, classes[l]),
                                        None => format!("{} · unlabelled", s.images[i].rel),
                                    };
                                    resp.on_hover_text(tip);
                                }
                                if g.members.len() > 8 {
                                    ui.label(format!("+{}", g.members.len() - 8));
                                }
                            });
                            let labelled: BTreeSet<Option<usize>> =
                                g.members.iter().map(|&i| s.label(i)).collect();
                            ui.horizontal(|ui| {
                                if !classes.is_empty() {
                                    let choice = d.class_choice.entry(k).or_insert_with(|| {
                                        g.members
                                            .iter()
                                            .find_map(|&i| {
                                                s.label(i).or(s.prediction(i).map(|p| p.0))
                                            })
                                            .unwrap_or(0)
                                    });
                                    // Relabelling is said on the button: the group is labelled whole.
                                    let relabels = g
                                        .members
                                        .iter()
                                        .filter(|&&i| s.label(i).is_some_and(|l| l != *choice))
                                        .count();
                                    let text = if relabels > 0 {
                                        format!(
                                            "Label group as '{}' (relabels {relabels})",
                                            classes[*choice]
                                        )
                                    } else {
                                        format!("Label group as '{}'", classes[*choice])
                                    };
                                    if ui.button(text).clicked() {
                                        label = Some((g.members.clone(), *choice));
                                    }
                                    egui::ComboBox::from_id_salt(("hegraph-dup-class", k))
                                        .selected_text("class")
                                        .width(90.0)
                                        .show_ui(ui, |ui| {
                                            for (c, name) in classes.iter().enumerate() {
                                                ui.selectable_value(choice, c, name);
                                            }
                                        });
                                }
                                if !d.skipped.contains(&k) && ui.button("Skip group").clicked() {
                                    skip = Some(k);
                                }
                                if ui.button("Select in grid").clicked() {
                                    select = Some(g.members.clone());
                                }
                                let summary = match labelled.len() {
                                    1 => match labelled.first().copied().flatten() {
                                        Some(l) => format!("all '{}'", classes[l]),
                                        None => "unlabelled".into(),
                                    },
                                    _ => "mixed labels".into(),
                                };
                                ui.label(RichText::new(summary).weak());
                            });
                            ui.add_space(6.0);
                        }
                        if shown.is_empty() {
                            ui.label(RichText::new("No near-duplicates at this threshold.").weak());
                        }
                    });
            });
        self.search.duplicates.wanted = wanted;
        if !open {
            self.search.duplicates.open = false;
        }
        if cancel {
            if let Some((job, _)) = &self.search.duplicates.job {
                job.cancel();
            }
        }
        if find {
            self.find_duplicates();
        }
        if let Some(k) = skip {
            self.search.duplicates.skipped.insert(k);
        }
        if let Some(members) = select {
            if let Some(s) = self.session.as_mut() {
                s.set_filter(GridFilter {
                    sort: s.filter().sort,
                    ..Default::default()
                });
                if let Some(&first) = members.first() {
                    s.click(first);
                }
                s.selection = members.into_iter().collect();
                self.grid.scroll_to_cursor = true;
            }
        }
        if let Some((members, class)) = label {
            // One labelling action: one undo step, saved at once, the person's own label.
            if let Some(s) = self.session.as_mut() {
                let out = s.set_labels(&members, Some(class));
                if let Err(e) = out.saved {
                    self.cannot_save(e);
                } else if out.changed > 0 {
                    let name = s.classes().get(class).cloned().unwrap_or_default();
                    self.notify(
                        Level::Info,
                        format!("{} image(s) labelled '{name}' (Ctrl+Z undoes)", out.changed),
                    );
                }
            }
        }
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
