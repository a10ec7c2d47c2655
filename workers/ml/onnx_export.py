"""ONNX export of a model bundle (CNN or RNN, single model or Ensemble), checked with ONNX
Runtime against PyTorch before it is kept.

The exported graph (opset `OPSET`, fp32, batch and sequence length dynamic):

- sequence models: inputs `ids` int64 [batch, length] (token ids, 0 = padding, rows
  right-padded) and `lengths` int64 [batch] (real tokens per row; 0 reads one <pad> as
  the PyTorch model does). The model metadata carries the tokenizer (`medmaas.tokenizer`:
  vocabulary in id order, the token regex, max_len), so a program without MedMaaS can
  encode canonical SMILES (or whitespace tokens) itself;
- image models: input `images` float32 [batch, C, H, W]: pixels scaled to [0, 1], minus the
  per-channel mean, divided by the std of `medmaas.normalization`;
- outputs `raw` float32 [members, batch, K] (each member's raw output: logits, or
  standardised values for regression; members = 1 for a single model) and `values` float32
  [batch, K] (the members' mean probabilities, or values in the targets' units, before the
  bundle's calibration), K columns named by `medmaas.output_names`.

The PyTorch RNN packs its padded batches (pack_padded_sequence), which ONNX has no operator
for. The exported forward (`ExportableRNN`) instead runs each layer's forward direction over
the padded rows and reads step lengths-1, and its backward direction over each row reversed
within its own length (a gather), so padding never enters a state that is read: the result
equals the packed one for any amount of padding, bidirectional and multi-layer included.

`export_checked` exports, runs ONNX Runtime and PyTorch on the validation inputs and refuses
the export (OnnxExportError) when any output differs by more than MAX_ABS_DIFF; the train
worker records that as `metrics["onnx"]["error"]` and still registers the version.

Versions registered before exports existed get theirs from the worker side (torch is needed,
the web process never imports it):

    python -m workers.ml.onnx_export backfill [--tenant ID] [--model NAME] [--version N]

reads MEDMAAS_* settings like a worker, rebuilds each version's validation split from its
dataset (synthetic probe inputs when the dataset was erased, recorded as such), writes
`model.onnx` next to the weights and adds `onnx` to the version's metrics.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app import artifacts
from app.artifacts import open_read, open_write

from .bundle import CONFIG_FILE, load_bundle, read_bundle_config
from .cnn import ImageCNN
from .data import BatchDataset, PreparedData
from .ensemble import member_outputs, members_of
from .heads import Head, RegressionHead
from .rnn import CELLS, SequenceRNN

__all__ = [
    "MAX_ABS_DIFF",
    "ONNX_FILE",
    "OPSET",
    "ExportGraph",
    "ExportableRNN",
    "OnnxExportError",
    "export_bundle",
    "export_checked",
    "export_graph",
    "graph_inputs",
    "graph_outputs",
]

OPSET = 17  # pinned: the ONNX operator set every export uses
ONNX_FILE = "model.onnx"
MAX_ABS_DIFF = 1e-4  # fp32 agreement required between ONNX Runtime and PyTorch
log = logging.getLogger(__name__)

# the predictive heads (workers/ml/heads.py); language models (pretrain) are not exported
EXPORTED_TASKS = ("classification", "multilabel", "regression")
CHECK_ROWS = 4096  # validation rows compared at export (the split's first rows)
CHECK_BATCH = 256  # rows per compared batch, in split order (mixed lengths: padding exercised)


class OnnxExportError(RuntimeError):
    """The model could not be exported, or ONNX Runtime disagrees with PyTorch."""


# --------------------------------------------------------------------------- graph modules


def _single_layer(cell: str, rnn: nn.RNNBase, layer: int, suffix: str) -> nn.Module:
    """One direction of one layer of `rnn` as its own unidirectional batch-first module."""
    size = rnn.input_size if layer == 0 else rnn.hidden_size * (2 if rnn.bidirectional else 1)
    extra = {"nonlinearity": rnn.nonlinearity} if cell == "rnn" else {}
    one = CELLS[cell](size, rnn.hidden_size, num_layers=1, batch_first=True, **extra)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(one, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{layer}{suffix}"))
    return one


def _gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, F] gathered along steps by index [B, L'] -> [B, L', F]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class ExportableRNN(nn.Module):
    """A SequenceRNN's computation without packed sequences (same weights, eval mode).

    Forward directions run over the padded rows and are read at step lengths-1; backward
    directions run over each row reversed within its length, so their state at the row's
    first token never saw padding. Steps past a row's length produce values that no read
    state depends on.
    """

    def __init__(self, model: SequenceRNN) -> None:
        super().__init__()
        cfg = model.cfg
        rnn = model.rnn
        assert isinstance(rnn, nn.RNNBase)
        self.bidirectional = bool(cfg.bidirectional)
        self.embedding = copy.deepcopy(model.embedding)
        self.forward_layers = nn.ModuleList(_single_layer(cfg.cell, rnn, k, "") for k in range(cfg.num_layers))
        self.backward_layers = nn.ModuleList(
            _single_layer(cfg.cell, rnn, k, "_reverse") for k in range(cfg.num_layers) if self.bidirectional
        )
        self.head = copy.deepcopy(model.head)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.cumsum(torch.ones_like(ids), dim=1) - 1  # [B, L]: 0..L-1 per row
        lengths = torch.minimum(lengths.to(torch.int64).clamp(min=1), steps[:, -1] + 1)
        last = (lengths - 1).unsqueeze(1)  # [B, 1]
        x = self.embedding(ids)
        reverse = torch.where(steps < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - steps, steps)
        reads: list[torch.Tensor] = []
        for k, layer in enumerate(self.forward_layers):
            fwd = layer(x)[0]
            reads = [_gather_steps(fwd, last).squeeze(1)]
            if self.bidirectional:
                bwd_reversed = self.backward_layers[k](_gather_steps(x, reverse))[0]
                reads.append(_gather_steps(bwd_reversed, last).squeeze(1))
                x = torch.cat([fwd, _gather_steps(bwd_reversed, reverse)], dim=2)
            else:
                x = fwd
        return self.head(torch.cat(reads, dim=1))


def _exportable(member: nn.Module) -> nn.Module:
    if isinstance(member, SequenceRNN):
        return ExportableRNN(member)
    if isinstance(member, ImageCNN):
        return copy.deepcopy(member)
    raise OnnxExportError(f"{type(member).__name__} has no ONNX export")


class ExportGraph(nn.Module):
    """What is exported: every member on the same inputs -> (raw [M, B, K], values [B, K]);
    values are the head's user-facing numbers (softmax, sigmoid, de-standardised), averaged
    over the members."""

    def __init__(self, model: nn.Module, head: Head) -> None:
        super().__init__()
        self.members = nn.ModuleList(_exportable(m).float().eval() for m in members_of(model))
        self.kind = head.name
        k = head.num_outputs
        mean = head.mean if isinstance(head, RegressionHead) else np.zeros(k)
        std = head.std if isinstance(head, RegressionHead) else np.ones(k)
        self.register_buffer("mean", torch.tensor(np.asarray(mean), dtype=torch.float32).view(1, 1, k))
        self.register_buffer("std", torch.tensor(np.asarray(std), dtype=torch.float32).view(1, 1, k))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.stack([member(*inputs) for member in self.members])
        if self.kind == "classification":
            values = torch.softmax(raw, dim=2)
        elif self.kind == "multilabel":
            values = torch.sigmoid(raw)
        else:
            values = raw * self.get_buffer("std") + self.get_buffer("mean")
        return raw, values.mean(dim=0)


# --------------------------------------------------------------------------- description


def graph_inputs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The exported graph's inputs, as recorded in metrics["onnx"]["inputs"]."""
    kind = config["input"]["kind"]
    if kind == "image":
        c = int(config["input"]["channels"])
        h, w = (int(v) for v in config["input"]["size"])
        return [
            {
                "name": "images",
                "dtype": "float32",
                "shape": ["batch", c, h, w],
                "doc": "pixels scaled to [0, 1], minus the per-channel mean and divided by the std of "
                "metadata medmaas.normalization",
            }
        ]
    return [
        {
            "name": "ids",
            "dtype": "int64",
            "shape": ["batch", "length"],
            "doc": f"token ids of the {kind} (metadata medmaas.tokenizer: vocab in id order, token regex), "
            "rows right-padded with 0; SMILES in RDKit canonical form, as the model was trained",
        },
        {"name": "lengths", "dtype": "int64", "shape": ["batch"], "doc": "real tokens in each row"},
    ]


def graph_outputs(config: dict[str, Any]) -> list[dict[str, Any]]:
    head = Head.from_dict(config["task"])
    names = list(config.get("output_names") or head.output_names)
    what = {
        "classification": "class probabilities (softmax)",
        "multilabel": "label probabilities (sigmoid)",
        "regression": "values in the targets' units",
    }[head.name]
    return [
        {
            "name": "raw",
            "dtype": "float32",
            "shape": ["members", "batch", len(names)],
            "doc": "each member's raw output (logits, or standardised values for regression)",
        },
        {
            "name": "values",
            "dtype": "float32",
            "shape": ["batch", len(names)],
            "columns": names,
            "doc": f"the members' mean {what}, before the bundle's calibration",
        },
    ]


def _metadata(config: dict[str, Any]) -> dict[str, str]:
    from .tokenizers import _SMILES_ALTERNATIVES

    meta = {
        "medmaas.arch": str(config.get("arch")),
        "medmaas.task": json.dumps(config["task"]),
        "medmaas.input": json.dumps(config["input"]),
        "medmaas.output_names": json.dumps(config.get("output_names")),
        "medmaas.members": str(int(config.get("members") or 1)),
        "medmaas.inputs": json.dumps(graph_inputs(config)),
        "medmaas.outputs": json.dumps(graph_outputs(config)),
    }
    tok = config.get("tokenizer")
    if tok:
        pattern = _SMILES_ALTERNATIVES if tok["type"] == "smiles" else r"[^\s]+"
        meta["medmaas.tokenizer"] = json.dumps(
            {**tok, "pattern": pattern, "pad_id": 0, "unk_id": 1, "note": "re.findall(pattern, text); unknown -> 1"}
        )
    if config.get("normalization"):
        meta["medmaas.normalization"] = json.dumps(config["normalization"])
    return meta


# --------------------------------------------------------------------------- export and check


def _dummy_inputs(config: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Trace inputs whose sizes are not 1 (the exporter must not specialise on them)."""
    if config["input"]["kind"] == "image":
        h, w = (int(v) for v in config["input"]["size"])
        return (torch.zeros(2, int(config["input"]["channels"]), h, w),)
    vocab = int(config["model"]["vocab_size"])
    ids = torch.randint(2, max(3, vocab), (3, 5), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([5, 3, 2])
    ids[1, 3:] = 0
    ids[2, 2:] = 0
    return ids, lengths


def export_graph(model: nn.Module, config: dict[str, Any]) -> bytes:
    """The ONNX model (bytes) of a bundle's module and config."""
    import onnx

    with torch.random.fork_rng(devices=[]):  # building the per-layer modules draws (discarded) initial weights
        graph = ExportGraph(copy.deepcopy(model).to("cpu").float().eval(), Head.from_dict(config["task"])).eval()
    sequence = config["input"]["kind"] != "image"
    names = ["ids", "lengths"] if sequence else ["images"]
    axes: dict[str, dict[int, str]] = (
        {"ids": {0: "batch", 1: "length"}, "lengths": {0: "batch"}} if sequence else {"images": {0: "batch"}}
    )
    axes.update({"raw": {1: "batch"}, "values": {0: "batch"}})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and RNN batch-size notes
        try:
            torch.onnx.export(
                graph,
                _dummy_inputs(config),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
                dynamo=False,
                opset_version=OPSET,
                input_names=names,
                output_names=["raw", "values"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # any exporter failure is this export's failure
            raise OnnxExportError(f"torch.onnx.export failed: {exc}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = "MedMaaS model export; see metadata medmaas.inputs and medmaas.outputs"
    for key, value in _metadata(config).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _batches(dataset: BatchDataset, rows: int) -> Iterator[tuple[torch.Tensor, ...]]:
    n = min(len(dataset), rows)
    for start in range(0, n, CHECK_BATCH):
        inputs, _ = dataset.__getitems__(list(range(start, min(start + CHECK_BATCH, n))))
        yield tuple(inputs)


def check_inputs(data: PreparedData | None, config: dict[str, Any]) -> tuple[str, list[tuple[torch.Tensor, ...]]]:
    """(where they come from, input batches) to compare on: the validation split (else the
    test or training split), or synthetic probes when there is no data."""
    if data is not None:
        for name, split in (("val", data.val), ("test", data.test), ("train", data.train)):
            if split is not None and len(split):
                return name, list(_batches(split, CHECK_ROWS))
    return "synthetic", list(_synthetic_batches(config))


def _synthetic_batches(config: dict[str, Any], rows: int = 512) -> Iterator[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    if config["input"]["kind"] == "image":
        h, w = (int(v) for v in config["input"]["size"])
        for _ in range(0, rows, CHECK_BATCH):
            yield (torch.randn(CHECK_BATCH, int(config["input"]["channels"]), h, w, generator=gen),)
        return
    vocab = int(config["model"]["vocab_size"])
    max_len = int(config["input"].get("max_len") or 100)
    for _ in range(0, rows, CHECK_BATCH):
        lengths = torch.randint(0, max_len + 1, (CHECK_BATCH,), generator=gen)
        width = max(1, int(lengths.max()))
        ids = torch.randint(1, max(2, vocab), (CHECK_BATCH, width), generator=gen)
        ids[torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
        yield ids, lengths


def _session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no shape-inference chatter for dynamic axes
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def max_abs_diff(
    model: nn.Module, config: dict[str, Any], onnx_bytes: bytes, batches: Sequence[tuple[torch.Tensor, ...]]
) -> float:
    """Largest |ONNX Runtime - PyTorch| over both outputs (raw and values) and all batches;
    PyTorch runs the original module (packed sequences) in fp32 on the CPU."""
    session = _session(onnx_bytes)
    reference = copy.deepcopy(model).to("cpu").float().eval()
    head = Head.from_dict(config["task"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    with torch.inference_mode():
        for inputs in batches:
            raw = member_outputs(reference, *inputs).numpy()
            values = np.mean([head.transform(r) for r in raw], axis=0)
            feeds = {
                n: x.numpy().astype(np.int64 if n != "images" else np.float32)
                for n, x in zip(names, inputs, strict=True)
            }
            ort_raw, ort_values = session.run(["raw", "values"], feeds)
            if ort_raw.shape != raw.shape or ort_values.shape != values.shape:
                raise OnnxExportError(f"ONNX output shapes {ort_raw.shape}/{ort_values.shape} differ from PyTorch")
            diff = max(
                float(np.max(np.abs(ort_raw - raw), initial=0.0)),
                float(np.max(np.abs(ort_values - values), initial=0.0)),
            )
            if not np.isfinite(diff):
                raise OnnxExportError("ONNX Runtime returned non-finite outputs where PyTorch did not")
            worst = max(worst, diff)
    return worst


def export_checked(
    model: nn.Module, config: dict[str, Any], data: PreparedData | None = None
) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, the metrics["onnx"] record) after comparing ONNX Runtime with PyTorch on
    the validation inputs; OnnxExportError when export fails or |diff| > MAX_ABS_DIFF."""
    import onnxruntime as ort

    onnx_bytes = export_graph(model, config)
    source, batches = check_inputs(data, config)
    diff = max_abs_diff(model, config, onnx_bytes, batches)
    rows = sum(len(b[0]) for b in batches)
    if diff > MAX_ABS_DIFF:
        raise OnnxExportError(
            f"ONNX Runtime differs from PyTorch by {diff:.3g} (> {MAX_ABS_DIFF:g}) on {rows} {source} rows"
        )
    info = {
        "file": ONNX_FILE,
        "opset": OPSET,
        "max_abs_diff": diff,
        "tolerance": MAX_ABS_DIFF,
        "checked_on": source,
        "rows_checked": rows,
        "bytes": len(onnx_bytes),
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
        "inputs": graph_inputs(config),
        "outputs": graph_outputs(config),
    }
    return onnx_bytes, info


def _update_config_metrics(directory: Path, onnx_info: dict[str, Any]) -> None:
    config = read_bundle_config(directory)
    config["metrics"] = {**(config.get("metrics") or {}), "onnx": onnx_info}
    with open_write(directory / CONFIG_FILE) as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))


def export_bundle(
    directory: str | os.PathLike[str], data: PreparedData | None = None, model: nn.Module | None = None
) -> dict[str, Any]:
    """Export a saved bundle to `directory`/model.onnx when the check passes, and record
    metrics["onnx"] in its config.json. Returns that record: {"error": ...} (and no file)
    when the export failed or disagreed with PyTorch."""
    directory = Path(directory)
    config = read_bundle_config(directory)
    if model is None:
        model, _ = load_bundle(directory, "cpu")
    try:
        onnx_bytes, info = export_checked(model, config, data)
    except OnnxExportError as exc:
        info = {"opset": OPSET, "tolerance": MAX_ABS_DIFF, "error": str(exc)}
        artifacts.remove(directory / ONNX_FILE)
    else:
        with open_write(directory / ONNX_FILE) as fh:
            fh.write(onnx_bytes)
    _update_config_metrics(directory, info)
    return info


def export_at_registration(directory: str | os.PathLike[str], model: nn.Module, data: PreparedData) -> dict[str, Any]:
    """export_bundle for the train worker: a failed export is recorded, never raised (the
    version is registered without model.onnx and its metrics say why)."""
    try:
        return export_bundle(directory, data, model)
    except Exception as exc:  # the training succeeded; only the export did not
        log.exception("ONNX export of %s failed", directory)
        return {"opset": OPSET, "tolerance": MAX_ABS_DIFF, "error": f"{type(exc).__name__}: {exc}"}


def read_onnx(directory: str | os.PathLike[str]) -> bytes | None:
    """The bundle's model.onnx bytes (decrypted where the store encrypts), or None."""
    path = Path(directory) / ONNX_FILE
    if not artifacts.is_file(path):
        return None
    with open_read(path) as fh:
        return fh.read()


# --------------------------------------------------------------------------- backfill


def _version_data(db: Any, store: Any, mv: Any) -> PreparedData | None:
    """The version's data rebuilt from its dataset and spec (None when the dataset is gone)."""
    from app.models import Dataset
    from workers.kinds.train import prepare_data

    with db.session() as s:
        dataset = s.get(Dataset, mv.dataset_id) if mv.dataset_id is not None else None
        if dataset is None or dataset.tenant_id != mv.tenant_id or dataset.data_uri is None:
            return None
        s.expunge(dataset)
    try:
        return prepare_data(mv.spec, dataset, store)
    except (OSError, ValueError, KeyError):
        return None


def backfill(
    settings: Any, *, tenant: int | None = None, model: str | None = None, version: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Export every matching version that has no model.onnx yet; returns (label, record)."""
    from sqlalchemy import select

    from app.artifacts import ArtifactStore, configure
    from app.db import Database
    from app.models import ModelVersion

    configure(settings)
    db = Database(settings.sqlalchemy_url)
    store = ArtifactStore.from_settings(settings)
    query = (
        select(ModelVersion)
        .where(ModelVersion.arch.in_(("cnn", "rnn")), ModelVersion.task.in_(EXPORTED_TASKS))
        .order_by(ModelVersion.id)
    )
    if tenant is not None:
        query = query.where(ModelVersion.tenant_id == tenant)
    if model is not None:
        query = query.where(ModelVersion.name == model)
    if version is not None:
        query = query.where(ModelVersion.version == version)
    with db.session() as s:
        rows = list(s.scalars(query).all())
        for row in rows:
            s.expunge(row)
    done: list[tuple[str, dict[str, Any]]] = []
    for mv in rows:
        directory = store.path(mv.artifact_uri)
        label = f"tenant {mv.tenant_id} {mv.name} v{mv.version}"
        if not artifacts.is_dir(directory) or artifacts.is_file(directory / ONNX_FILE):
            continue
        try:
            info = export_bundle(directory, _version_data(db, store, mv))
        except (OSError, ValueError, KeyError) as exc:  # an unreadable bundle: say so, go on with the others
            info = {"opset": OPSET, "tolerance": MAX_ABS_DIFF, "error": f"{type(exc).__name__}: {exc}"}
        with db.session() as s:
            current = s.get(ModelVersion, mv.id)
            if current is not None:
                current.metrics = {**(current.metrics or {}), "onnx": info}
        done.append((label, info))
    return done


def main(argv: Sequence[str] | None = None) -> int:
    from app.config import from_env

    parser = argparse.ArgumentParser(prog="python -m workers.ml.onnx_export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fill = sub.add_parser("backfill", help="export the versions that have no model.onnx yet")
    fill.add_argument("--tenant", type=int)
    fill.add_argument("--model")
    fill.add_argument("--version", type=int)
    one = sub.add_parser("bundle", help="export one bundle directory (synthetic check inputs)")
    one.add_argument("directory")
    args = parser.parse_args(argv)
    if args.command == "bundle":
        records = [(args.directory, export_bundle(args.directory))]
    else:
        records = backfill(from_env(), tenant=args.tenant, model=args.model, version=args.version)
    failed = 0
    for label, info in records:
        failed += "error" in info
        print(
            f"{label}: " + (f"FAILED {info['error']}" if "error" in info else f"max |diff| {info['max_abs_diff']:.2e}")
        )
    print(f"{len(records)} exported, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
