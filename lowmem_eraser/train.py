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

from . import distributed, runfolder
from .activation_offload import offload_activations
from .adapter import attach_erasers, erasers_disabled
from .attack import AdversarialPrompts, SoftPrompt, learn_soft_prompt, with_soft_prompt
from .config import TrainConfig, TrainLoopConfig, concept_pairs, validate
from .errors import TrainingError  # noqa: F401  (importable from here too)
from .families import block_count, family_of, runtime_of_folder, transformer_config_json
from .loading import from_pretrained_or_error, model_files
from .localization import ConceptMaskCapture
from .lowram_load import load_transformer_blockwise
from .memory import MemoryMeter, configure_cuda_allocator, return_freed_memory, tensor_bytes
from .offload import BlockOffloader, streamed_indices
from .quantize import quantize_base, resolve_backend
from .sampling import (expert_groups, generate_clean_latents, latent_frames, make_pipeline, noise_at, pipeline_experts,
                       renoise, runtime_of, step_extras, trajectory)
from .serialization import atomic_write, save_erasers
from .plots import plot_losses
from .text import PromptEmbeddings, cache_key, encode_prompts
from .tracking import make_tracker
from .validation import encode_validation_prompts, run_validation

logger = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_BAD_STEPS = 10  # consecutive non-finite steps before giving up


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
    in a run of several concepts); None: `loss.eta`. `adversarial`: this step's adversarial prompts (below).
    `expert_counts`, `loss_scale`: multi-process runs of two-expert models (below)."""

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
    # Wan2.2 A14B in a multi-process run: the global batch's samples per expert, so that each expert's gradient is
    # its global samples' mean whatever share of them this rank holds (experts_losses_backward)
    expert_counts: dict[int, int] | None = None
    loss_scale: float = 1.0  # multiplies every backward (not the returned terms)

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
        if self.adversarial is not None:
            held += tensors(self.adversarial.x_t) + tensors(self.adversarial.start)
        return tensor_bytes(held)

    def select(self, positions: torch.Tensor) -> "StepInputs":
        """The samples at batch `positions` (a CPU index tensor); the adversarial prompts get fresh `learned`."""
        on_device = positions.to(self.x_t.device)
        adversarial = self.adversarial
        if adversarial is not None:
            adversarial = AdversarialPrompts(adversarial.spec,
                                             None if adversarial.start is None else adversarial.start[positions],
                                             x_t=None if adversarial.x_t is None else adversarial.x_t[on_device])
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
    learns soft-prompt vectors in c that make the current erasers reproduce v_θ(x_a, c) (attack.learn_soft_prompt:
    gradients to the vectors only, at this step's t, one graph at a time; from `adversarial.start`, the result
    left in `adversarial.learned`), and a further pass trains the erasers toward v_neg at x_a under them:
    + loss.adversarial.weight·‖v_θ'(x_a, [c; s]) − v_neg(x_a)‖² ("adv"). x_a is `adversarial.x_t` (the training
    loop's in trajectory runs: the original model's samples noised at t, the kind of state the attack works on),
    the step's x_t when that is None (renoise runs: their x_t is such a state).
    Returns the detached loss terms {"loss", "unlearn", "loc", "pre", "adv"}. Used by the loop below and by the
    benchmarks and the memory planner, so that all of them measure the same step.
    """
    x_t, t, c, empty, c_pre = batch.x_t, batch.t, batch.c, batch.empty, batch.c_pre
    concept_tokens, extras, frames = batch.concept_tokens, batch.extras, batch.frames
    eta, adversarial, scale = batch.eta, batch.adversarial, batch.loss_scale
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
        # v_c_adv: the original model's v(x_a, c), what the inner loop makes the erased model reproduce
        x_adv, v_c_adv, v_neg_adv = x_t, (v_c if adversarial is not None else None), v_neg
        del v_c
        if adversarial is not None:
            v_anchor_adv = v_anchor
            if adversarial.x_t is not None:  # the adversarial term's own latents: the original model there too
                x_adv, v_c_adv = adversarial.x_t, None  # (the step's own v_c is in v_neg already)
                v_c_adv = velocity(transformer, x_adv, t, c, extras)
                v_anchor_adv = velocity(transformer, x_adv, t, c_pre if anchored else empty, extras).float()
            if adversarial.x_t is not None or loss_cfg.adversarial.eta is not None:
                adv_eta = eta if loss_cfg.adversarial.eta is None else loss_cfg.adversarial.eta
                v_neg_adv = v_anchor_adv - adv_eta * (v_c_adv.float() - v_anchor_adv)
            del v_anchor_adv
        v_pre = None
        if loss_cfg.beta > 0:
            v_pre = (v_anchor if anchored else velocity(transformer, x_t, t, c_pre, extras)).float()
        del v_anchor

    soft = None
    if adversarial is not None:  # the vectors that bring the concept back under the current erasers (base frozen)
        soft, _ = learn_soft_prompt(transformer, c, adversarial.spec, lambda i, at=(x_adv, t, v_c_adv): at, extras,
                                    activations=activations, start=adversarial.start)
        adversarial.learned = soft
    del v_c_adv

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
    (scale * (unlearn + loss_cfg.alpha * loc)).backward()
    del v_erased
    adv = torch.zeros((), device=x_t.device)
    if soft is not None:  # a graph of its own, built after the first one is freed
        with saving:
            v_erased_adv = velocity(transformer, x_adv, t, with_soft_prompt(c, soft), extras)
        adv = F.mse_loss(v_erased_adv.float(), v_neg_adv)
        (scale * loss_cfg.adversarial.weight * adv).backward()
        del v_erased_adv
    del v_neg, v_neg_adv
    pre = torch.zeros((), device=x_t.device)
    if loss_cfg.beta > 0:  # a second graph, built after the first one is freed
        with saving:
            v_erased_pre = velocity(transformer, x_t, t, c_pre, extras)
        pre = F.mse_loss(v_erased_pre.float(), v_pre)
        (scale * loss_cfg.beta * pre).backward()
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
    size = batch.t.shape[0]

    def share(k: int, local: int) -> float:
        """Expert k's loss scale: 1 in one process; with several, (local / global samples of k) x world size,
        so that the ranks' average is the mean over k's samples of the whole global batch."""
        if batch.expert_counts is None:
            return 1.0
        return local / batch.expert_counts[k] * (sum(batch.expert_counts.values()) / size)

    if len(groups) == 1:
        k = groups[0][0]
        return eraser_losses_backward(experts[k], sets[k], replace(batch, loss_scale=share(k, size)), loss_cfg,
                                      activations=activations)
    total: dict[str, torch.Tensor] = {}
    adversarial = batch.adversarial
    for k, positions in groups:
        part = replace(batch.select(positions), loss_scale=share(k, len(positions)))
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
                   adversarial_vectors: torch.Tensor | None = None, world_size: int = 1) -> dict:
    """Everything a bit-exact resume needs (`run`: the fingerprint and config it was trained with;
    `adversarial_vectors`: adversarial training's per-prompt vectors, kept between visits; `world_size`: the
    processes that trained it, for the record: every rank holds the same state)."""
    state = {
        "step": step,
        "world_size": world_size,
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
                    adversarial_vectors: torch.Tensor | None = None, world_size: int = 1):
    """`checkpoint/step-N/` = training_state.pt + the published eraser, as one unit (runfolder.save_checkpoint)."""
    state = training_state(step, erasers, optimizer, generator, bad_steps, run, adversarial_vectors, world_size)
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
    (Ctrl-C, SIGTERM, SIGHUP) ends the run with `TrainingInterrupted` after saving what can be resumed. Under
    torchrun / accelerate launch the run is data-parallel (distributed.py): rank 0 owns the folder and writes."""
    validate(config)
    configure_cuda_allocator()  # before anything touches CUDA
    processes = distributed.start(config.train.batch_size)
    try:
        out = Path(config.output_dir)
        lock = None
        with processes.main_first():  # the others wait until the folder is locked and safe to read
            if processes.main:
                lock = runfolder.prepare(out, resume, overwrite)
        try:
            with runfolder.StopSignals() as signals:
                session = setup(config, resume, out, signals, processes)
                try:
                    return train_loop(session)
                finally:
                    session.tracker.close()
        finally:
            if lock is not None:
                lock.release()
    finally:
        distributed.stop(processes)


@dataclass
class Session:
    """What `setup` builds and the loop reads: the run's folder and processes, the encoded prompts, the frozen
    base with its erasers, the pipeline pieces a step needs, and the training state (restored on resume)."""

    config: TrainConfig
    out: Path
    resume: bool
    processes: distributed.Processes
    signals: runfolder.StopSignals
    device: torch.device
    dtype: torch.dtype
    run: dict  # the fingerprint and config every checkpoint carries
    tracker: Any
    entries: list  # the concepts (config.concept_entries())
    sizes: list[int]  # pairs per concept, in the entries' order
    pair_eta: torch.Tensor | None  # one eta per pair (several concepts), else None: loss.eta
    concept_key: Any
    text: PromptEmbeddings
    validation_text: Any
    transformers: list
    sets: list  # each transformer's erasers
    erasers: torch.nn.Module  # what the optimiser and the state hold
    activations: Any
    scheduler: Any
    pipe: Any
    extras: Any
    frames: int
    x0: torch.Tensor | None  # renoise / adversarial term: every target prompt's sample of the original model
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every draw of the run, the same on every rank
    start: int
    bad_steps: int
    adversarial_vectors: torch.Tensor | None  # adversarial training: each target prompt's vectors (CPU)
    inner: SoftPrompt
    sync: distributed.StepSync

    def checkpoint(self, step_count: int):
        """checkpoint/step-N (rank 0 writes; the others have the same state)."""
        if not self.processes.main:
            return None
        return save_checkpoint(self.out, step_count, self.erasers, self.optimizer, self.generator, self.bad_steps,
                               self.run, self.config.train.keep_checkpoints, self.adversarial_vectors,
                               self.processes.world_size)


def setup(config: TrainConfig, resume: bool, out: Path, signals, processes=distributed.SINGLE) -> Session:
    """Everything before the first step: the checkpoint to resume, the tracker, text encoding, the frozen base
    and its erasers, x0 for `renoise`, the optimiser. Caches on disk are filled by rank 0 first (text, int8) or
    split over the ranks (x0). A stop signal here ends the run with what is cached kept."""
    device = distributed.local_device(processes) if processes.enabled else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.memory.dtype]
    concepts_pairs = concept_pairs(config)  # one list of pairs per concept (one concept: one list)
    # one concept: its pairs, as the fingerprint always had them; several: each concept's list (its split counts)
    run = {"fingerprint": runfolder.fingerprint(config.to_dict(), concepts_pairs[0] if len(concepts_pairs) == 1
                                                else concepts_pairs),
           "config": config.to_dict()}
    checkpoint = None
    if resume:
        checkpoint, folder = runfolder.load_checkpoint(out)
        processes.same_everywhere(folder.name, "the checkpoint to resume from")
        runfolder.check_resume(checkpoint.get("fingerprint"), run["fingerprint"], checkpoint["step"],
                               config.train.steps)
        _log_safe_changes(checkpoint.get("config"), run["config"])
        saved_world = checkpoint.get("world_size", 1)
        if saved_world != processes.world_size:
            # the global batch and every draw come from the one generator whatever the process count, so the run
            # goes on with the same samples; only the gradient sums' order (fp32 rounding) changes. Trajectory
            # sampling seeds one process's batch once and several processes' samples one by one (sampling.trajectory)
            logger.info("the checkpoint was written by %d process(es), this run has %d: it continues with the same "
                        "draws (the global batch is split differently; sums differ in rounding only%s)", saved_world,
                        processes.world_size, "; trajectory noise is seeded per sample with several processes, per "
                        "batch with one" if config.sampling.mode == "trajectory" else "")
        logger.info("resuming from %s (step %d)", folder, checkpoint["step"])
    # a missing tracking package fails here, before any work; on resume it drops the events of the redone steps
    with processes.main_first():
        tracker = make_tracker(config.report_to if processes.main else "none", out, config.to_dict(),
                               start_step=checkpoint["step"] if checkpoint else 0)
    try:
        return _build(config, resume, out, signals, processes, device, dtype, concepts_pairs, run, tracker,
                      checkpoint)
    except BaseException:
        tracker.close()
        raise


def _build(config, resume, out, signals, processes, device, dtype, concepts_pairs, run, tracker, checkpoint):
    loss_cfg, loop, video = config.loss, config.train, config.video
    adversarial = loss_cfg.adversarial
    entries = config.concept_entries()
    pairs = [pair for its_pairs in concepts_pairs for pair in its_pairs]  # every concept's, in the entries' order
    sizes = [len(its_pairs) for its_pairs in concepts_pairs]
    # one eta per pair (its concept's); one concept: None, the loss's own eta, as single-concept runs always had
    pair_eta = None if len(entries) == 1 else torch.tensor(
        [entry.eta for entry, size in zip(entries, sizes) for _ in range(size)], dtype=torch.float32)
    concept_key = entries[0].concept if len(entries) == 1 else [entry.concept for entry in entries]
    torch.manual_seed(loop.seed)
    phase = "text encoding"
    try:
        # 1. Text: every prompt encoded once (cached on disk), the encoder freed before the transformer loads.
        max_length = runtime_of_folder(config.model).max_text_length(transformer_config_json(config.model))
        validation = config.validation
        validation_text = None
        with processes.main_first():  # rank 0 fills the cache, the others read it
            if processes.main:
                atomic_write(out / "config.yaml",
                             lambda tmp: tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False)))
            text = _encode_concepts(config, entries, concepts_pairs, max_length, dtype, device, out / "cache")
            if validation.every > 0 and processes.main:  # encoded now: the text encoder is gone once training runs
                validation_text = encode_validation_prompts(config.model, validation.prompts, max_length, dtype,
                                                            device, out / "cache",
                                                            placement=config.memory.text_encoder)

        # 2. One frozen base (optionally int8, streamed), fp32 adapters on top; Wan2.2 A14B: one per expert, each
        # with its own erasers (one optimiser, one file: transformer_2's under its key prefix).
        phase = "loading the transformer"
        experts = runtime_of_folder(config.model).experts(config.model)
        # one rank after the other: rank 0 writes memory.int8_cache first, and each rank's host-RAM checks (pinned
        # streamed blocks, activation pool) see what the ranks before it hold
        transformers = processes.in_turn(
            lambda: [load_transformer(config, dtype, device, out / "cache", name) for name in experts])
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

        # 3. x0 for `renoise` (and the adversarial term, which draws x_t as the attack does): one sample per target
        # prompt from the frozen model, each cached as soon as it exists; several ranks split the prompts.
        x0 = None
        if config.sampling.mode == "renoise" or adversarial.every > 0:
            phase = "x0 generation"
            sampling = {k: v for k, v in config.to_dict()["sampling"].items() if k != "batch_size"}  # x0 ignores it
            settings = [cache_key(config.model, pairs, concept_key, max_length, dtype), loop.seed,
                        sampling, config.to_dict()["video"], config.memory.quantize]
            x0_dir = out / "cache" / f"x0-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]}"
            if processes.enabled:  # each rank its share of the batches into the cache, then all read all of it
                generate_clean_latents(pipe, text.target, text.empty, video, config.sampling, loop.seed, device,
                                       cache_dir=x0_dir, share=(processes.rank, processes.world_size))
                processes.barrier()
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
    sync = distributed.StepSync(processes, list(erasers.parameters()))
    start, bad_steps = 0, 0
    if checkpoint is not None:
        start, bad_steps = restore(checkpoint, erasers, optimizer, generator)
    else:
        sync.broadcast_parameters()
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
    return Session(
        config=config, out=out, resume=resume, processes=processes, signals=signals, device=device, dtype=dtype,
        run=run, tracker=tracker, entries=entries, sizes=sizes, pair_eta=pair_eta, concept_key=concept_key,
        text=text, validation_text=validation_text, transformers=transformers, sets=sets, erasers=erasers,
        activations=activations, scheduler=scheduler, pipe=pipe, extras=extras, frames=latent_frames(video.frames),
        x0=x0, optimizer=optimizer, generator=generator, start=start, bad_steps=bad_steps,
        adversarial_vectors=adversarial_vectors, inner=SoftPrompt(adversarial.tokens, adversarial.inner_steps,
                                                                  adversarial.lr),
        sync=sync)


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


def draw_batch(session: Session, step: int) -> tuple[StepInputs, torch.Tensor]:
    """Step `step`'s global batch, drawn from the run's generator (the same draws on every rank), and this rank's
    slice of it as StepInputs; also returns the global batch's pair indices (the same on every rank). x_t for the whole global batch is drawn so
    that N processes x batch b train exactly what one process x batch N·b would (renoise: the noise and t of the
    global batch; trajectory with several processes: each sample denoised from its own seed)."""
    config, processes, device = session.config, session.processes, session.device
    adversarial = config.loss.adversarial
    index = draw_pairs(session.sizes, config.train.batch_size, session.generator)
    mine = processes.slice(len(index))
    attacking = adversarial.every > 0 and step % adversarial.every == 0
    if config.sampling.mode == "renoise":
        x_t, t_global = renoise(session.transformers[0], session.scheduler, session.x0[index], session.generator,
                                config.sampling.num_inference_steps)
        x_t, t = x_t[mine], t_global[mine]
    else:
        x_t, t = trajectory(session.pipe, session.text.target[index], session.text.empty, config.video,
                            config.sampling, session.generator, device,
                            share=(mine.start, mine.stop) if processes.enabled else None)
        t_global = t[:1].expand(len(index), *t.shape[1:])  # one timestep for the whole batch
    expert_counts = None
    if processes.enabled and len(session.transformers) > 1:  # Wan2.2 A14B: each expert's share of the global batch
        expert_counts = {k: len(positions) for k, positions in expert_groups(session.pipe, t_global)}
    drawn, index = index, index[mine]
    text = session.text
    c, c_pre = text.target[index].to(device), text.preserve[index].to(device)
    attack = None
    if attacking:
        attack = AdversarialPrompts(session.inner, session.adversarial_vectors[index].to(device))
        if config.sampling.mode != "renoise":
            # The adversarial term's latents: the original model's samples noised at the step's t (own noise), the
            # kind of state the attack works on. Under attack the concept comes back into x_t, a state the erased
            # model's own trajectory never reaches; the unlearning and preservation terms keep the trajectory's x_t,
            # the states generation visits (measured in the toy world: one x_t for all terms cost the red prompts'
            # shape and motion). A renoise step's x_t is already such a state: the term shares it.
            x_adv = noise_at(session.transformers[0], session.scheduler, session.x0[drawn], t_global,
                             session.generator, config.sampling.num_inference_steps)
            attack.x_t = x_adv[mine].to(device, session.dtype)
    batch = StepInputs(x_t.to(device, session.dtype), t.to(device), c, c_pre=c_pre,
                       empty=text.empty.to(device).expand_as(c), concept_tokens=text.concept_tokens[index],
                       extras=session.extras, frames=session.frames,
                       eta=None if session.pair_eta is None else session.pair_eta[index], adversarial=attack,
                       expert_counts=expert_counts)
    return batch, drawn


def train_step(session: Session, step: int, meter: MemoryMeter, record=None) -> dict:
    """One optimiser step: draws the step's batch (draw_batch), runs the losses' passes, averages the gradients
    over the ranks, guards against NaN, updates and keeps the adversarial vectors. `record(row)` runs with the
    update as one unit (a stop signal waits for both: the loop writes the metrics row and a due checkpoint there).
    Returns the metrics row. An error in one rank's step stops every rank with that rank's error."""
    loop = session.config.train
    optimizer, erasers, sync = session.optimizer, session.erasers, session.sync
    lr = loop.lr * lr_factor(loop, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    error, losses, batch = None, {}, None
    with meter.step():
        try:
            batch, drawn = draw_batch(session, step)
            losses = experts_losses_backward(session.pipe, session.sets, batch, session.config.loss,
                                             activations=session.activations)
        except Exception as exc:  # noqa: BLE001 (re-raised below, once the other ranks have heard of it)
            if not session.processes.enabled:
                raise
            error = exc
            optimizer.zero_grad(set_to_none=True)
    losses, failed = sync(losses, error is not None, step)
    if failed:
        message = sync.failure(error, step)
        if error is not None:
            raise error
        raise TrainingError(f"step {step}: another process of the run failed ({message}); every process stops")
    learned = None
    if batch.adversarial is not None:  # every rank's vectors, in the global batch's order (`drawn`'s)
        learned = sync.gather(batch.adversarial.learned, step)
    grad_norm = torch.nn.utils.clip_grad_norm_(erasers.parameters(), loop.grad_clip)
    # one host sync for the step's figures, not one per term
    figures = dict(zip((*distributed.LOSS_TERMS, "grad_norm"),
                       torch.stack([*(losses[name].detach().float().reshape(()) for name in distributed.LOSS_TERMS),
                                    grad_norm.float()]).tolist()))
    skipped = not (math.isfinite(figures["loss"]) and math.isfinite(figures["grad_norm"]))
    if skipped:  # NaN/Inf guard: never let a non-finite update reach the weights
        session.bad_steps += 1
        if session.bad_steps >= MAX_BAD_STEPS:
            raise TrainingError(
                f"step {step}: loss or gradients non-finite {session.bad_steps} steps in a row; stopping. "
                "Lower train.lr or loss.eta, or use memory.dtype: bfloat16 instead of float16"
            )
    else:
        session.bad_steps = 0
    row = {"step": step, **{name: figures[name] for name in distributed.LOSS_TERMS},
           "lr": lr, "grad_norm": figures["grad_norm"], "skipped": skipped, "peak_mem_mib": meter.peak_bytes / 2**20}
    if meter.reserved_bytes is not None:  # CUDA: what the card holds, allocator slack included
        row["peak_reserved_mib"] = meter.reserved_bytes / 2**20
    with session.signals.deferred():  # the update, the vectors and the loop's record are one unit
        if not skipped:
            optimizer.step()
            if learned is not None:  # a prompt drawn twice in the batch keeps its last sample's
                session.adversarial_vectors[drawn] = learned.cpu()
        optimizer.zero_grad(set_to_none=True)
        if record is not None:
            record(row)
    return row


def train_loop(session: Session) -> Path:
    """Steps from `session.start` to train.steps: metrics, checkpoints, validation (rank 0 writes), then the
    final eraser. A stop signal saves a checkpoint to resume from (rank 0; every rank stops at once)."""
    config, out, processes, signals = session.config, session.out, session.processes, session.signals
    loop, validation = config.train, config.validation
    metrics_path = out / "metrics.jsonl"
    if processes.main:
        kept = metrics_path.read_text().splitlines() if session.resume and metrics_path.is_file() else []
        atomic_write(metrics_path, lambda tmp: tmp.write_text(
            "".join(f"{line}\n" for line in kept if json.loads(line)["step"] < session.start)))

    done = step = session.start  # steps completed, step in progress
    step_rng = session.generator.get_state()
    bar = tqdm(range(session.start, loop.steps), initial=session.start, total=loop.steps, desc="erasing",
               dynamic_ncols=True, disable=not processes.main)
    try:
        meter = MemoryMeter(session.device)
        with metrics_path.open("a") if processes.main else contextlib.nullcontext() as metrics:
            for step in bar:
                began = time.perf_counter()
                step_rng = session.generator.get_state()  # an interrupted step is redone from here on --resume

                def record(row):
                    nonlocal done
                    row["s_per_step"] = time.perf_counter() - began
                    if processes.main and (step % loop.log_every == 0 or step == loop.steps - 1):
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        session.tracker.log(row, step)
                    done = step + 1
                    if done % loop.save_every == 0 and done < loop.steps:
                        session.checkpoint(done)

                row = train_step(session, step, meter, record)
                bar.set_postfix(loss=f"{row['loss']:.4g}", unlearn=f"{row['unlearn']:.4g}", loc=f"{row['loc']:.3g}",
                                pre=f"{row['pre']:.3g}", s_step=f"{row['s_per_step']:.2f}",
                                peak=f"{row['peak_mem_mib']:.0f}MiB")
                if validation.every > 0 and processes.main and (done % validation.every == 0 or done == loop.steps):
                    _validate(session, done)
    except (runfolder.Stop, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, runfolder.Stop) else signal.SIGINT
        if done == step:  # interrupted inside a step (before its update): rewind its random draws
            session.generator.set_state(step_rng)
        session.optimizer.zero_grad(set_to_none=True)
        with signals.deferred(swallow=True):  # a second signal during this save is ignored
            folder = session.checkpoint(done)
        # no collective here: another rank may be waiting inside the step's all-reduce; it ends with a
        # lost-contact error once this process is gone (under torchrun every rank gets the signal)
        where = f"checkpoint saved in {folder}" if processes.main else "rank 0 saves the checkpoint"
        raise runfolder.TrainingInterrupted(
            f"interrupted at step {done} of {loop.steps}: {where}; the eraser is not finished; continue with "
            "--resume", signum) from None
    finally:
        bar.close()

    with signals.deferred():
        session.checkpoint(loop.steps)
        if processes.main:
            loss_cfg = config.loss
            metadata = {"concept": " + ".join(entry.concept for entry in session.entries),
                        "concepts": [entry.concept for entry in session.entries], "eta": loss_cfg.eta,
                        "concept_eta": {entry.concept: entry.eta for entry in session.entries},
                        "alpha": loss_cfg.alpha, "beta": loss_cfg.beta, "steps": loop.steps,
                        "config": config.to_dict()}
            save_erasers(session.erasers, out, metadata=metadata)
        processes.barrier("the final save")  # every rank returns once the eraser is on disk
    if processes.main and metrics_path.stat().st_size:
        plot_losses(metrics_path, out / "loss.png")
        session.tracker.log_media("loss", out / "loss.png", loop.steps)
    return out


def _validate(session: Session, done: int) -> None:
    """Validation videos at step `done` (rank 0; the other ranks wait at the next step's sync)."""
    transformers = session.transformers
    numbers = run_validation(transformers[0], session.scheduler, session.validation_text, session.text.empty,
                             session.config.validation, session.config.video, session.config.model, session.out,
                             done, session.tracker, device=session.device, concept=session.concept_key,
                             transformer_2=transformers[1] if len(transformers) > 1 else None)
    session.tracker.log(numbers, done)
    logger.info("validation at step %d: %s", done, ", ".join(
        f"{k.removeprefix('validation/')} {v:.3g}" for k, v in numbers.items()))


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
