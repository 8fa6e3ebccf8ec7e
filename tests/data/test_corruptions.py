"""ImageNet-C corruptions against their published formulas (independent numpy float64), and the -c datasets."""

import colorsys
import io

import numpy as np
import pytest
from PIL import Image

import shiftbn as sb
from shiftbn.data import corruptions as C
from shiftbn.data.builtin import DIGITS_C_LABS, FASHION_C_LABS, _digits_images, digits_c, fashion_mnist_c
from shiftbn.data.idx import write_idx


def _flat(value=0.5, shape=(4, 1, 32, 32)):
    return np.full(shape, value)


def _rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape)


# --- noise: moments of the published noise models on a flat grey image ---------------------------

def test_gaussian_noise_adds_zero_mean_noise_of_the_given_std():
    x = _flat()
    out = C.gaussian_noise(x, 0.1, np.random.default_rng(0))
    d = (out - x).ravel()
    assert abs(d.mean()) < 4 * 0.1 / np.sqrt(d.size)
    assert d.std() == pytest.approx(0.1, rel=0.05)
    assert out.min() >= 0 and out.max() <= 1


def test_shot_noise_is_poisson_counts_over_the_rate():
    rate = 50
    out = C.shot_noise(_flat(), rate, np.random.default_rng(1))
    counts = out * rate
    assert np.allclose(counts, np.round(counts))
    assert counts.mean() == pytest.approx(0.5 * rate, rel=0.02)
    assert counts.var() == pytest.approx(0.5 * rate, rel=0.1)  # Poisson: variance = mean


def test_impulse_noise_sets_a_fraction_of_pixels_to_zero_or_one():
    x = _flat()
    out = C.impulse_noise(x, 0.07, np.random.default_rng(2))
    assert set(np.unique(out)) <= {0.0, 0.5, 1.0}
    hit = out != 0.5
    n = hit.size
    assert abs(hit.mean() - 0.07) < 4 * np.sqrt(0.07 * 0.93 / n)
    assert abs((out[hit] == 1.0).mean() - 0.5) < 4 * np.sqrt(0.25 / hit.sum())


def test_speckle_noise_scales_with_intensity():
    out = C.speckle_noise(_flat(0.5), 0.2, np.random.default_rng(3))
    assert (out - 0.5).std() == pytest.approx(0.5 * 0.2, rel=0.05)
    assert np.array_equal(C.speckle_noise(_flat(0.0), 0.2, np.random.default_rng(3)), _flat(0.0))


# --- blurs: explicit convolution sums -------------------------------------------------------------

def _correlate_reference(img, kernel, pad_mode):
    """Sum over the kernel window of a padded (H, W) image, loops only."""
    r = kernel.shape[0] // 2
    p = np.pad(img, r, mode=pad_mode)
    out = np.zeros_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            out[i, j] = (p[i:i + 2 * r + 1, j:j + 2 * r + 1] * kernel).sum()
    return out


def test_gaussian_blur_matches_a_truncated_gaussian_kernel_with_repeated_edges():
    sigma = 0.9
    x = _rand((2, 9, 9))
    r = int(4 * sigma + 0.5)
    t = np.arange(-r, r + 1)
    g = np.exp(-t**2 / (2 * sigma**2))
    g /= g.sum()
    expected = np.stack([_correlate_reference(img, np.outer(g, g), "edge") for img in x])
    np.testing.assert_allclose(C.gaussian_blur(x, sigma), np.clip(expected, 0, 1), atol=1e-12)


def test_defocus_kernel_is_an_antialiased_normalized_disk():
    radius, alias = 1.3, 0.5
    half = 3
    disk = np.array([[float(u * u + v * v <= radius**2) for v in range(-half, half + 1)]
                     for u in range(-half, half + 1)])
    disk /= disk.sum()
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias**2))
    taps /= taps.sum()
    smooth = _correlate_reference(disk, np.outer(taps, taps), "reflect")
    k = C.disk_kernel(radius, alias)
    np.testing.assert_allclose(k, smooth, atol=1e-12)
    assert k.sum() == pytest.approx(1.0)


def test_defocus_blur_filters_with_the_disk_and_mirrored_edges():
    x = _rand((2, 1, 10, 10), seed=4)
    k = C.disk_kernel(1.3, 0.5)
    expected = np.stack([[_correlate_reference(img[0], k, "reflect")] for img in x])
    np.testing.assert_allclose(C.defocus_blur(x, 1.3, 0.5), np.clip(expected, 0, 1), atol=1e-12)


# --- intensity, compression, resampling -----------------------------------------------------------

def test_contrast_shrinks_each_image_towards_its_own_mean():
    x = _rand((3, 2, 5, 5), seed=5)
    expected = np.empty_like(x)
    for n in range(3):
        for c in range(2):
            m = x[n, c].sum() / 25
            expected[n, c] = np.clip((x[n, c] - m) * 0.3 + m, 0, 1)
    np.testing.assert_allclose(C.contrast(x, 0.3), expected, atol=1e-12)


def test_brightness_adds_to_the_hsv_value():
    grey = _rand((2, 1, 4, 4), seed=6)
    np.testing.assert_allclose(C.brightness(grey, 0.3), np.clip(grey + 0.3, 0, 1))
    rgb = _rand((2, 3, 4, 4), seed=7)
    rgb[0, :, 0, 0] = 0.0  # a black pixel
    out = C.brightness(rgb, 0.2)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*rgb[n, :, i, j])
                np.testing.assert_allclose(out[n, :, i, j], colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0)), atol=1e-12)


def test_jpeg_compression_is_a_pillow_round_trip_at_the_quality():
    x = _rand((3, 1, 16, 16), seed=8)
    for q in (40, 80):
        expected = []
        for img in x[:, 0]:
            buf = io.BytesIO()
            Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=q)
            expected.append(np.array(Image.open(io.BytesIO(buf.getvalue()))) / 255.0)
        np.testing.assert_array_equal(C.jpeg_compression(x, q)[:, 0], np.stack(expected))
    assert np.abs(C.jpeg_compression(x, 95) - x).mean() < np.abs(C.jpeg_compression(x, 20) - x).mean()
    with pytest.raises(ValueError, match="1 or 3 channels"):
        C.jpeg_compression(_rand((1, 2, 8, 8)), 50)


def test_pixelate_box_averages_blocks_and_repeats_them():
    x = _rand((2, 1, 8, 8), seed=9)
    blocks = x.reshape(2, 1, 4, 2, 4, 2).mean(axis=(3, 5))
    expected = blocks.repeat(2, axis=2).repeat(2, axis=3)
    np.testing.assert_allclose(C.pixelate(x, 0.5), expected, atol=1e-6)  # Pillow resamples in float32
    odd = C.pixelate(_rand((1, 28, 28)), 0.65)
    assert odd.shape == (1, 28, 28)


# --- Corruption: severities, scaling, seeding -----------------------------------------------------

def test_params_follow_the_published_table():
    assert C.Corruption("gaussian_noise", 5).params == (0.10,)
    assert C.Corruption("jpeg_compression", 1).params == (80,)
    assert C.Corruption("defocus_blur", 5).params == (1.5, 0.1)
    assert C.Corruption("clean", 0).params == ()
    assert C.Corruption("clean", 0).label == "clean" and C.Corruption("contrast", 3).label == "contrast_3"


@pytest.mark.parametrize("bad", [("fog", 3), ("contrast", 0), ("contrast", 6), ("clean", 2)])
def test_bad_corruptions_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="corruption|severity"):
        C.Corruption(*bad)


@pytest.mark.parametrize("name", sorted(C.SEVERITIES))
def test_every_corruption_is_deterministic_and_keeps_shape(name):
    x = _rand((3, 1, 12, 12), seed=10)
    a = C.Corruption(name, 5, seed=1).apply(x)
    assert a.shape == x.shape and str(a.dtype) == "torch.float32"
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert np.array_equal(a.numpy(), C.Corruption(name, 5, seed=1).apply(x).numpy())
    assert np.array_equal(C.Corruption(name, 5).apply(x[:, 0]).numpy(), C.Corruption(name, 5).apply(x)[:, 0].numpy())
    if name.endswith("noise"):
        assert not np.array_equal(a.numpy(), C.Corruption(name, 5, seed=2).apply(x).numpy())
    assert not np.allclose(a.numpy(), x)


# --- datasets ---------------------------------------------------------------------------------------

def test_digits_c_labs_are_the_corrupted_digits():
    from sklearn.datasets import load_digits

    ds = sb.load("digits-c")
    assert ds.source_names == tuple(sorted(DIGITS_C_LABS)) and len(ds) == 1797
    assert np.array_equal(ds.labels, load_digits().target)
    base, _ = _digits_images(16)  # the upsampled digits before any lab's shift
    for name, corruption in DIGITS_C_LABS.items():
        idx = ds.indices_of(name)
        assert corruption.label == name and len(idx) > 250
        np.testing.assert_array_equal(ds.base.x[idx].numpy(), corruption.apply(base[idx]).numpy())


def test_c_datasets_are_cached_but_every_load_is_a_fresh_copy():
    a = digits_c()
    a.base.x.fill_(7.0)
    b = digits_c()
    assert float(b.base.x.max()) <= 1.0
    assert np.array_equal(b.source_ids, digits_c().source_ids)
    assert not np.array_equal(digits_c(seed=1).source_ids, b.source_ids)


def test_fashion_mnist_c_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (120, 28, 28)).astype(np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(120) % 10).astype(np.uint8))
    ds = fashion_mnist_c(root=tmp_path, n=90)
    assert len(ds) == 90 and ds[0][0].shape == (1, 28, 28)
    assert ds.source_names == tuple(sorted(FASHION_C_LABS)) and ds.class_names[0] == "T-shirt/top"
    assert {"fashion-mnist-c", "digits-c"} <= set(sb.data.DATASETS)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist_c(root=tmp_path / "nowhere")
