"""Gradio demo: find an object in a scene, then warp its mask onto the one found there.

UI only: all inference goes through ``registration.Pipeline`` and all drawing through
``registration.viz``. Run ``python app.py`` (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``
choose where it listens; default 127.0.0.1:7860).
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from registration import classical, viz
from registration.metrics import dice, iou
from registration.pipeline import Pipeline, RegistrationError

log = logging.getLogger("app")
if __name__ == "__main__":   # before the pipelines load, so their warnings are formatted too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
ROOT = Path(__file__).resolve().parent

# Two requests may run at once on a small CPU box; one thread each keeps them from fighting.
torch.set_flush_denormal(True)   # before the thread pool starts: denormal weights slow convs
torch.set_num_threads(int(os.environ.get("APP_TORCH_THREADS", "1")))

MAX_UPLOAD_PIXELS = 16_000_000          # 4000 × 4000; refused from the file header, undecoded
MIN_SIDE = 8                            # px, as the pipeline requires
BLANK_RANGE = 8                         # grey levels: less contrast than this is a blank image
# PIL refuses (DecompressionBombError) above 2× this, warns above 1×; we refuse above 1×
# ourselves before decoding, so the warning never matters.
PIL.Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS


@dataclass(frozen=True)
class DatasetEntry:
    """One selectable data set: the name ``Pipeline.from_pretrained`` knows, and its samples."""

    name: str
    label: str
    assets: Path                        # holds examples.json and the PNGs it lists


# Adding a data set is one entry here (plus its checkpoints and assets/<name>/)
DATASETS = [
    DatasetEntry("mnist", "MNIST digits", ROOT / "assets" / "mnist"),
    DatasetEntry("silhouettes", "Animal silhouettes in clutter", ROOT / "assets" / "silhouettes"),
    DatasetEntry("usct", "Liver tumours: ultrasound → CT (simulated)", ROOT / "assets" / "usct"),
]


def load_pipelines(entries: list[DatasetEntry]) -> dict[str, Pipeline]:
    """``Pipeline.from_pretrained`` once per data set, at start. A data set whose weights cannot
    be loaded is left out (logged), so the others still work. The networks stay eager (same
    outputs); ``start_freezing`` makes their frozen traces (~2 s) once the server is up."""
    pipes = {}
    for d in entries:
        try:
            pipes[d.name] = Pipeline.from_pretrained(d.name, freeze=False)
        except Exception:
            log.exception("could not load the %r pipeline; it is left out of the app", d.name)
    if not pipes:
        raise SystemExit("no pipeline could be loaded (see the log above); nothing to serve")
    return pipes


_STOP_FREEZING = threading.Event()


def start_freezing(pipes: list[Pipeline]) -> threading.Thread:
    """Freeze the pipelines' networks in a background thread while requests are served. At
    interpreter exit the thread is stopped after the network it is on and waited for: a torch
    call still running when the interpreter tears down aborts the process."""
    thread = threading.Thread(target=_freeze_all, args=(pipes,), daemon=True,
                              name="freeze-networks")

    def stop() -> None:
        _STOP_FREEZING.set()
        thread.join()

    atexit.register(stop)
    thread.start()
    return thread


def _freeze_all(pipes: list[Pipeline]) -> None:
    for p in pipes:
        if _STOP_FREEZING.is_set():
            return
        try:
            p.freeze()
        except Exception:                              # the eager networks keep serving
            log.exception("freezing a pipeline's networks failed; they stay eager")


def load_examples(entry: DatasetEntry) -> list[dict]:
    path = entry.assets / "examples.json"
    if not path.is_file():
        return []
    items = json.loads(path.read_text())["examples"]
    return [dict(it, moving=str(entry.assets / it["moving"]), fixed=str(entry.assets / it["fixed"]))
            for it in items]


# ---------------------------------------------------------------------------------------------
# inputs: plain errors for files that are not images, too big, too small or blank


def _plain(message: str) -> str:
    """A message fit to show: no server paths."""
    return re.sub(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-]+){2,}", "<file>", message)


@contextlib.contextmanager
def _no_pyi_stub():
    """Gradio writes a typing stub (``app.pyi``) beside the source of every component class it
    sees defined; ours needs none, and the repo should not grow a generated file."""
    meta = getattr(gr, "component_meta", None)
    original = getattr(meta, "create_or_modify_pyi", None)
    if original is None:
        yield
        return
    meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        meta.create_or_modify_pyi = original


def _too_large(what: str, size: tuple[int, int] | None = None) -> gr.Error:
    dims = f"{size[0]}×{size[1]} pixels is" if size else "the image is"
    return gr.Error(f"{what}: {dims} too large; the limit is "
                    f"{MAX_UPLOAD_PIXELS / 1e6:.0f} million pixels.", print_exception=False)


def _unreadable(what: str) -> gr.Error:
    return gr.Error(f"{what}: this file could not be read as an image (it is not one, or it is "
                    "damaged or incomplete). Please upload a PNG, JPEG, BMP, WebP, GIF or TIFF "
                    "picture.", print_exception=False)


def _stretch(a: np.ndarray, what: str) -> np.ndarray:
    """16-bit, 32-bit or float pixels → uint8, their own finite range stretched to 0–255 (such
    files have no agreed display range); NaN and infinity become background (the minimum)."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        raise gr.Error(f"{what}: the image holds no numbers (only NaN or infinity).",
                       print_exception=False)
    lo, hi = a[finite].min(), a[finite].max()
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((np.where(finite, a, lo) - lo) * (255 / (hi - lo))).astype(np.uint8)


def _flatten(im: PIL.Image.Image) -> PIL.Image.Image:
    """Transparent pixels shown on a background the visible ones stand out from: black behind
    light ink, white behind dark ink (a browser would show either on its page colour)."""
    rgba = np.asarray(im.convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255
    if alpha.min() >= 1:
        return im.convert("RGB")
    lum = rgba[..., :3].mean(axis=2)
    weight = float(alpha.sum())
    ink = float((lum * alpha[..., 0]).sum()) / weight if weight > 0 else 0.0
    background = 0.0 if ink > 127.5 else 255.0
    rgb = rgba[..., :3] * alpha + background * (1 - alpha)
    return PIL.Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def decode_image(source, what: str = "image", mode: str = "RGB") -> np.ndarray:
    """An uploaded file → what the handler gets: (H, W, 3) uint8 for ``mode`` "RGB", (H, W)
    uint8 for "L". ``source``: a path or a binary file object.

    Refused with a plain ``gr.Error``: files that are not images or are damaged or truncated,
    and more than ``MAX_UPLOAD_PIXELS`` (read from the header, before anything is decoded, so a
    decompression bomb costs nothing). Everything else is decoded as people see it: EXIF
    orientation applied, the first frame of an animation, transparency flattened by
    :func:`_flatten`, 16-bit / 32-bit / float images by :func:`_stretch`, palettes and CMYK
    converted.
    """
    try:
        im = PIL.Image.open(source)
    except PIL.Image.DecompressionBombError:   # above 2 × MAX_IMAGE_PIXELS PIL refuses itself
        raise _too_large(what) from None
    except Exception as e:
        log.info("unreadable upload for %s: %s", what, _plain(str(e)))
        raise _unreadable(what) from None
    with im:
        w, h = im.size
        if w * h > MAX_UPLOAD_PIXELS:
            raise _too_large(what, (w, h))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # EXIF and palette-transparency chatter
                im.seek(0)                        # an animation: its first frame
                im.load()                         # truncated or corrupt data fails here
                if im.getexif().get(0x0112, 1) != 1:   # orientation tag
                    im = PIL.ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                    im = PIL.Image.fromarray(_stretch(np.asarray(im), what), "L")
                elif "A" in im.mode or "transparency" in im.info:
                    im = _flatten(im)
                return np.array(im.convert(mode))
        except gr.Error:
            raise
        except Exception as e:
            log.info("unreadable upload for %s: %s", what, _plain(str(e)))
            raise _unreadable(what) from None


with _no_pyi_stub():
    class ImageUpload(gr.Image):
        """``gr.Image`` that decodes uploads with :func:`decode_image` (always to numpy).

        Gradio decodes an upload before the handler runs; an unreadable file would otherwise
        end as a bare "Error" in the browser, and Gradio's own decoding drops transparency, reads
        an animated GIF's palette indices as grey levels and clips 16-bit and float images. A
        subclass, not a patched instance, because Gradio rebuilds a session's input components
        from their class when an example is loaded into them.
        """

        is_template = True   # same front end as gr.Image

        def preprocess(self, payload):
            if payload is None:
                return None
            what = self.label or "image"
            mode = self.image_mode or "RGB"
            if payload.url and payload.url.startswith("data:"):   # inline base64 from an API
                try:
                    data = base64.b64decode(payload.url.split(",", 1)[1], validate=False)
                except Exception:
                    raise _unreadable(what) from None
                return decode_image(io.BytesIO(data), what, mode)
            if not payload.path:
                raise _unreadable(what)
            return decode_image(payload.path, what, mode)


def check_image(image, what: str, required: bool = True) -> None:
    if image is None:
        if required:
            raise gr.Error(f"Please give a {what}.", print_exception=False)
        return
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise gr.Error(f"The {what} is too small ({w}×{h} pixels); it needs at least "
                       f"{MIN_SIDE}×{MIN_SIDE}.", print_exception=False)
    if int(image.max()) - int(image.min()) < BLANK_RANGE:
        raise gr.Error(f"The {what} is blank (one flat colour): there is no object in it "
                       "to find.", print_exception=False)


# ---------------------------------------------------------------------------------------------
# the handler


def _gray(image: np.ndarray) -> np.ndarray:
    """Display copy of an upload: (H, W) uint8, as the person gave it (no inversion)."""
    return image if image.ndim == 2 else image[..., :3].mean(axis=2).astype(np.uint8)


def _timings_md(r, rf, draw_ms: float, wall_ms: float) -> str:
    # whatever stages the pipeline reports, in its order, total last
    stages = list(r.timings) + [k for k in (rf.timings if rf is not None else {})
                                if k not in r.timings]
    stages = [k for k in stages if k != "total"] + ["total"]
    rows = ["| stage | with localization (ms) | without (ms) |", "|---|---:|---:|"]
    for s in stages:
        a = r.timings.get(s)
        b = rf.timings.get(s) if rf is not None else None
        rows.append(f"| {s} | {'' if a is None else f'{a:.1f}'} | "
                    f"{'' if b is None else f'{b:.1f}'} |")
    rows.append(f"| drawing (app) | {draw_ms:.1f} | |")
    rows.append(f"| **whole request** | **{wall_ms:.0f}** | |")
    return "\n".join(rows)


def _headline(d: float, j: float, d0: float | None, why_not: str | None) -> str:
    if d0 is None:
        return (f"## With localization: Dice **{d:.2f}** (IoU {j:.2f})\n"
                f"Without localization: not available ({why_not}).")
    gain = d - d0
    verdict = (f"Localization lifts Dice by **{gain:.2f}**." if gain > 0.05 else
               "Here both work about equally well." if abs(gain) <= 0.05 else
               "Here the full-frame matcher did better.")
    return (f"## With localization Dice **{d:.2f}** vs without **{d0:.2f}**\n"
            f"IoU {j:.2f} with localization. {verdict} "
            "Both are scored against the object mask found in the fixed image.")


@contextlib.contextmanager
def _user_errors(doing: str):
    """Turn any failure inside into a plain gr.Error: input and registration errors keep their
    (path-free) message, anything else is logged and replaced by a generic one."""
    try:
        yield
    except gr.Error:
        raise
    except (RegistrationError, ValueError) as e:
        raise gr.Error(_plain(str(e)), print_exception=False) from None
    except Exception:
        log.exception("failed while %s", doing)
        raise gr.Error(f"Something went wrong while {doing}. Please try another pair of images.",
                       print_exception=False) from None


def register(dataset: str, moving, fixed, moving_mask=None, fixed_mask=None,
             progress=gr.Progress()):
    """Find the object of the moving image in the fixed image (a scene), then warp the object's
    mask onto the one found there; with and without localization, for comparison. Images: PNG,
    JPEG, BMP, WebP, GIF or TIFF, 8×8 to 16 million pixels, light objects on a dark background
    or dark ones on a light background.

    Args:
        dataset: the trained models to use: "mnist" (handwritten digits), "silhouettes"
            (animal silhouettes on textured ground, segmented by a small U-Net) or "usct"
            (a liver tumour in a simulated ultrasound view, found in a CT slice).
        moving: the object alone, e.g. one digit (an image file or URL).
        fixed: a scene holding another example of the object among other things (image).
        moving_mask: optional white-on-black mask of the object, the moving image's size.
        fixed_mask: optional white-on-black mask of the scene's object, the fixed image's size.

    Returns:
        headline: Markdown: Dice of the warped mask with and without localization.
        found: the scene with the detector's box (red) and the box snapped to the object (green).
        with_localization: the warped mask pasted back into the scene, over it.
        without_localization: the same from the full-frame matcher (no localization).
        before: the moving crop with the TPS control grid.
        after: the fixed crop with the regular grid.
        warped: the moving crop warped onto the fixed crop.
        crop_overlay: both masks on the fixed crop.
        timings: Markdown table, milliseconds per stage.
        numbers: JSON: dice, iou, score, box (xyxy pixels), the same without localization, ms.
    """
    with _user_errors("registering this pair"):
        return _register(dataset, moving, fixed, moving_mask, fixed_mask, progress)


def _register(dataset, moving, fixed, moving_mask, fixed_mask, progress):
    t_start = time.perf_counter()
    pipe = PIPELINES.get(dataset)
    if pipe is None:
        raise gr.Error(f"The data set {dataset!r} is not available.", print_exception=False)
    check_image(moving, "moving image (the object)")
    check_image(fixed, "fixed image (the scene)")
    check_image(moving_mask, "moving mask", required=False)
    check_image(fixed_mask, "fixed mask", required=False)

    progress(0.05, desc="localize → segment → match")
    r = pipe.register(moving, fixed, localize=True, moving_mask=moving_mask,
                      fixed_mask=fixed_mask)
    progress(0.55, desc="without localization")
    rf, why_not = None, None
    try:
        rf = pipe.register(moving, fixed, localize=False)
    except RegistrationError as e:
        why_not = _plain(str(e))

    progress(0.85, desc="drawing")
    t0 = time.perf_counter()
    ref = r.fixed_mask_full          # the object found in the fixed image: one reference for both
    d, j = dice(r.warped_mask_full, ref), iou(r.warped_mask_full, ref)
    d0 = j0 = None
    if rf is not None:
        d0, j0 = dice(rf.warped_mask_full, ref), iou(rf.warped_mask_full, ref)

    fixed_gray = _gray(fixed)
    boxes = viz.title_bar(
        viz.draw_boxes(fixed_gray, [(r.ssd_box, viz.SSD_BOX, ""), (r.box, viz.BOX, "")], 448),
        f"SSD score {r.score:.2f}" if r.box_source != "component"
        else "found by segmentation (none of the SSD's boxes fit)", height=44)
    before = viz.draw_grid(r.moving_crop, r.control_points, 280, mask=r.moving_mask)
    after = viz.draw_grid(r.fixed_crop, r.control_points_warped, 280, mask=r.fixed_mask)
    warped = viz.draw_mask_outline(viz.to_rgb(r.warped_image, 280), r.fixed_mask, viz.FIXED)
    crop_overlay = viz.mask_overlay(r.fixed_mask, r.warped_mask, 280, background=r.fixed_crop)
    full_with = viz.title_bar(
        viz.mask_overlay(ref, r.warped_mask_full, 448, background=fixed_gray),
        f"Dice {d:.2f}", height=44)
    if rf is not None:
        full_without = viz.title_bar(
            viz.mask_overlay(ref, rf.warped_mask_full, 448, background=fixed_gray),
            f"Dice {d0:.2f}", height=44)
    else:
        full_without = viz.title_bar(viz.to_rgb(np.zeros((8, 8), np.uint8), 448),
                                     "not available", height=44)
    draw_ms = (time.perf_counter() - t0) * 1e3
    wall_ms = (time.perf_counter() - t_start) * 1e3

    numbers = {
        "dice": round(d, 4), "iou": round(j, 4),
        "dice_without_localization": None if d0 is None else round(d0, 4),
        "iou_without_localization": None if j0 is None else round(j0, 4),
        "dice_crop": round(r.dice, 4),
        "score": round(r.score, 4),
        "box_source": r.box_source,
        "box": [round(v, 2) for v in r.box],
        "ssd_box": [round(v, 2) for v in r.ssd_box],
        "timings_ms": {k: round(v, 2) for k, v in r.timings.items()},
        "timings_without_localization_ms":
            None if rf is None else {k: round(v, 2) for k, v in rf.timings.items()},
        "request_ms": round(wall_ms, 1),
    }
    progress(1.0, desc="done")
    return (
        _headline(d, j, d0, why_not),
        boxes,
        full_with,
        full_without,
        before, after, warped, crop_overlay,
        _timings_md(r, rf, draw_ms, wall_ms),
        numbers,
    )


# ---------------------------------------------------------------------------------------------
# layout

INTRO = """# Localize → segment → match
Give an **object** (the *moving* image) and a **scene** that holds another example of it among
other things (the *fixed* image). The app finds the object in the scene, cuts both out, and
bends the object's shape onto the one it found. Pick an example below, then press **Register**.
"""

HOW_IT_WORKS = """### How it works
1. **Localize.** A small detector (an SSD) looks at the scene *and* at your object, and boxes
   the thing in the scene that matches it (red: its guess and confidence; green: that box
   snapped to the shape inside).
2. **Segment.** The object and the boxed part of the scene are cropped to one size and turned
   into masks: which pixels belong to the shape.
3. **Match.** A spatial transformer network reads both masks and bends a grid of control
   points (a thin-plate spline) until the object's mask lies on the scene's.

Why localize first? The matcher learns to bend one shape onto one shape. Given a whole scene,
it cannot tell which shape to aim for and tries to cover them all. Cropping first hands it a
fair problem: compare the two pictures at the top.
"""

LEGEND = ("<span style='color:rgb(40,120,255)'>■</span> fixed mask &nbsp; "
          "<span style='color:rgb(255,150,20)'>■</span> warped moving mask &nbsp; "
          "□ overlap (white)")


def compare_classical(dataset: str, moving, fixed, moving_mask=None, fixed_mask=None):
    """The learned matcher against SimpleITK's diffeomorphic demons on the same two crops.
    Returns a picture (both overlays) and a Markdown line with Dice and time of each."""
    with _user_errors("comparing"):
        return _compare_classical(dataset, moving, fixed, moving_mask, fixed_mask)


def _compare_classical(dataset, moving, fixed, moving_mask, fixed_mask):
    if not classical.available():
        raise gr.Error("The classical comparison needs SimpleITK (pip install SimpleITK).",
                       print_exception=False)
    pipe = PIPELINES.get(dataset)
    if pipe is None:
        raise gr.Error(f"The data set {dataset!r} is not available.", print_exception=False)
    check_image(moving, "moving image (the object)")
    check_image(fixed, "fixed image (the scene)")
    r = pipe.register(moving, fixed, moving_mask=moving_mask, fixed_mask=fixed_mask)
    t0 = time.perf_counter()
    demons_mask, _ = classical.demons(r.moving_mask, r.fixed_mask)
    demons_ms = (time.perf_counter() - t0) * 1e3
    d_demons = dice(demons_mask, r.fixed_mask)
    ours = viz.title_bar(viz.mask_overlay(r.fixed_mask, r.warped_mask, 280,
                                          background=r.fixed_crop),
                         f"learned TPS: Dice {r.dice:.2f}, {r.timings['match']:.0f} ms")
    theirs = viz.title_bar(viz.mask_overlay(r.fixed_mask, demons_mask, 280,
                                            background=r.fixed_crop),
                           f"demons: Dice {d_demons:.2f}, {demons_ms:.0f} ms")
    text = (f"On the same {r.fixed_mask.shape[0]}×{r.fixed_mask.shape[1]} crops: **learned TPS "
            f"matcher Dice {r.dice:.3f}** in {r.timings['match']:.1f} ms (network + "
            f"{pipe.refine_steps} refinement steps) · **SimpleITK diffeomorphic demons Dice "
            f"{d_demons:.3f}** in {demons_ms:.1f} ms ({classical.DEMONS_ITERATIONS} iterations, "
            f"σ {classical.DEMONS_STD}).")
    return np.concatenate([ours, np.full((ours.shape[0], 8, 3), 255, np.uint8), theirs], 1), text


def picture(caption: str, elem_id: str) -> gr.Image:
    """An output picture under a caption (labels float over the picture in Gradio 6)."""
    with gr.Column(min_width=120):
        gr.Markdown(caption, elem_classes=["caption"])
        return gr.Image(show_label=False, format="png", interactive=False, elem_id=elem_id,
                        buttons=["fullscreen", "download"], elem_classes=["pixelated"])


CSS = """
.caption p { font-size: 0.85em; margin: 0; min-height: 2.6em; }
.pixelated img { image-rendering: pixelated; }
.upscale img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


def build(pipelines: dict[str, Pipeline]) -> gr.Blocks:
    available = [d for d in DATASETS if d.name in pipelines]
    # every hour, uploads and output pictures older than an hour are deleted: a public server
    # would otherwise fill its disk with them
    with gr.Blocks(title="Localize → segment → match", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=300):
                dataset = gr.Dropdown([(d.label, d.name) for d in available],
                                      value=available[0].name, label="Data set",
                                      interactive=len(available) > 1)
                with gr.Row():
                    moving = ImageUpload(type="numpy", label="Moving (object)",
                                         sources=["upload", "clipboard"], height=220,
                                         elem_classes=["upscale"], elem_id="moving-input")
                    fixed = ImageUpload(type="numpy", label="Fixed (scene)",
                                        sources=["upload", "clipboard"], height=220,
                                        elem_classes=["upscale"], elem_id="fixed-input")
                about = gr.Textbox(label="About", interactive=False, max_lines=1)
                with gr.Accordion("Optional: your own masks", open=False):
                    gr.Markdown("White = object, black = background, the same size as its "
                                "image. Without them the app segments the images itself. "
                                "They are used on the *with localization* path only.")
                    with gr.Row():
                        moving_mask = ImageUpload(type="numpy", image_mode="L",
                                                  label="Moving mask", height=160)
                        fixed_mask = ImageUpload(type="numpy", image_mode="L",
                                                 label="Fixed mask", height=160)
                run = gr.Button("Register", variant="primary", elem_id="register-button")
                example_cols = []
                for d in available:
                    items = load_examples(d)
                    with gr.Column(visible=d.name == available[0].name) as col:
                        if items:
                            gr.Examples(
                                [[it["moving"], it["fixed"], it["caption"]] for it in items],
                                inputs=[moving, fixed, about], label=f"{d.label}: examples",
                                examples_per_page=6)
                    example_cols.append(col)

            with gr.Column(scale=7, min_width=480):
                headline = gr.Markdown("## Results appear here", label="Result",
                                       elem_id="headline")
                with gr.Row(equal_height=True):
                    boxes_img = picture("**Found in the scene**: red, the detector's box; "
                                        "green, snapped to the shape", "found")
                    with_img = picture("**With localization**: pasted back into the scene",
                                       "with-localization")
                    without_img = picture("**Without localization**: the full-frame matcher",
                                          "without-localization")
                gr.Markdown(LEGEND)
                with gr.Row(equal_height=True):
                    before_img = picture("Moving crop, control grid (before)", "before")
                    after_img = picture("Fixed crop, regular grid (after)", "after")
                    warped_img = picture("Warped moving, fixed outline in blue", "warped")
                    overlay_img = picture("Both masks on the crop", "crop-overlay")
                with gr.Accordion("Timings and numbers", open=False):
                    timings = gr.Markdown(label="Timings")
                    numbers = gr.JSON(label="Numbers (for machines)", open=True)
                with gr.Accordion("Compare with a classical method (SimpleITK demons)",
                                  open=False):
                    compare = gr.Button("Run demons on the same crops", elem_id="compare-button")
                    compare_img = gr.Image(show_label=False, format="png", interactive=False,
                                           elem_id="compare-image")
                    compare_md = gr.Markdown(elem_id="compare-text")
                gr.Markdown(HOW_IT_WORKS)

        run.click(register, inputs=[dataset, moving, fixed, moving_mask, fixed_mask],
                  outputs=[headline, boxes_img, with_img, without_img, before_img, after_img,
                           warped_img, overlay_img, timings, numbers],
                  api_name="register", concurrency_limit="default")
        compare.click(compare_classical, inputs=[dataset, moving, fixed, moving_mask, fixed_mask],
                      outputs=[compare_img, compare_md], api_visibility="private",
                      concurrency_limit="default")
        dataset.change(lambda name: [gr.Column(visible=d.name == name) for d in available],
                       inputs=dataset, outputs=example_cols, api_visibility="private",
                       queue=False)
        for box in (moving, fixed):   # an own upload is no longer the example described
            box.upload(lambda: "your upload", outputs=about, api_visibility="private",
                       queue=False)
    demo.queue(default_concurrency_limit=2, max_size=32)
    return demo


PIPELINES = load_pipelines(DATASETS)
demo = build(PIPELINES)



def warm_up() -> None:
    """One registration per pipeline on a sample pair, so the first visitor does not pay for
    torch's first-call set-up. Runs after the server is up; failures are only logged."""
    for d in DATASETS:
        items = load_examples(d)
        if d.name not in PIPELINES or not items:
            continue
        try:
            m = np.asarray(PIL.Image.open(items[0]["moving"]).convert("RGB"))
            f = np.asarray(PIL.Image.open(items[0]["fixed"]).convert("RGB"))
            PIPELINES[d.name].register(m, f)
            PIPELINES[d.name].register(m, f, localize=False)
        except Exception:
            log.exception("warm-up of %r failed", d.name)


MAX_FILE_SIZE = "20mb"   # per upload; larger ones are refused (HTTP 413) before they are stored


def mcp_enabled() -> bool:
    """Serve the API as an MCP server too (tool ``register`` at /gradio_api/mcp/)? Gradio's own
    switch ``GRADIO_MCP_SERVER`` decides; unset, it is on when the ``mcp`` package (Gradio's
    ``mcp`` extra) is installed."""
    flag = os.environ.get("GRADIO_MCP_SERVER")
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "yes", "on")
    return importlib.util.find_spec("mcp") is not None


if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                max_file_size=MAX_FILE_SIZE, show_error=False, theme=gr.themes.Soft(), css=CSS,
                mcp_server=mcp_enabled(), enable_monitoring=False, prevent_thread_lock=True)
    start_freezing(list(PIPELINES.values()))
    warm_up()
    demo.block_thread()
