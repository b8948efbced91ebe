"""Mean-field Gaussian posterior q(theta; alpha) over a network's weights, for the KL term of the
meta-objective. The network's own weights are the posterior mean, `log_sigma` holds alpha, and
the prior p(theta) = N(prior_mean, prior_sigma^2) has its mean in non-persistent buffers (zero, or
the initial weights when fine-tuning from a meta-trained checkpoint)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.func import functional_call


def param_key(name: str) -> str:
    """A parameter name usable as a ParameterDict / buffer key.

    Args:
        name: a dotted parameter name, such as "blocks.0.weight".
    """
    return name.replace(".", "__")


def gaussian_kl(mu_q: torch.Tensor, log_sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: float) -> torch.Tensor:
    """Element-wise KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)).

    Args:
        mu_q: the posterior's means.
        log_sigma_q: the posterior's log standard deviations (same shape).
        mu_p: the prior's means (same shape).
        sigma_p: the prior's standard deviation, one for all.
    """
    var_q = torch.exp(2 * log_sigma_q)
    return math.log(sigma_p) - log_sigma_q + (var_q + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5


class VariationalNet(nn.Module):
    """Wraps `net`: forward with the posterior mean, or with one reparameterised sample of it.

    Args:
        net: the network whose weights are the posterior's means.
        prior_sigma: the prior's standard deviation.
        init_log_sigma: the posterior's initial log standard deviation, for every weight.
    """

    def __init__(self, net: nn.Module, prior_sigma: float, init_log_sigma: float):
        super().__init__()
        self.net = net
        self.prior_sigma = prior_sigma
        self.log_sigma = nn.ParameterDict(
            {param_key(n): nn.Parameter(torch.full_like(p, init_log_sigma)) for n, p in net.named_parameters()}
        )
        for n, p in net.named_parameters():
            self.register_buffer(f"prior_mean__{param_key(n)}", torch.zeros_like(p), persistent=False)

    def set_prior_to_current(self) -> None:
        """Centre the prior on the current weights (fine-tuning from a meta-trained checkpoint)."""
        for n, p in self.net.named_parameters():
            getattr(self, f"prior_mean__{param_key(n)}").copy_(p.detach())

    def sample_weights(self) -> dict[str, torch.Tensor]:
        """One reparameterised draw theta ~ q(theta; alpha)."""
        return {
            n: p + torch.exp(self.log_sigma[param_key(n)]) * torch.randn_like(p) for n, p in self.net.named_parameters()
        }

    def forward(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """`net(x)` with the mean weights, or with one sample of them.

        Args:
            x: the network's input.
            sample: draw the weights from the posterior (meta-training) instead of using the mean.
        """
        if sample:  # meta-training only (one thread): functional_call swaps the weights in place
            return functional_call(self.net, self.sample_weights(), (x,))
        return self.net(x)

    def kl(self) -> torch.Tensor:
        """Mean per-weight KL(q || p) between diagonal Gaussians (0 when q equals p)."""
        total, count = 0.0, 0
        for n, mu in self.net.named_parameters():
            k = param_key(n)
            prior = getattr(self, f"prior_mean__{k}")
            total = total + gaussian_kl(mu, self.log_sigma[k], prior, self.prior_sigma).sum()
            count += mu.numel()
        return total / count
