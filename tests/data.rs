//! Tests of `data` (image folders, class names, label CSVs) and `cache` (the on-disk feature cache), in temp
//! folders seeded with the real photos and real CLIP features of `../shared/data`.

use std::fs;
use std::path::{Path, PathBuf};

use hegraph::cache::{hash_bytes, hash_file, CacheError, CacheKey, FeatureCache};
use hegraph::data::{
    is_image_path, open_folder, parse_class_names, read_labels_csv, DataError, OpenOptions,
};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn photo(name: &str) -> PathBuf {
    shared().join("photos").join(name)
}

/// Copies a real photo to `dest` (creating folders), so tests work on real image files.
fn put(dest: &Path, photo_name: &str) {
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(photo(photo_name), dest).unwrap();
}

fn rels(ds: &hegraph::data::Dataset) -> Vec<(&str, Option<usize>)> {
    ds.images
        .iter()
        .map(|e| (e.rel.as_str(), e.label))
        .collect()
}

fn problem_for<'a>(ds: &'a hegraph::data::Dataset, path: &Path) -> Vec<&'a str> {
    ds.problems
        .iter()
        .filter(|p| p.path == path)
        .map(|p| p.message.as_str())
        .collect()
}

// ---------------------------------------------------------------- data: layouts

#[test]
fn layout_a_class_sub_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    put(&root.join("dog/b.png"), "horse.png");
    put(&root.join("cat/chelsea.png"), "chelsea.png");
    put(&root.join("cat/more/nested.JPG"), "china.jpg");
    put(&root.join("dog/a.jpg"), "flower.jpg");
    put(&root.join("loose.png"), "coins.png");
    fs::create_dir_all(root.join("empty")).unwrap();

    let ds = open_folder(root, &OpenOptions::default()).unwrap();
    assert_eq!(ds.root, fs::canonicalize(root).unwrap());
    // Classes are the sub-folders holding images, sorted; `empty` has none and is no class.
    assert_eq!(ds.classes, vec!["cat", "dog"]);
    assert_eq!(
        rels(&ds),
        vec![
            ("cat/chelsea.png", Some(0)),
            ("cat/more/nested.JPG", Some(0)),
            ("dog/a.jpg", Some(1)),
            ("dog/b.png", Some(1)),
            ("loose.png", None),
        ]
    );
    for e in &ds.images {
        assert!(e.path.is_absolute());
        assert_eq!(e.path, ds.root.join(&e.rel));
    }
    assert_eq!(ds.counts_per_class(), vec![2, 2]);
    let labelled: Vec<(usize, &str)> = ds.labelled().map(|(l, e)| (l, e.rel.as_str())).collect();
    assert_eq!(labelled.len(), 4);
    assert_eq!(labelled[0], (0, "cat/chelsea.png"));
    assert_eq!(ds.unlabelled().count(), 1);
    assert!(ds.problems.is_empty(), "{:?}", ds.problems);
}

#[test]
fn layout_b_csv_with_names_and_header() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("imgs");
    put(&root.join("x/1.png"), "chelsea.png");
    put(&root.join("x/2.png"), "coffee.png");
    put(&root.join("y/3.jpg"), "rocket.jpg");
    put(&root.join("4.png"), "horse.png");
    let classes = tmp.path().join("classes.txt");
    fs::write(&classes, "cat\ncoffee\nrocket\n").unwrap();
    let csv = tmp.path().join("labels.csv");
    let abs = fs::canonicalize(root.join("y/3.jpg")).unwrap();
    fs::write(
        &csv,
        format!(
            "path,label\nx/1.png,cat\n./x/2.png,COFFEE\n\"{}\",rocket\n",
            abs.display()
        ),
    )
    .unwrap();

    let ds = open_folder(
        &root,
        &OpenOptions {
            classes_file: Some(&classes),
            labels_csv: Some(&csv),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.classes, vec!["cat", "coffee", "rocket"]);
    assert_eq!(
        rels(&ds),
        vec![
            ("4.png", None),
            ("x/1.png", Some(0)),
            ("x/2.png", Some(1)),
            ("y/3.jpg", Some(2)),
        ]
    );
    assert_eq!(ds.counts_per_class(), vec![1, 1, 1]);
    // Sub-folders `x`, `y` are not class names: no folder labels, and no complaint about them either.
    assert!(ds.problems.is_empty(), "{:?}", ds.problems);
}

#[test]
fn layout_b_csv_with_indices_without_header() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    put(&root.join("a.png"), "chelsea.png");
    put(&root.join("b.png"), "moon.png");
    put(&root.join("c.png"), "brick.png");
    fs::write(root.join("labels.csv"), "a.png,1\nb.png,0\n").unwrap();
    let ds = open_folder(
        root,
        &OpenOptions {
            classes: Some(vec!["moon".into(), "cat".into()]),
            labels_csv: Some(&root.join("labels.csv")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        rels(&ds),
        vec![("a.png", Some(1)), ("b.png", Some(0)), ("c.png", None)]
    );
    // The CSV itself sits in the folder: it is reported as a non-image, nothing else.
    assert_eq!(ds.problems.len(), 1, "{:?}", ds.problems);
    assert!(ds.problems[0]
        .to_string()
        .ends_with("labels.csv: not an image file, skipped"));
}

#[test]
fn csv_problems_are_reported_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("imgs");
    put(&root.join("a.png"), "chelsea.png");
    put(&root.join("b.png"), "coins.png");
    put(&root.join("c.png"), "camera.png");
    put(&root.join("d.png"), "moon.png");
    let csv = tmp.path().join("labels.csv");
    fs::write(
        &csv,
        "a.png,cat\n\
         b.png,dgo\n\
         missing.png,cat\n\
         c.png,cat\n\
         c.png,dog\n\
         d.png,5\n\
         d.png,\n\
         a.png,0\n",
    )
    .unwrap();
    let classes = vec!["cat".to_string(), "dog".to_string()];

    let root_c = fs::canonicalize(&root).unwrap();
    let (map, problems) = read_labels_csv(&csv, &root_c, &classes).unwrap();
    // Only a.png survives: listed twice with the same label (name and index agree).
    assert_eq!(map.len(), 1);
    assert_eq!(map.get(&root_c.join("a.png")), Some(&0));
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(has("line 2: unknown class 'dgo'"), "{text:?}");
    assert!(has("line 3: file not found"), "{text:?}");
    assert!(
        has("line 5: 'c.png' is labelled 'dog' here but 'cat' on line 4"),
        "{text:?}"
    );
    assert!(has("line 6: class index 5 is out of range"), "{text:?}");
    assert!(has("line 7: no label"), "{text:?}");
    assert!(problems.iter().all(|p| p.path == csv));
    assert_eq!(problems.len(), 5, "{text:?}");

    // Through open_folder the same problems land in the dataset, and the conflicted image is unlabelled.
    let ds = open_folder(
        &root,
        &OpenOptions {
            classes: Some(classes),
            labels_csv: Some(&csv),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        rels(&ds),
        vec![
            ("a.png", Some(0)),
            ("b.png", None),
            ("c.png", None),
            ("d.png", None)
        ]
    );
    assert_eq!(ds.problems.len(), 5);
}

#[test]
fn csv_rows_naming_non_images_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("imgs");
    put(&root.join("a.png"), "chelsea.png");
    fs::write(root.join("notes.txt"), "hello").unwrap();
    let csv = tmp.path().join("labels.csv");
    fs::write(&csv, "notes.txt,cat\na.png,cat\n").unwrap();
    let ds = open_folder(
        &root,
        &OpenOptions {
            classes: Some(vec!["cat".into()]),
            labels_csv: Some(&csv),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rels(&ds), vec![("a.png", Some(0))]);
    let msgs = problem_for(&ds, &csv);
    assert_eq!(msgs.len(), 1, "{:?}", ds.problems);
    assert!(msgs[0].starts_with("line 1:") && msgs[0].contains("not among the images found"));
}

#[test]
fn given_names_label_matching_sub_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    put(&root.join("Cat/1.png"), "chelsea.png");
    put(&root.join("rocket/2.jpg"), "rocket.jpg");
    put(&root.join("misc/3.png"), "coins.png");
    let ds = open_folder(
        root,
        &OpenOptions {
            classes: Some(vec!["rocket".into(), "cat".into(), "horse".into()]),
            ..Default::default()
        },
    )
    .unwrap();
    // `Cat` matches `cat` ignoring case; `misc` matches nothing and is reported.
    assert_eq!(
        rels(&ds),
        vec![
            ("Cat/1.png", Some(1)),
            ("misc/3.png", None),
            ("rocket/2.jpg", Some(0))
        ]
    );
    assert_eq!(ds.counts_per_class(), vec![1, 1, 0]);
    let misc = problem_for(&ds, &ds.root.join("misc"));
    assert_eq!(misc.len(), 1);
    assert!(misc[0].contains("matches no class name"));
}

#[test]
fn flat_folder_without_class_names_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    put(&tmp.path().join("a.png"), "chelsea.png");
    let err = open_folder(tmp.path(), &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::NoClassFolders { .. }));
    assert!(err.to_string().contains("class-names file"), "{err}");
}

#[test]
fn max_images_keeps_an_even_spread() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for (i, class) in ["a", "b", "c"].iter().enumerate() {
        for j in 0..4 {
            put(&root.join(format!("{class}/{i}{j}.png")), "horse.png");
        }
    }
    let ds = open_folder(
        root,
        &OpenOptions {
            max_images: Some(6),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.images.len(), 6);
    assert_eq!(ds.counts_per_class(), vec![2, 2, 2]);
    assert!(ds.images.windows(2).all(|w| w[0].rel < w[1].rel));
    assert_eq!(ds.problems.len(), 1);
    assert!(ds.problems[0].message.contains("kept 6"));
}

// ---------------------------------------------------------------- data: class names

#[test]
fn class_names_edge_cases() {
    let text = "\u{feff}# my classes\r\n\r\ncat\r\n  dog \r\n\r\nbird\n# trailing comment\n\n\n";
    let parsed = parse_class_names(text, "classes.txt").unwrap();
    assert_eq!(parsed.names, vec!["cat", "dog", "bird"]);
    // Padded line 4 and the blank line 5 between names; leading and trailing blanks are not worth a word.
    assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
    assert!(parsed.warnings[0].starts_with("classes.txt: line 4: leading/trailing spaces"));
    assert!(parsed.warnings[1].starts_with("classes.txt: line 5: blank line"));
}

#[test]
fn duplicate_class_names_name_both_lines() {
    let err = parse_class_names("cat\ndog\n\n  Cat\n", "classes.txt").unwrap_err();
    match &err {
        DataError::DuplicateClass {
            first_line,
            second_line,
            ..
        } => assert_eq!((*first_line, *second_line), (1, 4)),
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("classes.txt") && msg.contains("line 4") && msg.contains("line 1"),
        "{msg}"
    );
}

#[test]
fn no_class_names_is_an_error() {
    for text in ["", "\n\n", "# only a comment\n   \n"] {
        let err = parse_class_names(text, "c.txt").unwrap_err();
        assert!(
            matches!(err, DataError::NoClasses { .. }),
            "{text:?}: {err:?}"
        );
        assert!(err.to_string().starts_with("c.txt:"));
    }
}

#[test]
fn class_file_warnings_become_problems_and_errors_propagate() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("imgs");
    put(&root.join("cat/1.png"), "chelsea.png");
    let classes = tmp.path().join("classes.txt");
    fs::write(&classes, "cat \ndog\n").unwrap();
    let ds = open_folder(
        &root,
        &OpenOptions {
            classes_file: Some(&classes),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.classes, vec!["cat", "dog"]);
    assert_eq!(rels(&ds), vec![("cat/1.png", Some(0))]);
    let msgs = problem_for(&ds, &classes);
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].starts_with("line 1: leading/trailing spaces"));

    fs::write(&classes, "cat\nCAT\n").unwrap();
    let err = open_folder(
        &root,
        &OpenOptions {
            classes_file: Some(&classes),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::DuplicateClass { .. }));

    let missing = tmp.path().join("nope.txt");
    let err = open_folder(
        &root,
        &OpenOptions {
            classes_file: Some(&missing),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope.txt"), "{err}");
}

// ---------------------------------------------------------------- data: walking

#[cfg(unix)]
#[test]
fn bad_files_are_each_named_in_problems() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    put(&root.join("cat/ok.png"), "chelsea.png");
    put(&root.join("dog/ok.jpg"), "flower.jpg");
    fs::write(root.join("cat/readme.txt"), "not a photo").unwrap();
    fs::write(root.join("cat/empty.png"), b"").unwrap();
    fs::write(root.join("dog/.hidden.png"), b"x").unwrap();
    fs::create_dir_all(root.join("dog/.thumbs")).unwrap();
    put(&root.join("dog/.thumbs/t.png"), "coins.png");
    symlink(root.join("dog"), root.join("dog/loop")).unwrap();
    symlink(root.join("nowhere.png"), root.join("cat/broken.png")).unwrap();
    // A link to a real photo is followed like the file itself.
    symlink(photo("moon.png"), root.join("cat/linked.png")).unwrap();

    let ds = open_folder(root, &OpenOptions::default()).unwrap();
    assert_eq!(
        rels(&ds),
        vec![
            ("cat/linked.png", Some(0)),
            ("cat/ok.png", Some(0)),
            ("dog/ok.jpg", Some(1)),
        ]
    );
    let r = &ds.root;
    let expect = [
        ("cat/readme.txt", "not an image file"),
        ("cat/empty.png", "empty file"),
        ("dog/.hidden.png", "hidden"),
        ("dog/.thumbs", "hidden"),
        ("dog/loop", "symbolic link loop"),
        ("cat/broken.png", "broken symbolic link"),
    ];
    for (rel, what) in expect {
        let msgs = problem_for(&ds, &r.join(rel));
        assert_eq!(msgs.len(), 1, "{rel}: {:?}", ds.problems);
        assert!(msgs[0].contains(what), "{rel}: {}", msgs[0]);
    }
    assert_eq!(ds.problems.len(), expect.len(), "{:?}", ds.problems);
    // Display is "<path>: <message>".
    let shown = ds
        .problems
        .iter()
        .find(|p| p.message.contains("empty"))
        .unwrap()
        .to_string();
    assert_eq!(
        shown,
        format!(
            "{}: empty file (0 bytes), skipped",
            r.join("cat/empty.png").display()
        )
    );
}

#[cfg(unix)]
#[test]
fn unreadable_folder_is_a_problem() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    put(&root.join("cat/ok.png"), "chelsea.png");
    put(&root.join("locked/x.png"), "coins.png");
    fs::set_permissions(root.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    // Root ignores permissions: nothing to test then.
    if fs::read_dir(root.join("locked")).is_ok() {
        fs::set_permissions(root.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!("skipped: running as a user who can read a 000 folder (root)");
        return;
    }
    let ds = open_folder(root, &OpenOptions::default());
    fs::set_permissions(root.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    let ds = ds.unwrap();
    assert_eq!(rels(&ds), vec![("cat/ok.png", Some(0))]);
    let msgs = problem_for(&ds, &ds.root.join("locked"));
    assert!(
        msgs.iter().any(|m| m.contains("cannot read folder")),
        "{:?}",
        ds.problems
    );
}

#[test]
fn empty_folder_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = open_folder(tmp.path(), &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::NoImages { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("no images found") && msg.contains("png"),
        "{msg}"
    );

    // Only non-images (and an empty image) is just as empty.
    fs::write(tmp.path().join("a.txt"), "x").unwrap();
    fs::write(tmp.path().join("b.png"), b"").unwrap();
    assert!(matches!(
        open_folder(tmp.path(), &OpenOptions::default()),
        Err(DataError::NoImages { .. })
    ));

    let missing = tmp.path().join("missing");
    let err = open_folder(&missing, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::RootNotFound { .. }));
    assert!(err.to_string().contains("missing"));

    let err = open_folder(&tmp.path().join("a.txt"), &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::NotAFolder { .. }));
}

#[test]
fn image_extensions() {
    for p in [
        "a.png", "a.JPG", "x/y.jpeg", "a.Gif", "a.bmp", "a.tif", "a.TIFF", "a.webp",
    ] {
        assert!(is_image_path(Path::new(p)), "{p}");
    }
    for p in ["a.txt", "png", "a.png.bak", "a", ".png", "a.svg"] {
        assert!(!is_image_path(Path::new(p)), "{p}");
    }
}

// ---------------------------------------------------------------- cache

/// Real CLIP ViT-B/32 features (f16 in the file) as f32 rows.
fn real_features(rows: usize) -> (usize, Vec<Vec<f32>>) {
    let bytes = fs::read(shared().join("features/oxford_pets25.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("shots16.features").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F16);
    let dim = t.shape()[1];
    let all: Vec<f32> = t
        .data()
        .chunks_exact(2)
        .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let rows = all
        .chunks_exact(dim)
        .take(rows)
        .map(<[f32]>::to_vec)
        .collect();
    (dim, rows)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 => panic!("non-finite f16 in test data"),
        e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

fn key(i: usize, view: u32) -> CacheKey {
    CacheKey {
        content: hash_bytes(format!("image {i}").as_bytes()),
        view,
    }
}

fn shard_files(cache: &FeatureCache) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

const NS: &str = "openai/clip-vit-base-patch32 preprocess-v1";

#[test]
fn round_trip_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (dim, feats) = real_features(40);
    let (mut cache, warnings) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    assert!(warnings.is_empty() && cache.is_empty());
    // Two batches (two shards), views 0 and 3.
    let batch = |range: std::ops::Range<usize>, view: u32| {
        range
            .map(|i| (key(i, view), feats[i].clone()))
            .collect::<Vec<_>>()
    };
    cache.insert_batch(batch(0..25, 0)).unwrap();
    cache.insert_batch(batch(20..40, 3)).unwrap();
    assert_eq!(cache.len(), 45);
    assert_eq!(cache.get(&key(7, 0)), Some(feats[7].as_slice()));
    assert_eq!(shard_files(&cache).len(), 2);
    // Re-inserting cached keys writes nothing.
    cache.insert_batch(batch(0..10, 0)).unwrap();
    assert_eq!(shard_files(&cache).len(), 2);

    drop(cache);
    let (cache, warnings) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cache.len(), 45);
    for (i, f) in feats.iter().enumerate().take(25) {
        assert_eq!(cache.get(&key(i, 0)).unwrap(), f.as_slice(), "row {i}");
    }
    for (i, f) in feats.iter().enumerate().skip(20) {
        assert_eq!(cache.get(&key(i, 3)).unwrap(), f.as_slice(), "row {i}");
    }
    assert!(!cache.contains(&key(30, 0)));
    assert!(cache.get(&key(0, 1)).is_none());

    // Another namespace (another model) shares nothing.
    let (other, _) = FeatureCache::open(tmp.path(), "another-model", dim).unwrap();
    assert!(other.is_empty());
}

#[test]
fn changed_file_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("cat.png");
    fs::copy(photo("chelsea.png"), &img).unwrap();
    let h1 = hash_file(&img).unwrap();
    assert_eq!(h1, hash_bytes(&fs::read(&img).unwrap()));
    // Renaming keeps the key.
    let moved = tmp.path().join("renamed.png");
    fs::rename(&img, &moved).unwrap();
    assert_eq!(hash_file(&moved).unwrap(), h1);

    let (mut cache, _) = FeatureCache::open(&tmp.path().join("cache"), NS, 4).unwrap();
    cache
        .insert_batch(vec![(
            CacheKey {
                content: h1,
                view: 0,
            },
            vec![1.0, 2.0, 3.0, 4.0],
        )])
        .unwrap();

    // Edit one byte (photo editors rewrite files in place all the time).
    let mut bytes = fs::read(&moved).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&moved, &bytes).unwrap();
    let h2 = hash_file(&moved).unwrap();
    assert_ne!(h1, h2);
    assert!(cache
        .get(&CacheKey {
            content: h2,
            view: 0
        })
        .is_none());
    assert!(cache.contains(&CacheKey {
        content: h1,
        view: 0
    }));

    let gone = hash_file(&tmp.path().join("gone.png"));
    // A missing image is a problem with the image, and says so (it used to read "feature cache: …").
    assert!(
        gone.as_ref()
            .is_err_and(|e| e.to_string().starts_with("cannot read the image")),
        "{gone:?}"
    );
    assert!(matches!(gone, Err(CacheError::Image { .. })));
}

/// Writes two shards (a: keys 0..10, b: keys 10..20), damages the first written one with `damage`, and checks
/// the re-open reports it, drops exactly its entries, deletes it, and that the cache heals on re-insert.
fn check_corruption(name: &str, damage: impl Fn(&Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let (dim, feats) = real_features(20);
    let (mut cache, _) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    cache
        .insert_batch((0..10).map(|i| (key(i, 0), feats[i].clone())).collect())
        .unwrap();
    let victim = shard_files(&cache)[0].clone();
    cache
        .insert_batch((10..20).map(|i| (key(i, 0), feats[i].clone())).collect())
        .unwrap();
    drop(cache);

    damage(&victim);
    let (mut cache, warnings) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    assert_eq!(warnings.len(), 1, "{name}: {warnings:?}");
    let file_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(warnings[0].contains(&file_name), "{name}: {}", warnings[0]);
    assert!(
        warnings[0].contains("recomputed"),
        "{name}: {}",
        warnings[0]
    );
    assert!(!victim.exists(), "{name}: the damaged shard is deleted");
    for i in 0..10 {
        assert!(
            cache.get(&key(i, 0)).is_none(),
            "{name}: damaged entry {i} trusted"
        );
    }
    for (i, f) in feats.iter().enumerate().skip(10) {
        assert_eq!(cache.get(&key(i, 0)).unwrap(), f.as_slice(), "{name}");
    }
    // Recompute the missing ones: the cache is whole again and opens cleanly.
    cache
        .insert_batch((0..10).map(|i| (key(i, 0), feats[i].clone())).collect())
        .unwrap();
    drop(cache);
    let (cache, warnings) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    assert!(warnings.is_empty(), "{name}: {warnings:?}");
    assert_eq!(cache.len(), 20, "{name}");
}

#[test]
fn corrupt_shard_flipped_feature_bytes() {
    check_corruption("flip data", |p| {
        let mut b = fs::read(p).unwrap();
        let n = b.len();
        b[n - 7] ^= 0x40;
        b[n - 1000] ^= 0x01;
        fs::write(p, b).unwrap();
    });
}

#[test]
fn corrupt_shard_flipped_key_digit() {
    // A flipped hex digit in the header still parses as JSON and as a key: only the checksum catches it.
    check_corruption("flip key", |p| {
        let mut b = fs::read(p).unwrap();
        let text = String::from_utf8_lossy(&b).into_owned();
        let at = text.find("\"keys\":\"").unwrap() + 8;
        b[at] = if b[at] == b'a' { b'b' } else { b'a' };
        fs::write(p, b).unwrap();
    });
}

#[test]
fn corrupt_shard_truncated() {
    check_corruption("truncate", |p| {
        let len = fs::metadata(p).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn corrupt_shard_garbage_header() {
    check_corruption("garbage header", |p| {
        let mut b = fs::read(p).unwrap();
        for (i, x) in b.iter_mut().take(64).enumerate() {
            *x = (i * 37 % 251) as u8;
        }
        fs::write(p, b).unwrap();
    });
}

#[test]
fn corrupt_shard_empty_file() {
    check_corruption("empty file", |p| fs::write(p, b"").unwrap());
}

#[test]
fn wrong_dim_shards_are_reported_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut cache, _) = FeatureCache::open(tmp.path(), NS, 3).unwrap();
    cache
        .insert_batch(vec![(key(1, 0), vec![0.5, 0.25, -1.0])])
        .unwrap();
    let files = shard_files(&cache);
    drop(cache);
    let (cache, warnings) = FeatureCache::open(tmp.path(), NS, 4).unwrap();
    assert!(cache.is_empty());
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("3-dimensional"), "{}", warnings[0]);
    assert_eq!(shard_files(&cache), files);
}

#[test]
fn bad_inserts_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut cache, _) = FeatureCache::open(tmp.path(), NS, 2).unwrap();
    let err = cache
        .insert_batch(vec![(key(1, 0), vec![1.0, 2.0]), (key(2, 0), vec![1.0])])
        .unwrap_err();
    assert!(matches!(
        err,
        CacheError::WrongDim {
            expected: 2,
            got: 1
        }
    ));
    let err = cache
        .insert_batch(vec![(key(1, 0), vec![f32::NAN, 2.0])])
        .unwrap_err();
    assert!(matches!(err, CacheError::NonFinite));
    assert!(cache.is_empty());
    assert!(shard_files(&cache).is_empty());
    cache.insert_batch(Vec::new()).unwrap();
    assert!(shard_files(&cache).is_empty());
    assert!(matches!(
        FeatureCache::open(tmp.path(), " ", 2),
        Err(CacheError::EmptyNamespace)
    ));
    assert!(matches!(
        FeatureCache::open(tmp.path(), NS, 0),
        Err(CacheError::ZeroDim)
    ));
}

#[test]
fn two_writers_keep_each_others_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 16;
    let feature = move |i: usize, w: usize| -> Vec<f32> {
        (0..dim).map(|d| (i * 100 + d + w * 7) as f32).collect()
    };
    let (mut a, _) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    let (mut b, _) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    a.insert_batch((0..5).map(|i| (key(i, 0), feature(i, 0))).collect())
        .unwrap();
    b.insert_batch((5..9).map(|i| (key(i, 0), feature(i, 0))).collect())
        .unwrap();
    // b has not seen a's shard until it refreshes.
    assert!(!b.contains(&key(0, 0)));
    assert!(b.refresh().unwrap().is_empty());
    assert_eq!(b.get(&key(0, 0)), Some(feature(0, 0).as_slice()));

    // Many batches from two threads at once (as two processes would), then one reader sees all.
    let dir = tmp.path().to_path_buf();
    let handles: Vec<_> = (0..2)
        .map(|w| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let (mut c, _) = FeatureCache::open(&dir, NS, dim).unwrap();
                for batch in 0..20 {
                    let entries = (0..10)
                        .map(|j| {
                            let i = 1000 + w * 1000 + batch * 10 + j;
                            (key(i, 1), feature(i, w))
                        })
                        .collect();
                    c.insert_batch(entries).unwrap();
                }
                if w == 0 {
                    c.compact().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let (c, warnings) = FeatureCache::open(&dir, NS, dim).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(c.len(), 9 + 2 * 20 * 10);
    for w in 0..2 {
        for n in 0..200 {
            let i = 1000 + w * 1000 + n;
            assert_eq!(
                c.get(&key(i, 1)),
                Some(feature(i, w).as_slice()),
                "writer {w} row {n}"
            );
        }
    }
    // No temporary files left behind.
    let leftovers = fs::read_dir(c.dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn compact_merges_small_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (dim, feats) = real_features(60);
    let (mut cache, _) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    for chunk in 0..6 {
        let entries = (chunk * 10..chunk * 10 + 10)
            .map(|i| (key(i, 0), feats[i].clone()))
            .collect();
        cache.insert_batch(entries).unwrap();
    }
    assert_eq!(shard_files(&cache).len(), 6);
    cache.compact().unwrap();
    assert_eq!(shard_files(&cache).len(), 1);
    assert_eq!(cache.shard_count(), 1);
    assert_eq!(cache.len(), 60);
    // Compacting a compact cache changes nothing.
    cache.compact().unwrap();
    assert_eq!(shard_files(&cache).len(), 1);
    drop(cache);
    let (cache, warnings) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    assert!(warnings.is_empty());
    for (i, f) in feats.iter().enumerate() {
        assert_eq!(cache.get(&key(i, 0)).unwrap(), f.as_slice());
    }
}

/// 10,000 images × 11 views, inserted as an extraction run would (32 images a batch): after `compact` a
/// handful of files (not one per feature, not one per batch), and every key is back after a re-open.
#[test]
fn ten_thousand_images_eleven_views() {
    let tmp = tempfile::tempdir().unwrap();
    let dim = 4;
    let feature = |i: usize, view: u32| vec![i as f32, view as f32, -(i as f32), 0.5];
    let (mut cache, _) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    let images: Vec<usize> = (0..10_000).collect();
    for batch in images.chunks(32) {
        let entries = batch
            .iter()
            .flat_map(|&i| (0..11u32).map(move |view| (key(i, view), feature(i, view))))
            .collect();
        cache.insert_batch(entries).unwrap();
    }
    assert_eq!(cache.shard_count(), 313);
    cache.compact().unwrap();
    // 110,000 rows in shards of at most MAX_SHARD_ROWS = 32,768.
    assert_eq!(shard_files(&cache).len(), 4);
    drop(cache);
    let (cache, warnings) = FeatureCache::open(tmp.path(), NS, dim).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cache.len(), 110_000);
    for i in 0..10_000 {
        for view in 0..11u32 {
            assert_eq!(cache.get(&key(i, view)), Some(feature(i, view).as_slice()));
        }
    }
}

#[test]
fn default_dir_is_under_the_user_cache() {
    if let Some(d) = FeatureCache::default_dir() {
        assert!(d.ends_with("hegraph/features"));
    } else {
        eprintln!("skipped: this system has no user cache folder");
    }
}

// ---------------------------------------------------------------- labels CSV: headers, quotes, stored names

/// `read_labels_csv` of `text` (written to a CSV beside `root`) with the classes cat, dog; the problems as text.
fn read_csv_text(
    tmp: &Path,
    root: &Path,
    text: &[u8],
) -> (std::collections::HashMap<PathBuf, usize>, Vec<String>) {
    let csv = tmp.join("labels.csv");
    fs::write(&csv, text).unwrap();
    let classes = vec!["cat".to_string(), "dog".to_string()];
    let (map, problems) = read_labels_csv(&csv, root, &classes).unwrap();
    assert!(problems.iter().all(|p| p.path == csv));
    (map, problems.iter().map(|p| p.message.clone()).collect())
}

#[test]
fn csv_first_row_is_a_header_only_by_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(tmp.path()).unwrap().join("imgs");
    put(&root.join("a.png"), "chelsea.png");
    put(&root.join("b.png"), "coins.png");

    // A typo'd first data row (no such file, no such class) is a bad row, not a header.
    let (map, msgs) = read_csv_text(tmp.path(), &root, b"aa.png,kat\nb.png,dog\n");
    assert_eq!(map.len(), 1);
    assert_eq!(map.get(&root.join("b.png")), Some(&1));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with("line 1: unknown class 'kat'"),
        "{msgs:?}"
    );

    // Header words in any case are a header, skipped silently.
    let (map, msgs) = read_csv_text(tmp.path(), &root, b"Image,CLASS\na.png,cat\nb.png,dog\n");
    assert_eq!(map.len(), 2);
    assert!(msgs.is_empty(), "{msgs:?}");

    // A path word with something that is no label word is data: its row is dropped and named.
    let (map, msgs) = read_csv_text(tmp.path(), &root, b"file,species\na.png,cat\n");
    assert_eq!(map.len(), 1);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0].starts_with("line 1:"), "{msgs:?}");

    // A header word later in the file is just a bad row.
    let (_, msgs) = read_csv_text(tmp.path(), &root, b"a.png,cat\npath,label\n");
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0].starts_with("line 2:"), "{msgs:?}");
}

#[test]
fn csv_unterminated_quote_and_empty_rows_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(tmp.path()).unwrap().join("imgs");
    for f in ["a.png", "b.png", "c.png", "d.png", "e.png"] {
        put(&root.join(f), "chelsea.png");
    }
    // The quote opened on line 2 swallows lines 3 and 4 up to the quote on line 4.
    let (map, msgs) = read_csv_text(
        tmp.path(),
        &root,
        b"a.png,cat\n\"b.png,dog\nc.png,cat\nd.png\",dog\n,\ne.png,dog\n",
    );
    let mut got: Vec<&PathBuf> = map.keys().collect();
    got.sort();
    assert_eq!(got, vec![&root.join("a.png"), &root.join("e.png")]);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].starts_with("line 2: a quote opened on this line")
            && msgs[0].contains("lines 2 to 4"),
        "{msgs:?}"
    );
    assert!(msgs[1].starts_with("line 5: empty row"), "{msgs:?}");

    // Never closed: it runs to the end of the file.
    let (map, msgs) = read_csv_text(tmp.path(), &root, b"a.png,cat\nb.png,\"dog\nc.png,cat\n");
    assert_eq!(map.len(), 1);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with("line 2: a quote opened") && msgs[0].contains("line 3"),
        "{msgs:?}"
    );
}

/// A quoted field may hold a file name's line break, and a CSV this program wrote names non-UTF-8 files in the
/// stored `\xNN` form: both label the right file, and the two names that differ only in a non-UTF-8 byte stay
/// two files.
#[cfg(unix)]
#[test]
fn csv_paths_with_line_breaks_and_stored_non_utf8_bytes_label_the_exact_file() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(tmp.path()).unwrap().join("imgs");
    let nl = root.join("new\nline.png");
    let e9 = root.join(OsStr::from_bytes(b"x\xe9.png"));
    let e8 = root.join(OsStr::from_bytes(b"x\xe8.png"));
    let raw = root.join(OsStr::from_bytes(b"y\xe9.png"));
    for p in [&nl, &e9, &e8, &raw] {
        put(p, "chelsea.png");
    }
    // The last row names a file by its raw (Latin-1) bytes, as `ls > labels.csv` would.
    let (map, msgs) = read_csv_text(
        tmp.path(),
        &root,
        b"path,label\n\"new\nline.png\",dog\nx\\xE9.png,cat\nx\\xE8.png,dog\ny\xe9.png,cat\n",
    );
    assert!(msgs.is_empty(), "{msgs:?}");
    assert_eq!(map.get(&nl), Some(&1));
    assert_eq!(map.get(&e9), Some(&0));
    assert_eq!(map.get(&e8), Some(&1));
    assert_eq!(map.get(&raw), Some(&0));
    assert_eq!(map.len(), 4);
}

// ---------------------------------------------------------------- features file: paths and versions

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A features file written by hand with `meta`: 2 labelled rows, 1 unlabelled row, D = 2.
fn write_raw_features(path: &Path, meta: &[(&str, &str)]) {
    use safetensors::{tensor::TensorView, Dtype};
    let train = f32_bytes(&[1.0, 0.0, 0.0, 1.0]);
    let labels: Vec<u8> = [0i64, 1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let unl = f32_bytes(&[0.6, 0.8]);
    let tensors = vec![
        (
            "train.features",
            TensorView::new(Dtype::F32, vec![2, 2], &train).unwrap(),
        ),
        (
            "train.labels",
            TensorView::new(Dtype::I64, vec![2], &labels).unwrap(),
        ),
        (
            "unlabelled.features",
            TensorView::new(Dtype::F32, vec![1, 2], &unl).unwrap(),
        ),
    ];
    let meta = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    fs::write(path, safetensors::serialize(tensors, Some(meta)).unwrap()).unwrap();
}

#[test]
fn version_1_features_files_still_load_and_are_rewritten_as_version_2() {
    use hegraph::features::FeatureSet;
    use hegraph::stored_path::display;
    let tmp = tempfile::tempdir().unwrap();
    let v1 = tmp.path().join("v1.safetensors");
    write_raw_features(
        &v1,
        &[
            ("format", "hegraph-features"),
            ("version", "1"),
            ("classes", "cat\ndog"),
            ("templates", "a photo of a {}.\nart of the {}."),
            ("paths.train", "cat/a.png\ndog/b\\c.png"),
            ("paths.unlabelled", "u.png"),
        ],
    );
    let fs1 = FeatureSet::load(&v1).unwrap();
    assert_eq!(fs1.classes, vec!["cat", "dog"]);
    assert_eq!(fs1.templates, vec!["a photo of a {}.", "art of the {}."]);
    let paths = fs1.train.as_ref().unwrap().paths.clone().unwrap();
    // Version 1 kept names literally: the backslash is a character of the name.
    assert_eq!(paths, vec!["cat/a.png", "dog/b\\x5Cc.png"]);
    assert_eq!(display(&paths[1]), "dog/b\\c.png");
    assert_eq!(fs1.unlabelled.as_ref().unwrap().paths, vec!["u.png"]);

    // Saved again, it is version 2 with JSON arrays, and reads back the same.
    let v2 = tmp.path().join("v2.safetensors");
    fs1.save(&v2).unwrap();
    let bytes = fs::read(&v2).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["version"], "2");
    let stored: Vec<String> = serde_json::from_str(&meta["paths.train"]).unwrap();
    assert_eq!(stored, paths);
    let classes: Vec<String> = serde_json::from_str(&meta["classes"]).unwrap();
    assert_eq!(classes, vec!["cat", "dog"]);
    assert_eq!(FeatureSet::load(&v2).unwrap(), fs1);
}

#[test]
fn a_path_list_that_does_not_fit_the_rows_names_the_split_and_the_path() {
    use hegraph::features::FeatureSet;
    let tmp = tempfile::tempdir().unwrap();
    // What version 1 made of `cat/new\nline.png`: two "paths" for one row.
    let p = tmp.path().join("split.safetensors");
    write_raw_features(
        &p,
        &[
            ("format", "hegraph-features"),
            ("version", "1"),
            ("classes", "cat\ndog"),
            ("paths.train", "cat/new\nline.png\ndog/b.png"),
        ],
    );
    let e = FeatureSet::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("paths.train") && e.contains("3 paths for 2 rows") && e.contains("'cat/new'"),
        "{e}"
    );

    // Too few paths: the rows without one are named, with the last path listed.
    write_raw_features(
        &p,
        &[
            ("format", "hegraph-features"),
            ("version", "2"),
            ("classes", r#"["cat","dog"]"#),
            ("paths.unlabelled", r#"[]"#),
            ("paths.train", r#"["cat/a.png"]"#),
        ],
    );
    let e = FeatureSet::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("paths.train")
            && e.contains("rows 2 to 2 have no path")
            && e.contains("cat/a.png"),
        "{e}"
    );

    // Version 2 metadata that is not a JSON array is named.
    write_raw_features(
        &p,
        &[
            ("format", "hegraph-features"),
            ("version", "2"),
            ("paths.train", "cat/a.png\ndog/b.png"),
        ],
    );
    let e = FeatureSet::load(&p).unwrap_err().to_string();
    assert!(e.contains("paths.train") && e.contains("JSON array"), "{e}");
}

/// Every legal name survives a save and a load byte for byte, class names with a line break included.
#[cfg(unix)]
#[test]
fn features_file_paths_round_trip_any_file_name() {
    use hegraph::features::{FeatureSet, LabelledSplit, UnlabelledSplit};
    use hegraph::linalg::Mat;
    use hegraph::stored_path::{os_from_stored, os_to_stored};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let names: Vec<&[u8]> = vec![
        b"cat/new\nline.png",
        b"cat/tab\there.png",
        b"new\nclass/\"quoted\" 'name'.png",
        b"new\nclass/x\xe9.png",
        b"new\nclass/x\xe8.png",
        b"new\nclass/back\\slash \\xE9.png",
    ];
    let stored: Vec<String> = names
        .iter()
        .map(|n| os_to_stored(OsStr::from_bytes(n)))
        .collect();
    let n = names.len();
    let feats = Mat::from_vec(n, 2, (0..n).flat_map(|i| [1.0, i as f32]).collect());
    let mut train = LabelledSplit::new(feats.clone(), vec![0, 0, 1, 1, 1, 1]);
    train.paths = Some(stored.clone());
    let fs1 = FeatureSet {
        classes: vec!["cat".into(), "new\nclass".into()],
        dim: 2,
        templates: vec!["a photo\nof a {}.".into()],
        train: Some(train),
        unlabelled: Some(UnlabelledSplit {
            features: feats,
            paths: stored.iter().rev().cloned().collect(),
        }),
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f.safetensors");
    fs1.save(&p).unwrap();
    let back = FeatureSet::load(&p).unwrap();
    assert_eq!(back, fs1);
    let got: Vec<Vec<u8>> = back
        .train
        .unwrap()
        .paths
        .unwrap()
        .iter()
        .map(|s| os_from_stored(s).as_bytes().to_vec())
        .collect();
    let want: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
    assert_eq!(got, want);
    assert_ne!(got[3], got[4], "the two non-UTF-8 names stay distinct");
}
