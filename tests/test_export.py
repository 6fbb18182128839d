"""The bundle against PyTorch: precompute graph, two ORT training steps vs torch AdamW, eval loss vs diffusers."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnxruntime.training.api import CheckpointState, Module

from hollow_export import bundle as fmt
from hollow_export import store
from hollow_export.hollow import lora
from hollow_export.hollow.plan import LoraSpec, make_plan
from hollow_export.cli import main
from hollow_export.device.ort_session import training_module
from hollow_export.export.build import BuildSettings, build
from hollow_export.export import onnx as onnx_export
from hollow_export.export.onnx import GroupNormOps, LayerNormOps, Upsample2xOps
from hollow_export.models.load import load_pipeline
from hollow_export.hollow.split import HollowedNet, PrecomputeNet

from conftest import feed_buffer, small_sd2_pipeline

SETTINGS = BuildSettings(lr=1e-3, weight_decay=1e-2)


DEPTHS = {"tiny": 3, "small_sd2": 5, "tiny-bk-tiny": 2}  # tiny-bk-tiny: BK-SDM-Tiny's shape, no mid block


def _pipe(name):
    return small_sd2_pipeline() if name == "small_sd2" else load_pipeline(arch=name)


@pytest.fixture(scope="module", params=["tiny", "small_sd2", "tiny-bk-tiny"])
def built(request, tmp_path_factory):
    pipe = _pipe(request.param)
    plan = make_plan(pipe.unet, depth=DEPTHS[request.param], lora=LoraSpec(rank=4, alpha=8.0))
    if request.param == "tiny":  # this very build (ort_steps.build_tiny, SETTINGS) is shared with other files
        assert SETTINGS == BuildSettings(lr=1e-3)
        out = request.getfixturevalue("tiny_bundle")
        return out, fmt.open_bundle(out), plan, pipe  # `pipe` built nothing: it is a fresh one
    out = tmp_path_factory.mktemp("bundle") / "b"
    # small_sd2 is built as `hollow-export build` builds SD2.1: the pipeline released stage by stage and
    # the inference graphs' weights streamed to external data (there from 1 GiB, here from 0 bytes)
    streamed = request.param == "small_sd2"
    with pytest.MonkeyPatch.context() as patch:
        if streamed:
            patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        manifest = build(pipe, plan, out, "a sks dog", "a dog", SETTINGS, {"source": request.param},
                         release=streamed)
    assert (out / (fmt.PRECOMPUTE + ".data")).exists() == streamed
    fresh = _pipe(request.param)  # untouched by the build
    return out, manifest, plan, fresh


def _inputs(plan, context_dim, seed=0):
    g = np.random.default_rng(seed)
    c, h, w = plan.latent_shape
    return {
        "sample": g.standard_normal((1, c, h, w)).astype(np.float32),
        "timestep": np.array([g.integers(0, 1000)], dtype=np.int64),
        "encoder_hidden_states": g.standard_normal((1, 77, context_dim)).astype(np.float32),
        "hidden": g.standard_normal((1, *plan.buffer_shape)).astype(np.float32),
        "target": g.standard_normal((1, c, h, w)).astype(np.float32),
    }


def _torch(inputs, *names):
    return [torch.from_numpy(inputs[n]) for n in names]


def test_precompute_graph_equals_pytorch(built):
    out, manifest, plan, fresh = built
    x = _inputs(plan, fresh.unet.config.cross_attention_dim)
    session = ort.InferenceSession(str(out / fmt.PRECOMPUTE), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(None, {k: x[k] for k in fmt.PRECOMPUTE_INPUTS})
    with torch.no_grad():
        ref = PrecomputeNet(fresh.unet, plan)(*_torch(x, *fmt.PRECOMPUTE_INPUTS)).numpy()
    assert hidden.shape == ref.shape and np.abs(hidden - ref).max() <= 1e-5


def test_vae_encoder_graph_equals_diffusers(built):
    out, manifest, plan, fresh = built
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, plan.resolution, plan.resolution)).astype(np.float32)
    mean, std = ort.InferenceSession(str(out / fmt.VAE_ENCODER)).run(None, {"image": image})
    with torch.no_grad():
        dist = fresh.vae.encode(torch.from_numpy(image)).latent_dist
    sf = fresh.vae.config.scaling_factor
    assert np.abs(mean - dist.mean.numpy() * sf).max() <= 1e-5
    assert np.abs(std - dist.std.numpy() * sf).max() <= 1e-5


def test_ort_training_steps_equal_torch_adamw(built):
    """Two ORT steps of the bundle, opened as the runtime opens it, against the same two steps of the
    PyTorch module with `torch.optim.AdamW`: the loss and every LoRA gradient of each step, then the
    weights. AdamW's first update is about lr * sign(g), blind to a gradient's size: the gradients are
    compared themselves, and the second update weighs the two steps' gradients by the moments."""
    _assert_two_steps_equal_torch_adamw(*built)


def test_conv_lora_bundle_trains_like_torch_and_its_export_holds_no_frozen_weight(tmp_path, monkeypatch):
    """`build --targets attn+conv` (LoRA on the resnets' convs too): the same two-step comparison with PyTorch.
    And its training graph is traced without its weights: exported with them, a net under protobuf's 2 GB has
    every frozen weight serialised in memory, two more copies of them (sd21 at depth 4 built at 10.8 GB);
    above 2 GB the exporter writes them to a side file instead."""
    real_export, traced = torch.onnx.export, []

    def spy(model, args, f, **kwargs):
        result = real_export(model, args, f, **kwargs)
        if kwargs.get("training") == torch.onnx.TrainingMode.TRAINING:
            graph = onnx.load(str(f), load_external_data=False).graph
            traced.append(({i.name for i in graph.initializer}, dict(model.named_parameters())))
        return result

    monkeypatch.setattr(torch.onnx, "export", spy)
    pipe = load_pipeline(arch="tiny")
    plan = make_plan(pipe.unet, depth=3, lora=LoraSpec(rank=4, alpha=8.0, targets="attn+conv"))
    manifest = build(pipe, plan, tmp_path / "b", "a sks dog", "a dog", SETTINGS, {"source": "tiny"})
    assert len(traced) == 1
    initializers, params = traced[0]
    frozen = {n for n in params if ".lora_" not in n}
    assert len(frozen) > 100 and not frozen & initializers
    _assert_two_steps_equal_torch_adamw(tmp_path / "b", manifest, plan, load_pipeline(arch="tiny"))


def _assert_two_steps_equal_torch_adamw(out, manifest, plan, fresh):
    state = CheckpointState.load_checkpoint(str(out / fmt.CHECKPOINT))
    module, optimizer = training_module(out, state, manifest["training_session"])
    optimizer.set_learning_rate(SETTINGS.lr)

    net = lora.inject(HollowedNet(fresh.unet, plan), plan.lora, plan.lora_targets)
    params = lora.lora_parameters(net)
    assert sorted(params) == sorted(item["name"] for item in manifest["lora"])
    g = np.random.default_rng(7)
    with torch.no_grad():  # same starting point, with non-zero B so every LoRA tensor gets a gradient
        for name, p in params.items():
            value = state.parameters[name].data
            if "lora_B" in name:
                value = (g.standard_normal(value.shape) * 0.1).astype(np.float32)
                state.parameters[name] = value
            p.copy_(torch.from_numpy(value))
    reference = torch.optim.AdamW(list(params.values()), lr=SETTINGS.lr, betas=SETTINGS.betas, eps=SETTINGS.eps,
                                  weight_decay=SETTINGS.weight_decay)
    module.train()
    for seed in (3, 4):
        x = _inputs(plan, fresh.unet.config.cross_attention_dim, seed=seed)
        ort_loss = float(module(*[x[k] for k in fmt.TRAIN_INPUTS]))
        ort_grads = {name: state.parameters[name].grad.copy() for name in params}
        optimizer.step()
        module.lazy_reset_grad()
        reference.zero_grad()
        torch_loss = net(*_torch(x, *fmt.TRAIN_INPUTS))
        torch_loss.backward()
        reference.step()
        assert abs(ort_loss - torch_loss.item()) <= 1e-5 * abs(torch_loss.item())
        for name, p in params.items():
            want = p.grad.numpy()
            assert np.linalg.norm(want) > 0, name
            assert np.linalg.norm(ort_grads[name] - want) <= 1e-4 * np.linalg.norm(want), (seed, name)

    compared = 0
    for name, p in params.items():
        grad = p.grad.abs().numpy()
        # Adam divides by |g| + eps: where |g| nears eps, fp32 rounding in the gradient dominates the step.
        # 5 % of lr: the second update divides two steps' moments, where the gradients' fp32 rounding
        # shows up to 1.5 % of lr (measured on the three models); a gradient off in size moves it by tens of %
        mask = grad > max(1e-3 * grad.max(), 1e-6)
        diff = np.abs(state.parameters[name].data - p.detach().numpy())
        assert diff[mask].max(initial=0.0) <= 5e-5, name
        compared += int(mask.sum())
    assert compared > 0.5 * sum(p.numel() for p in params.values())


def test_ort_eval_loss_equals_full_unet_diffusers_loss(built):
    out, manifest, plan, fresh = built
    state = CheckpointState.load_checkpoint(str(out / fmt.CHECKPOINT))
    module = Module(str(out / fmt.TRAINING_MODEL), state, str(out / fmt.EVAL_MODEL))
    g = np.random.default_rng(11)
    for item in manifest["lora"]:  # parameters are set after the Module exists (setting them before crashes ORT)
        if "lora_B" in item["name"]:
            state.parameters[item["name"]] = (g.standard_normal(item["shape"]) * 0.1).astype(np.float32)
    module.eval()
    x = _inputs(plan, fresh.unet.config.cross_attention_dim, seed=5)
    ort_loss = float(module(*[x[k] for k in fmt.TRAIN_INPUTS]))

    lora_state = {item["unet_name"]: torch.from_numpy(state.parameters[item["name"]].data) for item in manifest["lora"]}
    unet = fresh.unet
    lora.load_into(unet, lora_state, plan.lora)  # into the full U-Net, by name
    handle = feed_buffer(unet, plan, torch.from_numpy(x["hidden"]))
    with torch.no_grad():
        pred = unet(*_torch(x, "sample", "timestep", "encoder_hidden_states")).sample  # plain diffusers forward
        without_lora_loss = None
        with lora.adapters_disabled(unet):
            without_lora_loss = torch.nn.functional.mse_loss(
                unet(*_torch(x, "sample", "timestep", "encoder_hidden_states")).sample,
                torch.from_numpy(x["target"])).item()
    handle.remove()
    unet.delete_adapters(lora.ADAPTER)
    ref = torch.nn.functional.mse_loss(pred, torch.from_numpy(x["target"])).item()
    assert abs(ort_loss - ref) <= 1e-5 * ref
    assert abs(without_lora_loss - ref) > 1e-4 * ref  # the LoRA matters, so the comparison can fail


def test_manifest_describes_every_file_and_graph(built):
    out, manifest, plan, fresh = built
    # store.atomic_dir's output record sits beside the bundle's files; it is not one of them
    files = {p.name for p in out.iterdir()} - {fmt.MANIFEST, store.OUTPUT_MARKER}
    assert set(manifest["files"]) == files
    assert {fmt.VAE_ENCODER, fmt.PRECOMPUTE, fmt.TRAINING_MODEL, fmt.EVAL_MODEL, fmt.OPTIMIZER_MODEL,
            fmt.CHECKPOINT, fmt.FROZEN_WEIGHTS, fmt.PROMPTS, fmt.SCHEDULE} <= files
    import hashlib
    frozen = (out / fmt.FROZEN_WEIGHTS).read_bytes()
    assert manifest["format_version"] == 2
    assert manifest["frozen"] == {"file": fmt.FROZEN_WEIGHTS, "dtype": "float32", "bytes": len(frozen),
                                  "sha256": hashlib.sha256(frozen).hexdigest()}
    # checkpoint: LoRA only (its parameters are exactly the manifest's LoRA tensors, all trainable)
    state = CheckpointState.load_checkpoint(str(out / fmt.CHECKPOINT))
    assert sorted(n for n, _ in state.parameters) == sorted(item["name"] for item in manifest["lora"])
    assert all(p.requires_grad for _, p in state.parameters)
    train_inputs = [i["name"] for i in manifest["graphs"][fmt.TRAINING_MODEL]["inputs"]]
    assert train_inputs == list(fmt.TRAIN_INPUTS)
    assert manifest["graphs"][fmt.PRECOMPUTE]["outputs"][0]["shape"][1:] == plan.buffer_shape
    assert all(item["unet_name"].endswith((".lora_A.weight", ".lora_B.weight")) for item in manifest["lora"])
    assert sum(np.prod(item["shape"]) for item in manifest["lora"]) == plan.lora_params
    import onnx
    optim = onnx.load(str(out / fmt.OPTIMIZER_MODEL))
    modes = [a.i for n in optim.graph.node if n.op_type == "AdamWOptimizer" for a in n.attribute
             if a.name == "adam_mode"]
    assert modes == [0]
    assert max(onnx.load(str(out / f), load_external_data=False).ir_version
               for f in (fmt.TRAINING_MODEL, fmt.EVAL_MODEL, fmt.OPTIMIZER_MODEL)) <= 10


def test_tampered_bundle_is_refused_naming_the_file(built, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    assert fmt.open_bundle(out)["format_version"] == fmt.FORMAT_VERSION
    data = bytearray((out / fmt.PRECOMPUTE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / fmt.PRECOMPUTE).write_bytes(bytes(data))
    with pytest.raises(fmt.BundleError, match="precompute.onnx fails its sha256"):
        fmt.open_bundle(out)
    (out / fmt.CHECKPOINT).unlink()
    with pytest.raises(fmt.BundleError, match="checkpoint"):
        fmt.open_bundle(out)


def test_format_1_bundle_is_refused_with_rebuild(built, tmp_path):
    import json
    import shutil
    out = tmp_path / "v1"
    shutil.copytree(built[0], out)
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    manifest["format_version"] = 1  # what a build before the frozen-weights file wrote
    del manifest["frozen"]
    (out / fmt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(fmt.BundleError, match="v1.*rebuild it with `hollow-export build`"):
        fmt.open_bundle(out)
    res = CliRunner().invoke(main, ["device", "export", "--bundle", str(out), "--checkpoint",
                                    str(out / fmt.CHECKPOINT), "--out", str(tmp_path / "lora")])
    assert res.exit_code == 1 and "rebuild" in res.output and not (tmp_path / "lora").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ort_rewrites_equal_the_modules_they_replace(dtype):
    from diffusers.models.upsampling import Upsample2D
    torch.manual_seed(0)
    cases = [
        (torch.nn.GroupNorm(4, 16, eps=1e-5), GroupNormOps, (2, 16, 6, 6)),
        (torch.nn.GroupNorm(8, 16, eps=1e-6, affine=True), GroupNormOps, (1, 16, 3, 5)),
        (torch.nn.LayerNorm(24), LayerNormOps, (2, 7, 24)),
        (Upsample2D(16, use_conv=True, out_channels=8), Upsample2xOps, (2, 16, 4, 5)),
    ]
    for original, twin_cls, shape in cases:
        original = original.to(dtype)
        with torch.no_grad():
            for p in original.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        twin = twin_cls(original)
        x1 = (torch.randn(shape, dtype=dtype) * 2 + 0.5).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        y1, y2 = original(x1), twin(x2)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert (y1 - y2).abs().max().item() <= tol
        g = torch.randn_like(y1)
        # gradients of the input and of every parameter (the twin holds the original's parameters,
        # so each side's are taken separately rather than accumulated in .grad)
        params = list(original.parameters())
        assert params and {id(p) for p in twin.parameters()} == {id(p) for p in params}
        ref = torch.autograd.grad(y1, [x1, *params], g)
        got = torch.autograd.grad(y2, [x2, *params], g)
        for name, a, b in zip(["input"] + [n for n, _ in original.named_parameters()], ref, got):
            scale = max(a.abs().max().item(), 1.0)
            assert (a - b).abs().max().item() <= tol * 10 * scale, (twin_cls.__name__, name)
            assert a.abs().max().item() > 0, (twin_cls.__name__, name)  # a real gradient, not zeros


def test_cli_build_refuses_bad_options_and_writes_nothing(tmp_path):
    res = CliRunner().invoke(main, ["build", "--arch", "tiny", "--fraction", "2", "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and "between 0 and 1" in res.output
    assert not (tmp_path / "b").exists()
