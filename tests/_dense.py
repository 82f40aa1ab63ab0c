"""Dense float64 references for the statistics tests (the definitions, transcribed naively)."""

from __future__ import annotations

import numpy as np

from covinit.stats import Moments


def dense(x: np.ndarray) -> dict[str, np.ndarray]:
    """n, mean, centred co-moment, third and fourth terms of the rows of ``x``, in numpy."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean(axis=0)
    xc = x - m
    sq = (xc**2).sum(axis=1)
    return {"n": x.shape[0], "mean": m, "m2": xc.T @ xc, "t": xc.T @ sq, "q": (sq**2).sum(),
            # Σ‖x−m‖³: the size of t's summands, which cancel when the data are spread
            # symmetrically, so t can only be compared relative to them.
            "t_scale": (sq**1.5).sum()}


def assert_matches(mom: Moments, ref: dict[str, np.ndarray], rtol: float = 1e-10) -> None:
    """Each field equal to the reference within ``rtol`` of the field's largest entry (for
    ``t``, of its summands' total size)."""
    assert mom.n == ref["n"]
    for key in ("mean", "m2", "t", "q"):
        got = getattr(mom, key).cpu().numpy()
        scale = max(np.abs(ref[key]).max(), ref["t_scale"] if key == "t" else 0.0, 1e-300)
        np.testing.assert_allclose(got, ref[key], rtol=0, atol=rtol * scale, err_msg=key)
