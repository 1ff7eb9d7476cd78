"""lycoris_core: framework-free, and equal to PEFT's rules (PEFT_SEMANTICS sections 2-4, 6.1, 12)."""

from __future__ import annotations

import json
import warnings

import pytest

import lycoris_core as lc
from lycoris_core.targets import EXCLUDED


@pytest.mark.parametrize(
    "dim, factor, expected",
    [
        (64, -1, (8, 8)),
        (96, -1, (8, 12)),
        (128, -1, (8, 16)),
        (127, -1, (1, 127)),
        (256, -1, (16, 16)),
        (768, -1, (24, 32)),
        (3072, -1, (48, 64)),
        (4096, -1, (64, 64)),
        (11008, -1, (86, 128)),
        (12, -1, (3, 4)),
        (20, -1, (4, 5)),
        (24, -1, (4, 6)),
        (1, -1, (1, 1)),
        (2, -1, (1, 2)),
        (128, 4, (4, 32)),
        (100, 3, (2, 50)),
        (96, 7, (6, 16)),
        (4096, 16, (16, 256)),
        (4096, 100, (64, 64)),
        (128, 32, (32, 4)),
        (12, 4, (4, 3)),
    ],
)
def test_factorization_matches_peft_values(dim, factor, expected):
    assert lc.factorization(dim, factor) == expected


def test_factorization_equals_peft_exhaustively():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 17):
            assert lc.factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def _cfg(**kw):
    return lc.LoHaConfig(**kw)


def test_get_pattern_key_order_and_suffix_rules():
    patterns = ["q", "layers.0.q", r"^model\..*"]
    assert lc.get_pattern_key(patterns, "model.layers.0.q") == "q"
    assert lc.get_pattern_key(["q"], "model.xq") == "model.xq"  # suffix must start after a dot
    assert lc.get_pattern_key(["layers.0.q"], "layersX0Yq") == "layers.0.q"  # raw regex: '.' is any char
    assert lc.get_pattern_key([r"^model\..*"], "model.a.b") == r"^model\..*"


def test_resolve_rank_alpha_independently():
    cfg = _cfg(r=8, alpha=16, target_modules=["q"], rank_pattern={"q": 2}, alpha_pattern={"v": 3.0})
    assert lc.resolve_rank_alpha(cfg, "a.q") == (2, 16)
    assert lc.resolve_rank_alpha(cfg, "a.v") == (8, 3.0)


@pytest.mark.parametrize(
    "kw, key, expected",
    [
        (dict(target_modules=["q"]), "model.layers.0.q", True),
        (dict(target_modules=["q"]), "model.layers.0.xq", False),
        (dict(target_modules=["layers.0.q"]), "layers.0.q", True),
        (dict(target_modules=r".*\.q"), "model.layers.0.q", True),
        (dict(target_modules=r"q"), "model.layers.0.q", False),  # fullmatch
        (dict(target_modules=["q"], layers_to_transform=0), "model.layers.0.q", True),
        (dict(target_modules=["q"], layers_to_transform=0), "layers.0.q", False),  # no index found
        (dict(target_modules=["q"], layers_to_transform=[1]), "model.layers.0.q", False),
        (dict(target_modules=["q"], layers_to_transform=[0], layers_pattern="h"), "model.layers.0.q", False),
        (dict(target_modules=["q"], layers_to_transform=[0], layers_pattern=["h", "layers"]), "m.layers.0.q", True),
        (dict(target_modules=["q"], exclude_modules=["q"]), "a.q", EXCLUDED),
        (dict(target_modules=["q"], exclude_modules=r"a\..*"), "a.q", EXCLUDED),
        (dict(target_modules=["q"], modules_to_save=["head"]), "head.q", EXCLUDED),
    ],
)
def test_check_target_module_exists_equals_peft(kw, key, expected):
    from peft import LoHaConfig as PeftLoHaConfig
    from peft.tuners.tuners_utils import check_target_module_exists as peft_check

    ours = lc.check_target_module_exists(_cfg(**kw), key)
    theirs = peft_check(PeftLoHaConfig(**kw), key)
    assert (ours is EXCLUDED) == (type(theirs).__name__ == "_ExcludedModule")
    assert bool(ours) == bool(theirs)
    assert ours is expected or bool(ours) == expected


def test_match_targets_errors_and_warnings():
    names = ["", "a", "a.q", "a.v", "head"]
    assert lc.match_targets(_cfg(target_modules=["q"]), names).targeted == ["a.q"]
    with pytest.raises(lc.NoMatchingModuleError, match=r"Target modules \['zz'\] not found"):
        lc.match_targets(_cfg(target_modules=["zz"]), names)
    with pytest.raises(lc.NoMatchingModuleError, match="All modules were excluded"):
        lc.match_targets(_cfg(target_modules=r".*", exclude_modules=r".*"), names)
    with pytest.raises(lc.NoMatchingModuleError, match="No modules were targeted"):
        lc.match_targets(_cfg(target_modules=["q"], exclude_modules=["q"]), names)
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        lc.match_targets(_cfg(), names)
    assert lc.match_targets(_cfg(), ["", "x.q_proj"], model_type="llama").targeted == ["x.q_proj"]
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match.*\['zz'\]"):
        lc.match_targets(_cfg(target_modules=["q"], rank_pattern={"zz": 2}), names)
    with pytest.warns(UserWarning, match="no modules were excluded"):
        lc.match_targets(_cfg(target_modules=["q"], exclude_modules=["nope"]), names)
    linear = lc.match_targets(
        _cfg(target_modules="all-linear"), names, linear_names=["a.q", "head"], output_names=["head"]
    )
    assert linear.targeted == ["a.q"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(r=0), r"LoHaConfig.r: expected a positive integer rank, got 0"),
        (dict(r=-2), "got -2"),
        (dict(target_modules="(("), r"target_modules: invalid regular expression '\(\('"),
        (dict(exclude_modules="[a"), "exclude_modules: invalid regular expression"),
        (dict(rank_pattern={"(": 2}), "rank_pattern: invalid regular expression"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]: expected a positive integer rank, got 0"),
        (dict(rank_dropout=1.5), "rank_dropout: expected a probability"),
        (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
        (dict(task_type="NOPE"), "task_type: expected one of"),
        (dict(init_weights="lycoris"), "LoHaConfig.init_weights: expected True or False"),
    ],
)
def test_bad_config_values_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lc.LoHaConfig(**kw)


def test_lokr_specific_validation():
    assert lc.LoKrConfig(init_weights="lycoris").init_weights == "lycoris"
    with pytest.raises(TypeError, match="decompose_factor: expected an integer"):
        lc.LoKrConfig(decompose_factor=2.5)


def test_config_json_round_trip_and_peft_interop(tmp_path):
    from peft import PeftConfig

    cfg = lc.LoKrConfig(
        r=4,
        alpha=3.0,
        target_modules=["q", "v"],
        rank_pattern={"v": 2, "q": 3},
        init_weights="lycoris",
        decompose_both=True,
        decompose_factor=4,
        rank_dropout_scale=True,
        modules_to_save=["head"],
    )
    cfg.save_pretrained(tmp_path)
    again = lc.LycorisConfig.from_pretrained(tmp_path)
    assert isinstance(again, lc.LoKrConfig) and again == cfg
    assert list(again.rank_pattern) == ["v", "q"]  # order survives (PEFT would sort it)
    theirs = PeftConfig.from_pretrained(str(tmp_path))
    assert type(theirs).__name__ == "LoKrConfig"
    for name in ("r", "alpha", "init_weights", "decompose_both", "decompose_factor", "rank_dropout_scale"):
        assert getattr(theirs, name) == getattr(cfg, name), name
    assert theirs.target_modules == {"q", "v"} and theirs.rank_pattern == {"v": 2, "q": 3}

    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(str(peft_dir))
    ours = lc.LycorisConfig.from_pretrained(peft_dir)
    assert ours.to_dict().keys() == cfg.to_dict().keys()
    assert ours.target_modules == {"q", "v"} and ours.modules_to_save == ["head"]


def test_same_keys_as_peft_to_dict():
    from peft import LoHaConfig as PL
    from peft import LoKrConfig as PK

    assert set(lc.LoHaConfig().to_dict()) == set(PL().to_dict())
    assert set(lc.LoKrConfig().to_dict()) == set(PK().to_dict())


def test_unknown_keys_dropped_with_one_warning_and_unknown_type_rejected():
    data = lc.LoHaConfig(target_modules=["q"]).to_dict() | {"future_a": 1, "future_b": 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = lc.config_from_dict(data)
    assert isinstance(cfg, lc.LoHaConfig)
    assert len(caught) == 1 and "['future_a', 'future_b']" in str(caught[0].message)
    with pytest.raises(ValueError, match="unknown peft_type 'LORA'"):
        lc.config_from_dict({"peft_type": "LORA"})
    with pytest.raises(ValueError, match="expected peft_type 'LOHA', got 'LOKR'"):
        lc.LoHaConfig.from_dict({"peft_type": "LOKR"})


def test_config_file_is_written_atomically(tmp_path, monkeypatch):
    cfg = lc.LoHaConfig(target_modules=["q"])
    cfg.save_pretrained(tmp_path)
    before = (tmp_path / lc.CONFIG_NAME).read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lycoris_core._io.os.replace", boom)
    with pytest.raises(OSError):
        lc.LoHaConfig(target_modules=["other"]).save_pretrained(tmp_path)
    assert (tmp_path / lc.CONFIG_NAME).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [lc.CONFIG_NAME]
    assert json.loads(before)["peft_type"] == "LOHA"


def test_shape_plans_match_peft_examples():
    cfg = lc.LoKrConfig(r=4)
    lin = lc.plan_lokr(lc.LayerShape("linear", 96, 64), 4, 8, cfg)
    assert lin.factor_shapes == {"lokr_w1": (8, 8), "lokr_w2_a": (12, 4), "lokr_w2_b": (4, 8)}
    assert lc.plan_lokr(lc.LayerShape("linear", 96, 64), 16, 8, cfg).factor_shapes == {
        "lokr_w1": (8, 8),
        "lokr_w2": (12, 8),
    }
    conv = lc.plan_lokr(lc.LayerShape("conv2d", 48, 32, (3, 5)), 4, 8, cfg)
    assert conv.factor_shapes == {"lokr_w1": (6, 4), "lokr_w2": (8, 8, 3, 5)}
    c1 = lc.plan_lokr(
        lc.LayerShape("conv1d", 20, 12, (3,)), 2, 8, lc.LoKrConfig(decompose_factor=4, decompose_both=True)
    )
    assert c1.factor_shapes == {"lokr_w1": (4, 4), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 9)}
    grouped = lc.plan_lokr(lc.LayerShape("conv2d", 24, 4, (3, 3), groups=3), 4, 8, cfg)
    assert grouped.factor_shapes == {"lokr_w1": (4, 2), "lokr_w2": (6, 2, 3, 3)}
    cp = lc.plan_loha(lc.LayerShape("conv1d", 6, 4, (3,)), 2, 4, lc.LoHaConfig(use_effective_conv2d=True))
    assert cp.factor_shapes["hada_t1"] == (2, 2, 3, 1) and cp.factor_shapes["hada_w1_a"] == (2, 6)
    assert cp.effective_conv and cp.scaling == 2.0
    pointwise = lc.plan_loha(lc.LayerShape("conv2d", 6, 4, (1, 1)), 2, 4, lc.LoHaConfig(use_effective_conv2d=True))
    assert not pointwise.effective_conv and pointwise.factor_shapes["hada_w1_b"] == (2, 4)
    with pytest.raises(
        ValueError, match=r"layers.0.q: `r` should be a positive integer value but the value passed is 0"
    ):
        lc.plan_loha(lc.LayerShape("linear", 4, 4), 0, 1, lc.LoHaConfig(), where="layers.0.q")


def test_checkpoint_keys_both_prefix_forms():
    assert lc.checkpoint_key("layers.0.q", "hada_w1_a") == "base_model.model.layers.0.q.hada_w1_a"
    modules, other = lc.split_checkpoint_keys(
        ["base_model.model.a.q.lokr_w1", "a.v.lokr_w2", "base_model.model.head.weight"], lc.LOKR_FACTORS
    )
    assert modules == {"a.q": {"lokr_w1": "base_model.model.a.q.lokr_w1"}, "a.v": {"lokr_w2": "a.v.lokr_w2"}}
    assert other == {"head.weight": "base_model.model.head.weight"}
    with pytest.raises(
        ValueError, match=r"a.q.lokr_w1: checkpoint shape \(2, 2\) does not fit the adapter, expected \(4, 4\)"
    ):
        lc.check_factor_shapes("a.q", {"lokr_w1": (4, 4)}, {"lokr_w1": (2, 2)})
    with pytest.raises(ValueError, match=r"a.q: checkpoint factors .* \(missing \['lokr_w2'\]"):
        lc.check_factor_shapes("a.q", {"lokr_w1": (4, 4), "lokr_w2": (2, 2)}, {"lokr_w1": (4, 4)})
