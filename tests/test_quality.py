"""Issue 14 on the embedded default: demo-photos --subject-seed, evaluate --judge toy, bench quality (smoke).

Expectations come from the toy world itself (its renders, their true contexts) and from the weights
(the base U-Net and the exported LoRA), never from the code under test. No timing is asserted.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hollow_export.cli import main
from hollow_export.toy import world

JUDGE = Path(__file__).resolve().parent.parent / "models" / "toy-judge"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _save(images, folder: Path, stem="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{stem}_{i}.png")
    return folder


def test_demo_photos_subject_seed_writes_the_worlds_photos_and_prints_the_prompts(tmp_path):
    out = tmp_path / "photos"
    result = _cli("demo-photos", "--subject-seed", 3, "--count", 4, "--out", out)
    assert result.exit_code == 0, result.output
    sub = world.subject(3)
    files = sorted(f for f in out.iterdir() if not f.name.startswith("."))  # store's hidden output marker aside
    assert [f.suffix for f in files] == [".png"] * 4  # photos only: a --images folder
    expected = [world.render(scene) for scene in world.subject_scenes(3, 4)]
    for path, pixels in zip(files, expected):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels), path.name
    assert f"'a sks {sub.cls}'" in result.output and f"'a {sub.cls}'" in result.output
    for context in sub.novel_contexts:
        assert f"'a sks {sub.cls} {world.CONTEXT_PHRASES[context]}'" in result.output
    # the same atomic rules as before: a second run needs --overwrite; the default count is 5
    assert _cli("demo-photos", "--subject-seed", 3, "--out", out).exit_code == 1
    assert _cli("demo-photos", "--subject-seed", 3, "--out", out, "--overwrite").exit_code == 0
    assert len([f for f in out.iterdir() if not f.name.startswith(".")]) == 5


def _toy_eval(tmp_path, name, generated, reference, prompts):
    gen = _save(generated, tmp_path / f"{name}_gen")
    (tmp_path / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / f"{name}.json"
    result = _cli("evaluate", "--judge", "toy", "--generated", gen, "--reference", reference,
                  "--prompts", tmp_path / f"{name}.txt", "--out", out)
    assert result.exit_code == 0, result.output
    assert "subject_object" in result.output
    return json.loads(out.read_text())


def test_evaluate_toy_judge_separates_subjects_and_reads_contexts(tmp_path):
    reference = _save(world.subject_photos(1, 5), tmp_path / "ref")
    sub1, sub2 = world.subject(1), world.subject(2)
    same = _toy_eval(tmp_path, "same", world.subject_photos(1, 6)[1:], reference, [sub1.instance_prompt] * 5)
    other = _toy_eval(tmp_path, "other", world.subject_photos(2, 5), reference, [sub2.instance_prompt] * 5)
    assert same["subject_object"] > other["subject_object"]
    assert same["subject_image"] > other["subject_image"]
    # the subject's colour is the world's own colour of subject 1; subject 2 has another one
    assert same["subject_look"] == {"colour": sub1.colour, "pattern": sub1.pattern}
    assert sub2.colour != sub1.colour
    assert same["subject_colour"] >= 0.8 and other["subject_colour"] <= 0.2, (same, other)
    assert same["judge"]["sha256"] == json.loads((JUDGE / "config.json").read_text())["sha256"]
    assert same["n_generated"] == 5 and same["n_reference"] == 5

    # renders of subject 2 in every context, prompted with the context each really shows, then a wrong one
    hit, miss = _in_every_context(tmp_path, 2, reference)
    assert hit["prompt_context"] >= 0.8 and miss["prompt_context"] <= 0.2, (hit, miss)
    assert hit["n_prompts_naming_context"] == 5
    assert hit["subject_in_context"] <= 0.2  # the right contexts, but not the reference photos' subject

    # subject 1 itself in every context: in the asked context only when the prompt asks for the one shown
    hit, miss = _in_every_context(tmp_path, 1, reference)
    assert hit["subject_in_context"] >= 0.8 and miss["subject_in_context"] <= 0.2, (hit, miss)
    assert hit["subject_colour"] >= 0.8 and miss["subject_colour"] >= 0.8


def _in_every_context(tmp_path, seed: int, reference):
    """The judge's scores of subject `seed` rendered in every context against `reference`: prompted with the
    context each render shows, and with the next one instead."""
    sub = world.subject(seed)
    scenes = [replace(world.subject_scenes(seed, 1)[0], context=c) for c in world.CONTEXTS]
    renders = [world.render(s) for s in scenes]
    right = [world.instance_prompt(sub.cls, s.context) for s in scenes]
    wrong = [world.instance_prompt(sub.cls, world.CONTEXTS[(world.CONTEXTS.index(s.context) + 1) % 5])
             for s in scenes]
    return (_toy_eval(tmp_path, f"right{seed}", renders, reference, right),
            _toy_eval(tmp_path, f"wrong{seed}", renders, reference, wrong))


def test_evaluate_judge_options_are_checked(tmp_path):
    base = ["evaluate", "--generated", tmp_path, "--reference", tmp_path, "--prompts", tmp_path / "p.txt"]
    assert _cli(*base, "--judge", "toy", "--clip", tmp_path).exit_code == 2
    result = _cli(*base)
    assert result.exit_code == 2 and "--clip and --dino" in result.output
    from hollow_export.evaluate import EvaluateError
    from hollow_export.toy.evaluate import load_judge
    bad = tmp_path / "judge"
    bad.mkdir()
    src = JUDGE
    (bad / "config.json").write_text((src / "config.json").read_text())
    weights = bytearray((src / "judge.safetensors").read_bytes())
    weights[-1] ^= 1
    (bad / "judge.safetensors").write_bytes(bytes(weights))
    with pytest.raises(EvaluateError, match="sha256"):
        load_judge(bad)


def test_bench_quality_smoke_every_method_and_the_device_lora_is_in_the_merged_unet(tmp_path):
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from hollow_export.bench.quality import METHODS, METRICS, quality
    from hollow_export.models.load import load_unet

    work, out = tmp_path / "work", tmp_path / "out"
    result = quality(subjects=[0], seeds=[0], steps=3, lr=1e-2, samples=4, photos=3, per_prompt=1,
                     denoise_steps=2, out=out, workdir=work, threads=2)
    saved = json.loads(Path(result["files"]["json"]).read_text())
    assert saved["methods"] == list(METHODS)
    for name in METHODS:
        for metric in METRICS:
            value = saved["table"][name][metric]["mean"]
            assert value is not None and math.isfinite(value), (name, metric)
    assert len(saved["cells"]) == len(METHODS)
    sheet = Image.open(result["files"]["sheet"])
    assert sheet.height == 128 * (1 + len(METHODS))  # reference photos, then one row per method
    assert Path(result["files"]["png"]).stat().st_size > 0

    # The device path's LoRA is really fused into the merged U-Net: pick one trained pair, fuse it by hand.
    lora = load_file(str(work / "subject0" / "hollowed_device" / "lora" / "lora.safetensors"))
    name = next(k for k in sorted(lora) if k.endswith("to_q.lora_B.weight") and np.abs(lora[k]).max() > 0)
    # the embedded default, which quality() personalized
    base = load_unet().state_dict()[name.replace(".lora_B.weight", ".weight")].numpy()
    fused = base + lora[name] @ lora[name.replace("lora_B", "lora_A")]  # alpha = rank: scale 1
    graph = onnx.load(str(work / "subject0" / "hollowed_device" / "merged" / "single" / "unet" / "model.onnx"))
    arrays = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    shaped = [a for a in arrays if a.shape in (base.shape, base.T.shape)]
    assert not any(np.array_equal(a, base) or np.array_equal(a, base.T) for a in shaped)
    assert any(np.allclose(a, fused, atol=1e-5) or np.allclose(a, fused.T, atol=1e-5) for a in shaped)
