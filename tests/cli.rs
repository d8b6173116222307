//! End-to-end runs of the `hegraph` binary on real images with the test checkpoint (random weights in CLIP's
//! exact layout, written by the binary itself): the plumbing from folder to predictions, the feature cache, and
//! bad input. Accuracy here means nothing and is never asserted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hegraph"))
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the binary in `home` with a private user cache, so tests never touch the real one or the work tree.
fn run(home: &Path, args: &[&str]) -> Output {
    let out = bin()
        .args(args)
        .current_dir(home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HOME", home)
        .env_remove("HEGRAPH_MODEL_DIR")
        .env("HEGRAPH_BACKEND", "cpu")
        .output()
        .expect("the hegraph binary runs");
    eprintln!(
        "$ hegraph {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all_output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Copies the demo folder so the features file written next to it stays in the temp dir.
fn demo_copy(dst: &Path) -> PathBuf {
    let src = manifest().join("assets/demo");
    let out = dst.join("demo");
    std::fs::create_dir_all(out.join("images")).unwrap();
    for f in ["classes.txt", "labels.csv", "truth.csv"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    for e in std::fs::read_dir(src.join("images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join("images").join(e.file_name())).unwrap();
    }
    out
}

#[test]
fn extract_twice_reads_everything_from_the_cache_the_second_time() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(tmp.path());
    let images = demo.join("images");
    let d = images.to_str().unwrap();
    let classes = demo.join("classes.txt");
    let labels = demo.join("labels.csv");
    let features = tmp.path().join("demo.features.safetensors");
    let args = [
        "extract",
        d,
        "-o",
        features.to_str().unwrap(),
        "--classes",
        classes.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--test-checkpoint",
    ];
    let first = run(tmp.path(), &args);
    assert!(first.status.success());
    let out = all_output(&first);
    assert!(
        out.contains("TEST CHECKPOINT"),
        "every output names the test checkpoint"
    );
    assert!(stdout(&first).contains("48 images (16 labelled, 32 unlabelled, 8 classes)"));
    // 48 centre crops + 16 × 10 views.
    assert!(stdout(&first).contains("208 features computed, 0 read from the cache"));
    assert!(features.is_file());

    let second = run(tmp.path(), &args);
    assert!(second.status.success());
    assert!(stdout(&second).contains("0 features computed, 208 read from the cache"));

    // A changed file is embedded again, and only that file.
    let img = demo.join("images/crow.png");
    let rotated = image::open(&img).unwrap().rotate90();
    rotated.save(&img).unwrap();
    let third = run(tmp.path(), &args);
    assert!(third.status.success());
    assert!(stdout(&third).contains("1 features computed, 207 read from the cache"));
}

#[test]
fn a_folder_with_bad_files_finishes_and_names_each_one() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    for class in ["cat", "rocket"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    let photos = manifest().join("../shared/data/photos");
    std::fs::copy(photos.join("chelsea.png"), root.join("cat/chelsea.png")).unwrap();
    std::fs::copy(photos.join("rocket.jpg"), root.join("rocket/rocket.jpg")).unwrap();
    std::fs::copy(
        photos.join("coffee.png"),
        root.join("rocket/unlabelled-coffee.png"),
    )
    .unwrap();
    // The bad ones.
    std::fs::write(root.join("cat/empty.png"), b"").unwrap();
    let bytes = std::fs::read(photos.join("astronaut.png")).unwrap();
    std::fs::write(root.join("cat/truncated.png"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(root.join("rocket/notes.txt"), b"not an image").unwrap();
    std::fs::write(
        root.join("rocket/fake.jpg"),
        b"this is text pretending to be a jpeg",
    )
    .unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&root, root.join("cat/loop")).unwrap();

    let o = run(
        tmp.path(),
        &[
            "extract",
            root.to_str().unwrap(),
            "--test-checkpoint",
            "-o",
            tmp.path()
                .join("photos.features.safetensors")
                .to_str()
                .unwrap(),
        ],
    );
    assert!(o.status.success(), "one bad file never stops the run");
    let text = all_output(&o);
    for bad in ["empty.png", "truncated.png", "notes.txt", "fake.jpg"] {
        assert!(text.contains(bad), "{bad} is named in the output");
    }
    #[cfg(unix)]
    assert!(text.contains("loop"), "the symlink loop is named");
}

#[test]
fn empty_folder_and_duplicate_class_names_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(
        tmp.path(),
        &["extract", empty.to_str().unwrap(), "--test-checkpoint"],
    );
    assert!(!o.status.success());
    assert!(all_output(&o).to_lowercase().contains("no image"));

    let classes = tmp.path().join("classes.txt");
    std::fs::write(&classes, "cat\ndog\n Cat\n").unwrap();
    std::fs::copy(
        manifest().join("../shared/data/photos/chelsea.png"),
        empty.join("chelsea.png"),
    )
    .unwrap();
    let o = run(
        tmp.path(),
        &[
            "extract",
            empty.to_str().unwrap(),
            "--classes",
            classes.to_str().unwrap(),
            "--test-checkpoint",
        ],
    );
    assert!(!o.status.success());
    let text = all_output(&o);
    assert!(text.contains("line 3") && text.contains("line 1"), "{text}");
    assert!(text.contains("classes.txt"));
}

#[test]
fn the_demo_runs_end_to_end_offline_on_the_test_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(tmp.path());
    let o = run(
        tmp.path(),
        &[
            "demo",
            "--folder",
            demo.to_str().unwrap(),
            "--offline",
            "--epochs",
            "5",
        ],
    );
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("accuracy on the 32 unlabelled demo images"));
    assert!(text.contains("TEST CHECKPOINT"));
}

/// `hegraph train` on the demo folder (test checkpoint, 5 epochs) into `adapter`, with `extra` arguments.
fn train_demo(home: &Path, demo: &Path, adapter: &Path, extra: &[&str]) -> Output {
    let images = demo.join("images");
    let classes = demo.join("classes.txt");
    let labels = demo.join("labels.csv");
    let mut args = vec![
        "train",
        images.to_str().unwrap(),
        "--classes",
        classes.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--test-checkpoint",
        "--epochs",
        "5",
        "-o",
        adapter.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(home, &args)
}

/// `hegraph predict --format json` of `images` with `adapter` (test checkpoint), parsed.
fn predict_json(home: &Path, adapter: &Path, images: &[PathBuf]) -> serde_json::Value {
    let mut args = vec![
        "predict",
        "--adapter",
        adapter.to_str().unwrap(),
        "--test-checkpoint",
        "--format",
        "json",
    ];
    args.extend(images.iter().map(|p| p.to_str().unwrap()));
    let o = run(home, &args);
    assert!(o.status.success(), "{}", all_output(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn train_and_predict_on_a_folder_write_an_adapter_and_per_class_confidences() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(tmp.path());
    let adapter = tmp.path().join("demo.hegraph");
    let o = train_demo(tmp.path(), &demo, &adapter, &[]);
    assert!(o.status.success());
    assert!(adapter.is_file());
    let v = predict_json(
        tmp.path(),
        &adapter,
        &[demo.join("images/crow.png"), demo.join("images/carrot.png")],
    );
    assert_eq!(v["test_checkpoint"], true);
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    for p in preds {
        let probs: Vec<f64> = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 8);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-3);
    }
}

/// `--backend cpu` (the hand-written step) and `--backend candle` (candle's autodiff) train the same adapter:
/// the same seed gives the same per-class confidences.
#[test]
fn the_cpu_and_candle_backends_train_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(tmp.path());
    let mut probs = Vec::new();
    for backend in ["cpu", "candle"] {
        let adapter = tmp.path().join(format!("{backend}.hegraph"));
        let o = train_demo(tmp.path(), &demo, &adapter, &["--backend", backend]);
        assert!(o.status.success(), "{}", all_output(&o));
        if backend == "candle" {
            assert!(all_output(&o).contains("candle"), "{}", all_output(&o));
        }
        let v = predict_json(tmp.path(), &adapter, &[demo.join("images/crow.png")]);
        let p: Vec<f64> = v["predictions"][0]["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        probs.push(p);
    }
    assert_eq!(probs[0].len(), probs[1].len());
    for (a, b) in probs[0].iter().zip(&probs[1]) {
        assert!((a - b).abs() < 2e-3, "{:?} vs {:?}", probs[0], probs[1]);
    }
}

/// The whole image-folder path on Debian's Tux Paint photo cut-outs (composited on white), ten or more classes.
/// Runs when the package is installed (CI installs it); otherwise says why it is skipped.
#[test]
fn tuxpaint_stamps_go_through_extract_train_and_eval() {
    let stamps = Path::new("/usr/share/tuxpaint/stamps");
    if !stamps.is_dir() {
        eprintln!("skipped: /usr/share/tuxpaint/stamps is missing (apt-get install tuxpaint-stamps-default)");
        return;
    }
    let classes = [
        ("bird", "animals/birds"),
        ("fruit", "food/fruit"),
        ("flower", "plants/flowers"),
        ("vegetable", "food/vegetables"),
        ("cow", "animals/mammals/bovines"),
        ("tool", "household/tools"),
        ("fish", "animals/fish"),
        ("planet", "space/planets"),
        ("road sign", "town/roadsigns"),
        ("clothing", "clothes"),
        ("insect", "animals/insects"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("stamps");
    for (name, dir) in classes {
        let dst = root.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(stamps.join(dir))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        files.sort();
        for f in files.iter().take(8) {
            std::os::unix::fs::symlink(f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    let features = tmp.path().join("stamps.safetensors");
    let o = run(
        tmp.path(),
        &[
            "extract",
            root.to_str().unwrap(),
            "--test-checkpoint",
            "--views",
            "2",
            "-o",
            features.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    let o = run(
        tmp.path(),
        &[
            "eval",
            features.to_str().unwrap(),
            "--shots",
            "1,2",
            "--seeds",
            "1",
            "--epochs",
            "2",
        ],
    );
    assert!(o.status.success());
    let table = stdout(&o);
    for m in [
        "Zero-shot",
        "Tip-Adapter",
        "Tip-Adapter-F",
        "HeGraphAdapter",
    ] {
        assert!(table.contains(m), "{m} in the table");
    }
}

/// Issue 11 (11, 12): without `-o` the features go to the folder's own `.hegraph/`, as `--help` says; a folder
/// the GUI has a project for is read with that project's classes, labels and templates; a damaged test
/// checkpoint is generated again rather than sent for a download.
#[test]
fn extract_writes_into_the_folder_uses_its_gui_project_and_rewrites_a_damaged_test_checkpoint() {
    use hegraph::project::{default_project_path, LabelOrigin, Project};
    let tmp = tempfile::tempdir().unwrap();
    let images = demo_copy(tmp.path()).join("images");
    let folder = images.canonicalize().unwrap();
    let mut p = Project::new(folder.clone(), vec!["planet".into(), "not a planet".into()]);
    p.templates = vec!["a picture of a {}.".into()];
    p.set_label("3_earth.png", Some(("planet".into(), LabelOrigin::Human)));
    p.set_label("4_mars.png", Some(("planet".into(), LabelOrigin::Accepted)));
    p.set_label(
        "0_sun.png",
        Some(("not a planet".into(), LabelOrigin::Human)),
    );
    p.save(&default_project_path(&folder)).unwrap();

    let d = images.to_str().unwrap();
    let o = run(
        tmp.path(),
        &["extract", d, "--test-checkpoint", "--views", "1"],
    );
    assert!(o.status.success());
    assert!(
        all_output(&o).contains("using the project"),
        "the project is named"
    );
    let written = folder.join(".hegraph").join("features.safetensors");
    let fs = hegraph::features::FeatureSet::load(&written).unwrap();
    assert_eq!(fs.classes, ["planet", "not a planet"]);
    assert_eq!(fs.templates, ["a picture of a {}."]);
    let train = fs.train.as_ref().unwrap();
    let mut labels = train.labels.clone();
    labels.sort();
    assert_eq!(labels, [0, 0, 1], "exactly the project's three labels");
    assert!(
        !all_output(&o).contains(".hegraph: hidden"),
        "hegraph's own folder is not a hidden file"
    );

    let weights = tmp
        .path()
        .join("cache/hegraph/models/hegraph-test-checkpoint/model.safetensors");
    assert!(
        weights.is_file(),
        "the test checkpoint lives in the private cache"
    );
    std::fs::write(&weights, b"damaged").unwrap();
    let o = run(
        tmp.path(),
        &["extract", d, "--test-checkpoint", "--views", "1"],
    );
    assert!(
        o.status.success(),
        "a damaged test checkpoint is written again"
    );
    let text = all_output(&o);
    assert!(text.contains("writing it again"), "{text}");
    assert!(
        !text.contains("download"),
        "a generated checkpoint is never sent for a download"
    );
}

/// Issue 11 (2, 3): file and class-folder names with a line break, a tab, quotes, a backslash and bytes that
/// are not UTF-8 go through `extract`, `train` and `predict`: every path comes back byte for byte, and
/// `x\xe9.png` and `x\xe8.png` stay two images.
#[cfg(unix)]
#[test]
fn odd_file_names_round_trip_through_extract_train_and_predict() {
    use hegraph::features::FeatureSet;
    use hegraph::stored_path::path_from_stored;
    use std::collections::BTreeSet;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap().join("odd");
    let photos = manifest().join("../shared/data/photos");
    let files: Vec<(&[u8], &str)> = vec![
        (b"cat/new\nline.png", "chelsea.png"),
        (b"cat/tab\there.png", "coffee.png"),
        (b"cat/\"quoted\", 'name'.png", "astronaut.png"),
        (b"new\nclass/x\xe9.png", "rocket.jpg"),
        (b"new\nclass/x\xe8.png", "coins.png"),
        (b"new\nclass/back\\slash \\xE9.png", "camera.png"),
        (b"un\nlabelled \xff.png", "moon.png"),
    ];
    for (name, photo) in &files {
        let p = root.join(OsStr::from_bytes(name));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(photos.join(photo), &p).unwrap();
    }
    let features = tmp.path().join("odd.safetensors");
    let o = run(
        tmp.path(),
        &[
            "extract",
            root.to_str().unwrap(),
            "--test-checkpoint",
            "--views",
            "1",
            "-o",
            features.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", all_output(&o));
    assert!(
        all_output(&o).contains("odd/new\\nclass: class name 'new\\nclass' (from this folder's name) holds a line break"),
        "the class folder with a line break is pointed out, on one line"
    );

    let fs = FeatureSet::load(&features).unwrap();
    assert_eq!(fs.classes, vec!["cat", "new\nclass"]);
    let bytes_of = |stored: &[String]| -> BTreeSet<Vec<u8>> {
        stored
            .iter()
            .map(|s| path_from_stored(s).as_os_str().as_bytes().to_vec())
            .collect()
    };
    let train = fs.train.as_ref().unwrap();
    let paths = train.paths.as_ref().unwrap();
    assert_eq!(paths.len(), 6);
    let want: BTreeSet<Vec<u8>> = files[..6].iter().map(|(n, _)| n.to_vec()).collect();
    assert_eq!(bytes_of(paths), want, "{paths:?}");
    for (p, &l) in paths.iter().zip(&train.labels) {
        let class = if p.starts_with("cat/") { 0 } else { 1 };
        assert_eq!(l, class, "{p}");
    }
    let unl = fs.unlabelled.as_ref().unwrap();
    assert_eq!(bytes_of(&unl.paths), BTreeSet::from([files[6].0.to_vec()]));

    let adapter = tmp.path().join("odd.hegraph");
    let o = run(
        tmp.path(),
        &[
            "train",
            features.to_str().unwrap(),
            "--epochs",
            "2",
            "-o",
            adapter.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", all_output(&o));

    let want_abs: BTreeSet<Vec<u8>> = files
        .iter()
        .map(|(n, _)| {
            root.join(OsStr::from_bytes(n))
                .as_os_str()
                .as_bytes()
                .to_vec()
        })
        .collect();
    let v = predict_json(tmp.path(), &adapter, std::slice::from_ref(&root));
    let got: Vec<String> = v["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got.len(), files.len());
    assert_eq!(bytes_of(&got), want_abs, "{got:?}");

    // The CSV form holds the same names, quoted where needed.
    let o = run(
        tmp.path(),
        &[
            "predict",
            "--adapter",
            adapter.to_str().unwrap(),
            "--test-checkpoint",
            "--format",
            "csv",
            root.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", all_output(&o));
    let mut r = csv::Reader::from_reader(o.stdout.as_slice());
    let got: Vec<String> = r.records().map(|rec| rec.unwrap()[0].to_string()).collect();
    assert_eq!(bytes_of(&got), want_abs, "{got:?}");
}

/// The lines of `text` that mention `name`.
fn lines_naming<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(name)).collect()
}

/// Issue 11 (8): `predict FOLDER` used to drop zero-byte files, FIFOs, dangling links and symlink loops
/// silently where `extract` named each; both now print the walker's and the decoder's report in the same
/// words.
#[cfg(unix)]
#[test]
fn predict_on_a_folder_reports_the_bad_entries_exactly_as_extract_does() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(tmp.path());
    let adapter = tmp.path().join("demo.hegraph");
    assert!(train_demo(tmp.path(), &demo, &adapter, &[])
        .status
        .success());

    let root = tmp.path().join("mixed");
    std::fs::create_dir_all(&root).unwrap();
    let photos = manifest().join("../shared/data/photos");
    std::fs::copy(photos.join("chelsea.png"), root.join("good.png")).unwrap();
    std::fs::write(root.join("zero.png"), b"").unwrap();
    let fifo = std::ffi::CString::new(root.join("fifo.png").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(root.join("missing.png"), root.join("dangling.png")).unwrap();
    std::os::unix::fs::symlink(root.join("self.png"), root.join("self.png")).unwrap();
    std::os::unix::fs::symlink(&root, root.join("loop")).unwrap();
    let jpeg = std::fs::read(photos.join("rocket.jpg")).unwrap();
    std::fs::write(root.join("half.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();

    let d = root.to_str().unwrap();
    let classes = demo.join("classes.txt");
    let extract = run(
        tmp.path(),
        &[
            "extract",
            d,
            "--classes",
            classes.to_str().unwrap(),
            "--test-checkpoint",
            "-o",
            tmp.path().join("mixed.safetensors").to_str().unwrap(),
        ],
    );
    assert!(extract.status.success());
    let predict = run(
        tmp.path(),
        &[
            "predict",
            "--adapter",
            adapter.to_str().unwrap(),
            "--test-checkpoint",
            d,
        ],
    );
    assert!(predict.status.success());
    let (from_extract, from_predict) = (all_output(&extract), all_output(&predict));
    for bad in [
        "zero.png",
        "fifo.png",
        "dangling.png",
        "self.png",
        "loop",
        "half.jpg",
    ] {
        let want = lines_naming(&from_extract, bad);
        assert!(!want.is_empty(), "extract names {bad}");
        assert_eq!(lines_naming(&from_predict, bad), want, "{bad}");
    }
    assert!(from_predict.contains("file(s) skipped"));
    let csv = stdout(&predict);
    assert_eq!(
        csv.lines().count(),
        2,
        "header and the one good image: {csv}"
    );
    assert!(csv.contains("good.png"));
}

/// Runs `hegraph` like [`run`] with `env`, and returns the child's peak resident memory in bytes
/// (`wait4`'s `ru_maxrss`, which counts this child alone, not the other tests' children).
#[cfg(target_os = "linux")]
fn peak_rss(home: &Path, args: &[&str], env: &[(&str, &str)]) -> u64 {
    let mut cmd = bin();
    cmd.args(args)
        .current_dir(home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HOME", home)
        .env_remove("HEGRAPH_MODEL_DIR")
        .env("HEGRAPH_BACKEND", "cpu")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Reaped by `wait4` below, which also returns its resource usage (`Child::wait` does not).
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("the hegraph binary runs");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "hegraph {args:?} {env:?} failed: {status}"
    );
    usage.ru_maxrss as u64 * 1024
}

/// Issue 11 (10): decoded pixels in flight are bounded process-wide, so `extract`'s peak memory does not grow
/// with the thread count. Four 4096² PNGs (48 MiB decoded each) under a 64 MiB budget are decoded one at a
/// time; with a budget that holds all four, the four threads hold them at once, which this test tells apart.
#[cfg(target_os = "linux")]
#[test]
fn extract_peak_memory_does_not_grow_with_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("big");
    std::fs::create_dir_all(&root).unwrap();
    let img = image::RgbImage::from_fn(4096, 4096, |x, y| {
        image::Rgb([
            (x / 512 * 30) as u8,
            (y / 512 * 30) as u8,
            ((x ^ y) / 1024) as u8,
        ])
    });
    for i in 0..4 {
        img.save(root.join(format!("big{i}.png"))).unwrap();
    }
    drop(img);
    let classes = tmp.path().join("classes.txt");
    std::fs::write(&classes, "a\nb\n").unwrap();
    let mib = 1u64 << 20;
    let measure = |threads: &str, budget_mib: &str| {
        let cache = tmp.path().join(format!("cache-{threads}-{budget_mib}"));
        let rss = peak_rss(
            tmp.path(),
            &[
                "extract",
                root.to_str().unwrap(),
                "--classes",
                classes.to_str().unwrap(),
                "--test-checkpoint",
                "--cache-dir",
                cache.to_str().unwrap(),
                "-o",
                tmp.path().join("big.safetensors").to_str().unwrap(),
            ],
            &[
                ("RAYON_NUM_THREADS", threads),
                ("HEGRAPH_DECODE_BUDGET_MIB", budget_mib),
            ],
        );
        println!(
            "{threads} thread(s), budget {budget_mib} MiB: peak RSS {} MiB",
            rss / mib
        );
        rss
    };
    // The first run writes the test checkpoint; only the runs after it are compared.
    measure("1", "4096");
    let one = measure("1", "64");
    let four = measure("4", "64");
    let unbounded = measure("4", "4096");
    assert!(
        four < one + 40 * mib,
        "4 threads {} MiB vs 1 thread {} MiB",
        four / mib,
        one / mib
    );
    assert!(
        unbounded > four + 96 * mib,
        "without a budget 4 threads hold 4 images: {} MiB vs {} MiB",
        unbounded / mib,
        four / mib
    );
}

/// Issue 11 (11): all-zero features make the training diverge. The message must not promise weights that were
/// "kept", the command fails, and no adapter file appears.
#[test]
fn training_on_all_zero_features_fails_without_claiming_or_writing_an_adapter() {
    use hegraph::features::{FeatureSet, LabelledSplit};
    use hegraph::linalg::Mat;
    let tmp = tempfile::tempdir().unwrap();
    let (c, d) = (2, 8);
    let text: Vec<f32> = (0..c * d).map(|i| ((i * 7 % 5) as f32) - 2.0).collect();
    let fs = FeatureSet {
        classes: vec!["a".into(), "b".into()],
        dim: d,
        text: Some(Mat::from_vec(c, d, text.clone())),
        text_neg: Some(Mat::from_vec(c, d, text.iter().map(|x| -x).collect())),
        train: Some(LabelledSplit::new(Mat::zeros(4, d), vec![0, 0, 1, 1])),
        ..Default::default()
    };
    let features = tmp.path().join("zeros.safetensors");
    fs.save(&features).unwrap();
    let out = tmp.path().join("zeros.hegraph");
    let o = run(
        tmp.path(),
        &[
            "train",
            features.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let text = all_output(&o);
    if o.status.success() {
        // A backend that survives zero features must then have written a loadable adapter.
        assert!(
            hegraph::adapter::TrainedAdapter::load(&out).is_ok(),
            "{text}"
        );
    } else {
        assert!(!out.exists(), "a failed training writes nothing: {text}");
        assert!(!text.contains("were kept"), "{text}");
    }
}

/// Issue 12: `search` ranks a flat folder (no classes) by a phrase through the cache, best first, and a
/// features file by a class name with the file's own text features; a phrase the file cannot match is refused
/// with a message naming the file.
#[test]
fn search_ranks_a_flat_folder_and_a_features_file() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(tmp.path());
    let images = demo.join("images");
    let count = std::fs::read_dir(&images).unwrap().count();
    let d = images.to_str().unwrap();
    let out = run(
        tmp.path(),
        &[
            "search",
            d,
            "a bird on a branch",
            "--test-checkpoint",
            "--top",
            "5",
        ],
    );
    assert!(out.status.success());
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 5, "--top 5");
    let scores: Vec<f32> = lines
        .iter()
        .map(|l| {
            let (score, path) = l.split_once('\t').unwrap();
            assert!(Path::new(path).is_file(), "{path}");
            score.parse().unwrap()
        })
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("TEST CHECKPOINT"), "{err}");
    assert!(err.contains(&format!("{count} images ranked")), "{err}");
    // Again: every image from the cache, the whole folder listed.
    let out = run(
        tmp.path(),
        &["search", d, "a bird on a branch", "--test-checkpoint"],
    );
    assert!(out.status.success());
    assert_eq!(stdout(&out).lines().count(), count);
    let again: Vec<String> = stdout(&out).lines().take(5).map(str::to_string).collect();
    assert_eq!(again, lines, "the same ranking");
    assert!(
        all_output(&out).contains("0 embedded now"),
        "{}",
        all_output(&out)
    );

    // A features file with real CLIP image and text features: the class name finds that class.
    let pets = manifest().join("../shared/data/features/oxford_pets25.safetensors");
    if !pets.is_file() {
        println!(
            "skipped the features-file part: {} is missing",
            pets.display()
        );
        return;
    }
    let p = pets.to_str().unwrap();
    let out = run(tmp.path(), &["search", p, "beagle", "--top", "10"]);
    assert!(out.status.success());
    let beagles = stdout(&out)
        .lines()
        .filter(|l| l.split('\t').nth(2) == Some("beagle"))
        .count();
    assert!(
        beagles >= 8,
        "real CLIP features: the top 10 for 'beagle' are beagles ({beagles})"
    );
    let out = run(tmp.path(), &["search", p, "a dog on a beach"]);
    assert!(!out.status.success());
    let err = all_output(&out);
    assert!(
        err.contains("oxford_pets25.safetensors") && err.contains("not one of its class names"),
        "{err}"
    );
}
