//! Plain-Rust references for every kernel in [`super::kernels`], with the same argument order and semantics
//! (including `beta == 0` never reading the output). They accumulate in f64 and round once, so a disagreement
//! with the GPU measures the kernel's error, not the reference's. The `*_f64` forwards exist for
//! finite-difference checks of the backward kernels.

use super::kernels::{AdamW, Trans};
use crate::linalg::Mat;

fn keep(beta: f32, old: f32) -> f64 {
    if beta == 0.0 {
        0.0
    } else {
        f64::from(beta) * f64::from(old)
    }
}

/// `c = alpha · op(a) · op(b) + beta · c`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(c: &mut Mat, a: &Mat, ta: Trans, b: &Mat, tb: Trans, alpha: f32, beta: f32) {
    let at = |i: usize, k: usize| match ta {
        Trans::N => a.get(i, k),
        Trans::T => a.get(k, i),
    };
    let bt = |k: usize, j: usize| match tb {
        Trans::N => b.get(k, j),
        Trans::T => b.get(j, k),
    };
    let kdim = match ta {
        Trans::N => a.cols,
        Trans::T => a.rows,
    };
    for i in 0..c.rows {
        for j in 0..c.cols {
            let mut s = 0.0f64;
            for k in 0..kdim {
                s += f64::from(at(i, k)) * f64::from(bt(k, j));
            }
            let v = f64::from(alpha) * s + keep(beta, c.get(i, j));
            c.set(i, j, v as f32);
        }
    }
}

/// `y = a · x + b · y`.
pub fn axpby(a: f32, x: &[f32], b: f32, y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = (f64::from(a) * f64::from(xi) + keep(b, *yi)) as f32;
    }
}

/// `out = alpha · x ⊙ y + beta · out`.
pub fn mul(out: &mut [f32], x: &[f32], y: &[f32], alpha: f32, beta: f32) {
    for ((o, &xi), &yi) in out.iter_mut().zip(x).zip(y) {
        *o = (f64::from(alpha) * f64::from(xi) * f64::from(yi) + keep(beta, *o)) as f32;
    }
}

/// `y = scale · y + shift`.
pub fn affine(y: &mut [f32], scale: f32, shift: f32) {
    for v in y.iter_mut() {
        *v = (keep(scale, *v) + f64::from(shift)) as f32;
    }
}

pub fn tanh_f64(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v.tanh()).collect()
}

pub fn tanh(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f64::from(v).tanh() as f32).collect()
}

/// `dx = g ⊙ (1 − y²) + beta · dx`.
pub fn tanh_backward(dx: &mut [f32], g: &[f32], y: &[f32], beta: f32) {
    for ((d, &gi), &yi) in dx.iter_mut().zip(g).zip(y) {
        let y = f64::from(yi);
        *d = (f64::from(gi) * (1.0 - y * y) + keep(beta, *d)) as f32;
    }
}

pub fn exp_affine_f64(x: &[f64], sharpness: f64, shift: f64) -> Vec<f64> {
    x.iter().map(|v| (sharpness * (v - shift)).exp()).collect()
}

/// `exp(sharpness · (x − shift))`.
pub fn exp_affine(x: &[f32], sharpness: f32, shift: f32) -> Vec<f32> {
    x.iter()
        .map(|&v| (f64::from(sharpness) * (f64::from(v) - f64::from(shift))).exp() as f32)
        .collect()
}

/// `dx = sharpness · g ⊙ y + beta · dx`.
pub fn exp_affine_backward(dx: &mut [f32], g: &[f32], y: &[f32], sharpness: f32, beta: f32) {
    for ((d, &gi), &yi) in dx.iter_mut().zip(g).zip(y) {
        *d = (f64::from(sharpness) * f64::from(gi) * f64::from(yi) + keep(beta, *d)) as f32;
    }
}

/// `out = alpha · diag(s) · x + beta · out`.
pub fn row_scale(out: &mut Mat, s: &[f32], x: &Mat, alpha: f32, beta: f32) {
    for (i, &si) in s.iter().enumerate().take(x.rows) {
        for j in 0..x.cols {
            let v = f64::from(alpha) * f64::from(si) * f64::from(x.get(i, j))
                + keep(beta, out.get(i, j));
            out.set(i, j, v as f32);
        }
    }
}

/// `x[i, :] += alpha · b`.
pub fn add_row_broadcast(x: &mut Mat, b: &[f32], alpha: f32) {
    for i in 0..x.rows {
        for (v, &bj) in x.row_mut(i).iter_mut().zip(b) {
            *v = (f64::from(*v) + f64::from(alpha) * f64::from(bj)) as f32;
        }
    }
}

/// One AdamW step, PyTorch semantics: decoupled decay `p -= lr·wd·p`, then the bias-corrected Adam update.
pub fn adamw_step(
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    hp: &AdamW,
    step: u32,
) {
    let t = f64::from(step);
    let (lr, b1, b2) = (f64::from(hp.lr), f64::from(hp.beta1), f64::from(hp.beta2));
    let bc1 = 1.0 - b1.powf(t);
    let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
    for i in 0..param.len() {
        let g = f64::from(grad[i]);
        let mut p = f64::from(param[i]);
        p -= lr * f64::from(hp.weight_decay) * p;
        let mi = b1 * f64::from(m[i]) + (1.0 - b1) * g;
        let vi = b2 * f64::from(v[i]) + (1.0 - b2) * g * g;
        let denom = vi.sqrt() / bc2_sqrt + f64::from(hp.eps);
        p -= lr / bc1 * mi / denom;
        param[i] = p as f32;
        m[i] = mi as f32;
        v[i] = vi as f32;
    }
}

/// Row-wise `y = x / max(‖x‖, eps)`; returns `y` and the norms.
pub fn l2_normalize_rows_f64(
    x: &[f64],
    rows: usize,
    cols: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rows * cols];
    let mut norms = vec![0.0; rows];
    for i in 0..rows {
        let row = &x[i * cols..(i + 1) * cols];
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        norms[i] = n;
        let d = n.max(eps);
        for (o, v) in y[i * cols..(i + 1) * cols].iter_mut().zip(row) {
            *o = v / d;
        }
    }
    (y, norms)
}

pub fn l2_normalize_rows(x: &Mat, eps: f32) -> (Mat, Vec<f32>) {
    let xd: Vec<f64> = x.data.iter().map(|&v| f64::from(v)).collect();
    let (y, n) = l2_normalize_rows_f64(&xd, x.rows, x.cols, f64::from(eps));
    (
        Mat::from_vec(x.rows, x.cols, y.into_iter().map(|v| v as f32).collect()),
        n.into_iter().map(|v| v as f32).collect(),
    )
}

/// `dx = (dy − y·⟨dy, y⟩) / ‖x‖ + beta · dx`, or `dy / eps` where the norm was clamped.
pub fn l2_normalize_rows_backward(
    dx: &mut Mat,
    dy: &Mat,
    y: &Mat,
    norms: &[f32],
    eps: f32,
    beta: f32,
) {
    for (i, &norm) in norms.iter().enumerate().take(dy.rows) {
        let dot: f64 = dy
            .row(i)
            .iter()
            .zip(y.row(i))
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let n = f64::from(norm);
        for j in 0..dy.cols {
            let d = f64::from(dy.get(i, j));
            let g = if norm > eps {
                (d - f64::from(y.get(i, j)) * dot) / n
            } else {
                d / f64::from(eps)
            };
            dx.set(i, j, (g + keep(beta, dx.get(i, j))) as f32);
        }
    }
}

/// Per-row `logsumexp(row) − row[label]` (NaN for a label out of range).
pub fn softmax_xent_f64(logits: &[f64], rows: usize, cols: usize, labels: &[u32]) -> Vec<f64> {
    (0..rows)
        .map(|i| {
            let row = &logits[i * cols..(i + 1) * cols];
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            match row.get(labels[i] as usize) {
                Some(x) => lse - x,
                None => f64::NAN,
            }
        })
        .collect()
}

/// Per-row losses and `grad_scale · (softmax − onehot)`.
pub fn softmax_xent(logits: &Mat, labels: &[u32], grad_scale: f32) -> (Vec<f32>, Mat) {
    let (rows, cols) = logits.shape();
    let ld: Vec<f64> = logits.data.iter().map(|&v| f64::from(v)).collect();
    let loss = softmax_xent_f64(&ld, rows, cols, labels);
    let mut grad = Mat::zeros(rows, cols);
    for i in 0..rows {
        let row = &ld[i * cols..(i + 1) * cols];
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        let ok = (labels[i] as usize) < cols;
        for (j, &v) in row.iter().enumerate() {
            let mut g = (v - m).exp() / s;
            if j == labels[i] as usize {
                g -= 1.0;
            }
            if !ok {
                g = f64::NAN;
            }
            grad.set(i, j, (f64::from(grad_scale) * g) as f32);
        }
    }
    (loss.into_iter().map(|v| v as f32).collect(), grad)
}

/// `alpha · Σ x + beta · old`.
pub fn sum_all(x: &[f32], alpha: f32, beta: f32, old: f32) -> f32 {
    let s: f64 = x.iter().map(|&v| f64::from(v)).sum();
    (f64::from(alpha) * s + keep(beta, old)) as f32
}

/// `out[j] = alpha · Σ_i x[i, j] + beta · out[j]`.
pub fn col_sums(out: &mut [f32], x: &Mat, alpha: f32, beta: f32) {
    for (j, o) in out.iter_mut().enumerate() {
        let s: f64 = (0..x.rows).map(|i| f64::from(x.get(i, j))).sum();
        *o = (f64::from(alpha) * s + keep(beta, *o)) as f32;
    }
}

/// `out[i] = alpha · Σ_j x[i, j] + beta · out[i]`.
pub fn row_sums(out: &mut [f32], x: &Mat, alpha: f32, beta: f32) {
    for (i, o) in out.iter_mut().enumerate() {
        let s: f64 = x.row(i).iter().map(|&v| f64::from(v)).sum();
        *o = (f64::from(alpha) * s + keep(beta, *o)) as f32;
    }
}

/// `out[r, :] = src[idx[r], :]`, a NaN row for an index out of range.
pub fn gather_rows(src: &Mat, idx: &[u32]) -> Mat {
    let mut out = Mat::zeros(idx.len(), src.cols);
    for (r, &i) in idx.iter().enumerate() {
        let i = i as usize;
        for j in 0..src.cols {
            out.set(
                r,
                j,
                if i < src.rows {
                    src.get(i, j)
                } else {
                    f32::NAN
                },
            );
        }
    }
    out
}

/// The one-hot `M×C` matrix of class segments (`offsets`: C + 1 values, class c owning rows
/// `[offsets[c], offsets[c + 1])`): what the segment kernels multiply by without forming it.
pub fn segment_onehot(offsets: &[u32]) -> Mat {
    let c = offsets.len().saturating_sub(1);
    let m = offsets.last().copied().unwrap_or(0) as usize;
    let mut l = Mat::zeros(m, c);
    for k in 0..c {
        for r in offsets[k]..offsets[k + 1] {
            l.set(r as usize, k, 1.0);
        }
    }
    l
}

/// `out = alpha · x · L + beta · out` with `L` the one-hot segment matrix.
pub fn segment_sums(out: &mut Mat, x: &Mat, offsets: &[u32], alpha: f32, beta: f32) {
    matmul(
        out,
        x,
        Trans::N,
        &segment_onehot(offsets),
        Trans::N,
        alpha,
        beta,
    );
}

/// `out = alpha · x · Lᵀ + beta · out` with `L[m, labels[m]] = 1`; a label `>= C` gives a NaN column.
pub fn segment_expand(out: &mut Mat, x: &Mat, labels: &[u32], alpha: f32, beta: f32) {
    let mut l = Mat::zeros(labels.len(), x.cols);
    for (m, &c) in labels.iter().enumerate() {
        if (c as usize) < x.cols {
            l.set(m, c as usize, 1.0);
        }
    }
    matmul(out, x, Trans::N, &l, Trans::T, alpha, beta);
    for (m, &c) in labels.iter().enumerate() {
        if c as usize >= x.cols {
            for r in 0..out.rows {
                out.set(r, m, f32::NAN);
            }
        }
    }
}

/// `out = alpha · Lᵀ · x + beta · out` with `L` the one-hot segment matrix.
pub fn segment_row_sums(out: &mut Mat, x: &Mat, offsets: &[u32], alpha: f32, beta: f32) {
    matmul(
        out,
        &segment_onehot(offsets),
        Trans::T,
        x,
        Trans::N,
        alpha,
        beta,
    );
}
