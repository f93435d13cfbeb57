"""``--dataset``: a Hugging Face ``datasets`` dataset (saved to disk, an image folder, streamed) trains; bad
columns and empty datasets are one line."""

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from fewstep.cli import main
from fewstep.training.data.sources import hf_dataset_source

datasets = pytest.importorskip("datasets")

CAPTIONS = ["a red car", "a photo of a cat", "a blue sky"]
TRAIN = ["--max-steps", "2", "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2",
         "--checkpoint-every", "0", "--validate-every", "0", "--warmup-steps", "1", "--report-to", "none"]  # fmt: skip


def images():
    return [Image.new("RGB", (40, 36), (60 * i, 100, 200 - 50 * i)) for i in range(len(CAPTIONS))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A dataset saved with ``save_to_disk``: ``image`` and ``text`` columns."""
    folder = tmp_path_factory.mktemp("saved")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images(), "text": CAPTIONS}, features=features).save_to_disk(str(folder))
    return folder


def read_dataset(name, **given):
    """(captions, the items with images) of a --dataset, as the encoder reads them."""
    options = dict(dataset=name, image_column=None, caption_column=None, dataset_split="train", streaming=False,
                   max_train_samples=None)  # fmt: skip
    source = hf_dataset_source(SimpleNamespace(**{**options, **given}))
    items = [item for item in source.items() if item.problem is None]
    return [item.caption for item in items], [item for item in items if item.load_image is not None]


def cli_error(capsys, *argv):
    capsys.readouterr()
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_saved_dataset_trains_with_its_images_for_the_gan(teacher, saved, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--teacher", str(teacher), "--output", str(run), "--dataset", str(saved), "--gan-weight",
                 "0.01", *TRAIN])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "training without the GAN loss" not in out.out
    assert not (run / "dataset_images").exists()  # read from the dataset while encoded, not copied into the run
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["images"]["count"] == 3 and summary["prompts"]["count"] == 3
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_image_folder_dataset_reads_captions_and_images(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images()):
        image.save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n"
                                                   for i, c in enumerate(CAPTIONS)))  # fmt: skip
    captions, items = read_dataset(str(folder))
    assert sorted(captions) == sorted(CAPTIONS) and len(items) == 3
    assert items[0].load_image().size == (40, 36)


def test_streaming_reads_at_most_max_train_samples(saved, tmp_path):
    captions, items = read_dataset(str(saved), streaming=True, max_train_samples=2)
    assert captions == CAPTIONS[:2] and len(items) == 2


def test_dataset_without_an_image_column_is_prompt_only(tmp_path):
    folder = tmp_path / "prompts"
    datasets.Dataset.from_dict({"prompt": CAPTIONS}).save_to_disk(str(folder))
    captions, items = read_dataset(str(folder))
    assert captions == CAPTIONS and items == []


def test_wrong_caption_column_names_the_columns_that_exist(teacher, saved, tmp_path, capsys):
    err = cli_error(capsys, "--teacher", str(teacher), "--output", str(tmp_path / "r"), "--dataset", str(saved),
                    "--caption-column", "txt", *TRAIN)  # fmt: skip
    assert "--caption-column 'txt' is not a column of dataset" in err and "its columns: image, text" in err


def test_dataset_without_images_or_captions_is_one_line(teacher, tmp_path, capsys):
    folder = tmp_path / "numbers"
    datasets.Dataset.from_dict({"label": [1, 2, 3]}).save_to_disk(str(folder))
    err = cli_error(capsys, "--teacher", str(teacher), "--output", str(tmp_path / "r"), "--dataset", str(folder), *TRAIN)
    assert "has neither images nor captions (columns: label)" in err


def test_missing_dataset_folder_is_one_line(teacher, tmp_path, capsys):
    err = cli_error(capsys, "--teacher", str(teacher), "--output", str(tmp_path / "r"),
                    "--dataset", str(tmp_path / "nothing"), *TRAIN)  # fmt: skip
    assert "does not exist" in err
