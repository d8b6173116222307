"""The transductive refinement of `src/adapter/transduce.rs` in numpy, for `hegraph bench transduce` to time
side by side: same sizes, same rounds, same operations (a full shared covariance shrunk towards its diagonal,
one solve per round). Synthetic clustered features; prints the fastest of three runs in seconds. Needs numpy
(`pip install numpy`); never a dependency of hegraph itself."""
import sys
import time

import numpy as np


def transduce(q, prior, s, ys, c, lam=1.0, temp=30.0, shrink=0.85, rounds=10, sw=1.0):
    n, d = q.shape
    lp = lam * np.log(np.maximum(prior, 1e-12))
    ls = np.eye(c, dtype=np.float32)[ys]
    s_sum = ls.T @ s
    mu = s_sum / np.linalg.norm(s_sum, axis=1, keepdims=True)
    gram = q.T @ q
    prec_mu = d * mu.T
    inv_t = 512.0 / (temp * d)
    for r in range(rounds + 1):
        g = q @ prec_mu - 0.5 * np.sum(mu * prec_mu.T, axis=1)[None, :]
        g -= g.max(1, keepdims=True)
        z = lp + g * inv_t
        z = np.exp(z - z.max(1, keepdims=True))
        z /= z.sum(1, keepdims=True)
        if r == rounds:
            return z
        a = z.T @ q
        nk = z.sum(0)
        mu = a + sw * s_sum
        mu /= np.linalg.norm(mu, axis=1, keepdims=True)
        atm = a.T @ mu
        cov = gram - atm - atm.T + (mu * nk[:, None]).T @ mu
        res = s - mu[ys]
        cov += sw * res.T @ res
        cov /= n + sw * len(ys)
        diag = np.diag(cov).copy()
        cov *= 1 - shrink
        cov[np.diag_indices(d)] = diag + 1e-6 * diag.mean() + 1e-9
        prec_mu = np.linalg.solve(cov, mu.T)


def main():
    n, c, ns, d, rounds = (int(x) for x in sys.argv[1:6])
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((c, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    yq = rng.integers(0, c, n)
    q = centres[yq] + 0.6 / np.sqrt(d) * rng.standard_normal((n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ys = np.repeat(np.arange(c), ns // c)
    s = centres[ys] + 0.6 / np.sqrt(d) * rng.standard_normal((len(ys), d)).astype(np.float32)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    logits = 100 * q @ centres.T * 0.3
    prior = np.exp(logits - logits.max(1, keepdims=True))
    prior /= prior.sum(1, keepdims=True)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        transduce(q, prior.astype(np.float32), s, ys, c, rounds=rounds)
        best = min(best, time.perf_counter() - t)
    print(f"{best:.4f}")


if __name__ == "__main__":
    main()
