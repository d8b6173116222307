//! The labelling session without any drawing: images, labels (with undo/redo and a save after every change),
//! predictions, the grid's filter and sort, selection and the "label next" choice. The GUI is a view of this;
//! tests drive it directly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::linalg::{argmax, Mat};
use crate::project::{LabelOrigin, Project, ProjectError};

/// One image of the folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageItem {
    /// Relative to the project folder, with `/` (the key of the project's labels).
    pub rel: String,
    pub path: PathBuf,
}

/// Which images the grid shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Show {
    #[default]
    All,
    Labelled,
    Unlabelled,
    /// Labelled images whose label a confident held-out prediction disagrees with ([`Session::set_review`]),
    /// the most confident disagreement first.
    Review,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortKey {
    /// Folder order (relative path).
    #[default]
    Name,
    /// Least confident first (top-1 probability).
    ConfidenceAsc,
    /// Most confident first.
    ConfidenceDesc,
    /// Smallest top-1 minus top-2 first: the images the model is torn about.
    MarginAsc,
    /// Most similar first to the last similarity query (a CLIP phrase, or "more like this"); not in
    /// [`SortKey::ALL`]: it exists only while a query does (see [`Session::set_similarity`]).
    Similarity,
}

impl SortKey {
    pub const ALL: [SortKey; 4] = [
        SortKey::Name,
        SortKey::ConfidenceAsc,
        SortKey::ConfidenceDesc,
        SortKey::MarginAsc,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::ConfidenceAsc => "confidence ↑ (least sure first)",
            SortKey::ConfidenceDesc => "confidence ↓ (most sure first)",
            SortKey::MarginAsc => "margin ↑ (most torn first)",
            SortKey::Similarity => "similarity ↓ (most alike first)",
        }
    }

    /// The name stored in the project file.
    pub fn id(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::ConfidenceAsc => "confidence_asc",
            SortKey::ConfidenceDesc => "confidence_desc",
            SortKey::MarginAsc => "margin_asc",
            SortKey::Similarity => "similarity",
        }
    }

    /// The sort stored as `id`, or the default for anything else (a hand edit, an older file).
    pub fn from_id(id: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.id() == id)
            .unwrap_or_default()
    }
}

/// The grid's filter.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GridFilter {
    pub show: Show,
    /// Only images labelled with this class.
    pub class: Option<usize>,
    /// Only images whose predicted (top-1) class is this one.
    pub predicted: Option<usize>,
    /// Case-insensitive substring of the relative path.
    pub search: String,
    pub sort: SortKey,
}

/// A label with where it came from.
type Labelled = Option<(String, LabelOrigin)>;

/// One undoable labelling action: `(image, label before, label after)` for every image it touched.
#[derive(Clone, Debug, PartialEq)]
struct Edit {
    changes: Vec<(usize, Labelled, Labelled)>,
}

/// How a labelling action went. A label is only accepted once it is saved: when the save fails the action is
/// rolled back (`changed` = 0) and the error says why, so no label the person sees can be lost.
#[derive(Debug)]
pub struct LabelOutcome {
    pub changed: usize,
    pub saved: Result<(), ProjectError>,
}

pub struct Session {
    pub project: Project,
    /// Where the project is saved after every change; `None` = not saved (tests, or no writable place).
    pub project_path: Option<PathBuf>,
    pub images: Vec<ImageItem>,
    /// `labels[i]` = class index of image `i` (mirror of `project.labels` for speed).
    labels: Vec<Option<usize>>,
    /// `N×C` probabilities from the last training (or zero-shot), rows aligned with `images`.
    probs: Option<Mat>,
    /// Per image: (top-1 class, top-1 probability, top-1 − top-2).
    summary: Vec<Option<(usize, f32, f32)>>,
    undo: Vec<Edit>,
    redo: Vec<Edit>,
    /// The image the keyboard acts on and the preview shows.
    pub cursor: Option<usize>,
    /// Extra images selected with ctrl/shift-click; labelling acts on all of them (and the cursor).
    pub selection: BTreeSet<usize>,
    anchor: Option<usize>,
    filter: GridFilter,
    visible: Vec<usize>,
    visible_dirty: bool,
    /// The labels the last training started from (at first: those the project was opened with, which its
    /// saved adapter saw).
    trained_on: BTreeMap<String, String>,
    /// Images whose label differs from `trained_on`: added, changed or removed, net of undo.
    changed_since_training: usize,
    /// Bumped on every label change so views can cache derived data.
    pub label_generation: u64,
    /// Cosine of every image to the current similarity query (`None`: no features), and what the query is.
    similarity: Option<(Vec<Option<f32>>, String)>,
    /// The likely mistakes: (image, class a held-out model predicts for it), most confident first.
    review: Vec<(usize, usize)>,
}

impl Session {
    /// `images` in folder order; labels come from `project.labels`.
    pub fn new(project: Project, project_path: Option<PathBuf>, images: Vec<ImageItem>) -> Self {
        let labels = images
            .iter()
            .map(|im| project.label_index(&im.rel))
            .collect();
        let n = images.len();
        let mut s = Self {
            project,
            project_path,
            images,
            labels,
            probs: None,
            summary: vec![None; n],
            undo: Vec::new(),
            redo: Vec::new(),
            cursor: if n > 0 { Some(0) } else { None },
            selection: BTreeSet::new(),
            anchor: None,
            filter: GridFilter::default(),
            visible: Vec::new(),
            visible_dirty: true,
            trained_on: BTreeMap::new(),
            changed_since_training: 0,
            label_generation: 0,
            similarity: None,
            review: Vec::new(),
        };
        s.trained_on = s.project.labels.clone();
        s.refresh_visible();
        s
    }

    pub fn folder(&self) -> &Path {
        &self.project.folder
    }

    pub fn classes(&self) -> &[String] {
        &self.project.classes
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    pub fn label(&self, i: usize) -> Option<usize> {
        self.labels.get(i).copied().flatten()
    }

    pub fn labels(&self) -> &[Option<usize>] {
        &self.labels
    }

    pub fn labelled_count(&self) -> usize {
        self.labels.iter().filter(|l| l.is_some()).count()
    }

    pub fn counts_per_class(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes().len()];
        for l in self.labels.iter().flatten() {
            if let Some(x) = c.get_mut(*l) {
                *x += 1;
            }
        }
        c
    }

    /// Re-derives the label mirror after the class list changed (rename/remove/add), and drops predictions
    /// whose columns no longer match the classes.
    pub fn classes_changed(&mut self) {
        self.labels = self
            .images
            .iter()
            .map(|im| self.project.label_index(&im.rel))
            .collect();
        if self
            .probs
            .as_ref()
            .is_some_and(|p| p.cols != self.project.classes.len())
        {
            self.set_predictions(None);
        }
        self.undo.clear();
        self.redo.clear();
        self.label_generation += 1;
        self.visible_dirty = true;
        self.count_changes_since_training();
    }

    /// Images whose label differs from what the last training saw (a relabel undone counts nothing).
    pub fn labels_changed_since_training(&self) -> usize {
        self.changed_since_training
    }

    /// A training starts from the current labels.
    pub fn mark_trained(&mut self) {
        self.trained_on = self.project.labels.clone();
        self.changed_since_training = 0;
    }

    fn count_changes_since_training(&mut self) {
        let (now, then) = (&self.project.labels, &self.trained_on);
        let changed = now.iter().filter(|(k, v)| then.get(*k) != Some(*v)).count();
        let removed = then.keys().filter(|k| !now.contains_key(*k)).count();
        self.changed_since_training = changed + removed;
    }

    // --- predictions ---------------------------------------------------------------------------------

    pub fn predictions(&self) -> Option<&Mat> {
        self.probs.as_ref()
    }

    /// Installs new predictions (`N×C`, rows aligned with `images`); a matrix of the wrong shape is ignored.
    pub fn set_predictions(&mut self, probs: Option<Mat>) {
        let probs = probs.filter(|p| p.rows == self.images.len() && p.cols == self.classes().len());
        self.summary = match &probs {
            Some(p) => (0..p.rows).map(|i| top2(p.row(i))).collect(),
            None => vec![None; self.images.len()],
        };
        self.probs = probs;
        self.visible_dirty = true;
    }

    /// (predicted class, its probability, top-1 − top-2 margin).
    pub fn prediction(&self, i: usize) -> Option<(usize, f32, f32)> {
        self.summary.get(i).copied().flatten()
    }

    /// Mean probability per class over the folder (for the graph's node sizes).
    pub fn mean_confidence(&self) -> Option<Vec<f32>> {
        let p = self.probs.as_ref()?;
        let mut m = vec![0.0f32; p.cols];
        for i in 0..p.rows {
            for (a, b) in m.iter_mut().zip(p.row(i)) {
                *a += b;
            }
        }
        let n = p.rows.max(1) as f32;
        m.iter_mut().for_each(|x| *x /= n);
        Some(m)
    }

    // --- similarity ------------------------------------------------------------------------------------

    /// Installs the scores of a similarity query (one per image; a wrong length is ignored) described by
    /// `query` ("“a dog on a beach”", "like 3 images"), and sorts the grid by them.
    pub fn set_similarity(&mut self, scores: Vec<Option<f32>>, query: String) {
        if scores.len() != self.images.len() {
            return;
        }
        self.similarity = Some((scores, query));
        self.filter.sort = SortKey::Similarity;
        self.visible_dirty = true;
    }

    /// Drops the similarity query; a grid sorted by it goes back to folder order.
    pub fn clear_similarity(&mut self) {
        self.similarity = None;
        if self.filter.sort == SortKey::Similarity {
            self.filter.sort = SortKey::Name;
        }
        self.visible_dirty = true;
    }

    /// Image `i`'s cosine to the current query.
    pub fn similarity(&self, i: usize) -> Option<f32> {
        self.similarity.as_ref()?.0.get(i).copied().flatten()
    }

    /// What the current similarity query is, when there is one.
    pub fn similarity_query(&self) -> Option<&str> {
        self.similarity.as_ref().map(|s| s.1.as_str())
    }

    // --- grid ------------------------------------------------------------------------------------------

    pub fn filter(&self) -> &GridFilter {
        &self.filter
    }

    pub fn set_filter(&mut self, f: GridFilter) {
        if f != self.filter {
            self.filter = f;
            self.visible_dirty = true;
        }
    }

    /// Indices of the images the grid shows, in display order.
    pub fn visible(&mut self) -> &[usize] {
        if self.visible_dirty {
            self.refresh_visible();
        }
        &self.visible
    }

    fn refresh_visible(&mut self) {
        let f = &self.filter;
        let needle = f.search.to_lowercase();
        let mut v: Vec<usize> = (0..self.images.len())
            .filter(|&i| {
                let l = self.labels[i];
                let show = match f.show {
                    Show::All | Show::Review => true,
                    Show::Labelled => l.is_some(),
                    Show::Unlabelled => l.is_none(),
                };
                show && f.class.is_none_or(|c| l == Some(c))
                    && f.predicted
                        .is_none_or(|c| self.summary[i].is_some_and(|(p, _, _)| p == c))
                    && (needle.is_empty() || self.images[i].rel.to_lowercase().contains(&needle))
            })
            .collect();
        if f.show == Show::Review {
            // The review list's own order (how confident the disagreement is), limited to the images whose
            // label still disagrees: a fixed label leaves the list at once, before the list is recomputed.
            let keep: std::collections::HashSet<usize> = v.into_iter().collect();
            self.visible = self
                .review
                .iter()
                .filter(|&&(i, predicted)| {
                    keep.contains(&i) && self.labels[i].is_some_and(|l| l != predicted)
                })
                .map(|&(i, _)| i)
                .collect();
            self.visible_dirty = false;
            return;
        }
        let key = |i: usize| self.summary[i];
        match f.sort {
            SortKey::Name => {}
            SortKey::ConfidenceAsc => {
                v.sort_by(|&a, &b| cmp_opt(key(a).map(|s| s.1), key(b).map(|s| s.1)))
            }
            SortKey::ConfidenceDesc => v.sort_by(|&a, &b| {
                cmp_opt(key(b).map(|s| s.1), key(a).map(|s| s.1)).then(a.cmp(&b))
            }),
            SortKey::MarginAsc => {
                v.sort_by(|&a, &b| cmp_opt(key(a).map(|s| s.2), key(b).map(|s| s.2)))
            }
            SortKey::Similarity => {
                if let Some((scores, _)) = &self.similarity {
                    let score = |i: usize| scores.get(i).copied().flatten().map(|x| -x);
                    v.sort_by(|&a, &b| cmp_opt(score(a), score(b)).then(a.cmp(&b)));
                }
            }
        }
        self.visible = v;
        self.visible_dirty = false;
    }

    /// Installs the likely mistakes (image, class a held-out model predicts), most confident first.
    pub fn set_review(&mut self, list: Vec<(usize, usize)>) {
        let list: Vec<(usize, usize)> = list
            .into_iter()
            .filter(|&(i, c)| i < self.images.len() && c < self.classes().len())
            .collect();
        if list != self.review {
            self.review = list;
            self.visible_dirty = true;
        }
    }

    /// The likely mistakes as installed (before the filter drops the ones fixed since).
    pub fn review(&self) -> &[(usize, usize)] {
        &self.review
    }

    // --- selection -------------------------------------------------------------------------------------

    /// A plain click: the image becomes the cursor and the only selection.
    pub fn click(&mut self, i: usize) {
        self.cursor = Some(i);
        self.selection.clear();
        self.anchor = Some(i);
    }

    /// Ctrl-click: toggles the image in the selection (the cursor moves to it).
    pub fn ctrl_click(&mut self, i: usize) {
        if let Some(c) = self.cursor {
            if self.selection.is_empty() && c != i {
                self.selection.insert(c);
            }
        }
        if !self.selection.remove(&i) {
            self.selection.insert(i);
        }
        self.cursor = Some(i);
        self.anchor = Some(i);
    }

    /// Shift-click: selects the visible range from the anchor to the image.
    pub fn shift_click(&mut self, i: usize) {
        let anchor = self.anchor.or(self.cursor).unwrap_or(i);
        let vis = self.visible().to_vec();
        let (Some(a), Some(b)) = (
            vis.iter().position(|&x| x == anchor),
            vis.iter().position(|&x| x == i),
        ) else {
            self.click(i);
            return;
        };
        let (lo, hi) = (a.min(b), a.max(b));
        self.selection = vis[lo..=hi].iter().copied().collect();
        self.cursor = Some(i);
    }

    pub fn select_all_visible(&mut self) {
        self.selection = self.visible().iter().copied().collect();
    }

    pub fn clear_selection(&mut self) {
        self.selection.clear();
    }

    /// The images a labelling action applies to: the selection, or else the cursor.
    pub fn targets(&self) -> Vec<usize> {
        if !self.selection.is_empty() {
            self.selection.iter().copied().collect()
        } else {
            self.cursor.into_iter().collect()
        }
    }

    /// Moves the cursor by `delta` positions in the visible order (clamped), clearing the selection.
    pub fn move_cursor(&mut self, delta: isize) {
        let vis = self.visible().to_vec();
        if vis.is_empty() {
            return;
        }
        let pos = self
            .cursor
            .and_then(|c| vis.iter().position(|&x| x == c))
            .map_or(0, |p| {
                (p as isize + delta).clamp(0, vis.len() as isize - 1) as usize
            });
        self.cursor = Some(vis[pos]);
        self.selection.clear();
        self.anchor = self.cursor;
    }

    /// Position of the cursor in the visible order.
    pub fn cursor_position(&mut self) -> Option<usize> {
        let c = self.cursor?;
        self.visible().iter().position(|&x| x == c)
    }

    // --- labelling -------------------------------------------------------------------------------------

    /// Labels the targets with `class` (`None` removes the label), records the action for undo, saves, and
    /// (with `advance`) moves the cursor to the next unlabelled image after the labelled ones.
    pub fn label_targets(&mut self, class: Option<usize>, advance: bool) -> LabelOutcome {
        let targets = self.targets();
        self.label_images(&targets, class, advance)
    }

    /// [`Self::label_targets`] on given images (a confirmed bulk relabel applies to the images it was asked
    /// about).
    pub fn label_images(
        &mut self,
        targets: &[usize],
        class: Option<usize>,
        advance: bool,
    ) -> LabelOutcome {
        // Found before labelling: the filter may hide the targets once they are labelled.
        let next = if advance {
            self.next_unlabelled_after(targets)
        } else {
            None
        };
        // Several images given the class the model already predicts for them: the person accepted predictions
        // without judging each image, and the label says so. One image, or a class other than the
        // prediction, is the person's own judgement.
        let bulk = targets.len() > 1;
        let origins: Vec<LabelOrigin> = targets
            .iter()
            .map(|&i| {
                let predicted = self.summary.get(i).copied().flatten().map(|p| p.0);
                if bulk && class.is_some() && predicted == class {
                    LabelOrigin::Accepted
                } else {
                    LabelOrigin::Human
                }
            })
            .collect();
        let outcome = self.set_labels_from(targets, class, &origins);
        if advance && outcome.changed > 0 {
            if let Some(n) = next {
                self.cursor = Some(n);
                self.anchor = Some(n);
            }
            self.selection.clear();
        }
        outcome
    }

    /// The targets that already carry a label other than `class`: what a labelling action would overwrite.
    pub fn overwrites(&self, targets: &[usize], class: Option<usize>) -> usize {
        targets
            .iter()
            .filter(|&&i| self.label(i).is_some_and(|l| Some(l) != class))
            .count()
    }

    /// The first visible unlabelled image after the last of `targets` (wrapping around). Auto-advance never
    /// lands on a labelled image, so the next digit cannot overwrite a label the person did not look at.
    fn next_unlabelled_after(&mut self, targets: &[usize]) -> Option<usize> {
        let vis = self.visible().to_vec();
        let last = targets
            .iter()
            .filter_map(|t| vis.iter().position(|x| x == t))
            .max()?;
        vis[last + 1..]
            .iter()
            .chain(vis[..last].iter())
            .copied()
            .find(|&x| !targets.contains(&x) && self.labels[x].is_none())
    }

    /// Unlabelled images whose top prediction has probability at least `min_confidence`, with that class,
    /// in folder order; only those predicted as `class` when given. What "accept predictions" would label.
    pub fn acceptable(&self, min_confidence: f32, class: Option<usize>) -> Vec<(usize, usize)> {
        (0..self.images.len())
            .filter(|&i| self.labels[i].is_none())
            .filter_map(|i| {
                let (c, p, _) = self.summary[i]?;
                (p >= min_confidence && class.is_none_or(|k| k == c)).then_some((i, c))
            })
            .collect()
    }

    /// Gives each `(image, class)` its class with `origin`, as one undoable action, and saves. An image that
    /// carries a label already keeps it: this labels what nobody labelled (accepting predictions in bulk).
    pub fn label_each_unlabelled(
        &mut self,
        labels: &[(usize, usize)],
        origin: LabelOrigin,
    ) -> LabelOutcome {
        let changes: Vec<(usize, Labelled, Labelled)> = labels
            .iter()
            .filter(|&&(i, _)| i < self.images.len() && self.labels[i].is_none())
            .filter_map(|&(i, c)| {
                let name = self.classes().get(c)?.clone();
                Some((i, None, Some((name, origin))))
            })
            .collect();
        self.commit(changes)
    }

    /// Applies a new edit, saves, and records it for undo; a save that fails rolls it back.
    fn commit(&mut self, changes: Vec<(usize, Labelled, Labelled)>) -> LabelOutcome {
        if changes.is_empty() {
            return LabelOutcome {
                changed: 0,
                saved: Ok(()),
            };
        }
        let changed = changes.len();
        let edit = Edit { changes };
        self.apply(&edit, false);
        if let Err(e) = self.save() {
            self.apply(&edit, true);
            return LabelOutcome {
                changed: 0,
                saved: Err(e),
            };
        }
        self.undo.push(edit);
        self.redo.clear();
        LabelOutcome {
            changed,
            saved: Ok(()),
        }
    }

    /// Sets labels of `images` as the person's own (an undoable action) and saves.
    pub fn set_labels(&mut self, images: &[usize], class: Option<usize>) -> LabelOutcome {
        self.set_labels_from(images, class, &vec![LabelOrigin::Human; images.len()])
    }

    /// [`Self::set_labels`] with the origin of each image's new label (`origins[k]` for `images[k]`). A label
    /// the person gave is never downgraded: accepting a prediction that agrees with it leaves it theirs.
    pub fn set_labels_from(
        &mut self,
        images: &[usize],
        class: Option<usize>,
        origins: &[LabelOrigin],
    ) -> LabelOutcome {
        let name = class.and_then(|c| self.classes().get(c).cloned());
        if class.is_some() && name.is_none() {
            return LabelOutcome {
                changed: 0,
                saved: Ok(()),
            };
        }
        let changes: Vec<(usize, Labelled, Labelled)> = images
            .iter()
            .zip(origins.iter().chain(std::iter::repeat(&LabelOrigin::Human)))
            .filter(|&(&i, _)| i < self.images.len())
            .filter_map(|(&i, &origin)| {
                let old = self.labelled(i);
                let new = name.clone().map(|n| {
                    let keep_human = old
                        .as_ref()
                        .is_some_and(|(o, from)| *o == n && *from == LabelOrigin::Human);
                    (
                        n,
                        if keep_human {
                            LabelOrigin::Human
                        } else {
                            origin
                        },
                    )
                });
                (old != new).then_some((i, old, new))
            })
            .collect();
        self.commit(changes)
    }

    /// Image `i`'s label and its origin.
    fn labelled(&self, i: usize) -> Labelled {
        let rel = &self.images[i].rel;
        let name = self.project.labels.get(rel)?.clone();
        Some((name, self.project.origin(rel)))
    }

    /// Where image `i`'s label came from; `None` when it has none.
    pub fn origin(&self, i: usize) -> Option<LabelOrigin> {
        self.labelled(i).map(|l| l.1)
    }

    fn apply(&mut self, edit: &Edit, backwards: bool) {
        for (i, before, after) in &edit.changes {
            let value = if backwards { before } else { after };
            let rel = self.images[*i].rel.clone();
            self.project.set_label(&rel, value.clone());
            self.labels[*i] = value
                .as_ref()
                .and_then(|(c, _)| self.project.classes.iter().position(|x| x == c));
        }
        self.label_generation += 1;
        self.visible_dirty = true;
        self.count_changes_since_training();
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Undoes the last labelling action (the cursor goes back to the first image it touched) and saves.
    pub fn undo(&mut self) -> Option<LabelOutcome> {
        self.step_history(true)
    }

    pub fn redo(&mut self) -> Option<LabelOutcome> {
        self.step_history(false)
    }

    /// Moves one edit between the undo and redo stacks. Like a new label, a step that cannot be saved is not
    /// taken: the labels in memory never differ from the labels on disk.
    fn step_history(&mut self, backwards: bool) -> Option<LabelOutcome> {
        let edit = if backwards {
            self.undo.pop()?
        } else {
            self.redo.pop()?
        };
        self.apply(&edit, backwards);
        if let Err(e) = self.save() {
            self.apply(&edit, !backwards);
            if backwards {
                self.undo.push(edit);
            } else {
                self.redo.push(edit);
            }
            return Some(LabelOutcome {
                changed: 0,
                saved: Err(e),
            });
        }
        self.cursor = edit.changes.first().map(|c| c.0);
        let changed = edit.changes.len();
        if backwards {
            self.redo.push(edit);
        } else {
            self.undo.push(edit);
        }
        Some(LabelOutcome {
            changed,
            saved: Ok(()),
        })
    }

    /// Saves the project at `path` from now on; on failure the old place is kept.
    pub fn relocate(&mut self, path: PathBuf) -> Result<(), ProjectError> {
        let old = self.project_path.replace(path);
        let saved = self.save();
        if saved.is_err() {
            self.project_path = old;
        }
        saved
    }

    /// The unlabelled image the model is least sure about (smallest top-1 − top-2 margin); without predictions,
    /// the first unlabelled image in folder order. `None` when everything is labelled.
    pub fn next_to_label(&self) -> Option<usize> {
        let unlabelled = (0..self.images.len()).filter(|&i| self.labels[i].is_none());
        if self.probs.is_some() {
            unlabelled.min_by(|&a, &b| {
                cmp_opt(self.summary[a].map(|s| s.2), self.summary[b].map(|s| s.2)).then(a.cmp(&b))
            })
        } else {
            unlabelled.min()
        }
    }

    /// Puts the cursor on [`Self::next_to_label`], widening the filter if it hides that image.
    pub fn go_to_next_to_label(&mut self) -> Option<usize> {
        let next = self.next_to_label()?;
        if !self.visible().contains(&next) {
            let f = GridFilter {
                sort: self.filter.sort,
                ..Default::default()
            };
            self.set_filter(f);
        }
        self.click(next);
        Some(next)
    }

    /// Saves the project if it has a path.
    pub fn save(&self) -> Result<(), ProjectError> {
        match &self.project_path {
            Some(p) => self.project.save(p),
            None => Ok(()),
        }
    }

    /// Deterministic held-out split of the labelled images: an image is held out when a hash of its path
    /// falls under `percent`, but every class keeps at least one training image (the first in folder
    /// order). Returns (train, held out) image indices. A hash rather than a random draw keeps the split
    /// stable as labels are added, so accuracies of successive trainings are comparable.
    pub fn split_labelled(&self, percent: u32) -> (Vec<usize>, Vec<usize>) {
        let mut train = Vec::new();
        let mut held = Vec::new();
        let mut has_train = vec![false; self.classes().len()];
        for (i, l) in self.labels.iter().enumerate() {
            let Some(c) = *l else { continue };
            let h = blake3::hash(self.images[i].rel.as_bytes());
            let bucket = u32::from_le_bytes([
                h.as_bytes()[0],
                h.as_bytes()[1],
                h.as_bytes()[2],
                h.as_bytes()[3],
            ]) % 100;
            if bucket < percent && has_train[c] {
                held.push(i);
            } else {
                has_train[c] = true;
                train.push(i);
            }
        }
        (train, held)
    }
}

/// (argmax, max, max − second max) of a probability row.
fn top2(row: &[f32]) -> Option<(usize, f32, f32)> {
    if row.is_empty() {
        return None;
    }
    let best = argmax(row);
    let second = row
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != best)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    let margin = if second.is_finite() {
        row[best] - second
    } else {
        row[best]
    };
    Some((best, row[best], margin))
}

/// Orders `Some` values ascending and `None` last.
fn cmp_opt(a: Option<f32>, b: Option<f32>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(n: usize, dir: Option<&Path>) -> Session {
        let folder = dir.map_or_else(|| PathBuf::from("/x"), Path::to_path_buf);
        let project = Project::new(folder.clone(), vec!["a".into(), "b".into(), "c".into()]);
        let images = (0..n)
            .map(|i| ImageItem {
                rel: format!("img{i:02}.png"),
                path: folder.join(format!("img{i:02}.png")),
            })
            .collect();
        Session::new(project, dir.map(|d| d.join("p.json")), images)
    }

    #[test]
    fn a_label_that_cannot_be_saved_is_not_accepted_and_relocating_saves_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(4, Some(dir.path()));
        s.click(0);
        s.label_targets(Some(0), true).saved.unwrap();
        // Something takes the place of the project's folder: every save now fails.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, "a file").unwrap();
        s.project_path = Some(blocked.join("p.json"));
        s.click(1);
        let out = s.label_targets(Some(1), true);
        assert_eq!(out.changed, 0);
        assert!(matches!(out.saved, Err(ProjectError::NotAFolder { .. })));
        assert_eq!(s.label(1), None, "the label was rolled back");
        assert_eq!(
            s.cursor,
            Some(1),
            "the cursor stays on the image that was not labelled"
        );
        assert_eq!(s.labels_changed_since_training(), 1);
        // Undo cannot be saved either: image 0 keeps its label and the step stays undoable.
        assert_eq!(s.undo().map(|o| o.changed), Some(0));
        assert_eq!(s.label(0), Some(0));
        assert!(s.can_undo() && !s.can_redo());

        assert!(s.relocate(blocked.join("again.json")).is_err());
        assert_eq!(
            s.project_path,
            Some(blocked.join("p.json")),
            "a failed move keeps the old place"
        );
        let elsewhere = dir.path().join("elsewhere").join("p.json");
        s.relocate(elsewhere.clone()).unwrap();
        s.label_targets(Some(1), true).saved.unwrap();
        let saved = Project::load(&elsewhere).unwrap().project;
        assert_eq!(saved.labels.len(), 2);
        assert_eq!(saved.labels.get("img01.png").map(String::as_str), Some("b"));
    }

    #[test]
    fn labelling_undo_redo_and_save_after_each_action() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(6, Some(dir.path()));
        s.click(1);
        let out = s.label_targets(Some(2), true);
        assert_eq!(out.changed, 1);
        out.saved.unwrap();
        assert_eq!(s.label(1), Some(2));
        assert_eq!(s.cursor, Some(2), "auto-advance");
        let saved = Project::load(&dir.path().join("p.json")).unwrap().project;
        assert_eq!(saved.labels.get("img01.png").map(String::as_str), Some("c"));

        // Bulk: ctrl-click 3 and 5, label both.
        s.ctrl_click(3);
        s.ctrl_click(5);
        assert_eq!(s.targets(), vec![2, 3, 5]);
        s.label_targets(Some(0), false).saved.unwrap();
        assert_eq!(s.counts_per_class(), vec![3, 0, 1]);
        s.undo().unwrap().saved.unwrap();
        assert_eq!(s.counts_per_class(), vec![0, 0, 1]);
        s.redo().unwrap().saved.unwrap();
        assert_eq!(s.counts_per_class(), vec![3, 0, 1]);
        // A new action clears the redo stack.
        s.undo();
        s.click(0);
        s.label_targets(Some(1), false);
        assert!(!s.can_redo());
        let saved = Project::load(&dir.path().join("p.json")).unwrap().project;
        assert_eq!(saved.labels.len(), 2);
        // Removing a label.
        s.click(0);
        s.label_targets(None, false);
        assert_eq!(s.label(0), None);
        assert_eq!(s.labelled_count(), 1);
    }

    #[test]
    fn bulk_labels_that_agree_with_the_model_are_marked_accepted_and_saved_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(4, Some(dir.path()));
        // The model predicts class 0 for images 0–2 and class 1 for image 3.
        let probs = Mat::from_vec(
            4,
            3,
            vec![0.8, 0.1, 0.1, 0.7, 0.2, 0.1, 0.6, 0.3, 0.1, 0.1, 0.8, 0.1],
        );
        s.set_predictions(Some(probs));
        s.click(0);
        s.label_targets(Some(0), false).saved.unwrap();
        assert_eq!(
            s.origin(0),
            Some(LabelOrigin::Human),
            "one image is the person's judgement"
        );
        s.click(1);
        s.ctrl_click(2);
        s.ctrl_click(3);
        s.label_targets(Some(0), false).saved.unwrap();
        assert_eq!(s.origin(1), Some(LabelOrigin::Accepted));
        assert_eq!(s.origin(2), Some(LabelOrigin::Accepted));
        assert_eq!(
            s.origin(3),
            Some(LabelOrigin::Human),
            "a class other than the prediction is a correction"
        );
        let saved = Project::load(&dir.path().join("p.json")).unwrap().project;
        assert_eq!(saved.origin("img01.png"), LabelOrigin::Accepted);
        assert_eq!(saved.origin("img00.png"), LabelOrigin::Human);
        // Accepting over the person's own label leaves it theirs; confirming an accepted one makes it theirs.
        s.click(0);
        s.ctrl_click(1);
        assert_eq!(s.label_targets(Some(0), false).changed, 0);
        assert_eq!(s.origin(0), Some(LabelOrigin::Human));
        s.click(1);
        assert_eq!(s.label_targets(Some(0), false).changed, 1);
        assert_eq!(s.origin(1), Some(LabelOrigin::Human));
        s.undo();
        assert_eq!(
            s.origin(1),
            Some(LabelOrigin::Accepted),
            "undo restores the origin"
        );
        s.click(2);
        s.label_targets(None, false).saved.unwrap();
        assert_eq!(s.origin(2), None);
        let saved = Project::load(&dir.path().join("p.json")).unwrap().project;
        assert!(!saved.label_origins.contains_key("img02.png"));
    }

    #[test]
    fn accepting_predictions_labels_only_unlabelled_images_as_one_undo_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(4, Some(dir.path()));
        let probs = Mat::from_vec(
            4,
            3,
            vec![
                0.9, 0.05, 0.05, 0.2, 0.75, 0.05, 0.5, 0.3, 0.2, 0.95, 0.03, 0.02,
            ],
        );
        s.set_predictions(Some(probs));
        s.click(3);
        s.label_targets(Some(2), false).saved.unwrap();
        assert_eq!(
            s.acceptable(0.7, None),
            vec![(0, 0), (1, 1)],
            "3 is labelled"
        );
        assert_eq!(s.acceptable(0.7, Some(1)), vec![(1, 1)]);
        assert_eq!(s.acceptable(0.0, None).len(), 3);
        let out = s.label_each_unlabelled(&[(0, 0), (1, 1), (3, 0)], LabelOrigin::Accepted);
        out.saved.unwrap();
        assert_eq!(out.changed, 2, "the person's label of 3 is kept");
        assert_eq!(
            (s.label(0), s.label(1), s.label(3)),
            (Some(0), Some(1), Some(2))
        );
        let saved = Project::load(&dir.path().join("p.json")).unwrap().project;
        assert_eq!(saved.origin("img00.png"), LabelOrigin::Accepted);
        assert_eq!(saved.origin("img01.png"), LabelOrigin::Accepted);
        assert_eq!(saved.origin("img03.png"), LabelOrigin::Human);
        s.undo().unwrap().saved.unwrap();
        assert_eq!((s.label(0), s.label(1), s.label(3)), (None, None, Some(2)));
    }

    #[test]
    fn the_review_filter_keeps_its_order_and_drops_a_label_once_fixed() {
        let mut s = session(5, None);
        s.set_labels(&[0, 1, 2, 3], Some(0));
        s.set_review(vec![(2, 1), (0, 2), (3, 0), (9, 0)]);
        assert_eq!(s.review().len(), 3, "an image out of range is dropped");
        s.set_filter(GridFilter {
            show: Show::Review,
            ..Default::default()
        });
        assert_eq!(s.visible(), &[2, 0], "3 already has the predicted class");
        s.set_labels(&[2], Some(1));
        assert_eq!(s.visible(), &[0]);
        s.undo();
        assert_eq!(s.visible(), &[2, 0]);
    }

    #[test]
    fn changes_since_training_are_net_of_undo() {
        let mut s = session(5, None);
        s.set_labels(&[0, 1], Some(0));
        assert_eq!(s.labels_changed_since_training(), 2);
        s.mark_trained();
        assert_eq!(s.labels_changed_since_training(), 0);
        s.set_labels(&[0], Some(1));
        s.set_labels(&[2], Some(1));
        s.set_labels(&[1], None);
        assert_eq!(
            s.labels_changed_since_training(),
            3,
            "changed, added, removed"
        );
        s.undo();
        s.undo();
        s.undo();
        assert_eq!(
            s.labels_changed_since_training(),
            0,
            "undone edits count nothing"
        );
        s.set_labels(&[3], Some(2));
        s.set_labels(&[3], None);
        assert_eq!(s.labels_changed_since_training(), 0);
    }

    #[test]
    fn advance_goes_to_the_next_unlabelled_image_and_never_onto_a_label() {
        let mut s = session(6, None);
        s.set_labels(&[2, 3], Some(1));
        s.click(1);
        s.label_targets(Some(0), true);
        assert_eq!(s.cursor, Some(4), "2 and 3 are labelled: skipped");
        s.label_targets(Some(0), true);
        assert_eq!(s.cursor, Some(5));
        s.label_targets(Some(0), true);
        assert_eq!(
            s.cursor,
            Some(0),
            "wraps around to the first unlabelled image"
        );
        s.label_targets(Some(2), true);
        // Every image is labelled: the cursor stays where it was.
        assert_eq!(s.cursor, Some(0));
        assert_eq!(s.overwrites(&[0, 1, 2], Some(0)), 2, "0 has c and 2 has b");
        assert_eq!(s.overwrites(&[0, 1, 2], None), 3);
    }

    #[test]
    fn advance_skips_to_the_next_visible_image_when_the_filter_hides_labelled_ones() {
        let mut s = session(5, None);
        s.set_filter(GridFilter {
            show: Show::Unlabelled,
            ..Default::default()
        });
        s.click(0);
        s.label_targets(Some(0), true);
        assert_eq!(s.cursor, Some(1));
        assert_eq!(s.visible(), &[1, 2, 3, 4]);
        s.shift_click(3);
        assert_eq!(s.targets(), vec![1, 2, 3]);
        s.label_targets(Some(1), true);
        assert_eq!(s.cursor, Some(4));
        assert_eq!(s.visible(), &[4]);
    }

    #[test]
    fn predictions_drive_sorting_filtering_and_label_next() {
        let mut s = session(4, None);
        assert_eq!(s.next_to_label(), Some(0));
        let probs = Mat::from_vec(
            4,
            3,
            vec![
                0.9, 0.05, 0.05, // sure: a
                0.4, 0.35, 0.25, // torn: margin 0.05
                0.2, 0.7, 0.1, // b
                0.5, 0.2, 0.3, // a, margin 0.2
            ],
        );
        s.set_predictions(Some(probs));
        assert_eq!(s.next_to_label(), Some(1));
        s.set_filter(GridFilter {
            sort: SortKey::MarginAsc,
            ..Default::default()
        });
        assert_eq!(s.visible(), &[1, 3, 2, 0]);
        s.set_filter(GridFilter {
            sort: SortKey::ConfidenceDesc,
            predicted: Some(0),
            ..Default::default()
        });
        assert_eq!(s.visible(), &[0, 3, 1]);
        s.click(1);
        s.label_targets(Some(0), false);
        assert_eq!(s.next_to_label(), Some(3));
        s.go_to_next_to_label();
        assert_eq!(s.cursor, Some(3));
        assert!(s.visible().contains(&3));
        let mean = s.mean_confidence().unwrap();
        assert!((mean.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // A wrong-shaped matrix is refused.
        s.set_predictions(Some(Mat::zeros(2, 3)));
        assert!(s.predictions().is_none());
    }

    #[test]
    fn a_similarity_query_sorts_the_grid_under_the_filters_and_clearing_it_restores_folder_order() {
        let mut s = session(5, None);
        s.set_labels(&[1], Some(0));
        s.set_similarity(
            vec![Some(0.1), Some(0.9), None, Some(0.5), Some(0.9)],
            "q".into(),
        );
        assert_eq!(s.filter().sort, SortKey::Similarity);
        assert_eq!(
            s.visible(),
            &[1, 4, 3, 0, 2],
            "ties in folder order, no score last"
        );
        assert_eq!(s.similarity(3), Some(0.5));
        assert_eq!(s.similarity_query(), Some("q"));
        s.set_filter(GridFilter {
            show: Show::Unlabelled,
            sort: SortKey::Similarity,
            ..Default::default()
        });
        assert_eq!(s.visible(), &[4, 3, 0, 2]);
        // A wrong length is ignored.
        s.set_similarity(vec![Some(1.0)], "bad".into());
        assert_eq!(s.similarity_query(), Some("q"));
        s.clear_similarity();
        assert_eq!(s.filter().sort, SortKey::Name);
        assert_eq!(s.visible(), &[0, 2, 3, 4]);
        assert_eq!(
            SortKey::from_id(SortKey::Similarity.id()),
            SortKey::Name,
            "a reopened project has no query to sort by"
        );
    }

    #[test]
    fn held_out_split_is_stable_and_keeps_a_training_image_per_class() {
        let mut s = session(40, None);
        let all: Vec<usize> = (0..40).collect();
        s.set_labels(&all[..20], Some(0));
        s.set_labels(&all[20..39], Some(1));
        s.set_labels(&all[39..], Some(2));
        let (train, held) = s.split_labelled(30);
        assert_eq!(train.len() + held.len(), 40);
        assert!(!held.is_empty() && held.len() < 25);
        assert!(train.contains(&39), "the only image of class c trains");
        assert_eq!(s.split_labelled(30), (train, held));
        assert!(s.split_labelled(0).1.is_empty());
    }
}
