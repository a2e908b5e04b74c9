import numpy as np
import pytest

from budgetdiff.domain.scenes import (
    COLORS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    PromptParseError,
    SceneSpec,
    parse_prompt,
    render_scene,
    render_scene_array,
    sample_scene,
    spec_to_prompt,
)


def test_domain_size():
    assert len(SHAPES) >= 5 and len(COLORS) >= 8 and len(POSITIONS) == 9


def test_sampling_is_deterministic():
    assert sample_scene(123) == sample_scene(123)
    assert spec_to_prompt(sample_scene(123)) == spec_to_prompt(sample_scene(123))
    assert np.array_equal(render_scene_array(sample_scene(123)), render_scene_array(sample_scene(123)))
    assert any(sample_scene(s) != sample_scene(123) for s in range(10))


def test_complexity_levels_and_distinct_cells():
    specs = [sample_scene(s) for s in range(400)]
    assert {s.complexity for s in specs} == set(range(1, MAX_OBJECTS + 1))
    for s in specs:
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert 1 <= s.complexity <= MAX_OBJECTS
    assert {o.texture for s in specs for o in s.objects} == {"plain", "striped", "dotted"}


@pytest.mark.parametrize("seed", range(0, 2000, 7))
def test_prompt_round_trip(seed):
    spec = sample_scene(seed)
    for phrasing in range(3):
        prompt = spec_to_prompt(spec, seed=phrasing)
        assert parse_prompt(prompt) == spec.canonical(), prompt


def test_phrasings_vary():
    spec = sample_scene(5, n_objects=2)
    assert len({spec_to_prompt(spec, seed=s) for s in range(20)}) >= 4


def test_grouped_plural_phrasing_parses():
    spec = parse_prompt("two large blue squares at the left and in the top right on a black background")
    assert spec.background == "black"
    assert sorted(o.position for o in spec.objects) == ["left", "top right"]
    assert all(o.shape == "square" and o.color == "blue" and o.size == "large" for o in spec.objects)


@pytest.mark.parametrize(
    "prompt",
    [
        "a small red circle at the top left",  # no background
        "on a white background",  # no object
        "a small red blob at the top on a white background",  # unknown shape word
        "two small red circles at the top on a white background",  # count/position mismatch
        "a small red circle at the top and a large blue square at the top on a white background",
    ],
)
def test_parse_errors(prompt):
    with pytest.raises(PromptParseError):
        parse_prompt(prompt)


def test_render_sizes_and_mask():
    spec = sample_scene(3, n_objects=2)
    img = render_scene(spec)
    assert img.size == (32, 32) and img.mode == "RGB"
    assert render_scene(spec, 128).size == (128, 128)
    arr, mask = render_scene_array(spec, with_mask=True)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert mask.shape == (32, 32) and 0 < mask.mean() < 0.5


def test_objects_are_where_the_spec_says():
    spec = parse_prompt("a large red square at the top left on a white background")
    _, mask = render_scene_array(spec, with_mask=True)
    ys, xs = np.nonzero(mask > 0.5)
    assert xs.mean() < 11 and ys.mean() < 11


def test_spec_dict_round_trip():
    spec = sample_scene(42)
    assert SceneSpec.from_dict(spec.to_dict()) == spec
