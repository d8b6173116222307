//! 2-D maps of every image's features, for the GUI's map view: PCA (here) and t-SNE ([`tsne_map`]).
//!
//! Why two: the map must appear in well under a second on 10,000 images on a laptop CPU, and PCA does (a
//! randomised range finder: a few `N×D×12` products through [`crate::linalg::gemm`]; measured by
//! `tests/insights.rs`), but its two directions of largest spread mix most classes into one cloud. A
//! neighbour-preserving layout separates them (on real CLIP features of 25 dog and cat breeds, the share of an
//! image's 10 nearest points on the map that are of its breed goes from about a third with PCA to most of them
//! with t-SNE; `tests/insights.rs`), but costs seconds to a minute. So the view shows PCA at once and t-SNE
//! when it is done, and t-SNE is cached on disk ([`LayoutCache`]) while PCA is cheap enough to be recomputed
//! whenever the features change. The same randomised PCA reduces the features to 50 dimensions for t-SNE.
//!
//! On the PCA map the class text features are placed with the same two components. CLIP's image and text
//! features lie in two separate cones (the "modality gap"), so projected as they are the text nodes would all
//! sit far off in one corner; they are shifted by the difference of the two means first (text mean moved onto
//! the image mean), which keeps their positions relative to each other and to the images' directions. t-SNE
//! has no projection for new points: there each text node sits among its most similar images
//! ([`place_by_neighbours`]).

use crate::linalg::{gemm, Mat, Tr};

mod layout_cache;
mod tsne;

pub use layout_cache::{LayoutCache, LayoutCacheError};
pub use tsne::{
    cached_tsne_map, check_tsne_size, place_by_neighbours, tsne_map, TsneOutcome, TsneParams,
    MAX_TSNE_IMAGES, MIN_TSNE_IMAGES, TEXT_NEIGHBOURS,
};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MapError {
    #[error("there are no image features to map")]
    Empty,
    #[error("the text features have {text} dimensions, the image features {images}")]
    DimensionMismatch { images: usize, text: usize },
    #[error("feature row {row} holds a NaN or an infinity")]
    NonFinite { row: usize },
    #[error("a t-SNE map needs at least {min} images; there are {images}")]
    TooFewForTsne { images: usize, min: usize },
    #[error(
        "a t-SNE map is made for at most {max} images (it would take minutes); there are {images}, so the map stays PCA"
    )]
    TooManyForTsne { images: usize, max: usize },
    #[error("invalid t-SNE setting: {0}")]
    TsneParams(&'static str),
    #[error("the t-SNE layout diverged (a coordinate became NaN or infinite)")]
    Diverged,
    #[error("cancelled")]
    Cancelled,
    #[error("cannot start the t-SNE thread: {0}")]
    Thread(String),
}

/// Which layout a [`Map2d`] is, with what only that layout can say: a t-SNE map has no explained variance
/// (its axes mean nothing, only its neighbourhoods do), so the type does not pretend it has one.
#[derive(Clone, Debug, PartialEq)]
pub enum Layout {
    /// The first two principal components and the share of the images' total variance each axis explains.
    Pca { explained: [f32; 2] },
    /// Barnes-Hut t-SNE ([`tsne_map`]) with the perplexity it used (lowered for small folders) and its
    /// iterations.
    Tsne { perplexity: f32, iterations: usize },
}

/// Every image (and class text) placed in the plane.
#[derive(Clone, Debug, PartialEq)]
pub struct Map2d {
    /// One point per image row, in the order of the features.
    pub points: Vec<[f32; 2]>,
    /// One point per class text feature (empty without text).
    pub text: Vec<[f32; 2]>,
    pub layout: Layout,
}

impl Map2d {
    /// The share of the variance each axis explains, for a PCA map.
    pub fn explained(&self) -> Option<[f32; 2]> {
        match self.layout {
            Layout::Pca { explained } => Some(explained),
            Layout::Tsne { .. } => None,
        }
    }
}

/// The checks every map makes of its input.
fn check_input(features: &Mat, text: Option<&Mat>) -> Result<(), MapError> {
    let (n, d) = features.shape();
    if n == 0 || d == 0 {
        return Err(MapError::Empty);
    }
    if let Some(row) = features.first_non_finite_row() {
        return Err(MapError::NonFinite { row });
    }
    if let Some(t) = text {
        if t.cols != d {
            return Err(MapError::DimensionMismatch {
                images: d,
                text: t.cols,
            });
        }
    }
    Ok(())
}

/// The PCA map of `features` (`N×D`, one row per image) with `text` (`C×D`) placed on it.
pub fn pca_map(features: &Mat, text: Option<&Mat>) -> Result<Map2d, MapError> {
    check_input(features, text)?;
    let d = features.cols;
    let mean = column_mean(features);
    let centred = centred(features, &mean);
    let total: f64 = centred.data.iter().map(|&x| (x as f64) * (x as f64)).sum();
    let dirs = top_directions(&centred, 2);
    let ((v1, l1), (v2, l2)) = (&dirs[0], &dirs[1]);
    let project = |row: &[f32], shift: &[f32]| -> [f32; 2] {
        let mut p = [0.0f32; 2];
        for (k, &x) in row.iter().enumerate() {
            let c = x - shift[k];
            p[0] += c * v1[k];
            p[1] += c * v2[k];
        }
        p
    };
    let zero = vec![0.0; d];
    let points = (0..features.rows)
        .map(|r| project(centred.row(r), &zero))
        .collect();
    let text = match text {
        Some(t) if t.rows > 0 => {
            let text_mean = column_mean(t);
            (0..t.rows).map(|r| project(t.row(r), &text_mean)).collect()
        }
        _ => Vec::new(),
    };
    let share = |l: f64| {
        if total > 0.0 {
            (l / total).clamp(0.0, 1.0) as f32
        } else {
            0.0
        }
    };
    Ok(Map2d {
        points,
        text,
        layout: Layout::Pca {
            explained: [share(*l1), share(*l2)],
        },
    })
}

/// The images' coordinates on their `k` leading principal components (`N×k`, leading first; components
/// the data does not have are zero): the input of the t-SNE, where 50 components keep the neighbourhoods
/// of 512-d CLIP features while making every distance ten times cheaper.
fn principal_coordinates(features: &Mat, k: usize) -> Mat {
    let mean = column_mean(features);
    let centred = centred(features, &mean);
    let dirs = top_directions(&centred, k);
    let (n, d) = centred.shape();
    let mut v = vec![0.0f32; d * k];
    for (j, (dir, _)) in dirs.iter().enumerate() {
        for (c, &x) in dir.iter().enumerate() {
            v[c * k + j] = x;
        }
    }
    let mut out = Mat::zeros(n, k);
    gemm(
        &mut out.data,
        (n, k, d),
        &centred.data,
        Tr::N,
        &v,
        Tr::N,
        1.0,
        0.0,
    );
    out
}

fn centred(m: &Mat, mean: &[f32]) -> Mat {
    let mut c = m.clone();
    for r in 0..c.rows {
        for (x, m) in c.row_mut(r).iter_mut().zip(mean) {
            *x -= m;
        }
    }
    c
}

fn column_mean(m: &Mat) -> Vec<f32> {
    let mut mean = vec![0.0f64; m.cols];
    for r in 0..m.rows {
        for (a, &x) in mean.iter_mut().zip(m.row(r)) {
            *a += x as f64;
        }
    }
    let n = m.rows.max(1) as f64;
    mean.into_iter().map(|x| (x / n) as f32).collect()
}

/// Columns of the random start block beyond the ones wanted (oversampling), and the power steps: with them the
/// two leading directions come out to within float rounding on real CLIP features (`tests/insights.rs`
/// compares the variance along them with that along other directions).
const OVERSAMPLE: usize = 10;
const POWER_STEPS: usize = 4;

/// The `k` leading right singular vectors of the centred `x` (`N×D`) and the variance sums `σ²` along them,
/// leading first: a randomised range finder (Halko, Martinsson, Tropp 2011) with a few power steps, then the
/// exact eigen-decomposition of the small `(k + 10)×(k + 10)` problem. Costs a few `N×D×(k + 10)` products
/// instead of the `N×D×D` covariance, which is what keeps the PCA map of 10,000 images well under a second.
/// The start block is seeded, so the map is the same on every run, and each direction's sign is fixed
/// (largest entry positive) so it does not flip. Directions beyond the rank of `x` are zero.
fn top_directions(x: &Mat, k: usize) -> Vec<(Vec<f32>, f64)> {
    let (n, d) = x.shape();
    let block = (k + OVERSAMPLE).min(n).min(d);
    let mut rng = crate::rng::Rng::new(0x9e37_79b9);
    // Ω (D×b) → Y = X Ω (N×b), orthonormalised; then Y ← X (Xᵀ Y) a few times.
    let omega: Vec<f32> = (0..d * block).map(|_| rng.normal()).collect();
    let mut y = vec![0.0f32; n * block];
    gemm(
        &mut y,
        (n, block, d),
        &x.data,
        Tr::N,
        &omega,
        Tr::N,
        1.0,
        0.0,
    );
    orthonormalise_columns(&mut y, n, block);
    let mut z = vec![0.0f32; d * block];
    for _ in 0..POWER_STEPS {
        gemm(&mut z, (d, block, n), &x.data, Tr::T, &y, Tr::N, 1.0, 0.0);
        orthonormalise_columns(&mut z, d, block);
        gemm(&mut y, (n, block, d), &x.data, Tr::N, &z, Tr::N, 1.0, 0.0);
        orthonormalise_columns(&mut y, n, block);
    }
    // B = Yᵀ X (b×D); the leading eigenvectors u of B Bᵀ give the directions Bᵀ u / σ.
    let mut b = vec![0.0f32; block * d];
    gemm(&mut b, (block, d, n), &y, Tr::T, &x.data, Tr::N, 1.0, 0.0);
    let mut bbt = vec![0.0f64; block * block];
    for i in 0..block {
        for j in 0..=i {
            let v: f64 = (0..d)
                .map(|c| b[i * d + c] as f64 * b[j * d + c] as f64)
                .sum();
            bbt[i * block + j] = v;
            bbt[j * block + i] = v;
        }
    }
    let (values, vectors) = jacobi_eigen(bbt, block);
    let mut order: Vec<usize> = (0..block).collect();
    order.sort_by(|&a, &c| values[c].total_cmp(&values[a]));
    let direction = |rank: usize| -> (Vec<f32>, f64) {
        let Some(&e) = order.get(rank) else {
            return (vec![0.0; d], 0.0);
        };
        let lambda = values[e].max(0.0);
        let mut v: Vec<f32> = (0..d)
            .map(|c| {
                (0..block)
                    .map(|i| b[i * d + c] as f64 * vectors[i * block + e])
                    .sum::<f64>() as f32
            })
            .collect();
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        if norm > 0.0 && lambda > 0.0 {
            v.iter_mut().for_each(|a| *a /= norm);
        } else {
            v.iter_mut().for_each(|a| *a = 0.0);
        }
        let big = v
            .iter()
            .copied()
            .fold(0.0f32, |m, a| if a.abs() > m.abs() { a } else { m });
        if big < 0.0 {
            v.iter_mut().for_each(|a| *a = -*a);
        }
        (v, lambda)
    };
    (0..k).map(direction).collect()
}

/// Modified Gram–Schmidt, twice ("twice is enough" for float rounding), on the `k` columns of the row-major
/// `rows×k` matrix `m`. A column that is dependent on the previous ones (what is left of it is rounding
/// noise) becomes zero rather than a normalised copy of that noise, which would not be orthogonal.
fn orthonormalise_columns(m: &mut [f32], rows: usize, k: usize) {
    let norm_of = |m: &[f32], j: usize| -> f64 {
        (0..rows)
            .map(|r| (m[r * k + j] as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    for j in 0..k {
        let before = norm_of(m, j);
        for _pass in 0..2 {
            for prev in 0..j {
                let p: f64 = (0..rows)
                    .map(|r| m[r * k + j] as f64 * m[r * k + prev] as f64)
                    .sum();
                for r in 0..rows {
                    m[r * k + j] -= p as f32 * m[r * k + prev];
                }
            }
        }
        let norm = norm_of(m, j);
        let keep = norm > 1e-4 * before && norm > 1e-30;
        for r in 0..rows {
            m[r * k + j] = if keep {
                (m[r * k + j] as f64 / norm) as f32
            } else {
                0.0
            };
        }
    }
}

/// Eigenvalues and eigenvectors (columns of the row-major result) of the symmetric `k×k` matrix `a`, by
/// cyclic Jacobi rotations: exact to rounding for the small matrices used here.
fn jacobi_eigen(mut a: Vec<f64>, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0f64; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum();
        let scale: f64 = (0..k).map(|i| a[i * k + i] * a[i * k + i]).sum();
        if off <= 1e-24 * scale.max(1e-300) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let (arp, arq) = (a[r * k + p], a[r * k + q]);
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let (apr, aqr) = (a[p * k + r], a[q * k + r]);
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
                for r in 0..k {
                    let (vrp, vrq) = (v[r * k + p], v[r * k + q]);
                    v[r * k + p] = c * vrp - s * vrq;
                    v[r * k + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    ((0..k).map(|i| a[i * k + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_axis_follows_the_largest_spread_and_the_second_is_orthogonal() {
        // Points on a line along (1, 1, 0), each with a twin offset by ±0.1 along (1, −1, 0); none along z.
        let mut rows = Vec::new();
        let mut ts = Vec::new();
        for i in 0..25 {
            let t = i as f32 / 5.0 - 2.4;
            for s in [0.1, -0.1] {
                rows.push(vec![t + s, t - s, 0.5]);
                ts.push((t, s));
            }
        }
        let m = Mat::from_rows(&rows, 3);
        let map = pca_map(&m, None).unwrap();
        assert_eq!(map.points.len(), 50);
        let root2 = 2.0f32.sqrt();
        for (p, &(t, s)) in map.points.iter().zip(&ts) {
            assert!(
                (p[0] - root2 * t).abs() < 1e-4,
                "first axis = the line: {p:?} {t}"
            );
            assert!(
                (p[1].abs() - root2 * s.abs()).abs() < 1e-4,
                "second = the spread: {p:?}"
            );
        }
        let explained = map.explained().unwrap();
        assert!(explained[0] > 0.95 && explained[1] > 0.0);
        assert!(
            (explained[0] + explained[1] - 1.0).abs() < 1e-4,
            "{explained:?}"
        );
    }

    #[test]
    fn text_nodes_are_placed_relative_to_each_other_without_the_modality_gap() {
        let m = Mat::from_rows(&[vec![0.0, 0.0], vec![2.0, 0.0], vec![4.0, 0.1]], 2);
        // The same spread, shifted far away.
        let t = Mat::from_rows(&[vec![100.0, 50.0], vec![104.0, 50.0]], 2);
        let map = pca_map(&m, Some(&t)).unwrap();
        let dx = map.text[1][0] - map.text[0][0];
        assert!((dx.abs() - 4.0).abs() < 0.05, "{:?}", map.text);
        assert!((map.text[0][0] + map.text[1][0]).abs() < 0.05);
        let bad = Mat::zeros(1, 3);
        assert_eq!(
            pca_map(&m, Some(&bad)),
            Err(MapError::DimensionMismatch { images: 2, text: 3 })
        );
        assert_eq!(pca_map(&Mat::zeros(0, 2), None), Err(MapError::Empty));
        let mut nan = m.clone();
        nan.set(1, 1, f32::NAN);
        assert_eq!(pca_map(&nan, None), Err(MapError::NonFinite { row: 1 }));
    }

    #[test]
    fn one_image_or_identical_images_map_to_the_origin() {
        let m = Mat::from_rows(&[vec![0.3, 0.4], vec![0.3, 0.4]], 2);
        let map = pca_map(&m, None).unwrap();
        assert_eq!(map.points, vec![[0.0, 0.0]; 2]);
        assert_eq!(
            map.layout,
            Layout::Pca {
                explained: [0.0; 2]
            }
        );
    }
}
