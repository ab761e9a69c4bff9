"""cat_foundations: the cache root, the exit-code convention of all four CLIs, the shared facts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cat_foundations import cache
from cat_foundations.atomic import atomic_write_json, read_jsonl, write_jsonl
from cat_foundations.captions import clean_caption
from cat_foundations.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, FatalError, run_cli
from cat_foundations.hardware import (
    bf16_is_native,
    cpu_flags,
    cpu_has_native_bf16,
    cpu_model_name,
    mixed_precision_for,
)
from cat_foundations.ratios import RATIOS, latent_size, tokens_for
from nested_vae import RATIOS as VAE_RATIOS
from nested_vae import NestedVAE
from router import tokens_for as router_tokens_for


def test_cache_root_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "cat-tokenizer"


def test_cache_root_override_env_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"


def test_find_cached_reads_the_legacy_location_until_the_new_one_exists(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache, "legacy_cache_root", lambda: tmp_path / "legacy")
    complete = lambda path: (path / "done").is_file()  # noqa: E731
    new = tmp_path / "xdg" / "cat-tokenizer" / "router" / "m"
    assert cache.find_cached("router/m", complete) == new  # nothing anywhere: the new place
    (tmp_path / "legacy" / "router" / "m").mkdir(parents=True)
    (tmp_path / "legacy" / "router" / "m" / "done").write_text("")
    assert cache.find_cached("router/m", complete) == tmp_path / "legacy" / "router" / "m"
    new.mkdir(parents=True)
    (new / "done").write_text("")
    assert cache.find_cached("router/m", complete) == new


def test_bench_cache_lives_under_the_one_root(monkeypatch, tmp_path):
    from eval.engine import default_cache_dir

    monkeypatch.delenv("CAT_BENCH_CACHE", raising=False)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path / "bench"


def test_run_cli_exit_codes(capsys):
    assert run_cli("x", lambda: None) == EXIT_OK
    assert run_cli("x", lambda: EXIT_PARTIAL) == EXIT_PARTIAL

    def fatal():
        raise FatalError("no  such\nthing")

    assert run_cli("x", fatal) == EXIT_FATAL
    assert capsys.readouterr().err.strip() == "x: error: no  such\nthing"

    def crash():
        raise RuntimeError("boom\n  twice")

    assert run_cli("x", crash) == EXIT_FATAL
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("x: error: RuntimeError: boom twice")


@pytest.mark.parametrize(
    "main_path, argv",
    [
        ("cat_tokenizer.cli", ["--no-such-flag"]),
        ("eval.cli", ["recon", "--no-such-flag"]),
        ("router.cli", ["score", "--no-such-flag"]),
    ],
)
def test_every_cli_reports_bad_arguments_as_one_line_and_exit_1(main_path, argv, capsys):
    import importlib

    assert importlib.import_module(main_path).main(argv) == EXIT_FATAL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error:" in err[0] and "--help" in err[0]


def test_cat_router_bad_policy_is_one_line_not_a_traceback(tmp_path, capsys):
    from router.cli import main

    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "caption": "a red apple"}) + "\n")
    policy = tmp_path / "policy.json"
    policy.write_text("not json")
    assert main(["score", "--captions", str(captions), "--policy", str(policy)]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("cat-router: error: --policy:")


def test_cat_bench_missing_dataset_is_fatal(tmp_path, capsys):
    from eval.cli import main

    code = main(
        [
            "prepare",
            "--dataset",
            str(tmp_path / "missing"),
            "--router",
            "none",
            "--no-fid",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ]
    )
    assert code == EXIT_FATAL
    assert capsys.readouterr().err.startswith("cat-bench: error:")


def test_cat_train_bad_override_is_fatal(capsys):
    from nested_vae.train import main

    assert main(["--no_such_field=1"]) == EXIT_FATAL
    assert "cat-train: error:" in capsys.readouterr().err


def test_ratios_and_tokens_are_one_fact():
    assert RATIOS == VAE_RATIOS == (8, 16, 32)
    assert router_tokens_for is tokens_for
    for size in [(256, 256), (100, 300), (33, 31)]:
        for ratio in RATIOS:
            h, w = NestedVAE.latent_size(*size, ratio)
            assert (h, w) == latent_size(*size, ratio) and h * w == tokens_for(ratio, size)


def test_clean_caption():
    assert clean_caption(None) is None
    assert clean_caption("   \n ") is None
    assert clean_caption("  a  red\tapple \n") == "a red apple"
    with pytest.raises(TypeError):
        clean_caption(3)


def test_atomic_writes_leave_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    write_jsonl(tmp_path / "b.jsonl", [{"y": 2}, {"z": 3}])
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert read_jsonl(tmp_path / "b.jsonl") == [{"y": 2}, {"z": 3}]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.jsonl"]
    assert read_jsonl(Path(tmp_path / "absent.jsonl")) == []


@pytest.mark.parametrize(
    ("requested", "native", "expected"),
    [
        ("bf16", False, "no"),  # emulated bf16: 26x an fp32 step on AVX2
        ("bf16", True, "bf16"),
        ("fp16", False, "fp16"),
        ("no", True, "no"),
    ],
)
def test_mixed_precision_falls_back_only_where_bf16_is_emulated(requested, native, expected):
    assert mixed_precision_for(requested, native) == expected


def test_bf16_is_native_on_gpus_and_on_cpus_that_have_it():
    assert bf16_is_native("cuda")  # the GPU's bf16 does not depend on the host CPU
    assert bf16_is_native("cpu") == cpu_has_native_bf16()


@pytest.mark.skipif(
    not Path("/proc/cpuinfo").exists(), reason="the CPU's flags are read from Linux's /proc/cpuinfo"
)
def test_native_bf16_means_the_cpu_has_the_bf16_instructions():
    """AVX-512 without AVX512-BF16 emulates bf16 (oneDNN calls it supported there): that is not native."""
    assert cpu_has_native_bf16() == bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(
    shutil.which("lscpu") is None, reason="util-linux's lscpu is the independent reader compared against"
)
def test_cpu_model_name_is_the_one_lscpu_reports():
    """Results record which CPU measured them; lscpu reads the same name its own way."""
    listing = subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
    ).stdout
    names = [line.split(":", 1)[1].strip() for line in listing.splitlines() if line.startswith("Model name:")]
    if not names:
        pytest.skip("lscpu reports no model name on this CPU")
    assert cpu_model_name() == names[0]
