"""The Spectral Distribution Distance (SDD), its amplitude-phase split, and the per-class matching losses.

$ python sdd.py      # compares SDD with the exact kernel MMD^2 on a small point cloud, for each kernel

For a shift-invariant kernel k(x, y) = kappa(x - y) with spectral measure Lambda
(Bochner: kappa(delta) = E_{w ~ Lambda} cos(w . delta)), and empirical
characteristic functions phi_X(w) = (1/n) sum_j exp(i w . x_j):

    MMD_k^2(X, Y) = E_{w ~ Lambda} |phi_X(w) - phi_Y(w)|^2          (V-statistic, exact)
    |phi_X - phi_Y|^2 = (|phi_X| - |phi_Y|)^2                         amplitude (spread, "diversity")
                      + 2 |phi_X| |phi_Y| (1 - cos(theta_X - theta_Y)) phase (location, "realism")

SDD averages this over M frequencies w_1..w_M ~ Lambda: one (n + m) x d by d x M
matrix product and (n + m) M cos/sin, i.e. O((n + m) d M) time, linear in the
number of samples (the exact kernel MMD^2 costs O((n + m)^2 d)).

The per-class losses, every class in one call (methods.py registers each under a method name), for
class c with real features R_c and synthetic features S_c:
    dm    ||mean R_c - mean S_c||^2                                   (linear-kernel MMD^2)
    mmd   exact Gaussian-kernel MMD_k^2(R_c, S_c), O(n^2)
    sdm   mean_w [ 2 a_c amplitude + 2 (1 - a_c) phase ], a_c = 1/2    (= SDD = MMD^2 estimate)
    csdm  the same with class-aware a_c from `class_weights`
    ncfm  mean_w sqrt(a_c amplitude + (1 - a_c) phase), a_c = 1/2     (NCFM's released loss)
"""
from __future__ import annotations

import math

import torch

# radial kernels first; the two product kernels (the project's "laplacian" and "cauchy" until 2026-12-07) under
# names that say what they are: on d-dimensional features their l1 distance grows like d, so at 2048-d they are
# close to a delta at the default bandwidth
KERNELS = ("gaussian", "laplacian", "imq", "laplacian-l1", "cauchy-product")
# Class-aware end points a_head, a_tail (docs/method.md, "Class-aware weighting"). Chosen on the validation
# split; see README "How the defaults were chosen".
ALPHA_HEAD, ALPHA_TAIL = 0.7, 0.3
_TINY = 1e-30  # keeps sqrt differentiable where an amplitude is exactly zero


def sample_frequencies(num_freqs: int, dim: int, kernel: str = "gaussian", bandwidth: float = 1.0,
                       generator: torch.Generator | None = None, device=None,
                       dtype: torch.dtype = torch.float32, beta: float = 0.5) -> torch.Tensor:
    """Draw w_1..w_M ~ Lambda, the spectral measure of a kernel with bandwidth sigma (Bochner:
    kappa(delta) = E_w[cos(w . delta)]). (M, d).

    gaussian       kappa = exp(-||delta||^2 / (2 sigma^2))      w ~ N(0, sigma^-2 I)
    laplacian      kappa = exp(-||delta||_2 / sigma)            w = z / (sigma |g|), z ~ N(0, I), g ~ N(0, 1)
                                                                (the multivariate Cauchy)
    imq            kappa = (1 + ||delta||^2 / sigma^2)^-beta     tau ~ Gamma(beta, 1), w ~ N(0, 2 tau sigma^-2 I)
    laplacian-l1   kappa = exp(-||delta||_1 / sigma)            w_j ~ Cauchy(0, 1/sigma), independent
    cauchy-product kappa = prod_j 1 / (1 + delta_j^2/sigma^2)   w_j ~ Laplace(0, 1/sigma), independent

    The radial draws are Gaussian scale mixtures: E_w[cos(w . delta)] = E_s[exp(-s^2 ||delta||^2 / 2)] with
    s = 1 / (sigma |g|) (whose mixture is exp(-||delta|| / sigma)) or s^2 = 2 tau / sigma^2 (the Laplace
    transform of Gamma(beta, 1) at ||delta||^2 / sigma^2, (1 + ||delta||^2 / sigma^2)^-beta).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    if kernel == "imq" and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shape = (num_freqs, dim)
    if kernel in ("gaussian", "laplacian", "imq"):
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if kernel == "gaussian":
            return z / bandwidth
        if kernel == "laplacian":
            g = torch.randn((num_freqs, 1), generator=generator, device=device, dtype=dtype)
            return z / (bandwidth * g.abs().clamp_min(1e-12))
        tau = torch._standard_gamma(torch.full((num_freqs, 1), beta, device=device, dtype=dtype), generator)
        return z * torch.sqrt(2 * tau) / bandwidth
    # inverse-CDF draws from u in (0, 1), kept off the end points where they diverge
    eps = 1e-7
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype) * (1 - 2 * eps) + eps
    if kernel == "laplacian-l1":
        return torch.tan(math.pi * (u - 0.5)) / bandwidth
    centred = u - 0.5
    return -torch.sign(centred) * torch.log1p(-2 * centred.abs()) / bandwidth


def kernel_matrix(x: torch.Tensor, y: torch.Tensor, kernel: str = "gaussian", bandwidth: float = 1.0,
                  beta: float = 0.5) -> torch.Tensor:
    """k(x_i, y_j) for every pair, (n, m), straight from the formulas above (a reference, O(n m d))."""
    delta = x[:, None, :] - y[None, :, :]
    if kernel == "gaussian":
        return torch.exp(-(delta ** 2).sum(-1) / (2 * bandwidth ** 2))
    if kernel == "laplacian":
        return torch.exp(-delta.norm(dim=-1) / bandwidth)
    if kernel == "imq":
        return (1 + (delta ** 2).sum(-1) / bandwidth ** 2) ** -beta
    if kernel == "laplacian-l1":
        return torch.exp(-delta.abs().sum(-1) / bandwidth)
    if kernel == "cauchy-product":
        return torch.prod(1 / (1 + (delta / bandwidth) ** 2), dim=-1)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def characteristic_function(x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """phi_X(w_m) = (1/n) sum_j exp(i w_m . x_j) as (real, imaginary), each (M,)."""
    projection = x @ freqs.T  # (n, M)
    return torch.cos(projection).mean(0), torch.sin(projection).mean(0)


def amplitude_phase(re_x, im_x, re_y, im_y) -> tuple[torch.Tensor, torch.Tensor]:
    """amplitude = (|phi_x| - |phi_y|)^2, phase = 2 |phi_x||phi_y| (1 - cos(theta_x - theta_y)).

    The phase term is computed as 2 (|phi_x||phi_y| - Re(phi_x conj(phi_y))), which is the same
    number without an angle, so it stays smooth where an amplitude vanishes."""
    power_x, power_y = re_x * re_x + im_x * im_x, re_y * re_y + im_y * im_y
    amplitude = (torch.sqrt(power_x.clamp_min(_TINY)) - torch.sqrt(power_y.clamp_min(_TINY))) ** 2
    # sqrt(|phi_x|^2 |phi_y|^2) rather than |phi_x| |phi_y|: for equal sets the phase is then exactly 0
    phase = 2 * (torch.sqrt((power_x * power_y).clamp_min(_TINY)) - (re_x * re_y + im_x * im_y))
    return amplitude, phase


def spectral_distance(x: torch.Tensor, y: torch.Tensor, freqs: torch.Tensor,
                      amp_weight: float = 1.0, phase_weight: float = 1.0) -> torch.Tensor:
    """mean_m [amp_weight * amplitude(w_m) + phase_weight * phase(w_m)] for x (n, d), y (m, d).

    With weights (1, 1) this is mean_m |phi_x(w_m) - phi_y(w_m)|^2, whose expectation over
    w ~ Lambda is exactly the kernel's V-statistic MMD^2(x, y)."""
    amplitude, phase = amplitude_phase(*characteristic_function(x, freqs), *characteristic_function(y, freqs))
    return (amp_weight * amplitude + phase_weight * phase).mean()


def class_weights(counts, a_head: float = ALPHA_HEAD, a_tail: float = ALPHA_TAIL) -> torch.Tensor:
    """alpha_c = a_tail + (a_head - a_tail) (log n_c - log n_min) / (log n_max - log n_min), (C,).

    The amplitude (diversity) weight of class c: a_head for the largest class, a_tail for
    the smallest, log-linear between; 1/2 for every class when all counts are equal
    (then the class-aware loss is plain SDD). Requires 0 < a_tail <= a_head < 1, so
    alpha is in (0, 1) and non-decreasing in n_c."""
    if not (0 < a_tail <= a_head < 1):
        raise ValueError(f"class weights need 0 < a_tail <= a_head < 1, got a_head={a_head}, a_tail={a_tail}")
    log_counts = torch.as_tensor(counts, dtype=torch.float64).log()
    if (log_counts == float("-inf")).any():
        raise ValueError("class weights need every count >= 1")
    spread = log_counts.max() - log_counts.min()
    if spread == 0:
        return torch.full((len(log_counts),), 0.5, dtype=torch.float32)
    position = (log_counts - log_counts.min()) / spread
    return (a_tail + (a_head - a_tail) * position).float()


def kernel_metric_p(kernel: str) -> float:
    """The p of the distance ||delta||_p that a kernel's bandwidth scales: 1 for the l1 Laplacian
    exp(-||delta||_1 / sigma), 2 for the radial kernels and for the Cauchy product kernel (which is
    exp(-||delta||^2 / sigma^2) to first order for small per-coordinate differences)."""
    return 1.0 if kernel == "laplacian-l1" else 2.0


def class_median_distances(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           max_per_class: int | None = None, p: float = 2.0) -> torch.Tensor:
    """Per class, the median pairwise distance ||x_i - x_j||_p among (up to max_per_class of) its
    rows, (C,). A class with a single row has no distance to measure and gets 1 (the bandwidth as given),
    whatever the other classes it is computed with. max_per_class
    defaults to 256 for p = 2, whose distances cdist computes as one matrix product, and to 64 for
    other p, computed elementwise in O(B^2 d): for 10 classes of 2048-d features on the 2-core CPU
    of BENCHMARKS.md, 0.32 s at 256 rows (about a whole iteration) against 0.02 s at 64."""
    max_per_class = max_per_class or (256 if p == 2 else 64)
    padded, weights = pad_by_class(feats, labels, num_classes)
    padded, valid = padded[:, :max_per_class], weights[:, :max_per_class] > 0
    distances = torch.cdist(padded, padded, p=p)  # (C, B, B)
    upper = torch.ones(distances.shape[1:], dtype=torch.bool, device=feats.device).triu(1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    medians = distances.masked_fill(~pairs, float("nan")).flatten(1).nanmedian(1).values
    return medians.nan_to_num(nan=1.0)


# ----------------------------------------------------------------------------------------
# Per-class losses, vectorised over classes. Real features carry no gradient; synthetic ones do.

def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mean over the rows of each class, (C, ...); a class without rows gets zeros."""
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(values.dtype)
    sums = torch.zeros((num_classes,) + values.shape[1:], dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, labels, values)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


def class_characteristic_functions(feats, labels, freqs, num_classes, inverse_bandwidth=None,
                                   chunk_size: int = 8192, projection_dtype: torch.dtype | None = None):
    """phi_c(w_m / sigma_c) = mean_{j: y_j = c} exp(i w_m . x_j / sigma_c) for all classes: (re, im), each (C, M).

    inverse_bandwidth: 1 / sigma_c per class (C,), or None for sigma = 1. Rows are processed in
    chunks of chunk_size so that the (rows, M) projection stays bounded. projection_dtype=torch.bfloat16
    computes the product w . x in bfloat16 with float32 accumulation (5-6x faster on AMX CPUs and
    tensor cores; for unit-norm x and w ~ N(0, I) the phase error is ~3e-3 rad, far below the
    Monte-Carlo error of M frequencies); cos, sin and the means stay in feats' dtype."""
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats.dtype)
    re = torch.zeros(num_classes, freqs.shape[0], dtype=feats.dtype, device=feats.device)
    im = torch.zeros_like(re)
    for start in range(0, len(feats), chunk_size):
        chunk_labels = labels[start:start + chunk_size]
        rows = feats[start:start + chunk_size]
        if projection_dtype is None:
            projection = rows @ freqs.T  # (chunk, M)
        else:
            projection = (rows.to(projection_dtype) @ freqs.to(projection_dtype).T).to(feats.dtype)
        if inverse_bandwidth is not None:
            projection = projection * inverse_bandwidth[chunk_labels][:, None]
        re = re.index_add(0, chunk_labels, torch.cos(projection))
        im = im.index_add(0, chunk_labels, torch.sin(projection))
    return re / counts[:, None], im / counts[:, None]


def pad_by_class(feats: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Ragged rows grouped by class into (C, B, d) with zero padding, B = the largest class,
    and per-row weights (C, B): 1/n_c on real rows, 0 on padding."""
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(labels), device=feats.device) - starts[labels[order]]
    width = int(counts.max())
    padded = feats.new_zeros(num_classes, width, feats.shape[1])
    padded = padded.index_put((labels[order], position), feats[order])
    weights = feats.new_zeros(num_classes, width)
    weights = weights.index_put((labels[order], position), 1.0 / counts[labels[order]].to(feats.dtype))
    return padded, weights


def _gaussian_mean_kernel(a, wa, b, wb, bandwidth):
    """sum_ij wa_i wb_j exp(-||a_i - b_j||^2 / (2 sigma_c^2)) per class: a (C, n, d), b (C, m, d),
    bandwidth a number or (C,) -> (C,)."""
    sq = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    sigma = torch.as_tensor(bandwidth, dtype=a.dtype, device=a.device).reshape(-1, 1, 1)
    k = torch.exp(-sq.clamp_min(0) / (2 * sigma ** 2))
    return torch.einsum("cn,cnm,cm->c", wa, k, wb)


def exact_mmd2(real, real_labels, syn, syn_labels, num_classes, bandwidth):
    """Exact Gaussian-kernel MMD^2 (V-statistic) per class, (C,). O(n^2 d) per class."""
    r, wr = pad_by_class(real, real_labels, num_classes)
    s, ws = pad_by_class(syn, syn_labels, num_classes)
    return (_gaussian_mean_kernel(r, wr, r, wr, bandwidth) + _gaussian_mean_kernel(s, ws, s, ws, bandwidth)
            - 2 * _gaussian_mean_kernel(r, wr, s, ws, bandwidth))


def mean_matching_loss(real, real_labels, syn, syn_labels, num_classes, **_) -> torch.Tensor:
    """dm: ||mean R_c - mean S_c||^2 per class, (C,): the MMD^2 of the linear kernel."""
    return ((class_means(real, real_labels, num_classes) - class_means(syn, syn_labels, num_classes)) ** 2).sum(1)


def mmd_loss(real, real_labels, syn, syn_labels, num_classes, bandwidth=1.0, **_) -> torch.Tensor:
    """mmd: the exact Gaussian-kernel MMD^2 per class, (C,), of bandwidth sigma_c."""
    return exact_mmd2(real, real_labels, syn, syn_labels, num_classes, bandwidth)


def spectral_terms(real, real_labels, syn, syn_labels, num_classes, freqs, bandwidth=1.0,
                   projection_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """amplitude_c(w) and phase_c(w), (C, M) each, of the frequencies w / sigma_c (freqs drawn for sigma = 1
    then give the kernel of bandwidth sigma_c); the real side without a graph."""
    inverse = None
    if not (isinstance(bandwidth, (int, float)) and bandwidth == 1):
        inverse = 1 / torch.as_tensor(bandwidth, dtype=syn.dtype, device=syn.device).expand(num_classes)
    with torch.no_grad():
        re_r, im_r = class_characteristic_functions(real, real_labels, freqs, num_classes, inverse,
                                                    projection_dtype=projection_dtype)
    re_s, im_s = class_characteristic_functions(syn, syn_labels, freqs, num_classes, inverse,
                                                projection_dtype=projection_dtype)
    return amplitude_phase(re_s, im_s, re_r, im_r)


def _alpha(alpha, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(C, 1): the amplitude weight per class, 1/2 for all when None."""
    if alpha is None:
        alpha = torch.full((num_classes,), 0.5, device=like.device)
    return alpha.to(like.device, like.dtype)[:, None]


def sdd_loss(real, real_labels, syn, syn_labels, num_classes, freqs=None, alpha=None, bandwidth=1.0,
             projection_dtype=None, **_) -> torch.Tensor:
    """sdm / csdm: mean_w [ 2 a_c amplitude_c(w) + 2 (1 - a_c) phase_c(w) ] per class, (C,)."""
    amplitude, phase = spectral_terms(real, real_labels, syn, syn_labels, num_classes, freqs, bandwidth,
                                      projection_dtype)
    a = _alpha(alpha, num_classes, syn)
    return (2 * a * amplitude + 2 * (1 - a) * phase).mean(1)


def ncfm_loss(real, real_labels, syn, syn_labels, num_classes, freqs=None, alpha=None, bandwidth=1.0,
              projection_dtype=None, **_) -> torch.Tensor:
    """ncfm: mean_w sqrt(a_c amplitude_c(w) + (1 - a_c) phase_c(w)) per class, (C,): NCFM's CFLossFunc on features
    the caller normalised, whose match_loss is 300 x this; NCFM clamps only the phase term at 1e-12, this the sum
    under the root, which differs only for two equal sets (tests/test_reference.py, against a transcription)."""
    amplitude, phase = spectral_terms(real, real_labels, syn, syn_labels, num_classes, freqs, bandwidth,
                                      projection_dtype)
    a = _alpha(alpha, num_classes, syn)
    return torch.sqrt((a * amplitude + (1 - a) * phase).clamp_min(1e-12)).mean(1)


if __name__ == "__main__":
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(30, 3, generator=generator, dtype=torch.float64) * 1.3 + 0.4
    print(f"{'kernel':<10} {'exact MMD^2':>12} {'SDD M=2^18':>12}")
    for kernel in KERNELS:
        exact = (kernel_matrix(x, x, kernel).mean() + kernel_matrix(y, y, kernel).mean()
                 - 2 * kernel_matrix(x, y, kernel).mean())
        freqs = sample_frequencies(1 << 18, 3, kernel, generator=generator, dtype=torch.float64)
        print(f"{kernel:<10} {exact.item():12.5f} {spectral_distance(x, y, freqs).item():12.5f}")
