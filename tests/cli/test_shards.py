"""`cat-tokenize --shards`: webdataset tars in, one latent shard per input shard out (both formats)."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from cat_tokenizer.cli import main
from cat_tokenizer.readers import iter_encoded, load_latent, read_index, read_records
from cat_tokenizer.shard_store import committed
from cat_tokenizer.store import read_jsonl
from cat_tokenizer.testing import png_bytes


def _run(tmp_path, vae, out_name, *extra):
    out = tmp_path / out_name
    args = ["--shards", str(tmp_path / "in" / "{00000..00002}.tar"), "--out", str(out), "--vae", str(vae)]
    return main([*args, "--ratio", "16", "--batch-size", "3", "--quiet", *map(str, extra)]), out


def test_webdataset_output_reads_back_equal_to_safetensors_output(tiny_vae_dir, tmp_path, write_tar_shards):
    ids = write_tar_shards(tmp_path / "in", 3, 4)
    code_st, st = _run(tmp_path, tiny_vae_dir, "st", "--format", "safetensors")
    code_wds, wd = _run(tmp_path, tiny_vae_dir, "wds", "--format", "webdataset")
    assert code_st == code_wds == 0

    assert sorted(p.name for p in (wd / "shards").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    from_st = {record["id"]: (record, enc) for record, enc in iter_encoded(st)}
    from_wds = {record["id"]: (record, enc) for record, enc in iter_encoded(wd)}
    assert sorted(from_st) == sorted(from_wds) == sorted(ids)
    for image_id, (record, enc) in from_st.items():
        other_record, other = from_wds[image_id]
        assert torch.equal(enc.latent, other.latent)
        assert enc.record() == other.record()
        assert record["key"] == other_record["key"] == image_id.split("/")[1]  # the input's sample key
        assert record["caption"] == f"noise sample {int(image_id[:5])}-{int(image_id[-4:])}"  # txt and json

    # A streaming trainer reads the tar with webdataset itself: same keys, record in KEY.json.
    samples = list(wds.WebDataset(str(wd / "shards" / "00001.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [i.split("/")[1] for i in ids if i.startswith("00001/")]
    first = json.loads(samples[0]["json"])
    assert first["id"] == samples[0]["__key__"].join(["00001/", ""]) and first["latent_shape"] == [4, 2, 2]
    assert load_latent(wd, first).latent.shape == (4, 2, 2)

    # Decoding both folders gives the same pictures.
    assert main(["decode", "--tokens", str(st), "--out", str(tmp_path / "rec_st"), "--quiet"]) == 0
    assert main(["decode", "--tokens", str(wd), "--out", str(tmp_path / "rec_wds"), "--quiet"]) == 0
    pngs = sorted(p.relative_to(tmp_path / "rec_st") for p in (tmp_path / "rec_st").rglob("*.png"))
    assert len(pngs) == len(ids)
    for name in pngs:
        assert (
            Image.open(tmp_path / "rec_st" / name).tobytes()
            == Image.open(tmp_path / "rec_wds" / name).tobytes()
        )


def test_index_and_latent_stats_describe_every_image(tiny_vae_dir, tmp_path, write_tar_shards):
    ids = write_tar_shards(tmp_path / "in", 3, 4)
    code, out = _run(tmp_path, tiny_vae_dir, "out", "--format", "webdataset")
    assert code == 0
    table = read_index(out)
    rows = table.to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(ids)
    assert {row["source_shard"] for row in rows} == {"00000", "00001", "00002"}
    assert all(row["ratio"] == 16 and row["tokens"] == 4 and row["latent_shape"] == [4, 2, 2] for row in rows)
    assert all(row["score_source"] == "override" and row["router_model"] is None for row in rows)
    assert len({row["vae_weights_sha256"] for row in rows}) == 1 and len(rows[0]["vae_weights_sha256"]) == 64
    assert pq.read_schema(out / "index.parquet").field("latent_shape").type.value_type.bit_width == 32

    latents = torch.stack([enc.latent for _, enc in iter_encoded(out)]).double()  # (N, C, h, w)
    stats = json.loads((out / "latents_stats.json").read_text())["ratios"]
    assert list(stats) == ["16"] and stats["16"]["images"] == len(ids)
    per_channel = latents.permute(1, 0, 2, 3).reshape(4, -1)
    assert torch.allclose(
        torch.tensor(stats["16"]["mean"], dtype=torch.float64), per_channel.mean(dim=1), atol=1e-9
    )
    assert torch.allclose(
        torch.tensor(stats["16"]["std"], dtype=torch.float64),
        per_channel.std(dim=1, unbiased=False),
        atol=1e-7,
    )


def _tar(path, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_broken_members_and_shards_are_recorded_and_the_rest_goes_through(tiny_vae_dir, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    good = lambda key, seed: [(f"{key}.png", png_bytes(seed)), (f"{key}.txt", f"caption {key}".encode())]  # noqa: E731
    _tar(
        shards / "00000.tar",
        good("a1", 1)
        + [("a2.png", png_bytes(2)[:80]), ("a2.txt", b"corrupt image member")]
        + [("a3.png", png_bytes(3))]  # no caption member
        + [("a4.txt", b"a caption without its image")]
        + [("a5.png", png_bytes(5)), ("a5.json", b"{not json")]
        + good("a6", 6)
        + good("a1", 7),  # a1 again, not adjacent to its first members
    )
    raw = _tar(shards / "00001.tar", good("b1", 11) + good("b2", 12) + good("b3", 13))
    # Truncated download: cut inside b3's image (b1 and b2 are whole).
    (shards / "00001.tar").write_bytes(raw[: raw.find(b"b3.png") + 512 + 40])
    raw = bytearray(_tar(shards / "00002.tar", good("c1", 21) + good("c2", 22) + good("c3", 23)))
    header = raw.find(b"c2.png")
    raw[header + 148 : header + 156] = b"garbage!"  # c2's header checksum: tarfile would stop silently here
    (shards / "00002.tar").write_bytes(bytes(raw))

    code, out = _run(tmp_path, tiny_vae_dir, "out")
    assert code == 2  # partial
    done = {record["id"] for record in read_records(out)}
    assert done == {"00000/a1", "00000/a3", "00000/a5", "00000/a6", "00001/b1", "00001/b2", "00002/c1"}
    errors = {(e["shard"], e["key"]): e["reason"] for e in read_jsonl(out / "errors.jsonl")}
    assert "corrupt or truncated image" in errors[("00000", "a2")]
    assert "no caption member" in errors[("00000", "a3")] and "image fallback" in errors[("00000", "a3")]
    assert "no image member" in errors[("00000", "a4")]
    assert "not valid JSON" in errors[("00000", "a5")]
    assert "truncated or corrupt after sample 'b2'" in errors[("00001", "b2")]
    assert "corrupt tar header after sample 'c1'" in errors[("00002", "c1")]
    assert "occurs twice" in errors[("00000", "a1")]
    assert len(errors) == 7
    by_id = {record["id"]: record for record in read_records(out)}
    assert by_id["00000/a3"]["score_source"] == "override" and by_id["00000/a3"]["caption"] is None


def test_require_captions_skips_and_bad_pattern_is_fatal(tiny_vae_dir, tmp_path, write_tar_shards, capsys):
    write_tar_shards(tmp_path / "in", 3, 2)
    code, out = _run(tmp_path, tiny_vae_dir, "out", "--require-captions")
    assert code == 0 and json.loads((out / "summary.json").read_text())["images_done"] == 6
    args = ["--shards", str(tmp_path / "in" / "{00000..00009}.tar"), "--out", str(tmp_path / "x")]
    assert main([*args, "--vae", str(tiny_vae_dir), "--ratio", "16", "--quiet"]) == 1
    assert "00003.tar does not exist" in capsys.readouterr().err
    assert main(["--shards", "a.tar", "--images", str(tmp_path), "--out", str(tmp_path / "y")]) == 1
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_input(tiny_vae_dir, tmp_path, streaming):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [{"bytes": png_bytes(i), "path": None} for i in range(7)],
        "text": [f"c{i}" for i in range(7)],
    }
    rows["text"][4] = None
    folder = tmp_path / "data"
    folder.mkdir()
    dataset = datasets.Dataset.from_dict(rows, features=features)
    for part in range(2):  # two parquet files: the streaming run's two input shards
        dataset.shard(2, part, contiguous=True).to_parquet(str(folder / f"train-{part:05d}.parquet"))
    out = tmp_path / "out"
    args = ["--hf-dataset", str(folder), "--split", "train", "--caption-column", "text", "--out", str(out)]
    args += ["--vae", str(tiny_vae_dir), "--ratio", "8", "--shard-size", "3", "--quiet"]
    assert main(args + (["--streaming"] if streaming else [])) == 2  # row 4 has no caption
    records = read_records(out)
    assert len(records) == 7 and len({r["id"] for r in records}) == 7
    shards = sorted({r["source_shard"] for r in records})
    assert shards == (
        ["train-00000", "train-00001"] if streaming else ["train-00000", "train-00001", "train-00002"]
    )
    errors = read_jsonl(out / "errors.jsonl")
    assert len(errors) == 1 and "empty caption" in errors[0]["reason"] and errors[0]["shard"] in shards
    assert {r["caption"] for r in records} == {f"c{i}" for i in range(7) if i != 4} | {None}

    missing = tmp_path / "missing"
    assert main(args[:4] + ["--image-column", "picture", "--out", str(missing)] + args[6:]) == 1


def test_shard_names_come_from_the_file_stem_of_any_url_form():
    from cat_tokenizer.sources import expand_shard_pattern

    shards = expand_shard_pattern("pipe:aws s3 cp s3://bucket/train-{00008..00010}.tar -")
    assert [s.name for s in shards] == ["train-00008", "train-00009", "train-00010"]
    assert shards[0].url == "pipe:aws s3 cp s3://bucket/train-00008.tar -"
    assert [s.name for s in expand_shard_pattern("https://host/d/{a,b}.tar.gz?download=true")] == ["a", "b"]


def test_routed_shard_run_records_router_provenance_in_the_index(
    tiny_vae_dir, tiny_llama_dir, tmp_path, write_tar_shards
):
    from router import PROMPT_VERSION

    ids = write_tar_shards(tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    args = [
        "--shards",
        str(tmp_path / "in" / "{00000..00001}.tar"),
        "--out",
        str(out),
        "--vae",
        str(tiny_vae_dir),
    ]
    assert main([*args, "--router-model", str(tiny_llama_dir), "--quiet"]) == 0
    rows = read_index(out).to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(ids)
    for row in rows:
        assert row["score_source"] == "caption_llm" and 1.0 <= row["score"] <= 9.0
        assert row["router_model"] == str(tiny_llama_dir) and row["router_prompt_version"] == PROMPT_VERSION
        assert row["router_dtype"] in {"torch.float32", "torch.bfloat16"}  # the backend's CPU default
        assert "flag_lifts" in json.loads(row["router_head"])
        assert row["tokens"] == {8: 16, 16: 4, 32: 1}[row["ratio"]]


def test_folder_runs_write_the_index_and_latent_stats_too(
    tiny_vae_dir, tmp_path, write_small_images, cli_args
):
    names = write_small_images(tmp_path / "images", 5)
    out = tmp_path / "out"
    assert (
        main(cli_args(tmp_path / "images", out, tiny_vae_dir, "--ratio", 8, "--shard-size", 2, "--quiet"))
        == 0
    )
    rows = read_index(out).to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(names)
    assert all(row["source_shard"] is None and row["shard"].startswith("shards/r00-") for row in rows)
    stats = json.loads((out / "latents_stats.json").read_text())["ratios"]
    assert list(stats) == ["8"] and stats["8"]["images"] == 5 and stats["8"]["positions"] == 5 * 4 * 4
    latents = (
        torch.stack([enc.latent for _, enc in iter_encoded(out)]).double().permute(1, 0, 2, 3).reshape(4, -1)
    )
    assert torch.allclose(
        torch.tensor(stats["8"]["mean"], dtype=torch.float64), latents.mean(dim=1), atol=1e-9
    )


def test_a_failing_pipe_is_not_committed_and_resume_retries_it(tiny_vae_dir, tmp_path, write_tar_shards):
    write_tar_shards(tmp_path / "in", 2, 2)
    (tmp_path / "in" / "00001.tar").rename(tmp_path / "in" / "later.tar")
    out = tmp_path / "out"
    pattern = f"pipe:cat {tmp_path / 'in'}/{{00000,later}}.tar"
    args = ["--shards", pattern, "--out", str(out), "--vae", str(tiny_vae_dir), "--ratio", "16", "--quiet"]
    (tmp_path / "in" / "later.tar").rename(tmp_path / "in" / "away.tar")  # `cat` will exit 1 for it
    assert main(args) == 2
    assert sorted(committed(out)) == ["00000"]
    (error,) = read_jsonl(out / "errors.jsonl")
    assert error["shard"] == "later" and "rerun with --resume" in error["reason"]
    (tmp_path / "in" / "away.tar").rename(tmp_path / "in" / "later.tar")
    assert main(args + ["--resume"]) == 0
    assert sorted(committed(out)) == ["00000", "later"] and read_jsonl(out / "errors.jsonl") == []
    assert len(read_records(out)) == 4
