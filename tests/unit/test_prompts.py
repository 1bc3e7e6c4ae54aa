"""kohya prompt lines and sampler names."""

import pytest

from library.sampling.prompts import load_prompt_file, parse_prompt_line
from library.sampling.samplers import SAMPLER_NAMES, build_scheduler, canonical_sampler
from library.utils.errors import UserError


def test_parse_all_options():
    p = parse_prompt_line("a cat, sitting --n dog, blurry --w 513 --h 768 --d 42 --l 5.5 --s 20 --ss K_EULER_A")
    assert p.prompt == "a cat, sitting" and p.negative_prompt == "dog, blurry"
    assert (p.width, p.height, p.seed, p.scale, p.steps, p.sampler) == (512, 768, 42, 5.5, 20, "euler_a")


def test_defaults():
    p = parse_prompt_line("just a prompt")
    assert (p.width, p.height, p.steps, p.scale, p.seed) == (512, 512, 30, 7.5, None)


def test_file_errors_name_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\nok --w 64\nbad --q 3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"p.txt:3: unknown option --q"):
        load_prompt_file(str(f))
    f.write_text("bad --w wide\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"p.txt:1: bad option value"):
        load_prompt_file(str(f))
    f.write_text("x --ss nosuch\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"p.txt:1: unknown sampler 'nosuch'"):
        load_prompt_file(str(f))


def test_json_and_toml_files(tmp_path):
    j = tmp_path / "p.json"
    j.write_text('["a --w 64", {"prompt": "b", "width": 128, "sample_steps": 5}]', encoding="utf-8")
    a, b = load_prompt_file(str(j))
    assert a.width == 64 and b.width == 128 and b.steps == 5
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 96\n[[prompt.subset]]\nprompt = "c"\n[[prompt.subset]]\nprompt = "d"\nwidth = 64\n',
                 encoding="utf-8")
    c, d = load_prompt_file(str(t))
    assert (c.prompt, c.width, d.width) == ("c", 96, 64)


@pytest.mark.parametrize("name,cls,extra", [
    ("ddim", "DDIMScheduler", {}), ("pndm", "PNDMScheduler", {}), ("k_lms", "LMSDiscreteScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}), ("euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}), ("dpm_2", "KDPM2DiscreteScheduler", {}),
    ("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler", {}),
    ("dpmsolver", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    ("dpmsolver++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("dpmsingle", "DPMSolverSinglestepScheduler", {}),
])
def test_sampler_registry(name, cls, extra):
    s = build_scheduler(name, "v_prediction")
    assert type(s).__name__ == cls
    assert s.config.beta_schedule == "scaled_linear" and s.config.prediction_type == "v_prediction"
    for k, v in extra.items():
        assert s.config[k] == v
    assert canonical_sampler(name) in SAMPLER_NAMES


def test_dynamic_prompt_counts_separators_and_enumeration():
    """kohya's {n$$...}, {n-m$$sep$$...} and {e$$...} groups."""
    import random

    from library.generation.dynamic_prompts import enumerate_dynamic, expand_dynamic

    for seed in range(20):
        two = expand_dynamic("x {2$$a|b|c} y", random.Random(seed))
        picked = two[2:-2].split(", ")
        assert len(picked) == 2 and len(set(picked)) == 2 and set(picked) <= {"a", "b", "c"}
        some = expand_dynamic("{1-2$$ and $$cat|dog}", random.Random(seed)).split(" and ")
        assert 1 <= len(some) <= 2 and set(some) <= {"cat", "dog"}
        assert expand_dynamic("{9$$a|b}", random.Random(seed)) in ("a, b", "b, a")  # at most every option
    assert enumerate_dynamic("{e$$red|blue} {circle|square} {e$$2$$a|b|c}") == [
        f"{colour} {{circle|square}} {pair}" for colour in ("red", "blue") for pair in ("a, b", "a, c", "b, c")]
    assert enumerate_dynamic(r"plain \{x\} {a|b}") == [r"plain \{x\} {a|b}"]
    assert enumerate_dynamic(r"{e$$1-2$$+$$p|q} \{y\}") == [r"p \{y\}", r"q \{y\}", r"p+q \{y\}"]
