//! The full-size viewer over the labelling grid (issue 10, item 13): Space or a double-click opens the cursor
//! image at full resolution, fit to the window; the wheel zooms about the pointer, a drag pans, ←/→ step
//! through the grid's visible order, and the digits label the shown image through the grid's own path.
//!
//! Choices:
//! - The viewer shows the session's cursor, so ←/→, a label's auto-advance and Ctrl+Z move the grid and the
//!   viewer together, and closing it leaves the grid where the person was.
//! - Opening it clears a multi-selection: a digit typed here must label the image on screen, not images the
//!   person cannot see.
//! - Decoding a large photo takes longer than a frame, so one decoder thread (alive while the viewer is open)
//!   decodes the latest asked-for image; an image stepped past is never decoded. Until it arrives, the
//!   grid's preview picture is drawn in its place (same aspect ratio, so zoom and pan carry over).
//! - Zoom is relative to "fit" (1 = the whole image in the window), so it means the same whichever picture
//!   is drawn and whatever the window size.
//! - Keys: digits label, 0/Backspace/Delete unlabel, +/= and − zoom, F fits, Esc or Space closes; the grid's
//!   other keys do nothing while it is open (Ctrl+S, Ctrl+Z/Y and Ctrl+Q still work; Ctrl+1…3 close it).

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

use egui::{
    Align2, Color32, ColorImage, Event, FontId, Key, Modifiers, MouseWheelUnit, Pos2, Rect, Sense,
    TextureHandle, TextureOptions, Vec2,
};

use super::shortcuts::{self, Action, DIGITS};
use super::thumbs::{decode_thumbnail, Thumb};
use super::{style, HeGraphApp, Level, View};

/// Zoom step of one +/− press.
const KEY_ZOOM: f32 = 1.25;
/// Zoom per point of wheel travel (a typical wheel notch is 50 points: ×1.13).
const WHEEL_ZOOM_PER_POINT: f32 = 0.0025;
const MIN_ZOOM: f32 = 0.25;
const MAX_ZOOM: f32 = 64.0;
/// Points per wheel "line" (the unit some platforms report).
const LINE_POINTS: f32 = 50.0;
const HEADER: f32 = 56.0;

type Decoded = (usize, Result<ColorImage, String>);

#[derive(Default)]
struct Slot {
    next: Option<(usize, PathBuf)>,
    shutdown: bool,
}

/// One decoder thread fed with the latest wish; a newer wish replaces an older one not yet started.
struct FullLoader {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    results: Receiver<Decoded>,
    /// The image asked for last.
    asked: Option<usize>,
    /// The shown image's full-size picture, once decoded (or why it could not be).
    current: Option<(usize, Result<TextureHandle, String>)>,
}

impl FullLoader {
    fn new(ctx: &egui::Context) -> Self {
        let shared = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let (tx, rx) = channel();
        let worker_shared = Arc::clone(&shared);
        let ctx = ctx.clone();
        let max_side = ctx.input(|i| i.max_texture_side).max(1) as u32;
        // Without the thread the viewer shows the preview picture and says it is loading.
        let _ = std::thread::Builder::new()
            .name("hegraph-viewer".into())
            .spawn(move || decode_worker(&worker_shared, &tx, &ctx, max_side));
        Self {
            shared,
            results: rx,
            asked: None,
            current: None,
        }
    }

    /// Asks for `image` (once per image) and takes in what was decoded; stale results are dropped.
    fn update(&mut self, ctx: &egui::Context, image: usize, path: &std::path::Path) {
        if self.asked != Some(image) {
            self.asked = Some(image);
            if let Ok(mut slot) = self.shared.0.lock() {
                slot.next = Some((image, path.to_path_buf()));
            }
            self.shared.1.notify_all();
        }
        while let Ok((i, result)) = self.results.try_recv() {
            if i != image {
                continue;
            }
            let tex = result
                .map(|img| ctx.load_texture(format!("viewer-{i}"), img, TextureOptions::LINEAR));
            self.current = Some((i, tex));
        }
        if self.current.as_ref().is_some_and(|(i, _)| *i != image) {
            self.current = None;
        }
    }
}

impl Drop for FullLoader {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.shared.0.lock() {
            slot.shutdown = true;
            slot.next = None;
        }
        self.shared.1.notify_all();
    }
}

fn decode_worker(
    shared: &(Mutex<Slot>, Condvar),
    tx: &Sender<Decoded>,
    ctx: &egui::Context,
    max_side: u32,
) {
    loop {
        let (image, path) = {
            let Ok(mut slot) = shared.0.lock() else {
                return;
            };
            loop {
                if slot.shutdown {
                    return;
                }
                if let Some(next) = slot.next.take() {
                    break next;
                }
                slot = match shared.1.wait(slot) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        // Full resolution, unless the GPU cannot hold a texture that large.
        let result = decode_thumbnail(&path, max_side);
        if tx.send((image, result)).is_err() {
            return;
        }
        ctx.request_repaint();
    }
}

/// The open viewer.
pub(super) struct ImageViewer {
    zoom: f32,
    /// The image centre's offset from the view's centre, in points.
    pan: Vec2,
    /// The image the zoom and pan belong to (another image starts fitted).
    image: Option<usize>,
    /// Where the image was drawn last frame (zoom about the pointer and +/− about the centre need it).
    view: Rect,
    loader: FullLoader,
}

impl ImageViewer {
    fn new(ctx: &egui::Context) -> Self {
        Self {
            zoom: 1.0,
            pan: Vec2::ZERO,
            image: None,
            view: Rect::NOTHING,
            loader: FullLoader::new(ctx),
        }
    }

    fn fit(&mut self) {
        self.zoom = 1.0;
        self.pan = Vec2::ZERO;
    }

    /// Multiplies the zoom by `factor`, keeping the image point under `about` where it is.
    fn zoom_about(&mut self, factor: f32, about: Pos2) {
        let new = (self.zoom * factor).clamp(MIN_ZOOM, MAX_ZOOM);
        let k = new / self.zoom;
        let centre = self.view.center() + self.pan;
        let d = centre - about;
        self.pan = about + d * k - self.view.center();
        self.zoom = new;
    }
}

/// What a key does in the viewer.
enum ViewerKey {
    Close,
    App(Action),
    Zoom(f32),
    Fit,
    /// Swallowed: a grid key must not act behind the viewer.
    Ignore,
}

/// The viewer's own keys (beside the digits, which label as in the grid): what [`viewer_key`] dispatches and
/// F1 lists under the app's table, so the list cannot miss one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum ViewerAct {
    Close,
    Previous,
    Next,
    Unlabel,
    ZoomIn,
    ZoomOut,
    Fit,
}

pub(super) const VIEWER_KEYS: &[(&[Key], ViewerAct, &str)] = &[
    (
        &[Key::Escape, Key::Space],
        ViewerAct::Close,
        "close the full-size viewer",
    ),
    (
        &[Key::ArrowLeft],
        ViewerAct::Previous,
        "viewer: previous image",
    ),
    (&[Key::ArrowRight], ViewerAct::Next, "viewer: next image"),
    (
        &[Key::Num0, Key::Backspace, Key::Delete],
        ViewerAct::Unlabel,
        "viewer: remove the label (digits label, as in the grid)",
    ),
    (
        &[Key::Plus, Key::Equals],
        ViewerAct::ZoomIn,
        "viewer: zoom in (or the mouse wheel)",
    ),
    (&[Key::Minus], ViewerAct::ZoomOut, "viewer: zoom out"),
    (
        &[Key::F],
        ViewerAct::Fit,
        "viewer: fit the image to the window",
    ),
];

fn viewer_key(key: Key, mods: Modifiers, classes: usize, view: View) -> ViewerKey {
    let plain = mods.matches_logically(Modifiers::NONE);
    if plain {
        if let Some(k) = DIGITS.iter().position(|&d| d == key) {
            return if k < classes {
                ViewerKey::App(Action::Label(Some(k)))
            } else {
                ViewerKey::Ignore
            };
        }
        if let Some(&(_, act, _)) = VIEWER_KEYS.iter().find(|(keys, _, _)| keys.contains(&key)) {
            return match act {
                ViewerAct::Close => ViewerKey::Close,
                ViewerAct::Previous => ViewerKey::App(Action::Move(-1)),
                ViewerAct::Next => ViewerKey::App(Action::Move(1)),
                ViewerAct::Unlabel => ViewerKey::App(Action::Label(None)),
                ViewerAct::ZoomIn => ViewerKey::Zoom(KEY_ZOOM),
                ViewerAct::ZoomOut => ViewerKey::Zoom(1.0 / KEY_ZOOM),
                ViewerAct::Fit => ViewerKey::Fit,
            };
        }
    }
    let cx = shortcuts::KeyContext {
        text_focus: false,
        view,
        cols: 1,
        classes,
    };
    match shortcuts::action_for(key, mods, &cx) {
        Some(a @ (Action::Save | Action::Undo | Action::Redo | Action::Quit)) => ViewerKey::App(a),
        Some(a @ Action::Show(_)) => {
            // Another view: the viewer closes and the view changes.
            ViewerKey::App(a)
        }
        _ => ViewerKey::Ignore,
    }
}

impl HeGraphApp {
    /// Whether the full-size viewer is open.
    pub fn viewer_open(&self) -> bool {
        self.viewer.is_some()
    }

    /// The viewer's zoom relative to fitting the window (1 = fit), while it is open.
    pub fn viewer_zoom(&self) -> Option<f32> {
        self.viewer.as_ref().map(|v| v.zoom)
    }

    /// How far the image was dragged from the view's centre, in points, while the viewer is open.
    pub fn viewer_pan(&self) -> Option<Vec2> {
        self.viewer.as_ref().map(|v| v.pan)
    }

    /// The image the viewer shows, while it is open.
    pub fn viewer_image(&self) -> Option<usize> {
        self.viewer.as_ref().and(self.session.as_ref()?.cursor)
    }

    /// True once the shown image's full-size picture is decoded (or failed to decode).
    pub fn viewer_loaded(&self) -> bool {
        let shown = self.viewer_image();
        self.viewer.as_ref().is_some_and(|v| {
            v.loader
                .current
                .as_ref()
                .is_some_and(|(i, _)| Some(*i) == shown)
        })
    }

    /// Opens the viewer on the cursor image (the first visible image when there is no cursor).
    pub(super) fn open_viewer(&mut self) {
        let Some(ctx) = self.ctx.clone() else {
            return;
        };
        if self.view != View::Label || self.session.is_none() {
            return;
        }
        if self.features_file.is_some() {
            // A features file carries no pictures: a viewer would open on nothing.
            self.notify(
                Level::Info,
                "a features file has no pictures to show full size".to_string(),
            );
            return;
        }
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.cursor.is_none() {
            s.move_cursor(0);
        }
        if s.cursor.is_none() {
            return;
        }
        s.clear_selection();
        self.viewer = Some(ImageViewer::new(&ctx));
    }

    /// Applies the frame's key presses while the viewer is open, in the order typed. Returns false when the
    /// viewer closed on the way: the keys after that are put back for the grid.
    pub(super) fn viewer_keys(&mut self, ctx: &egui::Context) -> bool {
        let events = ctx.input_mut(|i| std::mem::take(&mut i.events));
        let mut keep = Vec::with_capacity(events.len());
        let mut events = events.into_iter();
        let mut open = true;
        while let Some(e) = events.next() {
            let Event::Key {
                key,
                pressed,
                modifiers,
                ..
            } = e
            else {
                // Text is what the digits also produce: it has no field to go to here.
                if !matches!(e, Event::Text(_)) {
                    keep.push(e);
                }
                continue;
            };
            if !pressed {
                keep.push(e);
                continue;
            }
            let classes = self.session.as_ref().map_or(0, |s| s.classes().len());
            match viewer_key(key, modifiers, classes, self.view) {
                ViewerKey::Close => {
                    self.viewer = None;
                    open = false;
                }
                ViewerKey::App(a) => {
                    if matches!(a, Action::Show(_)) {
                        self.viewer = None;
                        open = false;
                    }
                    self.perform(a);
                }
                ViewerKey::Zoom(f) => {
                    if let Some(v) = self.viewer.as_mut() {
                        let c = v.view.center();
                        v.zoom_about(f, c);
                    }
                }
                ViewerKey::Fit => {
                    if let Some(v) = self.viewer.as_mut() {
                        v.fit();
                    }
                }
                ViewerKey::Ignore => {}
            }
            if !open || self.dialogs.modal_open() {
                keep.extend(events.by_ref());
            }
        }
        ctx.input_mut(|i| {
            keep.append(&mut i.events);
            i.events = keep;
        });
        open
    }

    /// Draws the viewer over the whole window, when it is open.
    pub(super) fn image_viewer(&mut self, ctx: &egui::Context) {
        if self.viewer.is_none() {
            return;
        }
        let test_checkpoint = self
            .engine
            .model
            .as_ref()
            .is_some_and(|m| m.is_test_checkpoint);
        let cursor = self.session.as_ref().and_then(|s| s.cursor);
        let (Some(c), View::Label) = (cursor, self.view) else {
            self.viewer = None;
            return;
        };
        let (Some(s), Some(v), Some(thumbs)) = (
            self.session.as_mut(),
            self.viewer.as_mut(),
            self.thumbs.as_mut(),
        ) else {
            return;
        };
        if v.image != Some(c) {
            v.image = Some(c);
            v.fit();
        }
        v.loader.update(ctx, c, &s.images[c].path);
        // The grid's preview stands in until the full picture is decoded (the grid, drawn underneath, asks
        // for the cursor's pictures first; asking here too would replace its wish list every frame).
        let (tex, note): (Option<TextureHandle>, Option<String>) = match &v.loader.current {
            Some((_, Ok(t))) => (Some(t.clone()), None),
            Some((_, Err(e))) => (None, Some(format!("cannot show this image:\n{e}"))),
            None => {
                let stand_in = match thumbs.preview(c) {
                    Thumb::Ready(t) => Some(t.clone()),
                    _ => None,
                };
                (stand_in, Some("loading the full-size image…".into()))
            }
        };
        let full = v
            .loader
            .current
            .as_ref()
            .and_then(|(_, t)| t.as_ref().ok())
            .map(|t| t.size_vec2());

        // Header: where, what, label, top prediction, keys.
        let classes = s.classes().to_vec();
        let rel = s.images[c].rel.clone();
        let label = s.label(c);
        let origin = s.origin(c);
        let prediction = s.prediction(c);
        let position = s.cursor_position();
        let shown = s.visible().len();

        let screen = ctx.content_rect();
        let area = egui::Area::new(egui::Id::unique("hegraph-image-viewer"))
            .order(egui::Order::Middle)
            .fixed_pos(screen.min)
            .show(ctx, |ui| {
                ui.set_min_size(screen.size());
                let painter = ui.painter();
                painter.rect_filled(screen, 0.0, Color32::from_gray(12));
                let header = Rect::from_min_size(screen.min, Vec2::new(screen.width(), HEADER));
                painter.rect_filled(header, 0.0, Color32::from_gray(28));
                let mut line = egui::text::LayoutJob::default();
                let font = FontId::proportional(16.0);
                let add = |job: &mut egui::text::LayoutJob, t: &str, color: Color32| {
                    job.append(
                        t,
                        0.0,
                        egui::TextFormat::simple(font.clone(), color),
                    );
                };
                add(&mut line, &rel, Color32::from_gray(240));
                if let Some(p) = position {
                    add(
                        &mut line,
                        &format!("   {} / {shown}", p + 1),
                        Color32::from_gray(150),
                    );
                }
                add(&mut line, "     ", Color32::WHITE);
                match label {
                    Some(l) => {
                        let name = classes.get(l).map_or("?", String::as_str);
                        add(&mut line, "labelled ", Color32::from_gray(170));
                        add(&mut line, name, style::class_color(l));
                        if let Some(o) = origin {
                            add(
                                &mut line,
                                &format!(" ({})", o.describe()),
                                Color32::from_gray(150),
                            );
                        }
                    }
                    None => add(&mut line, "unlabelled", Color32::from_gray(170)),
                }
                if let Some((p, conf, _)) = prediction {
                    let name = classes.get(p).map_or("?", String::as_str);
                    add(&mut line, "     predicted ", Color32::from_gray(170));
                    add(
                        &mut line,
                        &format!("{name} {:.0}%", conf * 100.0),
                        style::class_color(p),
                    );
                }
                if test_checkpoint {
                    // The viewer covers the window's banner, and these predictions mean nothing.
                    add(
                        &mut line,
                        &format!("     ▲ {}", super::TEST_CHECKPOINT_BANNER),
                        style::WARNING_FG,
                    );
                }
                // A label, not painted text: screen readers (and the tests) read it.
                let text_rect = Rect::from_min_size(
                    header.min + Vec2::new(14.0, 6.0),
                    Vec2::new(header.width() - 28.0, 24.0),
                );
                ui.scope_builder(egui::UiBuilder::new().max_rect(text_rect), |ui| {
                    ui.add(egui::Label::new(line).selectable(false).truncate());
                });
                let painter = ui.painter();
                let zoom_text = match full {
                    Some(size) => {
                        let fit = fit_scale(size, v.view);
                        format!("{:.0}% of full size", fit * v.zoom * 100.0)
                    }
                    None => "fit".to_string(),
                };
                painter.text(
                    Pos2::new(header.min.x + 14.0, header.max.y - 8.0),
                    Align2::LEFT_BOTTOM,
                    format!(
                        "{zoom_text}  ·  1–9 label, 0 unlabel  ·  ←/→ previous/next  ·  wheel or +/− zoom, drag pans, F fits  ·  Esc or Space closes"
                    ),
                    FontId::proportional(12.5),
                    Color32::from_gray(150),
                );

                let view_rect =
                    Rect::from_min_max(Pos2::new(screen.min.x, header.max.y), screen.max)
                        .shrink(8.0);
                v.view = view_rect;
                let resp = ui.allocate_rect(view_rect, Sense::click_and_drag());
                if resp.double_clicked() {
                    v.fit();
                }
                if resp.dragged() {
                    v.pan += resp.drag_delta();
                }
                if let Some(p) = resp.hover_pos() {
                    let travel: f32 = ui.input(|i| {
                        i.events
                            .iter()
                            .map(|e| match e {
                                Event::MouseWheel { unit, delta, .. } => match unit {
                                    MouseWheelUnit::Point => delta.y,
                                    MouseWheelUnit::Line => delta.y * LINE_POINTS,
                                    MouseWheelUnit::Page => delta.y * view_rect.height(),
                                },
                                _ => 0.0,
                            })
                            .sum()
                    });
                    if travel != 0.0 {
                        v.zoom_about((travel * WHEEL_ZOOM_PER_POINT).exp(), p);
                    }
                }
                let painter = ui.painter().with_clip_rect(view_rect);
                if let Some(t) = &tex {
                    let size = t.size_vec2();
                    let scale = fit_scale(size, view_rect) * v.zoom;
                    v.pan = bounded_pan(v.pan, size * scale, view_rect.size());
                    let r = Rect::from_center_size(view_rect.center() + v.pan, size * scale);
                    painter.image(
                        t.id(),
                        r,
                        Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                        Color32::WHITE,
                    );
                }
                if let Some(n) = note {
                    let at = if tex.is_some() {
                        Pos2::new(view_rect.center().x, view_rect.max.y - 16.0)
                    } else {
                        view_rect.center()
                    };
                    painter.text(
                        at,
                        Align2::CENTER_CENTER,
                        n,
                        FontId::proportional(14.0),
                        if tex.is_some() {
                            Color32::from_gray(200)
                        } else {
                            style::WARNING_FG
                        },
                    );
                }
            });
        // Above the side windows (help, settings); the modal dialogs are a higher order still.
        ctx.move_to_top(area.response.layer_id);
    }
}

/// Points per image pixel at which `size` fits `view`.
fn fit_scale(size: Vec2, view: Rect) -> f32 {
    if size.x <= 0.0 || size.y <= 0.0 || !view.is_positive() {
        return 1.0;
    }
    (view.width() / size.x).min(view.height() / size.y)
}

/// The pan limited so that the picture cannot be lost off screen: along an axis where it is larger than the
/// view its edges stay outside the view (no empty band appears), where it is smaller it stays wholly inside.
fn bounded_pan(pan: Vec2, drawn: Vec2, view: Vec2) -> Vec2 {
    let slack = ((drawn - view) * 0.5).abs();
    Vec2::new(
        pan.x.clamp(-slack.x, slack.x),
        pan.y.clamp(-slack.y, slack.y),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pan_keeps_the_picture_on_screen() {
        let view = Vec2::new(800.0, 600.0);
        // Zoomed in: 1600×900 drawn; at most 400 px left/right and 150 px up/down.
        let far = Vec2::new(1e6, -1e6);
        assert_eq!(
            bounded_pan(far, Vec2::new(1600.0, 900.0), view),
            Vec2::new(400.0, -150.0)
        );
        // Smaller than the view: it may move until its edge touches the view's.
        assert_eq!(
            bounded_pan(far, Vec2::new(400.0, 300.0), view),
            Vec2::new(200.0, -150.0)
        );
        // A pan inside the bounds is left alone; fitted along an axis means no pan along it.
        let small = Vec2::new(10.0, -20.0);
        assert_eq!(bounded_pan(small, Vec2::new(1600.0, 900.0), view), small);
        assert_eq!(
            bounded_pan(small, Vec2::new(800.0, 450.0), view),
            Vec2::new(0.0, -20.0)
        );
    }

    fn viewer_at(view: Rect) -> ImageViewer {
        ImageViewer {
            zoom: 1.0,
            pan: Vec2::ZERO,
            image: None,
            view,
            loader: FullLoader::new(&egui::Context::default()),
        }
    }

    #[test]
    fn zooming_about_a_point_keeps_that_point_still() {
        let view = Rect::from_min_size(Pos2::ZERO, Vec2::new(800.0, 600.0));
        let mut v = viewer_at(view);
        // The image point under (600, 150): its offset from the image centre, in fitted units.
        let p = Pos2::new(600.0, 150.0);
        let before = (p - (view.center() + v.pan)) / v.zoom;
        v.zoom_about(2.0, p);
        let after = (p - (view.center() + v.pan)) / v.zoom;
        assert!((v.zoom - 2.0).abs() < 1e-6);
        assert!((before - after).length() < 1e-3, "{before:?} {after:?}");
        v.zoom_about(1e9, p);
        assert_eq!(v.zoom, MAX_ZOOM);
        v.fit();
        assert_eq!((v.zoom, v.pan), (1.0, Vec2::ZERO));
    }

    #[test]
    fn digits_label_and_grid_keys_do_nothing_in_the_viewer() {
        let none = Modifiers::NONE;
        let k = |key| viewer_key(key, none, 3, View::Label);
        assert!(matches!(
            k(Key::Num2),
            ViewerKey::App(Action::Label(Some(1)))
        ));
        assert!(matches!(k(Key::Num9), ViewerKey::Ignore));
        assert!(matches!(k(Key::Num0), ViewerKey::App(Action::Label(None))));
        assert!(matches!(
            k(Key::ArrowRight),
            ViewerKey::App(Action::Move(1))
        ));
        assert!(matches!(k(Key::Space), ViewerKey::Close));
        assert!(matches!(k(Key::Escape), ViewerKey::Close));
        for grid_only in [Key::N, Key::V, Key::S, Key::T, Key::L, Key::ArrowDown] {
            assert!(matches!(k(grid_only), ViewerKey::Ignore), "{grid_only:?}");
        }
        assert!(matches!(
            viewer_key(Key::Z, Modifiers::COMMAND, 3, View::Label),
            ViewerKey::App(Action::Undo)
        ));
        // Zoom and fit, from the table F1 lists.
        assert!(matches!(k(Key::Plus), ViewerKey::Zoom(z) if z > 1.0));
        assert!(matches!(k(Key::Equals), ViewerKey::Zoom(z) if z > 1.0));
        assert!(matches!(k(Key::Minus), ViewerKey::Zoom(z) if z < 1.0));
        assert!(matches!(k(Key::F), ViewerKey::Fit));
    }

    /// Every key of the viewer's table dispatches (none is shadowed by a digit or listed twice).
    #[test]
    fn every_key_of_the_viewer_table_is_dispatched_and_listed_once() {
        let mut seen = Vec::new();
        for (keys, act, _) in VIEWER_KEYS {
            for &key in *keys {
                assert!(!seen.contains(&key), "{key:?} listed twice");
                seen.push(key);
                let got = viewer_key(key, Modifiers::NONE, 9, View::Label);
                let ok = match act {
                    ViewerAct::Close => matches!(got, ViewerKey::Close),
                    ViewerAct::Previous => matches!(got, ViewerKey::App(Action::Move(-1))),
                    ViewerAct::Next => matches!(got, ViewerKey::App(Action::Move(1))),
                    ViewerAct::Unlabel => matches!(got, ViewerKey::App(Action::Label(None))),
                    ViewerAct::ZoomIn => matches!(got, ViewerKey::Zoom(z) if z > 1.0),
                    ViewerAct::ZoomOut => matches!(got, ViewerKey::Zoom(z) if z < 1.0),
                    ViewerAct::Fit => matches!(got, ViewerKey::Fit),
                };
                assert!(ok, "{key:?} does not do {act:?}");
            }
        }
    }

    #[test]
    fn the_decoder_thread_decodes_the_latest_wish_at_full_size() {
        let photos = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&photos)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| crate::data::is_image_path(p))
                    .collect()
            })
            .unwrap_or_default();
        if paths.is_empty() {
            println!("skipped: no photos in {}", photos.display());
            return;
        }
        paths.sort();
        let ctx = egui::Context::default();
        let mut loader = FullLoader::new(&ctx);
        let want = decode_thumbnail(&paths[0], u32::MAX).unwrap();
        loop {
            loader.update(&ctx, 7, &paths[0]);
            if loader.current.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (i, t) = loader.current.as_ref().unwrap();
        assert_eq!(*i, 7);
        let size = t.as_ref().unwrap().size();
        let max = ctx.input(|i| i.max_texture_side);
        if want.size[0].max(want.size[1]) <= max {
            assert_eq!(size, want.size, "full resolution");
        }
        // Another image: the old picture is not shown for it.
        loader.update(&ctx, 8, &paths[0]);
        assert!(loader.current.as_ref().is_none_or(|(i, _)| *i == 8));
    }
}
