"""The Transfusion objective (arXiv 2408.11039): text next-token loss plus an image diffusion loss.

``prepare`` draws one time t per image and noises the image's whole latent x_0 with noise eps to
x_t, then cuts x_t into k x k patches in raster order; the patches, their slots and timesteps
become the model's continuous inputs. How t is drawn, x_t and the regression target are the
image process's (``objective.image_loss``, ``objectives/diffusion.py``):

- ``ddpm`` (the paper's): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with t uniform in
  [0, T) (in [0, noise_limit) for an image that precedes its caption) on the cosine schedule
  (T = 1000, diffusers' ``DDPMScheduler`` with ``beta_schedule="squaredcos_cap_v2"``); the
  target is eps.
- ``flow`` (rectified flow): ``x_t = (1 - t) x_0 + t eps`` with logit-normal t in [0, 1]
  (scaled into [0, noise_limit / T] for an image that precedes its caption); the target is the
  velocity ``eps - x_0`` and the model's timestep input is ``t * T``.

``loss`` is ``L = L_LM + lambda * L_image``: the cross-entropy over text targets (sum over
targets / their count, the ``ar`` rule; no loss is predicted from a BOI or patch position
because their targets are ignored at packing) plus lambda times the per-image mean squared error
between the target and the model's patch prediction (sum over images / the number of images: an
image counts once whatever its patch count). The model's prediction keeps the name ``noise_PC``
under both processes (under ``flow`` it is the predicted velocity).

Logged: ``loss/text`` (cross-entropy per text target), ``loss/image`` (diffusion MSE per image),
``z_loss`` when on, and ``loss`` = loss/text + lambda * loss/image of each batch (count 1, so a
window's ``loss`` is the mean over its batches).

Its registry entry declares that it trains on continuous latents (``image_kind="vae"``: the
Transfusion tokenizer, ``tokenizer.image_kind`` follows) and that image-caption pairs are ordered
by ``caption_first`` / ``caption_dropout`` (``data/encoded.py: CaptionOrder``).

Validation batches carry a ``noise_seed``: their t cycle through ``val_timesteps`` evenly spaced
values and their noise comes from that seed, so every evaluation sees the same noisy inputs.
A batch may also fix every image's t (``Batch.timestep_I``, in the process's units: integer
steps for ``ddpm``, t in [0, 1] for ``flow``) and its noise (``Batch.noise_IZhw``).

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
from sparsefusion.objectives.ddpm import (  # noqa: F401  (their former home)
    NoiseSchedule,
    add_noise,
    cosine_alphas_cumprod,
)
from sparsefusion.objectives.diffusion import build_schedule


@dataclass
class DiffusionInputs(ModelInputs):
    """Model inputs plus what the loss needs: the regression target per patch and its image.

    Attributes:
        target_PC: what the model's patch prediction regresses (``ddpm``: the noise added to
            the patch; ``flow``: its velocity eps - x_0).
        num_images: images in the batch (patches are image-major, n per image).
    """

    target_PC: torch.Tensor | None = None
    num_images: int = 0

    @property
    def noise_PC(self) -> torch.Tensor | None:
        """The target under its DDPM name (the noise under ``ddpm``; prefer ``target_PC``)."""
        return self.target_PC


class TransfusionObjective:
    """Text cross-entropy + lambda * per-image diffusion MSE (DDPM noise or flow velocity).

    Args:
        cfg: the objective settings (``image_loss``, ``diffusion_weight``, ...).
        model: the model config (towers, ``patch_size``, ``latent_channels``).

    Attributes:
        noise_schedule: the image process it trains (generation samples images on it).
    """

    def __init__(self, cfg: ObjectiveConfig, model: ModelConfig):
        if model.latent_channels < 1:
            raise ValueError(
                "objective.name=transfusion needs continuous image latents: "
                "tokenizer.image_kind=vae (model.latent_channels is set from the VAE)"
            )
        self.cfg, self.towers = cfg, (model.tower_of_modality, model.num_towers)
        self.patch_size = model.patch_size
        self.noise_schedule = build_schedule(cfg)

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"targets": batch.num_targets, "images": batch.num_images}

    def timesteps(self, batch: Batch, gen: torch.Generator | None) -> torch.Tensor:
        """One t per image: fixed, the validation grid, or drawn (limited for early images)."""
        I, T = batch.num_images, self.cfg.num_train_timesteps
        if batch.timestep_I is not None:
            return self.noise_schedule.fixed(batch.timestep_I)
        if batch.noise_seed is not None:
            grid = self.noise_schedule.grid(self.cfg.val_timesteps)
            return grid[torch.arange(I) % grid.numel()]
        limit_I = torch.full((I,), float(T))
        if batch.image_early_I is not None:
            limit_I = torch.where(batch.image_early_I, float(self.cfg.noise_limit), limit_I)
        return self.noise_schedule.draw_timesteps(limit_I, gen)

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
        noise = noise.float()
        process = self.noise_schedule
        xt_InC = patchify(process.noisy(x0, noise, t_I), self.patch_size)
        I, n, C = xt_InC.shape
        slot_P = (batch.image_slot_I.long()[:, None] + torch.arange(n)[None, :]).reshape(-1)
        kw.update(
            patches_PC=xt_InC.reshape(I * n, C),
            patch_slot_P=slot_P,
            timestep_P=process.model_timestep(t_I).repeat_interleave(n),
        )
        target_IZhw = process.target(x0, noise, t_I)
        target_PC = patchify(target_IZhw, self.patch_size).reshape(I * n, C)
        return DiffusionInputs(**kw, target_PC=target_PC, num_images=I)

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
        target_PC = getattr(inputs, "target_PC", None)
        num_images = getattr(inputs, "num_images", 0)
        if target_PC is None or num_images == 0:
            return None
        pred_PC = output.predictions["noise_PC"].float()  # the model's name, whatever the target
        se_P = (pred_PC - target_PC.to(pred_PC.device)).pow(2).mean(dim=-1)
        return se_P.view(num_images, -1).mean(dim=-1)


def _caption_order(cfg: ObjectiveConfig, seed: int) -> CaptionOrder:
    return CaptionOrder(seed, cfg.caption_first, cfg.caption_dropout)


@register_objective("transfusion", image_kind="vae", caption_order=_caption_order)
def _build(cfg: ObjectiveConfig, model: ModelConfig) -> TransfusionObjective:
    return TransfusionObjective(cfg, model)
