import pytest

from flatq_lightning import QuantSpec, QuantTarget


def test_grid_limits():
    w = QuantSpec.weight(4)
    a = QuantSpec.activation(4)
    assert (w.qmin, w.qmax) == (-8, 7)
    assert (a.qmin, a.qmax) == (0, 15)
    assert w.per_channel and not a.per_channel
    assert QuantSpec.weight(2).qmax == 1


@pytest.mark.parametrize(
    "preset,expected", [("w4a4", (4, 4)), ("w3a3", (3, 3)), ("W8A8", (8, 8)), ("w2a4", (2, 4)), ("w12a6", (12, 6))]
)
def test_parse_presets(preset, expected):
    t = QuantTarget.preset(preset)
    w, a = t.weight, t.act
    assert (w.bits, a.bits) == expected
    assert w.granularity == "per_channel" and w.symmetric
    assert a.granularity == "per_tensor" and not a.symmetric


def test_one_preset_reader_and_one_spelling_of_float():
    """PTQ and the recorder read presets through QuantTarget.preset: a 16-bit side is None (stays float)
    everywhere, and the training side refuses it with the way out."""
    from flatq_lightning import QuantErrorRecorder

    assert QuantTarget.preset("w4a16").act is None and QuantTarget.preset("w16a4").weight is None
    t = QuantTarget.preset("w4a4", "mse", "percentile")
    assert (t.weight, t.act) == (QuantSpec.weight(4, "mse"), QuantSpec.activation(4, "percentile"))
    with pytest.raises(ValueError, match="a 16-bit side stays float"):
        QuantErrorRecorder("w4a16")


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"bits": 1}, r"bits must be in \[2, 16\]"),
        ({"bits": 17}, r"bits must be in \[2, 16\]"),
        ({"bits": 4.0}, "bits must be an int"),
        ({"granularity": "per_row"}, "granularity must be one of"),
        ({"observer": "max"}, r"observer must be one of \('minmax', 'percentile', 'mse'\)"),
        ({"percentile": 10.0}, "percentile must be in"),
        ({"symmetric": "yes"}, "symmetric must be a bool"),
        ({"mse_grid": 1}, "mse_grid must be"),
    ],
)
def test_invalid_spec_messages(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("bad", ["w4", "a4w4", "w1a4", "w4a32", "four", ""])
def test_bad_presets(bad):
    with pytest.raises(ValueError, match="preset"):
        QuantTarget.preset(bad)


def test_bad_preset_messages_name_the_form_and_the_range():
    with pytest.raises(ValueError, match=r"expected 'w<bits>a<bits>' with bits in \[2, 16\], e.g. 'w8a8'"):
        QuantTarget.preset("int4")
    with pytest.raises(ValueError, match=r"preset 'w4a32': activation bits must be in \[2, 16\], got 32"):
        QuantTarget.preset("w4a32")


def test_bad_preset_type():
    with pytest.raises(ValueError, match="must be a string"):
        QuantTarget.preset(44)


def test_roundtrip_dict():
    s = QuantSpec.weight(3, observer="mse")
    assert QuantSpec.from_dict(s.to_dict()) == s


# -- bad inputs are named ------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [5, 7, -6, 100])
def test_quantspec_refuses_an_impossible_channel_axis(axis):
    with pytest.raises(ValueError, match=r"QuantSpec\.ch_axis must be an int in \[-5, 4\]"):
        QuantSpec(ch_axis=axis)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"percentile": "abc"}, "percentile"), ({"mse_grid": True}, "mse_grid"), ({"ch_axis": 1.5}, "ch_axis"),
     ({"bits": "4"}, "bits")],
)
def test_quantspec_wrong_types_are_named(kwargs, name):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{name} must be"):
        QuantSpec(**kwargs)
