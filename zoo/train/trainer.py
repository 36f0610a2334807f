"""The training loop: one recipe, one command, on a laptop CPU or under torchrun.

Resume is exact because nothing is hidden in iterator state: the global batch of optimizer step s,
micro-step m is a pure function of (seed, s, m) (see `zoo.data`), so a checkpoint needs only the
step count besides model, optimizer, scheduler and RNG states.

Data parallel: train.batch_size is the *global* batch per micro-step; each of W data-parallel ranks
takes its contiguous slice, so W processes compute the same update as one (up to summation order).

Context parallel (`cp` > 1): the W ranks form a 2-D mesh (dp = W / cp, cp); the ranks of one cp group
take the same rows and each holds its shard of the sequence (zoo.distributed, layout train.cp_layout).
DDP (or FSDP2) runs over all W ranks and averages gradients over W; each rank's backward gives its
share of its cp group's gradient, so the loss is scaled by cp before backward: the average over W of
cp * share is the average over the dp groups of each group's full gradient.

A run directory belongs to one run (`zoo.train.run_dir`): rank 0 locks it and refuses another run's
checkpoints or metrics unless told to resume or overwrite. SIGTERM or a first Ctrl-C finishes the current
optimizer step, saves, and returns; under torchrun the stop flag rides on each step's loss all-reduce, so
every rank stops at the same step and saves together. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from zoo.config import Recipe
from zoo.data.errors import DataError
from zoo.data.repeats import insert_repeats
from zoo.memory import check_memory
from zoo.model import ZooLM
from zoo.train import checkpoint as ckpt
from zoo.train.run_dir import RunDirError, RunLock, claim, trim_metrics
from zoo.train.optim import build_optimizer, build_scheduler, param_groups


class TrainingError(RuntimeError):
    pass


# train fields a resumed run may change: how long it runs, what it logs and keeps, how it computes the same math
# (checkpoints hold full, unsharded states, so a run may continue under another parallelism)
RESUMABLE = ("max_steps", "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "compile",
             "activation_checkpointing", "fsdp", "cp_layout")


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: Optional[float]
    val_bpb: Optional[float]
    tokens: int
    seconds: float
    checkpoint: Optional[str]
    stopped: Optional[str] = None  # the signal that ended the run early ("SIGTERM", "SIGINT")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def dp_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains `recipe` on `data` (an object with `train_batch(step, micro, batch_size, seq_len)`,
    `val_batches(n, batch_size, seq_len)` and `bytes_per_token`), writing to `out_dir`.

    resume: "auto" (the newest checkpoint in out_dir that loads) or a checkpoint path. Without it, an
    out_dir that holds another run is refused, unless overwrite=True, which moves that run aside.
    init_from: a checkpoint (or run directory) whose model weights start the run - a fine-tune: the optimizer,
    schedule and step count start fresh. A checkpoint that resume finds wins, so an interrupted fine-tune
    continues from its own last step."""

    def __init__(self, recipe: Recipe, data, out_dir, device=None, resume: Optional[str] = None,
                 log: Callable[[str], None] = print, progress: bool = True, tensorboard: bool = False,
                 cp: int = 1, overwrite: bool = False, max_memory=None, init_from: Optional[str] = None):
        self.recipe, self.data, self.out = recipe, data, Path(out_dir)
        self.cfg = recipe.train
        self.rank, self.world = dp_info()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cp, self.cp_group, self.dp_rank, self.dp_world = self._mesh(cp)
        self._check_shapes()
        self.log, self.progress = (log if self.rank == 0 else (lambda s: None)), progress and self.rank == 0
        # before anything is read, claimed or allocated: weights, gradients, AdamW and this rank's activations
        # (its rows of the batch, its shard of the sequence) against the device's memory, at every stage of
        # the sequence-length schedule, the training length first (its message names the recipe's own fields)
        for rows, seq_len in reversed(self.cfg.shapes()):
            check_memory(recipe, max_memory, self.device, training=True,
                         batch_size=max(1, rows // self.dp_world), seq_len=max(1, seq_len // self.cp))
        self._check_validation_data()
        self.lock: Optional[RunLock] = self._claim(resume, overwrite)  # rank 0 only
        seed_everything(self.cfg.seed)
        self.model = ZooLM(recipe, max_memory=max_memory).to(self.device)
        if self.model.lm_head.bias is not None:   # model.head_bias; a resume or init_from then loads its own
            self.model.init_head_bias(self._token_counts())
        self.model.checkpoint_layers = self.cfg.activation_checkpointing
        self.step = 0
        self.tokens = 0
        self.last_aux_loss: Optional[float] = None
        self._stop_signal: Optional[int] = None  # set by the SIGTERM / SIGINT handler during train()
        self._stop_agreed = False  # some rank was signalled (all-reduced with the step's loss)
        groups = param_groups(self.model, self.cfg.weight_decay)  # by name: fully_shard drops the blocks' tags
        self.train_module = self._wrap(self.model)
        self.optimizer = build_optimizer(self.model, self.cfg, groups)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)
        try:
            resumed = self._resume(resume) if resume else False
            if init_from and not resumed:
                self._init_from(init_from)
        except BaseException:
            if self.lock is not None:
                self.lock.release()  # a trainer that failed to start holds no directory
            raise
        self.tb = None
        if tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(self.out / "tensorboard", purge_step=self.step or None)

    # -- setup -------------------------------------------------------------------------------
    def _mesh(self, cp: int):
        """(cp, cp group or None, data-parallel rank, data-parallel world size) on a (dp, cp) mesh."""
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1 or self.world % cp:
            raise TrainingError(f"cp: must be a positive integer dividing the world size {self.world}, got {cp!r}")
        if cp == 1:
            return 1, None, self.rank, self.world
        if not self.cfg.cross_doc:
            raise TrainingError("train.cross_doc: false (packed documents) is not supported with context parallel "
                                "(cp > 1); use train.cross_doc: true")
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(self.device.type, (self.world // cp, cp), mesh_dim_names=("dp", "cp"))
        return cp, mesh["cp"].get_group(), mesh["dp"].get_local_rank(), self.world // cp

    def _token_counts(self) -> np.ndarray:
        """The train split's token counts (`data.token_counts()`), or those of step 0's rows for data that
        cannot count its split: what model.head_bias starts from, the same on every rank."""
        if hasattr(self.data, "token_counts"):
            return self.data.token_counts()
        vocab = self.recipe.model.vocab_size
        ids = [self.data.train_batch(0, micro, self.cfg.batch_size, self.cfg.seq_len)["input_ids"]
               for micro in range(self.cfg.grad_accum)]
        return np.bincount(torch.cat([i.flatten() for i in ids]).numpy(), minlength=vocab)[:vocab]

    def _check_shapes(self):
        """Every stage's rows split evenly over the data-parallel ranks (the layouts split any length over cp)."""
        for rows, seq_len in self.cfg.shapes():
            if rows % self.dp_world:
                field = "train.batch_size" if seq_len == self.cfg.seq_len else f"train.seq_len_schedule (at {seq_len})"
                raise TrainingError(f"{field}: {rows} rows are not divisible by the data-parallel world size "
                                    f"{self.dp_world}")

    def _check_validation_data(self):
        """Validation data that cannot give train.eval_batches batches of train.seq_len tokens is an error
        now, not at the first evaluation after training."""
        n, b, t = self.cfg.eval_batches, self.cfg.batch_size, self.cfg.seq_len
        val = getattr(self.data, "val", None)  # PreparedData's val split: its size is known
        if val is not None and hasattr(val, "__len__"):
            where = getattr(getattr(val, "file", None), "prefix", "the validation split")
            if len(val) < t:
                raise DataError(f"validation data: {where} holds {len(val):,} tokens, fewer than train.seq_len {t}")
            if len(val) - t + 1 < n * b:
                raise DataError(f"validation data: {where} holds {len(val):,} tokens, {len(val) - t + 1:,} distinct "
                                f"windows of train.seq_len {t}, fewer than the train.eval_batches x train.batch_size "
                                f"= {n} x {b} = {n * b} that an evaluation takes; lower train.eval_batches")
        try:
            batches = list(self.data.val_batches(n, b, t))
        except DataError as err:
            raise DataError(f"validation data: {err}") from None
        if len(batches) < n:
            raise DataError(f"validation data: {len(batches)} batches, fewer than train.eval_batches {n}")
        shapes = {tuple(batch["input_ids"].shape) for batch in batches}
        if shapes != {(b, t)}:
            raise DataError(f"validation data: batches of shape {sorted(shapes)}, expected train.batch_size x "
                            f"train.seq_len = ({b}, {t})")

    def _claim(self, resume: Optional[str], overwrite: bool) -> Optional[RunLock]:
        """Rank 0 locks the run directory and checks it (zoo.train.run_dir.claim); when it refuses, every
        rank raises, instead of the others waiting for it in the first collective."""
        lock, err = None, None
        if self.rank == 0:
            try:
                lock = claim(self.out, resume, overwrite, self.log)
            except (RunDirError, ckpt.CheckpointError) as e:
                err = e
        if self.world > 1:
            msg = [None if err is None else str(err)]
            dist.broadcast_object_list(msg, src=0)
            if msg[0] is not None and err is None:
                raise RunDirError(msg[0])
        if err is not None:
            raise err
        return lock

    def _forward(self, batch: dict):
        if self.cp_group is None:
            return self.train_module(batch["input_ids"], labels=batch["labels"], seq_idx=batch.get("seq_idx"))
        from zoo.distributed import shard
        layout = self.cfg.cp_layout
        return self.train_module(shard(batch["input_ids"], self.cp_group, layout),
                                 labels=shard(batch["labels"], self.cp_group, layout), cp_group=self.cp_group)

    def _wrap(self, model):
        module = model
        if self.world > 1 and self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        elif self.world > 1:
            module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            module = torch.compile(module)
        return module

    def _resume(self, resume: str) -> bool:
        """Load the checkpoint `resume` names; False when "auto" found none."""
        if resume == "auto":
            path, loaded = self._newest_loadable(self.out / "checkpoints")
            if path is None:
                return False
        else:
            path = ckpt.resolve_checkpoint(resume)
            loaded = ckpt.read_checkpoint(path)
        saved_recipe, model_state, state, info = loaded
        ckpt.check_same_model(saved_recipe, self.recipe, path)
        self._check_same_training(saved_recipe, path)
        try:
            self._load_model_state(model_state)
            if self.cfg.fsdp and self.world > 1:
                # the checkpoint holds the full (unsharded, name-keyed) optimizer state that `save` gathered;
                # a plain load_state_dict would put whole tensors beside sharded parameters
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            random.setstate(tuple(_tuplify(info["python_rng"])))
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise ckpt.CheckpointError(f"checkpoint: {path} does not fit this trainer ({ckpt.reason(err)})") from None
        self.step, self.tokens = info["step"], info["tokens"]
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def _check_same_training(self, saved: Recipe, path):
        """A resumed run continues the saved optimizer, schedule and data order: a train field that would change
        them (lr, batch, schedule, data) is refused rather than recorded in the new checkpoints while the restored
        state trains on as before. RESUMABLE fields (length of the run, bookkeeping) take effect."""
        old, new = dataclasses.asdict(saved.train), dataclasses.asdict(self.recipe.train)
        for key in old:
            if key in RESUMABLE or old[key] == new.get(key):
                continue
            raise TrainingError(f"train.{key}: {path} trained with {old[key]!r}, this run asks {new.get(key)!r}; a "
                                f"resumed run keeps its optimizer, schedule and data order, so only "
                                f"{', '.join('train.' + k for k in RESUMABLE)} may change: resume without it, or "
                                "start a new run (another --out, or --overwrite)")
        if old["max_steps"] != new["max_steps"]:
            self.log(f"resume: train.max_steps {old['max_steps']} -> {new['max_steps']}: the learning-rate schedule's "
                     "remaining steps follow the new length")

    def _init_from(self, source: str):
        """Start from the model weights of another run's checkpoint (any precision), nothing else of it. Settings
        that hold no weights may differ (context extension: a RoPE base, a window); the log names them."""
        path, diff = ckpt.init_weights(source, self.recipe, self._load_model_state)
        self.log(f"initialised from {path}" + (f"; settings changed: {', '.join(diff)}" if diff else ""))

    def _newest_loadable(self, root: Path):
        """(path, ckpt.read_checkpoint(path)) of the newest checkpoint under `root` that loads, or (None, None)
        when there is none. A newer one that fails to load is skipped with a warning and moved out of the
        step-* namespace, so that neither pruning nor the next resume takes it for the newest."""
        found = ckpt.step_dirs(root)
        if not found:
            self.log(f"resume auto: no checkpoint in {root}, starting from step 0")
            return None, None
        for path in reversed(found):
            try:
                return path, ckpt.read_checkpoint(path)
            except ckpt.CheckpointError as err:
                why = str(err).removeprefix("checkpoint: ")
                broken = path.with_name(f"broken-{path.name}")
                moved = False
                if self.rank == 0 and not broken.exists():
                    try:
                        path.rename(broken)
                        moved = True
                    except OSError:
                        pass
                self.log(f"warning: resume auto: skipped {path} ({why})"
                         + (f"; moved it to {broken}" if moved else ""))
        raise ckpt.CheckpointError(f"resume auto: no checkpoint in {root} loads ({len(found)} skipped, see the "
                                   "warnings above); repair or remove them, or start over with --overwrite")

    def _load_model_state(self, state: dict):
        if self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state)

    def _full_model_state(self) -> dict:
        if self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def save(self) -> Optional[Path]:
        model_state = self._full_model_state()
        if self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            opt_state = get_optimizer_state_dict(self.model, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = self.optimizer.state_dict()
        if self.rank != 0:
            return None
        train_state = {"optimizer": opt_state, "scheduler": self.scheduler.state_dict(), "rng": _rng_state()}
        info = {"tokens": self.tokens, "python_rng": random.getstate(), "world_size": self.world}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, model_state, self.recipe, train_state,
                                    info, keep_last=self.cfg.keep_last)

    # -- steps ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _local(self, batch: dict) -> dict:
        per = len(batch["input_ids"]) // self.dp_world
        sl = slice(self.dp_rank * per, (self.dp_rank + 1) * per)
        return {k: v[sl].to(self.device, non_blocking=True) for k, v in batch.items()}

    def _train_batch(self, micro: int, rows: int, seq_len: int) -> dict:
        """The global batch of (step, micro), with train.repeats written in; a function of them alone."""
        batch = self.data.train_batch(self.step, micro, rows, seq_len)
        r = self.cfg.repeats
        if r.fraction:   # its own stream (the trailing 1): the windows' draws stay what they were without it
            rng = np.random.default_rng([self.cfg.seed, self.step, micro, 1])
            batch = insert_repeats(batch, r.fraction, r.count, r.span, r.distance, rng, source=r.source,
                                   vocab_size=self.model.recipe.model.vocab_size)
        return batch

    def train_step(self) -> float:
        self.train_module.train()
        total, aux_total = 0.0, None
        accum = self.cfg.grad_accum
        rows, seq_len = self.cfg.shape_at(self.step)
        for micro in range(accum):
            batch = self._local(self._train_batch(micro, rows, seq_len))
            sync = micro == accum - 1 or not hasattr(self.train_module, "no_sync")
            with (nullcontext() if sync else self.train_module.no_sync()), self._autocast():
                out = self._forward(batch)
                loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
            (loss * (self.cp / accum)).backward()
            total += out.loss.detach().float().item() / accum
            if out.aux_loss is not None:
                aux_total = (aux_total or 0.0) + out.aux_loss.detach().float().item() / accum
        if self.world > 1:
            # the stop flag rides on the loss's all-reduce: every rank learns at the same step that a rank
            # was signalled, and they save together
            t = torch.tensor([total, aux_total or 0.0, float(self._stop_signal is not None)], device=self.device)
            dist.all_reduce(t)
            total = t[0].item() / self.world
            aux_total = None if aux_total is None else t[1].item() / self.world
            self._stop_agreed = t[2].item() > 0
        self.last_aux_loss = aux_total  # the blocks' auxiliary losses (taipan capacity, selective memory)
        if not math.isfinite(total):
            raise TrainingError(f"non-finite loss {total} at step {self.step}; the last good checkpoint is "
                                f"{ckpt.latest_checkpoint(self.out / 'checkpoints')}")
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.model.update_router_biases(dist.group.WORLD if self.world > 1 else None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens += rows * seq_len * accum
        return total

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(validation loss in nats/token, bits per byte) on the fixed validation batches."""
        self.train_module.eval()
        losses = []
        for batch in self.data.val_batches(self.cfg.eval_batches, self.cfg.batch_size, self.cfg.seq_len):
            batch = self._local(batch)
            with self._autocast():
                out = self._forward(batch)
            losses.append(out.loss.float())
        loss = torch.stack(losses).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss = loss / self.world
        loss = loss.item()
        return loss, loss / math.log(2) / self.data.bytes_per_token

    # -- loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        if self.rank == 0 and not (self.lock is not None and self.lock.held):
            self.lock = RunLock(self.out, self.log)  # a second train() after the first released it
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            dropped = trim_metrics(self.out / "metrics.jsonl", self.step)
            if dropped:
                self.log(f"metrics: dropped {dropped} rows after step {self.step} from {self.out / 'metrics.jsonl'}")
        metrics = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.recipe.name, dynamic_ncols=True)
        start, start_tokens, start_step = time.perf_counter(), self.tokens, self.step
        loss, val_loss, val_bpb, path, saved_at, stopped = float("nan"), None, None, None, None, None
        handlers = self._catch_stop_signals()
        try:
            while self.step < self.cfg.max_steps:
                loss = self.train_step()
                elapsed = time.perf_counter() - start
                tok_s = (self.tokens - start_tokens) / max(elapsed, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens, "tok_s": tok_s,
                          "time": elapsed, "seq_len": self.cfg.shape_at(self.step - 1)[1]}
                if self.last_aux_loss is not None:
                    record["aux_loss"] = self.last_aux_loss
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps:
                    val_loss, val_bpb = self.evaluate()
                    record.update(val_loss=val_loss, val_bpb=val_bpb)
                    if bar is None:
                        self.log(f"step {self.step}: val loss {val_loss:.4f}, {val_bpb:.3f} bits/byte")
                if metrics is not None and (self.step % self.cfg.log_every == 0 or "val_loss" in record):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if self.tb is not None:
                    for k in ("loss", "aux_loss", "lr", "tok_s", "val_loss", "val_bpb"):
                        if k in record:
                            self.tb.add_scalar(k, record[k], self.step)
                if bar is not None:
                    post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_s:,.0f}", "lr": f"{lr:.2e}"}
                    if self.last_aux_loss is not None:
                        post["aux"] = f"{self.last_aux_loss:.3g}"
                    if val_bpb is not None:
                        post["val_bpb"] = f"{val_bpb:.3f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
                    path, saved_at = self._save_together(), self.step
                stop = self._stop_agreed if self.world > 1 else self._stop_signal is not None
                if stop:
                    if saved_at != self.step:
                        path = self._save_together()
                    stopped = (signal.Signals(self._stop_signal).name if self._stop_signal is not None
                               else "a signal to another rank")
                    break
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            if self.tb is not None:
                self.tb.flush()
            if self.lock is not None:
                self.lock.release()
        if stopped:
            self.log(f"stopped by {stopped} at step {self.step}: checkpoint {path} (continue with --resume auto)")
        seconds = time.perf_counter() - start
        return TrainResult(self.step, loss, val_loss, val_bpb, self.tokens - start_tokens if self.step > start_step
                           else 0, seconds, str(path) if path else None, stopped)

    def _save_together(self) -> Optional[Path]:
        """`save()` on every rank; when rank 0 fails to write, every rank stops (the others would otherwise
        wait for it in the next step's all-reduce)."""
        try:
            path, failed = self.save(), None
        except ckpt.CheckpointError as err:
            path, failed = None, err
        if self.world > 1:
            flag = torch.tensor([float(failed is not None)], device=self.device)
            dist.all_reduce(flag)
            if flag.item() > 0 and failed is None:
                raise TrainingError(f"checkpoint: rank 0 could not write the checkpoint of step {self.step} "
                                    "(its error says why)")
        if failed is not None:
            raise failed
        return path

    def _catch_stop_signals(self) -> dict:
        """Route SIGTERM and SIGINT to `_on_stop_signal` while training; returns the handlers to restore.
        Python lets only the main thread set handlers: a trainer in another thread keeps the defaults."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_stop_signal)
        return {s: h for s, h in previous.items() if h is not None}

    def _on_stop_signal(self, signum, frame):
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without a checkpoint
        if self._stop_signal is None:
            self._stop_signal = signum


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
