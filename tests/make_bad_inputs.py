"""Generate the bad-input corpus of issue 10 (nothing binary is checked in).

    python tests/make_bad_inputs.py OUT_DIR      # writes the files, prints what each one is

Each item is a file the app may be sent as an image, with what must come of it:

* ``refused``: a plain message matching ``match`` (never a traceback or a server path);
* ``registered``: a result; with ``like_good`` set, the file is the good pair's fixed image in
  another encoding, so its Dice must be close to the good pair's;
* ``either``: a result or a plain message matching ``match``.

Derived items are built from the good pair (``tests/apphelpers.examples()``, the sample the app
tests use), so a correct decoder gives a known answer. The fixed image whose target is cut by the
border comes from ``registration.data.scenes`` and carries its own moving image.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run as a script: the registration package is at ROOT
    sys.path.insert(0, str(ROOT))
GOOD_CAPTION = "3 distractors, big target (53 px)"   # the pair tests/test_app.py uses
BOMB_SIDE = 30_000


@dataclass(frozen=True)
class BadInput:
    name: str
    path: Path
    expect: str                   # "refused", "registered" or "either"
    match: str | None = None      # regex the plain message must match (refused / either)
    like_good: bool = False       # same picture as the good fixed image: Dice ≈ the good pair's
    moving: Path | None = None    # its own moving image (else the good pair's)
    note: str = ""


def good_pair() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from apphelpers import examples
    return next(e for e in examples() if e["caption"] == GOOD_CAPTION)


# ---------------------------------------------------------------------------------------------
# raw PNG writing, for a header that claims more than any sane decoder should allocate


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit PNG of side×side black pixels: ~110 kB on disk, 900 Mpx decoded (0.9 GB
    as 8-bit grey, 2.7 GB as RGB)."""
    row = b"\0" * (1 + (side + 7) // 8)          # filter byte + packed bits
    z = zlib.compressobj(9)
    rows_per_block = 1000
    block = row * rows_per_block
    parts = []
    for start in range(0, side, rows_per_block):
        n = min(rows_per_block, side - start)
        parts.append(z.compress(block if n == rows_per_block else row * n))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)   # 1-bit grey, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def border_cut_scene(seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(moving, fixed, visible target mask): a held-out scene shifted left so that the left half
    of its target lies outside the frame."""
    from registration.data import scenes
    gen = scenes.SceneGenerator("test", seed=seed, max_distractors=1)
    s = gen.sample(n_distractors=1)
    x0, _, x1, _ = [int(v) for v in s.box]
    cut = (x0 + x1) // 2                          # the frame now starts mid-target
    fixed = np.zeros_like(s.fixed)
    fixed[:, :s.fixed.shape[1] - cut] = s.fixed[:, cut:]
    mask = np.zeros_like(s.target_mask)
    mask[:, :s.fixed.shape[1] - cut] = s.target_mask[:, cut:]
    return s.moving, fixed, mask


def make(out: str | Path) -> list[BadInput]:
    """Write the corpus into ``out`` and describe it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pair = good_pair()
    good = np.asarray(Image.open(pair["fixed"]).convert("L"))         # (H, W) uint8
    h, w = good.shape
    items: list[BadInput] = []

    def add(name, data_or_path, expect, match=None, like_good=False, moving=None, note=""):
        if isinstance(data_or_path, bytes):
            p = out / name
            p.write_bytes(data_or_path)
        else:
            p = data_or_path
        items.append(BadInput(name, p, expect, match, like_good, moving, note))

    unreadable = r"could not be read as an image"
    # -- not images ------------------------------------------------------------------------
    add("text.png", b"this is text, not a PNG\n" * 20, "refused", unreadable, note="text")
    add("pdf_header.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        "refused", unreadable, note="a PDF's first bytes")
    add("empty.png", b"", "refused", unreadable, note="0 bytes")
    add("zeros.png", b"\0" * 1024, "refused", unreadable, note="1 KiB of zero bytes")
    png = Path(pair["fixed"]).read_bytes()
    add("truncated.png", png[:len(png) // 2], "refused", unreadable, note="half a PNG")
    jpg = _encode(Image.fromarray(good), "JPEG", quality=95)
    add("truncated.jpg", jpg[:len(jpg) // 2], "refused", unreadable, note="half a JPEG")
    add("bomb.png", bomb_png(), "refused", r"too large",
        note=f"valid PNG, header says {BOMB_SIDE:,}×{BOMB_SIDE:,}")

    # -- too small, blank ------------------------------------------------------------------
    too_small = r"too small|at least 8×8"
    add("1x1.png", _save(Image.fromarray(np.full((1, 1), 255, np.uint8)), out / "1x1.png"),
        "refused", too_small)
    add("3x3.png", _save(Image.fromarray(good[:3, :3]), out / "3x3.png"), "refused", too_small)
    blank = r"blank|no object"
    add("black.png", _save(Image.fromarray(np.zeros((h, w), np.uint8)), out / "black.png"),
        "refused", blank)
    add("white.png", _save(Image.fromarray(np.full((h, w), 255, np.uint8)), out / "white.png"),
        "refused", blank)

    # -- the good fixed image in unusual encodings: must give the good pair's answer --------
    add("grey16.png", _save(Image.fromarray(good.astype(np.uint16) * 257), out / "grey16.png"),
        "registered", like_good=True, note="16-bit grey")
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = good                            # white ink, transparent background
    add("rgba_light_ink.png", _save(Image.fromarray(rgba), out / "rgba_light_ink.png"),
        "registered", like_good=True, note="white ink on a transparent background")
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 3] = good                            # black ink, transparent background
    add("rgba_dark_ink.png", _save(Image.fromarray(rgba), out / "rgba_dark_ink.png"),
        "registered", like_good=True, note="black ink on a transparent background")
    tinted = np.stack([good, (good * 0.8).astype(np.uint8), good // 4], -1)   # amber ink
    pal = Image.fromarray(tinted).quantize(64)
    add("palette.png", _save(pal, out / "palette.png"), "registered", like_good=True,
        note="palette PNG, 64 colours, amber ink")
    add("cmyk.jpg", _save(Image.fromarray(good).convert("RGB").convert("CMYK"), out / "cmyk.jpg",
                          quality=95), "registered", like_good=True, note="CMYK JPEG")
    rotated = Image.fromarray(np.rot90(good, 1).copy())   # stored turned 90° anticlockwise…
    exif = Image.Exif()
    exif[0x0112] = 6                                       # …and tagged "rotate 90° clockwise"
    add("exif_rotated.jpg", _save(rotated, out / "exif_rotated.jpg", quality=95,
                                  exif=exif.tobytes()),
        "registered", like_good=True, note="EXIF orientation 6")
    frames = [Image.fromarray(tinted).quantize(64),
              Image.fromarray(np.roll(tinted, 30, axis=1)).quantize(64),
              Image.fromarray(255 - tinted).quantize(64)]
    add("animated.gif", _save(frames[0], out / "animated.gif", save_all=True,
                              append_images=frames[1:], duration=100, loop=0),
        "registered", like_good=True, note="3 frames, the first is the scene")
    f = good.astype(np.float32) / 255
    f[:8, :8] = np.nan                                     # a corner of no data
    add("float_nan.tiff", _save(Image.fromarray(f, mode="F"), out / "float_nan.tiff"),
        "registered", like_good=True, note="32-bit float TIFF, NaN in a corner")

    # -- awkward geometry ------------------------------------------------------------------
    strip = np.zeros((20, 4000), np.uint8)
    digit = np.asarray(Image.open(pair["moving"]).convert("L").resize((20, 20)))
    strip[:, 1990:2010] = digit
    add("strip_4000x20.png", _save(Image.fromarray(strip), out / "strip_4000x20.png"),
        "either", r"no object|too small|could not|aspect|too (wide|tall)",
        note="a digit in a 4000×20 strip")
    mov, fix, _ = border_cut_scene()
    add("border_cut.png", _save(Image.fromarray(fix), out / "border_cut.png"), "either",
        r"no object", moving=_save(Image.fromarray(mov), out / "border_cut_moving.png"),
        note="target cut in half by the left border")
    return items


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for it in make(argv[0]):
        print(f"{it.path}  {it.path.stat().st_size:>9,} B  {it.expect:<10}  {it.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
