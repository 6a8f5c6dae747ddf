"""Mask -> polygons on synthetic shapes of known geometry, scored by IoU of the refilled
polygons against the mask."""

import cv2
import numpy as np
import pytest

from serve_apps.engines.segmenter import mask_to_polygons

H, W = 240, 320


def circle(cx=160, cy=120, r=60):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def rectangle(x0=100, y0=50, x1=220, y1=150):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def fill(polygons):
    canvas = np.zeros((H, W), np.uint8)
    for flat in polygons:
        cv2.fillPoly(canvas, [np.array(flat, np.int32).reshape(-1, 2)], 1)
    return canvas.astype(bool)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize(
    ("epsilon", "min_iou", "max_points"),
    [(0.0, 0.999, 400), (0.003, 0.98, 40), (0.01, 0.95, 16)],
)
def test_circle(epsilon, min_iou, max_points):
    mask = circle()
    (polygon,) = mask_to_polygons(mask, epsilon=epsilon)
    assert iou(fill([polygon]), mask) >= min_iou
    assert 3 <= len(polygon) // 2 <= max_points
    xs, ys = polygon[0::2], polygon[1::2]
    assert min(xs) == 100 and max(xs) == 220 and min(ys) == 60 and max(ys) == 180


def test_rectangle_is_its_four_corners_in_pixel_coordinates():
    (polygon,) = mask_to_polygons(rectangle())
    corners = sorted(zip(polygon[0::2], polygon[1::2], strict=True))
    assert corners == [(100, 50), (100, 149), (219, 50), (219, 149)]  # boundary pixel centres
    assert iou(fill([polygon]), rectangle()) == 1.0


def test_two_blobs_give_two_polygons_largest_first():
    mask = circle(80, 120, 50) | rectangle(200, 100, 240, 140)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    big, small = (fill([p]) for p in polygons)
    assert big.sum() > small.sum()
    assert iou(big, circle(80, 120, 50)) >= 0.98
    assert iou(small, rectangle(200, 100, 240, 140)) == 1.0
    assert iou(fill(polygons), mask) >= 0.98


def test_specks_and_lines_are_dropped_and_the_count_is_bounded():
    mask = rectangle()
    mask[5:7, 5:7] = True  # a 2x2 speck: area 1 < 10
    mask[200, 10:300] = True  # a one-pixel line: area 0
    assert len(mask_to_polygons(mask)) == 1
    dots = np.zeros((H, W), bool)
    for i in range(6):
        dots[20 + 30 * i : 40 + 30 * i, 20:40] = True
    assert len(mask_to_polygons(dots, max_polygons=4)) == 4


def test_holes_are_filled_and_empty_masks_give_nothing():
    ring = circle(r=80) & ~circle(r=40)
    (outer,) = mask_to_polygons(ring)
    assert iou(fill([outer]), circle(r=80)) >= 0.98  # outer contour only
    assert mask_to_polygons(np.zeros((H, W), bool)) == []
