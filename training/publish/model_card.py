"""The model card (README.md) ``fewstep push`` writes: it says exactly how to sample this student, everywhere.

What it states: base model and the style LoRAs fused into the teacher, method, steps and the exact timesteps, CFG,
LoRA scale; how to sample in diffusers (the repo's own pipeline, and stock ``LCMScheduler``), in ComfyUI
(fewstep's nodes, or stock KSampler with the settings that hit the trained timesteps, and the settings that do
not), and in A1111/Forge; the sample grid; the training config; metrics; license (inherited from the base).
The recipes come from :mod:`.sampling_recipes`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ...core.distillpp import RECOMMENDED_GUIDED_STEPS, RECOMMENDED_LAMBDA, RECOMMENDED_RULE, RECOMMENDED_TEACHER_CFG
from ...core.lora_format import DIFFUSERS_LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from .sampling_recipes import COMFYUI_WRONG_SCHEDULERS, SamplingRecipe
from ..teacher.style_lora import StyleLora, parse_style_spec

FAMILY_TAGS = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl"}
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL"}
SAMPLE_GRID = "images/samples.png"
PROMPT = "a photo of a cat"


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(name).exists()


def style_loras_of(config: dict) -> list[StyleLora]:
    """The style LoRAs the run fused into its teacher (as recorded in its config), without checking the files."""
    return [parse_style_spec(spec) for spec in config.get("teacher_lora") or []]


def public_config(config: dict, base_model: str) -> dict:
    """The training config as published: no local paths (the output folder is dropped, a local teacher is named
    by the base model's Hub id, style LoRAs and data by their file names)."""
    public = {key: value for key, value in config.items() if key != "output"}
    if not looks_like_hub_id(str(public.get("teacher") or "")):
        public["teacher"] = base_model
    public.pop("teacher_config", None)
    if public.get("teacher_lora"):
        public["teacher_lora"] = [f"{lora.path.name}:{lora.scale:g}" for lora in style_loras_of(config)]
    for key in ("prompts", "images", "dataset"):
        value = public.get(key)
        if value and not looks_like_hub_id(str(value)):
            public[key] = Path(str(value)).name
    return public


def _public_value(value):
    """A local path named by its last part (a Hub id or any other value as it is)."""
    if isinstance(value, dict):
        return {key: _public_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_public_value(item) for item in value]
    if isinstance(value, str) and not looks_like_hub_id(value) and ("/" in value or "\\" in value):
        return Path(value).name
    return value


def public_metrics(metrics: dict) -> dict:
    """A run's metrics as published: an evaluation's settings (``fewstep eval``, ``--eval-every``) without local
    paths (the teacher, LoRA, metric models and real-image folder named by their last part)."""
    if not isinstance(metrics.get("settings"), dict):
        return metrics
    return {**metrics, "settings": _public_value(metrics["settings"])}


def _metrics_section(metrics: dict) -> list[str]:
    """An evaluation's table (rows × FD, CLIP score, ...), or any other metrics.json as metric | value lines."""
    if isinstance(metrics.get("rows"), dict) and "titles" in metrics and "settings" in metrics:
        from ..evaluation.report import markdown_table

        return ["## Metrics", markdown_table(public_metrics(metrics))]
    rows = "\n".join(f"| {key} | {_format_value(value)} |" for key, value in _flatten(metrics))
    return ["## Metrics", "| metric | value |\n|---|---|\n" + rows]


def _flatten(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        rows.extend(_flatten(value, f"{name}.") if isinstance(value, dict) else [(name, value)])
    return rows


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SAMPLING_RULES = {
    "few_step": "predict x0, re-noise it to the next timestep with fresh noise (LCM's rule)",
    "ddim": "deterministic DDIM from pure noise (η = 0; the rule Progressive Distillation trains for)",
}


def _facts_table(run, base_model: str, recipe: SamplingRecipe, styles: list[StyleLora], method) -> str:
    style_text = ", ".join(f"`{s.path.name}` at scale {s.scale:g}" for s in styles) or "none"
    rows = [
        ("base model", f"[{base_model}](https://huggingface.co/{base_model}) ({FAMILY_NAMES[run.family]})"),
        ("style LoRAs fused into the teacher", style_text),
        ("method", method.card_description(run.config)),
        ("steps", str(recipe.steps)),
        ("timesteps", f"`{recipe.timesteps}` (exactly these; other timesteps give blurry or noisy images)"),
        ("CFG", f"{recipe.cfg:g} (guidance is distilled in; the teacher used CFG {run.config.get('guidance_scale')})"),
        ("LoRA scale", f"{recipe.lora_scale:g}"),
        ("sampling rule", SAMPLING_RULES[recipe.sampler]),
    ]
    step = run.recipe.get("step")
    if step is not None:  # an export of an earlier checkpoint says so
        rows.append(("LoRA from training step", f"{step} of {run.config.get('max_steps')}"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _diffusers_sections(repo_id: str, base_model: str, recipe: SamplingRecipe, styles: list[StyleLora]) -> list[str]:
    step_kwargs = f"num_inference_steps={recipe.steps}" if recipe.default_spacing else f"timesteps={recipe.timesteps}"
    if recipe.sampler == "ddim":
        step_kwargs += ', sampler="ddim"'
    style_lines = ""
    if styles:
        style_lines = (
            "# the style LoRAs the teacher had, fused at the same scales (download them first)\n"
            + "".join(
                f'pipe.load_lora_weights("{s.path.name}", adapter_name="{s.adapter_name}")\n' for s in styles
            )
            + f"pipe.set_adapters({[s.adapter_name for s in styles]}, adapter_weights={[s.scale for s in styles]})\n"
            "pipe.fuse_lora(lora_scale=1.0)\npipe.unload_lora_weights()\n"
        )
    return [
        "## Use with diffusers (this repo's pipeline)",
        "Needs only diffusers, transformers, peft and torch: `pipeline.py` and the `fewstep_*.py` modules it imports "
        "are in this repo, and `custom_pipeline=` loads them.",
        "```python\n"
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        "pipe = DiffusionPipeline.from_pretrained(\n"
        f'    "{base_model}", custom_pipeline="{repo_id}", trust_remote_code=True, torch_dtype=torch.float16\n'
        ').to("cuda")\n'
        f"{style_lines}"
        f'pipe.load_lora_weights("{repo_id}")\n'
        f'image = pipe("{PROMPT}", {step_kwargs}).images[0]\n\n'
        "# Distillation++: the base model (the same UNet with the fewstep LoRA disabled) refines the first steps\n"
        "# (the authors' published setting for DMD2 students: rule eps_mix, λ 0.01, 2 steps, teacher CFG 7.5)\n"
        f'image = pipe("{PROMPT}", {step_kwargs}, teacher_guidance={RECOMMENDED_LAMBDA}, '
        f'teacher_guided_steps={RECOMMENDED_GUIDED_STEPS},\n'
        f'             teacher_guidance_rule="{RECOMMENDED_RULE}", '
        f'teacher_guidance_scale={RECOMMENDED_TEACHER_CFG}).images[0]\n'
        "```",
    ] + _plain_diffusers_section(base_model, repo_id, recipe, style_lines)


def _plain_diffusers_section(base_model: str, repo_id: str, recipe: SamplingRecipe, style_lines: str) -> list[str]:
    if recipe.sampler == "ddim":
        intro = (
            "Deterministic DDIM at the trained timesteps: `DDIMScheduler` with trailing spacing, ending at the clean "
            "image (`set_alpha_to_one=True`), guidance off:"
        )
        scheduler = (
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=\"trailing\",\n"
            "                                           set_alpha_to_one=True)\n"
        )
        call = f'image = pipe("{PROMPT}", guidance_scale=0, num_inference_steps={recipe.steps}).images[0]\n'
        name = "DDIMScheduler"
    else:
        intro = "DMD2's sampling rule is LCMScheduler's at these timesteps; pass them explicitly and keep guidance off:"
        scheduler = "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
        call = f'image = pipe("{PROMPT}", guidance_scale=0, timesteps={recipe.timesteps}).images[0]\n'
        name = "LCMScheduler"
    return [
        f"## Use with plain diffusers (stock {name})",
        intro,
        "```python\n"
        "import torch\n"
        f"from diffusers import DiffusionPipeline, {name}\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")\n'
        f"{style_lines}"
        f'pipe.load_lora_weights("{repo_id}")\n'
        f"{scheduler}"
        f"{call}"
        "```",
    ]


def _comfyui_section(recipe: SamplingRecipe, styles: list[StyleLora]) -> list[str]:
    loras = "".join(f"**LoraLoaderModelOnly** `{s.path.name}` (strength {s.scale:g}), then " for s in styles)
    chain = f"Load the base checkpoint, then {loras}**LoraLoaderModelOnly** `{KOHYA_WEIGHT_NAME}` (strength 1.0)."
    sampling = "ddim" if recipe.sampler == "ddim" else "dmd2"
    if recipe.evenly_spaced:
        fewstep_nodes = (
            f"**FewStep KSampler**: steps `{recipe.steps}`, first_timestep `{recipe.first_timestep}`, sampling "
            f"`{sampling}` (samples exactly {recipe.timesteps}; **Distillation++ KSampler** adds teacher guidance)."
        )
    else:
        custom = ",".join(str(t) for t in recipe.timesteps)
        fewstep_nodes = (
            f"**FewStep Scheduler** with timesteps `{custom}` + **FewStep Sampler** (sampling `{sampling}`) in "
            "**SamplerCustom** (cfg 1.0)."
        )
    lines = ["- With the fewstep nodes (ComfyUI-Manager: *fewstep*; they need only ComfyUI): " + fewstep_nodes]
    stock = recipe.comfyui_stock_scheduler
    if stock is not None:
        lines.append(
            f"- With stock nodes: **KSampler** with steps `{recipe.steps}`, cfg `1.0`, sampler "
            f"`{recipe.comfyui_stock_sampler}`, scheduler `{stock}` (hits the trained timesteps exactly; "
            "`sgm_uniform` lands within one timestep of them)."
        )
    elif recipe.first_timestep != 999:
        lines.append(
            f"- Stock KSampler cannot sample this student: it starts at t = {recipe.first_timestep} from noise "
            "scaled by that timestep's σ instead of pure noise. Use the fewstep nodes above."
        )
    else:
        lines.append("- No stock ComfyUI scheduler hits these timesteps; use the fewstep nodes above.")
    lines.append(
        f"- Do not use schedulers {', '.join(f'`{s}`' for s in COMFYUI_WRONG_SCHEDULERS)} (they miss the trained "
        "timesteps), CFG above 1, or **ModelSamplingDiscrete** with sampling `lcm` (LCM's own parameterisation, "
        "which snaps the timesteps to a 50-step grid)."
    )
    return ["## Use in ComfyUI", f"Put `{KOHYA_WEIGHT_NAME}` in `ComfyUI/models/loras/`. {chain}", "\n".join(lines)]


def _a1111_section(recipe: SamplingRecipe, styles: list[StyleLora]) -> list[str]:
    tags = "".join(f"<lora:{s.path.stem}:{s.scale:g}> " for s in styles) + f"<lora:{Path(KOHYA_WEIGHT_NAME).stem}:1>"
    sampler = "Euler" if recipe.sampler == "ddim" else "LCM"  # k-diffusion's Euler in σ is deterministic DDIM
    text = (
        f"Put `{KOHYA_WEIGHT_NAME}` in `models/Lora/`, add `{tags}` to the prompt and generate with sampler "
        f"**{sampler}**, schedule type **SGM Uniform** (or **Simple**), {recipe.steps} step(s), CFG scale 1."
    )
    if recipe.comfyui_stock_scheduler is None:
        text += f" Its schedules do not reach the timesteps {recipe.timesteps} exactly: expect lower quality."
    return ["## Use in AUTOMATIC1111 / Forge", text]


def model_card(run, repo_id: str, base_model: str, license: str) -> str:
    """README.md for a run (:class:`~fewstep.training.publish.hub.Run`): YAML metadata, the sampling facts, usage in each
    tool, samples, training config, metrics, files."""
    from huggingface_hub import ModelCardData

    from ..methods import get_method

    recipe = SamplingRecipe(run.recipe["timesteps"], sampler=run.recipe.get("sampler", "few_step"),
                            method=run.recipe.get("method", "dmd2"))  # fmt: skip
    styles = style_loras_of(run.config)
    method = get_method(recipe.method)
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter",
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["lora", "text-to-image", "diffusers", recipe.method, "fewstep", "distillation", FAMILY_TAGS[run.family],
              f"{recipe.steps}-step"],  # fmt: skip
    )
    name = repo_id.split("/")[-1]
    sections = [
        f"# {name}",
        f"A {recipe.steps}-step student of [{base_model}](https://huggingface.co/{base_model}), distilled with "
        f"{method.paper} by [fewstep](https://github.com/fewstep/fewstep), as a LoRA on the base UNet.",
        "## How to sample",
        _facts_table(run, base_model, recipe, styles, method),
    ]
    if styles:
        sections.append(
            "The teacher was the base model with the style LoRAs above fused in; the fewstep LoRA was trained on "
            "that styled base. Load base + the same style LoRAs (same scales) + this LoRA, in that order."
        )
    if run.sample_grid is not None:
        sections += [
            "## Samples",
            f"![samples]({SAMPLE_GRID})",
            "The run's last validation grid. Top row: the teacher (multi-step, with CFG); bottom row: the student, "
            "same prompts and seeds.",
        ]
    sections += _diffusers_sections(repo_id, base_model, recipe, styles)
    sections += _comfyui_section(recipe, styles)
    sections += _a1111_section(recipe, styles)
    sections += [
        "## Training configuration",
        "Local paths are left out: the training data and style LoRAs are named by file or folder name only, and the "
        "teacher by its Hub id.",
        "```yaml\n" + yaml.safe_dump(public_config(run.config, base_model), sort_keys=False).rstrip() + "\n```",
    ]
    if run.metrics:
        sections += _metrics_section(run.metrics)
    sections += [
        "## Files",
        f"- `{DIFFUSERS_LORA_WEIGHT_NAME}`: diffusers/PEFT LoRA (the adapter config is in the file's metadata)\n"
        f"- `{KOHYA_WEIGHT_NAME}`: the same LoRA in kohya format with its real alpha (ComfyUI, A1111)\n"
        "- `fewstep_recipe.json`: how it samples (timesteps, sampler); the pipeline reads it on `load_lora_weights`\n"
        "- `pipeline.py` + `fewstep_*.py`: the few-step pipeline for `custom_pipeline=` (copied from fewstep)\n"
        "- `config.yaml`: the training configuration",
        f"License: `{license}`, inherited from the base model.",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
