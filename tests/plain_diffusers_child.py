"""Run in a separate interpreter by test_pushed_repo.py: a plain diffusers user loading a pushed fewstep folder.

    python plain_diffusers_child.py BASE_DIR PUSHED_FOLDER OUT.pt [--block-fewstep]

``--block-fewstep`` makes ``import fewstep`` fail before anything else is imported (for an interpreter whose
site-packages has fewstep installed); in a venv without fewstep it is not needed. Writes the sampled latents of
1 and 4 steps, with and without Distillation++, to OUT.pt.
"""

import importlib.abc
import sys


class _NoFewstep(importlib.abc.MetaPathFinder):
    """``import fewstep`` (and any submodule) fails as if the package were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "fewstep" or name.startswith("fewstep."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def main(base_dir: str, folder: str, out: str) -> None:
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)  # as the test suite (conftest.py), so both sides sum in the same order
    try:
        import fewstep  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("fewstep is importable: this check must run without it")
    pipe = DiffusionPipeline.from_pretrained(base_dir, custom_pipeline=folder, trust_remote_code=True)
    pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    results = {"class": type(pipe).__name__}
    for steps in (1, 4):
        for guidance in (0.0, 0.3):
            images = pipe(
                "a cat", num_inference_steps=steps, teacher_guidance=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip
            results[f"{steps}-{guidance}"] = images
    torch.save(results, out)


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--block-fewstep"]
    if "--block-fewstep" in sys.argv:
        sys.meta_path.insert(0, _NoFewstep())
    main(*arguments)
