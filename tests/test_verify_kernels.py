"""The compiled verification kernels against the OpenCV operations they follow (to float rounding): area
resampling, Gaussian blur and Sobel gradients with reflect-101 borders, normalised cross-correlation, and
bilinear warps with replicated borders."""

import cv2
import numpy as np
import pytest

from curation_assets.core import verify_kernels as vk


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.random((96, 128)).astype(np.float32) * 255, (0, 0), 2.0)
    return np.ascontiguousarray(smooth + rng.normal(0, 4, smooth.shape).astype(np.float32))


@pytest.mark.parametrize("shape", [(48, 64), (30, 37), (27, 28), (96, 128)])
def test_area_resampling_matches_opencv(image, shape):
    ours = vk._resize_area(image, *shape)
    theirs = cv2.resize(image, shape[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(ours - theirs).max() < 1e-2


@pytest.mark.parametrize("blur", [0.0, 0.35, 0.7])
def test_gradients_match_opencv(image, blur):
    mag, gx, gy = (np.empty_like(image) for _ in range(3))
    vk._gradients(image, blur, mag, gx, gy)
    g = cv2.GaussianBlur(image, (0, 0), blur) if blur else image
    ref_x, ref_y = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    assert np.abs(gx - ref_x).max() < 1e-2 and np.abs(gy - ref_y).max() < 1e-2
    assert np.abs(mag - cv2.magnitude(ref_x, ref_y)).max() < 1e-2


@pytest.mark.parametrize("template", [(22, 22), (45, 40), (90, 90)])
def test_best_ncc_is_opencvs_maximum(image, template):
    th, tw = template
    region = image[:th + 6, :tw + 5]
    padded = np.zeros((region.shape[0], tw - 1 + vk.lanes(6) + 8), np.float32)
    padded[:, :region.shape[1]] = region
    tmpl = np.ascontiguousarray(image[30:30 + th, 20:20 + tw] if th < 60 else image[3:3 + th, 2:2 + tw])
    tz = (tmpl - tmpl.mean()).astype(np.float32)
    ncc, y, x = vk._best_ncc(padded, region.shape[1], tz, float((tz.astype(np.float64) ** 2).sum()))
    ref = cv2.matchTemplate(np.ascontiguousarray(region), tmpl, cv2.TM_CCOEFF_NORMED)
    assert abs(ncc - ref.max()) < 1e-4 and ref[y, x] > ref.max() - 1e-4


def test_warp_matches_opencv_affine_scaling(image):
    inv, x0, y0 = 1 / 1.07, 10.3, -2.6
    ours = vk._warp(image, inv, x0, y0, 70, 90)
    m = np.array([[inv, 0, x0], [0, inv, y0]], np.float32)
    theirs = cv2.warpAffine(image, m, (90, 70), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(image).max()  # OpenCV quantises to 1/32 px
    assert np.abs(ours - theirs).mean() < 0.5


def test_strided_template_ncc_is_the_ncc_of_the_sampled_pixels(image):
    """A template whose pixels are taken 2 apart: at every offset, the correlation coefficient of those pixels
    with the image pixels under them (computed here directly), and the best offset is the brute-force best."""
    region = np.ascontiguousarray(image[:40, :44])
    padded = np.zeros((40, 64), np.float32)
    padded[:, :44] = region
    box = image[50:72, 60:82]
    sub = box[::2, ::2].astype(np.float64)
    tz = (sub - sub.mean()).astype(np.float32)
    ncc, y, x = vk._best_ncc_sampled(padded, 44, tz, float((tz.astype(np.float64) ** 2).sum()), 2)
    span = 2 * (sub.shape[0] - 1) + 1
    scores = np.full((40 - span + 1, 44 - span + 1), -2.0)
    for oy in range(scores.shape[0]):
        for ox in range(scores.shape[1]):
            window = region[oy:oy + span:2, ox:ox + span:2].astype(np.float64)
            scores[oy, ox] = np.corrcoef(window.ravel(), sub.ravel())[0, 1]
    assert abs(ncc - scores.max()) < 1e-4 and scores[y, x] > scores.max() - 1e-4
