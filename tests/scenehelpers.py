"""Small synthetic scenes for the re-ranking tests (imported as ``from scenehelpers import …``,
as ``apphelpers``)."""
import numpy as np


def rect_scene(pipe, rects, square=(10, 50), given_moving: bool = True):
    """A 128 × 128 fixed image whose objects are the rectangles ``rects`` ((y0, y1, x0, x1)
    each, bright on dark) and a 64 × 64 moving image with one bright square [a, b)² for
    ``square`` = (a, b), prepared by ``pipe`` with the fixed mask given (and the moving mask
    too if ``given_moving``, else segmented). Returns (prep, lb, fixed mask)."""
    fixed = np.zeros((128, 128), bool)
    for y0, y1, x0, x1 in rects:
        fixed[y0:y1, x0:x1] = True
    img = (fixed * 200 + 20).astype(np.uint8)
    moving = np.zeros((64, 64), np.uint8)
    moving[square[0]:square[1], square[0]:square[1]] = 220
    prep = pipe._prepare([(moving, img)], [moving > 0 if given_moving else None], [fixed])
    _, _, lb = pipe._ssd_inputs(prep)
    return prep, lb, fixed
