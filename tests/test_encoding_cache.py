"""The encoding cache: encodings made once and kept on disk, keyed by what determines them, shared by runs and
processes, resumed after a kill to the same bytes, read by rows; bad images skipped, logged and bounded."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.training.data.encoding_cache import PART_BYTES, SKIPPED_LOG, EncodingCache
from fewstep.training.data.prompts import DataError
from fewstep.training.data.sources import BadItem, Item, Source, prompt_list_source

TRAIN = ["--max-steps", "2", "--gen-rank", "4", "--fake-rank", "4", "--checkpoint-every", "2", "--validate-every",
         "0", "--warmup-steps", "1", "--report-to", "none"]  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers
def fake_encoder(calls: list | None = None):
    """A stand-in text encoder: each caption's row is a function of the caption alone (fp16, 3×2)."""

    def encode(items, images=None):
        if calls is not None:
            calls.append([item.key for item in items])
        rows = [torch.full((3, 2), float(sum(map(ord, item.caption)) % 997)) for item in items]
        return {"prompt_embeds": torch.stack(rows).half()}

    return encode


def small_cache(root, source, part_rows=8, batch=4, **kwargs) -> EncodingCache:
    """An entry whose parts hold ``part_rows`` items, so a handful of prompts spans several parts and units."""
    return EncodingCache(root, {"test": source.identity}, source, PART_BYTES // part_rows, batch, **kwargs)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def image_items(count: int, bad: set[int]) -> Source:
    """An image source of ``count`` items; those in ``bad`` cannot be decoded."""
    from PIL import Image

    def load(i):
        def image():
            if i in bad:
                raise BadItem("cannot be decoded (broken data stream)")
            return Image.new("RGB", (8, 8), (i, 0, 0))

        return image

    def unit_items(unit, size):
        return (Item(f"img{i}.jpg", f"thing {i}", load(i)) for i in range(unit * size, min(count, (unit + 1) * size)))

    return Source("images", "test images", {"count": count, "bad": sorted(bad)}, 0, unit_items, count=count)


def image_encoder(items, images):
    return {"mean": torch.zeros(len(items), 1).half(), **fake_encoder()(items)}


# ------------------------------------------------------------------------------------------ 1. made once, reused
def test_a_second_run_and_a_resume_on_the_same_data_encode_nothing(teacher, prompts, images, cache_dir, tmp_path,
                                                                   capsys):  # fmt: skip
    data = ["--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images)]
    assert main(["train", *data, "--output", str(tmp_path / "a"), *TRAIN]) == 0
    first = capsys.readouterr().out
    assert "encoded 3 images" in first and "prompts, " in first
    written = files_of(cache_dir / "encodings")
    assert main(["train", *data, "--output", str(tmp_path / "b"), *TRAIN]) == 0
    assert main(["train", "--output", str(tmp_path / "a"), "--resume", "--max-steps", "3"]) == 0
    again = capsys.readouterr().out
    assert "encoded 3" not in again and again.count("reused, nothing encoded") == 4
    assert files_of(cache_dir / "encodings") == written  # not one byte rewritten


def test_a_changed_text_encoder_or_prompt_file_gets_its_own_entry_and_the_key_is_the_encoder(teacher, teachers,
                                                                                          prompts, cache_dir, tmp_path,
                                                                                          capsys):  # fmt: skip
    from fewstep.training.teacher import tiny_models

    retrained = tiny_models.save_tiny_pipeline(tiny_models.build_tiny_sd15_pipeline(seed=1), tmp_path / "seed1")
    v_teacher = teachers["sd15", "v_prediction"]  # another UNet, the same text encoder: the same text encodings
    changed = tmp_path / "prompts.txt"
    changed.write_text(Path(prompts).read_text() + "one more prompt\n")
    runs = [(teacher, prompts, []), (retrained, prompts, []), (teacher, changed, []), (v_teacher, prompts, []),
            (teacher, prompts, ["--resolution", "16"])]  # text conditioning does not depend on the resolution
    for teacher_dir, prompt_file, extra in runs:
        assert main(["prepare", "--teacher", str(teacher_dir), "--prompts", str(prompt_file), *extra]) == 0
    out = capsys.readouterr().out
    assert len(list((cache_dir / "encodings").iterdir())) == 3 and out.count("reused, nothing encoded") == 2


def test_a_changed_resolution_or_vae_gets_its_own_image_entry(teacher, prompts, images, cache_dir, capsys):
    for extra in ([], ["--resolution", "16"], []):
        assert main(["prepare", "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images),
                     *extra]) == 0  # fmt: skip
    assert len(list((cache_dir / "encodings").glob("images-*"))) == 2


# ------------------------------------------------------------------------------------------ 2. resumable, exact
def test_an_interrupted_encoding_continues_at_its_first_missing_part_and_ends_identical(tmp_path):
    source = prompt_list_source([f"prompt {i}" for i in range(40)], "test prompts")
    whole = small_cache(tmp_path / "whole", source)
    whole.build(fake_encoder())
    calls: list = []

    def dies_after_two_parts(items, images=None):
        if len(calls) == 4:  # 4 batches of 4 = 2 parts of 8
            raise KeyboardInterrupt
        return fake_encoder(calls)(items)

    cut = small_cache(tmp_path / "cut", source)
    with pytest.raises(KeyboardInterrupt):
        cut.build(dies_after_two_parts)
    assert not (cut.directory / "complete.json").exists()
    calls.clear()
    cut.build(fake_encoder(calls))
    assert calls[0][0] == "prompt 17" and sum(map(len, calls)) == 24  # the 16 encoded items are not encoded again
    assert files_of(cut.directory) == files_of(whole.directory)


SMALL_PARTS = {"FEWSTEP_CACHE_PART_MB": "0.5"}  # ~80 tiny-teacher prompts per part: many parts in a second


@pytest.mark.parametrize("stop", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_killed_prepare_then_a_rerun_gives_the_cache_an_uninterrupted_one_does(stop, teacher, tmp_path, monkeypatch):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(f"a photo of thing number {i}\n" for i in range(4_000)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **SMALL_PARTS}
    command = [sys.executable, "-m", "fewstep.cli", "prepare", "--teacher", str(teacher), "--prompts",
               str(prompt_file)]  # fmt: skip

    def prepare(cache: Path, kill_after_first_part: bool = False) -> None:
        process = subprocess.Popen(command + ["--cache-dir", str(cache)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        if kill_after_first_part:
            deadline = time.time() + 120
            while not list(cache.glob("*/units/*-0000.safetensors")) and time.time() < deadline:
                time.sleep(0.05)
            process.send_signal(stop)
        process.wait(timeout=300)

    for name, value in SMALL_PARTS.items():  # the uninterrupted build in this process (no start-up to pay)
        monkeypatch.setenv(name, value)
    assert main(["prepare", "--teacher", str(teacher), "--prompts", str(prompt_file), "--cache-dir",
                 str(tmp_path / "whole")]) == 0  # fmt: skip
    prepare(tmp_path / "cut", kill_after_first_part=True)
    [entry] = list((tmp_path / "cut").iterdir())
    assert not (entry / "complete.json").exists()  # killed mid-way: the parts so far, no completion
    prepare(tmp_path / "cut")
    [whole] = list((tmp_path / "whole").iterdir())
    assert entry.name == whole.name and files_of(entry) == files_of(whole)


# ------------------------------------------------------------------------------------------ 3. processes and runs
def test_each_process_encodes_its_share_once_and_the_entry_equals_one_process(tmp_path):
    source = prompt_list_source([f"prompt {i}" for i in range(50)], "test prompts")
    alone = small_cache(tmp_path / "alone", source)
    alone.build(fake_encoder())
    import threading

    shared = small_cache(tmp_path / "shared", source)
    calls = {0: [], 1: []}
    barrier = threading.Barrier(2, timeout=60)  # accelerate's wait_for_everyone, for two threads
    ranks = [threading.Thread(target=shared.build, args=(fake_encoder(calls[rank]), rank, 2, barrier.wait))
             for rank in (0, 1)]  # fmt: skip
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    encoded = {rank: [key for batch in batches for key in batch] for rank, batches in calls.items()}
    assert sorted(encoded[0] + encoded[1], key=lambda k: int(k.split()[1])) == [f"prompt {i + 1}" for i in range(50)]
    assert encoded[0][0] == "prompt 1" and encoded[1][0] == "prompt 9"  # units 0, 2, ... and 1, 3, ...
    assert files_of(shared.directory) == files_of(alone.directory)


def test_two_prepares_on_the_same_cache_at_once_leave_it_complete_and_intact(teacher, tmp_path, monkeypatch):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(f"a photo of thing number {i}\n" for i in range(2_000)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **SMALL_PARTS}
    command = [sys.executable, "-m", "fewstep.cli", "prepare", "--teacher", str(teacher), "--prompts",
               str(prompt_file), "--cache-dir"]  # fmt: skip
    both = [subprocess.Popen(command + [str(tmp_path / "shared")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    assert [p.wait(timeout=300) for p in both] == [0, 0], [p.stderr.read() for p in both]
    for name, value in SMALL_PARTS.items():
        monkeypatch.setenv(name, value)
    assert main(command[3:] + [str(tmp_path / "alone")]) == 0  # the same prepare, alone, in this process
    [shared], [alone] = list((tmp_path / "shared").iterdir()), list((tmp_path / "alone").iterdir())
    assert files_of(shared) == files_of(alone)


# ------------------------------------------------------------------------------------------ 4. reading by rows
def test_rows_are_read_in_the_order_asked_across_parts(tmp_path):
    captions = [f"prompt {i}" for i in range(30)]
    cache = small_cache(tmp_path, prompt_list_source(captions, "test prompts"))
    cache.build(fake_encoder())
    entry = cache.open()
    assert len(entry) == 30 and len(entry.parts) == 4
    index = torch.tensor([29, 0, 8, 8, 17])
    expected = fake_encoder()([Item("", captions[i]) for i in index.tolist()])["prompt_embeds"]
    assert torch.equal(entry.read(["prompt_embeds"], index)["prompt_embeds"], expected)


# ------------------------------------------------------------------------------------------ 5. bad items
def test_unreadable_images_are_skipped_counted_and_logged_with_their_reason(tmp_path):
    cache = small_cache(tmp_path, image_items(30, bad={3, 21}), max_bad_fraction=0.1)
    report = cache.build(image_encoder)
    assert report.rows == 28 and report.items == 30 and report.skipped == {"item: cannot be decoded": 2}
    log = (cache.directory / SKIPPED_LOG).read_text().splitlines()
    assert log == ["img3.jpg\tcannot be decoded (broken data stream)", "img21.jpg\tcannot be decoded (broken data stream)"]
    assert SKIPPED_LOG in report.line()


def test_more_bad_images_than_max_bad_fraction_is_one_line_naming_the_log(tmp_path):
    cache = small_cache(tmp_path, image_items(30, bad={1, 2, 3, 4}), max_bad_fraction=0.1)
    with pytest.raises(DataError) as error:
        cache.build(image_encoder)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "4 of 30 images" in message and "--max-bad-fraction 0.1" in message
    assert str(cache.directory / SKIPPED_LOG) in message
    again = small_cache(tmp_path, image_items(30, bad={1, 2, 3, 4}), max_bad_fraction=0.2)
    assert again.build(image_encoder).encoded_items == 0  # raising the threshold reuses what was encoded


def test_max_bad_fraction_0_stops_at_the_first_bad_image(tmp_path):
    calls: list = []
    cache = small_cache(tmp_path, image_items(30, bad={5}), max_bad_fraction=0)
    with pytest.raises(DataError, match="1 of 6 images so far"):
        cache.build(lambda items, images: image_encoder(items, images) if not calls.append(1) else None)
    assert len(calls) == 1  # one batch of 4, not the 30 images


# ------------------------------------------------------------------------------------------ 6. webdataset shards
def write_shards(folder: Path, shards: int, per_shard: int, corrupt: set[str] = frozenset()) -> Path:
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.new("RGB", (40, 36), (20 * i, 90, 30 * s)).save(buffer, format="JPEG")
                jpg = b"\xff\xd8 not a jpeg" if key in corrupt else buffer.getvalue()
                sink.write({"__key__": key, "jpg": jpg, "txt": f"a photo of thing {key}",
                            "json": json.dumps({"caption": "ignored"})})  # fmt: skip
    return folder


def test_webdataset_shards_prepare_skip_a_bad_sample_and_train(teacher, cache_dir, tmp_path, capsys):
    pytest.importorskip("webdataset")
    shards = write_shards(tmp_path / "shards", 2, 5, corrupt={"000010003"})
    pattern = str(shards / "{00000..00001}.tar")
    assert main(["prepare", "--teacher", str(teacher), "--dataset", pattern]) == 2  # 1 in 10 is over the default 1%
    assert "1 of 10 images could not be used (10%" in capsys.readouterr().err
    assert main(["prepare", "--teacher", str(teacher), "--dataset", pattern, "--max-bad-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "9 images, 1 skipped" in out
    [entry] = (cache_dir / "encodings").glob("images-*")
    assert (entry / SKIPPED_LOG).read_text().startswith("00001.tar:000010003\tcannot be decoded")
    assert main(["train", "--teacher", str(teacher), "--dataset", str(shards), "--output", str(tmp_path / "run"),
                 "--max-bad-fraction", "0.2", *TRAIN]) == 0  # a folder of shards is the same data: nothing encoded again  # fmt: skip
    out = capsys.readouterr().out
    assert "encoded 9" not in out and "9 images (1 item skipped: cannot be decoded)" in out


def test_a_missing_shard_in_the_pattern_is_one_line(teacher, tmp_path, capsys):
    pytest.importorskip("webdataset")
    shards = write_shards(tmp_path / "shards", 2, 2)
    assert main(["prepare", "--teacher", str(teacher), "--dataset", str(shards / "{00000..00002}.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "webdataset shard" in err and "00002.tar does not exist" in err


# ------------------------------------------------------------------------------------------ 7. text on the fly
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cached_and_on_the_fly_text_conditioning_agree_to_fp16(family, teachers, tmp_path):
    from fewstep.training.loop.encodings import CachedConditioning, OnTheFlyConditioning, prompt_encoder
    from fewstep.training.teacher.loading import encode_prompts, load_teacher

    pipe, found = load_teacher(str(teachers[family, "epsilon"]))
    texts = ["a red car", "a photo of a cat", "a blue sky", "a green field", "a dog"]
    source = prompt_list_source(texts, "test prompts")
    cache = small_cache(tmp_path, source, part_rows=4, batch=2)  # rows of several parts
    cache.build(prompt_encoder(pipe, found, 32))
    index = torch.tensor([4, 0, 2, 2])
    cached = CachedConditioning(cache.open(), found, 32).select(index)
    fly = OnTheFlyConditioning(pipe, found, 32, texts).select(index)
    direct = encode_prompts(pipe, found, [texts[i] for i in index.tolist()], 32)
    torch.testing.assert_close(fly.prompt_embeds, direct.prompt_embeds)
    torch.testing.assert_close(cached.prompt_embeds, direct.prompt_embeds.half().float())
    if family == "sdxl":  # the pooled embeddings and the micro-conditioning come back too
        torch.testing.assert_close(cached.pooled_prompt_embeds, direct.pooled_prompt_embeds.half().float())
        assert torch.equal(cached.time_ids, direct.time_ids) and torch.equal(fly.time_ids, direct.time_ids)


def test_on_the_fly_text_encoding_trains_without_a_prompts_entry(teacher, prompts, images, cache_dir, tmp_path,
                                                                  capsys):  # fmt: skip
    assert main(["train", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(tmp_path / "run"),
                 "--text-encoding", "on-the-fly", *TRAIN]) == 0  # fmt: skip
    assert not list((cache_dir / "encodings").glob("prompts-*"))
    capsys.readouterr()
    assert main(["train", "--teacher", str(teacher), "--images", str(images), "--output", str(tmp_path / "r2"),
                 "--text-encoding", "on-the-fly", *TRAIN]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--text-encoding on-the-fly needs --prompts FILE" in err
