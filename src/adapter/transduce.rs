//! Transductive refinement (beyond the paper): the person's folder *is* the unlabelled set, so its images'
//! features are used to refine the inductive predictions. The anchor is TransCLIP (Zanella, Gérin, Ben Ayed,
//! NeurIPS 2024): a Gaussian mixture over the unlabelled features, one component per class with a shared
//! covariance, fitted by alternating the soft assignments `z` and the Gaussian's parameters, with a KL term
//! that keeps `z` close to the inductive (language-informed) predictions `ŷ`:
//! ```text
//! z_i ∝ ŷ_i^λ ⊙ exp(log N(x_i; μ_k, Σ) · 512 / (T·D))  (assignments, every unlabelled image i)
//! μ_k = norm(Σ_i z_ik x_i + w Σ_{s: y_s = k} x_s)        (labelled images s count w times an unlabelled one)
//! Σ   = shrink( Σ_i Σ_k z_ik (x_i − μ_k)(x_i − μ_k)ᵀ + w Σ_s (x_s − μ_{y_s})(x_s − μ_{y_s})ᵀ ) / (N + w S)
//! ```
//! starting from `z = ŷ`, `μ_k` = the normalised mean of class `k`'s labelled images (the `ŷ`-weighted mean
//! of the unlabelled ones for a class without labels) and `Σ = I/D`, for `iterations` rounds.
//!
//! Where this departs from TransCLIP, each by measurement (`hegraph eval --transductive` on
//! stanford_cars_even and oxford_pets25, 1–16 shots, 3 seeds, both protocols, on top of HeGraphAdapter; the
//! tables are in `BENCHMARKS.md`):
//! - **Full shared covariance, shrunk towards its diagonal** (`shrink(Σ) = (1 − ρ)Σ + ρ diag Σ`, ρ =
//!   [`TransductionParams::shrinkage`]) instead of TransCLIP's diagonal one (ρ = 1). CLIP's features are
//!   strongly correlated across dimensions (as GDA, Wang et al. ICLR 2024, exploits): without a validation
//!   split the full covariance beat the diagonal by +2.4 / +2.0 / +1.4 points at 2 / 4 / 8 shots on Cars and
//!   by +0.5 to +0.8 on pets25; with one, by +1.6 to +2.1 on Cars and +0.2 to +1.0 on pets25.
//! - **No Laplacian term** (TransCLIP's kNN affinity between unlabelled images): in a numpy prototype with the
//!   diagonal mixture it cost 0.7 to 1.1 points at 1–4 shots on Cars (small pool, neighbours often of another
//!   class); without it a round costs two products of the unlabelled features with `D×C` matrices, so 10,000
//!   images × 100 classes refine in 0.8 s on two cores (`hegraph bench transduce`).
//! - **λ = 1** (TransCLIP few-shot: 0.5): λ = 0.5 lost 0.5 to 1.2 points at 2–4 shots on Cars, where
//!   transduction matters most, and gained 0.1 to 0.4 on pets25 and at 1, 8 and 16 shots on Cars.
//! - **The labelled images' weight is fixed** ([`TransductionParams::support_weight`] = 1: a labelled image
//!   counts as one unlabelled one) instead of chosen on a validation split from TransCLIP's list, since the
//!   app has no validation split; 0.5 gave the same figures within ±0.5.
//!
//! The log-density's `−½ xᵀΣ⁻¹x` is the same for every class and cancels in `z`'s normalisation, so only
//! `x·Σ⁻¹μ_k − ½ μ_kᵀΣ⁻¹μ_k` is formed; `Σ⁻¹μᵀ` comes from one Cholesky solve per round.

use serde::{Deserialize, Serialize};

use super::AdapterError;
use crate::linalg::{cholesky_solve, fast_exp, gemm, Mat, Tr};

/// The transduction's settings (module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransductionParams {
    /// Exponent λ of the inductive predictions in the assignments.
    pub lambda: f32,
    /// Temperature `T` dividing the log-density, for 512-dimensional features; a log-density grows with the
    /// dimension `D`, so `T · D / 512` is used (ViT-B's 512 dimensions as measured, ViT-L's 768 alike).
    pub temperature: f32,
    /// Shrinkage ρ of the covariance towards its diagonal, in [0, 1].
    pub shrinkage: f32,
    /// Rounds of (assignments, means, covariance).
    pub iterations: usize,
    /// Weight of one labelled image in the means and the covariance, relative to one unlabelled image.
    pub support_weight: f32,
}

impl Default for TransductionParams {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            temperature: 30.0,
            shrinkage: 0.85,
            iterations: 10,
            support_weight: 1.0,
        }
    }
}

impl TransductionParams {
    fn check(&self) -> Result<(), AdapterError> {
        let ok = self.lambda.is_finite()
            && self.lambda >= 0.0
            && self.temperature.is_finite()
            && self.temperature > 0.0
            && (0.0..=1.0).contains(&self.shrinkage)
            && self.support_weight.is_finite()
            && self.support_weight >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(AdapterError::Input(format!(
                "invalid transduction settings {self:?}: λ ≥ 0, temperature > 0, shrinkage in [0, 1], support weight ≥ 0"
            )))
        }
    }
}

/// Refines the inductive probabilities `prior` (N×C, rows summing to 1) of the unlabelled images `pool`
/// (N×D) with the labelled images `support` (S×D, labels `support_labels`); returns the refined N×C
/// probabilities (module docs). With no unlabelled image there is nothing to refine.
pub fn transduce(
    pool: &Mat,
    prior: &Mat,
    support: &Mat,
    support_labels: &[usize],
    params: &TransductionParams,
) -> Result<Mat, AdapterError> {
    params.check()?;
    let (n, d, c) = (pool.rows, pool.cols, prior.cols);
    if prior.rows != n {
        return Err(AdapterError::Input(format!(
            "transduction: {n} unlabelled images but {} prediction rows",
            prior.rows
        )));
    }
    if support.rows != support_labels.len() || (support.rows > 0 && support.cols != d) {
        return Err(AdapterError::Input(format!(
            "transduction: {} labelled rows of dimension {} for {} labels and dimension {d}",
            support.rows,
            support.cols,
            support_labels.len()
        )));
    }
    if let Some(&l) = support_labels.iter().find(|&&l| l >= c) {
        return Err(AdapterError::Input(format!(
            "transduction: label {l} is out of range for {c} classes"
        )));
    }
    if n == 0 || c == 0 || d == 0 {
        return Ok(prior.clone());
    }
    if !pool.is_finite() || !prior.is_finite() || !support.is_finite() {
        return Err(AdapterError::Input(
            "transduction: the features or predictions contain NaN or infinity".into(),
        ));
    }
    let q = pool.normalized_rows();
    let s = support.normalized_rows();
    let sw = params.support_weight;
    let log_prior: Vec<f32> = prior
        .data
        .iter()
        .map(|&p| params.lambda * p.max(1e-12).ln())
        .collect();

    // Per-class sums of the labelled images, and their counts.
    let mut s_sum = Mat::zeros(c, d);
    let mut s_count = vec![0usize; c];
    for (r, &l) in support_labels.iter().enumerate() {
        s_count[l] += 1;
        for (o, &x) in s_sum.row_mut(l).iter_mut().zip(s.row(r)) {
            *o += x;
        }
    }
    // Initial means: the labelled images' mean, or for a class without any, the ŷ-weighted unlabelled mean.
    let mut mu = s_sum.clone();
    if s_count.contains(&0) {
        let mut a = Mat::zeros(c, d);
        gemm(
            &mut a.data,
            (c, d, n),
            &prior.data,
            Tr::T,
            &q.data,
            Tr::N,
            1.0,
            0.0,
        );
        for k in (0..c).filter(|&k| s_count[k] == 0) {
            mu.row_mut(k).copy_from_slice(a.row(k));
        }
    }
    mu.l2_normalize_rows();
    // The pool's second moment, the same every round (each row's assignments sum to 1).
    let mut gram = Mat::zeros(d, d);
    gemm(
        &mut gram.data,
        (d, d, n),
        &q.data,
        Tr::T,
        &q.data,
        Tr::N,
        1.0,
        0.0,
    );

    // Σ⁻¹μᵀ (D×C); the first round uses Σ = I/D.
    let mut prec_mu = mu.transpose();
    prec_mu.data.iter_mut().for_each(|x| *x *= d as f32);
    let mut z = Mat::zeros(n, c);
    let mut lin = Mat::zeros(n, c);
    for round in 0..=params.iterations {
        // Assignments.
        gemm(
            &mut lin.data,
            (n, c, d),
            &q.data,
            Tr::N,
            &prec_mu.data,
            Tr::N,
            1.0,
            0.0,
        );
        let quad: Vec<f32> = (0..c)
            .map(|k| {
                (0..d)
                    .map(|j| mu.get(k, j) * prec_mu.get(j, k))
                    .sum::<f32>()
            })
            .collect();
        let inv_t = 512.0 / (params.temperature * d as f32);
        for i in 0..n {
            let row = z.row_mut(i);
            let l = lin.row(i);
            let lp = &log_prior[i * c..(i + 1) * c];
            // The log-density relative to its row maximum first, so that a huge common value (a dimension
            // without spread) cannot swamp the prior's log-probabilities in f32.
            let gmax = (0..c)
                .map(|k| l[k] - 0.5 * quad[k])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut mx = f32::NEG_INFINITY;
            for k in 0..c {
                row[k] = lp[k] + (l[k] - 0.5 * quad[k] - gmax) * inv_t;
                mx = mx.max(row[k]);
            }
            let mut sum = 0.0f32;
            for v in row.iter_mut() {
                *v = fast_exp(*v - mx);
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
        if round == params.iterations {
            break;
        }
        // Means.
        let mut a = Mat::zeros(c, d);
        gemm(
            &mut a.data,
            (c, d, n),
            &z.data,
            Tr::T,
            &q.data,
            Tr::N,
            1.0,
            0.0,
        );
        let mut nk = vec![0.0f32; c];
        for i in 0..n {
            for (o, &v) in nk.iter_mut().zip(z.row(i)) {
                *o += v;
            }
        }
        for k in 0..c {
            let row = mu.row_mut(k);
            for (j, o) in row.iter_mut().enumerate() {
                *o = a.get(k, j) + sw * s_sum.get(k, j);
            }
        }
        mu.l2_normalize_rows();
        // Covariance: Σ_i Σ_k z_ik (x_i − μ_k)(x_i − μ_k)ᵀ = G − AᵀM − MᵀA + Mᵀ diag(n_k) M.
        let mut cov = gram.clone();
        let mut at_m = Mat::zeros(d, d);
        gemm(
            &mut at_m.data,
            (d, d, c),
            &a.data,
            Tr::T,
            &mu.data,
            Tr::N,
            1.0,
            0.0,
        );
        let mut scaled_mu = mu.clone();
        for (k, &n_k) in nk.iter().enumerate() {
            let f = n_k.max(0.0).sqrt();
            scaled_mu.row_mut(k).iter_mut().for_each(|x| *x *= f);
        }
        gemm(
            &mut cov.data,
            (d, d, c),
            &scaled_mu.data,
            Tr::T,
            &scaled_mu.data,
            Tr::N,
            1.0,
            1.0,
        );
        for i in 0..d {
            for j in 0..d {
                let v = cov.get(i, j) - at_m.get(i, j) - at_m.get(j, i);
                cov.set(i, j, v);
            }
        }
        let mut total = n as f32;
        if sw > 0.0 && s.rows > 0 {
            let mut resid = s.clone();
            for (r, &l) in support_labels.iter().enumerate() {
                for (o, &m) in resid.row_mut(r).iter_mut().zip(mu.row(l)) {
                    *o -= m;
                }
            }
            gemm(
                &mut cov.data,
                (d, d, s.rows),
                &resid.data,
                Tr::T,
                &resid.data,
                Tr::N,
                sw,
                1.0,
            );
            total += sw * s.rows as f32;
        }
        let keep = 1.0 - params.shrinkage;
        let mut diag_mean = 0.0f32;
        for i in 0..d {
            for j in 0..d {
                let v = cov.get(i, j) / total;
                cov.set(i, j, if i == j { v } else { v * keep });
            }
            diag_mean += cov.get(i, i) / d as f32;
        }
        // A floor on the diagonal keeps Σ positive definite when a dimension has no spread at all.
        let floor = 1e-6 * diag_mean.max(0.0) + 1e-9;
        for i in 0..d {
            cov.set(i, i, cov.get(i, i).max(0.0) + floor);
        }
        prec_mu = match cholesky_solve(&cov, &mu.transpose()) {
            Some(p) => p,
            None => {
                // Not positive definite (shrinkage 0 on too few images): the diagonal alone.
                let mut p = mu.transpose();
                for j in 0..d {
                    let inv = 1.0 / cov.get(j, j);
                    p.row_mut(j).iter_mut().for_each(|x| *x *= inv);
                }
                p
            }
        };
    }
    Ok(z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::unit_rows_around as cloud;
    use crate::rng::Rng;

    fn accuracy(p: &Mat, labels: &[usize]) -> f32 {
        crate::adapter::accuracy_of(p, labels)
    }

    /// Well-separated clusters, predictions that are right 60 % of the time and not confident: the mixture
    /// must recover the clusters; rows stay probabilities.
    #[test]
    fn transduction_fixes_weak_predictions_on_clustered_features() {
        let (c, d, per) = (4, 16, 30);
        let mut rng = Rng::new(9);
        let mut centres = Mat::from_vec(c, d, rng.normal_vec(c * d));
        centres.l2_normalize_rows();
        let labels: Vec<usize> = (0..c * per).map(|i| i % c).collect();
        let pool = cloud(&mut rng, &centres, &labels, 0.15);
        let mut prior = Mat::zeros(labels.len(), c);
        for (i, &l) in labels.iter().enumerate() {
            let guess = if i % 5 < 3 { l } else { (l + 1) % c };
            for k in 0..c {
                prior.set(
                    i,
                    k,
                    if k == guess {
                        0.4
                    } else {
                        0.6 / (c - 1) as f32
                    },
                );
            }
        }
        let sup_labels: Vec<usize> = (0..c).collect();
        let support = cloud(&mut rng, &centres, &sup_labels, 0.15);
        let before = accuracy(&prior, &labels);
        let z = transduce(
            &pool,
            &prior,
            &support,
            &sup_labels,
            &TransductionParams::default(),
        )
        .unwrap();
        let after = accuracy(&z, &labels);
        assert!(before < 0.65 && after > 0.95, "{before} → {after}");
        for r in 0..z.rows {
            let s: f32 = z.row(r).iter().sum();
            assert!((s - 1.0).abs() < 1e-4 && z.row(r).iter().all(|v| v.is_finite()));
        }
    }

    /// A class without labelled images gets its mean from the predictions; one unlabelled image, one
    /// dimension and shrinkage 0 still give finite probabilities.
    #[test]
    fn transduction_handles_awkward_shapes() {
        let mut rng = Rng::new(4);
        let pool = Mat::from_vec(7, 5, rng.normal_vec(35));
        let mut prior = Mat::from_vec(7, 3, vec![1.0 / 3.0; 21]);
        prior.set(0, 2, 0.5);
        let support = Mat::from_vec(2, 5, rng.normal_vec(10));
        let params = TransductionParams {
            shrinkage: 0.0,
            ..Default::default()
        };
        let z = transduce(&pool, &prior, &support, &[0, 0], &params).unwrap();
        assert!(z.is_finite() && z.shape() == (7, 3));

        let one = Mat::from_vec(1, 1, vec![1.0]);
        let z = transduce(
            &one,
            &Mat::from_vec(1, 2, vec![0.3, 0.7]),
            &one,
            &[1],
            &params,
        )
        .unwrap();
        assert!(z.is_finite() && z.get(0, 1) > 0.5, "{z:?}");

        let empty = transduce(
            &Mat::zeros(0, 5),
            &Mat::zeros(0, 3),
            &support,
            &[0, 1],
            &params,
        );
        assert_eq!(empty.unwrap().shape(), (0, 3));
    }

    #[test]
    fn transduction_refuses_inconsistent_input() {
        let pool = Mat::from_vec(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let prior = Mat::from_vec(2, 2, vec![0.5; 4]);
        let p = TransductionParams::default();
        assert!(transduce(&pool, &Mat::zeros(3, 2), &pool, &[0, 1], &p).is_err());
        assert!(transduce(&pool, &prior, &pool, &[0, 5], &p).is_err());
        assert!(transduce(&pool, &prior, &pool, &[0], &p).is_err());
        let bad = TransductionParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert!(transduce(&pool, &prior, &pool, &[0, 1], &bad).is_err());
        let mut nan = pool.clone();
        nan.set(0, 0, f32::NAN);
        assert!(transduce(&nan, &prior, &pool, &[0, 1], &p).is_err());
    }
}
