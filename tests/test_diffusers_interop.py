"""diffusers interop both ways, on a small randomly initialised UNet built here (no download)."""
import pytest
import torch

import diffsolve as ds

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

from diffsolve.integrations.diffusers import DiffsolveScheduler, load_diffusers  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def run_pipeline(unet, scheduler, n):
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(batch_size=2, num_inference_steps=n, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [5, 10])
def test_scheduler_swap_ddim(unet, n):
    ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    ours = DiffsolveScheduler.from_config(ref.config, solver="ddim", spacing="leading")
    a, b = run_pipeline(unet, ours, n), run_pipeline(unet, ref, n)
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("n", [6, 10])
def test_scheduler_swap_dpmpp_2m_with_explicit_timesteps(unet, n):
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(n)
    ours = DiffsolveScheduler.from_config(ref.config, solver="dpm++2m")
    ours_steps = [float(t) for t in ref.timesteps]

    class Fixed(DiffsolveScheduler):  # a pipeline calls set_timesteps(n): pin the same grid
        def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
            super().set_timesteps(timesteps=ours_steps, device=device)

    fixed = Fixed.from_config(ours.config)
    a, b = run_pipeline(unet, fixed, n), run_pipeline(unet, DPMSolverMultistepScheduler.from_config(ref.config), n)
    assert rel(a, b) < 1e-5


def test_scheduler_reports_nfe_and_timesteps(unet):
    s = DiffsolveScheduler(solver="heun")
    s.set_timesteps(9)  # heun: 4 two-evaluation steps + the jump
    assert len(s.timesteps) == 9 and s.timesteps[0] == 999
    calls = {"n": 0}
    orig = unet.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    unet.forward = counting
    try:
        img = run_pipeline(unet, s, 9)
    finally:
        unet.forward = orig
    assert calls["n"] == 9 and torch.isfinite(img).all()


def test_scheduler_rejects_bad_config():
    with pytest.raises(ValueError, match="valid names"):
        DiffsolveScheduler(solver="nope")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffsolveScheduler(prediction_type="banana")


def test_load_diffusers_folder_matches_pipeline(unet, tmp_path):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    den = ds.load(tmp_path)
    assert isinstance(den, ds.Denoiser) and den.prediction == "epsilon"
    assert torch.allclose(den.process.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-6)
    # same model + same algorithm: our DDIM on diffusers' DDIM grid equals the DDIM pipeline run
    ref = DDIMScheduler.from_config(sched.config, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(8)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(unet(x, t).sample, t, x).prev_sample
    ours = ds.sample(den, noise, "ddim", grid=ds.explicit(den.process, t=ref.timesteps.double()), nfe=None)
    assert rel(ours.float(), x) < 1e-5


def test_load_diffusers_errors(tmp_path):
    with pytest.raises(ValueError, match="scheduler_config"):
        load_diffusers(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"prediction_type": "epsilon"}')
    with pytest.raises(ValueError, match="config.json"):
        load_diffusers(tmp_path)
