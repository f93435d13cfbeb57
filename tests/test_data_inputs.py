"""Nothing dropped in silence: what a run trains on is counted, printed and recorded; BOMs, CRLF, .json and .csv
prompt files, empty captions, GIFs, 16-bit and palette images, and bad dataset splits and image columns are read
right or refused in one line."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fewstep.training.data.prompts import DataError, load_image_tensor, read_image_folder, read_prompts
from fewstep.training.data.run_data import read_training_data
from fewstep.training.data.sources import hf_dataset_source

datasets = pytest.importorskip("datasets")


def config(**given):
    options = dict(prompts=None, images=None, dataset=None, image_column=None, caption_column=None,
                   dataset_split="train", streaming=False, max_train_samples=None)  # fmt: skip
    return SimpleNamespace(**{**options, **given})


def dataset_items(name, **given):
    """A --dataset's items, in order, as the encoder reads them."""
    return list(hf_dataset_source(config(dataset=name, **given)).items())


def captioned(folder, captions, suffix=".png"):
    """A folder of small images, each with a same-name .txt caption."""
    folder.mkdir(exist_ok=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{i}{suffix}")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    return message


# ------------------------------------------------------------------------------- 1. counts printed and recorded
def test_every_run_prints_and_records_what_it_uses_and_skips(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n  \na car\n")
    images = captioned(tmp_path / "images", ["a red thing", "", "a blue thing"])
    (images / "notes.svg").write_text("<svg/>")
    data = read_training_data(config(prompts=str(prompts), images=str(images)))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"fewstep: data: prompts file {prompts} (3 prompts; 2 empty lines skipped); images folder")
    assert "1 .svg file skipped: unsupported format" in line and "1 empty caption skipped" in line
    assert [item.caption for item in data.prompts.items()] == ["a cat", "a dog", "a car"]
    assert len(list(data.images.items())) == 2
    (tmp_path / "run").mkdir()
    recorded = json.loads(data.summary(3, 2, {}, {}).write(tmp_path / "run").read_text())
    assert recorded["prompts"]["count"] == 3 and recorded["prompts"]["skipped"] == {"empty line": 2}
    assert recorded["images"]["count"] == 2 and recorded["images"]["skipped"]["empty caption"] == 1


# ------------------------------------------------------------------------------------------- 2. BOM and CRLF
def test_a_byte_order_mark_and_crlf_line_endings_are_not_read_into_prompts(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_bytes("\ufeffa cat\r\na dog\r\n\r\n".encode())
    assert read_prompts(text) == ["a cat", "a dog"]
    lines = tmp_path / "prompts.jsonl"
    lines.write_bytes('\ufeff{"prompt": "a cat"}\r\n{"prompt": "a dog"}\r\n'.encode())
    assert read_prompts(lines) == ["a cat", "a dog"]
    images = captioned(tmp_path / "images", ["x"])
    (images / "0.txt").write_bytes("\ufeffa red thing\r\n".encode())
    assert read_image_folder(images)[0].caption == "a red thing"


# --------------------------------------------------------------------------------------- 3. .json and .csv files
def test_json_and_csv_prompt_files_are_read_as_such(tmp_path):
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["a cat", "a dog"]))
    assert read_prompts(listed) == ["a cat", "a dog"]
    listed.write_text(json.dumps([{"caption": "a cat"}, {"prompt": "a dog"}]))
    assert read_prompts(listed) == ["a cat", "a dog"]
    table = tmp_path / "p.csv"
    table.write_text('id,prompt\r\n1,"a cat, sitting"\r\n2,"a ""quoted"" dog"\r\n')
    assert read_prompts(table) == ["a cat, sitting", 'a "quoted" dog']


def test_json_and_csv_prompt_files_of_another_shape_are_refused_naming_the_fix(tmp_path):
    table = tmp_path / "p.csv"
    table.write_text("a cat,1\na dog,2\n")
    assert "header row" in one_line_error(read_prompts, table)
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps({"prompts": ["a cat"]}))
    assert "not a list" in one_line_error(read_prompts, listed)


# ---------------------------------------------------------------------------------------------- 4. empty captions
def test_empty_captions_are_skipped_and_all_empty_is_one_line(tmp_path):
    items = read_image_folder(captioned(tmp_path / "images", ["a red thing", " \n"]))
    assert [item.caption for item in items] == ["a red thing"]
    meta = captioned(tmp_path / "meta", ["", ""])
    lines = [{"file_name": "0.png", "text": "a car"}, {"file_name": "1.png", "text": ""}]
    (meta / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [item.caption for item in read_image_folder(meta)] == ["a car"]
    assert "empty" in one_line_error(read_image_folder, captioned(tmp_path / "blank", ["", " "]))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a cat", "", "a dog"]}).save_to_disk(str(saved))
    assert [i.caption for i in dataset_items(str(saved)) if i.problem is None] == ["a cat", "a dog"]
    assert [i.problem for i in dataset_items(str(saved))] == [None, "empty caption", None]


# ------------------------------------------------------------------------------------------- 5. GIFs and others
def test_a_gif_is_read_as_its_first_frame_and_said_so(tmp_path, capsys):
    images = captioned(tmp_path / "images", ["a red thing"])
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(images / "1.gif", save_all=True, append_images=frames[1:])
    (images / "1.txt").write_text("a flashing thing")
    read_training_data(config(images=str(images)))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(2 images; 1 animated image: first frame used)" in line
    red = load_image_tensor(images / "1.gif", 16)
    assert red[0].mean() > 0.9 and red[2].mean() < -0.9


# ---------------------------------------------------------------------------------- 6. 16-bit and palette images
def test_16_bit_palette_and_transparent_images_keep_their_colours(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert abs(float(load_image_tensor(tmp_path / "grey16.png", 8).mean())) < 0.02  # mid-grey, not white
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert load_image_tensor(tmp_path / "palette.png", 8)[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    Image.new("LA", (8, 8), (128, 255)).save(tmp_path / "grey-alpha.png")
    assert abs(float(load_image_tensor(tmp_path / "grey-alpha.png", 8).mean())) < 0.02
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image_tensor(tmp_path / "clear.png", 8).min() == 1.0  # transparent: the white backdrop


def test_a_16_bit_dataset_image_is_read_mid_grey(tmp_path):
    saved = tmp_path / "saved"
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [grey], "text": ["grey"]}, features=features).save_to_disk(str(saved))
    assert dataset_items(str(saved))[0].load_image().getpixel((0, 0)) == (128, 128, 128)


# ------------------------------------------------------------------------- 7. dataset splits and image columns
def test_a_split_a_saved_dataset_does_not_have_is_refused_naming_its_split(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a cat"]}, split="validation").save_to_disk(str(saved))
    message = one_line_error(dataset_items, str(saved), dataset_split="test")
    assert "no split 'test'" in message and "validation" in message
    assert [item.caption for item in dataset_items(str(saved), dataset_split="validation")] == ["a cat"]


def test_an_image_column_without_images_is_refused_naming_the_columns_with_images(tmp_path):
    saved = tmp_path / "saved"
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "text": ["a red thing"]},
                               features=features).save_to_disk(str(saved))  # fmt: skip
    message = one_line_error(dataset_items, str(saved), image_column="text")
    assert "--image-column 'text'" in message and "string" in message and "image" in message.split(";")[-1]
