//! The neighbour-preserving layout of the map: Barnes-Hut t-SNE through the `bhtsne` crate.
//!
//! PCA shows the two directions of largest spread, which on CLIP features mixes most classes into one cloud;
//! t-SNE keeps each image next to the images it resembles, so classes and sub-groups come apart and a box
//! drawn on the map selects look-alikes. It costs seconds to a minute where PCA costs milliseconds, so the map
//! view shows PCA at once and switches when this is done, and the result is cached on disk
//! ([`super::LayoutCache`]) so reopening a folder shows it at once.
//!
//! The recipe is the standard one (van der Maaten 2014; openTSNE's defaults): the features reduced to their
//! 50 leading principal components (the module's randomised PCA), perplexity 30 over the `3·perplexity`
//! nearest neighbours, θ = 0.5, 1000 iterations of which the first 250 with early exaggeration 12, learning
//! rate `max(N/48, 50)`, started from the PCA map scaled to a standard deviation of 10⁻⁴. The features are
//! L2-normalised CLIP rows, so Euclidean distance on them ranks neighbours as cosine similarity does.
//!
//! Three things are done here rather than by the crate, so that the same features give the same map, bit for
//! bit:
//! - the nearest neighbours are found by brute force ([`nearest_neighbours`], blocks of [`gemm`] products,
//!   ties broken by index), because the crate's vantage-point tree picks its vantage points with an unseeded
//!   thread-local generator, so among duplicate images (equal distances) it would pick different neighbours
//!   on each run; at 50 dimensions brute force costs about what the tree does;
//! - the start is the PCA map, or a seeded Gaussian where that has no spread: the crate's own random start
//!   is unseeded;
//! - the crate's iterations run on a rayon pool of one thread: the crate sums in parallel (the recentring of
//!   every iteration) in an order that depends on the threads' timing, so on the shared pool two runs differ
//!   in the last bits, which t-SNE can carry far: on 400 real features a second run moved a point by 39 % of
//!   the map's extent. The price is the crate's parallelism: on two cores busy with other work, 10,000 images
//!   took 15 s on one thread against 18 s on both (`tests/insights.rs`); on a many-core laptop it is a few
//!   times slower than it could be, for a background job that runs once per folder and is then read back
//!   from the cache. The neighbour search and the PCA before it stay parallel (they are deterministic).
//!
//! Cancelling: the crate's epoch callback cannot stop a fit, so the iterations run in stages of [`STAGE`],
//! each warm-started from the last (the affinities are kept, only the per-coordinate gains and the momentum
//! restart); a cancel is noticed between stages, and progress is reported after each.
//!
//! t-SNE has no out-of-sample projection, so the class text nodes are placed from their most similar images
//! ([`place_by_neighbours`]). Above [`MAX_TSNE_IMAGES`] images the map stays PCA (see there why).

use std::path::Path;

use bhtsne::{tSNE, Neighbor};
use rayon::prelude::*;

use super::{check_input, principal_coordinates, Layout, LayoutCache, Map2d, MapError};
use crate::linalg::{gemm, Mat, Tr};
use crate::progress::{CancelToken, Progress};

/// Above this many images the map stays PCA. Why not subsample and place the rest: a map of which four
/// fifths are placed by their neighbours rather than laid out looks as trustworthy as a real one but is
/// not, and the person cannot tell which points are which. Why this number: the layout of 10,000 images took
/// 13 s on two busy cores (`tests/insights.rs` prints it), and both its parts grow faster than `N` (the
/// brute-force neighbour search as `N²`, the iterations as `N log N`), so 20,000 is about a minute there,
/// the longest wait worth offering for a view; its memory (the `N×90` affinities and a block of `256×N`
/// distances) is small at any size.
pub const MAX_TSNE_IMAGES: usize = 20_000;

/// Below this many images there is no neighbourhood to preserve: the perplexity would fall under 1.
pub const MIN_TSNE_IMAGES: usize = 4;

/// Images each class text node is placed from ([`place_by_neighbours`]).
pub const TEXT_NEIGHBOURS: usize = 10;

/// Iterations per stage: a cancel waits at most this long (under a second at 10,000 images on two cores).
/// Restarting the gains and the momentum this often costs nothing measurable: on the real features of
/// `tests/insights.rs` (2,483 images) the final KL divergence was 3.037 against 3.037 in one run of 1000, the
/// 10-NN label agreement 77.5 % against 77.9 %.
const STAGE: usize = 50;

/// The factor of the early exaggeration and its share of the iterations (250 of 1000, the usual).
const EXAGGERATION: f32 = 12.0;

/// What the cache key says about how a layout is made: change it with anything above or in [`layout`] that
/// changes the result, so layouts made the old way are not read back.
pub(super) const RECIPE: &str =
    "hegraph t-SNE 1: bhtsne 0.7 Barnes-Hut on one thread, PCA start, brute-force kNN, stages of 50, exaggeration 12 for 1/4";

/// Rows of the distance blocks of the neighbour search.
const KNN_BLOCK: usize = 256;

/// CLIP's logit scale: the similarity weights of [`place_by_neighbours`] are the softmax CLIP's own
/// zero-shot classifier would give.
const SIMILARITY_SCALE: f32 = 100.0;

/// Settings of the t-SNE layout; they are part of the cache key.
#[derive(Clone, Debug, PartialEq)]
pub struct TsneParams {
    /// The wanted perplexity (about the number of neighbours each image keeps close); lowered to `(N − 1)/3`
    /// for small folders, since it needs `3·perplexity` neighbours.
    pub perplexity: f32,
    /// Barnes-Hut accuracy: cells seen under an angle smaller than this count as one point.
    pub theta: f32,
    pub iterations: usize,
    /// Principal components the features are reduced to first.
    pub pca_dims: usize,
    /// Seeds the start where the PCA map has no spread (all images alike).
    pub seed: u64,
}

impl Default for TsneParams {
    fn default() -> Self {
        Self {
            perplexity: 30.0,
            theta: 0.5,
            iterations: 1000,
            pca_dims: 50,
            seed: 0x7473_6e65,
        }
    }
}

impl TsneParams {
    /// The perplexity used for `n` images.
    pub fn perplexity_for(&self, n: usize) -> f32 {
        self.perplexity.min(n.saturating_sub(1) as f32 / 3.0)
    }

    fn check(&self) -> Result<(), MapError> {
        if !(self.perplexity.is_finite() && self.perplexity >= 1.0) {
            return Err(MapError::TsneParams("the perplexity must be at least 1"));
        }
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return Err(MapError::TsneParams("θ must be above 0"));
        }
        if self.iterations == 0 || self.pca_dims == 0 {
            return Err(MapError::TsneParams(
                "the iterations and the PCA dimensions must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A t-SNE map and where it came from.
#[derive(Clone, Debug)]
pub struct TsneOutcome {
    pub map: Map2d,
    /// Read from the layout cache rather than computed.
    pub from_cache: bool,
    /// Problems with the cache (a damaged file ignored, a file that could not be written); the map is good.
    pub warnings: Vec<String>,
}

/// The checks both entry points make before any work: the inputs, their size, the settings.
fn check_all(features: &Mat, text: Option<&Mat>, params: &TsneParams) -> Result<(), MapError> {
    check_input(features, text)?;
    check_tsne_size(features.rows)?;
    params.check()
}

/// The t-SNE map of `features` (`N×D`, one L2-normalised row per image) with the class `text` features
/// (`C×D`) placed on it, computed now. Reports the iterations through `progress`; `cancel` stops it between
/// stages with [`MapError::Cancelled`].
pub fn tsne_map(
    features: &Mat,
    text: Option<&Mat>,
    params: &TsneParams,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Map2d, MapError> {
    check_all(features, text, params)?;
    let points = layout(features, params, progress, cancel)?;
    Ok(finish(features, text, params, points))
}

/// [`tsne_map`] through the layout cache in `cache_dir`: the layout of the same features with the same
/// settings is read back instead of computed (the text nodes are placed anew, so renaming a class costs
/// nothing), and a fresh layout is stored. A cache that cannot be read or written is a warning, never an
/// error, and a damaged or mismatched file is never trusted.
pub fn cached_tsne_map(
    features: &Mat,
    text: Option<&Mat>,
    params: &TsneParams,
    cache_dir: &Path,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<TsneOutcome, MapError> {
    check_all(features, text, params)?;
    let cache = LayoutCache::new(cache_dir);
    let key = LayoutCache::key(features, params);
    let mut warnings = Vec::new();
    match cache.load(&key, features.rows) {
        Ok(Some(points)) => {
            return Ok(TsneOutcome {
                map: finish(features, text, params, points),
                from_cache: true,
                warnings,
            })
        }
        Ok(None) => {}
        Err(e) => {
            let w = format!("{e}; computing the t-SNE map again");
            progress.message(&w);
            warnings.push(w);
        }
    }
    let points = layout(features, params, progress, cancel)?;
    if let Err(e) = cache.store(&key, &points) {
        let w = e.to_string();
        progress.message(&w);
        warnings.push(w);
    }
    Ok(TsneOutcome {
        map: finish(features, text, params, points),
        from_cache: false,
        warnings,
    })
}

/// Whether a t-SNE map of `n` images is made at all ([`MIN_TSNE_IMAGES`], [`MAX_TSNE_IMAGES`]).
pub fn check_tsne_size(n: usize) -> Result<(), MapError> {
    if n < MIN_TSNE_IMAGES {
        return Err(MapError::TooFewForTsne {
            images: n,
            min: MIN_TSNE_IMAGES,
        });
    }
    if n > MAX_TSNE_IMAGES {
        return Err(MapError::TooManyForTsne {
            images: n,
            max: MAX_TSNE_IMAGES,
        });
    }
    Ok(())
}

fn finish(features: &Mat, text: Option<&Mat>, params: &TsneParams, points: Vec<[f32; 2]>) -> Map2d {
    let text = match text {
        Some(t) if t.rows > 0 => place_by_neighbours(&points, features, t, TEXT_NEIGHBOURS),
        _ => Vec::new(),
    };
    Map2d {
        points,
        text,
        layout: Layout::Tsne {
            perplexity: params.perplexity_for(features.rows),
            iterations: params.iterations,
        },
    }
}

/// Each row of `queries` (a class text feature) placed on the image among its `k` most similar ones (cosine
/// similarity of the features) that is most central to them: the weighted medoid, each image weighted by the
/// softmax of its similarity at CLIP's logit scale (the weights CLIP's own zero-shot classifier would give).
/// A layout without an out-of-sample projection (t-SNE) has no truer place for it. Why not the weighted mean of
/// those images: when they fall into two clusters (two breeds CLIP confuses) the mean lands in the empty
/// space between them, which says nothing; the medoid always sits on a look-alike, among most of the others
/// (on real features, 21 of 25 class nodes have mostly their own class around them against 20 with the
/// mean). `points[i]` is the position of `features` row `i`.
pub fn place_by_neighbours(
    points: &[[f32; 2]],
    features: &Mat,
    queries: &Mat,
    k: usize,
) -> Vec<[f32; 2]> {
    let n = points.len().min(features.rows);
    if n == 0 || k == 0 {
        return vec![[0.0; 2]; queries.rows];
    }
    let sims = queries
        .normalized_rows()
        .matmul_t(&features.normalized_rows());
    (0..queries.rows)
        .map(|q| {
            let row = &sims.row(q)[..n];
            let mut idx: Vec<usize> = (0..n).collect();
            let by_similarity = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            let k = k.min(n);
            if k < n {
                idx.select_nth_unstable_by(k - 1, by_similarity);
                idx.truncate(k);
            }
            let top = idx.iter().map(|&i| row[i]).fold(f32::MIN, f32::max);
            let weight = |i: usize| ((row[i] - top) * SIMILARITY_SCALE).exp();
            let cost = |i: usize| -> f32 {
                idx.iter()
                    .map(|&j| {
                        let (dx, dy) = (points[i][0] - points[j][0], points[i][1] - points[j][1]);
                        weight(j) * (dx * dx + dy * dy).sqrt()
                    })
                    .sum()
            };
            idx.iter()
                .map(|&i| (cost(i), i))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map_or([0.0; 2], |(_, i)| points[i])
        })
        .collect()
}

/// The t-SNE coordinates of every row of `features` (checked by the caller).
fn layout(
    features: &Mat,
    params: &TsneParams,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Vec<[f32; 2]>, MapError> {
    let n = features.rows;
    let perplexity = params.perplexity_for(n);
    // The crate takes ⌊3·perplexity⌋ neighbours and checks `N − 1 ≥ 3·⌊perplexity⌋`; both hold here.
    let k = ((3.0 * perplexity) as usize).clamp(1, n - 1);
    progress.set_stage("t-SNE: principal components");
    let dims = params.pca_dims.min(features.cols).min(n);
    let reduced = principal_coordinates(features, dims);
    if cancel.is_cancelled() {
        return Err(MapError::Cancelled);
    }
    progress.set_stage("t-SNE: nearest neighbours");
    let neighbours = nearest_neighbours(&reduced, k, cancel)?;
    let rows: Vec<&[f32]> = reduced.data.chunks_exact(dims).collect();
    let y = start(&reduced, params.seed);
    // One thread: see the module's doc.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "hegraph-tsne".into())
        .build()
        .map_err(|e| MapError::Thread(e.to_string()))?;
    let y = pool.install(|| fit(&rows, &neighbours, y, perplexity, params, progress, cancel))?;
    if !y.iter().all(|v| v.is_finite()) {
        return Err(MapError::Diverged);
    }
    Ok(y.chunks_exact(2).map(|p| [p[0], p[1]]).collect())
}

/// The iterations of the layout of `rows` from the start `y`, in stages (see the module's doc).
fn fit(
    rows: &[&[f32]],
    neighbours: &[Vec<Neighbor<f32>>],
    mut y: Vec<f32>,
    perplexity: f32,
    params: &TsneParams,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Vec<f32>, MapError> {
    let total = params.iterations;
    let exaggerated = total / 4;
    let learning_rate = (rows.len() as f32 / EXAGGERATION / 4.0).max(50.0);
    let euclidean = |a: &&[f32], b: &&[f32]| -> f32 {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt()
    };
    let mut tsne: tSNE<f32, &[f32], 2> = tSNE::new(rows);
    tsne.perplexity(perplexity)
        .learning_rate(learning_rate)
        .early_exaggeration(EXAGGERATION)
        .momentum_switch_epoch(usize::MAX);
    progress.set_stage_counting("t-SNE", "iterations");
    progress.update(0, total);
    let mut done = 0;
    while done < total {
        if cancel.is_cancelled() {
            return Err(MapError::Cancelled);
        }
        let exaggerating = done < exaggerated;
        let end = if exaggerating {
            exaggerated.min(done + STAGE)
        } else {
            total.min(done + STAGE)
        };
        // Each stage starts from the last one's embedding. The crate renormalises P (times the exaggeration)
        // at every fit; `stop_lying_epoch(0)` divides the exaggeration out at once, `MAX` keeps it.
        tsne.epochs(end - done)
            .momentum(if exaggerating { 0.5 } else { 0.8 })
            .stop_lying_epoch(if exaggerating { usize::MAX } else { 0 })
            .initial_embedding(y);
        if done == 0 {
            tsne.barnes_hut_with_neighbors(params.theta, neighbours);
        } else {
            // The affinities of the first stage are cached in `tsne`: the metric is not called again.
            tsne.barnes_hut(params.theta, euclidean);
        }
        y = tsne.embedding();
        done = end;
        progress.update(done, total);
    }
    Ok(y)
}

/// The start of the layout: the first two principal coordinates scaled to a standard deviation of 10⁻⁴ along
/// the first (the usual PCA start: global structure from PCA, no forces distorted by a large start). A
/// coordinate without spread (all images alike along it) is drawn from a seeded Gaussian instead, since
/// points that all share it would never leave it.
fn start(reduced: &Mat, seed: u64) -> Vec<f32> {
    let n = reduced.rows;
    let col = |j: usize| -> Vec<f32> {
        (0..n)
            .map(|r| reduced.row(r).get(j).copied().unwrap_or(0.0))
            .collect()
    };
    let std = |v: &[f32]| -> f64 {
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        (v.iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt()
    };
    let (c0, c1) = (col(0), col(1));
    let s0 = std(&c0);
    let scale = if s0 > 0.0 { (1e-4 / s0) as f32 } else { 0.0 };
    let mut rng = crate::rng::Rng::new(seed);
    let mut columns = [c0, c1];
    for c in columns.iter_mut() {
        c.iter_mut().for_each(|x| *x *= scale);
        if std(c) <= 1e-9 {
            c.iter_mut().for_each(|x| *x = 1e-4 * rng.normal());
        }
    }
    (0..n)
        .flat_map(|r| [columns[0][r], columns[1][r]])
        .collect()
}

/// The `k` nearest rows of every row of `x` (Euclidean, itself excluded), nearest first, ties broken by the
/// lower index: `‖a‖² + ‖b‖² − 2 a·b` from blocks of [`gemm`] products, so the result is the same on
/// every run.
fn nearest_neighbours(
    x: &Mat,
    k: usize,
    cancel: &CancelToken,
) -> Result<Vec<Vec<Neighbor<f32>>>, MapError> {
    let (n, d) = x.shape();
    let norms: Vec<f32> = (0..n)
        .map(|r| x.row(r).iter().map(|v| v * v).sum())
        .collect();
    let mut out = Vec::with_capacity(n);
    let mut dots = vec![0.0f32; KNN_BLOCK * n];
    for from in (0..n).step_by(KNN_BLOCK) {
        if cancel.is_cancelled() {
            return Err(MapError::Cancelled);
        }
        let rows = KNN_BLOCK.min(n - from);
        let block = &x.data[from * d..(from + rows) * d];
        gemm(
            &mut dots[..rows * n],
            (rows, n, d),
            block,
            Tr::N,
            &x.data,
            Tr::T,
            1.0,
            0.0,
        );
        let found: Vec<Vec<Neighbor<f32>>> = dots[..rows * n]
            .par_chunks_exact(n)
            .enumerate()
            .map(|(b, dot)| {
                let i = from + b;
                let mut cand: Vec<(f32, usize)> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| ((norms[i] + norms[j] - 2.0 * dot[j]).max(0.0), j))
                    .collect();
                let order =
                    |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
                if k < cand.len() {
                    cand.select_nth_unstable_by(k - 1, order);
                    cand.truncate(k);
                }
                cand.sort_unstable_by(order);
                cand.into_iter()
                    .map(|(d2, j)| Neighbor {
                        index: j,
                        distance: d2.sqrt(),
                    })
                    .collect()
            })
            .collect();
        out.extend(found);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `n` points in `d` dimensions around `clusters` well separated centres, normalised like CLIP rows.
    fn blobs(n: usize, d: usize, clusters: usize) -> (Mat, Vec<usize>) {
        let mut rng = crate::rng::Rng::new(7);
        let centres: Vec<Vec<f32>> = (0..clusters).map(|_| rng.normal_vec(d)).collect();
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let c = i % clusters;
            let mut r: Vec<f32> = centres[c].iter().map(|x| x + 0.15 * rng.normal()).collect();
            crate::linalg::normalize(&mut r);
            rows.push(r);
            labels.push(c);
        }
        (Mat::from_rows(&rows, d), labels)
    }

    fn quick() -> TsneParams {
        TsneParams {
            iterations: 300,
            ..Default::default()
        }
    }

    #[test]
    fn the_neighbours_are_the_nearest_rows_nearest_first_ties_by_index() {
        let (m, _) = blobs(300, 6, 3);
        // Duplicates make ties.
        let mut rows: Vec<Vec<f32>> = (0..m.rows).map(|r| m.row(r).to_vec()).collect();
        rows[10] = rows[3].clone();
        rows[20] = rows[3].clone();
        let m = Mat::from_rows(&rows, 6);
        let k = 7;
        let got = nearest_neighbours(&m, k, &CancelToken::new()).unwrap();
        for (i, found) in got.iter().enumerate() {
            let mut all: Vec<(f32, usize)> = (0..m.rows)
                .filter(|&j| j != i)
                .map(|j| {
                    let d2: f32 = m
                        .row(i)
                        .iter()
                        .zip(m.row(j))
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum();
                    (d2.sqrt(), j)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let want: Vec<usize> = all[..k].iter().map(|x| x.1).collect();
            let have: Vec<usize> = found.iter().map(|x| x.index).collect();
            // The brute force through ‖a‖² + ‖b‖² − 2ab rounds differently: compare the distances reached.
            for (w, h) in all[..k].iter().zip(found) {
                assert!(
                    (w.0 - h.distance).abs() < 1e-3,
                    "row {i}: {want:?} vs {have:?}"
                );
            }
        }
        assert_eq!(
            got[3][0].index, 10,
            "the duplicate of 3 with the lower index first"
        );
        assert_eq!(got[3][1].index, 20);
        assert_eq!(got[3][0].distance, 0.0);
    }

    #[test]
    fn tiny_folders_give_a_map_or_say_they_are_too_small() {
        for n in [0usize, 1, 2, 3] {
            let m = Mat::from_vec(n, 4, (0..n * 4).map(|i| (i as f32).sin()).collect());
            let r = tsne_map(&m, None, &quick(), &NoProgress, &CancelToken::new());
            let want = if n == 0 {
                MapError::Empty
            } else {
                MapError::TooFewForTsne {
                    images: n,
                    min: MIN_TSNE_IMAGES,
                }
            };
            assert_eq!(r, Err(want), "{n} images");
        }
        for n in [4usize, 5, 7] {
            let (m, _) = blobs(n, 8, 2);
            let text = Mat::from_rows(&[m.row(0).to_vec()], 8);
            let map =
                tsne_map(&m, Some(&text), &quick(), &NoProgress, &CancelToken::new()).unwrap();
            assert_eq!(map.points.len(), n);
            assert_eq!(map.text.len(), 1);
            assert!(map.points.iter().flatten().all(|v| v.is_finite()));
            let Layout::Tsne { perplexity, .. } = map.layout else {
                panic!("{:?}", map.layout)
            };
            assert!(
                (perplexity - (n - 1) as f32 / 3.0).abs() < 1e-6,
                "{perplexity}"
            );
            assert!(map.explained().is_none(), "no explained variance for t-SNE");
        }
        // Identical images (no spread at all) still get a finite map, from the seeded start.
        let same = Mat::from_vec(6, 3, [0.6f32, 0.8, 0.0].repeat(6));
        let map = tsne_map(&same, None, &quick(), &NoProgress, &CancelToken::new()).unwrap();
        assert!(map.points.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(
            tsne_map(
                &Mat::zeros(MAX_TSNE_IMAGES + 1, 1),
                None,
                &quick(),
                &NoProgress,
                &CancelToken::new()
            ),
            Err(MapError::TooManyForTsne {
                images: MAX_TSNE_IMAGES + 1,
                max: MAX_TSNE_IMAGES
            })
        );
        let bad = TsneParams {
            theta: 0.0,
            ..quick()
        };
        assert!(matches!(
            tsne_map(
                &blobs(10, 3, 2).0,
                None,
                &bad,
                &NoProgress,
                &CancelToken::new()
            ),
            Err(MapError::TsneParams(_))
        ));
    }

    /// Cancels its token once `after` iterations were reported, and remembers the last count.
    struct CancelAfter {
        after: usize,
        cancel: CancelToken,
        last: AtomicUsize,
    }

    impl Progress for CancelAfter {
        fn update(&self, done: usize, _total: usize) {
            self.last.store(done, Ordering::Relaxed);
            if done >= self.after {
                self.cancel.cancel();
            }
        }
    }

    #[test]
    fn a_cancel_stops_the_layout_at_the_next_stage() {
        let (m, _) = blobs(200, 10, 4);
        let cancel = CancelToken::new();
        let p = CancelAfter {
            after: 1,
            cancel: cancel.clone(),
            last: AtomicUsize::new(0),
        };
        let r = tsne_map(&m, None, &TsneParams::default(), &p, &cancel);
        assert_eq!(r, Err(MapError::Cancelled));
        assert_eq!(
            p.last.load(Ordering::Relaxed),
            STAGE,
            "stopped after one stage"
        );
        // Cancelled before it starts: no work at all.
        let r = tsne_map(&m, None, &TsneParams::default(), &NoProgress, &cancel);
        assert_eq!(r, Err(MapError::Cancelled));
    }

    #[test]
    fn separated_clusters_come_apart_and_text_nodes_land_in_their_cluster() {
        let (m, labels) = blobs(240, 16, 4);
        let map = tsne_map(&m, None, &quick(), &NoProgress, &CancelToken::new()).unwrap();
        // Every point's nearest point on the map is of its cluster.
        let p = &map.points;
        for i in 0..p.len() {
            let nearest = (0..p.len())
                .filter(|&j| j != i)
                .min_by(|&a, &b| {
                    let da = (p[a][0] - p[i][0]).powi(2) + (p[a][1] - p[i][1]).powi(2);
                    let db = (p[b][0] - p[i][0]).powi(2) + (p[b][1] - p[i][1]).powi(2);
                    da.total_cmp(&db)
                })
                .unwrap();
            assert_eq!(labels[nearest], labels[i], "point {i}");
        }
        // A query equal to a cluster's centre lands at that cluster's images.
        let mut centre = vec![0.0f32; 16];
        for (r, &l) in labels.iter().enumerate() {
            if l == 2 {
                centre.iter_mut().zip(m.row(r)).for_each(|(a, b)| *a += b);
            }
        }
        let q = Mat::from_rows(&[centre], 16);
        let at = place_by_neighbours(p, &m, &q, TEXT_NEIGHBOURS)[0];
        let mean = |c: usize| -> [f32; 2] {
            let pts: Vec<&[f32; 2]> = p
                .iter()
                .zip(&labels)
                .filter(|x| *x.1 == c)
                .map(|x| x.0)
                .collect();
            let n = pts.len() as f32;
            [
                pts.iter().map(|q| q[0]).sum::<f32>() / n,
                pts.iter().map(|q| q[1]).sum::<f32>() / n,
            ]
        };
        let dist =
            |a: [f32; 2], b: [f32; 2]| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt();
        let closest = (0..4)
            .min_by(|&a, &b| dist(at, mean(a)).total_cmp(&dist(at, mean(b))))
            .unwrap();
        assert_eq!(closest, 2, "{at:?}");
    }
}
