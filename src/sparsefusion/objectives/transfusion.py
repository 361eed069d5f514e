"""The Transfusion objective (arXiv 2408.11039): text next-token loss plus image DDPM loss.

``prepare`` noises every image's whole latent, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``,
with one t per image drawn uniformly from [0, T) (from [0, noise_limit) for an image that
precedes its caption), then cuts it into k x k patches in raster order; the patches, their
slots and timesteps become the model's continuous inputs. ``loss`` is
``L = L_LM + lambda * L_DDPM``: the cross-entropy over text targets (sum over targets / their
count, the ``ar`` rule; no loss is predicted from a BOI or patch position because their targets
are ignored at packing) plus lambda times the per-image mean squared error between the true and
predicted noise (sum over images / the number of images: an image counts once whatever its
patch count). The schedule (cosine, T = 1000) is diffusers' ``DDPMScheduler`` with
``beta_schedule="squaredcos_cap_v2"``.

Logged: ``loss/text`` (cross-entropy per text target), ``loss/image`` (diffusion MSE per image),
``z_loss`` when on, and ``loss`` = loss/text + lambda * loss/image of each batch (count 1, so a
window's ``loss`` is the mean over its batches).

Its registry entry declares that it trains on continuous latents (``image_kind="vae"``: the
Transfusion tokenizer, ``tokenizer.image_kind`` follows) and that image-caption pairs are ordered
by ``caption_first`` / ``caption_dropout`` (``data/encoded.py: CaptionOrder``).

Validation batches carry a ``noise_seed``: their t cycle through ``val_timesteps`` evenly spaced
values and their noise comes from that seed, so every evaluation sees the same noisy inputs.

Shape legend: B = rows, T = sequence length, N = B*T, I = images, Z/h/w = latent channels and
side, n = patches per image, P = I*n patches, C = values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sparsefusion.data.batch import Batch
from sparsefusion.data.encoded import CaptionOrder
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig, ModelOutput
from sparsefusion.nn.patch_embed import patchify
from sparsefusion.objectives.ar import token_cross_entropy
from sparsefusion.objectives.base import (
    LossTerm,
    ObjectiveConfig,
    ObjectiveOutput,
    register_objective,
)


def cosine_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"
):
    """abar_t for t = 0..T-1 from diffusers' DDPMScheduler (float64 on the host)."""
    from sparsefusion.tokenizers.image_vae import require_diffusers

    diffusers = require_diffusers()
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule
    )
    return sched.alphas_cumprod.double()


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM noise schedule a model is trained on, and that its image sampler must follow.

    Attributes:
        num_train_timesteps: T.
        beta_schedule: diffusers beta schedule (``squaredcos_cap_v2``: cosine).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0..T-1 (float64 on the host)."""
        return cosine_alphas_cumprod(self.num_train_timesteps, self.beta_schedule)

    def scheduler(self, sampler: str, steps: int):
        """A diffusers ``ddim`` or ``ddpm`` scheduler on this schedule, set to ``steps`` passes.

        The model predicts the noise (epsilon); samples are not clipped.
        """
        from sparsefusion.tokenizers.image_vae import require_diffusers

        diffusers = require_diffusers()
        cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
        sched = cls(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            clip_sample=False,
            prediction_type="epsilon",
        )
        sched.set_timesteps(steps)
        return sched


def add_noise(
    x0_IZhw: torch.Tensor, noise_IZhw: torch.Tensor, t_I: torch.Tensor, abar_T: torch.Tensor
) -> torch.Tensor:
    """``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` per image."""
    ab_I = abar_T.to(x0_IZhw.device)[t_I.to(x0_IZhw.device)].to(x0_IZhw.dtype)
    shape = (-1,) + (1,) * (x0_IZhw.dim() - 1)
    return ab_I.sqrt().view(shape) * x0_IZhw + (1 - ab_I).sqrt().view(shape) * noise_IZhw


@dataclass
class DiffusionInputs(ModelInputs):
    """Model inputs plus what the loss needs: the true noise per patch and its image.

    Attributes:
        noise_PC: the noise added to each patch (the regression target).
        num_images: images in the batch (patches are image-major, n per image).
    """

    noise_PC: torch.Tensor | None = None
    num_images: int = 0


class TransfusionObjective:
    """Text cross-entropy + lambda * per-image DDPM epsilon MSE.

    Args:
        cfg: the objective settings (``diffusion_weight``, ``num_train_timesteps``, ...).
        model: the model config (towers, ``patch_size``, ``latent_channels``).

    Attributes:
        noise_schedule: the training schedule (generation samples images on it).
    """

    def __init__(self, cfg: ObjectiveConfig, model: ModelConfig):
        if model.latent_channels < 1:
            raise ValueError(
                "objective.name=transfusion needs continuous image latents: "
                "tokenizer.image_kind=vae (model.latent_channels is set from the VAE)"
            )
        self.cfg, self.towers = cfg, (model.tower_of_modality, model.num_towers)
        self.patch_size = model.patch_size
        self.noise_schedule = NoiseSchedule(cfg.num_train_timesteps, cfg.beta_schedule)
        self.abar_T = self.noise_schedule.alphas_cumprod().float()

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"targets": batch.num_targets, "images": batch.num_images}

    def timesteps(self, batch: Batch, gen: torch.Generator | None) -> torch.Tensor:
        """One t per image: fixed, the validation grid, or uniform (limited for early images)."""
        I, T = batch.num_images, self.cfg.num_train_timesteps
        if batch.timestep_I is not None:
            return batch.timestep_I.long()
        if batch.noise_seed is not None:
            grid = torch.linspace(0, T - 1, self.cfg.val_timesteps).round().long()
            return grid[torch.arange(I) % grid.numel()]
        u_I = torch.rand(I, generator=gen)
        limit_I = torch.full((I,), float(T))
        if batch.image_early_I is not None:
            limit_I = torch.where(batch.image_early_I, float(self.cfg.noise_limit), limit_I)
        return (u_I * limit_I).long().clamp_max(T - 1)

    def prepare(self, batch: Batch, *, generator: torch.Generator | None = None) -> ModelInputs:
        base = batch.model_inputs(*self.towers)
        kw = {f.name: getattr(base, f.name) for f in fields(base)}
        if batch.num_images == 0 or batch.latents_IZhw is None or batch.image_slot_I is None:
            return DiffusionInputs(**kw)
        gen = generator
        if batch.noise_seed is not None:
            gen = torch.Generator().manual_seed(int(batch.noise_seed))
        t_I = self.timesteps(batch, gen)
        x0 = batch.latents_IZhw.float()
        noise = batch.noise_IZhw
        if noise is None:
            noise = torch.randn(x0.shape, generator=gen)
        xt_InC = patchify(add_noise(x0, noise.float(), t_I, self.abar_T), self.patch_size)
        I, n, C = xt_InC.shape
        slot_P = (batch.image_slot_I.long()[:, None] + torch.arange(n)[None, :]).reshape(-1)
        kw.update(
            patches_PC=xt_InC.reshape(I * n, C),
            patch_slot_P=slot_P,
            timestep_P=t_I.repeat_interleave(n),
        )
        noise_PC = patchify(noise.float(), self.patch_size).reshape(I * n, C)
        return DiffusionInputs(**kw, noise_PC=noise_PC, num_images=I)

    def loss(self, output: ModelOutput, batch: Batch, inputs: ModelInputs) -> ObjectiveOutput:
        ce_N, lse_N, valid_N = token_cross_entropy(output.logits_BTV, batch.targets_BT)
        terms = {"ce": LossTerm(ce_N.sum(), "targets")}
        n_text = valid_N.sum()
        logged = {"loss/text": (ce_N.detach().double().sum(), n_text)}
        if self.cfg.z_loss > 0:
            z_N = lse_N.square()
            terms["z_loss"] = LossTerm(z_N.sum(), "targets", self.cfg.z_loss)
            logged["z_loss"] = (z_N.detach().double().sum(), n_text)
        mse_I = self._per_image_mse(output, inputs)
        # Logged whether or not the batch holds an image (count 0 then), so that the sums of
        # data-parallel ranks always line up.
        zero = torch.zeros((), dtype=torch.float64, device=n_text.device)
        logged["loss/image"] = (zero, torch.zeros_like(n_text))
        if mse_I is not None:
            terms["diffusion"] = LossTerm(mse_I.sum(), "images", self.cfg.diffusion_weight)
            n_img = torch.tensor(mse_I.numel(), device=mse_I.device)
            logged["loss/image"] = (mse_I.detach().double().sum(), n_img)
        text_mean = logged["loss/text"][0] / n_text.clamp_min(1)
        total = text_mean
        if mse_I is not None:
            total = total + self.cfg.diffusion_weight * mse_I.detach().double().mean()
        logged["loss"] = (total, torch.ones((), dtype=torch.long, device=total.device))
        return ObjectiveOutput(terms, {}, logged)

    def _per_image_mse(self, output: ModelOutput, inputs: ModelInputs) -> torch.Tensor | None:
        noise_PC = getattr(inputs, "noise_PC", None)
        num_images = getattr(inputs, "num_images", 0)
        if noise_PC is None or num_images == 0:
            return None
        pred_PC = output.predictions["noise_PC"].float()
        se_P = (pred_PC - noise_PC.to(pred_PC.device)).pow(2).mean(dim=-1)
        return se_P.view(num_images, -1).mean(dim=-1)


def _caption_order(cfg: ObjectiveConfig, seed: int) -> CaptionOrder:
    return CaptionOrder(seed, cfg.caption_first, cfg.caption_dropout)


@register_objective("transfusion", image_kind="vae", caption_order=_caption_order)
def _build(cfg: ObjectiveConfig, model: ModelConfig) -> TransfusionObjective:
    return TransfusionObjective(cfg, model)
