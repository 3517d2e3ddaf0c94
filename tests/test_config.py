import pytest

from capa_export import CapaConfig, CapaError


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune=[(2, 0)]), r"prune\[0\] keep k=0 must be >= 1"),
    (dict(prune=[(0, 64)]), r"layer K=0 must be >= 1"),
    (dict(prune=[(2, 64), (2, 32)]), "strictly increasing layers"),
    (dict(prune=[(2, 64), (4, 64)]), "must be fewer"),
    (dict(prune=[(2,)]), r"\(layer K, keep\) pair"),
    (dict(variant="fastv"), "variant 'fastv' is unknown"),
    (dict(queries="all"), "queries 'all' is unknown"),
    (dict(ffn_layers="some"), "ffn_layers"),
    (dict(ffn_layers=[3, 3]), "distinct"),
    (dict(ffn_threshold=2.0), "ffn_threshold"),
    (dict(ffn_range=(5, 2)), "ffn_range"),
    (dict(ffn_rank=0), "ffn_rank"),
])
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(CapaError, match=message):
        CapaConfig(**kwargs)


def test_json_round_trip(tmp_path):
    config = CapaConfig(prune=[(2, 192), (6, 64)], variant="value_norm", queries="last", ffn_layers=[3, 4],
                        ffn_range=(2, 10), ffn_rank=16)
    config.save(tmp_path)
    assert CapaConfig.load(tmp_path) == config


def test_model_dependent_limits():
    with pytest.raises(CapaError, match=r"must be in \[1, 7\]"):
        CapaConfig(prune=[(8, 64)]).check_for_model(8)
    with pytest.raises(CapaError, match=r"k must be in \[1, 576\]"):
        CapaConfig(prune=[(2, 600)]).check_for_visual_tokens(576)


def test_unknown_field_in_json(tmp_path):
    (tmp_path / "capa_config.json").write_text('{"prune": [], "keep": 3}')
    with pytest.raises(CapaError, match="key keep is unknown"):
        CapaConfig.load(tmp_path)


# --- keep as a fraction of the visual tokens ---------------------------------------------------------
@pytest.mark.parametrize("prune, message", [
    ([(2, 0.0)], r"keep fraction 0.0 must be in \(0, 1\]"),
    ([(2, 1.5)], r"keep fraction 1.5 must be in \(0, 1\]"),
    ([(2, 0.5), (4, 0.5)], "must be fewer"),
    ([(2, 64), (4, 0.1)], "mix a count and a fraction"),
    ([(2, True)], "keep a count"),
])
def test_invalid_fractions(prune, message):
    with pytest.raises(CapaError, match=message):
        CapaConfig(prune=prune)


@pytest.mark.parametrize("text", ["0.25", "0.3", "0.1", "1.0", "0.001", "0.4999", "0.125"])
def test_keep_count_is_the_rounded_decimal_fraction(text):
    """k = round(f * N), halves up, at least 1, with f read as the decimal the user wrote (exact
    rational arithmetic as the reference, not the float product)."""
    from fractions import Fraction

    from capa_export.config import keep_count

    for n in [1, 2, 5, 7, 64, 255, 256, 576, 2880, 9999]:
        expected = max(1, (Fraction(text) * n + Fraction(1, 2)).__floor__())
        assert keep_count(float(text), n) == expected, (text, n)


def test_a_fraction_round_trips_through_json_and_always_fits(tmp_path):
    config = CapaConfig(prune=[(2, 0.5), (6, 0.125)])
    config.save(tmp_path)
    loaded = CapaConfig.load(tmp_path)
    assert loaded == config and isinstance(loaded.prune[0][1], float)
    loaded.check_for_visual_tokens(1)  # a fraction of any N is at least one token
    assert "keep 0.5 of the visual tokens from layer 2" in loaded.describe()


def test_cli_reads_a_count_or_a_fraction():
    import argparse

    from capa_export.cli import _stage

    assert _stage("2:64") == (2, 64) and isinstance(_stage("2:64")[1], int)
    assert _stage("2:0.25") == (2, 0.25) and isinstance(_stage("2:0.25")[1], float)
    with pytest.raises(argparse.ArgumentTypeError, match="2:64 or 2:0.25"):
        _stage("2:quarter")
