"""DreamBooth metrics: the cosine math by hand, and evaluate() end to end on tiny random-weight models."""

import json
import math

import numpy as np
import pytest
import torch

from hollow_export import evaluate as ev
from hollow_export.models.load import _clip_byte_tokenizer

# ---------------------------------------------------------------- metric math


def test_pairwise_mean_cosine_matches_hand_computation():
    a = [[1.0, 0.0], [0.0, 2.0]]
    b = [[3.0, 4.0], [-1.0, 0.0], [1.0, 1.0]]
    # cosines by hand: row (1,0) vs (3,4),(-1,0),(1,1): 3/5, -1, 1/sqrt2; row (0,2): 4/5, 0, 1/sqrt2
    expected = (0.6 - 1.0 + 1 / math.sqrt(2) + 0.8 + 0.0 + 1 / math.sqrt(2)) / 6
    assert ev.pairwise_mean_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert ev.pairwise_mean_cosine(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, abs=1e-6)
    # scale invariance and symmetry of the all-pairs mean
    assert ev.pairwise_mean_cosine(np.array(a) * 7, np.array(b) * 0.1) == pytest.approx(expected, abs=1e-12)
    assert ev.pairwise_mean_cosine(b, a) == pytest.approx(expected, abs=1e-12)


def test_paired_mean_cosine_matches_hand_computation():
    a = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    b = [[3.0, 4.0], [5.0, 0.0], [-2.0, -2.0]]
    expected = (0.6 + 0.0 - 1.0) / 3  # row-wise pairs only, not all pairs
    assert ev.paired_mean_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert ev.pairwise_mean_cosine(a, b) != pytest.approx(expected)


def test_cosine_math_refuses_bad_inputs():
    with pytest.raises(ev.EvaluateError, match="dim"):
        ev.pairwise_mean_cosine([[1.0, 0.0]], [[1.0, 0.0, 0.0]])
    with pytest.raises(ev.EvaluateError, match="equal shapes"):
        ev.paired_mean_cosine([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ev.EvaluateError, match="all-zero"):
        ev.pairwise_mean_cosine([[0.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(ev.EvaluateError, match="non-empty"):
        ev.pairwise_mean_cosine(np.zeros((0, 2)), [[1.0, 0.0]])


# ---------------------------------------------------------------- tiny models on disk


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config,
                              Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("eval-models")
    torch.manual_seed(0)
    clip = root / "clip"
    tokenizer = _clip_byte_tokenizer(clip)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)

    vit = root / "dino-vit"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2)).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)

    dinov2 = root / "dinov2"
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, mlp_ratio=2, num_hidden_layers=2,
                             num_attention_heads=2)).save_pretrained(dinov2)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dinov2)
    return {"clip": clip, "vit": vit, "dinov2": dinov2}


def _write_images(folder, names, seed, side=40):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / name)
    return [folder / n for n in names]


@pytest.fixture()
def image_sets(tmp_path):
    # natural order: img_2 before img_10 (plain sorting would swap them)
    generated = _write_images(tmp_path / "gen", ["img_2.png", "img_10.png", "img_1.png"], seed=1)
    reference = _write_images(tmp_path / "ref", ["r0.png", "r1.jpg"], seed=2)
    return tmp_path, generated, reference


def _cos(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


@torch.no_grad()
def _independent(models, dino_key, generated, reference, prompts):
    """DINO / CLIP-I / CLIP-T recomputed one image and one prompt at a time, straight from the models."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    def rgb(p):
        return Image.open(p).convert("RGB")

    dino = AutoModel.from_pretrained(models[dino_key], local_files_only=True).eval()
    dproc = AutoImageProcessor.from_pretrained(models[dino_key], local_files_only=True)
    clip = CLIPModel.from_pretrained(models["clip"], local_files_only=True).eval()
    cproc = CLIPImageProcessor.from_pretrained(models["clip"], local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(models["clip"], local_files_only=True)

    def d(p):
        return dino(pixel_values=dproc(images=rgb(p), return_tensors="pt").pixel_values).last_hidden_state[0, 0]

    def ci(p):
        return clip.get_image_features(pixel_values=cproc(images=rgb(p), return_tensors="pt").pixel_values)[0]

    def ct(text):
        return clip.get_text_features(input_ids=tok(text, return_tensors="pt").input_ids)[0]

    dg, dr = [d(p) for p in generated], [d(p) for p in reference]
    cg, cr = [ci(p) for p in generated], [ci(p) for p in reference]
    return {
        "dino": np.mean([_cos(g, r) for g in dg for r in dr]),
        "clip_i": np.mean([_cos(g, r) for g in cg for r in cr]),
        "clip_t": np.mean([_cos(g, ct(text)) for g, text in zip(cg, prompts)]),
    }


@pytest.mark.parametrize("dino_key", ["vit", "dinov2"])
def test_evaluate_matches_independent_recomputation(tiny_models, image_sets, dino_key):
    root, generated, reference = image_sets
    prompts = {"img_10.png": "a sks dog on the beach", "img_1.png": "a photo of a sks dog",
               "img_2.png": "a sks dog in a bucket"}
    prompts_file = root / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))

    result = ev.evaluate(root / "gen", root / "ref", prompts_file, tiny_models["clip"], tiny_models[dino_key],
                         batch_size=2, device="cpu", progress=False)
    expected = _independent(tiny_models, dino_key, generated, reference, [prompts[p.name] for p in generated])

    assert result["n_generated"] == 3 and result["n_reference"] == 2
    assert result["settings"]["dino_model_type"] == dino_key
    for key in ("dino", "clip_i", "clip_t"):
        assert math.isfinite(result[key]) and -1.0 <= result[key] <= 1.0
        assert result[key] == pytest.approx(expected[key], abs=1e-5), key
    assert [r["file"] for r in result["per_image"]] == ["img_1.png", "img_2.png", "img_10.png"]
    assert np.mean([r["clip_t"] for r in result["per_image"]]) == pytest.approx(result["clip_t"], abs=1e-12)

    # the same prompts as a text file, one per line in natural file-name order, give the same numbers
    lines = root / "prompts.txt"
    lines.write_text("\n".join(prompts[n] for n in ["img_1.png", "img_2.png", "img_10.png"]) + "\n\n")
    again = ev.evaluate(root / "gen", root / "ref", lines, tiny_models["clip"], tiny_models[dino_key],
                        batch_size=8, device="cpu", progress=False)
    for key in ("dino", "clip_i", "clip_t"):
        assert again[key] == pytest.approx(result[key], abs=1e-5)
    assert again["settings"]["prompts_format"] == "lines"

    table = ev.metrics_table(result)
    assert all(name in table for name in ("DINO", "CLIP-I", "CLIP-T", f"{result['dino']:.4f}"))
    out = ev.write_result(result, root / "out" / "metrics.json")
    assert json.loads(out.read_text())["clip_t"] == result["clip_t"]


# ---------------------------------------------------------------- errors


def test_prompt_count_mismatch(tiny_models, image_sets):
    root, _, _ = image_sets
    lines = root / "prompts.txt"
    lines.write_text("a sks dog\nanother sks dog\n")
    with pytest.raises(ev.EvaluateError, match="prompt count mismatch.*2 prompts.*3 generated"):
        ev.evaluate(root / "gen", root / "ref", lines, tiny_models["clip"], tiny_models["vit"], progress=False)
    mapping = root / "prompts.json"
    mapping.write_text(json.dumps({"img_1.png": "a", "img_2.png": "b", "img_3.png": "c"}))
    with pytest.raises(ev.EvaluateError, match="prompt count mismatch.*img_10.png.*img_3.png"):
        ev.evaluate(root / "gen", root / "ref", mapping, tiny_models["clip"], tiny_models["vit"], progress=False)


def test_empty_missing_or_unreadable_folders(tiny_models, image_sets):
    root, _, _ = image_sets
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    prompts = root / "p.txt"
    prompts.write_text("x\n")
    with pytest.raises(ev.EvaluateError, match="holds no images"):
        ev.evaluate(root / "empty", root / "ref", prompts, tiny_models["clip"], tiny_models["vit"], progress=False)
    with pytest.raises(ev.EvaluateError, match="reference image folder .* does not exist"):
        ev.evaluate(root / "gen", root / "nope", prompts, tiny_models["clip"], tiny_models["vit"], progress=False)
    (root / "ref" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ev.EvaluateError, match="broken.png is not a readable image"):
        ev.list_images(root / "ref")


def test_model_folders_of_the_wrong_kind(tiny_models, tmp_path):
    import shutil

    with pytest.raises(ev.EvaluateError, match="not a DINO model"):
        ev.load_dino(tiny_models["clip"])
    with pytest.raises(ev.EvaluateError, match="not a CLIP model"):
        ev.load_clip(tiny_models["vit"])
    with pytest.raises(ev.EvaluateError, match="no config.json"):
        ev.load_clip(tmp_path)
    partial = tmp_path / "vit-no-processor"
    shutil.copytree(tiny_models["vit"], partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(ev.EvaluateError, match="missing preprocessor_config.json"):
        ev.load_dino(partial)
