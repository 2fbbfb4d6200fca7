"""Classical registration peers, for comparison with the learned matcher.

SimpleITK is optional (``pip install SimpleITK``): :func:`available` says whether it is there.
Functions take two boolean masks (H, W) and return the warped moving mask (H, W) bool and the
dense displacement of the sampling map (H, W, 2), (x, y) in pixels, fixed pixel → moving pixel.
"""
from __future__ import annotations

import numpy as np

# chosen by ``python benchmarks/peers.py --tune`` on 100 training pairs
DEMONS_ITERATIONS = 400
DEMONS_STD = 0.5


def available() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def _check(moving: np.ndarray, fixed: np.ndarray) -> None:
    for name, a in (("moving", moving), ("fixed", fixed)):
        if not isinstance(a, np.ndarray) or a.ndim != 2 or min(a.shape) < 4:
            raise ValueError(f"{name}: expected a 2-D mask of at least 4×4, got "
                             f"{getattr(a, 'shape', type(a).__name__)}")


def sitk_image(a: np.ndarray, sigma: float = 0.0):
    import cv2
    import SimpleITK as sitk
    a = a.astype(np.float32)
    if sigma > 0:
        a = cv2.GaussianBlur(a, (0, 0), sigma)
    return sitk.GetImageFromArray(a)


def resample(moving: np.ndarray, ref, transform) -> np.ndarray:
    """Warp a mask with a SimpleITK transform onto ``ref``'s grid, linear, threshold 0.5."""
    import SimpleITK as sitk
    out = sitk.Resample(sitk.GetImageFromArray(moving.astype(np.float32)), ref, transform,
                        sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out) > 0.5


def demons(moving: np.ndarray, fixed: np.ndarray, iterations: int = DEMONS_ITERATIONS,
           std: float = DEMONS_STD) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK diffeomorphic demons on two masks → warped moving mask, displacement."""
    import SimpleITK as sitk
    _check(moving, fixed)
    f, m = sitk_image(fixed), sitk_image(moving)
    d = sitk.DiffeomorphicDemonsRegistrationFilter()
    d.SetNumberOfIterations(int(iterations))
    d.SetStandardDeviations(float(std))
    field = d.Execute(f, m)
    disp = sitk.GetArrayFromImage(field).astype(np.float64)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return resample(moving, f, tx), disp
