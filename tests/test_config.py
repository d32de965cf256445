import json

import pytest

from spallm_plugins.config import FORMAT_VERSION, SketchConfig, SketchConfigError


def test_round_trip_through_quantization_config():
    cfg = SketchConfig(bits=3, groups_per_row=4, table_dtype="bfloat16", target_modules=["q_proj", "v_proj"], seed=7)
    data = json.loads(json.dumps(cfg.to_quantization_config()))
    assert data["quant_method"] == "spallm"
    assert data["format_version"] == FORMAT_VERSION
    assert SketchConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("bits", 5),
        ("bits", True),
        ("groups_per_row", 0),
        ("groups_per_row", 9),
        ("groups_per_row", 2.0),
        ("table_dtype", "int8"),
        ("method", "magic"),
        ("target_modules", "q_proj"),
        ("damping", -0.1),
        ("nsamples", -1),
        ("tune_steps", -1),
        ("tune_lr", 0.0),
        ("tune_lr", 1.5),
    ],
)
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(SketchConfigError, match=key):
        SketchConfig.from_dict({key: value})


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(SketchConfigError, match=r"unknown key\(s\) \['group_size'\]"):
        SketchConfig.from_dict({"quant_method": "spallm", "bits": 4, "group_size": 64})


def test_wrong_quant_method_and_version():
    with pytest.raises(SketchConfigError, match="quant_method='gptq'"):
        SketchConfig.from_dict({"quant_method": "gptq"})
    with pytest.raises(SketchConfigError, match="format_version=2"):
        SketchConfig.from_dict({"format_version": 2})


def test_in_features_checks():
    SketchConfig(groups_per_row=4).check_in_features(64)
    with pytest.raises(ValueError, match="groups_per_row=3 does not divide in_features=64"):
        SketchConfig(groups_per_row=3).check_in_features(64, "model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="multiple of 8"):
        SketchConfig(bits=3).check_in_features(12)


def test_modules_to_not_convert_accepts_one_name_and_null():
    assert SketchConfig(modules_to_not_convert="lm_head").modules_to_not_convert == ["lm_head"]
    assert SketchConfig.from_dict({"modules_to_not_convert": None}).modules_to_not_convert == []
    with pytest.raises(SketchConfigError, match=r"modules_to_not_convert=\[3\] is invalid"):
        SketchConfig(modules_to_not_convert=[3])


def test_a_string_exclusion_excludes_that_module():
    from spallm_plugins.convert import is_target

    config = SketchConfig(modules_to_not_convert="lm_head")
    assert not is_target("lm_head", config, None)
    assert is_target("model.layers.0.mlp.up_proj", config, None)


def test_float_bits_are_refused_up_front():
    with pytest.raises(SketchConfigError, match=r"SketchConfig.bits=4.0 is invalid: expected one of \(2, 3, 4\)"):
        SketchConfig(bits=4.0)


def test_table_tuning_needs_calibration():
    with pytest.raises(SketchConfigError, match=r"tune_steps=4 .* needs method 'gptq'"):
        SketchConfig(tune_steps=4)
    assert SketchConfig(method="gptq", nsamples=8, seqlen=16, tune_steps=4).tune_steps == 4


def test_calibrated_method_needs_samples_before_any_model_is_loaded():
    with pytest.raises(SketchConfigError, match=r"method 'gptq' is calibrated and needs nsamples >= 1"):
        SketchConfig(method="gptq", nsamples=0, seqlen=256)
    with pytest.raises(SketchConfigError, match=r"seqlen >= 1"):
        SketchConfig(method="gptq", nsamples=8, seqlen=0)
    assert SketchConfig(method="gptq", nsamples=8, seqlen=32).method == "gptq"


def test_method_follows_calibration_unless_given():
    assert SketchConfig().method == "kmeans"
    assert SketchConfig(calibration="rows.json").method == "gptq"
    assert SketchConfig(calibration="rows.json", method="kmeans").method == "kmeans"
    assert SketchConfig().replace(calibration="x.txt").method == "kmeans"  # a resolved method stays
    with pytest.raises(SketchConfigError, match=r"SketchConfig.calibration=\['a'\] is invalid"):
        SketchConfig(calibration=["a"])


def test_packing_rule_is_defined_once():
    from spallm_plugins.config import packed_width, packing_unit, unpacked_width

    assert [packing_unit(b) for b in (2, 3, 4)] == [(4, 1), (8, 3), (2, 1)]
    for bits in (2, 3, 4):
        assert unpacked_width(packed_width(4096, bits), bits) == 4096
        assert packed_width(4096, bits) == 4096 * bits // 8
    with pytest.raises(ValueError, match="no format-v1 packing for 5-bit codes"):
        packing_unit(5)


def test_a_config_written_before_true_sequential_existed_reads_as_all_at_once():
    written = SketchConfig(method="gptq", nsamples=8, seqlen=16).to_quantization_config()
    assert written["true_sequential"] is True  # today's default, written in full
    del written["true_sequential"]
    assert SketchConfig.from_dict(written).true_sequential is False  # how that older version sketched
    assert SketchConfig.from_dict({"bits": 3}).true_sequential is True  # a partial dict takes the default
