"""The warp's output map (issue 16): the live stack's normalisation and saturation level
applied by the warp as it writes its output must give the numbers of the separate steps
(warp, clamp, ``apply_normalization``, ``StackSaturation.apply``) bit for bit, on every
warp path (identity, shift, 2-D kernel, two-pass kernel), mono and colour."""

from __future__ import annotations

import numpy as np
import pytest

from livestack.pipeline.frame import apply_transform
from livestack.pipeline.normalize import apply_normalization, output_map
from livestack.pipeline.saturation import SaturationConfig, StackSaturation, frame_saturation
from livestack.pipeline.types import FrameInfo, Normalization, OutputMap, Transform
from livestack.pipeline.warp import warp

CONFIG = SaturationConfig()
#: No saturation facts: nothing clamped, clipped or set to a level.
OFF = SaturationConfig(enabled=False)

#: identity, a shift (separable path), 0.1 deg (2-D kernel), 0.7 and 3 deg (two-pass).
TRANSFORMS = {
    "identity": Transform.identity(),
    "shift": Transform.from_params(3.37, -2.61),
    "rot0.1": Transform.from_params(1.3, -0.8, 0.1),
    "rot0.7": Transform.from_params(3.37, -2.61, 0.7),
    "rot3": Transform.from_params(-2.2, 1.45, -3.0),
}


def _frame(seed: int, planes: int) -> np.ndarray:
    """Sky 300 +- 10 ADU, a steep star, a plateau clipped at 4095 (steep walls, saturated
    samples), an unsaturated plateau above the stack's level (clamped, and clipped by the
    level: a clamp that raises a capped sample must cap it again) and a NaN pixel (the
    footprint loses its neighbourhood)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:112]
    star = 3500.0 * np.exp(-0.5 * ((xx - 70.3) ** 2 + (yy - 30.6) ** 2) / 0.8 ** 2)
    raw = rng.normal(300.0, 10.0, (planes, 96, 112)) + star * np.array([1.0, 0.8, 0.6])[
        :planes, None, None]
    raw[:, 50:54, 40:45] = 4095.0
    raw[:, 20:24, 80:83] = 4000.0  # below the frame's level, above the stack's
    raw[:, 80, 20] = np.nan
    out = raw.astype(np.float32)
    return out[0] if planes == 1 else out


def _info() -> FrameInfo:
    return FrameInfo("f.fits", "light", (96, 112), saturation_adu=4095.0,
                     saturation_source="SATURATE")


def _norm(planes: int) -> Normalization:
    if planes == 1:
        return Normalization(290.0, 1.07, 310.5)
    return Normalization(np.array([290.0, 281.5, 301.25]), np.array([1.07, 0.93, 1.21]),
                         np.array([310.5, 300.0, 295.75]))


def _separate(raw: np.ndarray, t: Transform, kernel: str, stack: StackSaturation,
              config: SaturationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Today's steps one after the other."""
    sat = frame_saturation(raw, raw, _info(), config)
    norm = _norm(1 if raw.ndim == 2 else 3)
    warped, saturated = apply_transform(raw, t, raw.shape[-2:], kernel, sat, config)
    out = apply_normalization(warped.image, warped.footprint, norm, out=warped.image)
    stack.apply(out, warped.footprint, saturated, sat, norm.location, norm.scale,
                norm.reference_location)
    return out, warped.footprint, saturated


def _fused(raw: np.ndarray, t: Transform, kernel: str, stack: StackSaturation,
           config: SaturationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What the live stack runs: one warp with the output map."""
    sat = frame_saturation(raw, raw, _info(), config)
    planes = 1 if raw.ndim == 2 else 3
    norm = _norm(planes)
    after = stack.level_after(sat, planes, norm.location, norm.scale, norm.reference_location)
    warped, saturated = apply_transform(raw, t, raw.shape[-2:], kernel, sat, config,
                                        post=output_map(norm, planes, after))
    if after is not None:
        stack.level_adu = after
    return warped.image, warped.footprint, saturated


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("planes", [1, 3])
@pytest.mark.parametrize("kernel", ["lanczos3", "mitchell", "bicubic", "bilinear"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_output_map_is_bit_identical_to_the_separate_steps(name: str, kernel: str,
                                                           planes: int) -> None:
    raw = _frame(7, planes)
    t = TRANSFORMS[name]
    # A stack whose level sits just below this frame's (4 %, not enough to raise it: it
    # clips the 4000 ADU plateau, clamped and unclamped samples), and one without a level.
    norm = _norm(planes)
    low = ((4095.0 - np.asarray(norm.location)) * np.asarray(norm.scale)
           + np.asarray(norm.reference_location)) / 1.04
    for start in (np.broadcast_to(low, (planes,)).astype(np.float64), None):
        for config in (CONFIG, OFF):
            a = _separate(raw, t, kernel, StackSaturation(None if start is None
                                                          else start.copy()), config)
            b = _fused(raw, t, kernel, StackSaturation(None if start is None
                                                       else start.copy()), config)
            assert _same(a[0], b[0]), (name, kernel, planes, start, config)
            assert np.array_equal(a[1], b[1])
            assert (a[2] is None) == (b[2] is None)
            assert (a[2] is not None) == config.enabled  # the mask path is taken
            if a[2] is not None and b[2] is not None:
                assert np.array_equal(a[2], b[2])
    # The check has teeth: the ceiling, the clamp and the map all change samples here.
    plain = warp(raw, t, raw.shape[-2:], kernel).image
    assert not _same(plain, a[0])


def test_an_order_reversing_map_takes_the_separate_steps() -> None:
    # A negative gain would turn the clamp's bounds around: apply_transform then runs the
    # steps in their plain order, with the same numbers as the separate calls.
    raw = _frame(3, 1)
    t = TRANSFORMS["rot0.7"]
    sat = frame_saturation(raw, raw, _info(), CONFIG)
    norm = Normalization(290.0, -0.5, 310.0)
    post = output_map(norm, 1, np.array([2000.0]))
    assert not post.monotone
    fused, _ = apply_transform(raw, t, raw.shape, "lanczos3", sat, CONFIG, post=post)
    warped, saturated = apply_transform(raw, t, raw.shape, "lanczos3", sat, CONFIG)
    out = apply_normalization(warped.image, warped.footprint, norm, out=warped.image)
    StackSaturation(np.array([2000.0])).apply(out, warped.footprint, saturated, sat,
                                              norm.location, norm.scale,
                                              norm.reference_location)
    assert _same(fused.image, out)


def test_level_after_does_not_change_the_stack() -> None:
    stack = StackSaturation(np.array([1000.0]))
    raw = _frame(1, 1)
    sat = frame_saturation(raw, raw, _info(), CONFIG)
    assert sat is not None
    after = stack.level_after(sat, 1, 0.0, 1.0, 0.0)
    assert after is not None and after[0] > 1000.0  # a 4x higher level wins ...
    assert stack.level_adu is not None and stack.level_adu[0] == 1000.0  # ... once committed
    assert stack.level_after(None, 1, 0.0, 1.0, 0.0) is None


def test_output_map_arrays_broadcast_and_check() -> None:
    post = OutputMap(np.float32([2.0]), np.float32([1.0]), np.float32([np.inf]))
    gains, offsets, ceilings = post.arrays(3)
    assert gains.shape == (3,) and gains.dtype == np.float32 and gains.flags.c_contiguous
    assert offsets.tolist() == [1.0] * 3 and np.isinf(ceilings).all()
    with pytest.raises(ValueError):
        OutputMap(np.float32([1.0, 2.0]), np.float32([0.0]), np.float32([1.0])).arrays(3)
