"""The toy shapes world: the embedded default of the trainers, and the benchmarks' ground truth.

- ``world``: deterministic images + captions, the held-in / new-concept split, the demo dataset;
- ``analyzer``: image -> (color, shape) by pixel geometry, and ``score`` against intended specs;
- ``model``: the shipped pretrained tiny SDXL (``load_toy_pipeline``, ``TOY_MODEL_DIR``; the untrained one is
  built by ``bilora_diffusion.testing.build_toy_components``);
- ``evaluate``: prompt a pipeline and score it at the default inference settings.

Submodules are not imported here, so ``world`` and ``analyzer`` load without torch or diffusers.
"""
