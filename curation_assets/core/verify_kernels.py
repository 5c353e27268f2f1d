"""Compiled kernels of pixel verification (numba, ``nogil``): what :mod:`curation_assets.core.pixel_verify` does
to a block of thumbnails and the pairs among them, as whole loops instead of ~35 small OpenCV calls a pair.

:func:`layout` sizes every image's prepared maps inside one flat float32 ``store`` and one float64 table
store (``imeta`` rows: shapes and offsets; ``fmeta`` rows: centres, template norms and level scales),
:func:`prepare` fills an image's part of both from its BGR thumbnail, and :func:`verify` scores a range of
pairs. Calls on different images or pairs are independent, so threads split a block between them.

Image operations follow OpenCV's definitions (``INTER_AREA`` resampling, Gaussian blur with OpenCV's kernel
size, 3x3 Sobel, reflect-101 borders, ``TM_CCOEFF_NORMED``, bilinear warps with replicated borders), computed
in float32 (window statistics in float64); they agree with OpenCV to rounding, not bit for bit (the tests
check each against OpenCV), which is why the thresholds are calibrated on this implementation.

Cost is kept down by shape: a correlation runs template element by template element over whole SIMD vectors
of offsets (:func:`lanes`); a template whose pixels are taken 2 apart searches each phase image of the other
(every second pixel from each starting row and column) with that same plain kernel; and the coarse pyramid's
phase images and their summed-area tables are made once per image, not once per pair."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = {"cache": True, "nogil": True}

# imeta columns (int64)
OK, H, W = 0, 1, 2
FMAG, FGX, FGY, FTZ, FY0, FX0, FTH, FTW = 3, 4, 5, 6, 7, 8, 9, 10
MH, MW, MMAG, MTZ, MY0, MX0, MTH, MTW, COLOUR = 11, 12, 13, 14, 15, 16, 17, 18, 19
CH, CW, CTZ, CTH, CTW = 20, 21, 22, 23, 24
CSTRIDE, MSTRIDE, FSTRIDE = 25, 26, 27  # template pixels this far apart at a quarter, half and full width
LEVELS = 28  # then per level: height, width, and per phase (rows, cols, stored width, offset, table offset)
PHASES = 4  # phase records per level: a coarse stride of 1 or 2
LEVEL_RECORD = 2 + 5 * PHASES
# fmeta columns (float64)
CX, CY, MCX, MCY, CCX, CCY, FNORM, MNORM, CNORM = 0, 1, 2, 3, 4, 5, 6, 7, 8
FLEVELS = 9  # then (x scale, y scale) per level


@njit(**_JIT)
def _centre_box(h, w, fraction, minimum):
    th, tw = max(minimum, int(round(h * fraction))), max(minimum, int(round(w * fraction)))
    return (h - th) // 2, (w - tw) // 2, th, tw


@njit(**_JIT)
def _padded(width, template_width):
    """A level's stored width: wide enough for :func:`lanes` offsets of a template ``template_width`` wide."""
    return template_width - 1 + lanes(width - template_width + 1) if width >= template_width else width


@njit(**_JIT)
def layout(heights, width, crop_fraction, scales, coarse_stride, mid_stride, fine_stride):
    """Shapes and offsets of every image's maps: ``(imeta, fmeta, store size, table store size)``. A level is
    stored as its ``coarse_stride ** 2`` phase images (every stride-th pixel from each starting row and
    column), each with its summed-area tables (float64, in the table store): a search of a sampled template is
    then plain correlations over contiguous rows, and the tables are made once per image, not per pair."""
    n, k = len(heights), len(scales)
    if coarse_stride * coarse_stride > PHASES:
        raise ValueError("coarse stride must be 1 or 2")
    imeta = np.zeros((n, LEVELS + LEVEL_RECORD * k), np.int64)
    fmeta = np.zeros((n, FLEVELS + 2 * k), np.float64)
    off, doff = 0, 0
    for i in range(n):
        h, w = heights[i], width
        if h < 8:
            continue
        im, fm = imeta[i], fmeta[i]
        im[OK], im[H], im[W] = 1, h, w
        im[CSTRIDE], im[MSTRIDE], im[FSTRIDE] = coarse_stride, mid_stride, fine_stride
        y0, x0, th, tw = _centre_box(h, w, crop_fraction, 8)
        im[FY0], im[FX0], im[FTH], im[FTW] = y0, x0, th, tw
        fm[CX], fm[CY] = x0 + tw / 2, y0 + th / 2
        for field in (FMAG, FGX, FGY):
            im[field] = off
            off += h * w
        im[FTZ] = off
        off += sampled(th, fine_stride) * sampled(tw, fine_stride)
        mw, mh = max(8, int(round(w * 0.5))), max(8, int(round(h * 0.5)))
        my0, mx0, mth, mtw = _centre_box(mh, mw, crop_fraction, 6)
        im[MH], im[MW], im[MY0], im[MX0], im[MTH], im[MTW] = mh, mw, my0, mx0, mth, mtw
        fm[MCX], fm[MCY] = (mx0 + mtw / 2) / 0.5, (my0 + mth / 2) / 0.5
        im[MMAG] = off
        off += mh * mw
        im[MTZ] = off
        off += sampled(mth, mid_stride) * sampled(mtw, mid_stride)
        im[COLOUR] = off
        off += mh * mw * 3
        cw, ch = max(6, int(round(w * 0.25))), max(6, int(round(h * 0.25)))
        cy0, cx0, cth, ctw = _centre_box(ch, cw, crop_fraction, 4)
        im[CH], im[CW], im[CTH], im[CTW] = ch, cw, cth, ctw
        fm[CCX], fm[CCY] = (cx0 + ctw / 2) / 0.25, (cy0 + cth / 2) / 0.25
        im[CTZ] = off
        off += sampled(cth, coarse_stride) * sampled(ctw, coarse_stride)
        tw2 = sampled(ctw, coarse_stride)
        for j in range(k):
            lw, lh = max(6, int(round(cw * scales[j]))), max(6, int(round(ch * scales[j])))
            rec = LEVELS + LEVEL_RECORD * j
            im[rec], im[rec + 1] = lh, lw
            fm[FLEVELS + 2 * j], fm[FLEVELS + 2 * j + 1] = lw / cw, lh / ch
            for phase in range(coarse_stride * coarse_stride):
                py, px = phase // coarse_stride, phase % coarse_stride
                rows, cols = sampled(lh - py, coarse_stride), sampled(lw - px, coarse_stride)
                stored = _padded(cols, tw2)
                im[rec + 2 + 5 * phase:rec + 7 + 5 * phase] = rows, cols, stored, off, doff
                off += rows * stored
                doff += 2 * (rows + 1) * (cols + 1)
    return imeta, fmeta, off, doff


# --------------------------------------------------------------------------- image operations


@njit(**_JIT)
def _reflect(i, n):
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * n - 2 - i
    return i


@njit(**_JIT)
def _separable(src, kx, ky):
    """``src`` correlated with ``ky`` down the columns and ``kx`` along the rows (reflect-101 borders)."""
    h, w = src.shape
    rx, ry = len(kx) // 2, len(ky) // 2
    line = np.empty(w + 2 * rx, np.float32)
    tmp = np.empty((h + 2 * ry, w), np.float32)
    for y in range(h):
        for x in range(w + 2 * rx):
            line[x] = src[y, _reflect(x - rx, w)]
        row = tmp[y + ry]
        for x in range(w):
            row[x] = 0.0
        for t in range(len(kx)):
            k = kx[t]
            for x in range(w):
                row[x] += k * line[x + t]
    for y in range(ry):
        tmp[y] = tmp[ry + _reflect(y - ry, h)]
        tmp[h + ry + y] = tmp[ry + _reflect(h + y, h)]
    out = np.zeros((h, w), np.float32)
    for y in range(h):
        for t in range(len(ky)):
            k = ky[t]
            for x in range(w):
                out[y, x] += k * tmp[y + t, x]
    return out


@njit(**_JIT)
def _gaussian(sigma):
    """OpenCV's Gaussian kernel for float images: ``round(8 sigma + 1) | 1`` taps."""
    size = int(round(sigma * 8 + 1)) | 1
    r = size // 2
    k = np.empty(size, np.float32)
    total = 0.0
    for i in range(size):
        v = math.exp(-0.5 * ((i - r) / sigma) ** 2)
        k[i] = v
        total += v
    for i in range(size):
        k[i] = np.float32(k[i] / total)
    return k


@njit(**_JIT)
def _blur(src, sigma):
    if sigma <= 0:
        return src
    k = _gaussian(sigma)
    return _separable(src, k, k)


@njit(**_JIT)
def _gradients(gray, blur, mag, gx, gy):
    """Gradient magnitude and signed x, y gradients (3x3 Sobel, reflect-101 borders) of ``gray`` after a
    Gaussian blur, as one stencil pass over a bordered copy."""
    g = _blur(gray, blur)
    h, w = g.shape
    p = np.empty((h + 2, w + 2), np.float32)
    for y in range(-1, h + 1):
        src = g[_reflect(y, h)]
        row = p[y + 1]
        for x in range(w):
            row[x + 1] = src[x]
        row[0], row[w + 1] = src[_reflect(-1, w)], src[_reflect(w, w)]
    for y in range(h):
        r0, r1, r2 = p[y], p[y + 1], p[y + 2]
        for x in range(w):
            dx = (r0[x + 2] - r0[x]) + 2 * (r1[x + 2] - r1[x]) + (r2[x + 2] - r2[x])
            dy = (r2[x] + 2 * r2[x + 1] + r2[x + 2]) - (r0[x] + 2 * r0[x + 1] + r0[x + 2])
            gx[y, x], gy[y, x] = dx, dy
            mag[y, x] = math.sqrt(dx * dx + dy * dy)


@njit(**_JIT)
def _area_weights(n_in, n_out):
    """``INTER_AREA`` downscaling along one axis: output ``j`` averages the input it covers,
    ``[j s, (j + 1) s)`` with ``s = n_in / n_out``, weighting each input pixel by its overlap."""
    s = n_in / n_out
    taps = int(math.ceil(s)) + 1
    first = np.zeros(n_out, np.int64)
    weights = np.zeros((n_out, taps), np.float32)
    for j in range(n_out):
        lo, hi = j * s, (j + 1) * s
        start = int(math.floor(lo))
        first[j] = start
        for t in range(taps):
            i = start + t
            if i >= n_in:
                break
            overlap = min(hi, i + 1.0) - max(lo, float(i))
            if overlap > 0:
                weights[j, t] = overlap / s
    return first, weights


@njit(**_JIT)
def _resize_area(src, out_h, out_w):
    """``src`` (h, w) downscaled to (out_h, out_w) by area averaging."""
    h, w = src.shape
    if h == 2 * out_h and w == 2 * out_w:  # halving: each output is the mean of a 2 x 2 block
        out = np.empty((out_h, out_w), np.float32)
        for y in range(out_h):
            r0, r1 = src[2 * y], src[2 * y + 1]
            for x in range(out_w):
                out[y, x] = np.float32(0.25) * ((r0[2 * x] + r0[2 * x + 1]) + (r1[2 * x] + r1[2 * x + 1]))
        return out
    fx, wx = _area_weights(w, out_w)
    fy, wy = _area_weights(h, out_h)
    rows = np.zeros((out_h, w), np.float32)  # down the columns first: whole rows at a time
    for y in range(out_h):
        start, target = fy[y], rows[y]
        for t in range(min(wy.shape[1], h - start)):
            k, row = wy[y, t], src[start + t]
            for x in range(w):
                target[x] += k * row[x]
    out = np.empty((out_h, out_w), np.float32)
    for y in range(out_h):
        row = rows[y]
        for x in range(out_w):
            acc = np.float32(0.0)
            start = fx[x]
            for t in range(min(wx.shape[1], w - start)):
                acc += wx[x, t] * row[start + t]
            out[y, x] = acc
    return out


@njit(**_JIT)
def _zero_mean(src, y0, x0, th, tw, stride, out):
    """The template ``src[y0:y0+th:stride, x0:x0+tw:stride]`` minus its mean into ``out``; returns its sum of
    squares."""
    rows, cols = out.shape
    total = 0.0
    for y in range(rows):
        for x in range(cols):
            total += src[y0 + stride * y, x0 + stride * x]
    mean = total / (rows * cols)
    norm = 0.0
    for y in range(rows):
        for x in range(cols):
            v = src[y0 + stride * y, x0 + stride * x] - mean
            out[y, x] = v
            norm += v * v
    return norm


def sampled(size: int, stride: int) -> int:
    """Template pixels along a side of ``size`` px taken ``stride`` apart."""
    return (size + stride - 1) // stride


sampled = njit(**_JIT)(sampled)


@njit(**_JIT)
def _plane(store, off, h, w):
    return store[off:off + h * w].reshape((h, w))


@njit(**_JIT)
def _take_phase(src, py, px, stride, rows, cols, target):
    """Every ``stride``-th pixel of ``src`` from row ``py`` and column ``px`` into ``target[:rows, :cols]``,
    the padding columns after them zeroed."""
    target[:, cols:] = 0.0
    for y in range(rows):
        for x in range(cols):
            target[y, x] = src[py + stride * y, px + stride * x]


@njit(**_JIT)
def prepare(store, tables, imeta, fmeta, i, bgr, blur, colour_blur):
    """Fill image ``i``'s maps in ``store`` from its BGR thumbnail (``width`` x H, float32): gradients at full
    width (searched last, compared cell by cell), gradient magnitude and blurred colour at half width, and at
    a quarter width the coarse template and one gradient-magnitude map per level (relative scale)."""
    im, fm = imeta[i], fmeta[i]
    h, w = im[H], im[W]
    gray = np.empty((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            gray[y, x] = (np.float32(0.114) * bgr[y, x, 0] + np.float32(0.587) * bgr[y, x, 1]
                          + np.float32(0.299) * bgr[y, x, 2])
    mag = _plane(store, im[FMAG], h, w)
    _gradients(gray, blur, mag, _plane(store, im[FGX], h, w), _plane(store, im[FGY], h, w))
    fs = im[FSTRIDE]
    fm[FNORM] = _zero_mean(mag, im[FY0], im[FX0], im[FTH], im[FTW], fs,
                           _plane(store, im[FTZ], sampled(im[FTH], fs), sampled(im[FTW], fs)))

    mh, mw = im[MH], im[MW]
    mid = _plane(store, im[MMAG], mh, mw)
    half = _resize_area(gray, mh, mw)
    _gradients(half, blur * 0.5, mid, np.empty((mh, mw), np.float32),
               np.empty((mh, mw), np.float32))
    ms = im[MSTRIDE]
    fm[MNORM] = _zero_mean(mid, im[MY0], im[MX0], im[MTH], im[MTW], ms,
                           _plane(store, im[MTZ], sampled(im[MTH], ms), sampled(im[MTW], ms)))
    k = _gaussian(colour_blur)
    for c in range(3):
        plane = _separable(_resize_area(bgr[:, :, c].copy(), mh, mw), k, k)
        store[im[COLOUR] + c * mh * mw:im[COLOUR] + (c + 1) * mh * mw] = plane.ravel()

    ch_, cw = im[CH], im[CW]
    coarse = np.empty((ch_, cw), np.float32)
    _gradients(_resize_area(half, ch_, cw), 0.0, coarse, np.empty((ch_, cw), np.float32),
               np.empty((ch_, cw), np.float32))
    cy0, cx0 = (ch_ - im[CTH]) // 2, (cw - im[CTW]) // 2
    cs = im[CSTRIDE]
    fm[CNORM] = _zero_mean(coarse, cy0, cx0, im[CTH], im[CTW], cs,
                           _plane(store, im[CTZ], sampled(im[CTH], cs), sampled(im[CTW], cs)))
    for j in range((imeta.shape[1] - LEVELS) // LEVEL_RECORD):
        rec = LEVELS + LEVEL_RECORD * j
        lh, lw = im[rec], im[rec + 1]
        level = np.empty((lh, lw), np.float32)
        _gradients(_resize_area(half, lh, lw), 0.0, level, np.empty((lh, lw), np.float32),
                   np.empty((lh, lw), np.float32))
        for phase in range(cs * cs):
            py, px = phase // cs, phase % cs
            rows, cols, stored, off, doff = im[rec + 2 + 5 * phase:rec + 7 + 5 * phase]
            target = _plane(store, off, rows, stored)
            _take_phase(level, py, px, cs, rows, cols, target)
            size = (rows + 1) * (cols + 1)
            _summed_areas(target, cols, tables[doff:doff + size].reshape((rows + 1, cols + 1)),
                          tables[doff + size:doff + 2 * size].reshape((rows + 1, cols + 1)))


# --------------------------------------------------------------------------- search


def lanes(valid: int) -> int:
    """Offsets computed per row: the valid ones rounded up to a multiple of 8, so the correlation's inner
    loop is whole SIMD vectors (an image is laid out ``lanes - valid`` columns wider than it needs)."""
    return (max(valid, 1) + 7) // 8 * 8


lanes = njit(**_JIT)(lanes)


@njit(cache=True, nogil=True, fastmath=True)
def _correlate(image, tz, ny, nx, out):
    """``out[oy, ox] = sum(tz * image[oy:oy + th, ox:ox + tw])`` for ``ny`` x ``nx`` offsets (``image`` at
    least ``nx + tw - 1`` wide): template element by element, each one a run of whole vectors; a wide
    template four elements at a time (measured 2.3x faster at 45 px wide, no faster at 11)."""
    th, tw = tz.shape
    out[:ny, :nx] = 0.0
    step = 4 if tw >= 16 else 1
    for i in range(th):
        trow = tz[i]
        j = 0
        while step == 4 and j + 3 < tw:
            t0, t1, t2, t3 = trow[j], trow[j + 1], trow[j + 2], trow[j + 3]
            for oy in range(ny):
                row = image[oy + i]
                acc = out[oy]
                for ox in range(nx):
                    acc[ox] += ((t0 * row[ox + j] + t1 * row[ox + j + 1])
                                + (t2 * row[ox + j + 2] + t3 * row[ox + j + 3]))
            j += 4
        while j < tw:
            t = trow[j]
            for oy in range(ny):
                row = image[oy + i]
                acc = out[oy]
                for ox in range(nx):
                    acc[ox] += t * row[ox + j]
            j += 1


@njit(cache=True, nogil=True, fastmath=True)
def _dot_offsets(image, tz, ny, nx, out):
    """:func:`_correlate` for few offsets: each offset's sum as dot products along the template's rows."""
    th, tw = tz.shape
    for oy in range(ny):
        for ox in range(nx):
            acc = np.float32(0.0)
            for i in range(th):
                row, trow = image[oy + i], tz[i]
                for j in range(tw):
                    acc += trow[j] * row[ox + j]
            out[oy, ox] = acc


@njit(**_JIT)
def _summed_areas(image, valid_w, s1, s2):
    """Summed-area tables (float64) of ``image[:, :valid_w]`` and of its square into ``s1``, ``s2``."""
    h = image.shape[0]
    s1[0, :] = 0.0
    s2[0, :] = 0.0
    for y in range(h):
        s1[y + 1, 0] = 0.0
        s2[y + 1, 0] = 0.0
        r1, r2 = 0.0, 0.0
        for x in range(valid_w):
            v = float(image[y, x])
            r1 += v
            r2 += v * v
            s1[y + 1, x + 1] = s1[y, x + 1] + r1
            s2[y + 1, x + 1] = s2[y, x + 1] + r2


@njit(**_JIT)
def _scan(image, s1, s2, tz, tnorm, ny, nx):
    """Best ``TM_CCOEFF_NORMED`` of the zero-mean template ``tz`` (sum of squares ``tnorm``) over ``ny`` x
    ``nx`` offsets of ``image``, whose summed-area tables are ``s1`` and ``s2``: ``(ncc, y, x)``, the first
    of equal maxima in row order."""
    th, tw = tz.shape
    n = th * tw
    if nx * ny <= 16:  # a few offsets of a big template: one long dot product each
        num = np.empty((ny, nx), np.float32)
        _dot_offsets(image, tz, ny, nx, num)
    else:
        num = np.empty((ny, lanes(nx)), np.float32)
        _correlate(image, tz, ny, lanes(nx), num)
    best, by, bx = -2.0, 0, 0
    for oy in range(ny):
        for ox in range(nx):
            a = s1[oy + th, ox + tw] - s1[oy, ox + tw] - s1[oy + th, ox] + s1[oy, ox]
            b = s2[oy + th, ox + tw] - s2[oy, ox + tw] - s2[oy + th, ox] + s2[oy, ox]
            denom = math.sqrt(max(b - a * a / n, 0.0) * tnorm)
            r = num[oy, ox] / denom if denom > 1e-9 * n else 0.0
            r = min(1.0, max(-1.0, r))
            if r > best:
                best, by, bx = r, oy, ox
    return best, by, bx


@njit(**_JIT)
def _best_ncc(image, valid_w, tz, tnorm):
    """Best ``TM_CCOEFF_NORMED`` of the zero-mean template ``tz`` (sum of squares ``tnorm``) over every
    offset inside ``image[:, :valid_w]`` (columns past ``valid_w`` are padding): ``(ncc, y, x)``."""
    h = image.shape[0]
    th, tw = tz.shape
    s1, s2 = np.empty((h + 1, valid_w + 1), np.float64), np.empty((h + 1, valid_w + 1), np.float64)
    _summed_areas(image, valid_w, s1, s2)
    return _scan(image, s1, s2, tz, tnorm, h - th + 1, valid_w - tw + 1)


@njit(**_JIT)
def _best_ncc_sampled(image, valid_w, tz, tnorm, stride):
    """:func:`_best_ncc` for a template whose pixels are ``stride`` apart in ``image`` (window statistics over
    the same pixels): ``image`` is split into its ``stride**2`` phase images (every ``stride``-th pixel from
    each starting row and column), each searched with the plain kernel, offsets mapped back."""
    if stride == 1:
        return _best_ncc(image, valid_w, tz, tnorm)
    h = image.shape[0]
    th, tw = tz.shape
    best, by, bx = -2.0, 0, 0
    for py in range(stride):
        rows = (h - py + stride - 1) // stride
        for px in range(stride):
            cols = (valid_w - px + stride - 1) // stride
            if rows < th or cols < tw:
                continue
            phase = np.empty((rows, tw - 1 + lanes(cols - tw + 1)), np.float32)
            _take_phase(image, py, px, stride, rows, cols, phase)
            ncc, y, x = _best_ncc(phase, cols, tz, tnorm)
            oy, ox = py + stride * y, px + stride * x
            if ncc > best or (ncc == best and (oy < by or (oy == by and ox < bx))):
                best, by, bx = ncc, oy, ox
    return best, by, bx


@njit(**_JIT)
def _taps(start, step, count, size):
    """Bilinear taps along one axis: sample ``i`` at ``start + i step`` reads ``lo[i]`` and ``hi[i]`` (clamped:
    the border replicated) with weight ``frac[i]`` on ``hi``."""
    lo, hi = np.empty(count, np.int64), np.empty(count, np.int64)
    frac = np.empty(count, np.float32)
    for i in range(count):
        pos = start + i * step
        base = math.floor(pos)
        frac[i] = pos - base
        lo[i] = min(max(int(base), 0), size - 1)
        hi[i] = min(max(int(base) + 1, 0), size - 1)
    return lo, hi, frac


@njit(**_JIT)
def _warp(src, inv, x0, y0, out_h, out_w):
    """``out[y, x] = src(x0 + x inv, y0 + y inv)``, bilinear, the border replicated (OpenCV's ``warpAffine``
    with an inverse map that only scales and shifts)."""
    h, w = src.shape
    xlo, xhi, xf = _taps(x0, inv, out_w, w)
    ylo, yhi, yf = _taps(y0, inv, out_h, h)
    first = ylo[0]
    rows = np.empty((yhi[out_h - 1] - first + 1, out_w), np.float32)  # each source row resampled once
    for r in range(rows.shape[0]):
        line, target = src[first + r], rows[r]
        for x in range(out_w):
            a = line[xlo[x]]
            target[x] = a + xf[x] * (line[xhi[x]] - a)
    out = np.empty((out_h, out_w), np.float32)
    for y in range(out_h):
        top, bottom, f = rows[ylo[y] - first], rows[yhi[y] - first], yf[y]
        for x in range(out_w):
            out[y, x] = top[x] + f * (bottom[x] - top[x])
    return out


@njit(**_JIT)
def _window(src, scale, cx, cy, tw, th, pad):
    """``src`` resampled into a template's frame: a ``(th + 2 pad, tw + 2 pad)`` window whose centre is
    ``(cx, cy)`` of ``src``, one window pixel being ``1 / scale`` source pixels, then the columns that round
    its offsets up to :func:`lanes` (sampled the same way)."""
    inv = 1.0 / scale
    return _warp(src, inv, cx + (0.5 - pad - tw / 2) * inv - 0.5, cy + (0.5 - pad - th / 2) * inv - 0.5,
                 th + 2 * pad, tw - 1 + lanes(2 * pad + 1))


@njit(**_JIT)
def _coarse(store, tables, imeta, fmeta, a, b):
    """Every level of ``b`` and every offset for ``a``'s coarse template: ``(ncc, scale, px, py)``, the point
    of ``b`` (full-width px) where the centre of ``a``'s template lands; ncc -2 when no level fits. A sampled
    template (stride 2) is searched in each phase image of a level: the offsets of one phase are those
    whose top-left pixel starts that phase."""
    ia, fa, ib, fb = imeta[a], fmeta[a], imeta[b], fmeta[b]
    th, tw, cs = ia[CTH], ia[CTW], ia[CSTRIDE]
    th2, tw2 = sampled(th, cs), sampled(tw, cs)
    tz = _plane(store, ia[CTZ], th2, tw2)
    best, scale, px, py = -2.0, 1.0, 0.0, 0.0
    for j in range((imeta.shape[1] - LEVELS) // LEVEL_RECORD):
        rec = LEVELS + LEVEL_RECORD * j
        if ib[rec] < th or ib[rec + 1] < tw:
            continue
        lbest, ly, lx = -2.0, 0, 0
        for phase in range(cs * cs):
            rows, cols, stored, off, doff = ib[rec + 2 + 5 * phase:rec + 7 + 5 * phase]
            if rows < th2 or cols < tw2:
                continue
            size = (rows + 1) * (cols + 1)
            s1 = tables[doff:doff + size].reshape((rows + 1, cols + 1))
            s2 = tables[doff + size:doff + 2 * size].reshape((rows + 1, cols + 1))
            ncc, y, x = _scan(_plane(store, off, rows, stored), s1, s2, tz, fa[CNORM], rows - th2 + 1,
                              cols - tw2 + 1)
            y, x = phase // cs + cs * y, phase % cs + cs * x
            if ncc > lbest or (ncc == lbest and (y < ly or (y == ly and x < lx))):
                lbest, ly, lx = ncc, y, x
        if lbest > best:
            sx, sy = fb[FLEVELS + 2 * j], fb[FLEVELS + 2 * j + 1]
            s = 0.5 * (sx + sy)
            best, scale = lbest, s
            px = (lx + tw / 2) / (sx * 0.25) - (fa[CCX] - fa[CX]) / s
            py = (ly + th / 2) / (sy * 0.25) - (fa[CCY] - fa[CY]) / s
    return best, scale, px, py


@njit(**_JIT)
def _refine(store, imeta, fmeta, a, b, scale, px, py, step, mid_steps, mid_pad, fine_pad):
    """Half width (``2 mid_steps + 1`` scales ``step`` apart, +-``mid_pad`` px), then full width
    (+-``fine_pad`` px): ``(ncc, b's signed x and y gradients under a's template, b's blurred colour under a's
    half-width template)``."""
    ia, fa, ib = imeta[a], fmeta[a], imeta[b]
    th, tw = ia[MTH], ia[MTW]
    ms = ia[MSTRIDE]
    mtz = _plane(store, ia[MTZ], sampled(th, ms), sampled(tw, ms))
    mid = _plane(store, ib[MMAG], ib[MH], ib[MW])
    pad = mid_pad
    best, bs, bx, by = -3.0, scale, px, py
    for d in range(-mid_steps, mid_steps + 1):
        s = scale + d * step
        cx, cy = px + (fa[MCX] - fa[CX]) / s, py + (fa[MCY] - fa[CY]) / s
        window = _window(mid, s, cx * 0.5, cy * 0.5, tw, th, pad)
        ncc, y, x = _best_ncc_sampled(window, tw + 2 * pad, mtz, fa[MNORM], ms)
        if ncc > best:
            best, bs = ncc, s
            bx, by = px + (x - pad) / (s * 0.5), py + (y - pad) / (s * 0.5)
    s, px, py = bs, bx, by
    fth, ftw = ia[FTH], ia[FTW]
    pad = fine_pad
    window = _window(_plane(store, ib[FMAG], ib[H], ib[W]), s, px, py, ftw, fth, pad)
    fs = ia[FSTRIDE]
    ftz = _plane(store, ia[FTZ], sampled(fth, fs), sampled(ftw, fs))
    ncc, y, x = _best_ncc_sampled(window, ftw + 2 * pad, ftz, fa[FNORM], fs)
    px, py = px + (x - pad) / s, py + (y - pad) / s
    inv = 1.0 / s
    x0, y0 = px + (0.5 - ftw / 2) * inv - 0.5, py + (0.5 - fth / 2) * inv - 0.5
    rx = _warp(_plane(store, ib[FGX], ib[H], ib[W]), inv, x0, y0, fth, ftw)
    ry = _warp(_plane(store, ib[FGY], ib[H], ib[W]), inv, x0, y0, fth, ftw)
    cx, cy = px + (fa[MCX] - fa[CX]) / s, py + (fa[MCY] - fa[CY]) / s
    warped = np.empty((3, th, tw), np.float32)
    for c in range(3):
        plane = _plane(store, ib[COLOUR] + c * ib[MH] * ib[MW], ib[MH], ib[MW])
        warped[c] = _window(plane, s, cx * 0.5, cy * 0.5, tw, th, 0)[:, :tw]
    return ncc, rx, ry, warped


@njit(cache=True, nogil=True, fastmath=True)
def _cell_score(tx, ty, rx, ry, cells):
    """1 - the second-largest per-cell normalised difference of two aligned signed-gradient fields: near 0
    for the same picture, near 1 where the content differs, so other text or another hand position makes
    some cell differ. Each field is normalised by its RMS energy; a cell's difference is its mean squared
    difference over its mean energy + 0.5 (the floor keeps flat cells, where noise dominates, from deciding)."""
    h, w = tx.shape
    ys, xs = np.empty(cells + 1, np.int64), np.empty(cells + 1, np.int64)
    for c in range(cells):  # cell borders as np.linspace(0, n, cells + 1).astype(int)
        ys[c], xs[c] = int(c * (h / cells)), int(c * (w / cells))
    ys[cells], xs[cells] = h, w
    tt = np.zeros((cells, cells), np.float64)  # per cell: sum t.t, r.r and t.r
    rr = np.zeros((cells, cells), np.float64)
    tr = np.zeros((cells, cells), np.float64)
    for cy in range(cells):
        for y in range(ys[cy], ys[cy + 1]):
            for cx in range(cells):
                a, b, c = np.float32(0.0), np.float32(0.0), np.float32(0.0)
                for x in range(xs[cx], xs[cx + 1]):
                    a += tx[y, x] * tx[y, x] + ty[y, x] * ty[y, x]
                    b += rx[y, x] * rx[y, x] + ry[y, x] * ry[y, x]
                    c += tx[y, x] * rx[y, x] + ty[y, x] * ry[y, x]
                tt[cy, cx] += a
                rr[cy, cx] += b
                tr[cy, cx] += c
    nt = 1.0 / (math.sqrt(tt.sum() / (h * w)) + 1e-6)
    nr = 1.0 / (math.sqrt(rr.sum() / (h * w)) + 1e-6)
    ratios = np.empty(cells * cells, np.float64)
    for cy in range(cells):
        for cx in range(cells):
            count = 2.0 * (ys[cy + 1] - ys[cy]) * (xs[cx + 1] - xs[cx])  # two fields a pixel
            energy = nt * nt * tt[cy, cx] + nr * nr * rr[cy, cx]
            diff = max(energy - 2.0 * nt * nr * tr[cy, cx], 0.0)
            ratios[cy * cells + cx] = (diff / count) / (energy / count + 0.5)
    ratios.sort()
    return 1.0 - (ratios[-2] if len(ratios) > 1 else ratios[-1])


@njit(cache=True, nogil=True, fastmath=True)
def _colour_residual(a, b):
    """RMS error (0-255) of the best 95% of pixels after one gain (0.6-1.6) and offset shared by the channels."""
    xa, xb = a.ravel(), b.ravel()
    n = len(xa)
    sa, sb, saa, sab = 0.0, 0.0, 0.0, 0.0
    for i in range(n):
        sa += xa[i]
        sb += xb[i]
        saa += xa[i] * xa[i]
        sab += xa[i] * xb[i]
    ma, mb = sa / n, sb / n
    va, cov = saa / n - ma * ma, sab / n - ma * mb
    gain = min(1.6, max(0.6, cov / va)) if va > 1e-6 else 1.0
    offset = mb - gain * ma
    squares = np.empty(n, np.float32)
    for i in range(n):
        r = xb[i] - gain * xa[i] - offset
        squares[i] = r * r
    k = max(1, int(0.95 * n))
    return math.sqrt(np.partition(squares, k - 1)[:k].astype(np.float64).sum() / k)


@njit(**_JIT)
def verify(store, tables, imeta, fmeta, pair_a, pair_b, start, stop, step, margin, second_floor, cells,
           mid_steps, mid_pad, fine_pad, min_structure, max_colour, out):
    """Score pairs ``start:stop``: both directions searched coarsely, the better one refined; the other too
    when the first does not verify (``min_structure``, ``max_colour``), its coarse correlation is within
    ``margin`` and the better one reaches ``second_floor``; the better-aligned refinement decides. ``out[p]``
    gets (structure, colour residual, alignment ncc); an image that did not prepare scores (-1, 255, -1)."""
    for p in range(start, stop):
        a, b = pair_a[p], pair_b[p]
        out[p, 0], out[p, 1], out[p, 2] = -1.0, 255.0, -1.0
        if imeta[a, OK] == 0 or imeta[b, OK] == 0:
            continue
        n1, s1, x1, y1 = _coarse(store, tables, imeta, fmeta, a, b)
        n2, s2, x2, y2 = _coarse(store, tables, imeta, fmeta, b, a)
        first_ab = n1 >= n2
        best = -4.0
        for turn in range(2):
            ab = first_ab if turn == 0 else not first_ab
            ncc, s, px, py = (n1, s1, x1, y1) if ab else (n2, s2, x2, y2)
            if ncc < -1.5:
                continue
            if turn == 1 and (abs(n1 - n2) > margin or max(n1, n2) < second_floor
                              or (out[p, 0] >= min_structure and out[p, 1] <= max_colour)):
                break
            t, r = (a, b) if ab else (b, a)
            aligned, rx, ry, colour = _refine(store, imeta, fmeta, t, r, s, px, py, step, mid_steps, mid_pad,
                                              fine_pad)
            if aligned > best:
                it = imeta[t]
                gx = _plane(store, it[FGX], it[H], it[W])[it[FY0]:it[FY0] + it[FTH], it[FX0]:it[FX0] + it[FTW]]
                gy = _plane(store, it[FGY], it[H], it[W])[it[FY0]:it[FY0] + it[FTH], it[FX0]:it[FX0] + it[FTW]]
                ct = store[it[COLOUR]:it[COLOUR] + it[MH] * it[MW] * 3].reshape((3, it[MH], it[MW]))
                ct = ct[:, it[MY0]:it[MY0] + it[MTH], it[MX0]:it[MX0] + it[MTW]].copy()
                best = aligned
                out[p, 0] = _cell_score(gx, gy, rx, ry, cells)
                out[p, 1] = _colour_residual(ct, colour)
                out[p, 2] = aligned
