"""`fewstep train` on a CUDA GPU, the way users run it: bf16 + gradient checkpointing + GAN, and fp16.

Skipped without a GPU (CI has none); run on one with ``pytest -s tests/test_cuda.py``, which prints the numbers.
"""

import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep.training.methods.dmd2 import DMD2TrainConfig, train_dmd2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.fixture(scope="module")
def data(tmp_path_factory, teachers):
    """The ε teachers, two prompts and three captioned 32×32 images."""
    root = tmp_path_factory.mktemp("cuda")
    (root / "prompts.txt").write_text("a photo of a cat\na red car\n")
    images = root / "images"
    images.mkdir()
    for i, caption in enumerate(["a red car", "a photo of a cat", "a blue sky"]):
        Image.new("RGB", (32, 32), (80 * i, 100, 200 - 60 * i)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return {"teachers": {family: teachers[family, "epsilon"] for family in ("sd15", "sdxl")},
            "prompts": root / "prompts.txt", "images": images}  # fmt: skip


def run(data, tmp_path, family, name, **overrides):
    metrics = []
    config = DMD2TrainConfig(
        teacher=str(data["teachers"][family]), output=str(tmp_path / name), prompts=str(data["prompts"]),
        images=str(data["images"]), max_steps=12, gen_rank=8, fake_rank=8, dfake_gen_update_ratio=2,
        checkpoint_every=0, validate_every=0, warmup_steps=2, lr=1e-3, gan_weight=5e-2, **overrides,
    )  # fmt: skip
    run_dir = train_dmd2(config, on_step=lambda step, m: metrics.append(m))
    lora = load_file(run_dir / "checkpoints" / "step-0000012" / "generator.safetensors")
    return torch.cat([lora[k].float().flatten() for k in sorted(lora)]), metrics


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_bf16_with_checkpointing_on_cuda_ends_where_bf16_without_it_does(data, tmp_path, family):
    plain, _ = run(data, tmp_path, family, "plain", mixed_precision="bf16", gradient_checkpointing=False)
    checkpointed, metrics = run(data, tmp_path, family, "ckpt", mixed_precision="bf16", gradient_checkpointing=True)
    difference = float((checkpointed - plain).norm() / plain.norm())
    print(f"\n{family} bf16: generator LoRA relative difference, checkpointing on vs off: {difference:.2e}; "
          f"last losses {({k: round(v, 4) for k, v in metrics[-1].items() if k.startswith('loss')})}")  # fmt: skip
    assert all(math.isfinite(m["loss_fake"]) for m in metrics)
    assert difference < 1e-2  # only CUDA's non-deterministic kernels differ between the two runs


def test_fp16_on_cuda_scales_both_losses_and_stays_finite(data, tmp_path):
    _, metrics = run(data, tmp_path, "sd15", "fp16", mixed_precision="fp16", gradient_checkpointing=True)
    scales = [(m.get("grad_scale_generator"), m["grad_scale_fake_score"]) for m in metrics]  # generator: its turns
    print(f"\nfp16: loss scales (generator, fake score) per iteration {scales}; "
          f"last losses {({k: round(v, 4) for k, v in metrics[-1].items() if k.startswith('loss')})}")  # fmt: skip
    assert all(math.isfinite(m["loss_fake"]) for m in metrics)
    assert all(f > 1 for _, f in scales) and all(g > 1 for g, _ in scales[::2])
