"""HARD-VAE: a small convolutional VAE, first trained on the training set (no pretrained VAE is
reachable offline), then fine-tuned as the augmentor with learned noise added to the latent."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.augment.base import Augmentor

log = logging.getLogger(__name__)


class ConvVAE(nn.Module):
    """Encoder: two stride-2 convs to ``(2w, H/4, W/4)``, then μ and log σ² of a ``latent``-dim
    Gaussian; decoder: the mirror image, with a sigmoid to [0, 1]."""

    def __init__(self, channels: int, image_size: int, width: int = 32, latent: int = 32) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError("hard-vae needs an image size divisible by 4")
        self.shape = (2 * width, image_size // 4, image_size // 4)
        flat = 2 * width * (image_size // 4) ** 2
        self.encoder = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(inplace=True), nn.Flatten())
        self.to_stats = nn.Linear(flat, 2 * latent)
        self.from_latent = nn.Linear(latent, flat)
        self.decoder = nn.Sequential(nn.ReLU(inplace=True), nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
                                     nn.ReLU(inplace=True), nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Sigmoid())

    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_stats(self.encoder(x01)).chunk(2, dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(z).view(-1, *self.shape))


def vae_loss(x01: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The negative ELBO per image (Kingma & Welling 2014): Bernoulli reconstruction (binary
    cross-entropy summed over pixels) plus ``KL(N(μ, σ²) ‖ N(0, I))``."""
    bce = F.binary_cross_entropy(recon, x01, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kl) / len(x01)


class HardVAE(Augmentor):
    """``x̃ = decode(μ(x) + σ(x)·ε + exp(log s)·ε')``: the trained VAE's posterior sample plus a
    learned amount ``s`` of extra latent noise; at the start it reconstructs its input. The
    whole VAE is fine-tuned with the augmentor's (small) learning rate."""

    l_min, l_max, lr = 10.0, 60.0, 1e-4  # the paper's VAE settings (appendix A)
    pretrain_epochs = 3

    def __init__(self, channels: int = 1, image_size: int = 28, noise_init: float = 0.1) -> None:
        super().__init__()
        self.vae = ConvVAE(channels, image_size)
        self.log_noise = nn.Parameter(torch.tensor(math.log(noise_init)))

    def forward(self, x01: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> torch.Tensor:
        mu, logvar = self.vae.encode(x01)
        z = mu
        if sample:
            shape = (2, *mu.shape)
            eps = torch.randn(shape, device=x01.device, generator=generator)
            z = mu + (0.5 * logvar).exp() * eps[0] + self.log_noise.exp() * eps[1]
        return self.vae.decode(z)

    def prepare(self, train_batches, cache: Path, device: torch.device, seed: int) -> None:  # noqa: ANN001
        """Train the VAE on the training images (``train_batches(seed)`` yields uint8 batches),
        or load it from ``cache`` (the run dir's ``vae.pt``) when a run resumes."""
        from edgekd.checkpoint import load_checkpoint, save_checkpoint

        if cache.is_file():
            self.vae.load_state_dict(load_checkpoint(cache)["state_dict"])
            log.info("hard-vae: reusing %s", cache)
            return
        torch.manual_seed(seed)
        opt = torch.optim.Adam(self.vae.parameters(), lr=1e-3)
        self.vae.train()
        for epoch in range(self.pretrain_epochs):
            total, n = 0.0, 0
            for x_u8, _ in train_batches(seed + epoch):
                x01 = x_u8.float() / 255.0
                mu, logvar = self.vae.encode(x01)
                z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
                loss = vae_loss(x01, self.vae.decode(z), mu, logvar)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(x01), n + len(x01)
            log.info("hard-vae pretraining epoch %d: -ELBO %.1f per image", epoch + 1, total / max(n, 1))
        save_checkpoint(cache, {"state_dict": self.vae.state_dict(), "epochs": self.pretrain_epochs})
