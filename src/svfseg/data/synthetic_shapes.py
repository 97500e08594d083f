"""Shape families and texture families of the synthetic-5i benchmark (pure numpy/cv2 drawing)."""
from __future__ import annotations

import numpy as np

__all__ = ["SHAPES", "TEXTURES", "shape_polygons", "texture", "random_blob"]

SHAPES = (
    "disc", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "heart", "arrow",
    "diamond", "lshape", "tshape", "ellipse", "pentagon", "semicircle", "gear", "hourglass", "bolt", "trapezoid",
)
TEXTURES = ("stripes", "checker", "dots", "rings", "zigzag", "grid", "waves", "blotches", "spokes", "plaid")


def _circle(n: int = 48, rx: float = 1.0, ry: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _ngon(n: int, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _poly(*pts) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64)


def shape_polygons(name: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Unit-size outline of one instance of a shape family, with intra-class variation.

    Returns:
        (filled polygons, hole polygons), each an (N, 2) array in units of the object radius.
    """
    holes: list[np.ndarray] = []
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731 - short local jitter helper
    if name == "disc":
        fill = [_circle(48, 1.0, j(0.88, 1.0))]
    elif name == "ellipse":
        fill = [_circle(48, 1.0, j(0.34, 0.45))]
    elif name == "square":
        a = j(0.8, 1.0)
        fill = [_poly((-a, -a), (a, -a), (a, a), (-a, a))]
    elif name == "diamond":
        w = j(0.42, 0.55)
        fill = [_poly((0, -1), (w, 0), (0, 1), (-w, 0))]
    elif name == "triangle":
        fill = [_ngon(3) * [1.0, j(0.9, 1.1)]]
    elif name == "pentagon":
        fill = [_ngon(5)]
    elif name == "hexagon":
        fill = [_ngon(6, 0.0)]
    elif name == "star":
        n, inner = 5, j(0.38, 0.5)
        t = -np.pi / 2 + np.arange(2 * n) * np.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        fill = [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    elif name == "gear":
        n = int(rng.integers(7, 10))
        t = np.linspace(0, 2 * np.pi, n * 8, endpoint=False)
        r = np.where((np.arange(n * 8) // 4) % 2 == 0, 1.0, 0.74)
        fill = [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
        holes = [_circle(24, 0.3, 0.3)]
    elif name == "cross":
        a = j(0.28, 0.38)
        fill = [_poly((-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                      (-1, -a), (-a, -a))]
    elif name == "ring":
        fill = [_circle(48)]
        holes = [_circle(40, j(0.5, 0.62), j(0.5, 0.62))]
    elif name == "crescent":
        fill = [_circle(48)]
        holes = [_circle(48, 0.85, 0.85, j(0.35, 0.5), 0.0)]
    elif name == "semicircle":
        t = np.linspace(0, np.pi, 32)
        fill = [np.concatenate([np.stack([np.cos(t), -np.sin(t) * j(0.9, 1.1)], 1) + [0, 0.4]], 0)]
    elif name == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        fill = [np.stack([x, y], 1) / 16.0]
    elif name == "arrow":
        s, h = j(0.18, 0.26), j(0.55, 0.7)
        fill = [_poly((-1, -s), (0.1, -s), (0.1, -h), (1, 0), (0.1, h), (0.1, s), (-1, s))]
    elif name == "lshape":
        a = j(0.3, 0.42)
        fill = [_poly((-0.8, -1), (-0.8 + 2 * a, -1), (-0.8 + 2 * a, 1 - 2 * a), (0.8, 1 - 2 * a), (0.8, 1),
                      (-0.8, 1))]
    elif name == "tshape":
        a = j(0.22, 0.3)
        fill = [_poly((-1, -1), (1, -1), (1, -1 + 2 * a), (a, -1 + 2 * a), (a, 1), (-a, 1), (-a, -1 + 2 * a),
                      (-1, -1 + 2 * a))]
    elif name == "hourglass":
        w = j(0.15, 0.25)
        fill = [_poly((-0.8, -1), (0.8, -1), (w, 0), (0.8, 1), (-0.8, 1), (-w, 0))]
    elif name == "bolt":
        fill = [_poly((-0.1, -1), (0.55, -1), (0.15, -0.15), (0.6, -0.15), (-0.35, 1), (-0.05, 0.15),
                      (-0.5, 0.15))]
    elif name == "trapezoid":
        top = j(0.3, 0.5)
        fill = [_poly((-top, -0.65), (top, -0.65), (1, 0.65), (-1, 0.65))]
    else:
        raise ValueError(f"unknown synthetic shape {name!r}: expected one of {SHAPES}")
    return fill, holes


def random_blob(rng: np.random.Generator) -> np.ndarray:
    """An irregular blob outline (distractor), unit radius."""
    n = int(rng.integers(7, 12))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.5, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _soft(x: np.ndarray, sharp: float = 2.5) -> np.ndarray:
    return np.clip(0.5 + sharp * x, 0.0, 1.0)


def texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern in [0, 1] over object coordinates (u, v) (units of object radius).

    Frequencies, phases and widths vary per instance within a class-specific range.
    """
    two_pi = 2 * np.pi
    f = float(rng.uniform(2.2, 3.2))
    ph = float(rng.uniform(0, two_pi))
    if name == "stripes":
        return _soft(np.sin(two_pi * f * u + ph))
    if name == "checker":
        return _soft(np.sin(two_pi * 0.8 * f * u + ph) * np.sin(two_pi * 0.8 * f * v))
    if name == "dots":
        g = 1.3 * f
        du, dv = (u * g + ph) % 1.0 - 0.5, (v * g) % 1.0 - 0.5
        return _soft(0.3 - np.sqrt(du * du + dv * dv), 8.0)
    if name == "rings":
        return _soft(np.sin(two_pi * f * np.sqrt(u * u + v * v) + ph))
    if name == "zigzag":
        tri = np.abs((v * 1.2 * f) % 1.0 - 0.5)
        return _soft(np.sin(two_pi * f * (u + 0.6 * tri) + ph))
    if name == "grid":
        g = 1.1 * f
        d = np.minimum(np.abs((u * g + ph) % 1.0 - 0.5), np.abs((v * g) % 1.0 - 0.5))
        return _soft(d - 0.36, 10.0)
    if name == "waves":
        return _soft(np.sin(two_pi * f * (u + 0.18 * np.sin(two_pi * 0.9 * v + ph))))
    if name == "blotches":
        import cv2

        k = 6
        grid = rng.random((k, k)).astype(np.float32)
        span = 2.4
        x = ((u + span / 2) / span * (k - 1)).astype(np.float32)
        y = ((v + span / 2) / span * (k - 1)).astype(np.float32)
        field = cv2.remap(grid, x, y, interpolation=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        return _soft(field - 0.5, 6.0)
    if name == "spokes":
        n = int(rng.integers(6, 10))
        return _soft(np.sin(n * np.arctan2(v, u) + ph))
    if name == "plaid":
        a = np.sin(two_pi * f * u + ph) > 0
        b = np.sin(two_pi * 0.5 * f * v) > 0
        return (0.2 + 0.4 * a + 0.4 * b).astype(np.float64)
    raise ValueError(f"unknown synthetic texture {name!r}: expected one of {TEXTURES}")
