"""Model folders users have: a BK-SDM-shaped U-Net (no mid block) saved only as the fp16 variant, end to end
through the CLI; prediction types; one-line loading errors.

References: the fp16 safetensors files read directly (for what --variant loads), diffusers' own
DDPMScheduler.add_noise/get_velocity (for the training targets). Exactness of the split, the bundle's graphs
and the merge on BK-SDM shapes is proven against the plain diffusers forward in test_split/test_export/test_merge.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hollow_export.cli import main
from hollow_export.models.load import load_pipeline, load_unet


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """tiny-bk-tiny saved as users' fp16-only folders are: diffusion_pytorch_model.fp16.safetensors etc."""
    folder = tmp_path_factory.mktemp("fp16") / "bk-tiny-fp16"
    pipe = load_pipeline(arch="tiny-bk-tiny")
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return folder


def _one_line_error(res, *words):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for w in words:
        assert w in res.output, res.output


def test_variant_loads_the_fp16_weights(fp16_folder):
    from safetensors.torch import load_file
    unet = load_unet(str(fp16_folder), variant="fp16")
    stored = load_file(str(fp16_folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    params = dict(unet.named_parameters())
    assert set(stored) == set(params)
    for name, tensor in stored.items():
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name].detach(), tensor.float()), name


def test_missing_weights_are_one_line_naming_folder_and_file(fp16_folder, tmp_path):
    res = CliRunner().invoke(main, ["build", "--model", str(fp16_folder), "--out", str(tmp_path / "b")])
    _one_line_error(res, str(fp16_folder), "unet/diffusion_pytorch_model.safetensors", "--variant fp16")
    assert not (tmp_path / "b").exists()
    res = CliRunner().invoke(main, ["plan", "--model", str(tmp_path), "--depth", "1"])
    _one_line_error(res, str(tmp_path), "model_index.json")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "unet" / "config.json").write_text((fp16_folder / "unet" / "config.json").read_text())
    (broken / "model_index.json").write_text((fp16_folder / "model_index.json").read_text())
    res = CliRunner().invoke(main, ["build", "--model", str(broken), "--variant", "fp16", "--out", str(tmp_path / "c")])
    _one_line_error(res, str(broken), "scheduler/scheduler_config.json")
    import shutil
    shutil.copytree(fp16_folder / "scheduler", broken / "scheduler")
    res = CliRunner().invoke(main, ["build", "--model", str(broken), "--variant", "fp16", "--out", str(tmp_path / "c")])
    _one_line_error(res, str(broken), "unet/diffusion_pytorch_model.fp16.safetensors")


def test_variant_the_folder_lacks_says_to_leave_it_out():
    from hollow_export.models.load import ModelError, materialize
    folder = materialize("tiny")  # saved plain, no fp16 files
    with pytest.raises(ModelError, match="missing unet/diffusion_pytorch_model.fp16.safetensors .*leave out --variant"):
        load_unet(str(folder), variant="fp16")


def test_variant_with_a_registry_architecture_is_refused_not_ignored(tmp_path):
    res = CliRunner().invoke(main, ["build", "--arch", "tiny", "--variant", "fp16", "--out", str(tmp_path / "b")])
    _one_line_error(res, "--variant fp16", "tiny", "leave out --variant")
    assert not (tmp_path / "b").exists()
    res = CliRunner().invoke(main, ["plan", "--variant", "fp16", "--depth", "1"])  # the embedded default
    _one_line_error(res, "--variant fp16", "tiny-toy", "leave out --variant")


def test_refused_prediction_type_before_any_work(fp16_folder, tmp_path):
    import shutil
    folder = tmp_path / "sample-pred"
    shutil.copytree(fp16_folder, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "sample"
    cfg_path.write_text(json.dumps(cfg))
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()  # loading would fail naming these: the refusal must come first, before any loading
    res = CliRunner().invoke(main, ["build", "--model", str(folder), "--variant", "fp16", "--out", str(tmp_path / "b")])
    _one_line_error(res, "prediction_type 'sample'", "epsilon", "v_prediction")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_training_targets_match_diffusers(kind):
    from diffusers import DDPMScheduler
    from hollow_export.device.collect import noisy_and_target
    from hollow_export.train.trainer import training_target
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    latent, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in (0, 17, 500, 999):
        ts = torch.tensor([t])
        want_noisy = sched.add_noise(latent, noise, ts)
        want = noise if kind == "epsilon" else sched.get_velocity(latent, noise, ts)
        noisy, target = noisy_and_target(sched.alphas_cumprod.float().numpy(),
                                         {"timestep": t, "latent": latent[0].numpy(), "noise": noise[0].numpy()}, kind)
        np.testing.assert_allclose(noisy, want_noisy[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(target, want[0].numpy(), atol=1e-6)
        torch.testing.assert_close(training_target(sched, latent, noise, ts), want, atol=1e-6, rtol=0)


def test_bk_sdm_fp16_folder_end_to_end(fp16_folder, tmp_path):
    """build -> collect -> train -> export -> merge on a no-mid-block U-Net loaded from an fp16-only folder."""
    run = CliRunner()
    b, photos, buf, tr, lo, mg = (tmp_path / n for n in ("bundle", "photos", "buffer.bin", "train", "lora", "merged"))
    steps = [
        ["build", "--model", str(fp16_folder), "--variant", "fp16", "--depth", "2", "--rank", "4", "--out", str(b)],
        ["demo-photos", "--out", str(photos)],
        ["device", "collect", "--bundle", str(b), "--images", str(photos), "--buffer", str(buf), "--samples", "6"],
        ["device", "train", "--bundle", str(b), "--buffer", str(buf), "--run", str(tr), "--steps", "4",
         "--checkpoint-every", "2"],
        ["device", "export", "--bundle", str(b), "--checkpoint", str(tr), "--out", str(lo)],
        ["merge", "--bundle", str(b), "--lora", str(lo / "lora.safetensors"), "--out", str(mg)],
    ]
    for args in steps:
        res = run.invoke(main, args)
        assert res.exit_code == 0, (args[0], res.output, res.exception)
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["model"]["variant"] == "fp16"
    assert not any(u["kind"] == "mid" for u in manifest["plan"]["units"])
    assert (mg / "single").is_dir() and (mg / "dual").is_dir()
