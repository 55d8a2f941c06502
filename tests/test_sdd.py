"""The spectral distance against independent references: kernel MMD^2, Bochner, the amplitude-phase identity."""
import math

import pytest
import torch

from methods import per_class_loss
from sdd import (KERNELS, amplitude_phase, characteristic_function, class_median_distances, class_weights,
                 kernel_matrix, kernel_metric_p, sample_frequencies, spectral_distance)


def brute_mmd2(x, y, kernel, bandwidth=1.0):
    """V-statistic MMD^2 from the kernel matrix: mean k(x,x') + mean k(y,y') - 2 mean k(x,y)."""
    return (kernel_matrix(x, x, kernel, bandwidth).mean() + kernel_matrix(y, y, kernel, bandwidth).mean()
            - 2 * kernel_matrix(x, y, kernel, bandwidth).mean())


def clouds(n=20, m=15, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.4 + 0.5
    return x, y


def test_sdd_is_exactly_the_mmd_of_the_random_feature_kernel():
    # for any fixed frequencies, mean_m |phi_x - phi_y|^2 is the V-statistic MMD^2 of k(d) = mean_m cos(w_m . d)
    x, y = clouds()
    freqs = sample_frequencies(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = lambda a, b: torch.cos((a[:, None, :] - b[None, :, :]) @ freqs.T).mean(-1)
    reference = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    assert torch.allclose(spectral_distance(x, y, freqs), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bandwidth", [0.7, 2.0])
def test_sdd_estimates_the_exact_kernel_mmd(kernel, bandwidth):
    x, y = clouds()
    exact = brute_mmd2(x, y, kernel, bandwidth)
    freqs = sample_frequencies(1 << 17, 3, kernel, bandwidth, generator=torch.Generator().manual_seed(2),
                               dtype=torch.float64)
    # per-frequency terms, to bound the Monte Carlo error by its own standard error
    per_freq = (torch.cos(x @ freqs.T).mean(0) - torch.cos(y @ freqs.T).mean(0)) ** 2 \
        + (torch.sin(x @ freqs.T).mean(0) - torch.sin(y @ freqs.T).mean(0)) ** 2
    standard_error = per_freq.std() / math.sqrt(len(per_freq))
    estimate = spectral_distance(x, y, freqs)
    assert abs(estimate - exact) < 5 * standard_error
    assert standard_error < 0.05 * exact  # the test has power: the error bound is tight


@pytest.mark.parametrize("kernel", KERNELS)
def test_frequencies_follow_bochner(kernel):
    # E_w cos(w . delta) = kappa(delta) for the kernel's own formula
    sigma = 1.5
    freqs = sample_frequencies(1 << 18, 2, kernel, sigma, generator=torch.Generator().manual_seed(3),
                               dtype=torch.float64)
    deltas = torch.tensor([[0.3, -0.2], [1.0, 0.5], [2.0, -1.5]], dtype=torch.float64)
    empirical = torch.cos(deltas @ freqs.T).mean(1)
    expected = kernel_matrix(deltas, torch.zeros(1, 2, dtype=torch.float64), kernel, sigma)[:, 0]
    assert torch.allclose(empirical, expected, atol=6e-3)


RADIAL_CLOSED_FORMS = {  # kappa as a function of r = ||delta||_2 / sigma, written from the formulas
    "gaussian": lambda r: math.exp(-r ** 2 / 2),
    "laplacian": lambda r: math.exp(-r),
    "imq": lambda r: (1 + r ** 2) ** -0.5,
}


@pytest.mark.parametrize("kernel", sorted(RADIAL_CLOSED_FORMS))
def test_radial_kernels_match_their_closed_form_on_2048_d_unit_vectors(kernel):
    """On the features distill.py matches (2048-d, L2-normalised) a radial kernel depends on ||delta||_2 alone:
    the Monte-Carlo mean of cos(w . delta) over its spectral draws is the closed form at sigma = 1 and at the
    median distance's scale, within 5 standard errors."""
    g = torch.Generator().manual_seed(11)
    points = torch.nn.functional.normalize(torch.randn(4, 2048, generator=g, dtype=torch.float64).abs(), dim=1)
    deltas = torch.cat([points[:1] - points[1:], 0.2 * (points[:1] - points[1:])])  # ||delta|| ~ 0.9 and ~ 0.2
    for sigma in (1.0, 0.5):
        w = sample_frequencies(20_000, 2048, kernel, sigma, generator=g, dtype=torch.float64)
        terms = torch.cos(deltas @ w.T)  # (deltas, M)
        expected = torch.tensor([RADIAL_CLOSED_FORMS[kernel](r / sigma) for r in deltas.norm(dim=1).tolist()],
                                dtype=torch.float64)
        error = (terms.mean(1) - expected).abs()
        assert (error < 5 * terms.std(1) / math.sqrt(w.shape[0]) + 1e-3).all(), (kernel, sigma, error)
        assert torch.allclose(kernel_matrix(deltas, torch.zeros(1, 2048, dtype=torch.float64), kernel, sigma)[:, 0],
                              expected)


def test_the_l1_product_kernel_is_a_delta_on_2048_d_unit_vectors():
    """Why the l1 Laplacian was renamed: at sigma = 1 two 2048-d unit vectors are e^-(tens) apart under it,
    while the radial Laplacian keeps them at e^-||delta||_2."""
    g = torch.Generator().manual_seed(12)
    x, y = torch.nn.functional.normalize(torch.randn(2, 2048, generator=g, dtype=torch.float64).abs(), dim=1)
    assert kernel_matrix(x[None], y[None], "laplacian-l1")[0, 0] < 1e-10
    assert kernel_matrix(x[None], y[None], "laplacian")[0, 0] > 0.3


def test_frequency_moments():
    g = torch.Generator().manual_seed(4)
    sigma = 0.5
    w = sample_frequencies(400_000, 1, "gaussian", sigma, generator=g, dtype=torch.float64)
    assert abs(w.mean()) < 0.02 and abs(w.var() - 1 / sigma ** 2) < 0.05  # N(0, sigma^-2)
    w = sample_frequencies(400_000, 1, "laplacian-l1", sigma, generator=g, dtype=torch.float64)
    # Cauchy(0, 1/sigma): median 0, quartiles +-1/sigma
    assert abs(w.median()) < 0.02 and abs(w.abs().median() - 1 / sigma) < 0.02
    w = sample_frequencies(400_000, 1, "cauchy-product", sigma, generator=g, dtype=torch.float64)
    assert abs(w.mean()) < 0.02 and abs(w.abs().mean() - 1 / sigma) < 0.02  # Laplace(0, 1/sigma)
    assert abs(w.var() - 2 / sigma ** 2) < 0.2


def test_frequencies_are_reproducible_and_checked():
    a = sample_frequencies(8, 5, "cauchy-product", generator=torch.Generator().manual_seed(7))
    b = sample_frequencies(8, 5, "cauchy-product", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (8, 5) and a.dtype == torch.float32
    with pytest.raises(ValueError, match="kernel"):
        sample_frequencies(8, 5, "polynomial")
    with pytest.raises(ValueError, match="bandwidth"):
        sample_frequencies(8, 5, bandwidth=0.0)


def test_distance_is_zero_for_identical_and_permuted_sets():
    x, _ = clouds()
    freqs = sample_frequencies(256, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert spectral_distance(x, x.clone(), freqs) == 0
    assert spectral_distance(x, x[torch.randperm(len(x))], freqs).abs() < 1e-14
    # and strictly positive for different sets
    assert spectral_distance(x, x + 0.3, freqs) > 1e-3


def test_amplitude_plus_phase_is_the_squared_cf_difference():
    g = torch.Generator().manual_seed(6)
    re_x, im_x, re_y, im_y = (torch.rand(1000, generator=g, dtype=torch.float64) * 1.4 - 0.7 for _ in range(4))
    amplitude, phase = amplitude_phase(re_x, im_x, re_y, im_y)
    assert torch.allclose(amplitude + phase, (re_x - re_y) ** 2 + (im_x - im_y) ** 2, atol=1e-9)
    # the phase term is 2 |phi_x||phi_y| (1 - cos(theta_x - theta_y)), computed by angles
    theta = torch.atan2(im_x, re_x) - torch.atan2(im_y, re_y)
    by_angle = 2 * torch.hypot(re_x, im_x) * torch.hypot(re_y, im_y) * (1 - torch.cos(theta))
    assert torch.allclose(phase, by_angle, atol=1e-9)
    assert (amplitude >= 0).all() and (phase >= -1e-12).all()


def test_weights_select_amplitude_and_phase():
    x, y = clouds()
    freqs = sample_frequencies(128, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    amplitude, phase = amplitude_phase(*characteristic_function(x, freqs), *characteristic_function(y, freqs))
    assert torch.allclose(spectral_distance(x, y, freqs, 1.0, 0.0), amplitude.mean())
    assert torch.allclose(spectral_distance(x, y, freqs, 0.0, 1.0), phase.mean())
    assert torch.allclose(spectral_distance(x, y, freqs, 0.6, 1.4), 0.6 * amplitude.mean() + 1.4 * phase.mean())


def test_class_weights():
    assert torch.equal(class_weights([500, 500, 500]), torch.full((3,), 0.5))
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    alpha = class_weights(counts, a_head=0.8, a_tail=0.2)
    assert alpha[0] == pytest.approx(0.8) and alpha[-1] == pytest.approx(0.2)
    assert ((alpha > 0) & (alpha < 1)).all()
    assert (alpha[:-1] >= alpha[1:]).all()  # non-decreasing in n_c (counts decrease here)
    # log-linear: the middle count in log space gets the middle weight
    assert class_weights([100, 10, 1], 0.8, 0.2)[1] == pytest.approx(0.5)
    shuffled = class_weights([50, 5000, 645])
    assert shuffled[1] > shuffled[2] > shuffled[0]
    for bad in [(0.3, 0.7), (1.0, 0.5), (0.5, 0.0)]:
        with pytest.raises(ValueError, match="a_tail <= a_head"):
            class_weights(counts, *bad)


def median_distance(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The median heuristic of one set, pair by pair: the median of ||x_i - x_j||_p over i < j."""
    distances = [torch.dist(x[i], x[j], p=p) for i in range(len(x)) for j in range(i + 1, len(x))]
    return torch.stack(distances).median()


def test_class_median_distances():
    real, real_labels, _, _ = ragged_classes()
    single = torch.cat([real, torch.zeros(1, 6, dtype=torch.float64)])
    labels = torch.cat([real_labels, torch.tensor([3])])  # class 3 has one row: no pairs
    medians = class_median_distances(single, labels, 4)
    for c in range(3):
        assert medians[c] == median_distance(real[real_labels == c])
    assert medians[3] == 1  # the bandwidth as given: not the other classes' (which depend on the class chunks)
    # the l1 Laplacian's bandwidth scales the L1 distance: its median rule measures in L1; the radial ones in L2
    assert kernel_metric_p("laplacian-l1") == 1
    assert {kernel_metric_p(k) for k in ("gaussian", "laplacian", "imq", "cauchy-product")} == {2}
    l1 = class_median_distances(single, labels, 4, p=1)
    for c in range(3):
        x = real[real_labels == c]
        i, j = torch.triu_indices(len(x), len(x), 1)
        assert l1[c] == (x[i] - x[j]).abs().sum(1).median() == median_distance(x, p=1)


# ------------------------------------------------------------------------------------------
# per-class, vectorised losses against a per-class loop of the single-set references

def ragged_classes(seed=0):
    """Real rows per class 7, 3, 5 (class 1 smaller than the others), synthetic 4 per class."""
    g = torch.Generator().manual_seed(seed)
    real_labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)[torch.randperm(15, generator=g)]
    syn_labels = torch.arange(3).repeat_interleave(4)
    real = torch.randn(15, 6, generator=g, dtype=torch.float64) + real_labels[:, None]
    syn = torch.randn(12, 6, generator=g, dtype=torch.float64) * 0.5
    return real, real_labels, syn, syn_labels


def ncfm_reference(real, syn, freqs, a):
    """The single-set form of sdd's NCFM loss, mean_w sqrt(a * amplitude + (1 - a) * phase): what the vectorised
    per-class loss must equal class by class (NCFM's own code, transcribed, is the reference in test_reference.py)."""
    amplitude, phase = amplitude_phase(*characteristic_function(syn, freqs), *characteristic_function(real, freqs))
    return torch.sqrt((a * amplitude + (1 - a) * phase).clamp_min(1e-12)).mean()


@pytest.mark.parametrize("method", ["dm", "mmd", "sdm", "csdm", "ncfm"])
def test_per_class_loss_equals_a_loop_over_classes(method):
    real, real_labels, syn, syn_labels = ragged_classes()
    freqs = sample_frequencies(64, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    alpha = torch.tensor([0.7, 0.45, 0.3], dtype=torch.float64) if method in ("csdm", "ncfm") else None
    a = alpha if alpha is not None else torch.full((3,), 0.5, dtype=torch.float64)
    sigma = torch.tensor([1.3, 0.8, 2.0], dtype=torch.float64)  # one bandwidth per class
    got = per_class_loss(method, real, real_labels, syn, syn_labels, 3, freqs=freqs, alpha=alpha, bandwidth=sigma)
    for c in range(3):
        r, s = real[real_labels == c], syn[syn_labels == c]
        if method == "dm":
            expected = ((r.mean(0) - s.mean(0)) ** 2).sum()
        elif method == "mmd":
            expected = brute_mmd2(r, s, "gaussian", float(sigma[c]))
        elif method == "ncfm":
            expected = ncfm_reference(r, s, freqs / sigma[c], a[c])
        else:
            expected = spectral_distance(s, r, freqs / sigma[c], 2 * a[c], 2 * (1 - a[c]))
        assert torch.allclose(got[c], expected, rtol=1e-9, atol=1e-12), (method, c)
    if method != "dm":  # a single number is the same bandwidth for every class
        same = per_class_loss(method, real, real_labels, syn, syn_labels, 3, freqs=freqs, alpha=alpha, bandwidth=1.3)
        each = per_class_loss(method, real, real_labels, syn, syn_labels, 3, freqs=freqs, alpha=alpha,
                              bandwidth=torch.full((3,), 1.3, dtype=torch.float64))
        assert torch.allclose(same, each, rtol=1e-12)


@pytest.mark.parametrize("method", ["dm", "mmd", "sdm", "csdm", "ncfm"])
def test_per_class_losses_are_symmetric_and_zero_on_equal_sets(method):
    """Every loss is a distance between the two sets of a class: L(X, Y) = L(Y, X) (dm: ||mean_X - mean_Y||^2;
    mmd: k(X,X) + k(Y,Y) - 2 k(X,Y); the spectral ones: amplitude (|phi_X| - |phi_Y|)^2 and phase
    2 |phi_X||phi_Y| (1 - cos(theta_X - theta_Y)) are symmetric, with any per-class weight alpha_c and ncfm's
    square root), on ragged classes and per-class bandwidths; and L(X, X') = 0 for X' a reordering of X."""
    real, real_labels, syn, syn_labels = ragged_classes()
    freqs = sample_frequencies(64, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    alpha = torch.tensor([0.7, 0.45, 0.3], dtype=torch.float64) if method in ("csdm", "ncfm") else None
    sigma = torch.tensor([1.3, 0.8, 2.0], dtype=torch.float64)

    def loss(x, x_labels, y, y_labels):
        return per_class_loss(method, x, x_labels, y, y_labels, 3, freqs=freqs, alpha=alpha, bandwidth=sigma)

    forward, backward = loss(real, real_labels, syn, syn_labels), loss(syn, syn_labels, real, real_labels)
    assert (forward > 1e-3).all()  # different sets: the identity below is not 0 = 0
    assert torch.allclose(forward, backward, rtol=1e-12, atol=0)
    same = loss(real, real_labels, real.flip(0), real_labels.flip(0))
    floor = 1e-6 if method == "ncfm" else 0  # ncfm's sqrt(max(., 1e-12)) is 1e-6 at 0
    assert torch.allclose(same, torch.full((3,), floor, dtype=torch.float64), atol=1e-12)


def test_gradient_reaches_only_the_synthetic_features():
    real, real_labels, syn, syn_labels = ragged_classes()
    real.requires_grad_(True)
    syn.requires_grad_(True)
    freqs = sample_frequencies(64, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    per_class_loss("csdm", real, real_labels, syn, syn_labels, 3, freqs=freqs,
                   alpha=torch.tensor([0.7, 0.5, 0.3])).sum().backward()
    assert real.grad is None
    assert torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0


def test_bfloat16_projection_agrees_with_float32():
    # distill.py's bf16 path computes w . x in bfloat16 (float32 accumulation): on unit-norm features
    # of d = 2048 the loss and its gradient match the float32 path to well under the frequency noise
    g = torch.Generator().manual_seed(3)
    real = torch.nn.functional.normalize(torch.randn(300, 2048, generator=g), dim=1)
    labels = torch.arange(3).repeat_interleave(100)
    syn_labels = torch.arange(3).repeat_interleave(10)
    freqs = sample_frequencies(512, 2048, generator=g)
    results = []
    for dtype in (None, torch.bfloat16):
        syn = (real[::10] + 0.3 * torch.randn(30, 2048, generator=torch.Generator().manual_seed(4)) / 45)
        syn = torch.nn.functional.normalize(syn, dim=1).requires_grad_(True)
        loss = per_class_loss("csdm", real, labels, syn, syn_labels, 3, freqs=freqs,
                              alpha=torch.tensor([0.7, 0.5, 0.3]), projection_dtype=dtype)
        loss.sum().backward()
        results.append((loss.detach(), syn.grad.flatten()))
    (loss32, grad32), (loss16, grad16) = results
    assert torch.allclose(loss16, loss32, rtol=0.02)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99
