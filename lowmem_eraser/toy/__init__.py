"""The toy concept world: procedural latent videos (colour × shape × motion) and a tiny CogVideoX model of it.

`world` makes, renders and detects the latent videos and their captions; `build` trains the tiny model
(`build_toy_model`), checks it (`quality_gate`) and is the `lowmem-eraser toy build` entry (`toy_build_main`).
The trained model ships in `models/toy/`.
"""
