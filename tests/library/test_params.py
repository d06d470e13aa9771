import pytest

from labkit import params
from labkit.params import ParameterError, Rule


def test_valid_parameters_pass_through():
    cfg = params.check("01_baseline", show=False, epochs=5, batch_size=32, lr=1e-3, device="auto", quick=False)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.device) == (5, 32, 1e-3, "auto")
    assert cfg.lab == "01_baseline" and cfg.max_train is None


@pytest.mark.parametrize("name, value, words", [
    ("epochs", "zero", ["'epochs'", "'zero'", "integer"]),      # papermill -p epochs zero
    ("batch_size", -1, ["'batch_size'", "-1", ">= 1", "[1,"]),
    ("workers", "two", ["'workers'", "'two'"]),
    ("lr", 0.0, ["'lr'", "0.0"]),
    ("epochs", True, ["'epochs'", "bool"]),
    ("device", "gpu", ["'device'", "'gpu'", "cuda"]),
    ("data", "real-ish", ["'data'", "'auto'", "'synthetic'"]),
])
def test_bad_value_names_parameter_value_and_allowed(name, value, words):
    with pytest.raises(ParameterError) as err:
        params.check("02_ray", show=False, **{name: value})
    text = str(err.value)
    assert any(w in text for w in words[2:]) or len(words) == 2
    for word in words[:2]:
        assert word in text


def test_every_bad_parameter_is_reported_at_once():
    with pytest.raises(ParameterError) as err:
        params.check("01_baseline", show=False, epochs=0, batch_size="x")
    assert "'epochs'" in str(err.value) and "'batch_size'" in str(err.value)


def test_unknown_parameter_needs_a_rule():
    with pytest.raises(ParameterError, match="no rule for parameter 'depth'"):
        params.check("x", show=False, depth=6)
    cfg = params.check("x", show=False, rules={"depth": Rule(int, 1, 48)}, depth=6)
    assert cfg.depth == 6


def test_float_rule_accepts_ints_but_int_rule_rejects_floats():
    assert params.check("x", show=False, lr=1).lr == 1
    with pytest.raises(ParameterError):
        params.check("x", show=False, epochs=2.5)


def test_quick_mode_caps_sizes_and_adds_limits(monkeypatch):
    cfg = params.check("01_baseline", show=False, epochs=5, image_size=128, quick=True)
    quick = params.QUICK["01_baseline"]
    assert cfg.epochs == min(5, quick["epochs"]) and cfg.image_size == min(128, quick["image_size"])
    assert cfg.max_train == quick["max_train"] and cfg.max_test == quick["max_test"]
    # caps never enlarge a smaller request
    assert params.check("01_baseline", show=False, epochs=1, quick=True).epochs == 1


def test_quick_mode_from_environment(monkeypatch):
    monkeypatch.setenv("LABKIT_QUICK", "1")
    cfg = params.check("02_ray", show=False, epochs=50, quick=False)
    assert cfg.quick is True and cfg.epochs < 50
    monkeypatch.setenv("LABKIT_QUICK", "0")
    assert params.check("02_ray", show=False, epochs=50, quick=False).epochs == 50


def test_show_echoes_configuration(capsys):
    params.check("01_baseline", epochs=3, seed=7)
    out = capsys.readouterr().out
    assert "epochs" in out and "7" in out and "01_baseline" in out


def test_config_attribute_errors_name_the_key():
    cfg = params.check("x", show=False, epochs=1)
    with pytest.raises(AttributeError, match="no parameter 'epoch'"):
        cfg.epoch
