"""Non-negative least squares for the cost model's fits."""

import numpy as np


def nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||Ax - b|| subject to x >= 0 (Lawson-Hanson active set), columns scaled first."""
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    A = A / scale
    n = A.shape[1]
    P = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    w = A.T @ (b - A @ x)
    for _ in range(3 * n):
        free = ~P
        if not free.any() or w[free].max() <= 1e-12:
            break
        P[np.argmax(np.where(free, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[P] = np.linalg.lstsq(A[:, P], b, rcond=None)[0]
            if (z[P] > 0).all():
                break
            neg = P & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            P &= x > 1e-15
            if not P.any():
                z = np.zeros(n)
                break
        x = z
        w = A.T @ (b - A @ x)
    return x / scale
