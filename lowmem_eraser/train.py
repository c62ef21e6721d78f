"""`lowmem-eraser train`: the T2VUnlearning training loop, top to bottom in one file.

One frozen transformer serves both kinds of pass: the original model θ (adapters off, no grad) and the
erased model θ' (adapters on, grad to the fp32 adapters only). Each memory trick is a module behind one
config switch: `memory.quantize` (quantize.py), `memory.gradient_checkpointing` (adapter.py replays the
adapter switches at recomputation), `memory.offload` (offload.py), `memory.kernels` (kernels/); the text
encoder runs once and is freed before the transformer loads (text.py) and the VAE is never loaded.

    v_neg = v_θ(x_t, ∅) − η·(v_θ(x_t, c) − v_θ(x_t, ∅))      (loss.anchor: preservation puts c_pre in place of ∅)
    L = ‖v_θ'(x_t, c) − v_neg‖² + α·L_loc + β·‖v_θ'(x_t, c_pre) − v_θ(x_t, c_pre)‖²
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from . import runfolder
from .activation_offload import offload_activations
from .adapter import attach_erasers, erasers_disabled
from .attack import AdversarialPrompts, SoftPrompt, learn_soft_prompt, with_soft_prompt
from .config import TrainConfig, TrainLoopConfig, concept_pairs, validate
from .errors import LowmemEraserError
from .families import block_count, family_of, runtime_of_folder, transformer_config_json
from .loading import from_pretrained_or_error, model_files
from .localization import ConceptMaskCapture
from .lowram_load import load_transformer_blockwise
from .memory import MemoryMeter, configure_cuda_allocator, return_freed_memory, tensor_bytes
from .offload import BlockOffloader, streamed_indices
from .quantize import quantize_base, resolve_backend
from .sampling import (expert_groups, generate_clean_latents, latent_frames, make_pipeline, pipeline_experts, renoise,
                       runtime_of, step_extras, trajectory)
from .serialization import atomic_write, save_erasers
from .plots import plot_losses
from .text import PromptEmbeddings, cache_key, encode_prompts
from .tracking import make_tracker
from .validation import encode_validation_prompts, run_validation

logger = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_BAD_STEPS = 10  # consecutive non-finite steps before giving up


class TrainingError(LowmemEraserError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


def load_transformer(config: TrainConfig, dtype: torch.dtype, device: torch.device, cache: Path | None = None,
                     subfolder: str = "transformer"):
    """The one frozen base, optionally 8-bit, with the first `memory.offload` blocks streamed from the host
    (`subfolder`: which of the pipeline's transformers, Wan2.2 A14B: "transformer" or "transformer_2").

    `memory.blockwise_load` reads and quantises it block by block (lowram_load.py: host RAM holds one
    full-precision block, plus the streamed blocks); otherwise it is loaded whole on the CPU, quantised there and
    moved. `memory.int8_cache` keeps the quantised copy in `cache` for the next run."""
    import diffusers

    memory = config.memory
    backend = "none" if memory.quantize == "none" else resolve_backend(memory.quantize, device)
    transformer_class = getattr(diffusers, runtime_of_folder(config.model).transformer_class)
    depth = block_count(transformer_class.load_config(config.model / subfolder))
    streamed = memory.streamed_blocks(depth) if device.type == "cuda" else 0
    if memory.offload != "none" and device.type != "cuda":
        logger.info("memory.offload: %s needs CUDA; on this device every weight stays where it is (no-op)",
                    memory.offload)
    if memory.blockwise_load:
        transformer = load_transformer_blockwise(
            config.model / subfolder, dtype, backend, device, host_blocks=streamed_indices(streamed, depth),
            int8_cache=cache if memory.int8_cache else None)
    else:
        transformer = from_pretrained_or_error(transformer_class, config.model / subfolder, torch_dtype=dtype)
        transformer.requires_grad_(False)
        if backend != "none":
            quantize_base(transformer, backend=backend)
        stacks = family_of(transformer).stacks or (family_of(transformer).blocks,)
        for name, module in transformer.named_children():
            if name not in stacks or not streamed:  # BlockOffloader places the stacks' blocks itself
                module.to(device)
        return_freed_memory()  # the full-precision weights quantize_base replaced
    if memory.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if streamed:  # streams the first `streamed` blocks, moves the others to the device
        BlockOffloader(transformer, device, blocks=streamed).attach()
    return transformer


def load_scheduler(model: Path):
    import diffusers

    with model_files(model / "scheduler", "scheduler"):
        scheduler_config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        return getattr(diffusers, scheduler_config["_class_name"]).from_pretrained(model / "scheduler")


def lr_factor(train: TrainLoopConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def velocity(transformer, x_t, t, text, extras):
    """The transformer's prediction in its own space (CogVideoX: v; flow-matching families: the flow velocity)
    for latents x_t (CogVideoX [B, F, C, H, W], Wan and HunyuanVideo [B, C, F, H, W]) at timesteps t, text
    condition `text` (embeddings [B, L, D]; HunyuanVideo: with mask and pooled vector), called the way the
    family's pipeline calls it; `extras`: sampling.step_extras (CogVideoX-5b rotary embeddings, HunyuanVideo
    guidance, else None)."""
    return runtime_of(transformer).velocity(transformer, x_t, t, text, extras)


@dataclass
class StepInputs:
    """One training step's batch: everything `eraser_losses_backward` takes besides the model, its erasers and
    the loss config. The loop builds one per step; the planner and the benchmarks build random ones of the same
    shapes (plan.step_inputs), so that all of them run the same step.

    `extras`: what the family's transformer takes besides x_t, t and the text (sampling.step_extras): CogVideoX-5b's
    rotary embeddings, HunyuanVideo's guidance (a float), else None. `frames`: latent frames (the L_loc mask's).
    `eta`: the negative guidance strength, a float or one per sample (a tensor [B], e.g. each sample's concept's
    in a run of several concepts); None: `loss.eta`. `adversarial`: this step's adversarial prompts (below)."""

    x_t: torch.Tensor
    t: torch.Tensor
    c: Any  # [B, L, D], or the family's text condition (HunyuanText)
    empty: Any
    c_pre: Any
    concept_tokens: torch.Tensor | None  # [B, L] bool: the concept's token positions in c (None: no L_loc)
    extras: Any
    frames: int
    eta: float | torch.Tensor | None = None
    adversarial: AdversarialPrompts | None = None

    @property
    def nbytes(self) -> int:
        def tensors(value) -> list:
            if isinstance(value, torch.Tensor):
                return [value]
            if isinstance(value, (tuple, list)):
                return list(value)
            return [getattr(value, name) for name in ("embeds", "mask", "pooled") if hasattr(value, name)]

        held = [self.x_t, self.t, *tensors(self.c), *tensors(self.empty), *tensors(self.c_pre),
                *tensors(self.concept_tokens), *tensors(self.extras)]
        return tensor_bytes(held)

    def select(self, positions: torch.Tensor) -> "StepInputs":
        """The samples at batch `positions` (a CPU index tensor); the adversarial prompts get fresh `learned`."""
        on_device = positions.to(self.x_t.device)
        adversarial = self.adversarial
        if adversarial is not None:
            adversarial = AdversarialPrompts(adversarial.spec,
                                             None if adversarial.start is None else adversarial.start[positions])
        return replace(self, x_t=self.x_t[on_device], t=self.t[on_device], c=self.c[on_device],
                       empty=self.empty[on_device], c_pre=self.c_pre[on_device],
                       concept_tokens=None if self.concept_tokens is None else self.concept_tokens[positions],
                       eta=self.eta[positions.to(self.eta.device)] if torch.is_tensor(self.eta) else self.eta,
                       adversarial=adversarial)


def eraser_losses_backward(transformer, erasers, batch: StepInputs, loss_cfg, activations=None) -> dict:
    """One T2VUnlearning step's passes on `batch`: computes the losses and accumulates their gradients in the
    adapters.

    `activations`: a context manager entered around each pass that builds a graph (the student passes), e.g.
    activation_offload.offload_activations(...); None keeps saved activations where autograd puts them.
    `batch.adversarial` (every `loss.adversarial.every` steps): before the erased model's passes, an inner loop
    learns soft-prompt vectors in c that make the current erasers reproduce v_θ(x_t, c) (attack.learn_soft_prompt:
    gradients to the vectors only, on this step's x_t and t, one graph at a time; from `adversarial.start`, the
    result left in `adversarial.learned`), and a further pass trains the erasers toward v_neg under them:
    + loss.adversarial.weight·‖v_θ'(x_t, [c; s]) − v_neg‖² ("adv").
    Returns the detached loss terms {"loss", "unlearn", "loc", "pre", "adv"}. Used by the loop below and by the
    benchmarks and the memory planner, so that all of them measure the same step.
    """
    x_t, t, c, empty, c_pre = batch.x_t, batch.t, batch.c, batch.empty, batch.c_pre
    concept_tokens, extras, frames = batch.concept_tokens, batch.extras, batch.frames
    eta, adversarial = batch.eta, batch.adversarial
    saving = activations if activations is not None else contextlib.nullcontext()
    # The original model θ: adapters off, no grad. The concept mask comes from its v(x_t, c) pass.
    anchored = loss_cfg.anchor == "preservation"  # v_neg starts from v(x_t, c_pre) instead of v(x_t, ∅)
    with torch.no_grad(), erasers_disabled(transformer):
        if loss_cfg.alpha > 0:
            with ConceptMaskCapture(transformer, concept_tokens, frames) as capture:
                v_c = velocity(transformer, x_t, t, c, extras)
            mask = capture.mask(loss_cfg.mask_threshold)
        else:
            v_c = velocity(transformer, x_t, t, c, extras)
        v_anchor = velocity(transformer, x_t, t, c_pre if anchored else empty, extras)
        v_anchor = v_anchor.float()  # fp32 before the difference: eta amplifies its rounding error
        if eta is None:
            eta = loss_cfg.eta
        elif torch.is_tensor(eta):  # [B], broadcast over the prediction's other dims
            eta = eta.to(v_anchor.device, v_anchor.dtype).reshape(-1, *[1] * (v_anchor.dim() - 1))
        v_neg = v_anchor - eta * (v_c.float() - v_anchor)
        v_neg_adv = v_neg
        if adversarial is None:
            del v_c
        elif loss_cfg.adversarial.eta is not None:
            v_neg_adv = v_anchor - loss_cfg.adversarial.eta * (v_c.float() - v_anchor)
        v_pre = None
        if loss_cfg.beta > 0:
            v_pre = (v_anchor if anchored else velocity(transformer, x_t, t, c_pre, extras)).float()
        del v_anchor

    soft = None
    if adversarial is not None:  # the vectors that bring the concept back under the current erasers (base frozen)
        soft, _ = learn_soft_prompt(transformer, c, adversarial.spec, lambda i: (x_t, t, v_c), extras,
                                    activations=activations, start=adversarial.start)
        adversarial.learned = soft
        del v_c

    # The erased model θ': adapters on, gradients to the adapters; L_loc collected inside the blocks.
    loc = torch.zeros((), device=x_t.device)
    if loss_cfg.alpha > 0:
        with erasers.collecting_localization(mask) as terms, saving:
            v_erased = velocity(transformer, x_t, t, c, extras)
        loc = torch.stack(terms).mean()
    else:
        with saving:
            v_erased = velocity(transformer, x_t, t, c, extras)
    unlearn = F.mse_loss(v_erased.float(), v_neg)
    (unlearn + loss_cfg.alpha * loc).backward()
    del v_erased
    adv = torch.zeros((), device=x_t.device)
    if soft is not None:  # a graph of its own, built after the first one is freed
        with saving:
            v_erased_adv = velocity(transformer, x_t, t, with_soft_prompt(c, soft), extras)
        adv = F.mse_loss(v_erased_adv.float(), v_neg_adv)
        (loss_cfg.adversarial.weight * adv).backward()
        del v_erased_adv
    del v_neg, v_neg_adv
    pre = torch.zeros((), device=x_t.device)
    if loss_cfg.beta > 0:  # a second graph, built after the first one is freed
        with saving:
            v_erased_pre = velocity(transformer, x_t, t, c_pre, extras)
        pre = F.mse_loss(v_erased_pre.float(), v_pre)
        (loss_cfg.beta * pre).backward()
    unlearn, loc, pre, adv = unlearn.detach(), loc.detach(), pre.detach(), adv.detach()
    weight = loss_cfg.adversarial.weight
    return {"loss": unlearn + loss_cfg.alpha * loc + loss_cfg.beta * pre + weight * adv, "unlearn": unlearn,
            "loc": loc, "pre": pre, "adv": adv}


def warn_missing_concept(concept: str, prompts: list[str], concept_tokens: torch.Tensor, max_length: int) -> None:
    """One warning naming the target prompts whose concept mask is empty: the concept is not in the prompt, or it
    is but the family's max length (after its prompt template) cut it off."""
    from .localization import concept_spans

    missing = [prompt for prompt, row in zip(prompts, concept_tokens) if not row.any()]
    if not missing:
        return
    cut = [p for p in missing if concept_spans(p, concept)]
    absent = [p for p in missing if not concept_spans(p, concept)]
    parts = []
    if cut:
        parts.append(f"cut off by the {max_length}-token text length: " + "; ".join(repr(p) for p in cut[:5])
                     + (f" and {len(cut) - 5} more" if len(cut) > 5 else ""))
    if absent:
        parts.append("not in the prompt: " + "; ".join(repr(p) for p in absent[:5])
                     + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))
    logger.warning("the concept %r has no tokens in %d of %d target prompts (their L_loc mask is empty), %s",
                   concept, len(missing), len(prompts), "; ".join(parts))


def experts_losses_backward(pipe, sets, batch: StepInputs, loss_cfg, activations=None) -> dict:
    """`eraser_losses_backward` on the pipeline's expert that serves the batch's timesteps (one expert: the whole
    batch). Wan2.2 A14B: the samples at t >= boundary train `transformer`'s erasers, the others `transformer_2`'s,
    each on the mean loss of its own samples; the returned terms are averaged over the whole batch. A per-sample
    eta and the adversarial prompts are split with the batch."""
    experts, groups = pipeline_experts(pipe), expert_groups(pipe, batch.t)
    if len(groups) == 1:
        k = groups[0][0]
        return eraser_losses_backward(experts[k], sets[k], batch, loss_cfg, activations=activations)
    total: dict[str, torch.Tensor] = {}
    adversarial, size = batch.adversarial, batch.t.shape[0]
    for k, positions in groups:
        part = batch.select(positions)
        terms = eraser_losses_backward(experts[k], sets[k], part, loss_cfg, activations=activations)
        if adversarial is not None:  # each expert's samples' vectors back in the batch's order
            if adversarial.learned is None:
                c = batch.c
                adversarial.learned = c.new_zeros(c.shape[0], adversarial.spec.tokens, c.shape[2], dtype=torch.float32)
            adversarial.learned[positions.to(batch.x_t.device)] = part.adversarial.learned
        for name, value in terms.items():
            total[name] = total.get(name, 0) + value * (len(positions) / size)
    return total


def cached(path: Path, make):
    """Load `path` if present, else build it with `make()` and write it atomically."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


def training_state(step: int, erasers, optimizer, generator, bad_steps: int, run: dict,
                   adversarial_vectors: torch.Tensor | None = None) -> dict:
    """Everything a bit-exact resume needs (`run`: the fingerprint and config it was trained with;
    `adversarial_vectors`: adversarial training's per-prompt vectors, kept between visits)."""
    state = {
        "step": step,
        "erasers": erasers.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "bad_steps": bad_steps,
        **run,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if adversarial_vectors is not None:
        state["adversarial_vectors"] = adversarial_vectors
    return state


def save_checkpoint(out: Path, step: int, erasers, optimizer, generator, bad_steps: int, run: dict, keep: int,
                    adversarial_vectors: torch.Tensor | None = None):
    """`checkpoint/step-N/` = training_state.pt + the published eraser, as one unit (runfolder.save_checkpoint)."""
    state = training_state(step, erasers, optimizer, generator, bad_steps, run, adversarial_vectors)
    return runfolder.save_checkpoint(out, step, state, lambda folder: save_erasers(erasers, folder,
                                                                                   metadata={"step": step}), keep)


def restore(state: dict, erasers, optimizer, generator) -> tuple[int, int]:
    try:
        erasers.load_state_dict(state["erasers"])
    except RuntimeError as exc:
        raise TrainingError(f"--resume: the checkpoint's erasers do not fit this model/rank: "
                            f"{str(exc).splitlines()[0]}") from None
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["bad_steps"]


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train an eraser as configured; returns the output folder (published eraser format + sidecar).

    The folder is locked for the run; a folder that holds a run needs `resume` or `overwrite`. A stop signal
    (Ctrl-C, SIGTERM, SIGHUP) ends the run with `TrainingInterrupted` after saving what can be resumed."""
    validate(config)
    configure_cuda_allocator()  # before anything touches CUDA
    out = Path(config.output_dir)
    lock = runfolder.prepare(out, resume, overwrite)
    try:
        with runfolder.StopSignals() as signals:
            return _train(config, resume, out, signals)
    finally:
        lock.release()


def _train(config: TrainConfig, resume: bool, out: Path, signals) -> Path:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.memory.dtype]
    pairs = concept_pairs(config)  # one list of pairs per concept (one concept: one list)
    # one concept: its pairs, as the fingerprint always had them; several: each concept's list (its split counts)
    run = {"fingerprint": runfolder.fingerprint(config.to_dict(), pairs[0] if len(pairs) == 1 else pairs),
           "config": config.to_dict()}
    checkpoint = None
    if resume:
        checkpoint, folder = runfolder.load_checkpoint(out)
        runfolder.check_resume(checkpoint.get("fingerprint"), run["fingerprint"], checkpoint["step"],
                               config.train.steps)
        _log_safe_changes(checkpoint.get("config"), run["config"])
        logger.info("resuming from %s (step %d)", folder, checkpoint["step"])
    # a missing tracking package fails here, before any work; on resume it drops the events of the redone steps
    tracker = make_tracker(config.report_to, out, config.to_dict(), start_step=checkpoint["step"] if checkpoint else 0)
    try:
        return _run(config, resume, out, signals, device, dtype, pairs, run, tracker, checkpoint)
    finally:
        tracker.close()


def draw_pairs(sizes: list[int], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices [batch_size] into the concatenated pairs of concepts with `sizes` pairs each: one concept, uniform
    over its pairs (the draw every single-concept run made); several, balanced: each slot picks a concept
    uniformly, then one of its pairs uniformly, so that a concept with fewer pairs is trained as often."""
    if len(sizes) == 1:
        return torch.randint(0, sizes[0], (batch_size,), generator=generator)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    concepts = torch.randint(0, len(sizes), (batch_size,), generator=generator).tolist()
    return torch.tensor([offsets[k] + int(torch.randint(0, sizes[k], (), generator=generator)) for k in concepts])


def _encode_concepts(config: TrainConfig, entries, pairs, max_length, dtype, device, cache):
    """Every concept's prompts encoded with its own concept words (one cache file each), concatenated in the
    entries' order; a warning per concept whose words have no tokens in some of its target prompts."""
    runtime = runtime_of_folder(config.model)
    texts = [encode_prompts(config.model, its_pairs, entry.concept, max_length, dtype, device, cache,
                            placement=config.memory.text_encoder) for entry, its_pairs in zip(entries, pairs)]
    if config.loss.alpha > 0:
        for entry, its_pairs, its_text in zip(entries, pairs, texts):
            warn_missing_concept(entry.concept, [target for target, _ in its_pairs], its_text.concept_tokens,
                                 max_length)
    if len(texts) == 1:
        return texts[0]
    return PromptEmbeddings(target=runtime.concat([text.target for text in texts]),
                            preserve=runtime.concat([text.preserve for text in texts]), empty=texts[0].empty,
                            concept_tokens=torch.cat([text.concept_tokens for text in texts]))


def _run(config: TrainConfig, resume: bool, out: Path, signals, device, dtype, concepts_pairs, run: dict, tracker,
         checkpoint: dict | None) -> Path:
    loss_cfg, loop, video = config.loss, config.train, config.video
    adversarial = loss_cfg.adversarial
    entries = config.concept_entries()
    pairs = [pair for its_pairs in concepts_pairs for pair in its_pairs]  # every concept's, in the entries' order
    sizes = [len(its_pairs) for its_pairs in concepts_pairs]
    # one eta per pair (its concept's); one concept: None, the loss's own eta, as single-concept runs always had
    pair_eta = None if len(entries) == 1 else torch.tensor(
        [entry.eta for entry, size in zip(entries, sizes) for _ in range(size)], dtype=torch.float32)
    concept_key = entries[0].concept if len(entries) == 1 else [entry.concept for entry in entries]
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False)))
    torch.manual_seed(loop.seed)
    phase = "text encoding"
    try:
        # 1. Text: every prompt encoded once (cached on disk), the encoder freed before the transformer loads.
        max_length = runtime_of_folder(config.model).max_text_length(transformer_config_json(config.model))
        text = _encode_concepts(config, entries, concepts_pairs, max_length, dtype, device, out / "cache")
        validation = config.validation
        if validation.every > 0:  # encoded now: the text encoder is gone once training runs
            validation_text = encode_validation_prompts(config.model, validation.prompts, max_length, dtype, device,
                                                        out / "cache", placement=config.memory.text_encoder)

        # 2. One frozen base (optionally int8, streamed), fp32 adapters on top; Wan2.2 A14B: one per expert, each
        # with its own erasers (one optimiser, one file: transformer_2's under its key prefix).
        phase = "loading the transformer"
        experts = runtime_of_folder(config.model).experts(config.model)
        transformers = [load_transformer(config, dtype, device, out / "cache", name) for name in experts]
        sets = [attach_erasers(t, rank=config.eraser.rank, expert=name if len(experts) > 1 else None)
                for t, name in zip(transformers, experts)]
        for eraser_set in sets:
            eraser_set.to(device)
            eraser_set.kernels = config.memory.kernels
        erasers = sets[0] if len(sets) == 1 else torch.nn.ModuleList(sets)  # what the optimiser and state hold
        transformer = transformers[0]
        if config.memory.offload_activations and device.type != "cuda":
            logger.info("memory.offload_activations needs CUDA; on this device activations stay where they are")
        activations = offload_activations(config.memory.offload_activations and device.type == "cuda", device,
                                          model=transformer if len(sets) == 1 else torch.nn.ModuleList(transformers))
        scheduler = load_scheduler(config.model)
        pipe = make_pipeline(transformer, scheduler, config.model, *transformers[1:])
        pipe.set_progress_bar_config(disable=True)
        extras = step_extras(pipe, video, config.sampling.guidance_scale, device)
        frames = latent_frames(video.frames)

        # 3. x0 for `renoise` (and adversarial steps, which draw x_t as the attack does): one sample per target
        # prompt from the frozen model, each cached as soon as it exists.
        if config.sampling.mode == "renoise" or adversarial.every > 0:
            phase = "x0 generation"
            sampling = {k: v for k, v in config.to_dict()["sampling"].items() if k != "batch_size"}  # x0 ignores it
            settings = [cache_key(config.model, pairs, concept_key, max_length, dtype), loop.seed,
                        sampling, config.to_dict()["video"], config.memory.quantize]
            x0_dir = out / "cache" / f"x0-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]}"
            x0 = generate_clean_latents(pipe, text.target, text.empty, video, config.sampling, loop.seed, device,
                                        cache_dir=x0_dir)
    except (runfolder.Stop, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, runfolder.Stop) else signal.SIGINT
        raise runfolder.TrainingInterrupted(
            f"interrupted during {phase}: what is done is cached in {out / 'cache'} (text embeddings, every "
            f"finished x0); run the same command again{' with --resume' if resume else ' with --overwrite'} "
            "to continue from there", signum) from None

    # 4. Optimiser on the fp32 adapter parameters only; all sampling randomness from one saved generator.
    optimizer = torch.optim.AdamW(erasers.parameters(), lr=loop.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(loop.seed)
    start, bad_steps = 0, 0
    if checkpoint is not None:
        start, bad_steps = restore(checkpoint, erasers, optimizer, generator)
    # adversarial training: each target prompt's vectors, from its own values, kept between its visits (CPU)
    adversarial_vectors = None
    if adversarial.every > 0:
        adversarial_vectors = text.target[:, text.target.shape[1] - adversarial.tokens:].float().clone()
        if checkpoint is not None:  # the fingerprint matched, so a checkpoint without them is damaged
            saved = checkpoint.get("adversarial_vectors")
            if saved is None or saved.shape != adversarial_vectors.shape:
                raise TrainingError(f"--resume: the checkpoint has no adversarial vectors of shape "
                                    f"{tuple(adversarial_vectors.shape)} (loss.adversarial is on): it is damaged; "
                                    "resume from another checkpoint/step-N or start again with --overwrite")
            adversarial_vectors = saved
    inner = SoftPrompt(adversarial.tokens, adversarial.inner_steps, adversarial.lr)
    metrics_path = out / "metrics.jsonl"
    kept = metrics_path.read_text().splitlines() if resume and metrics_path.is_file() else []
    atomic_write(metrics_path, lambda tmp: tmp.write_text(
        "".join(f"{line}\n" for line in kept if json.loads(line)["step"] < start)))

    def checkpoint_now(step_count: int):
        return save_checkpoint(out, step_count, erasers, optimizer, generator, bad_steps, run, loop.keep_checkpoints,
                               adversarial_vectors)

    done = step = start  # steps completed, step in progress
    step_rng = generator.get_state()
    bar = tqdm(range(start, loop.steps), initial=start, total=loop.steps, desc="erasing", dynamic_ncols=True)
    try:
        meter = MemoryMeter(device)
        with metrics_path.open("a") as metrics:
            for step in bar:
                began = time.perf_counter()
                step_rng = generator.get_state()  # an interrupted step is redone from here on --resume
                lr = loop.lr * lr_factor(loop, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                index = draw_pairs(sizes, loop.batch_size, generator)
                c, c_pre = text.target[index].to(device), text.preserve[index].to(device)
                empty = text.empty.expand_as(c).to(device)
                attacking = adversarial.every > 0 and step % adversarial.every == 0
                if config.sampling.mode == "renoise" or attacking:
                    x_t, t = renoise(transformer, scheduler, x0[index], generator,
                                      config.sampling.num_inference_steps)
                else:
                    x_t, t = trajectory(pipe, text.target[index], text.empty, video, config.sampling, generator, device)
                x_t, t = x_t.to(device, dtype), t.to(device)

                attack = None
                if attacking:
                    attack = AdversarialPrompts(inner, adversarial_vectors[index].to(device))
                batch = StepInputs(x_t, t, c, empty, c_pre, text.concept_tokens[index], extras, frames,
                                   eta=None if pair_eta is None else pair_eta[index], adversarial=attack)
                with meter.step():
                    losses = experts_losses_backward(pipe, sets, batch, loss_cfg, activations=activations)
                loss, unlearn, loc, pre = losses["loss"], losses["unlearn"], losses["loc"], losses["pre"]

                grad_norm = torch.nn.utils.clip_grad_norm_(erasers.parameters(), loop.grad_clip)
                skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
                if skipped:  # NaN/Inf guard: never let a non-finite update reach the weights
                    bad_steps += 1
                    if bad_steps >= MAX_BAD_STEPS:
                        raise TrainingError(
                            f"step {step}: loss or gradients non-finite {bad_steps} steps in a row; stopping. "
                            "Lower train.lr or loss.eta, or use memory.dtype: bfloat16 instead of float16"
                        )
                else:
                    bad_steps = 0
                with signals.deferred():  # the update, the metrics row and a checkpoint are one unit
                    if not skipped:
                        optimizer.step()
                        if attack is not None:  # a prompt drawn twice in the batch keeps its last sample's
                            adversarial_vectors[index] = attack.learned.cpu()
                    optimizer.zero_grad(set_to_none=True)

                    seconds = time.perf_counter() - began
                    row = {
                        "step": step, "loss": loss.item(), "unlearn": unlearn.item(), "loc": loc.item(),
                        "pre": pre.item(), "adv": losses["adv"].item(), "lr": lr, "grad_norm": grad_norm.item(),
                        "skipped": skipped, "s_per_step": seconds, "peak_mem_mib": meter.peak_bytes / 2**20,
                    }
                    if meter.reserved_bytes is not None:  # CUDA: what the card holds, allocator slack included
                        row["peak_reserved_mib"] = meter.reserved_bytes / 2**20
                    if step % loop.log_every == 0 or step == loop.steps - 1:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        tracker.log(row, step)
                    done = step + 1
                    if done % loop.save_every == 0 and done < loop.steps:
                        checkpoint_now(done)
                bar.set_postfix(loss=f"{row['loss']:.4g}", unlearn=f"{row['unlearn']:.4g}", loc=f"{row['loc']:.3g}",
                                pre=f"{row['pre']:.3g}", s_step=f"{seconds:.2f}", peak=f"{row['peak_mem_mib']:.0f}MiB")
                if validation.every > 0 and (done % validation.every == 0 or done == loop.steps):
                    numbers = run_validation(transformer, scheduler, validation_text, text.empty, validation, video,
                                             config.model, out, done, tracker, device=device, concept=concept_key,
                                             transformer_2=transformers[1] if len(transformers) > 1 else None)
                    tracker.log(numbers, done)
                    logger.info("validation at step %d: %s", done, ", ".join(
                        f"{k.removeprefix('validation/')} {v:.3g}" for k, v in numbers.items()))
    except (runfolder.Stop, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, runfolder.Stop) else signal.SIGINT
        if done == step:  # interrupted inside a step (before its update): rewind its random draws
            generator.set_state(step_rng)
        optimizer.zero_grad(set_to_none=True)
        with signals.deferred(swallow=True):  # a second signal during this save is ignored
            folder = checkpoint_now(done)
        raise runfolder.TrainingInterrupted(
            f"interrupted at step {done} of {loop.steps}: checkpoint saved in {folder}; the eraser is not "
            "finished; continue with --resume", signum) from None
    finally:
        bar.close()

    with signals.deferred():
        checkpoint_now(loop.steps)
        metadata = {"concept": " + ".join(entry.concept for entry in entries),
                    "concepts": [entry.concept for entry in entries], "eta": loss_cfg.eta,
                    "concept_eta": {entry.concept: entry.eta for entry in entries}, "alpha": loss_cfg.alpha,
                    "beta": loss_cfg.beta, "steps": loop.steps, "config": config.to_dict()}
        save_erasers(erasers, out, metadata=metadata)
    if metrics_path.stat().st_size:
        plot_losses(metrics_path, out / "loss.png")
        tracker.log_media("loss", out / "loss.png", loop.steps)
    return out


def _log_safe_changes(saved: dict | None, current: dict) -> None:
    """Resume: the config fields that changed but do not change the result (e.g. train.steps to extend)."""
    if not saved:
        return
    for section, values in current.items():
        old = saved.get(section)
        if isinstance(values, dict) and isinstance(old, dict):
            for name, value in values.items():
                if old.get(name) != value:
                    logger.info("--resume: %s.%s changed %r -> %r", section, name, old.get(name), value)
        elif old != values:
            logger.info("--resume: %s changed %r -> %r", section, old, values)
