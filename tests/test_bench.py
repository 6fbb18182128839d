"""Benchmarks (tiny only, fast): FLOPs against an independent counter, memory table, sweep, AI Hub with a fake client.

No timing is asserted anywhere: this machine is shared.
"""

import json
from pathlib import Path
import re
import subprocess
import threading
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hollow_export import aihub
from hollow_export.bench import cases, flops, memory, ort, sweep
from hollow_export.hollow.plan import LoraSpec, lora_param_count, make_plan, select_lora_targets
from hollow_export.hollow.split import HollowedNet
from hollow_export.models.load import load_unet

RANK = 4
PLAN = {"rank": RANK, "fraction": None, "depth": 3, "resolution": 128}


def _case(name):
    return next(c for c in cases.all_cases(RANK) if c.name == name)


def _stock_count(fn):
    """The stock FlopCounterMode on real tensors, attention forced onto SDPA's math path (two bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flops_match_the_stock_counter_on_real_tensors():
    unet = load_unet(arch="tiny")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        reference = _stock_count(lambda: unet(x, t, e))
    assert flops.case_flops("tiny", PLAN, _case("inference"))["step"] == reference
    assert flops.case_flops("tiny", PLAN, _case("inference"), device="meta")["step"] == reference
    # the CPU flash kernel is counted like SDPA: the patched counter agrees with the math path on real tensors
    with torch.no_grad(), flops.flop_counter() as counter:
        unet(x, t, e)
    assert counter.get_total_flops() == reference

    # a hollowed training step (forward + backward) on real tensors, stock counter
    plan = make_plan(unet, depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    net, _ = cases.build_case(unet, plan, _case("hollowed"))
    hidden, target = torch.randn(1, *plan.buffer_shape, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    stock = _stock_count(lambda: torch.nn.functional.mse_loss(net(x, t, e, hidden), target).backward())
    hollowed = flops.case_flops("tiny", PLAN, _case("hollowed"))
    assert hollowed["step"] == stock

    lora = flops.case_flops("tiny", PLAN, _case(f"lora_r{RANK}"))
    full = flops.case_flops("tiny", PLAN, _case("full_ft"))
    collection = flops.case_flops("tiny", PLAN, _case("collection"))
    ckpt = flops.case_flops("tiny", PLAN, _case("hollowed_ckpt"))
    assert hollowed["step"] < lora["step"] < full["step"]
    assert collection["backward"] == 0 and collection["step"] < reference
    assert ckpt["step"] > hollowed["step"]  # recomputation costs forward FLOPs again


def test_lora_params_match_the_analytic_counts_and_the_paper():
    unet = load_unet(arch="tiny")
    plan = make_plan(unet, depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    net, trainable = cases.build_case(unet, plan, _case("hollowed"))
    assert sum(p.numel() for p in trainable) == lora_param_count(unet, plan.lora_targets, RANK) == plan.lora_params
    lora_net, trainable = cases.build_case(load_unet(arch="tiny"), plan, _case(f"lora_r{RANK}"))
    spec = LoraSpec(rank=RANK)
    assert sum(p.numel() for p in trainable) == lora_param_count(unet, select_lora_targets(unet, spec), RANK)
    # SD2.1 (meta device): the paper's 207K at r=1 and 27M at r=128
    for rank, expected in ((1, 207_488), (128, 26_558_464)):
        sd21 = load_unet(arch="sd21", meta=True)
        p = cases.bench_plan(sd21, rank, None, 3, 512)
        _, trainable = cases.build_case(sd21, p, cases.Case("l", "lora", "l", rank=rank), device="meta")
        assert sum(x.numel() for x in trainable) == expected


def test_recompute_and_precision_variants_stay_close_to_fp32():
    unet = load_unet(arch="tiny")
    plan = make_plan(unet, depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    items = cases.step_inputs_for("tiny", plan, 1)

    def step(case, rounded_to=None):
        data = [dict(items[0])]
        net, trainable = cases.build_case(load_unet(arch="tiny"), plan, case, "cpu", data)
        if rounded_to is not None:  # the reference: an fp32 net whose frozen weights went through `rounded_to`
            for param in net.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(rounded_to).float()
        frozen = {param.dtype for param in net.parameters() if not param.requires_grad}
        optimizer = torch.optim.SGD(trainable, lr=0.0)
        loss, _ = cases.run_step(net, case, data[0], optimizer, "cpu")
        grads = torch.cat([p.grad.flatten() for p in trainable])
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        return loss, grads, names, frozen

    ref_loss, ref_grad, ref_names, _ = step(_case("hollowed"))
    loss, grad, names, _ = step(_case("hollowed_ckpt"))
    assert names == ref_names  # recomputation keeps every parameter name
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss) and torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        # on CPU the frozen weights are stored in low precision and computed in fp32: exactly an fp32 step
        # over weights rounded to that precision, for the plain and the recomputing net alike
        rounded_loss, rounded_grad, _, _ = step(_case("hollowed"), rounded_to=torch_dtype)
        for name in (f"hollowed_{dtype}", f"hollowed_{dtype}_ckpt"):
            loss, grad, names, frozen = step(_case(name))
            assert frozen == {torch_dtype} and names == ref_names
            assert abs(loss - rounded_loss) <= 1e-6 * abs(rounded_loss)
            assert torch.allclose(grad, rounded_grad, rtol=1e-4, atol=1e-8)
            assert abs(loss - ref_loss) <= 2e-2 * abs(ref_loss)
            assert float((grad - ref_grad).norm() / ref_grad.norm()) < 0.2


def test_step_fused_into_the_backward_equals_torch_adamw():
    """The fused-step row trains exactly like one torch.optim.AdamW over all LoRA tensors."""
    unet = load_unet(arch="tiny")
    plan = make_plan(unet, depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    items = cases.step_inputs_for("tiny", plan, 3)
    trained = {}
    for name in ("hollowed", "hollowed_ckpt_fused"):
        case = _case(name)
        data = [dict(item) for item in items]
        torch.manual_seed(0)  # same LoRA initialisation
        net, trainable = cases.build_case(load_unet(arch="tiny"), plan, case, "cpu", data)
        optimizer = cases.make_optimizer(case, trainable, lr=1e-2)
        if name == "hollowed":
            assert type(optimizer) is torch.optim.AdamW
            with torch.no_grad():  # B starts at zero: give it values so every tensor gets a real gradient
                for param in trainable:
                    param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
            start = [param.detach().clone() for param in trainable]
        else:
            assert optimizer is None
            with torch.no_grad():
                for param, value in zip(trainable, start):
                    param.copy_(value)
        losses = [cases.run_step(net, case, item, optimizer, "cpu")[0] for item in data]
        if name != "hollowed":
            assert all(param.grad is None for param in trainable)  # applied and freed inside the backward
        trained[name] = (losses, [param.detach().clone() for param in trainable])
    (ref_losses, ref), (losses, fused) = trained["hollowed"], trained["hollowed_ckpt_fused"]
    assert np.allclose(losses, ref_losses, rtol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(ref, start))  # the steps moved every tensor
    for a, b in zip(fused, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_memory_table_on_tiny(tmp_path):
    result = memory.memory_table(arch="tiny", rank=RANK, depth=3, steps=2, cases=["inference", "hollowed"],
                                  out=tmp_path, log=lambda *_: None)
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"inference", "hollowed"}
    plan = make_plan(load_unet(arch="tiny", meta=True), depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    assert rows["inference"]["base_params"] == plan.unet_params
    assert rows["hollowed"]["base_params"] == plan.kept_params
    assert rows["hollowed"]["lora_params"] == rows["hollowed"]["lora_params_analytic"] == plan.lora_params
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert 0 < r["held_bytes"] and 0 < r["peak_bytes"]
        assert r["peak_abs_bytes"] >= r["baseline_rss_bytes"] + r["peak_bytes"] - 1  # consistent bookkeeping
    assert rows["inference"]["peak_vs_inference"] == 1.0
    assert rows["hollowed"]["peak_vs_inference"] == rows["hollowed"]["peak_bytes"] / rows["inference"]["peak_bytes"]
    assert len(rows["hollowed"]["losses"]) == 2 and all(np.isfinite(rows["hollowed"]["losses"]))
    files = result["files"]
    saved = json.loads(open(files["json"]).read())
    assert saved["settings"]["arch"] == "tiny" and saved["settings"]["torch"] == torch.__version__
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = memory.memory_text(result)
    for word in ("tiny", "resolution: 128", "inference", "hollowed", "peak GB", "date"):
        assert word in text

    # --merge adds cases to the result measured before with the same settings, and refuses other settings
    merged = memory.memory_table(arch="tiny", rank=RANK, depth=3, steps=2, cases=["collection"], measure=False,
                                  out=tmp_path, merge=True, log=lambda *_: None)
    assert [r["case"] for r in merged["rows"]] == ["inference", "hollowed", "collection"]
    assert merged["rows"][1]["peak_bytes"] == rows["hollowed"]["peak_bytes"]
    with pytest.raises(cases.BenchError, match="other settings"):
        memory.memory_table(arch="tiny", rank=RANK, depth=3, steps=3, cases=["collection"], measure=False,
                             out=tmp_path, merge=True, log=lambda *_: None)

    # --merge also takes up the rows of an interrupted run (its .partial.json, which holds no fidelity):
    # such a row gets its loss difference against its reference's losses, then the partial file is gone
    stem = Path(files["json"]).stem
    h = rows["hollowed"]
    bf16 = {**h, "case": "hollowed_bf16", "dtype": "bf16", "losses": [h["losses"][0] * 1.01, h["losses"][1] * 0.97]}
    partial = tmp_path / f"{stem}.partial.json"
    partial.write_text(json.dumps({"kind": "memory", "partial": True, "settings": saved["settings"], "rows": [bf16]}))

    def interrupt_at_lora_r1(line):
        if line.startswith("[lora_r1]"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # a merge run interrupted in turn keeps every row in its partial file
        memory.memory_table(arch="tiny", rank=RANK, depth=3, steps=2, cases=["collection", "lora_r1"],
                            measure=False, out=tmp_path, merge=True, log=interrupt_at_lora_r1)
    again = json.loads(partial.read_text())
    assert {r["case"] for r in again["rows"]} == {"inference", "hollowed", "collection", "hollowed_bf16"}
    assert saved["settings"]["date"] in again["settings"]["merged_from"]
    resumed = memory.memory_table(arch="tiny", rank=RANK, depth=3, steps=2, cases=["collection"], measure=False,
                                  out=tmp_path, merge=True, log=lambda *_: None)
    by = {r["case"]: r for r in resumed["rows"]}
    assert set(by) == {"inference", "hollowed", "collection", "hollowed_bf16"}
    assert by["hollowed_bf16"]["fidelity"]["reference"] == "hollowed"
    assert by["hollowed_bf16"]["fidelity"]["loss_rel_diff"] == pytest.approx(0.03, rel=1e-6)
    assert "update_rel_diff" not in by["hollowed_bf16"]["fidelity"] and not partial.exists()
    partial.write_text(json.dumps({"kind": "memory", "partial": True, "rows": [bf16],
                                   "settings": {**saved["settings"], "resolution": 64}}))
    with pytest.raises(cases.BenchError, match="partial.json was measured with other settings"):
        memory.memory_table(arch="tiny", rank=RANK, depth=3, steps=2, cases=["collection"], measure=False,
                             out=tmp_path, merge=True, log=lambda *_: None)

    # every row's structure, FLOPs only (no processes)
    flops_only = memory.memory_table(arch="tiny", rank=RANK, depth=3, measure=False, log=lambda *_: None)
    names = [r["case"] for r in flops_only["rows"]]
    assert names == [c.name for c in cases.all_cases(RANK)]
    assert all(r["flops"]["step"] > 0 and "peak_bytes" not in r for r in flops_only["rows"])
    assert flops_only["dual_path_flops"] > rows["inference"]["flops"]["step"]


def test_sweep_on_tiny_writes_json_and_png(tmp_path):
    result = sweep.sweep(arch="tiny", steps=2, samples=2, measure=False, depths=[0, 3, 11], out=tmp_path,
                           log=lambda *_: None)
    rows = result["rows"]
    assert [r["depth"] for r in rows] == [0, 3, 11]
    fractions = [r["hollowed_fraction"] for r in rows]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] < 1
    step_flops = [r["flops"]["step"] for r in rows]
    assert step_flops == sorted(step_flops, reverse=True)
    assert step_flops[0] < result["references"]["lora"]["flops"]["step"]
    assert all(len(r["loss"]["losses"]) == 2 and np.isfinite(r["loss"]["fixed_batch_loss_after"]) for r in rows)
    assert json.loads(open(result["files"]["json"]).read())["kind"] == "sweep"
    assert open(result["files"]["png"], "rb").read(4) == b"\x89PNG"
    assert "depth 11" in sweep.sweep_text(result)


def _mapped_files(pid: int) -> set:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except (FileNotFoundError, ProcessLookupError):
        return set()


def _watch_bench_children(monkeypatch) -> dict:
    """Run the bench's children unchanged, reading the files each one maps from OUTSIDE it
    (/proc/PID/maps, polled while it runs). Returns {job: [mapped paths of each child]}."""
    seen = {}
    real_run = subprocess.run

    def run(cmd, **kw):
        if "hollow_export.bench.child" not in cmd:
            return real_run(cmd, **kw)
        spec_path = cmd[-2]
        job = json.loads(open(spec_path).read())["job"]
        proc = subprocess.Popen(cmd, env=kw.get("env"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mapped = set()

        def poll():
            while proc.poll() is None:
                mapped.update(_mapped_files(proc.pid))
                time.sleep(0.02)
        watcher = threading.Thread(target=poll)
        watcher.start()
        out, err = proc.communicate(timeout=kw.get("timeout"))
        watcher.join()
        seen.setdefault(job, []).append(mapped)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    monkeypatch.setattr(subprocess, "run", run)
    return seen


def _torch_libraries(mapped: set) -> set:
    return {p for p in mapped if re.search(r"/torch/|libtorch|libc10", p)}


@pytest.fixture(scope="module")
def tiny_ort(tmp_path_factory):
    """One `bench ort` run of the default rows on tiny, two rounds, its children watched from outside
    (`_watch_bench_children`), into a --workdir that does not exist yet. Returns (result, seen, log lines)."""
    tmp, lines = tmp_path_factory.mktemp("ort"), []
    with pytest.MonkeyPatch.context() as patch:
        seen = _watch_bench_children(patch)
        result = ort.ort_bench(arch="tiny", resolution=64, rank=RANK, depth=3, steps=2, threads=2, out=tmp,
                               workdir=tmp / "work" / "new", rounds=2, log=lines.append)
    return result, seen, lines


def test_ort_bench_on_tiny_trains_each_bundle_without_torch(tiny_ort):
    result, seen, _ = tiny_ort
    rows = {r["kind"]: r for r in result["rows"]}
    assert list(rows) == ["hollowed", "lora", "inference"]
    # torch-freedom of the measured processes, seen from outside: each mapped ONNX Runtime's library and no
    # torch library (so its RSS holds none). The check can fail: the building children, which use torch,
    # map it, and so does a measuring child without its blocker, since `import onnxruntime` (1.19.2
    # training wheel) imports torch itself when it is installed.
    assert len(seen["ort_measure"]) == 3 * 2 and len(seen["ort_build"]) == 3  # two rounds, one build each
    for mapped in seen["ort_measure"]:
        assert any("onnxruntime_pybind11_state" in p for p in mapped), sorted(mapped)[:20]
        assert not _torch_libraries(mapped), _torch_libraries(mapped)
    assert all(_torch_libraries(mapped) for mapped in seen["ort_build"])
    for kind, r in rows.items():
        assert "error" not in r, r.get("error")
        assert 0 < r["held_rss_bytes"] <= r["peak_rss_bytes"] and len(r["step_seconds"]) == 2
    for kind in ("hollowed", "lora"):
        assert len(rows[kind]["losses"]) == 2 and np.all(np.isfinite(rows[kind]["losses"]))
    # the hollowed training graph takes the buffered state; the plain-LoRA one runs the whole U-Net
    assert "hidden" in rows["hollowed"]["inputs"] and "hidden" not in rows["lora"]["inputs"]
    ratio = result["ratios"]["hollowed/lora"]["peak_rss"]
    assert ratio == rows["hollowed"]["peak_rss_bytes"] / rows["lora"]["peak_rss_bytes"]
    assert open(result["files"]["png"], "rb").read(4) == b"\x89PNG"
    assert "hollowed/lora" in ort.ort_text(result)


def test_ort_rounds_measure_the_rows_round_robin_from_one_build_each(tiny_ort, tmp_path):
    result, _, lines = tiny_ort
    builds = [line.split("]")[0] for line in lines if "building" in line]
    measures = [line.split(" ...")[0] for line in lines if "measuring" in line]
    assert builds == ["[hollowed", "[lora", "[inference"]  # each folder built once, all before the second round
    assert measures == [f"[{kind}] measuring in a fresh process (round {n} of 2)"
                        for n in (1, 2) for kind in ("hollowed", "lora", "inference")]
    assert result["settings"]["rounds"] == 2
    for row in result["rows"]:
        assert "error" not in row, row.get("error")
        rounds = row["rounds"]
        assert len(rounds) == 2
        assert row["median_step_seconds"] == pytest.approx(np.median([r["median_step_seconds"] for r in rounds]))
        assert row["peak_rss_bytes"] == max(r["peak_rss_bytes"] for r in rounds)
    with pytest.raises(ort.BenchError, match="--rounds"):
        ort.ort_bench(arch="tiny", resolution=64, rank=RANK, depth=3, steps=2, out=tmp_path, rounds=0)


def test_ort_ablation_shares_builds_and_measures_each_lever_against_its_baseline(tmp_path):
    result = ort.ort_bench(arch="tiny", resolution=64, rank=RANK, depth=3, steps=2, threads=2, out=tmp_path,
                           kinds=("baseline", "session", "all_fp16", "inference_default", "inference_unknown_batch"),
                           log=lambda *_: None)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "session", "all_fp16", "inference_default", "inference_unknown_batch"]
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["torch_loaded"] is False
        assert r["held_rss_bytes"] <= r["load_peak_rss_bytes"] <= r["peak_rss_bytes"]
        assert 0 < r["step_peak_rss_bytes"] <= r["peak_rss_bytes"]
    # one build serves both rows of the lever-free bundle: the same child's figures
    assert rows["session"]["build_seconds"] == rows["baseline"]["build_seconds"]
    assert rows["session"]["files_bytes"] == rows["baseline"]["files_bytes"]
    # session settings change where memory comes from, not the math: same losses and LoRA, bit for bit
    assert rows["session"]["loss_rel_diff"] == 0 and rows["session"]["lora_update_rel_diff"] == 0
    # fp16 frozen weights: the training math moves only by fp16 rounding of the weights
    assert 0 < rows["all_fp16"]["loss_rel_diff"] < 1e-2 and 0 < rows["all_fp16"]["lora_update_rel_diff"] < 0.5
    # the unknown-batch inference graph (its own build) computes the same U-Net output
    assert rows["inference_unknown_batch"]["build_seconds"] != rows["inference_default"]["build_seconds"]
    assert rows["inference_unknown_batch"]["output_rel_diff"] < 1e-6
    # the lever-free checkpoint holds every kept base weight (fp32); the levered one LoRA + state only, and the
    # kept weights sit once in the bundle as fp16: sizes against the plan's own parameter counts
    unet = load_unet(arch="tiny")
    plan = make_plan(unet, depth=3, lora=LoraSpec(rank=RANK), resolution=64)
    tensors = len(list(HollowedNet(unet, plan).parameters()))
    assert rows["baseline"]["checkpoint_bytes"] >= 4 * plan.kept_params
    assert rows["all_fp16"]["checkpoint_bytes"] < 4 * plan.kept_params
    frozen = [n for n in rows["all_fp16"]["files_bytes"] if n not in rows["baseline"]["files_bytes"]]
    assert len(frozen) == 1  # one external file, each weight padded to at most a page
    assert 2 * plan.kept_params <= rows["all_fp16"]["files_bytes"][frozen[0]] < 2 * plan.kept_params + 4096 * tensors
    assert "all_fp16" in ort.ort_text(result) and open(result["files"]["png"], "rb").read(4) == b"\x89PNG"


# ---------------------------------------------------------------- AI Hub

def _graph(path, inputs, external=None):
    nodes, inits = [], []
    first = inputs[0][0]
    if external:
        w = onnx.numpy_helper.from_array(np.ones(4096, np.float32), "w")
        inits.append(w)
        nodes.append(helper.make_node("ReduceSum", ["w"], ["wsum"], keepdims=0))
        nodes.append(helper.make_node("Add", [first, "wsum"], ["out"]))
    else:
        nodes.append(helper.make_node("Identity", [first], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, d, s) for n, d, s in inputs],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=external, size_threshold=0)
    else:
        onnx.save(model, str(path))


@pytest.fixture()
def fake_bundle(tmp_path):
    """A bundle folder with the real manifest format and stand-in inference graphs of the right signatures."""
    from hollow_export import bundle as fmt
    plan = make_plan(load_unet(arch="tiny", meta=True), depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    folder = tmp_path / "bundle"
    folder.mkdir()
    _graph(folder / fmt.VAE_ENCODER, [("image", TensorProto.FLOAT, ["batch", 3, 128, 128])])
    _graph(folder / fmt.PRECOMPUTE, [("sample", TensorProto.FLOAT, ["batch", 4, 16, 16]),
                                     ("timestep", TensorProto.INT64, ["batch"]),
                                     ("encoder_hidden_states", TensorProto.FLOAT, ["batch", 77, 32])])
    manifest = fmt.make_manifest(folder, {"source": "tiny"}, plan.to_json(), {}, [], 0, {"resolution": 128}, {})
    fmt.write_manifest(folder, manifest)
    unet = tmp_path / "single" / "unet"
    unet.mkdir(parents=True)
    _graph(unet / "model.onnx", [("sample", TensorProto.FLOAT, ["batch", 4, "h", "w"]),
                                 ("timestep", TensorProto.INT64, [1]),
                                 ("encoder_hidden_states", TensorProto.FLOAT, ["batch", "tokens", 32])],
           external="model.onnx_data")
    return folder, tmp_path / "single"


class FakeStatus:
    def __init__(self, ok, message=None):
        self.success, self.code, self.message = ok, "SUCCESS" if ok else "FAILED", message


class FakeJob:
    def __init__(self, client, kind, ok=True, **kw):
        client.counter += 1
        self.job_id, self.url = f"j{client.counter}", f"https://aihub.example/jobs/j{client.counter}/"
        self.kind, self.ok, self.kw = kind, ok, kw

    def wait(self, timeout=None):
        return FakeStatus(self.ok, None if self.ok else "Failed to compile: unsupported op")

    def get_target_model(self):
        return f"target-of-{self.kw['name']}" if self.ok else None

    def download_profile(self):
        return {"execution_summary": {"estimated_inference_time": 12345, "inference_memory_peak_range": (2**20, 3 * 2**20),
                                      "first_load_time": 456000, "estimated_inference_peak_memory": 3 * 2**20},
                "execution_detail": [{"compute_unit": "NPU"}] * 3 + [{"compute_unit": "CPU"}]}


class FakeClient:
    """The network boundary: the same method names as qai_hub.Client, answering from memory."""

    def __init__(self, fail_compile=()):
        self.counter, self.calls, self.fail_compile = 0, [], set(fail_compile)

    def get_devices(self, name="", os="", attributes=()):
        self.calls.append(("get_devices", name))
        return [object()] if name == "Samsung Galaxy S24 (Family)" else []

    def submit_compile_job(self, model, device, name=None, input_specs=None, options="", **kw):
        from pathlib import Path
        source = Path(model)
        files = sorted(p.name for p in source.iterdir()) if source.is_dir() else [source.name]
        self.calls.append(("compile", name, files, input_specs, options, device.name))
        return FakeJob(self, "compile", ok=not any(f in name for f in self.fail_compile), name=name)

    def submit_inference_job(self, model, device, inputs=None, name=None, options="", profile=True, **kw):
        self.calls.append(("profile", model, profile, inputs))
        return FakeJob(self, "profile", name=name)


def test_aihub_profile_with_a_fake_client(fake_bundle, tmp_path):
    bundle, merged = fake_bundle
    client = FakeClient()
    result = aihub.profile_bundle(bundle, "Samsung Galaxy S24 (Family)", "qnn_context_binary", merged_unet=merged,
                                  client=client, out=tmp_path / "out", log=lambda *_: None)
    rows = {r["graph"]: r for r in result["rows"]}
    assert list(rows) == ["vae_encoder", "precompute", "merged_unet"]
    for r in rows.values():
        assert r["status"] == "ok"
        assert r["estimated_inference_ms"] == pytest.approx(12.345)
        assert r["peak_memory_mb_range"] == [1.0, 3.0] and r["first_load_ms"] == 456.0
        assert r["compute_units"] == {"NPU": 3, "CPU": 1}
    compiles = [c for c in client.calls if c[0] == "compile"]
    specs = {c[1]: c[3] for c in compiles}
    assert specs["hollow-export precompute"] == {"sample": ((1, 4, 16, 16), "float32"), "timestep": ((1,), "int64"),
                                                 "encoder_hidden_states": ((1, 77, 32), "float32")}
    assert specs["hollow-export vae_encoder"] == {"image": ((1, 3, 128, 128), "float32")}
    assert specs["hollow-export merged_unet"]["sample"] == ((1, 4, 16, 16), "float32")
    assert all(c[4] == "--target_runtime qnn_context_binary" and c[5] == "Samsung Galaxy S24 (Family)"
               for c in compiles)
    # external weights travel as the folder AI Hub accepts: one .onnx and one .data file
    assert next(c[2] for c in compiles if c[1].endswith("merged_unet")) == ["model.data", "model.onnx"]
    assert all(c[1].startswith("target-of-") and c[2] is True and c[3] is None
               for c in client.calls if c[0] == "profile")
    text = aihub.profile_text(result)
    assert "12.35" in text and "1.0-3.0" in text and "NPU (3)" in text and "Samsung Galaxy S24" in text
    assert json.loads((tmp_path / "out" / "aihub_profile.json").read_text())["rows"][1]["graph"] == "precompute"

    failing = aihub.profile_bundle(bundle, "Samsung Galaxy S24 (Family)", "onnx",
                                   client=FakeClient(fail_compile=["vae_encoder"]), log=lambda *_: None)
    assert failing["rows"][0]["status"].startswith("compile failed") and "unsupported op" in failing["rows"][0]["status"]
    assert failing["rows"][1]["status"] == "ok"
    with pytest.raises(aihub.AIHubError, match="list-devices"):
        aihub.profile_bundle(bundle, "No Such Phone", client=FakeClient(), log=lambda *_: None)
    with pytest.raises(aihub.AIHubError, match="target-runtime"):
        aihub.profile_bundle(bundle, "Samsung Galaxy S24 (Family)", "coreml", client=FakeClient())


def test_aihub_without_a_token_says_how_to_configure(fake_bundle, tmp_path, monkeypatch):
    bundle, _ = fake_bundle
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing" / "client.ini"))
    with pytest.raises(aihub.AIHubError) as err:
        aihub.profile_bundle(bundle, "Samsung Galaxy S24 (Family)", log=lambda *_: None)
    message = str(err.value)
    assert "qai-hub configure --api_token" in message and "client.ini" in message
    assert issubclass(aihub.AIHubError, aihub.HollowError)


def test_cli_profile_without_a_token_exits_1_and_bench_writes_json_and_png(fake_bundle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hollow_export.cli import main
    bundle, _ = fake_bundle
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing" / "client.ini"))
    run = CliRunner().invoke(main, ["profile", "--bundle", str(bundle), "--out", str(tmp_path / "aihub")])
    assert run.exit_code == 1 and "qai-hub configure --api_token" in run.output
    assert not (tmp_path / "aihub").exists()

    out = tmp_path / "bench"
    run = CliRunner().invoke(main, ["bench", "memory", "--arch", "tiny", "--rank", "4", "--depth", "3",
                                    "--no-measure", "--cases", "inference,hollowed", "--out", str(out)])
    assert run.exit_code == 0, run.output
    stem = out / "memory_tiny_cpu_128px_r4_k3"
    rows = {r["case"]: r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    plan = make_plan(load_unet(arch="tiny", meta=True), depth=3, lora=LoraSpec(rank=RANK), resolution=128)
    assert rows["hollowed"]["base_params_analytic"] == plan.kept_params
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = CliRunner().invoke(main, ["bench", "memory", "--cases", "no_such_case", "--out", str(out)])
    assert run.exit_code == 1 and "unknown case" in run.output


def test_floor_bench_on_tiny_resumes_after_the_sides_already_measured(tiny_ort, tmp_path, monkeypatch):
    """The floor's rows, `all_fp32` and `lora_all`, are the default rows `hollowed` and `lora` by another name
    (the same build settings and session): the tiny run measured them already, so each side is given them."""
    from hollow_export.bench import ort_floor
    from hollow_export.export.build import BuildSettings

    assert BuildSettings() == BuildSettings(**ort.ALL_FP32) and ort.ROWS["hollowed"].build is None
    for default, floor in (("hollowed", "all_fp32"), ("lora", "lora_all")):
        assert ort.ROWS[default].session == ort.ROWS[floor].session
    renamed = {"hollowed": "all_fp32", "lora": "lora_all"}
    measured = {**tiny_ort[0], "rows": [{**r, "name": renamed[r["kind"]]} for r in tiny_ort[0]["rows"]
                                        if r["kind"] in renamed]}
    calls = []

    def interrupted(**kwargs):
        calls.append(kwargs["resolution"])
        assert kwargs["kinds"] == ("all_fp32", "lora_all") and kwargs["depth"] == 3 and kwargs["rank"] == RANK
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run during the second side
        return measured

    monkeypatch.setattr(ort_floor, "ort_bench", interrupted)
    quiet = {"arch": "tiny", "resolutions": (64, 128), "rank": RANK, "depth": 3, "steps": 2, "threads": 2,
             "out": tmp_path, "log": lambda *_: None}
    with pytest.raises(KeyboardInterrupt):
        ort_floor.floor_bench(**quiet)
    assert calls == [64, 128] and (tmp_path / "ort_floor_tiny_r4_k3.partial.json").exists()
    calls.clear()
    result = ort_floor.floor_bench(**quiet)
    assert calls == [128]  # the finished side was kept
    assert not (tmp_path / "ort_floor_tiny_r4_k3.partial.json").exists()
    kept = make_plan(load_unet(arch="tiny", meta=True), depth=3, lora=LoraSpec(rank=RANK)).kept_params
    for side in result["sides"]:
        rows = {r["name"]: r for r in side["rows"]}
        h, lora = rows["all_fp32"]["peak_rss_bytes"], rows["lora_all"]["peak_rss_bytes"]
        assert side["ratio"] == h / lora and side["saved_bytes"] == lora - h
        frozen = rows["all_fp32"]["files_bytes"]["frozen_weights.bin"]
        assert 4 * kept <= frozen <= 4 * kept + 4096 * 600  # the kept fp32 weights, page-aligned
        assert 0 < side["floor_hollowed_bytes"] < h and 0 < side["floor_lora_bytes"] < lora
    assert [s["resolution"] for s in result["sides"]] == [64, 128]
    assert open(result["files"]["png"], "rb").read(4) == b"\x89PNG" and "floor" in ort_floor.floor_text(result)
