"""The returned LoRA merged back: single path under ORT vs the PyTorch U-Net with the adapter active,
dual path under ORT vs PyTorch, diffusers' loader, optimum's pipeline, and refusals."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hollow_export import bundle as fmt
from hollow_export.hollow import lora
from hollow_export.device import ort_session
from hollow_export.device import export as dexport
from hollow_export.device import train as dtrain
from hollow_export.hollow.plan import LoraSpec, make_plan
from hollow_export.export.build import BuildSettings, build
from hollow_export.merge import MergeError, merge
from hollow_export.models.load import load_pipeline
from hollow_export.models.prompts import encode_prompt
from hollow_export.hollow.split import HollowedNet, PrecomputeNet, unet_forward

from conftest import small_sd2_pipeline, unet_inputs


def phone_lora(bundle, out, seed=0):
    """What a phone sends back, made with the runtime's own export from a checkpoint with non-zero LoRA B."""
    api = ort_session.training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle / fmt.CHECKPOINT))
    module = api.Module(str(bundle / fmt.TRAINING_MODEL), state, str(bundle / fmt.EVAL_MODEL))
    g = np.random.default_rng(seed)
    for item in fmt.open_bundle(bundle)["lora"]:
        if "lora_B" in item["name"]:
            state.parameters[item["name"]] = (g.standard_normal(item["shape"]) * 0.2).astype(np.float32)
    del module
    api.CheckpointState.save_checkpoint(state, str(out / "ckpt"))
    # export checks a checkpoint against its run's progress.json: record this one as a run's last
    from hollow_export import store
    store.write_json(out / dtrain.PROGRESS, {"bundle": fmt.bundle_id(bundle), "step": 0, "checkpoint": "ckpt",
                                             "sha256": store.sha256(out / "ckpt")})
    lora = out.with_name(out.name + "-lora")  # an output never lies inside an input (the run folder)
    dexport.export_lora(bundle, out / "ckpt", lora)
    return lora / dexport.LORA_EXPORT


@pytest.fixture(scope="module", params=["tiny", "small_sd2", "tiny-bk-small"])
def merged(request, tmp_path_factory):
    make = small_sd2_pipeline if request.param == "small_sd2" else (lambda: load_pipeline(arch=request.param))
    pipe = make()
    depth = {"tiny": 3, "small_sd2": 5, "tiny-bk-small": 3}[request.param]  # tiny-bk-small: no mid block
    plan = make_plan(pipe.unet, depth=depth, lora=LoraSpec(rank=4, alpha=2.0))
    root = tmp_path_factory.mktemp(f"merge-{request.param}")
    build(pipe, plan, root / "bundle", "a sks dog", "a dog", BuildSettings(), {"source": request.param})
    lora_file = phone_lora(root / "bundle", root)
    merge(make(), root / "bundle", lora_file, root / "merged")
    return root, make, plan, lora_file


def _reference_unet(make, lora_file, plan):
    """A fresh U-Net with the returned LoRA as a live peft adapter (not fused)."""
    from hollow_export.store import load_tensors
    pipe = make()
    lora.load_into(pipe.unet, load_tensors(lora_file), plan.lora)
    return pipe


def test_single_path_under_ort_equals_pytorch_with_adapter(merged):
    root, make, plan, lora_file = merged
    pipe = _reference_unet(make, lora_file, plan)
    x, t, e = unet_inputs(pipe.unet, batch=1, seed=2)
    klass = encode_prompt(pipe, "a dog")
    session = ort.InferenceSession(str(root / "merged" / "single" / "unet" / "model.onnx"))
    feeds = {"sample": x.numpy(), "timestep": np.array(float(t[0]), dtype=np.float32),
             "encoder_hidden_states": e.numpy()}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        want = unet_forward(pipe.unet, plan, x, t, e, klass).numpy()
        # fed the class prompt everywhere, the single path is the plain diffusers forward with the adapter
        plain = pipe.unet(x, t, klass).sample.numpy()
        without = None
        with lora.adapters_disabled(pipe.unet):
            without = pipe.unet(x, t, klass).sample.numpy()
    (got_class,) = session.run(None, dict(feeds, encoder_hidden_states=klass.numpy()))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert np.abs(got_class - plain).max() <= 1e-4 * np.abs(plain).max()
    assert np.abs(plain - without).max() > 1e-3 * np.abs(plain).max()  # the fused LoRA is really there


def test_dual_path_under_ort_equals_pytorch(merged):
    root, make, plan, lora_file = merged
    pipe = _reference_unet(make, lora_file, plan)
    x, t, e = unet_inputs(pipe.unet, batch=1, seed=3)
    klass = encode_prompt(pipe, "a dog")
    pre = ort.InferenceSession(str(root / "merged" / "dual" / fmt.PRECOMPUTE))
    kept = ort.InferenceSession(str(root / "merged" / "dual" / "kept.onnx"))
    (hidden,) = pre.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": klass.numpy()})
    (got,) = kept.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy(),
                             "hidden": hidden})
    with torch.no_grad():
        precompute = PrecomputeNet(pipe.unet, plan)
        with lora.adapters_disabled(precompute):
            ref_hidden = precompute(x, t, klass)
        want = HollowedNet(pipe.unet, plan)(x, t, e, ref_hidden).numpy()
    assert np.abs(hidden - ref_hidden.numpy()).max() <= 1e-4 * np.abs(ref_hidden.numpy()).max()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_diffusers_loads_the_merged_lora_file_with_its_alpha(merged):
    root, make, plan, lora_file = merged
    reference = _reference_unet(make, lora_file, plan)
    pipe = make()
    pipe.load_lora_weights(str(root / "merged"), weight_name=lora.LORA_FILE)  # diffusers' own loader
    x, t, e = unet_inputs(pipe.unet, batch=1, seed=4)
    with torch.no_grad():
        a = pipe.unet(x, t, e).sample
        b = reference.unet(x, t, e).sample
    assert plan.lora.lora_alpha != plan.lora.rank
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("merged", ["tiny"], indirect=True)
def test_optimum_pipeline_runs_the_single_path_export(merged):
    root, make, plan, _ = merged
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(root / "merged" / "single"))
    image = pipe("a sks dog", num_inference_steps=2, height=plan.resolution, width=plan.resolution).images[0]
    assert image.size == (plan.resolution, plan.resolution)


@pytest.mark.parametrize("merged", ["tiny"], indirect=True)
def test_ort_engine_matches_pytorch_engine(merged):
    root, make, plan, _ = merged
    from hollow_export.inference.generate import generate, generate_ort
    for path in ("single", "dual"):
        a = np.asarray(generate(make(), root / "merged", "a sks dog", path, steps=3), dtype=np.int16)
        b = np.asarray(generate_ort(root / "merged", "a sks dog", path, steps=3), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, path  # 8-bit pixels, float32 rounding


def test_foreign_or_tampered_lora_is_refused_and_nothing_written(merged, tmp_path):
    root, make, plan, lora_file = merged
    other = tmp_path / "other"
    shutil.copytree(root / "bundle", other)
    manifest = json.loads((other / fmt.MANIFEST).read_text())
    manifest["prompts"]["class"] = "a cat"
    (other / fmt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MergeError, match="trained from another bundle"):
        merge(make(), other, lora_file, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(lora_file))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    bad = tmp_path / "bad" / dexport.LORA_EXPORT
    bad.parent.mkdir()
    save_file(tensors, str(bad), metadata=metadata)
    _record_hash(bad)
    with pytest.raises(MergeError, match="of another shape"):
        merge(make(), root / "bundle", bad, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    shutil.copy(lora_file.with_name("lora.json"), bad.with_name("lora.json"))
    from hollow_export.store import StoreError
    with pytest.raises(StoreError, match="fails its sha256"):
        merge(make(), root / "bundle", bad, tmp_path / "out3")


def _record_hash(lora_file):
    """lora.json beside `lora_file` with its sha256 computed here (hashlib), as device export records it."""
    import hashlib
    digest = hashlib.sha256(lora_file.read_bytes()).hexdigest()
    lora_file.with_name("lora.json").write_text(json.dumps({"sha256": digest}))


@pytest.mark.parametrize("merged", ["tiny"], indirect=True)
def test_missing_garbage_or_hashless_lora_json_is_one_clear_refusal(merged, tmp_path):
    root, make, plan, lora_file = merged
    copy = tmp_path / "lora" / dexport.LORA_EXPORT
    copy.parent.mkdir()
    shutil.copy(lora_file, copy)
    record = copy.with_name("lora.json")
    cases = [(None, "is missing"), ("{not json", "not readable JSON"), (b"\xff\xfe", "not readable JSON"),
             ('{"tensors": 4}', "records no sha256"), ('["a"]', "records no sha256"),
             ('{"sha256": 12}', "records no sha256")]
    for content, message in cases:
        record.unlink(missing_ok=True)
        if isinstance(content, bytes):
            record.write_bytes(content)
        elif content is not None:
            record.write_text(content)
        with pytest.raises(MergeError, match=message):
            merge(make(), root / "bundle", copy, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merged", ["tiny"], indirect=True)
def test_non_finite_lora_is_refused(merged, tmp_path):
    root, make, plan, lora_file = merged
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata()
    for value in (float("nan"), float("inf")):
        tensors = load_file(str(lora_file))
        name = sorted(tensors)[1]
        tensors[name][0, 0] = value
        bad = tmp_path / str(value) / dexport.LORA_EXPORT
        bad.parent.mkdir()
        save_file(tensors, str(bad), metadata=metadata)
        _record_hash(bad)
        assert not torch.isfinite(load_file(str(bad))[name]).all()  # the bad value is really in the file
        with pytest.raises(MergeError, match="non-finite"):
            merge(make(), root / "bundle", bad, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merged", ["tiny"], indirect=True)
def test_merge_never_writes_over_inputs_and_replaces_its_output_only_when_asked(merged, tmp_path):
    root, make, plan, lora_file = merged
    from hollow_export.store import StoreError
    before = {p.name: p.read_bytes() for p in (root / "bundle").iterdir()}
    with pytest.raises(StoreError, match="not an earlier `merge` output"):
        merge(make(), root / "bundle", lora_file, root / "bundle")
    assert {p.name: p.read_bytes() for p in (root / "bundle").iterdir()} == before
    fmt.open_bundle(root / "bundle")  # still verifies
    with pytest.raises(StoreError, match="pass --overwrite"):
        merge(make(), root / "bundle", lora_file, root / "merged")
    from hollow_export.merge import merge_bundle
    with pytest.raises(StoreError, match="overlaps --bundle"):
        merge_bundle(root / "bundle", lora_file, root / "bundle" / "merged")
    assert not (root / "bundle" / "merged").exists()


@pytest.mark.parametrize("merged", ["tiny"], indirect=True)
def test_two_merges_of_one_lora_write_identical_bytes(merged, tmp_path):
    """Byte-for-byte, every file, against the fixture's merge of the same LoRA: the diffusers LoRA file
    (safetensors metadata sorted), the records, the class embedding, the copied precompute graph and every
    exported ONNX graph. Also: the CLI's filter drops diffusers' text-encoder warning, the very record the
    merge really logs."""
    import logging
    from hollow_export import cli

    root, make, plan, lora_file = merged
    logger = logging.getLogger("diffusers.loaders.lora_base")
    for f in [f for f in logger.filters if isinstance(f, cli._DropMessage)]:
        logger.removeFilter(f)  # start without the CLI's filter, to see the message really happens
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)  # a logger's own handlers see what passes its filters
    try:
        merge(make(), root / "bundle", lora_file, tmp_path / "a")
        warned = [r for r in seen if r.getMessage().startswith("No LoRA keys associated to CLIPTextModel")]
        assert warned, [r.getMessage() for r in seen]
        seen.clear()
        cli.quiet_known_noise()
        logger.handle(warned[0])  # the merge's own record, through the logger's filters again
        assert seen == []
    finally:
        logger.removeHandler(handler)

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    first, again = root / "merged", tmp_path / "a"
    assert files(first) == files(again)
    differ = [name for name in files(first) if (first / name).read_bytes() != (again / name).read_bytes()]
    assert lora.LORA_FILE in files(first) and "single/unet/model.onnx" in files(first)
    assert differ == []
