//! The labeller's tools of issue 12, headless through egui_kittest and real input events: the embedding map
//! (box selection, labelling from the map, the grid's selection on the map; the t-SNE layout computed in the
//! background, switched to when done, toggled with P and the buttons, read back from the cache), bulk accept of predictions
//! (count first, provenance in the project file, one undo step), the review filter of likely mistakes, and the
//! training view's cross-validated accuracy and confusion matrix with their PNG exports.
//!
//! The fixture is the one of `tests/gui.rs` (the demo folder copied to a temporary folder, the random-weight
//! test checkpoint); the helpers are repeated here so the two files can change independently.

mod common;
use common::copy_dir;
use std::collections::BTreeSet;
use std::path::PathBuf;

use egui::{Key, Modifiers, Pos2};
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use hegraph::app::state::Show;
use hegraph::app::{AppOptions, Chart, HeGraphApp, MapLayout, View};
use hegraph::clip::{write_test_checkpoint, TestCheckpointConfig};
use hegraph::embedding_map::Layout;
use hegraph::linalg::Mat;
use hegraph::project::{default_project_path, LabelOrigin, Project};
use hegraph::review::{cross_validate, CvOptions};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Fixture {
    _dir: tempfile::TempDir,
    folder: PathBuf,
    opts: AppOptions,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("demo");
    copy_dir(&manifest().join("assets/demo"), &folder);
    let ckpt = dir.path().join("checkpoint");
    write_test_checkpoint(&ckpt, &TestCheckpointConfig::tiny(), 5).unwrap();
    let opts = AppOptions {
        cache_dir: Some(dir.path().join("cache")),
        model_dir: Some(ckpt),
        auto_embed: true,
        thumb_threads: 2,
        thumb_capacity: 600,
        backend: hegraph::gpu::BackendRequest::Auto,
        user_dir: Some(dir.path().join("user")),
    };
    Fixture {
        _dir: dir,
        folder,
        opts,
    }
}

fn wgpu_available() -> bool {
    let ok = std::panic::catch_unwind(|| {
        let instance = eframe::wgpu::Instance::new(
            eframe::wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
        );
        pollster::block_on(
            instance.request_adapter(&eframe::wgpu::RequestAdapterOptions::default()),
        )
        .is_ok()
    })
    .unwrap_or(false);
    if !ok {
        let why = "no wgpu adapter (install mesa-vulkan-drivers libvulkan1 for lavapipe)";
        if std::env::var("HEGRAPH_SKIP_GPU_TESTS").as_deref() != Ok("1") {
            panic!("{why}; set HEGRAPH_SKIP_GPU_TESTS=1 to skip the GUI tests on such a machine");
        }
        println!("skipped (HEGRAPH_SKIP_GPU_TESTS=1): {why}");
    }
    ok
}

/// The demo opened in a 1280×800 harness and embedded; `None` where GPU tests are skipped.
fn opened() -> Option<(Fixture, Harness<'static, HeGraphApp>)> {
    let f = fixture();
    let mut app = HeGraphApp::new(f.opts.clone());
    app.open_path(&f.folder).unwrap();
    if !wgpu_available() {
        return None;
    }
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .with_pixels_per_point(1.0)
        .wgpu()
        .build_ui_state(|ui, app: &mut HeGraphApp| app.show(ui), app);
    settle(&mut h);
    assert!(
        h.state().has_features(),
        "embedding failed: {:?}",
        h.state().last_error()
    );
    Some((f, h))
}

/// Steps until background work is done (a step bound, not a clock).
fn settle(h: &mut Harness<'static, HeGraphApp>) {
    for _ in 0..100_000 {
        h.step();
        if !h.state().is_busy() && !h.state().thumbnails_loading() {
            for _ in 0..4 {
                h.step();
            }
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!(
        "the app did not become idle; last error: {:?}",
        h.state().last_error()
    );
}

fn press(h: &mut Harness<'static, HeGraphApp>, modifiers: Modifiers, key: Key) {
    for pressed in [true, false] {
        h.input_mut().events.push(egui::Event::Key {
            key,
            physical_key: None,
            pressed,
            repeat: false,
            modifiers,
        });
    }
    h.step();
    h.step();
}

fn screenshot_dir() -> PathBuf {
    let dir = if std::env::var("HEGRAPH_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        manifest().join("docs/screenshots")
    } else {
        manifest().join("target/screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn screenshot(h: &mut Harness<'static, HeGraphApp>, name: &str) -> image::RgbaImage {
    h.state_mut().dismiss_notices();
    h.step();
    let img = h.render().expect("render the UI with wgpu");
    img.save(screenshot_dir().join(format!("{name}.png")))
        .unwrap();
    img
}

fn saved_project(f: &Fixture) -> Project {
    let folder = f.folder.join("images");
    Project::load(&default_project_path(&folder))
        .unwrap()
        .project
}

/// A drag with the primary button from `from` to `to`, over several frames.
fn drag(h: &mut Harness<'static, HeGraphApp>, from: Pos2, to: Pos2) {
    h.input_mut().events.push(egui::Event::PointerMoved(from));
    h.step();
    h.input_mut().events.push(egui::Event::PointerButton {
        pos: from,
        button: egui::PointerButton::Primary,
        pressed: true,
        modifiers: Modifiers::NONE,
    });
    h.step();
    for k in 1..=6 {
        let t = k as f32 / 6.0;
        h.input_mut()
            .events
            .push(egui::Event::PointerMoved(from + (to - from) * t));
        h.step();
    }
    h.input_mut().events.push(egui::Event::PointerButton {
        pos: to,
        button: egui::PointerButton::Primary,
        pressed: false,
        modifiers: Modifiers::NONE,
    });
    h.step();
    h.step();
}

#[test]
fn the_map_box_selects_images_labels_them_and_shows_the_grids_selection() {
    let Some((f, mut h)) = opened() else { return };
    press(&mut h, Modifiers::COMMAND, Key::Num4);
    assert_eq!(h.state().view, View::Map);
    settle(&mut h);
    // This test is about PCA (the t-SNE layout has its own below): the person chooses it.
    h.get_by_label("PCA").click();
    h.step();
    h.step();
    assert_eq!(h.state().map_layout(), MapLayout::Pca);
    let n = h.state().session().unwrap().len();
    let m = h.state().map().expect("the map was made");
    assert_eq!(m.map.points.len(), n);
    let classes = h.state().session().unwrap().classes().len();
    assert_eq!(m.map.text.len(), classes, "one text node per class");
    println!(
        "map of the demo folder ({n} images): PCA in {:.1} ms",
        m.seconds * 1000.0
    );
    let pts = h.state().map_screen().0.to_vec();
    let canvas = h.state().map_screen().1;
    assert_eq!(pts.len(), n);
    assert!(pts.iter().all(|p| canvas.contains(*p)));
    let expected = box_select_left_half(&mut h);
    let s = h.state().session().unwrap();
    assert_eq!(
        s.selection, expected,
        "the box selects the points inside it"
    );
    assert!(expected.contains(&s.cursor.unwrap()));

    // A digit labels the selection from the map (confirming the overwrite of imported labels if asked).
    press(&mut h, Modifiers::NONE, Key::Num3);
    if h.state().modal_open() {
        press(&mut h, Modifiers::NONE, Key::Enter);
    }
    let saved = saved_project(&f);
    let s = h.state().session().unwrap();
    for &i in &expected {
        assert_eq!(s.label(i), Some(2));
        assert_eq!(
            saved.labels.get(&s.images[i].rel).map(String::as_str),
            Some("flower")
        );
    }
    // A selection made in the grid shows on the map: the cursor's ring is drawn in the accent colour there.
    let outside = (0..n).find(|i| !expected.contains(i)).unwrap();
    press(&mut h, Modifiers::COMMAND, Key::Num1);
    press(&mut h, Modifiers::NONE, Key::Home);
    for _ in 0..outside {
        press(&mut h, Modifiers::NONE, Key::ArrowRight);
    }
    assert_eq!(h.state().session().unwrap().cursor, Some(outside));
    press(&mut h, Modifiers::COMMAND, Key::Num4);
    settle(&mut h);
    let img = screenshot(&mut h, "map");
    let at = pts[outside];
    let accent = hegraph::app::style::ACCENT;
    let ring = (-12i32..=12)
        .flat_map(|dx| (-12i32..=12).map(move |dy| (dx, dy)))
        .filter(|&(dx, dy)| {
            let p = img.get_pixel((at.x as i32 + dx) as u32, (at.y as i32 + dy) as u32);
            (p[0] as i32 - accent.r() as i32).abs() < 40
                && (p[1] as i32 - accent.g() as i32).abs() < 40
                && (p[2] as i32 - accent.b() as i32).abs() < 40
        })
        .count();
    assert!(
        ring > 10,
        "the cursor ring around image {outside}: {ring} pixels"
    );
}

/// A box over the left half of the drawn points (by their median x), dragged: returns the images inside it.
fn box_select_left_half(h: &mut Harness<'static, HeGraphApp>) -> BTreeSet<usize> {
    let (pts, canvas) = h.state().map_screen();
    let (pts, canvas) = (pts.to_vec(), canvas);
    let n = pts.len();
    let mut xs: Vec<f32> = pts.iter().map(|p| p.x).collect();
    xs.sort_by(f32::total_cmp);
    let cut = (xs[n / 2 - 1] + xs[n / 2]) / 2.0;
    let from = canvas.min + egui::vec2(3.0, 3.0);
    let to = Pos2::new(cut, canvas.max.y - 3.0);
    let expected: BTreeSet<usize> = (0..n)
        .filter(|&i| egui::Rect::from_two_pos(from, to).contains(pts[i]))
        .collect();
    assert!(
        expected.len() >= n / 3 && expected.len() < n,
        "{expected:?}"
    );
    drag(h, from, to);
    expected
}

/// Whether the drawn points are `map` fitted into the canvas: equal scale on both axes, y up.
fn drawn_from(h: &Harness<'static, HeGraphApp>, map: &[[f32; 2]]) -> bool {
    let (pts, _) = h.state().map_screen();
    let (a, b) = (
        0,
        (1..map.len())
            .max_by(|&i, &j| {
                let d = |k: usize| (map[k][0] - map[0][0]).abs();
                d(i).total_cmp(&d(j))
            })
            .unwrap(),
    );
    let scale = (pts[b].x - pts[a].x) / (map[b][0] - map[a][0]);
    scale > 0.0
        && (0..map.len()).all(|i| {
            let x = pts[a].x + (map[i][0] - map[a][0]) * scale;
            let y = pts[a].y - (map[i][1] - map[a][1]) * scale;
            (pts[i].x - x).abs() < 0.5 && (pts[i].y - y).abs() < 0.5
        })
}

#[test]
fn the_map_switches_to_tsne_when_done_toggles_layouts_and_box_selects_on_tsne() {
    let Some((f, mut h)) = opened() else { return };
    press(&mut h, Modifiers::COMMAND, Key::Num4);
    // PCA at once, then the t-SNE job after it; settling waits for both.
    settle(&mut h);
    let n = h.state().session().unwrap().len();
    let classes = h.state().session().unwrap().classes().len();
    let t = h.state().tsne_map().expect("the t-SNE map was made");
    assert!(
        !t.from_cache,
        "the first t-SNE map of this folder is computed"
    );
    assert_eq!(t.map.points.len(), n);
    assert_eq!(t.map.text.len(), classes, "one text node per class");
    assert!(matches!(t.map.layout, Layout::Tsne { .. }));
    println!(
        "t-SNE map of the demo folder ({n} images): {:.2} s",
        t.seconds
    );
    let tsne_points = t.map.points.clone();
    let pca_points = h.state().map().unwrap().map.points.clone();
    assert_eq!(
        h.state().map_layout(),
        MapLayout::Tsne,
        "the view switched to t-SNE"
    );
    assert!(drawn_from(&h, &tsne_points));
    h.get_by_label_contains("t-SNE of ");

    // P and the buttons switch the layout.
    press(&mut h, Modifiers::NONE, Key::P);
    assert_eq!(h.state().map_layout(), MapLayout::Pca);
    assert!(drawn_from(&h, &pca_points));
    h.get_by_label_contains("PCA of ");
    press(&mut h, Modifiers::NONE, Key::P);
    assert_eq!(h.state().map_layout(), MapLayout::Tsne);
    h.get_by_label("PCA").click();
    h.step();
    h.step();
    assert_eq!(h.state().map_layout(), MapLayout::Pca);
    h.get_by_label("t-SNE").click();
    h.step();
    h.step();
    assert_eq!(h.state().map_layout(), MapLayout::Tsne);
    assert!(drawn_from(&h, &tsne_points));

    // A box on the t-SNE map selects exactly the images inside it.
    let expected = box_select_left_half(&mut h);
    let s = h.state().session().unwrap();
    assert_eq!(
        s.selection, expected,
        "the box selects the points inside it"
    );
    screenshot(&mut h, "map-tsne");
    press(&mut h, Modifiers::NONE, Key::Num2);
    if h.state().modal_open() {
        press(&mut h, Modifiers::NONE, Key::Enter);
    }
    let saved = saved_project(&f);
    let s = h.state().session().unwrap();
    for &i in &expected {
        assert_eq!(s.label(i), Some(1));
        assert_eq!(
            saved.labels.get(&s.images[i].rel),
            Some(&s.classes()[1]),
            "labelled from the t-SNE map"
        );
    }

    // Reopening the folder shows the t-SNE map from the cache.
    let folder = f.folder.clone();
    h.state_mut().open_path(&folder).unwrap();
    settle(&mut h);
    if h.state().view != View::Map {
        press(&mut h, Modifiers::COMMAND, Key::Num4);
    }
    settle(&mut h);
    let t = h.state().tsne_map().expect("the t-SNE map after reopening");
    assert!(t.from_cache, "read back from the layout cache");
    assert_eq!(t.map.points, tsne_points);
    assert_eq!(h.state().map_layout(), MapLayout::Tsne);
    h.get_by_label_contains("read from the cache");
}

#[test]
fn bulk_accept_shows_the_count_applies_accepted_labels_and_undoes_in_one_step() {
    let Some((f, mut h)) = opened() else { return };
    // Known predictions: image i predicted as class i % 5 with probability 0.6, 0.7, 0.8 or 0.9.
    let n = h.state().session().unwrap().len();
    let classes = h.state().session().unwrap().classes().len();
    let mut probs = Mat::zeros(n, classes);
    for i in 0..n {
        let p = 0.6 + (i % 4) as f32 * 0.1;
        for c in 0..classes {
            let rest = (1.0 - p) / (classes - 1) as f32;
            probs.set(i, c, if c == i % 5 { p } else { rest });
        }
    }
    let before = h.state().session().unwrap().labels().to_vec();
    let expected_all: Vec<(usize, usize)> = (0..n)
        .filter(|&i| before[i].is_none() && 0.6 + (i % 4) as f32 * 0.1 >= 0.8 - 1e-6)
        .map(|i| (i, i % 5))
        .collect();
    assert!(!expected_all.is_empty());
    {
        let s = h.state_mut().session_mut().unwrap();
        s.set_predictions(Some(probs));
        // Filtered to images predicted as class 2: the dialog starts with that class.
        let mut fl = s.filter().clone();
        fl.predicted = Some(2);
        s.set_filter(fl);
    }
    press(&mut h, Modifiers::NONE, Key::A);
    assert!(h.state().modal_open(), "A opens the dialog");
    h.get_by_label("80 %").click();
    h.step();
    h.step();
    let class2 = expected_all.iter().filter(|x| x.1 == 2).count();
    h.get_by_label_contains(&format!("{class2} unlabelled images would be labelled"));
    press(&mut h, Modifiers::NONE, Key::Escape);
    assert!(!h.state().modal_open(), "Esc closes it");
    assert_eq!(h.state().session().unwrap().labels(), before.as_slice());

    // Every class.
    h.state_mut()
        .session_mut()
        .unwrap()
        .set_filter(Default::default());
    press(&mut h, Modifiers::NONE, Key::A);
    h.get_by_label("80 %").click();
    h.step();
    h.step();
    h.get_by_label_contains(&format!(
        "{} unlabelled images would be labelled",
        expected_all.len()
    ));
    screenshot(&mut h, "bulk-accept");
    h.get_by_label(&format!(
        "Accept {} predictions (Enter)",
        expected_all.len()
    ))
    .click();
    h.step();
    h.step();
    assert!(!h.state().modal_open());
    let saved = saved_project(&f);
    let s = h.state().session().unwrap();
    for &(i, c) in &expected_all {
        let rel = &s.images[i].rel;
        assert_eq!(saved.labels.get(rel), Some(&s.classes()[c]), "{rel}");
        assert_eq!(saved.origin(rel), LabelOrigin::Accepted, "{rel}");
    }
    for (i, b) in before.iter().enumerate() {
        if b.is_some() {
            assert_eq!(s.label(i), *b, "a label that was there is kept");
            assert_ne!(saved.origin(&s.images[i].rel), LabelOrigin::Accepted);
        }
    }
    let json = std::fs::read_to_string(default_project_path(&f.folder.join("images"))).unwrap();
    assert!(
        json.contains("\"accepted\""),
        "the provenance is in the file"
    );
    // One undo step takes them all back.
    press(&mut h, Modifiers::COMMAND, Key::Z);
    assert_eq!(h.state().session().unwrap().labels(), before.as_slice());
    let saved = saved_project(&f);
    assert!(saved
        .label_origins
        .values()
        .all(|o| *o != LabelOrigin::Accepted));
}

/// What the review list should be for the app's current labels, computed by the engine directly.
fn expected_review(h: &Harness<'static, HeGraphApp>) -> Vec<usize> {
    let app = h.state();
    let s = app.session().unwrap();
    let cv = cross_validate(
        app.image_features().unwrap(),
        app.text_features(),
        &app.cross_validation_input(),
        s.classes().len(),
        &CvOptions {
            scale: s.project.settings.train.logit_scale,
            ..Default::default()
        },
    )
    .unwrap();
    cv.suspects(hegraph::app::insights::REVIEW_MIN_CONFIDENCE)
        .iter()
        .map(|x| x.image)
        .collect()
}

#[test]
fn the_review_filter_lists_likely_mistakes_and_a_fixed_label_leaves_it() {
    let Some((f, mut h)) = opened() else { return };
    // Labels that disagree with the images: image i gets class (7 i) mod 5.
    {
        let s = h.state_mut().session_mut().unwrap();
        for i in 0..s.len() {
            s.set_labels(&[i], Some((7 * i) % 5)).saved.unwrap();
        }
    }
    // V: all → unlabelled → labelled → review.
    for _ in 0..3 {
        press(&mut h, Modifiers::NONE, Key::V);
    }
    assert_eq!(h.state().session().unwrap().filter().show, Show::Review);
    settle(&mut h);
    let expected = expected_review(&h);
    assert!(
        expected.len() >= 3,
        "arbitrary labels give likely mistakes: {expected:?}"
    );
    let shown = h.state_mut().session_mut().unwrap().visible().to_vec();
    assert_eq!(
        shown, expected,
        "the list, most confident disagreement first"
    );
    screenshot(&mut h, "review");

    // Fix the first: Home puts the cursor on it, its predicted class's digit relabels it.
    let first = expected[0];
    let predicted = h
        .state()
        .cross_validation()
        .unwrap()
        .suspects(0.0)
        .iter()
        .find(|x| x.image == first)
        .unwrap()
        .predicted;
    press(&mut h, Modifiers::NONE, Key::Home);
    assert_eq!(h.state().session().unwrap().cursor, Some(first));
    let digit = [
        Key::Num1,
        Key::Num2,
        Key::Num3,
        Key::Num4,
        Key::Num5,
        Key::Num6,
        Key::Num7,
        Key::Num8,
        Key::Num9,
    ][predicted];
    press(&mut h, Modifiers::NONE, digit);
    assert_eq!(h.state().session().unwrap().label(first), Some(predicted));
    assert!(
        !h.state_mut()
            .session_mut()
            .unwrap()
            .visible()
            .contains(&first),
        "a fixed label leaves the list at once"
    );
    settle(&mut h);
    let shown = h.state_mut().session_mut().unwrap().visible().to_vec();
    assert_eq!(
        shown,
        expected_review(&h),
        "the list recomputed on the new labels"
    );
    let saved = saved_project(&f);
    let rel = &h.state().session().unwrap().images[first].rel;
    assert_eq!(
        saved.labels.get(rel),
        Some(&h.state().session().unwrap().classes()[predicted])
    );
}

#[test]
fn the_training_view_plots_cross_validated_accuracy_across_retrains_and_exports_pngs() {
    let Some((f, mut h)) = opened() else { return };
    let first = h.state().session().unwrap().labelled_count();
    press(&mut h, Modifiers::NONE, Key::T);
    settle(&mut h);
    assert_eq!(h.state().history().len(), 1, "{:?}", h.state().last_error());
    // Five more labels from the keyboard (N picks an image, a digit labels it), then train again.
    for k in 0..5 {
        press(&mut h, Modifiers::NONE, Key::N);
        press(&mut h, Modifiers::NONE, [Key::Num1, Key::Num2][k % 2]);
    }
    assert_eq!(h.state().session().unwrap().labelled_count(), first + 5);
    press(&mut h, Modifiers::NONE, Key::T);
    settle(&mut h);
    assert_eq!(h.state().history().len(), 2);
    let saved = saved_project(&f);
    let labels: Vec<usize> = saved.accuracy_history.iter().map(|p| p.labels).collect();
    assert_eq!(labels, vec![first, first + 5], "one point per training");
    let cv = h.state().cross_validation().unwrap();
    assert_eq!(saved.accuracy_history[1].accuracy, cv.accuracy());
    let m = cv.confusion();
    assert_eq!(m.iter().flatten().sum::<usize>(), first + 5);

    press(&mut h, Modifiers::COMMAND, Key::Num3);
    assert_eq!(h.state().view, View::Train);
    settle(&mut h);
    screenshot(&mut h, "training-progress");
    let buttons = h.get_all_by_label("Export PNG").count();
    assert_eq!(buttons, 2, "one per chart");
    h.get_all_by_label("Export PNG").next().unwrap().click();
    h.step();
    h.get_all_by_label("Export PNG").nth(1).unwrap().click();
    h.step();
    h.step();
    let dir = default_project_path(&f.folder.join("images"))
        .parent()
        .unwrap()
        .to_path_buf();
    for name in ["accuracy.png", "confusion.png"] {
        let img = image::open(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .to_rgb8();
        let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(ink > 1000, "{name} has content: {ink} pixels");
        std::fs::copy(
            dir.join(name),
            screenshot_dir().join(format!("export-{name}")),
        )
        .unwrap();
    }
    // The method behind the buttons gives the same files.
    let p = h.state_mut().export_chart(Chart::Confusion).unwrap();
    assert_eq!(p, dir.join("confusion.png"));
}
