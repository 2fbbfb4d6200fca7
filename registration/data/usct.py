"""Ultrasound vs CT: CT-like abdominal phantoms and ultrasound simulated from them (paper §4.4).

No public US–CT set exists and nothing may be downloaded, so the pairs are generated.

**CT phantom** (:func:`phantom`): a 256 × 256 axial slice, 1.5 mm pixels (384 mm field of view),
values in Hounsfield units. Anterior is up, the patient's right on the image's left (radiological
convention). Body outline (a perturbed ellipse) with a subcutaneous fat layer and a muscle
wall; abdominal soft tissue; a liver of smooth random shape on the patient's right; 1–3
tumours inside it (hypo- or hyperdense, own texture, sometimes a rim); portal/hepatic vessels,
aorta and IVC (contrast-enhanced); vertebral body with cortex, canal and spinous process; ribs
in the wall; two kidneys; bowel loops with gas. CT noise is Gaussian, slightly correlated.
Each tissue also carries an *echogenicity* (how strongly it scatters ultrasound), which a CT
does not measure: fat and muscle darker than liver, blood anechoic, each tumour its own
random hypo- or hyperechoic factor.

**Ultrasound** (:func:`simulate_ultrasound`), following simulation-from-CT (e.g. Wein et al.
2008): a curvilinear probe sits on the skin, aimed at the target tumour; along each of its
scan lines the slice is sampled in depth; acoustic impedance Z = ρ·c is derived from HU
(ρ from HU linearly; c ≈ 1540 m/s in soft tissue, 3,000+ in bone, ~340 in gas); each step
reflects R = ((Z₂ − Z₁)/(Z₂ + Z₁))² and transmits the rest, so bone and gas cast shadows;
attenuation is α·f·depth (dB, per tissue, two-way, f = 3.5 MHz); scattered echo = echogenicity
× speckle (a band-limited complex Gaussian field, Rayleigh envelope); time-gain compensation
multiplies by the nominal soft-tissue loss; log compression; scan conversion into the fan.

**Pairs** (:class:`PairGenerator`): the anatomy under the probe is elastically deformed
relative to the CT (a compression under the probe plus a smooth random field, as from probe
pressure and breathing), so the tumour's shape in the ultrasound is not the CT's. Ground
truth: the target tumour's mask in the ultrasound frame and in the CT, and its box in the CT.

**Simplifications** (said plainly): 2-D only (no elevation, no out-of-plane motion); the
beam is straight (no refraction) and each scan line is independent; speckle is generated as
a field, not from scatterer positions; reverberation, side lobes and harmonics are not
modelled; tissue values come from tables, not from patient data.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .scenes import mask_box

SIZE = 256                 # CT slice side, px
PIXEL_MM = 1.5             # CT pixel size, mm
US_SIZE = 128              # ultrasound image side, px
WINDOW = (40.0, 400.0)     # soft-tissue window: level, width (HU)
FREQ_MHZ = 3.5

# tissue labels
AIR, FAT, MUSCLE, SOFT, LIVER, TUMOUR, VESSEL, BONE, KIDNEY, GAS = range(10)
LABEL_NAMES = ("air", "fat", "muscle", "soft tissue", "liver", "tumour", "vessel", "bone",
               "kidney", "bowel gas")
# attenuation, dB / (cm · MHz), per label (air outside the body never meets the beam)
ATTENUATION = np.array([40.0, 0.6, 1.0, 0.6, 0.5, 0.6, 0.2, 20.0, 0.8, 40.0], np.float32)
SOFT_ATTENUATION = 0.55    # what time-gain compensation assumes
# echogenicity (relative backscatter amplitude²) per label; tumours get their own factor
ECHO = np.array([0.0, 0.25, 0.3, 0.5, 1.0, 1.0, 0.01, 1.5, 0.6, 0.3], np.float32)


@dataclass
class Phantom:
    hu: np.ndarray            # (S, S) float32, Hounsfield units
    labels: np.ndarray        # (S, S) uint8, tissue label (see LABEL_NAMES)
    echo: np.ndarray          # (S, S) float32, echogenicity
    tumours: np.ndarray       # (S, S) uint8, 0 = none, k = tumour k (1-based)
    target: int               # which tumour (1-based) is the target
    body: np.ndarray          # (S, S) bool
    liver_vessels: np.ndarray  # (S, S) bool, vessels drawn inside the liver (liver tissue)

    @property
    def liver(self) -> np.ndarray:
        return (self.labels == LIVER) | (self.tumours > 0) | self.liver_vessels

    def target_mask(self) -> np.ndarray:
        return self.tumours == self.target


def window(hu: np.ndarray, level: float = WINDOW[0], width: float = WINDOW[1]) -> np.ndarray:
    """HU → uint8 display in a CT window (default soft tissue: level 40, width 400)."""
    lo = level - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# shapes

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx + 0.5, yy + 0.5


def blob(rng: np.random.Generator, centre, radii, size: int = SIZE, rough: float = 0.12,
         angle: float | None = None, harmonics: int = 5) -> np.ndarray:
    """A smooth random closed shape: an ellipse (semi-axes ``radii``, px, rotated by ``angle``)
    whose radius is modulated by random low harmonics of relative amplitude ~``rough``."""
    a = rng.uniform(0, np.pi) if angle is None else angle
    amps = [rng.normal(0, rough / k) for k in range(2, harmonics + 1)]
    phases = [rng.uniform(0, 2 * np.pi) for _ in range(2, harmonics + 1)]
    out = np.zeros((size, size), bool)
    # only the window the shape can reach (the modulation is at most 1 + Σ|a_k|)
    reach = max(radii) * (1 + sum(abs(x) for x in amps)) + 2
    x0, x1 = max(0, int(centre[0] - reach)), min(size, int(centre[0] + reach) + 1)
    y0, y1 = max(0, int(centre[1] - reach)), min(size, int(centre[1] + reach) + 1)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx + 0.5 - centre[0], yy + 0.5 - centre[1]
    u = (np.cos(a) * dx + np.sin(a) * dy) / radii[0]
    v = (-np.sin(a) * dx + np.cos(a) * dy) / radii[1]
    r, th = np.hypot(u, v), np.arctan2(v, u)
    mod = np.ones_like(th)
    for k, (am, ph) in enumerate(zip(amps, phases), start=2):
        mod += am * np.cos(k * th + ph)
    out[y0:y1, x0:x1] = r <= mod
    return out


def smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian noise low-passed with a Gaussian of ``sigma`` px, rescaled to unit std."""
    n = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), sigma)
    return n / max(float(n.std()), 1e-6)


def _disc(size: int, centre, r: float) -> np.ndarray:
    xx, yy = _grid(size)
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= r * r


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.erode(mask.astype(np.uint8), k, borderValue=0) > 0


# ---------------------------------------------------------------------------------------------
# the CT phantom

def phantom(rng: np.random.Generator, size: int = SIZE, n_tumours: int | None = None) -> Phantom:
    """One random abdominal slice (see the module docstring)."""
    s = size / SIZE                                     # lengths below are for 256 px
    hu = np.full((size, size), -1000.0, np.float32)
    lab = np.zeros((size, size), np.uint8)
    echo_tex = np.zeros((size, size), np.float32)
    cx, cy = size / 2 + rng.uniform(-4, 4) * s, size / 2 + rng.uniform(0, 8) * s
    ax, ay = rng.uniform(100, 118) * s, rng.uniform(74, 90) * s
    body = blob(rng, (cx, cy), (ax, ay), size, rough=0.04, angle=rng.uniform(-0.05, 0.05))
    fat_px = int(rng.uniform(5, 13) * s)
    muscle_px = int(rng.uniform(4, 8) * s)
    inner = _erode(body, fat_px)
    cavity = _erode(inner, muscle_px)

    def paint(mask, label, value, tex_sigma=0.0, tex_amp=0.0):
        if not mask.any():
            return
        v = np.float32(value)
        if tex_amp:                                     # texture noise over the mask's box
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            n = smooth_noise(rng, (y1 - y0, x1 - x0), tex_sigma)
            v = v + tex_amp * n[ys - y0, xs - x0]
        hu[mask] = v
        lab[mask] = label

    paint(body, FAT, rng.uniform(-115, -85), 3, 8)
    paint(inner & ~cavity, MUSCLE, rng.uniform(40, 60), 2, 6)
    paint(cavity, SOFT, rng.uniform(25, 40), 4, 10)

    # spine (posterior midline) and ribs in the wall
    sy = cy + ay - rng.uniform(34, 42) * s
    vr = rng.uniform(14, 17) * s
    vert = _disc(size, (cx, sy), vr)
    canal = _disc(size, (cx, sy + vr + 6 * s), 6 * s)
    process = blob(rng, (cx, sy + vr + 16 * s), (4 * s, 9 * s), size, rough=0.05, angle=0.0)
    paint(process & body, BONE, rng.uniform(500, 700), 1, 40)
    paint(vert, BONE, rng.uniform(250, 350), 2, 30)
    paint(vert & ~_erode(vert, max(1, int(2 * s))), BONE, rng.uniform(650, 800))
    paint(canal, SOFT, 20.0)
    spine_zone = _disc(size, (cx, sy), vr + 12 * s) | (_grid(size)[1] > sy)
    n_ribs = int(rng.integers(6, 11))
    ring = inner & ~cavity
    for t in np.linspace(0.15 * np.pi, 0.85 * np.pi, n_ribs) + rng.uniform(-0.1, 0.1, n_ribs):
        side = 1 if rng.random() < 0.5 else -1
        ang = np.pi / 2 + side * t                      # around the sides and the back
        rx = cx + (ax - fat_px - muscle_px / 2) * np.cos(ang)
        ry = cy + (ay - fat_px - muscle_px / 2) * np.sin(ang)
        rib = blob(rng, (rx, ry), (rng.uniform(3, 5) * s, rng.uniform(4, 7) * s), size,
                   rough=0.05) & inner
        if rib.any() and not (rib & ~ring & cavity).sum() > rib.sum() * 0.6:
            paint(rib, BONE, rng.uniform(500, 800), 1, 40)

    # kidneys beside the spine, aorta in front of it, IVC to its right
    for side in (-1, 1):
        k = blob(rng, (cx + side * rng.uniform(44, 54) * s, sy - rng.uniform(2, 10) * s),
                 (rng.uniform(11, 15) * s, rng.uniform(18, 24) * s), size, rough=0.06,
                 angle=side * rng.uniform(0.2, 0.5)) & cavity & ~vert
        paint(k, KIDNEY, rng.uniform(140, 190), 2, 10)
        paint(_erode(k, int(4 * s)), KIDNEY, rng.uniform(30, 45), 2, 6)
    aorta = _disc(size, (cx + rng.uniform(2, 8) * s, sy - vr - rng.uniform(8, 11) * s),
                  rng.uniform(7, 9) * s) & cavity
    ivc = blob(rng, (cx - rng.uniform(18, 24) * s, sy - vr - rng.uniform(6, 10) * s),
               (rng.uniform(7, 9) * s, rng.uniform(5, 7) * s), size, rough=0.05) & cavity
    paint(aorta, VESSEL, rng.uniform(170, 220))
    paint(ivc, VESSEL, rng.uniform(110, 150))

    # bowel loops with gas on the patient's left, anterior
    for _ in range(int(rng.integers(3, 7))):
        bx = cx + rng.uniform(0.1, 0.7) * ax
        by = cy - rng.uniform(-0.1, 0.6) * ay
        r = rng.uniform(6, 12) * s
        loop = _disc(size, (bx, by), r) & cavity & ~spine_zone
        paint(loop, SOFT, rng.uniform(20, 45), 2, 8)
        gas = _disc(size, (bx + rng.uniform(-2, 2), by - rng.uniform(0, 3)),
                    r * rng.uniform(0.3, 0.6)) & loop
        paint(gas, GAS, rng.uniform(-950, -850), 2, 20)

    # liver: the patient's right (image left), front to back, clear of the spine
    lx, ly = cx - rng.uniform(0.30, 0.42) * ax, cy - rng.uniform(0.0, 0.15) * ay
    liver = blob(rng, (lx, ly), (rng.uniform(0.40, 0.50) * ax, rng.uniform(0.55, 0.70) * ay),
                 size, rough=0.15, angle=rng.uniform(-0.5, 0.3))
    liver &= _erode(cavity, int(2 * s)) & ~spine_zone & ~aorta
    n, cc, stats, _ = cv2.connectedComponentsWithStats(liver.astype(np.uint8), connectivity=4)
    if n > 2:                                           # keep its largest piece
        liver = cc == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    liver_hu = rng.uniform(50, 70)
    paint(liver, LIVER, liver_hu, 3, 6)
    echo_tex[liver] = 0.25 * smooth_noise(rng, (size, size), 2)[liver]   # liver texture

    # tumours: 1–3 non-overlapping blobs well inside the liver; the first is the target
    tumours = np.zeros((size, size), np.uint8)
    tumour_echo = np.zeros((size, size), np.float32)
    k_want = int(rng.integers(1, 4)) if n_tumours is None else n_tumours
    free = liver.copy()
    for k in range(1, k_want + 1):
        r = rng.uniform(7, 17) * s
        room = _erode(free, int(r * 1.25) + 2)
        ys, xs = np.nonzero(room)
        if len(xs) == 0:
            if k == 1:                                   # a small liver: a smaller tumour
                r = 6 * s
                room = _erode(liver, int(r) + 2)
                ys, xs = np.nonzero(room)
            if len(xs) == 0:
                break
        i = int(rng.integers(len(xs)))
        t = blob(rng, (xs[i] + 0.5, ys[i] + 0.5), (r * rng.uniform(0.8, 1.2), r), size,
                 rough=0.15) & liver
        dense = rng.choice([-1.0, 1.0], p=[0.7, 0.3])
        t_hu = liver_hu + dense * rng.uniform(20, 50)
        paint(t, TUMOUR, t_hu, 1.5, rng.uniform(4, 14))
        if rng.random() < 0.3:                           # an enhancing or hypodense rim
            rim = t & ~_erode(t, max(1, int(2 * s)))
            hu[rim] = liver_hu - dense * rng.uniform(10, 25)
        tumours[t] = k
        # echo follows density more often than not (cysts and most metastases: hypodense and
        # hypoechoic; haemangiomas, many HCCs: enhancing and hyperechoic), not always
        hypo = (dense < 0) if rng.random() < 0.8 else (dense > 0)
        tumour_echo[t] = rng.uniform(0.08, 0.3) if hypo else rng.uniform(2.5, 4.5)
        free &= ~_disc(size, (xs[i] + 0.5, ys[i] + 0.5), r * 1.3 + 4)   # keep them apart
    # vessels inside the liver (portal/hepatic), clear of tumours
    liver_vessels = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(3, 7))):
        ys, xs = np.nonzero(_erode(liver, int(4 * s)) & (tumours == 0))
        if len(xs) == 0:
            break
        i = int(rng.integers(len(xs)))
        v = blob(rng, (xs[i], ys[i]), (rng.uniform(2, 4) * s, rng.uniform(2, 5) * s), size,
                 rough=0.05) & (tumours == 0)
        paint(v, VESSEL, rng.uniform(130, 180))
        liver_vessels |= v

    # CT noise: Gaussian, slightly correlated
    sigma = rng.uniform(8, 15)
    hu += sigma * smooth_noise(rng, (size, size), 0.7)
    hu[~body] = -1000.0 + rng.normal(0, 5, int((~body).sum()))

    echo = ECHO[lab] * (1 + echo_tex)
    echo[tumours > 0] *= tumour_echo[tumours > 0]
    echo = np.clip(echo, 0, None).astype(np.float32)
    return Phantom(hu=hu.astype(np.float32), labels=lab, echo=echo, tumours=tumours, target=1,
                   body=body, liver_vessels=liver_vessels)


# ---------------------------------------------------------------------------------------------
# deformation (probe pressure + smooth random field)

def deformation(rng: np.random.Generator, probe, direction, size: int = SIZE,
                press: float | None = None, amp: float | None = None) -> np.ndarray:
    """A smooth backward displacement field (S, S, 2), px: sample the undeformed slice at
    x + d(x). Compression along the beam that decays away from the probe (Gaussian, ~60 px)
    plus a random field low-passed at ~25 px."""
    xx, yy = _grid(size)
    press = rng.uniform(3, 8) if press is None else press
    amp = rng.uniform(1.5, 4) if amp is None else amp
    r2 = (xx - probe[0]) ** 2 + (yy - probe[1]) ** 2
    fall = np.exp(-r2 / (2 * 60.0 ** 2)).astype(np.float32)
    d = np.stack([-press * fall * direction[0], -press * fall * direction[1]], -1)
    d += amp * np.stack([smooth_noise(rng, (size, size), 25),
                         smooth_noise(rng, (size, size), 25)], -1)
    return d.astype(np.float32)


def warp(image: np.ndarray, disp: np.ndarray, nearest: bool = False,
         border: float = 0.0) -> np.ndarray:
    """Resample ``image`` (S, S) at x + disp(x) (pixel-centre convention)."""
    xx, yy = _grid(image.shape[0])
    mx = (xx - 0.5 + disp[..., 0]).astype(np.float32)
    my = (yy - 0.5 + disp[..., 1]).astype(np.float32)
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(image, mx, my, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def deform_phantom(p: Phantom, disp: np.ndarray) -> Phantom:
    return Phantom(hu=warp(p.hu, disp, border=-1000.0), labels=warp(p.labels, disp, True),
                   echo=warp(p.echo, disp), tumours=warp(p.tumours, disp, True),
                   target=p.target, body=warp(p.body.astype(np.uint8), disp, True) > 0,
                   liver_vessels=warp(p.liver_vessels.astype(np.uint8), disp, True) > 0)


# ---------------------------------------------------------------------------------------------
# ultrasound

@dataclass
class Probe:
    """A curvilinear probe: the virtual apex (x, y) px in the CT, the beam axis (unit), the
    half opening angle (rad) and the imaged depths from the apex [r0, r1] (px)."""
    apex: np.ndarray
    axis: np.ndarray
    half_angle: float
    r0: float
    r1: float

    def scale(self, out: int = US_SIZE) -> float:
        """CT px per ultrasound px, so the fan fits the out × out image."""
        width = 2 * self.r1 * np.sin(self.half_angle)
        depth = self.r1 - self.r0 * np.cos(self.half_angle)
        return max(width, depth) / out

    def to_ct(self, out: int = US_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each ultrasound pixel: its CT coordinates (x, y) px and whether it is in the fan."""
        s = self.scale(out)
        u = (np.arange(out) + 0.5 - out / 2) * s
        v = (np.arange(out) + 0.5) * s + self.r0 * np.cos(self.half_angle)
        X, Y = np.meshgrid(u, v)                          # lateral, axial from the apex
        perp = np.array([-self.axis[1], self.axis[0]])
        cx = self.apex[0] + Y * self.axis[0] + X * perp[0]
        cy = self.apex[1] + Y * self.axis[1] + X * perp[1]
        r, th = np.hypot(X, Y), np.arctan2(X, Y)
        inside = (np.abs(th) <= self.half_angle) & (r >= self.r0) & (r <= self.r1)
        return cx.astype(np.float32), cy.astype(np.float32), inside


def place_probe(rng: np.random.Generator, p: Phantom, target: np.ndarray) -> Probe:
    """Probe on the skin, on the anterior or right-lateral side, aimed at the target's centre;
    the fan reaches 35–70 px (5–10 cm) beyond it."""
    ys, xs = np.nonzero(target)
    t = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    for _ in range(50):
        phi = rng.uniform(-np.pi * 0.95, -np.pi * 0.35)          # up-left .. up-right-ish
        d = np.array([np.cos(phi), np.sin(phi)])
        k = np.arange(1, SIZE * 1.5)
        pts = t[None] + k[:, None] * d[None]
        inb = (pts[:, 0] >= 0) & (pts[:, 0] < SIZE) & (pts[:, 1] >= 0) & (pts[:, 1] < SIZE)
        pts = pts[inb]
        on = p.body[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        lab_on_ray = p.labels[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        bone = (lab_on_ray == BONE) | (lab_on_ray == GAS)
        out = np.flatnonzero(~on)
        if len(out) == 0:
            if len(pts) == 0 or p.body.all():
                continue
            # the body runs off the image (a cropped real scan): the image edge is the skin
            out = np.array([len(pts) - 1])
        skin = pts[out[0]]
        if bone[:out[0]].any() and rng.random() < 0.8:    # prefer a window past ribs and gas
            continue
        axis = (t - skin) / np.linalg.norm(t - skin)
        apex_back = rng.uniform(15, 25)
        apex = skin - axis * apex_back
        depth = np.linalg.norm(t - apex)
        return Probe(apex=apex, axis=axis, half_angle=np.deg2rad(rng.uniform(28, 36)),
                     r0=apex_back, r1=depth + rng.uniform(35, 70))
    raise RuntimeError("no acoustic window found")


def acoustic(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Density (kg/m³) and speed of sound (m/s) from HU: ρ = 1000 + HU (≥ 1.2 for gas); c by
    tissue: gas ~340, soft tissue 1540 + 0.5·HU, bone rising to ~3,500 at 1,000 HU."""
    rho = np.maximum(1000.0 + hu, 1.2)
    c = np.where(hu < -300, 340.0 + (hu + 1000) * 1.8,
                 np.where(hu > 250, 1665.0 + (hu - 250) * 2.5, 1540.0 + 0.5 * hu))
    return rho.astype(np.float32), c.astype(np.float32)


def scanlines(p: Phantom, probe: Probe, n_lines: int = 192, n_samples: int = 256):
    """Sample the slice along the fan: HU, labels, echogenicity (n_samples, n_lines) and the
    step length (mm)."""
    th = np.linspace(-probe.half_angle, probe.half_angle, n_lines)
    r = np.linspace(probe.r0, probe.r1, n_samples)
    perp = np.array([-probe.axis[1], probe.axis[0]])
    dx = np.cos(th)[None] * probe.axis[0] + np.sin(th)[None] * perp[0]
    dy = np.cos(th)[None] * probe.axis[1] + np.sin(th)[None] * perp[1]
    mx = (probe.apex[0] + r[:, None] * dx - 0.5).astype(np.float32)
    my = (probe.apex[1] + r[:, None] * dy - 0.5).astype(np.float32)
    hu = cv2.remap(p.hu, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=-1000.0)
    lab = cv2.remap(p.labels, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                    borderValue=AIR)
    echo = cv2.remap(p.echo, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=0.0)
    step_mm = (r[1] - r[0]) * PIXEL_MM
    return hu, lab, echo, step_mm


def beamform(hu: np.ndarray, lab: np.ndarray, echo: np.ndarray, step_mm: float,
             rng: np.random.Generator | None, tgc: bool = True, speckle: bool = True,
             freq_mhz: float = FREQ_MHZ, skin: np.ndarray | None = None) -> np.ndarray:
    """Echo amplitude along scan lines (n_samples, n_lines), linear (before log compression).

    Per sample: reflection R at the interface with the previous sample, transmission
    ∏(1 − R) so far, two-way attenuation exp(−2·Σα·f·dz) (in nepers), scatter = echogenicity
    × speckle. ``tgc`` multiplies by the nominal soft-tissue two-way loss; ``speckle=False``
    uses its mean (1), for tests. Samples before ``skin`` (index per line, default: the first
    in the body) are coupling gel: no loss, no echo.
    """
    rho, c = acoustic(hu)
    z = rho * c
    inside = lab != AIR
    if skin is None:
        skin = np.argmax(inside, axis=0)
    idx = np.arange(len(hu))[:, None]
    gel = idx < skin[None]
    z = np.where(gel, 1.5e6, z)                              # gel matches soft tissue
    r_coef = np.zeros_like(z)
    r_coef[1:] = ((z[1:] - z[:-1]) / (z[1:] + z[:-1])) ** 2
    trans = np.cumprod(1 - np.concatenate([np.zeros_like(r_coef[:1]), r_coef[:-1]]), axis=0)
    alpha = np.where(gel, 0.0, ATTENUATION[lab])             # dB/(cm·MHz)
    # loss on the way to (and back from) a sample: everything before it
    loss_db = 2 * np.cumsum(alpha * freq_mhz * step_mm / 10, axis=0)
    loss_db = np.concatenate([np.zeros_like(loss_db[:1]), loss_db[:-1]])
    atten = 10 ** (-loss_db / 20)
    if speckle:
        g = rng.normal(0, 1, (2,) + hu.shape).astype(np.float32)
        g = np.stack([cv2.GaussianBlur(x, (0, 0), sigmaX=0.8, sigmaY=1.6) for x in g])
        sp = np.hypot(g[0], g[1])
        sp /= np.sqrt(np.mean(sp ** 2))
    else:
        sp = np.ones_like(hu)
    scatter = np.sqrt(np.where(gel, 0.0, echo)) * sp
    # specular interfaces: strong reflectors (bone, gas, organ boundaries) show as bright lines
    spec = 40 * np.sqrt(r_coef)
    amp = trans * atten * (scatter + spec)
    if tgc:
        depth_cm = np.maximum(0, idx - skin[None]) * step_mm / 10
        amp = amp * 10 ** (2 * SOFT_ATTENUATION * freq_mhz * depth_cm / 20)
    return amp.astype(np.float32)


def log_compress(amp: np.ndarray, dynamic_db: float = 36.0) -> np.ndarray:
    """Linear amplitude → [0, 1] display: 20·log10 over ``dynamic_db`` below the 99th
    percentile."""
    ref = max(float(np.percentile(amp, 99)), 1e-6)
    db = 20 * np.log10(np.maximum(amp, 1e-9) / ref)
    return np.clip(1 + db / dynamic_db, 0, 1).astype(np.float32)


def scan_convert(lines: np.ndarray, probe: Probe, out: int = US_SIZE,
                 values: float = 0.0) -> np.ndarray:
    """(n_samples, n_lines) polar image → (out, out) fan image; ``values`` outside the fan."""
    s = probe.scale(out)
    u = (np.arange(out) + 0.5 - out / 2) * s
    v = (np.arange(out) + 0.5) * s + probe.r0 * np.cos(probe.half_angle)
    X, Y = np.meshgrid(u, v)
    r, th = np.hypot(X, Y), np.arctan2(X, Y)
    n_s, n_l = lines.shape
    mi = ((r - probe.r0) / (probe.r1 - probe.r0) * (n_s - 1)).astype(np.float32)
    mj = ((th + probe.half_angle) / (2 * probe.half_angle) * (n_l - 1)).astype(np.float32)
    return cv2.remap(lines.astype(np.float32), mj, mi, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=values)


def simulate_ultrasound(p: Phantom, probe: Probe, rng: np.random.Generator,
                        out: int = US_SIZE) -> np.ndarray:
    """B-mode image (out, out) uint8 of phantom ``p`` seen by ``probe``."""
    hu, lab, echo, step = scanlines(p, probe)
    amp = beamform(hu, lab, echo, step, rng)
    img = log_compress(amp)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    fan = scan_convert(img, probe, out)
    return (np.clip(fan, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# pairs

@dataclass
class Pair:
    moving: np.ndarray        # (US_SIZE, US_SIZE) uint8 ultrasound
    fixed: np.ndarray         # (SIZE, SIZE) uint8 CT, soft-tissue window
    moving_mask: np.ndarray   # (US_SIZE, US_SIZE) bool, target tumour in the ultrasound
    target_mask: np.ndarray   # (SIZE, SIZE) bool, target tumour in the CT
    box: np.ndarray           # (4,) float32 xyxy px, tight box of target_mask
    moving_box: np.ndarray    # (4,) float32 xyxy px, tight box of moving_mask
    all_mask: np.ndarray      # (SIZE, SIZE) bool, every tumour in the CT
    hu: np.ndarray            # (SIZE, SIZE) float32, the CT in HU
    n_distractors: int = 0    # other tumours in the slice
    label: int = 0


def make_pair(rng: np.random.Generator, p: Phantom | None = None,
              min_tumour_px: int = 30) -> Pair:
    """One US–CT pair from a new phantom (or ``p``): probe aimed at the target tumour, the
    anatomy deformed under it, ultrasound simulated from the deformed slice."""
    for _ in range(20):
        ph = phantom(rng) if p is None else p
        target = ph.target_mask()
        if target.sum() >= min_tumour_px:
            break
    else:
        raise RuntimeError("no phantom with a large enough target tumour")
    probe = place_probe(rng, ph, target)
    skin = probe.apex + probe.axis * probe.r0
    disp = deformation(rng, skin, probe.axis)
    moved = deform_phantom(ph, disp)
    us = simulate_ultrasound(moved, probe, rng)
    cx, cy, inside = probe.to_ct()
    tm = cv2.remap(moved.target_mask().astype(np.uint8), cx - 0.5, cy - 0.5, cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
    tm &= inside
    fixed = window(ph.hu)
    return Pair(moving=us, fixed=fixed, moving_mask=tm, target_mask=target,
                box=mask_box(target), moving_box=mask_box(tm), all_mask=ph.tumours > 0,
                hu=ph.hu, n_distractors=int(ph.tumours.max()) - 1)


class PairGenerator:
    """Seeded US–CT pairs; 'train', 'val' and 'test' draw from disjoint seed streams."""

    STREAMS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, part: str = "train", seed: int = 0):
        if part not in self.STREAMS:
            raise ValueError(f"part: expected one of {sorted(self.STREAMS)}, got {part!r}")
        self.rng = np.random.default_rng([self.STREAMS[part], seed])

    def sample(self) -> Pair:
        return make_pair(self.rng)

    def batch(self, n: int) -> list[Pair]:
        return [self.sample() for _ in range(n)]


def test_pairs(n: int = 400, seed: int = 0) -> list[Pair]:
    return PairGenerator("test", seed).batch(n)


# ---------------------------------------------------------------------------------------------
# a disk cache of generated pairs (a pair takes ~0.1 s to make; training draws thousands)

_CACHED = ("moving", "fixed", "moving_mask", "target_mask", "box", "moving_box", "all_mask")


def cached_pairs(part: str, seed: int, n: int, cache_dir=None, progress: bool = True
                 ) -> list[Pair]:
    """n pairs of ``PairGenerator(part, seed)``, read from ``cache_dir`` when made before
    (default ``$REGISTRATION_CACHE`` or ``~/.cache/registration``), else made and written
    there. The HU image is not kept (``hu`` is None)."""
    import os
    from pathlib import Path
    root = Path(cache_dir or os.environ.get("REGISTRATION_CACHE")
                or Path.home() / ".cache" / "registration")
    path = root / f"usct_{part}_{seed}_{n}.npz"
    if path.is_file():
        with np.load(path) as z:
            cols = {k: z[k] for k in _CACHED}
            nd = z["n_distractors"]
        return [Pair(hu=None, n_distractors=int(nd[i]), **{k: cols[k][i] for k in _CACHED})
                for i in range(n)]
    gen = PairGenerator(part, seed)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"making {n} {part} US–CT pairs", mininterval=10)
    pairs = [gen.sample() for _ in it]
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, n_distractors=np.array([p.n_distractors for p in pairs]),
             **{k: np.stack([getattr(p, k) for p in pairs]) for k in _CACHED})
    os.replace(tmp, path)
    for p in pairs:
        p.hu = None
    return pairs


# ---------------------------------------------------------------------------------------------
# the real CT check: one LiTS volume shipped in the liver-ct-segmentation-package wheel

LITS_PACKAGE = "liver_ct_segmentation_package"
_MRC_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16}


def read_mrc(path) -> np.ndarray:
    """An MRC file: a 1,024-byte header (nx, ny, nz, mode as little-endian int32 first), then
    the raw voxels. Returns (nz, ny, nx) in the file's dtype."""
    import struct
    from pathlib import Path
    b = Path(path).read_bytes()
    if len(b) < 1024:
        raise ValueError(f"{path}: expected an MRC file (≥ 1,024-byte header), got {len(b)} bytes")
    nx, ny, nz, mode = struct.unpack("<4i", b[:16])
    if mode not in _MRC_DTYPES or min(nx, ny, nz) < 1:
        raise ValueError(f"{path}: expected MRC mode in {sorted(_MRC_DTYPES)} and positive "
                         f"sizes, got mode {mode}, {nx}×{ny}×{nz}")
    dt = np.dtype(_MRC_DTYPES[mode]).newbyteorder("<")
    want = nx * ny * nz * dt.itemsize
    if len(b) - 1024 < want:
        raise ValueError(f"{path}: expected {want} data bytes, got {len(b) - 1024}")
    return np.frombuffer(b[1024:1024 + want], dt).reshape(nz, ny, nx)


def lits_volume() -> tuple[np.ndarray, np.ndarray]:
    """The real CT (HU, float32) and its labels (0 background, 1 liver, 2 tumour), both
    (128, 128, 128), from the installed package (never copied into this repository: its data
    licence is non-commercial). Axial slice k is ``[:, :, k].T`` (then anterior is up and the
    patient's right on the left, as in the phantoms). Raises FileNotFoundError when the
    package is not installed."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec(LITS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real CT check needs the liver-ct-segmentation-package "
                                "wheel: pip install --no-deps liver-ct-segmentation-package==1.6.0")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return (read_mrc(d / "img_117.mrc").astype(np.float32),
            read_mrc(d / "lab_117.mrc").astype(np.uint8))


def real_phantom(hu: np.ndarray, lab: np.ndarray, rng: np.random.Generator,
                 target_px: int = 30) -> Phantom | None:
    """A :class:`Phantom` from one real axial slice (resized to SIZE): liver and tumours from
    its labels, the other tissues from HU (gas < −400 inside the body, fat −400…−30, bone
    > 400, else soft tissue), echogenicity from the same tables, each tumour hypo- or
    hyperechoic as its density says. The target is a random tumour of ≥ target_px pixels;
    None if the slice has none."""
    hu = cv2.resize(hu, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(lab, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
    n, cc, stats, _ = cv2.connectedComponentsWithStats((lab == 2).astype(np.uint8), 4)
    big = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= target_px]
    if not big:
        return None
    body = hu > -400
    nb, bcc, bst, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8), 4)
    if nb > 1:
        body = bcc == 1 + int(np.argmax(bst[1:, cv2.CC_STAT_AREA]))
    filled = cv2.morphologyEx(body.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
    body = filled > 0
    labels = np.full((SIZE, SIZE), SOFT, np.uint8)
    labels[~body] = AIR
    labels[body & (hu < -400)] = GAS
    labels[body & (hu >= -400) & (hu < -30)] = FAT
    labels[body & (hu > 400)] = BONE     # enhanced vessels reach 250–400 HU: not bone
    labels[lab == 1] = LIVER
    labels[lab == 2] = TUMOUR
    tumours = np.zeros((SIZE, SIZE), np.uint8)
    # the target first (tumour 1), then the small tumours, then the other large ones
    first = int(rng.choice(big))
    order = ([first] + [k for k in range(1, n) if k not in big]
             + [k for k in big if k != first])
    liver_hu = float(np.median(hu[lab == 1])) if (lab == 1).any() else 60.0
    echo = ECHO[labels].copy()
    for i, k in enumerate(order, start=1):
        m = cc == k
        tumours[m] = i
        hypo = float(np.median(hu[m])) < liver_hu
        echo[m] = rng.uniform(0.08, 0.3) if hypo else rng.uniform(2.5, 4.5)
    return Phantom(hu=hu.astype(np.float32), labels=labels, echo=echo.astype(np.float32),
                   tumours=tumours, target=1, body=body,
                   liver_vessels=np.zeros((SIZE, SIZE), bool))


def real_pairs(n: int = 60, seed: int = 0) -> list[Pair]:
    """Up to n pairs from the real volume's axial slices that hold a tumour of ≥ 30 px (at
    256 px), slices taken in a seeded order, each slice once, its target at random."""
    hu, lab = lits_volume()
    rng = np.random.default_rng(seed)
    out = []
    for k in rng.permutation(hu.shape[2]):
        if len(out) >= n:
            break
        p = real_phantom(hu[:, :, k].T, lab[:, :, k].T, rng)
        if p is None:
            continue
        try:
            out.append(make_pair(rng, p))
        except RuntimeError:
            continue
    return out
