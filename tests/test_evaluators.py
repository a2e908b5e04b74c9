import numpy as np

from budgetdiff.evaluators import check_scene_heuristic, summarize_checks
from budgetdiff.scenes import parse_prompt, render_scene_array, sample_scene


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
