//! Similarity over CLIP features: ranking every image by cosine to a query vector (a phrase's text feature, or
//! the mean of some images' features: "more like this"), and grouping near-duplicates.
//!
//! Why blocks: the near-duplicate search compares every pair, and an `N×N` similarity matrix of 10,000 images
//! is 400 MB of `f32` (40 GB at 100,000). The rows are compared a block at a time (`B×N`, [`BLOCK`] rows), so
//! memory is bounded by `B·N` whatever the folder's size, and each block is one [`gemm`] call.
//!
//! Rows that are all zero (images that could not be read are stored so) have no direction: they score
//! `None` and never join a group.

use crate::linalg::{dot, gemm, mean_normalized, normalize, Mat, Tr};
use crate::progress::{CancelToken, Progress};

/// Rows of one block of the pairwise comparison: 512 rows × 10,000 images is 20 MB.
pub const BLOCK: usize = 512;

/// The default cosine above which two images count as near-duplicates. CLIP ViT-B/32 features of the same
/// photo re-encoded or resized are ≥ 0.97 apart; two different photos of one scene are usually 0.85–0.95.
pub const DEFAULT_DUPLICATE_THRESHOLD: f32 = 0.95;

#[derive(Debug, thiserror::Error)]
pub enum SimilarityError {
    #[error("the query has {query} dimensions but the features have {features}")]
    Dimensions { query: usize, features: usize },
    #[error("the query vector is zero (no image of the selection has features)")]
    ZeroQuery,
    #[error("cancelled")]
    Cancelled,
}

/// Cosine of every row of `features` to `query`; `None` for rows of zero length.
pub fn cosine_scores(features: &Mat, query: &[f32]) -> Result<Vec<Option<f32>>, SimilarityError> {
    if query.len() != features.cols {
        return Err(SimilarityError::Dimensions {
            query: query.len(),
            features: features.cols,
        });
    }
    let mut q = query.to_vec();
    normalize(&mut q);
    if dot(&q, &q) == 0.0 {
        return Err(SimilarityError::ZeroQuery);
    }
    use rayon::prelude::*;
    Ok((0..features.rows)
        .into_par_iter()
        .map(|i| {
            let r = features.row(i);
            let n = dot(r, r).sqrt();
            (n > 0.0 && n.is_finite()).then(|| dot(r, &q) / n)
        })
        .collect())
}

/// The normalised mean of the given rows (rows of zero length left out): the query of "more like this".
pub fn mean_query(features: &Mat, rows: &[usize]) -> Result<Vec<f32>, SimilarityError> {
    let mut normed: Vec<Vec<f32>> = Vec::with_capacity(rows.len());
    for &i in rows.iter().filter(|&&i| i < features.rows) {
        let mut r = features.row(i).to_vec();
        normalize(&mut r);
        if dot(&r, &r) > 0.0 {
            normed.push(r);
        }
    }
    if normed.is_empty() {
        return Err(SimilarityError::ZeroQuery);
    }
    let refs: Vec<&[f32]> = normed.iter().map(Vec::as_slice).collect();
    Ok(mean_normalized(&refs, features.cols))
}

/// Row indices by descending score (rows without a score last, in index order); at most `top` of them.
pub fn rank(scores: &[Option<f32>], top: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| match (scores[a], scores[b]) {
        (Some(x), Some(y)) => y.total_cmp(&x).then(a.cmp(&b)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(&b),
    });
    if let Some(t) = top {
        order.truncate(t);
    }
    order
}

/// One group of near-duplicates: image rows (ascending) and the smallest cosine of the pairs that joined them.
#[derive(Clone, Debug, PartialEq)]
pub struct DuplicateGroup {
    pub members: Vec<usize>,
    /// The weakest link that put the group together (every joining pair is at least this similar).
    pub min_cosine: f32,
}

/// Groups of rows connected by pairs with cosine ≥ `threshold` (single linkage, through a union-find), largest
/// first; rows that match nothing are not listed. Compares the rows a block at a time (see the module docs),
/// reporting progress per block and stopping when `cancel` is set.
pub fn near_duplicate_groups(
    features: &Mat,
    threshold: f32,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Vec<DuplicateGroup>, SimilarityError> {
    let n = features.rows;
    let d = features.cols;
    let unit = features.normalized_rows();
    let valid: Vec<bool> = (0..n)
        .map(|i| {
            let r = unit.row(i);
            dot(r, r) > 0.5
        })
        .collect();
    let mut uf = UnionFind::new(n);
    // The weakest joining link per root, merged as roots merge.
    let mut weakest = vec![f32::INFINITY; n];
    let mut block = vec![0.0f32; BLOCK.min(n.max(1)) * n];
    let blocks = n.div_ceil(BLOCK);
    progress.set_stage_counting("looking for near-duplicates", "blocks");
    for b in 0..blocks {
        if cancel.is_cancelled() {
            return Err(SimilarityError::Cancelled);
        }
        let start = b * BLOCK;
        let rows = BLOCK.min(n - start);
        // Only the columns from `start` on: the pairs left of the block were compared in earlier blocks.
        let cols = n - start;
        let out = &mut block[..rows * cols];
        gemm(
            out,
            (rows, cols, d),
            &unit.data[start * d..(start + rows) * d],
            Tr::N,
            &unit.data[start * d..],
            Tr::T,
            1.0,
            0.0,
        );
        for r in 0..rows {
            let i = start + r;
            if !valid[i] {
                continue;
            }
            let line = &out[r * cols..(r + 1) * cols];
            // j > i only: each pair once, never an image with itself.
            for (c, &s) in line.iter().enumerate().skip(r + 1) {
                let j = start + c;
                if s >= threshold && valid[j] {
                    let (ri, rj) = (uf.find(i), uf.find(j));
                    let w = weakest[ri].min(weakest[rj]).min(s);
                    let root = uf.union(ri, rj);
                    weakest[root] = w;
                }
            }
        }
        progress.update(b + 1, blocks);
    }
    let mut by_root: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for i in 0..n {
        by_root.entry(uf.find(i)).or_default().push(i);
    }
    let mut groups: Vec<DuplicateGroup> = by_root
        .into_iter()
        .filter(|(_, m)| m.len() > 1)
        .map(|(root, members)| DuplicateGroup {
            members,
            min_cosine: weakest[root],
        })
        .collect();
    groups.sort_by(|a, b| {
        b.members
            .len()
            .cmp(&a.members.len())
            .then(a.members[0].cmp(&b.members[0]))
    });
    Ok(groups)
}

/// Disjoint sets with path halving and union by size.
struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    /// Joins the sets of two roots; returns the new root.
    fn union(&mut self, a: usize, b: usize) -> usize {
        if a == b {
            return a;
        }
        let (big, small) = if self.size[a] >= self.size[b] {
            (a, b)
        } else {
            (b, a)
        };
        self.parent[small] = big;
        self.size[big] += self.size[small];
        big
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::rng::Rng;

    fn random_unit(rng: &mut Rng, d: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        normalize(&mut v);
        v
    }

    #[test]
    fn scores_are_cosines_and_rank_puts_the_closest_first() {
        let f = Mat::from_vec(
            4,
            2,
            vec![
                1.0, 0.0, // cos 1 to the query (1, 0)
                0.0, 2.0, // cos 0, not unit length
                0.0, 0.0, // no direction
                -3.0, 3.0, // cos −0.707
            ],
        );
        let s = cosine_scores(&f, &[2.0, 0.0]).unwrap();
        assert!((s[0].unwrap() - 1.0).abs() < 1e-6);
        assert!(s[1].unwrap().abs() < 1e-6);
        assert_eq!(s[2], None);
        assert!((s[3].unwrap() + std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(rank(&s, None), vec![0, 1, 3, 2]);
        assert_eq!(rank(&s, Some(2)), vec![0, 1]);
        assert!(matches!(
            cosine_scores(&f, &[1.0, 0.0, 0.0]),
            Err(SimilarityError::Dimensions { .. })
        ));
        assert!(matches!(
            cosine_scores(&f, &[0.0, 0.0]),
            Err(SimilarityError::ZeroQuery)
        ));
    }

    #[test]
    fn the_mean_query_weighs_each_image_once_whatever_its_length() {
        let f = Mat::from_vec(3, 2, vec![10.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        let q = mean_query(&f, &[0, 1, 2]).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((q[0] - h).abs() < 1e-6 && (q[1] - h).abs() < 1e-6, "{q:?}");
        assert!(matches!(
            mean_query(&f, &[2]),
            Err(SimilarityError::ZeroQuery)
        ));
    }

    /// Groups planted among random vectors across block boundaries are found exactly, against a brute-force
    /// pair list.
    #[test]
    fn near_duplicates_across_blocks_match_brute_force() {
        let mut rng = Rng::new(7);
        let d = 32;
        let n = BLOCK * 2 + 37;
        let mut rows: Vec<Vec<f32>> = (0..n).map(|_| random_unit(&mut rng, d)).collect();
        // Copies with a little noise: 5 ← 0, 600 ← 0 (another block), 1050 ← 600 (chain, a third block), 42 ← 41.
        let jitter = |v: &[f32], rng: &mut Rng| {
            let mut w: Vec<f32> = v.iter().map(|x| x + 0.01 * rng.normal()).collect();
            normalize(&mut w);
            w
        };
        rows[5] = jitter(&rows[0], &mut rng);
        rows[600] = jitter(&rows[0], &mut rng);
        rows[1050] = jitter(&rows[600], &mut rng);
        rows[42] = jitter(&rows[41], &mut rng);
        rows[77] = vec![0.0; d];
        rows[78] = vec![0.0; d];
        let f = Mat::from_rows(&rows, d);
        let groups = near_duplicate_groups(&f, 0.95, &NoProgress, &CancelToken::new()).unwrap();
        assert_eq!(
            groups.iter().map(|g| g.members.clone()).collect::<Vec<_>>(),
            vec![vec![0, 5, 600, 1050], vec![41, 42]],
            "zero rows are never duplicates of each other"
        );
        // Brute force: every pair at or above the threshold lies inside one group.
        let unit = f.normalized_rows();
        for i in 0..n {
            for j in i + 1..n {
                let c = dot(unit.row(i), unit.row(j));
                if c >= 0.95 {
                    assert!(groups
                        .iter()
                        .any(|g| g.members.contains(&i) && g.members.contains(&j)));
                }
            }
        }
        assert!(groups
            .iter()
            .all(|g| g.min_cosine >= 0.95 && g.min_cosine <= 1.0001));
        let cancelled = CancelToken::new();
        cancelled.cancel();
        assert!(matches!(
            near_duplicate_groups(&f, 0.95, &NoProgress, &cancelled),
            Err(SimilarityError::Cancelled)
        ));
    }
}
