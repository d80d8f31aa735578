"""``harden.fit``: train a model on the weighted sum of the policy's objectives.

Each epoch ends with clean and PGD validation accuracy, one printed line (with progress on), a
row of ``metrics.csv`` (and TensorBoard events) and a checkpoint (safetensors + JSON sidecar,
atomic); the best epoch by the probe is kept as ``checkpoints/best.safetensors``, and
``train.select`` / ``train.early_stopping`` follow it (see docs/training.md). ``resume=True``
continues from the newest intact checkpoint of ``run_dir``.
The run folder is held through :class:`harden.runfolder.RunFolder` (one writer, one run: a fresh
fit into a used folder needs ``overwrite=True``); :func:`harden.run` opens it once and hands it
over as ``run_dir``.
The stages live in :mod:`harden.fit_setup` (model, objectives, optimizer), :mod:`harden.fit_loop`
(the epochs and their probe) and :mod:`harden.fit_state` (checkpoints, resume); this module
resolves the data, runs the stages in order and writes ``policy.yaml`` and ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harden.checkpoint import atomic_write, state_bytes
from harden.data import DataBundle, load_data
from harden.distributed import Distributed, distributed_session
from harden.errors import CheckpointError, HardenError, ModelError, RunFolderError
from harden.fit_loop import MAX_BAD_STEPS as MAX_BAD_STEPS  # still importable from harden.train
from harden.fit_loop import end_epoch, select_weights, train_epoch
from harden.fit_setup import FitRun, TrainData, resolve_data, set_up
from harden.fit_state import resume_run, sync_best
from harden.metrics_log import MetricsLog, summary_writer_class
from harden.model_load import build_model, load_classifier_weights
from harden.models import Normalized
from harden.policy import Policy
from harden.policy_io import checked, dump_policy, policy_hash
from harden.runfolder import RunFolder
from harden.speed import to_memory_format

__all__ = ["FitResult", "fit", "load_trained", "read_model_info", "save_model"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model (a :class:`Normalized` wrapper, in eval mode).
        history: one record per epoch (``epoch``, ``lr``, ``train_loss``, ``val_clean_acc``,
            ``val_pgd_acc``, ``seconds``, ``skipped_steps``).
        run_dir: where checkpoints and ``model.safetensors`` were written.
        weights: path of the final ``model.safetensors``.
        seconds: wall time of this call.
        resumed_from: the checkpoint epoch training resumed from (None: from scratch).
        info: ``rank`` and ``world_size`` of this process (``world_size`` > 1 under ``torchrun``;
            only rank 0 wrote the files).
        best_epoch: the epoch of the best probe robust accuracy (None: no probe ran); its
            weights are ``checkpoints/best.safetensors`` with ``train.keep_best``, and ``model``
            with ``train.select: best``.
        stopped_early: ``train.early_stopping`` ended the training before ``train.epochs``.
        metrics_csv: the per-epoch ``metrics.csv`` (None where this process wrote none).
    """

    model: Normalized
    history: list[dict[str, Any]]
    run_dir: Path
    weights: Path
    seconds: float = 0.0
    resumed_from: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    best_epoch: int | None = None
    stopped_early: bool = False
    metrics_csv: Path | None = None


def save_model(model: Normalized, path: Path, info: dict[str, Any]) -> str:
    """Write ``model.safetensors`` and ``model.json`` (with its SHA-256) atomically; returns the hash.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.models import prepare_model
        >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> digest = save_model(prepare_model(TinyCNN(num_classes=3)), path, {"epochs": 1})
        >>> json.loads(path.with_suffix(".json").read_text())["sha256"] == digest
        True
    """
    blob = state_bytes(model)
    digest = hashlib.sha256(blob).hexdigest()
    atomic_write(path, blob)

    atomic_write(
        path.with_suffix(".json"), json.dumps({"file": path.name, "sha256": digest, **info}, indent=1).encode()
    )
    return digest


def fit(
    model: nn.Module | None,
    policy: Policy,
    train: TrainData | None = None,
    val: TrainData | None = None,
    *,
    bundle: DataBundle | None = None,
    run_dir: str | Path | RunFolder | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` (or the policy's model) on the policy's weighted objectives.

    Args:
        model: an ``nn.Module`` (wrapped in :class:`Normalized` with the policy's mean/std), or
            None to build the model the policy names.
        policy: the validated policy.
        train: training data (Dataset or DataLoader); None: ``bundle.train``, or the policy's data
            loaded here when no bundle is given either.
        val: validation data; None uses the test split of ``bundle`` or of the loaded data (when
            ``train`` is None too).
        bundle: the policy's data already loaded (:func:`harden.data.load_data`), e.g. by a
            pipeline that hands the same bundle to fit, verify and export: its train split trains,
            its test split validates (unless ``val`` is given), its classes and channels build the
            model and check every batch, and ``load_data`` is not called. Give either ``train``
            or ``bundle``, not both.
        run_dir: where checkpoints go; default ``runs/<policy.name>``. A path is opened (locked,
            checked) with :meth:`harden.runfolder.RunFolder.open` for this call; a
            :class:`~harden.runfolder.RunFolder` already opened (e.g. by :func:`harden.run`) is
            used as it is, and stays open.
        resume: continue from the newest intact checkpoint in ``run_dir`` (checkpoints of another
            run or policy are refused).
        overwrite: replace the artifacts of a previous run in ``run_dir`` (a fresh fit into a used
            folder is refused without it).
        progress: show a progress bar.
        on_epoch_end: called with each epoch's history record.

    Returns:
        A :class:`FitResult`; the model is in eval mode on the policy's device.

    Raises:
        DataError: both ``train`` and ``bundle`` given, ``model`` is None with ``train`` data,
            or the data is empty or malformed.
        RunFolderError: ``run_dir`` is held by another process, or used and neither ``resume``
            nor ``overwrite`` is given.
        CheckpointError: ``resume`` found a checkpoint of another run or policy.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls ``fit`` and trains one
    ``DistributedDataParallel`` replica on its shard of the data; only rank 0 writes files and
    every rank returns the same model (see :mod:`harden.distributed`).

    Example:
        >>> import tempfile
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> result = fit(None, tiny_policy(), run_dir="/tmp/harden-doctest", progress=False)  # doctest: +SKIP
        >>> result.history[-1]["val_clean_acc"] > 0.5  # doctest: +SKIP
        True
        >>> policy = tiny_policy(objectives=[{"name": "ce"}], train={"probe_examples": 0})
        >>> result = fit(None, policy, bundle=synthetic_bundle(96, 32), run_dir=tempfile.mkdtemp(), progress=False)
        >>> [r["epoch"] for r in result.history], result.weights.name
        ([1], 'model.safetensors')
    """
    policy = checked(policy)  # a policy built in Python is checked as a loaded one is
    with distributed_session(policy.device) as dist:
        device = dist.device
        # seeding inside fork_rng: fit is reproducible and leaves the caller's RNG as it was
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            _run_folder(run_dir, policy, dist, resume, overwrite) as folder,
        ):
            return _fit(model, policy, train, val, bundle, dist, folder, resume, progress, on_epoch_end)


@contextmanager
def _run_folder(
    run_dir: str | Path | RunFolder | None, policy: Policy, dist: Distributed, resume: bool, overwrite: bool
) -> Iterator[RunFolder]:
    """The run folder for one fit: the caller's opened one, else opened here (rank 0 writes) and closed after.

    Rank 0 opens it first; every rank learns whether that worked (one collective), so no rank
    waits for a rank 0 that failed. The other ranks then open a reader.
    """
    if isinstance(run_dir, RunFolder):
        if run_dir.resume != resume or overwrite:
            raise RunFolderError(
                f"expected resume={run_dir.resume} and overwrite=False with the run folder opened for "
                f"{str(run_dir.path)!r}, got resume={resume} and overwrite={overwrite}; they are set when it is opened"
            )
        dist.barrier()  # rank 0 opened it before fit: its run.json is there for the other ranks
        yield run_dir
        return
    path = Path(run_dir) if run_dir is not None else Path("runs") / policy.name
    folder: RunFolder | None = None
    error: HardenError | None = None
    if dist.is_main:
        try:
            folder = RunFolder.open(path, resume=resume, overwrite=overwrite, policy_hash=policy_hash(policy), rank=0)
        except HardenError as exc:
            error = exc
    if dist.any(error is not None):
        if error is not None:
            raise error
        raise RunFolderError(
            f"expected rank 0 to open the run folder {str(path)!r}, got an error there (see its message)"
        )
    with folder if folder is not None else RunFolder.open(path, resume=resume, rank=dist.rank) as opened:
        yield opened


def _fit(
    model: nn.Module | None,
    policy: Policy,
    train: TrainData | None,
    val: TrainData | None,
    bundle: DataBundle | None,
    dist: Distributed,
    folder: RunFolder,
    resume: bool,
    progress: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> FitResult:
    """Run the stages in order: data, set-up, resume, the epochs (train, probe, checkpoint), finish."""
    t_start = time.perf_counter()
    run_dir = folder.path
    data, val, bundle = resolve_data(policy, train, val, bundle)
    run = set_up(model, policy, dist, data, val, bundle, run_dir, progress and dist.is_main)
    run.run_id = folder.run_id  # rank 0 has written run.json: every rank passed the open above
    if resume:
        resume_run(run)
    p_hash = policy_hash(policy)
    sync_best(run, p_hash)  # the best so far from the (restored) history; stale best files go
    try:
        tensorboard = policy.train.tensorboard
        summary_writer_class(tensorboard)  # tensorboard: true without the package fails on every rank, first
        run.metrics = MetricsLog(run_dir if dist.is_main else None, tensorboard=tensorboard, history=run.history)
        if dist.is_main:
            atomic_write(run_dir / "policy.yaml", dump_policy(policy).encode())
        for epoch in range(run.start_epoch, policy.train.epochs):
            if run.stopped_early:  # a resumed run that early stopping had ended
                break
            t_epoch = time.perf_counter()
            end_epoch(run, train_epoch(run, epoch), t_epoch, p_hash, on_epoch_end)
    finally:
        run.mix.close()
        if run.metrics is not None:
            run.metrics.close()
    return _finish(run, p_hash, t_start)


def _finish(run: FitRun, p_hash: str, t_start: float) -> FitResult:
    """Select the weights (``train.select``), eval mode, standard memory format; write ``model.safetensors`` (rank 0)."""
    net, dist, spec = run.net, run.dist, run.policy.train
    selected = select_weights(run)
    net.eval()
    if spec.channels_last:
        to_memory_format(net, False)
    weights = run.run_dir / "model.safetensors"
    if dist.is_main:
        info: dict[str, Any] = {"policy_hash": p_hash, "epochs": spec.epochs, "epoch": selected}
        info |= {"best_epoch": run.best_epoch, "select": spec.select, "stopped_early": run.stopped_early}
        save_model(net, weights, {**info, "history": run.history})
    dist.barrier()
    metrics = run.metrics.csv_path if run.metrics is not None else None
    return FitResult(
        net,
        run.history,
        run.run_dir,
        weights,
        time.perf_counter() - t_start,
        run.resumed_from,
        {"rank": dist.rank, "world_size": dist.world_size},
        best_epoch=run.best_epoch,
        stopped_early=run.stopped_early,
        metrics_csv=metrics,
    )


def load_trained(
    policy: Policy, weights: str | Path, bundle: DataBundle | None = None
) -> tuple[Normalized, DataBundle]:
    """Rebuild the policy's model and load ``model.safetensors`` (hash-checked against ``model.json``).

    Args:
        policy: the policy the weights were trained under.
        weights: path of ``model.safetensors``.
        bundle: the policy's data already loaded (its classes and channels build the model);
            None: loaded here with :func:`harden.data.load_data`.

    Returns:
        The model (eval mode, on CPU) and the policy's data bundle (``bundle`` itself when given).

    Raises:
        CheckpointError: the weights file is missing, unreadable or fails its SHA-256 in
            ``model.json``; ``model.json`` is malformed (:func:`read_model_info`); the weights do
            not fit the policy's model.
        ModelError: the policy's model cannot be built.

    Example:
        >>> import tempfile
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> policy = tiny_policy(objectives=[{"name": "ce"}], train={"probe_examples": 0})
        >>> b = synthetic_bundle(96, 32)
        >>> result = fit(None, policy, bundle=b, run_dir=tempfile.mkdtemp(), progress=False)
        >>> net, same = load_trained(policy, result.weights, bundle=b)
        >>> same is b, net.training
        (True, False)
    """
    from safetensors.torch import load as st_load

    from harden.checkpoint import sha256_file

    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"expected trained weights at {str(weights)!r}, got no such file; run `harden fit` first")
    info = read_model_info(weights)
    if weights.with_suffix(".json").is_file():
        expected, found = info.get("sha256"), sha256_file(weights)
        if expected != found:
            raise CheckpointError(
                f"expected SHA-256 {expected} for {str(weights)!r} (from {weights.with_suffix('.json').name}), "
                f"got {found}"
            )
    if bundle is None:
        bundle = load_data(policy.data)
    net = build_model(policy.model, bundle.num_classes, bundle.in_chans)
    if weights.suffix == ".safetensors":
        try:
            state = st_load(weights.read_bytes())
        except Exception as exc:  # safetensors' SafetensorError and its header errors
            raise CheckpointError(
                f"expected a safetensors file at {str(weights)!r}, got one safetensors cannot read "
                f"({_first_line(exc)}); the file is truncated or corrupt: train again with `harden fit`"
            ) from None
        del state  # readable; loaded below like any weights file
    try:  # harden's keys or a plain state_dict (or .pth): keys matched, the normalization never switched
        load_classifier_weights(net, weights)
    except ModelError as exc:
        raise CheckpointError(str(exc)) from None
    return net.eval(), bundle


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def read_model_info(weights: str | Path) -> dict[str, Any]:
    """The JSON sidecar of ``model.safetensors`` (``model.json``), checked; ``{}`` when there is none.

    The sidecar may come from someone else: it must be a JSON object whose ``sha256`` (if
    present) is a string and whose ``history`` (if present) is a list of objects, each
    ``val_pgd_acc`` and ``val_clean_acc`` in them a number or null.

    Raises:
        CheckpointError: the sidecar cannot be read or is not such an object (one line, naming it).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> read_model_info(path)
        {}
        >>> _ = path.with_suffix(".json").write_text('{"sha256": "ab", "history": [{"val_pgd_acc": 0.5}]}')
        >>> read_model_info(path)["history"]
        [{'val_pgd_acc': 0.5}]
        >>> _ = path.with_suffix(".json").write_text("[]")
        >>> read_model_info(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        harden.errors.CheckpointError: expected a JSON object in '...model.json', got list; ...
    """
    sidecar = Path(weights).with_suffix(".json")
    if not sidecar.is_file():
        return {}
    where, remedy = repr(str(sidecar)), "the file is corrupt or not harden's: train again with `harden fit`"
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"expected readable JSON in {where}, got {_first_line(exc)}; {remedy}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"expected a JSON object in {where}, got {type(info).__name__}; {remedy}")
    if "sha256" in info and not isinstance(info["sha256"], str):
        raise CheckpointError(f"expected 'sha256' a string in {where}, got {type(info['sha256']).__name__}; {remedy}")
    history = info.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"expected 'history' a list of objects in {where}, got {history!r:.80}; {remedy}")
    for i, h in enumerate(history):
        for key in ("val_pgd_acc", "val_clean_acc"):
            v = h.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise CheckpointError(
                    f"expected history.{i}.{key} a number or null in {where}, got {v!r:.80}; {remedy}"
                )
    return info
