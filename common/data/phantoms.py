"""Synthetic abdominal CT phantoms with ground truth in TotalSegmentator ids.

A phantom is painted into a RAS voxel grid (axis 0 -> patient's Right, 1 -> Anterior,
2 -> Superior) from an anatomy template given in millimetres: x to the patient's right,
y anterior, z superior, z = 0 near the L1/L2 disc. Each case scales and shifts the template
(patient size, field of view), adds Gaussian noise and, for ``orientation="LPS"``, flips the
first two array axes and the affine together, so that world anatomy is the same either way.

They are meant for speed and parity benchmarks where real data cannot be downloaded:
realistic grids, HU ranges and organ layout, not realistic texture.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

# Ids of the TotalSegmentator "total" task (totalsegmentator.map_to_binary.class_map["total"]).
TS_IDS = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5,
    "stomach": 6, "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9,
    "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "esophagus": 15,
    "small_bowel": 18, "duodenum": 19, "colon": 20, "urinary_bladder": 21, "sacrum": 25,
    "vertebrae_L5": 27, "vertebrae_L4": 28, "vertebrae_L3": 29, "vertebrae_L2": 30,
    "vertebrae_L1": 31, "vertebrae_T12": 32, "vertebrae_T11": 33, "vertebrae_T10": 34,
    "vertebrae_T9": 35, "vertebrae_T8": 36, "vertebrae_T7": 37, "vertebrae_T6": 38,
    "vertebrae_T5": 39, "vertebrae_T4": 40, "heart": 51, "aorta": 52,
    "inferior_vena_cava": 63, "portal_vein_and_splenic_vein": 64, "iliac_artery_left": 65,
    "iliac_artery_right": 66, "iliac_vena_left": 67, "iliac_vena_right": 68,
    "hip_left": 77, "hip_right": 78, "spinal_cord": 79, "autochthon_left": 86,
    "autochthon_right": 87, "iliopsoas_left": 88, "iliopsoas_right": 89, "sternum": 116,
    **{f"rib_left_{k}": 91 + k for k in range(1, 13)},
    **{f"rib_right_{k}": 103 + k for k in range(1, 13)},
}

# Hounsfield units, portal-venous contrast phase.
HU = {
    "air": -1000, "outside_fov": -1024, "fat": -100, "visceral_fat": -90, "muscle": 50,
    "lung": -850, "gas": -950, "heart": 130, "liver": 105, "spleen": 115,
    "kidney_cortex": 190, "kidney_medulla": 140, "stomach": 45, "gallbladder": 10,
    "pancreas": 90, "bowel": 35, "artery": 190, "vein": 150, "portal": 170, "esophagus": 45,
    "adrenal": 40, "bladder": 10, "cortical_bone": 700, "cancellous_bone": 230,
    "posterior_elements": 450, "rib": 500, "disc": 90, "csf": 15, "cord": 35, "table": -300,
}
NOISE_SD = 12.0


@dataclass(frozen=True)
class PhantomSpec:
    """One phantom: voxel grid (x, y, z), spacing in mm, stored orientation and seed."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str = "RAS"
    seed: int = 0


# Clinical grids; one case with the field of view of a real abdominal CT (410x410x450 mm),
# the rest at the small end of the clinical ranges so a CPU benchmark of all of them stays short.
DEFAULT_SET = (
    PhantomSpec("phantom_00_large", (512, 512, 300), (0.80, 0.80, 1.5), "RAS", 1000),
    PhantomSpec("phantom_01", (512, 512, 90), (0.70, 0.70, 5.0), "LPS", 1001),
    PhantomSpec("phantom_02", (512, 512, 120), (0.90, 0.90, 3.0), "RAS", 1002),
    PhantomSpec("phantom_03", (512, 512, 100), (0.75, 0.75, 2.5), "LPS", 1003),
    PhantomSpec("phantom_04", (512, 512, 96), (0.65, 0.65, 4.0), "RAS", 1004),
    PhantomSpec("phantom_05", (512, 512, 150), (0.85, 0.85, 2.5), "LPS", 1005),
)


def default_specs(n: int | None = None, seed: int = 0) -> list[PhantomSpec]:
    """The default set; ``n`` > 6 repeats its grids with new seeds, ``seed`` shifts every seed."""
    n = len(DEFAULT_SET) if n is None else n
    specs = []
    for i in range(n):
        base = DEFAULT_SET[i % len(DEFAULT_SET)]
        case_id = base.case_id if i < len(DEFAULT_SET) else f"phantom_{i:02d}"
        specs.append(PhantomSpec(case_id, base.shape, base.spacing, base.orientation,
                                 base.seed + 100 * (i // len(DEFAULT_SET)) + seed))
    return specs


# --------------------------------------------------------------------------- grid + painting

class _Canvas:
    """HU and label volumes over 1D template coordinates (increasing), painted by bounding box."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.axes = (x, y, z)
        shape = (len(x), len(y), len(z))
        self.img = np.full(shape, HU["air"], dtype=np.int16)
        self.lab = np.zeros(shape, dtype=np.uint8)

    def _box(self, lo, hi):
        slices = []
        for ax, a, b in zip(self.axes, lo, hi):
            i0, i1 = np.searchsorted(ax, a, "left"), np.searchsorted(ax, b, "right")
            if i1 <= i0:
                return None
            slices.append(slice(int(i0), int(i1)))
        return tuple(slices)

    def paint(self, lo, hi, inside, hu, label=None):
        """Set HU (and label, unless None) where ``inside(X, Y, Z)`` holds within box [lo, hi].

        X, Y, Z are broadcastable (n,1,1), (1,m,1), (1,1,k) template coordinates, so
        conditions on x and y alone cost 2D, not 3D. ``label`` may be a callable like
        ``inside`` returning label values.
        """
        sl = self._box(lo, hi)
        if sl is None:
            return
        x, y, z = (ax[s] for ax, s in zip(self.axes, sl))
        X, Y, Z = x[:, None, None], y[None, :, None], z[None, None, :]
        shape = (len(x), len(y), len(z))
        m = np.broadcast_to(inside(X, Y, Z), shape)
        self.img[sl][m] = hu
        if callable(label):
            self.lab[sl][m] = np.broadcast_to(label(X, Y, Z), shape)[m]
        elif label is not None:
            self.lab[sl][m] = label

    def ellipsoid(self, c, r, hu, label=None, where=None):
        def inside(X, Y, Z):
            m = ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1
            return m & where(X, Y, Z) if where else m
        self.paint(np.subtract(c, r), np.add(c, r), inside, hu, label)

    def capsule(self, p0, p1, r0, r1, hu, label=None):
        """A tube from p0 to p1 whose radius goes linearly from r0 to r1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        d = p1 - p0
        dd = float(d @ d)
        rmax = max(r0, r1)

        def inside(X, Y, Z):
            t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / dd, 0, 1)
            dist2 = (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2
            return dist2 <= (r0 + t * (r1 - r0)) ** 2
        self.paint(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax, inside, hu, label)

    def tube(self, points, r, hu, label=None):
        for p0, p1 in zip(points[:-1], points[1:]):
            self.capsule(p0, p1, r, r, hu, label)

    def cylinder(self, cx, cy, rx, ry, z0, z1, hu, label=None):
        self.paint((cx - rx, cy - ry, z0), (cx + rx, cy + ry, z1),
                   lambda X, Y, Z: ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1, hu, label)


# --------------------------------------------------------------------------- anatomy template

BODY_CY, BODY_A, BODY_B, BACK_Y = -5.0, 165.0, 120.0, -118.0
BIG = 1e4


def _ellipse_r2(X, Y, a, b, back):
    """Normalised squared radius of the body cross-section; the back lies flat on the table."""
    r2 = (X / a) ** 2 + ((Y - BODY_CY) / b) ** 2
    return np.where(Y < back, np.inf, r2)


def _dome(X, Y):
    """Height of the diaphragm; the right dome is higher (liver underneath)."""
    right = 105 - ((X - 60) ** 2 + Y ** 2) / 240
    left = 90 - ((X + 60) ** 2 + Y ** 2) / 240
    return np.where(X > 0, right, left)


def _vertebrae():
    """(name, z_bottom, z_top) of vertebral bodies: lumbar pitch 36 mm, thoracic 30 mm."""
    levels = []
    for i, name in enumerate(["L1", "L2", "L3", "L4", "L5"]):
        top = 30 - 36 * i
        levels.append((name, top - 28, top))
    for i, name in enumerate(["T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4"]):
        bottom = 36 + 30 * i
        levels.append((name, bottom, bottom + 24))
    return levels


def _paint_body(cv: _Canvas, fat_mm: float):
    """Body outline, subcutaneous fat, muscle wall and visceral fat, 2D maps tested per slice."""
    x, y, _ = cv.axes
    X, Y = x[:, None], y[None, :]
    layers = (
        (_ellipse_r2(X, Y, BODY_A, BODY_B, BACK_Y), HU["fat"]),
        (_ellipse_r2(X, Y, BODY_A - fat_mm, BODY_B - fat_mm, BACK_Y + 0.6 * fat_mm), HU["muscle"]),
        (_ellipse_r2(X, Y, BODY_A - fat_mm - 10, BODY_B - fat_mm - 10, BACK_Y + 0.6 * fat_mm + 10),
         HU["visceral_fat"]),
    )
    table = (np.abs(X) < 0.6 * BODY_A * 2) & (Y < BACK_Y - 4) & (Y > BACK_Y - 22)
    level = np.zeros(X.shape[:1] + Y.shape[1:], dtype=np.uint8)
    for i, (r2, _) in enumerate(layers):
        level[r2 <= 1] = i + 1
    lut = np.array([HU["air"]] + [hu for _, hu in layers], dtype=np.int16)
    slab = lut[level]
    slab[table & (level == 0)] = HU["table"]
    cv.img[:] = slab[:, :, None]
    cavity = (BODY_A - fat_mm - 10, BODY_B - fat_mm - 10, BACK_Y + 0.6 * fat_mm + 10)
    return lambda X, Y: _ellipse_r2(X, Y, *cavity) <= 1


def _paint_anatomy(cv: _Canvas, rng: np.random.Generator):
    def j(v, mm=5.0):  # jitter a point
        return tuple(np.asarray(v, float) + rng.uniform(-mm, mm, 3))

    def s(r, f=0.08):  # jitter radii
        return tuple(np.asarray(r, float) * rng.uniform(1 - f, 1 + f, 3))

    fat = rng.uniform(12, 28)
    cavity = _paint_body(cv, fat)
    T = TS_IDS

    # Muscles beside the spine
    for side, sx in (("left", -1), ("right", 1)):
        cv.cylinder(sx * 38, -100, 22, 17, -160, 400, HU["muscle"], T[f"autochthon_{side}"])
        cv.capsule((sx * 33, -50, 30), (sx * 55, -40, -120), 7, 22, HU["muscle"], T[f"iliopsoas_{side}"])
        cv.capsule((sx * 55, -40, -120), (sx * 75, -10, -220), 22, 25, HU["muscle"], T[f"iliopsoas_{side}"])

    # Lungs above the diaphragm, lobes split by the fissures
    def lung_label(side):
        def label(X, Y, Z):
            lower = Z < 175 - 1.07 * Y  # oblique fissure: high posteriorly, low anteriorly
            if side == "left":
                return np.where(lower, T["lung_lower_lobe_left"], T["lung_upper_lobe_left"])
            upper = np.where(Z < 200, T["lung_middle_lobe_right"], T["lung_upper_lobe_right"])
            return np.where(lower, T["lung_lower_lobe_right"], upper)
        return label

    for side, sx in (("left", -1), ("right", 1)):
        lo, hi = ((0, -BIG, 20), (BIG, BIG, BIG)) if sx > 0 else ((-BIG, -BIG, 20), (0, BIG, BIG))
        cv.paint(lo, hi, lambda X, Y, Z, sx=sx: cavity(X, Y) & (sx * X > 25) & (Y > -95) & (Z > _dome(X, Y)),
                 HU["lung"], lung_label(side))
    cv.ellipsoid(j((-20, 25, 145)), s((65, 50, 55)), HU["heart"], T["heart"], where=lambda X, Y, Z: Z > _dome(X, Y))

    # Upper abdominal organs under the diaphragm
    under = lambda X, Y, Z: cavity(X, Y) & (Z < _dome(X, Y) - 3)  # noqa: E731
    cv.ellipsoid(j((70, -5, 45)), s((85, 85, 80)), HU["liver"], T["liver"], where=under)
    cv.ellipsoid(j((-10, 35, 75)), s((60, 35, 30)), HU["liver"], T["liver"], where=under)
    sc, sr = j((-95, -40, 75)), s((32, 55, 50))
    cv.ellipsoid(sc, sr, HU["spleen"], T["spleen"], where=lambda X, Y, Z: under(X, Y, Z) & (
        ((X - sc[0] - 40) / 35) ** 2 + ((Y - sc[1] - 25) / 45) ** 2 + ((Z - sc[2]) / 60) ** 2 > 1))
    stc = j((-55, 30, 80))
    cv.ellipsoid(stc, s((45, 40, 50)), HU["stomach"], T["stomach"], where=under)
    cv.ellipsoid(stc, (38, 33, 41), HU["gas"], None, where=lambda X, Y, Z: under(X, Y, Z) & (Z > stc[2] + 22))
    cv.ellipsoid(j((55, 40, -5), 3), s((15, 18, 32)), HU["gallbladder"], T["gallbladder"])
    for side, c in (("right", j((70, -50, -25))), ("left", j((-70, -45, -5)))):
        r = s((28, 25, 55))
        cv.ellipsoid(c, r, HU["kidney_cortex"], T[f"kidney_{side}"])
        cv.ellipsoid(c, tuple(0.55 * np.array(r)), HU["kidney_medulla"], None)
    cv.ellipsoid(j((45, -40, 45), 3), (8, 14, 15), HU["adrenal"], T["adrenal_gland_right"])
    cv.ellipsoid(j((-45, -35, 30), 3), (8, 14, 15), HU["adrenal"], T["adrenal_gland_left"])
    cv.tube([(35, 5, 5), (0, 15, 20), (-45, 0, 35), (-80, -25, 50)], 11, HU["pancreas"], T["pancreas"])
    cv.tube([(45, 0, 35), (58, 5, 0), (40, 5, -25), (0, 10, -30)], 12, HU["bowel"], T["duodenum"])

    # Bowel
    colon = [(0, -10, -200), (-30, 10, -180), (-90, -10, -140), (-95, -5, 60), (-20, 70, 15),
             (60, 50, 20), (88, 0, 10), (88, 0, -130), (70, 20, -150)]
    cv.tube(colon, 20, HU["bowel"], T["colon"])
    cv.tube(colon, 13, HU["gas"], None)
    for _ in range(30):
        c = rng.uniform((-60, -5, -140), (60, 70, -30))
        cv.ellipsoid(c, (rng.uniform(11, 17),) * 3, HU["bowel"], T["small_bowel"])
    cv.ellipsoid(j((0, 45, -215)), s((45, 35, 35)), HU["bladder"], T["urinary_bladder"])

    # Vessels
    cv.tube([(-25, -45, 400), (-22, -40, 100), (-15, -30, 30), (-10, -28, -95)], 12, HU["artery"], T["aorta"])
    for side, sx in (("left", -1), ("right", 1)):
        cv.tube([(-10, -28, -95), (-10 + sx * 45, -25, -150), (sx * 72, -5, -215)], 7, HU["artery"],
                T[f"iliac_artery_{side}"])
        cv.tube([(20, -30, -100), (20 + sx * 40, -32, -150), (sx * 75, -12, -215)], 8, HU["vein"],
                T[f"iliac_vena_{side}"])
    cv.tube([(20, -30, -100), (22, -28, 40), (25, -20, 115)], 11, HU["vein"], T["inferior_vena_cava"])
    cv.tube([(45, 5, 40), (15, -5, 20), (-40, -15, 30), (-75, -30, 55)], 7, HU["portal"],
            T["portal_vein_and_splenic_vein"])
    cv.tube([(-5, -25, 400), (-10, -20, 150), (-30, 12, 100)], 9, HU["esophagus"], T["esophagus"])

    # Spine: discs, canal and cord, then the vertebrae
    cv.cylinder(0, -55, 22, 17, -145, 300, HU["disc"], 0)
    cv.cylinder(0, -85, 9, 9, -160, 400, HU["csf"], 0)
    cv.cylinder(0, -85, 5, 5, 0, 400, HU["cord"], T["spinal_cord"])
    for name, z0, z1 in _vertebrae():
        vid, zm = T[f"vertebrae_{name}"], (z0 + z1) / 2
        cv.cylinder(0, -55, 22, 17, z0, z1, HU["cortical_bone"], vid)
        cv.cylinder(0, -55, 19.5, 14.5, z0 + 1.5, z1 - 1.5, HU["cancellous_bone"], vid)
        cv.paint((-16, -101, z0 + 3), (16, -69, z1 - 3),
                 lambda X, Y, Z: (X ** 2 + (Y + 85) ** 2 >= 81) & (X ** 2 + (Y + 85) ** 2 <= 256),
                 HU["posterior_elements"], vid)
        cv.paint((-4, -118, z0), (4, -99, z1 - 4), lambda X, Y, Z: True, HU["posterior_elements"], vid)
        cv.paint((-45, -92, zm - 5), (45, -80, zm + 5), lambda X, Y, Z: np.abs(X) >= 14,
                 HU["posterior_elements"], vid)
    _paint_ribs(cv, fat)
    front = BODY_CY + BODY_B - fat
    cv.paint((-15, front - 14, 100), (15, front - 3, 400), lambda X, Y, Z: True, HU["rib"], T["sternum"])

    # Pelvis
    cv.ellipsoid(j((0, -70, -185), 3), (45, 20, 40), HU["cortical_bone"] // 2, T["sacrum"])
    cv.ellipsoid(j((-105, -45, -175), 3), (13, 60, 55), HU["posterior_elements"], T["hip_left"])
    cv.ellipsoid(j((105, -45, -175), 3), (13, 60, 55), HU["posterior_elements"], T["hip_right"])


def _paint_ribs(cv: _Canvas, fat_mm: float):
    """Ribs follow the muscle wall from the spine forwards, sloping down ~30 mm per radian."""
    a, b = BODY_A - fat_mm - 5, BODY_B - fat_mm - 5
    phi0 = 0.3
    z_post = {name: (z0 + z1) / 2 for name, z0, z1 in _vertebrae()}
    for k in range(4, 13):
        zp = z_post[f"T{k}"]
        phi1 = {11: 1.6, 12: 1.1}.get(k, 2.3 if k >= 8 else 2.5)
        z_low = zp - 30 * (phi1 - phi0)
        for side, sx in (("left", -1), ("right", 1)):
            def inside(X, Y, Z, sx=sx, zp=zp, phi1=phi1):
                u, v = sx * X / a, -(Y - BODY_CY) / b
                phi = np.arctan2(u, v)
                radial = np.abs(np.sqrt(u ** 2 + v ** 2) - 1) * (a + b) / 2
                zc = zp - 30 * (phi - phi0)
                return (radial < 4) & (phi > phi0) & (phi < phi1) & (np.abs(Z - zc) < 5)
            xlo, xhi = (0, a + 8) if sx > 0 else (-a - 8, 0)
            cv.paint((xlo, BODY_CY - b - 8, z_low - 6), (xhi, BODY_CY + b + 8, zp + 6), inside,
                     HU["rib"], TS_IDS[f"rib_{side}_{k}"])


# --------------------------------------------------------------------------- public API

def make_phantom(shape, spacing, orientation: str = "RAS", seed: int = 0,
                 noise_sd: float = NOISE_SD):
    """Return ``(hu int16, labels uint8, affine)`` for one phantom, stored in ``orientation``.

    The same seed gives the same world-space volume for "RAS" and "LPS"; only the storage
    order and the affine differ.
    """
    if orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be RAS or LPS, not {orientation!r}")
    nx, ny, nz = (int(n) for n in shape)
    sp = np.asarray(spacing, float)
    rng = np.random.default_rng(seed)

    # Patient size fits the field of view; the template origin sits near the FOV's centre.
    half_fov = min(nx * sp[0], ny * sp[1]) / 2
    sxy = min(rng.uniform(0.9, 1.08), (half_fov - 8) / BODY_A)
    sz = rng.uniform(0.92, 1.08)
    length = nz * sp[2]
    z_centre = 35 - max(0.0, length - 250) * 0.075 + rng.uniform(-10, 10)
    table_z = float(np.round(rng.uniform(-600, -100), 1))  # arbitrary scanner z of the FOV centre

    origin = np.array([-(nx - 1) / 2 * sp[0], -(ny - 1) / 2 * sp[1], table_z - (nz - 1) / 2 * sp[2]])
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = origin
    xw, yw, zw = (origin[i] + np.arange(n) * sp[i] for i, n in enumerate((nx, ny, nz)))
    cv = _Canvas(xw / sxy, yw / sxy, (zw - table_z) / sz + z_centre)
    _paint_anatomy(cv, rng)

    img, lab = cv.img, cv.lab
    noise_rng = np.random.default_rng([seed, 1])
    step = max(1, 2_000_000 // (nx * ny))
    for k in range(0, nz, step):
        chunk = img[:, :, k:k + step]
        noise = noise_rng.standard_normal(chunk.shape, dtype=np.float32) * np.float32(noise_sd)
        chunk += np.rint(noise).astype(np.int16)
    fov = (xw[:, None] ** 2 + yw[None, :] ** 2) > half_fov ** 2
    img[fov] = HU["outside_fov"]

    if orientation == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [nx - 1, ny - 1]
        affine = affine @ flip
        img, lab = img[::-1, ::-1, :].copy(), lab[::-1, ::-1, :].copy()
    return img, lab, affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    img.to_filename(tmp)
    tmp.replace(path)


def write_phantom(spec: PhantomSpec, image_path: Path, label_path: Path) -> list[int]:
    """Generate ``spec`` and write image and labels (.nii.gz); return the label ids present."""
    img, lab, affine = make_phantom(spec.shape, spec.spacing, spec.orientation, spec.seed)
    _save(img, affine, Path(image_path))
    _save(lab, affine, Path(label_path))
    return [int(v) for v in np.unique(lab) if v]


def spec_json(spec: PhantomSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)
