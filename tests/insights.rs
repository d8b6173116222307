//! The map and the cross-validation on real CLIP ViT-B/32 features (`../shared/data/features`, see its
//! README): the PCA map of 10,000 images is timed (printed, never asserted) and checked against the variance
//! along other directions; the t-SNE map keeps neighbourhoods (same-breed neighbours) better than PCA, is the
//! same on every run, is cached on disk and timed at 10,000 images; flipped labels among real features come
//! out on top of the likely mistakes.

use std::path::PathBuf;
use std::time::Instant;

use hegraph::embedding_map::{cached_tsne_map, pca_map, tsne_map, LayoutCache, Map2d, TsneParams};
use hegraph::features::FeatureSet;
use hegraph::linalg::{normalize, Mat};
use hegraph::progress::{CancelToken, NoProgress};
use hegraph::review::{cross_validate, CvOptions};

fn shared(name: &str) -> Option<FeatureSet> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/features")
        .join(name);
    if !p.is_file() {
        println!("skipped: {} is not there", p.display());
        return None;
    }
    Some(FeatureSet::load(&p).unwrap())
}

/// `rows` rows of `m`, repeated in order.
fn tiled(m: &Mat, rows: usize) -> Mat {
    let mut out = Mat::zeros(rows, m.cols);
    for r in 0..rows {
        out.row_mut(r).copy_from_slice(m.row(r % m.rows));
    }
    out
}

fn variance_along(m: &Mat, dir: &[f32]) -> f64 {
    let proj: Vec<f64> = (0..m.rows)
        .map(|r| m.row(r).iter().zip(dir).map(|(a, b)| (a * b) as f64).sum())
        .collect();
    let mean = proj.iter().sum::<f64>() / proj.len() as f64;
    proj.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / proj.len() as f64
}

/// caltech101's real test and val features (`both`), tiled to 10,000 rows (`z`), for the timings.
fn caltech_10000() -> Option<(FeatureSet, Mat, Mat)> {
    let fs = shared("caltech101.safetensors")?;
    let test = fs.test.as_ref().unwrap();
    let val = fs.val.as_ref().unwrap();
    let mut rows: Vec<Vec<f32>> = (0..test.features.rows)
        .map(|r| test.features.row(r).to_vec())
        .collect();
    rows.extend((0..val.features.rows).map(|r| val.features.row(r).to_vec()));
    let both = Mat::from_rows(&rows, fs.dim);
    let z = tiled(&both, 10_000);
    Some((fs, both, z))
}

#[test]
fn the_pca_map_of_10000_real_features_is_timed_and_its_first_axis_has_the_most_variance() {
    let Some((fs, both, z)) = caltech_10000() else {
        return;
    };
    // Warm the thread pool once, then time the map as the app computes it.
    let _ = pca_map(&tiled(&both, 100), None).unwrap();
    let t = Instant::now();
    let map = pca_map(&z, fs.text.as_ref()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let explained = map.explained().unwrap();
    println!(
        "PCA map of {} real CLIP features ({}-d): {:.1} ms; axes explain {:.1} % and {:.1} %",
        z.rows,
        z.cols,
        secs * 1000.0,
        explained[0] * 100.0,
        explained[1] * 100.0
    );
    assert_eq!(map.points.len(), 10_000);
    assert!(explained[0] >= explained[1] && explained[1] > 0.0);
    // The variance of the points along the first axis equals the largest along any direction: more than
    // along each of the coordinate axes and along the mean direction.
    let var0: f64 = {
        let xs: Vec<f64> = map.points.iter().map(|p| p[0] as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64
    };
    let var1: f64 = {
        let ys: Vec<f64> = map.points.iter().map(|p| p[1] as f64).collect();
        let mean = ys.iter().sum::<f64>() / ys.len() as f64;
        ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / ys.len() as f64
    };
    assert!(var0 >= var1);
    for k in 0..z.cols {
        let mut e = vec![0.0f32; z.cols];
        e[k] = 1.0;
        assert!(variance_along(&z, &e) <= var0 * 1.0001, "axis {k}");
    }
    let mut mean_dir: Vec<f32> = (0..z.cols)
        .map(|k| (0..z.rows).map(|r| z.get(r, k)).sum::<f32>())
        .collect();
    normalize(&mut mean_dir);
    assert!(variance_along(&z, &mean_dir) <= var0 * 1.0001);
}

/// The `k` points of the map nearest to `at` (in no particular order), leaving out point `skip`.
fn nearest_on_map(points: &[[f32; 2]], at: [f32; 2], skip: Option<usize>, k: usize) -> Vec<usize> {
    let mut d: Vec<(f32, usize)> = points
        .iter()
        .enumerate()
        .filter(|&(j, _)| Some(j) != skip)
        .map(|(j, p)| ((p[0] - at[0]).powi(2) + (p[1] - at[1]).powi(2), j))
        .collect();
    d.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
    d[..k].iter().map(|&(_, j)| j).collect()
}

/// The share of each image's `k` nearest images on the map (2-D Euclidean) that have its label, averaged.
fn neighbour_label_agreement(points: &[[f32; 2]], labels: &[usize], k: usize) -> f64 {
    let n = points.len();
    let mut agree = 0usize;
    for i in 0..n {
        let near = nearest_on_map(points, points[i], Some(i), k);
        agree += near.iter().filter(|&&j| labels[j] == labels[i]).count();
    }
    agree as f64 / (n * k) as f64
}

/// Trustworthiness (Venna & Kaski 2001) at `k`: 1 when every image's `k` nearest on the map are among its `k`
/// nearest in the features (cosine), lower the further the map's intruders rank there.
fn trustworthiness(features: &Mat, points: &[[f32; 2]], k: usize) -> f64 {
    let n = points.len();
    let z = features.normalized_rows();
    let sims = z.matmul_t(&z);
    let mut penalty = 0.0f64;
    for i in 0..n {
        // Rank of every image among i's neighbours in the features (1 = nearest).
        let mut order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        order.sort_by(|&a, &b| sims.get(i, b).total_cmp(&sims.get(i, a)));
        let mut rank = vec![0usize; n];
        for (r, &j) in order.iter().enumerate() {
            rank[j] = r + 1;
        }
        penalty += nearest_on_map(points, points[i], Some(i), k)
            .iter()
            .map(|&j| rank[j].saturating_sub(k) as f64)
            .sum::<f64>();
    }
    let nk = (n * k) as f64;
    1.0 - 2.0 / (nk * (2.0 * n as f64 - 3.0 * k as f64 - 1.0)) * penalty
}

/// The class whose text node's `k` nearest images on the map are mostly of that class.
fn text_nodes_among_their_class(map: &Map2d, labels: &[usize], k: usize) -> usize {
    map.text
        .iter()
        .enumerate()
        .filter(|(c, t)| {
            let near = nearest_on_map(&map.points, **t, None, k);
            near.iter().filter(|&&j| labels[j] == *c).count() * 2 > k
        })
        .count()
}

#[test]
fn the_tsne_map_of_real_features_keeps_neighbourhoods_better_than_pca_and_is_the_same_every_time() {
    let Some(fs) = shared("oxford_pets25.safetensors") else {
        return;
    };
    let test = fs.test.as_ref().unwrap();
    let (z, labels) = (&test.features, &test.labels);
    let text = fs.text.as_ref();
    let pca = pca_map(z, text).unwrap();
    let t = Instant::now();
    let tsne = tsne_map(
        z,
        text,
        &TsneParams::default(),
        &NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    println!(
        "t-SNE map of {} real CLIP features: {:.2} s",
        z.rows,
        t.elapsed().as_secs_f64()
    );
    let k = 10;
    let (agree_pca, agree_tsne) = (
        neighbour_label_agreement(&pca.points, labels, k),
        neighbour_label_agreement(&tsne.points, labels, k),
    );
    let (trust_pca, trust_tsne) = (
        trustworthiness(z, &pca.points, k),
        trustworthiness(z, &tsne.points, k),
    );
    let classes = fs.num_classes();
    let (text_pca, text_tsne) = (
        text_nodes_among_their_class(&pca, labels, k),
        text_nodes_among_their_class(&tsne, labels, k),
    );
    println!(
        "{k}-NN label agreement on the map: PCA {:.1} %, t-SNE {:.1} %; trustworthiness@{k}: PCA {trust_pca:.3}, \
         t-SNE {trust_tsne:.3}; text nodes among their class: PCA {text_pca}/{classes}, t-SNE {text_tsne}/{classes}",
        agree_pca * 100.0,
        agree_tsne * 100.0,
    );
    // Measured: 10-NN agreement 24.8 % (PCA) against 77.5 % (t-SNE), trustworthiness 0.769 against 0.955,
    // text nodes among their class 0 against 21 of 25 (the others sit where CLIP confuses two breeds).
    assert!(agree_tsne > agree_pca + 0.4, "{agree_tsne} vs {agree_pca}");
    assert!(trust_tsne > trust_pca + 0.12, "{trust_tsne} vs {trust_pca}");
    assert!(
        text_tsne >= 18 && text_tsne > text_pca,
        "{text_tsne} of {classes}"
    );
    // The same features give the same map.
    let again = tsne_map(
        z,
        text,
        &TsneParams::default(),
        &NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    assert_eq!(again, tsne);
}

#[test]
fn a_tsne_map_is_read_back_from_the_cache_and_a_damaged_cache_file_is_recomputed() {
    let Some(fs) = shared("oxford_pets25.safetensors") else {
        return;
    };
    let test = fs.test.as_ref().unwrap();
    let rows: Vec<usize> = (0..400).collect();
    let z = test.features.select_rows(&rows);
    let text = fs.text.as_ref();
    let params = TsneParams {
        iterations: 300,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        cached_tsne_map(
            &z,
            text,
            &params,
            dir.path(),
            &NoProgress,
            &CancelToken::new(),
        )
        .unwrap()
    };
    let first = run();
    assert!(
        !first.from_cache && first.warnings.is_empty(),
        "{:?}",
        first.warnings
    );
    let second = run();
    assert!(second.from_cache, "the second map comes from the cache");
    assert_eq!(second.map, first.map);
    // Other text features (a renamed class) reuse the layout.
    let renamed = Mat::from_rows(&[z.row(0).to_vec()], z.cols);
    let third = cached_tsne_map(
        &z,
        Some(&renamed),
        &params,
        dir.path(),
        &NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    assert!(third.from_cache);
    assert_eq!(third.map.points, first.map.points);
    // A damaged file is reported, recomputed (the same map: it is deterministic) and repaired.
    let path = LayoutCache::new(dir.path()).path(&LayoutCache::key(&z, &params));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let fourth = run();
    assert!(!fourth.from_cache, "a damaged file is not trusted");
    assert_eq!(fourth.warnings.len(), 1, "{:?}", fourth.warnings);
    assert!(
        fourth.warnings[0].contains("damaged"),
        "{}",
        fourth.warnings[0]
    );
    assert_eq!(fourth.map, first.map);
    let fifth = run();
    assert!(fifth.from_cache, "the recomputed map was stored again");
    assert_eq!(fifth.map, fourth.map);
}

#[test]
fn the_tsne_map_of_10000_real_features_is_timed() {
    let Some((fs, both, z)) = caltech_10000() else {
        return;
    };
    let t = Instant::now();
    let map = tsne_map(
        &z,
        fs.text.as_ref(),
        &TsneParams::default(),
        &NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    println!(
        "t-SNE map of {} real CLIP features ({} distinct, {}-d; 1000 iterations): {:.1} s",
        z.rows,
        both.rows,
        z.cols,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(map.points.len(), 10_000);
    assert!(map.points.iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn flipped_labels_among_real_features_top_the_likely_mistakes() {
    let Some(fs) = shared("oxford_pets25.safetensors") else {
        return;
    };
    let test = fs.test.as_ref().unwrap();
    let c = fs.num_classes();
    // 16 labelled images per class, of which 12 (one in every ~33) get a wrong class.
    let by_class = test.indices_by_class(c);
    let mut labelled: Vec<(usize, usize)> = Vec::new();
    for (k, idx) in by_class.iter().enumerate() {
        for &i in idx.iter().take(16) {
            labelled.push((i, k));
        }
    }
    let flipped: Vec<usize> = (0..12).map(|j| j * 33).collect();
    for &j in &flipped {
        labelled[j].1 = (labelled[j].1 + 7) % c;
    }
    let t = Instant::now();
    let cv = cross_validate(
        &test.features,
        fs.text.as_ref(),
        &labelled,
        c,
        &CvOptions::default(),
    )
    .unwrap();
    println!(
        "5-fold cross-validation of {} labels ({c} classes): {:.1} ms, accuracy {:.1} %",
        labelled.len(),
        t.elapsed().as_secs_f64() * 1000.0,
        cv.accuracy() * 100.0
    );
    let suspects = cv.suspects(0.5);
    let top: Vec<usize> = suspects.iter().take(20).map(|s| s.image).collect();
    let found = flipped
        .iter()
        .filter(|&&j| top.contains(&labelled[j].0))
        .count();
    println!(
        "{found} of {} flipped labels among the top 20 of {} suspects",
        flipped.len(),
        suspects.len()
    );
    assert!(
        found >= 10,
        "{found} of {} flipped labels found",
        flipped.len()
    );
    // On the labels as they are the model is right most of the time (zero-shot alone: 92 % on this set).
    assert!(cv.accuracy() > 0.8, "{}", cv.accuracy());

    // Timing at 10,000 labels (tiled), printed.
    let z = tiled(&test.features, 10_000);
    let many: Vec<(usize, usize)> = (0..10_000)
        .map(|i| (i, test.labels[i % test.labels.len()]))
        .collect();
    let t = Instant::now();
    let cv = cross_validate(&z, fs.text.as_ref(), &many, c, &CvOptions::default()).unwrap();
    println!(
        "5-fold cross-validation of 10,000 labels: {:.1} ms (accuracy {:.1} %)",
        t.elapsed().as_secs_f64() * 1000.0,
        cv.accuracy() * 100.0
    );
}
