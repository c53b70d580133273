"""SD3's rectified-flow (flow-matching) objective, as the SD3.5 LoRA trainer uses it.

``x_t = (1 - sigma) x0 + sigma noise``; the MMDiT predicts the velocity
``noise - x0``. Which noise levels are drawn follows the weighting scheme
(``logit_normal`` by default, the SD3 paper's choice), taken from the model's
own shifted scheduler. ``evaluation_loss`` fixes both noise and levels, so it
compares between steps where the training loss's random draws would not.
"""

from __future__ import annotations

import torch

from pipelines import settings
from pipelines.training.sd3_config import SD3LoraTrainingConfig
from pipelines.training.sd3_data import CachedExample, stack_batch


def sample_noise_levels(
    config: SD3LoraTrainingConfig, scheduler, batch: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) for a batch, drawn as ``weighting_scheme`` says from the scheduler's shifted schedule
    (from ``generator``, or torch's global generator, whose state ``accelerator.save_state`` keeps)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    density = compute_density_for_timestep_sampling(
        weighting_scheme=config.weighting_scheme,
        batch_size=batch,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        generator=generator,
    )
    count = scheduler.config.num_train_timesteps
    indices = (density * count).long().clamp(0, len(scheduler.timesteps) - 1)
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


def flow_matching_loss(transformer, batch: dict, noise, timesteps, sigmas, weighting_scheme: str) -> torch.Tensor:
    """SD3's rectified-flow loss: the MMDiT's velocity for ``(1 - s) x0 + s noise`` against ``noise - x0``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    latents = batch["latents"]
    sigma = sigmas.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigma) * latents + sigma * noise
    prediction = transformer(
        hidden_states=noisy,
        timestep=timesteps.to(latents.device),
        encoder_hidden_states=batch["prompt_embeds"],
        pooled_projections=batch["pooled_prompt_embeds"],
        return_dict=False,
    )[0]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigma)
    error = weighting.float() * (prediction.float() - (noise - latents).float()) ** 2
    return error.reshape(latents.shape[0], -1).mean(dim=1).mean()


@torch.no_grad()
def evaluation_loss(transformer, examples: list[CachedExample], *, seed: int, device, dtype) -> float:
    """The unweighted flow-matching loss at the fixed noise levels ``settings.SD3_TRAIN_EVAL_SIGMAS``, with noise
    fixed by ``seed``: comparable between steps, unlike the training loss's random draws."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for item in examples:
        batch = stack_batch([item], device, dtype)
        noise = torch.randn(batch["latents"].shape, generator=generator).to(device, dtype)
        for sigma in settings.SD3_TRAIN_EVAL_SIGMAS:
            sigmas = torch.tensor([sigma])
            total += flow_matching_loss(transformer, batch, noise, sigmas * 1000, sigmas, "none").item()
    return total / (len(examples) * len(settings.SD3_TRAIN_EVAL_SIGMAS))
