"""so(8) generators and octonion triality (SO8T_SPEC.md §2-§3) for torch.

Generators are the 28 strict-upper entries of a skew-symmetric 8×8 matrix in row-major
order. σ± are solved once in f64 from the octonion product (512 equations, 56 unknowns);
family f of a head rotates by exp(σ_f A) (σ_0 = identity)."""
import functools

import numpy as np
import torch

TRIPLES = [(1, 2, 3), (1, 4, 5), (1, 7, 6), (2, 4, 6), (2, 5, 7), (3, 4, 7), (3, 6, 5)]
_ROWS, _COLS = np.triu_indices(8, 1)


def octonion_table():
    """t[i, j, k]: e_i e_j = Σ_k t[i, j, k] e_k."""
    t = np.zeros((8, 8, 8))
    for i in range(8):
        t[0, i, i] = t[i, 0, i] = 1
    for i in range(1, 8):
        t[i, i, 0] = -1
    for a, b, c in TRIPLES:
        for x, y, z in ((a, b, c), (b, c, a), (c, a, b)):
            t[x, y, z] = 1
            t[y, x, z] = -1
    return t


def skew(g):
    """`[..., 28]` packed generators → `[..., 8, 8]` skew-symmetric matrices (numpy or torch)."""
    if isinstance(g, torch.Tensor):
        a = g.new_zeros(g.shape[:-1] + (8, 8))
        a[..., _ROWS, _COLS] = g
        return a - a.transpose(-1, -2)
    a = np.zeros(g.shape[:-1] + (8, 8))
    a[..., _ROWS, _COLS] = g
    return a - np.swapaxes(a, -1, -2)


@functools.lru_cache(maxsize=1)
def triality_maps():
    """(σ₊, σ₋) as 28×28 f64 matrices: column n is the image of basis generator n."""
    t = octonion_table()
    mul = lambda x, y: np.einsum("i,j,ijk->k", x, y, t)
    e = np.eye(8)
    gens = skew(np.eye(28))
    m = np.zeros((512, 56))
    rhs = np.zeros((512, 28))
    for i in range(8):
        for j in range(8):
            r = slice((i * 8 + j) * 8, (i * 8 + j) * 8 + 8)
            for n in range(28):
                m[r, n] = mul(gens[n] @ e[i], e[j])
                m[r, 28 + n] = mul(e[i], gens[n] @ e[j])
                rhs[r, n] = gens[n] @ mul(e[i], e[j])
    x, *_ = np.linalg.lstsq(m, rhs, rcond=None)
    assert np.abs(m @ x - rhs).max() < 1e-10
    return x[:28], x[28:]


def family_generators(g: torch.Tensor):
    """The packed generators each family exponentiates: (A, σ₊A, σ₋A) for rows `[n, 28]`."""
    sp, sm = (torch.from_numpy(s).to(g.dtype).to(g.device) for s in triality_maps())
    return g, g @ sp.T, g @ sm.T
