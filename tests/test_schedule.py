"""Respacing follows IDDPM; the posterior maths matches diffusers' DDPMScheduler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ilvr.schedule import DiffusionConfig, Schedule, make_betas, parse_steps, predict_step, space_timesteps


def test_250_keeps_a_uniform_stride_including_both_ends():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250
    assert kept[:4] == [0, 4, 8, 12] and kept[-3:] == [991, 995, 999]


def test_ddim50_uses_integer_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))  # tops out at 980


def test_10_splits_evenly_with_rounding():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "100")[:3] == [0, 10, 20] and space_timesteps(1000, "100")[-2:] == [989, 999]
    assert space_timesteps(1000, "50")[:4] == [0, 20, 41, 61]


@pytest.mark.parametrize("spec", ["250", "ddim50", "10"])
def test_respaced_betas_come_from_alphas_cumprod(spec):
    base = Schedule.from_config(DiffusionConfig())
    res = base.respace(spec)
    kept = space_timesteps(1000, spec)
    assert list(res.timestep_map) == kept
    # the respaced chain reaches exactly the same noise levels at the kept steps
    np.testing.assert_allclose(res.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    prev = np.concatenate([[1.0], base.alphas_cumprod[kept][:-1]])
    np.testing.assert_allclose(res.betas, 1 - base.alphas_cumprod[kept] / prev, rtol=1e-12)


def test_respacing_100_endpoints():
    res = Schedule.from_config(DiffusionConfig()).respace("100")
    assert res.betas[0] == pytest.approx(1e-4)
    assert res.betas[-1] == pytest.approx(0.1822, abs=1e-4)


def test_cosine_schedule_is_bounded():
    betas = make_betas(DiffusionConfig(beta_schedule="cosine"))
    assert betas.max() <= 0.999 and betas.min() > 0 and len(betas) == 1000


def test_posterior_matches_diffusers_ddpm_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                    clip_sample=True)
    ours = Schedule.from_config(DiffusionConfig())
    np.testing.assert_allclose(ours.alphas_cumprod, sched.alphas_cumprod.double().numpy(), rtol=2e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    eps = torch.randn(1, 3, 8, 8, generator=g)
    for t in (999, 500, 1):
        out = predict_step(ours, DiffusionConfig(), eps, x, t)
        prev = sched.step(eps, t, x, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(out.pred_x0, prev.pred_original_sample, atol=1e-4)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        # diffusers adds sqrt(variance) * noise with variance clamped at 1e-20; compare the mean
        var = float(np.exp(ours.posterior_log_variance_clipped[t]))
        assert torch.allclose(out.mean + var ** 0.5 * noise, prev.prev_sample, atol=1e-4)


@pytest.mark.parametrize("bad", ["", "abc", "0", "2000", "ddimx", "-5", "10,,"])
def test_bad_step_specs_are_rejected_clearly(bad):
    with pytest.raises(ValueError, match="steps must be"):
        parse_steps(bad, 1000)
