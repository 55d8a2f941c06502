"""NCFM's characteristic-function loss, restated from its arithmetic (the tests' reference; nothing from sdd.py).

What NCFM computes (gszfwsb/NCFM, NCFM/NCFM.py at commit de92fb8a6d85562ef2df0ca4bbc74012f62b0d15: the helpers,
CFLossFunc and match_loss; condenser/compute_loss.py calls match_loss once per class on the class's real and
synthetic images with CFLossFunc(0.5, 0.5) from every config), written here in this project's own code: the
repository carries no license, so its facts are used and its text is not. For frequencies t (M, D):
- per set, the empirical characteristic function's real and imaginary parts are the means over the set's
  samples of cos(t x) and sin(t x), and its modulus sqrt(re^2 + im^2);
- amplitude = (|phi_real| - |phi_syn|)^2; phase = 2 (|phi_real| |phi_syn| - re_syn re_real - im_syn im_real),
  the phase alone clamped below at 1e-12;
- the loss is mean over frequencies of sqrt(alpha amplitude + beta phase);
- match_loss: both feature sets L2-normalised, frequencies from the sampling net if there is one, else
  standard normal (M = args.num_freqs), and 300 times the loss.
"""
import torch
import torch.nn.functional as F


def _characteristic_parts(features: torch.Tensor, t: torch.Tensor):
    """(real part, imaginary part, modulus) of mean_j exp(i t x_j), one value per frequency."""
    angles = t @ features.T                      # (M, n)
    real, imaginary = angles.cos().mean(1), angles.sin().mean(1)
    return real, imaginary, (real * real + imaginary * imaginary).sqrt()


class CFLossFunc:
    """NCFM's loss between real (target) and synthetic features at weights alpha (amplitude), beta (phase)."""

    def __init__(self, alpha_for_loss=0.5, beta_for_loss=0.5):
        self.alpha, self.beta = alpha_for_loss, beta_for_loss

    def __call__(self, feat_tg: torch.Tensor, feat: torch.Tensor, t=None, args=None) -> torch.Tensor:
        if t is None:
            t = torch.randn((args.num_freqs, feat.size(1)), device=feat.device)
        syn_re, syn_im, syn_norm = _characteristic_parts(feat, t)
        real_re, real_im, real_norm = _characteristic_parts(feat_tg, t)
        amplitude = (real_norm - syn_norm) ** 2
        phase = (2 * (real_norm * syn_norm - syn_re * real_re - syn_im * real_im)).clamp(min=1e-12)
        return (self.alpha * amplitude + self.beta * phase).sqrt().mean()


def match_loss(img_real, img_syn, model, sampling_net, args=None) -> torch.Tensor:
    """NCFM's per-class matching loss: 300 x CFLossFunc on the model's L2-normalised features."""
    with torch.no_grad():
        _, feat_tg = model(img_real, return_features=True)
    _, feat = model(img_syn, return_features=True)
    t = sampling_net(args.device) if sampling_net is not None else None
    return 300 * args.cf_loss_func(F.normalize(feat_tg, dim=1), F.normalize(feat, dim=1), t, args)
