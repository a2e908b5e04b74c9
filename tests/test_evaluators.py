import numpy as np

from budgetdiff.evaluators import check_scene_heuristic, summarize_checks
from budgetdiff.scenes import SceneSpec, parse_prompt, render_scene_array, sample_scene


def test_checker_on_ground_truth_single_objects():
    specs = [sample_scene(s, n_objects=1) for s in range(150)]
    acc = summarize_checks([check_scene_heuristic(render_scene_array(s), s) for s in specs])
    assert acc["color"] >= 0.95 and acc["position"] >= 0.95 and acc["shape"] >= 0.9 and acc["background"] == 1.0


def test_checker_rejects_noise_and_wrong_scenes():
    rng = np.random.default_rng(0)
    specs = [sample_scene(s, n_objects=1) for s in range(60)]
    noise = summarize_checks([check_scene_heuristic(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), s) for s in specs])
    assert noise["all_attributes"] < 0.05
    moved = parse_prompt("a large red square at the bottom right on a white background")
    truth = parse_prompt("a large red square at the top left on a white background")
    check = check_scene_heuristic(render_scene_array(moved), truth).objects[0]
    assert check["color"] and check["shape"] and not check["position"]


def test_checker_accepts_pil_images_of_other_sizes():
    from PIL import Image

    spec = sample_scene(3, n_objects=1)
    big = Image.fromarray(render_scene_array(spec, 128))
    assert check_scene_heuristic(big, spec).objects[0]["color"]


# --------------------------------------------------------------------------------------------
# The trained evaluators (issue 3): attribute checker logic, attr_acc, save/load, training.
# --------------------------------------------------------------------------------------------
import pytest
import torch

from budgetdiff.evaluators import (
    AttributeChecker,
    EvaluatorModelError,
    attr_check,
    attribute_targets,
    compare_scenes,
    detect_scenes,
    load_attribute_checker,
    save_attribute_checker,
    scene_attr_acc,
)
from budgetdiff.scenes import spec_to_prompt


class OracleChecker(AttributeChecker):
    """Answers with the ground truth of ``specs`` (logits ±10): exercises decoding and matching."""

    def __init__(self, specs):
        super().__init__(32, (4, 8, 8), 16)
        t = attribute_targets(specs)
        self.logits = {"occupied": t["occupied"] * 20 - 10, "background": torch.nn.functional.one_hot(t["background"], 4) * 10.0}
        for name, size in (("shape", 5), ("color", 8), ("size", 2), ("texture", 3)):
            self.logits[name] = torch.nn.functional.one_hot(t[name].clamp(min=0), size) * 10.0

    def forward(self, images):
        return {k: v[: images.shape[0]].float() for k, v in self.logits.items()}


def test_ground_truth_reads_back_and_scores_one():
    specs = [sample_scene(s) for s in range(40)]
    images = np.stack([render_scene_array(s) for s in specs])
    oracle = OracleChecker(specs).eval()
    detected = detect_scenes(oracle, torch.zeros(40, 3, 32, 32))
    assert [d.canonical() for d in detected] == [s.canonical() for s in specs]
    result = attr_check(images, [spec_to_prompt(s) for s in specs], checker=oracle)
    assert result["attr_acc"] == 1.0 and result["all_attributes"] == 1.0 and result["background"] == 1.0


def test_compare_scenes_counts_each_wrong_attribute():
    truth = parse_prompt("a large red square at the top left and a small blue circle at the right on a white background")
    seen = parse_prompt("a large red square at the bottom left and a small green circle at the right on a black background")
    check = compare_scenes(seen, truth)
    by_shape = {o.shape: v for o, v in zip(truth.objects, check.objects)}
    assert by_shape["square"] == {"color": True, "shape": True, "size": True, "position": False, "texture": True}
    assert by_shape["circle"] == {"color": False, "shape": True, "size": True, "position": True, "texture": True}
    assert not check.background_ok
    assert scene_attr_acc(check) == pytest.approx(8 / 11)
    nothing = compare_scenes(SceneSpec(objects=(), background="white"), truth)
    assert scene_attr_acc(nothing) == pytest.approx(1 / 11)  # only the background right


def test_checker_save_load_round_trip_and_missing_dir(tmp_path):
    torch.manual_seed(0)
    checker = AttributeChecker(32, (4, 8, 8), 16).eval()
    save_attribute_checker(checker, tmp_path / "attributes")
    loaded = load_attribute_checker(tmp_path / "attributes")
    x = torch.rand(3, 3, 32, 32)
    assert all(torch.allclose(a, b) for a, b in zip(checker(x).values(), loaded(x).values()))
    with pytest.raises(EvaluatorModelError, match=r"dvc repro train_attributes"):
        load_attribute_checker(tmp_path / "missing")


@pytest.mark.slow
def test_trained_checker_reads_rendered_scenes_and_worsens_under_noise(tmp_path, monkeypatch):
    """~1 minute: train a small checker for 300 steps, then judge held-out renders."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from training.attributes import train

    cfg = {"seed": 0, "resolution": 32, "channels": [16, 32, 64], "hidden": 128, "count_weights": [0.25] * 4,
           "noise_aug": 0.05, "blur_aug": 0.6, "batch_size": 64, "max_steps": 300, "lr": 2e-3,
           "weight_decay": 1e-4, "warmup_fraction": 0.03, "val_every": 0, "val_scenes_per_count": 4,
           "eval_scenes_per_count": 100, "output_dir": str(tmp_path / "attributes"),
           "metrics_path": str(tmp_path / "m.json")}
    metrics = train(cfg)
    one = metrics["held_out"]["1obj"]
    assert one["color"] >= 0.95 and one["position"] >= 0.95 and one["size"] >= 0.9
    checker = load_attribute_checker(cfg["output_dir"])
    specs = [sample_scene(70_000 + s, n_objects=1) for s in range(100)]
    images = torch.from_numpy(np.stack([render_scene_array(s) for s in specs])).permute(0, 3, 1, 2) / 255.0
    scores = [attr_check((images + sigma * torch.randn_like(images)).clamp(0, 1), specs, checker)["attr_acc"]
              for sigma in (0.0, 0.3, 0.6)]
    assert scores[0] > scores[1] > scores[2], scores
    from torchvision.transforms.functional import gaussian_blur

    blurred = [attr_check(gaussian_blur(images, [9, 9], [sigma]), specs, checker)["attr_acc"] for sigma in (0.1, 1.5, 3.0)]
    assert blurred[0] > blurred[1] > blurred[2], blurred
