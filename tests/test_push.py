"""``fewstep push``: the upload folder (model card, LoRA files, pipeline.py), the pushed pipeline loading as
``custom_pipeline``, and a real ``create_repo`` + ``upload_folder`` against a local stand-in for the Hub."""

import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from fake_runs import PIPELINE_CLASSES, PIPELINE_FILES, make_run_dir

from fewstep.cli import main
from fewstep.training.publish.pushed_code import pushed_code

FAMILIES = ["sd15", "sdxl"]
BASE_MODELS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
LICENSES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++"}
REPO_ID = "alice/tiny-dmd2"
TOKEN = "hf_fewstepTestTokenThatMustNeverBePrinted"
PUSHED_MODULES = ["fewstep_common.py", "fewstep_distillpp.py", "fewstep_lora_format.py", "fewstep_sampling.py", "fewstep_schedule.py"]





def dry_run(run, folder, capsys, *extra):
    code = main(["push", str(run), "--repo-id", REPO_ID, "--dry-run", "--folder", str(folder), *extra])
    out = capsys.readouterr().out
    assert code == 0
    return Path(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the folder and card
@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_folder_and_model_card(runs, tmp_path, capsys, family):
    from huggingface_hub import ModelCard

    folder = dry_run(runs[family], tmp_path / "upload", capsys, "--base-model", BASE_MODELS[family])
    assert folder == tmp_path / "upload"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "pytorch_lora_weights.safetensors", "fewstep_comfyui.safetensors", "pipeline.py",
        "config.yaml", "metrics.json", "images/samples.png", "fewstep_recipe.json", *PUSHED_MODULES,
    ])  # fmt: skip
    assert (folder / "pipeline.py").read_text() == pushed_code(family)["pipeline.py"]
    assert (folder / "images" / "samples.png").read_bytes() == (runs[family] / "samples" / "step-0000010.png").read_bytes()

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == BASE_MODELS[family]
    assert card.data.license == LICENSES[family]
    assert card.data.pipeline_tag == "text-to-image"
    assert card.data.library_name == "diffusers"
    assert {"lora", "text-to-image", "diffusers", "dmd2", "fewstep"} <= set(card.data.tags)
    text = card.text
    assert f'custom_pipeline="{REPO_ID}"' in text and f'pipe.load_lora_weights("{REPO_ID}")' in text
    assert "num_inference_steps=4" in text and "teacher_guidance=0.01" in text  # the run's 4 steps, Distillation++
    assert "LCMScheduler" in text and "timesteps=[999, 749, 499, 249]" in text
    assert "ComfyUI" in text and "AUTOMATIC1111" in text and "<lora:fewstep_comfyui:1>" in text
    assert "## Training configuration" in text and "lr: 0.0001" in text
    teacher_folder = yaml.safe_load((runs[family] / "config.yaml").read_text())["teacher"]
    for published in (text, (folder / "config.yaml").read_text()):  # no local paths: the teacher is the base model
        assert teacher_folder not in published and str(runs[family]) not in published
    assert yaml.safe_load((folder / "config.yaml").read_text())["teacher"] == BASE_MODELS[family]
    assert "| accuracy | 0.91 |" in text and "| fd | 12.5 |" in text
    assert "![samples](images/samples.png)" in text


def test_card_without_metrics_or_samples(bases, tmp_path, capsys):
    run = make_run_dir("sd15", tmp_path / "run", str(bases["sd15"]), samples=False, metrics=False)
    folder = dry_run(run, tmp_path / "upload", capsys, "--base-model", BASE_MODELS["sd15"], "--license", "mit")
    text = (folder / "README.md").read_text()
    assert "## Metrics" not in text and "images/samples.png" not in text
    assert "license: mit" in text
    assert not (folder / "metrics.json").exists() and not (folder / "images").exists()


def test_dry_run_defaults_to_a_new_temporary_folder(runs, capsys, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the folder is left for the user: not in the real /tmp
    code = main(["push", str(runs["sd15"]), "--repo-id", REPO_ID, "--dry-run", "--base-model", BASE_MODELS["sd15"]])
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and (folder / "README.md").is_file() and folder.name.startswith("fewstep-push-")
    assert folder.parent == tmp_path


@pytest.mark.parametrize("family", FAMILIES)
def test_pushed_pipeline_file_loads_as_custom_pipeline(bases, runs, tmp_path, capsys, family):
    """``custom_pipeline=<folder with pipeline.py>`` (what the Hub repo is) gives the family's class, and the folder's
    LoRA loads with ``load_lora_weights(folder)`` and samples exactly like the run's."""
    from diffusers import DiffusionPipeline

    folder = dry_run(runs[family], tmp_path / "upload", capsys, "--base-model", BASE_MODELS[family])
    # diffusers caches every local custom pipeline file as the module "local.<file stem>" and re-executes a new
    # file into the cached module, whose namespace still holds the previous file's class: two local
    # pipeline.py files of different families in one process collide ("Multiple classes"). Hub repos do not.
    sys.modules.pop("diffusers_modules.local.pipeline", None)
    pushed = DiffusionPipeline.from_pretrained(str(bases[family]), custom_pipeline=str(folder), trust_remote_code=True)
    assert type(pushed).__name__ == PIPELINE_CLASSES[family]
    pushed.load_lora_weights(str(folder))
    local = DiffusionPipeline.from_pretrained(
        str(bases[family]), custom_pipeline=str(PIPELINE_FILES[family]), trust_remote_code=True
    )
    local.load_lora_weights(str(runs[family]))
    for pipe in (pushed, local):
        pipe.set_progress_bar_config(disable=True)
    a = pushed("a cat", generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = local("a cat", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["--repo-id", REPO_ID], "is a local folder or file, not a Hub id; pass --base-model"),
        (["--repo-id", "no-owner", "--base-model", BASE_MODELS["sd15"]], "--repo-id 'no-owner' must look like USER/NAME"),
        (["--repo-id", REPO_ID, "--base-model", "./local"], "--base-model './local' is not a Hub model id"),
    ],
)
def test_push_bad_input(runs, tmp_path, capsys, args, message):
    assert main(["push", str(runs["sd15"]), *args, "--dry-run", "--folder", str(tmp_path / "f")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_push_incomplete_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["push", str(tmp_path / "run"), "--repo-id", REPO_ID, "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert "has no lora/pytorch_lora_weights.safetensors" in error and len(error.splitlines()) == 1
    assert main(["push", str(tmp_path / "nothing"), "--repo-id", REPO_ID, "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_push_refuses_offline_mode(runs, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(runs["sd15"]), "--repo-id", REPO_ID, "--base-model", BASE_MODELS["sd15"]]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a real upload, locally
class FakeHub(BaseHTTPRequestHandler):
    """The four Hub endpoints ``create_repo`` + ``upload_folder`` need (see diffusers-peft-hub.md, "Hub")."""

    protocol_version = "HTTP/1.1"
    requests: list = []

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        body = self._body()
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.requests.append((self.path, dict(self.headers), body))
        if self.path == "/api/repos/create":
            name = json.loads(body)
            self._reply(200, {"url": f"{endpoint}/{name['organization']}/{name['name']}" if name.get("organization")
                              else f"{endpoint}/{name['name']}"})  # fmt: skip
        elif self.path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
            self._reply(200, {"commitUrl": f"{endpoint}/{REPO_ID}/commit/0123abcd", "commitOid": "0123abcd" * 5})
        else:
            self._reply(404, {"error": f"no route {self.path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield FakeHub.requests
    server.shutdown()
    server.server_close()


def committed_files(body: bytes) -> dict[str, bytes]:
    files = {}
    for line in body.decode().splitlines():
        item = json.loads(line)
        if item["key"] == "file":
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_push_uploads_with_create_repo_and_upload_folder(runs, fake_hub, tmp_path, capsys):
    run = runs["sdxl"]
    code = main(["push", str(run), "--repo-id", REPO_ID, "--private", "--base-model", BASE_MODELS["sdxl"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert TOKEN not in captured.out + captured.err
    assert f"/{REPO_ID}" in captured.out.strip().splitlines()[-1]

    paths = [path for path, _, _ in fake_hub]
    assert paths[0] == "/api/repos/create"
    assert any(path.startswith(f"/api/models/{REPO_ID}/preupload/main") for path in paths)
    assert paths[-1] == f"/api/models/{REPO_ID}/commit/main"
    create = json.loads(fake_hub[0][2])
    assert create["name"] == "tiny-dmd2" and create["organization"] == "alice"
    assert create.get("visibility") == "private" or create.get("private") is True
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, headers, _ in fake_hub)

    files = committed_files(fake_hub[-1][2])
    assert set(files) == {
        "README.md", "pytorch_lora_weights.safetensors", "fewstep_comfyui.safetensors", "pipeline.py", "config.yaml",
        "metrics.json", "images/samples.png", "fewstep_recipe.json", *PUSHED_MODULES,
    }  # fmt: skip
    assert files["pipeline.py"].decode() == pushed_code("sdxl")["pipeline.py"]
    assert files["fewstep_comfyui.safetensors"] == (run / "lora" / "fewstep_comfyui.safetensors").read_bytes()
    assert b"base_model: stabilityai/stable-diffusion-xl-base-1.0" in files["README.md"]


# ------------------------------------------------------------------------------------------ no local paths, no tracebacks
def test_pushed_config_carries_no_local_paths_and_the_card_says_so(bases, tmp_path, capsys):
    run = make_run_dir("sd15", tmp_path / "run", str(bases["sd15"]))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(prompts="/home/alice/private/prompts.txt", images="/home/alice/private/cats")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    folder = dry_run(run, tmp_path / "upload", capsys, "--base-model", BASE_MODELS["sd15"])
    published = yaml.safe_load((folder / "config.yaml").read_text())
    assert published["prompts"] == "prompts.txt" and published["images"] == "cats"
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".md", ".json"):
            text = path.read_text()
            assert "/home/alice" not in text and str(tmp_path) not in text and str(bases["sd15"]) not in text, path
    assert "Local paths are left out" in (folder / "README.md").read_text()


def test_push_folder_that_is_a_file_is_one_line(runs, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    code = main(["push", str(runs["sd15"]), "--repo-id", REPO_ID, "--base-model", BASE_MODELS["sd15"], "--dry-run",
                 "--folder", str(file)])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and f"--folder '{file}' is a file" in error


def test_push_without_network_names_the_host(runs, capsys, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as unused:  # a port nothing listens on: connections are refused at once
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code = main(["push", str(runs["sd15"]), "--repo-id", REPO_ID, "--base-model", BASE_MODELS["sd15"]])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert f"could not reach http://127.0.0.1:{port}" in error and "check the network connection" in error
    assert TOKEN not in error


def test_push_advice_for_a_missing_lora_file_names_the_export_that_writes_it(bases, tmp_path, capsys):
    run = make_run_dir("sd15", tmp_path / "run", str(bases["sd15"]))
    (run / "lora" / "pytorch_lora_weights.safetensors").unlink()
    assert main(["push", str(run), "--repo-id", REPO_ID, "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"`fewstep export {run} --format diffusers`" in error and "comfyui" not in error
