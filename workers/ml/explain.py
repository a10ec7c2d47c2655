"""Attributions: which atoms (SMILES models) or pixels (image models) drove a prediction.

SMILES models: Captum's LayerIntegratedGradients over the embedding layer (every member's
embedding for an ensemble), from a baseline of all-padding ids with the same lengths (the
padding embedding) to the input, Gauss-Legendre over `steps` points. The attributed function
is the prediction in the user's units: the class probability (softmax; sigmoid for
multilabel) or the de-standardised regression value, averaged over ensemble members the way
a prediction averages them, with the version's stored temperature calibration applied
(config["calibration"], as workers/ml/calibration.py does at predict time). Per token the attribution is summed over the embedding dimension, so by IG's
completeness the token weights add up to prediction - baseline (the remainder is `delta`).

Token -> atom rule (tokens of the model's SMILES tokenizer, atoms numbered in SMILES order,
which is RDKit's atom order for a molecule parsed from that SMILES):
- atom tokens (bracket atoms such as `[nH]`, `[O-]`, `[13CH3]`; the organic subset B C N O
  P S F Cl Br I, aromatic b c n o p s, and `*`) go wholly to their atom;
- bond tokens (- = # $ : / \\ ~) are split half to each atom of the bond they write: the atom
  the bond hangs from (after a branch `)` that is the branch's root, not the atom before it)
  and the next atom, or for a bond written before a ring-closure digit the two ring atoms;
- ring-closure tokens (1-9, %nn, %(nnn)) go to the atom they follow;
- branches `(` `)`, the `.` separator and anything else carry no atom and are dropped.
The rule is checked against RDKit: a SMILES whose atom-token count differs from RDKit's
atom count gets an error instead of weights. Token and atom weights are each divided by
their largest magnitude (signed, max |w| = 1; all zero stays zero); `scale` is that largest
atom magnitude in output units, so weight * scale is the atom's contribution.

Image models: Grad-CAM on the last convolutional block (`features[-1]`, on the members' raw
outputs: class logits or standardised values, averaged over members), ReLU'd, upsampled
(bilinear) to the model's input size and divided by its maximum -> [0, 1]; or integrated
gradients of the user-unit output from an all-zero baseline in normalised space (the
training mean image), summed over channels and divided by max |w| -> [-1, 1].

Faithfulness (`faithfulness`): on held-out inputs, the mean |change of the prediction| (user
units; classification: the predicted class's probability) when the top `fraction` of atom
tokens by |IG weight| are replaced by padding (pixels by Grad-CAM: set to 0 in normalised
space) versus the same number chosen at random (seeded, several draws averaged).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, LayerIntegratedGradients
from torch import nn

from .calibration import PROB_FLOOR as _PROB_FLOOR
from .cnn import ImageCNN
from .draw import mol_from_smiles
from .ensemble import members_of
from .heads import ClassificationHead, Head, MultilabelHead, RegressionHead
from .rnn import SequenceRNN
from .tokenizers import PAD_ID, Tokenizer

if TYPE_CHECKING:
    from .data import PreparedData
    from .predict import Predictor

__all__ = [
    "EXPLAINABLE_INPUTS",
    "atom_weights",
    "explain_images",
    "explain_smiles",
    "faithfulness",
    "faithfulness_images",
    "faithfulness_sequences",
    "is_atom_token",
    "token_atoms",
]

EXPLAINABLE_INPUTS = ("smiles", "image")
IMAGE_METHODS = ("gradcam", "ig")

# Sequences (steps x rows) per forward pass, and rows (inputs x outputs) per Captum call:
# bounds memory while one API batch stays one call.
_STEP_ROW_BUDGET = 2048
_MAX_ROWS_PER_CALL = 1024
_IMAGE_ELEMENT_BUDGET = 1 << 22  # input elements (C*H*W*rows) per image forward pass
_RANDOM_DRAWS = 5

_ORGANIC = frozenset({"B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I", "b", "c", "n", "o", "p", "s", "*"})
_BONDS = frozenset({"-", "=", "#", "$", ":", "/", "\\", "~"})
_RING = re.compile(r"[0-9]|%[0-9]{2}|%\([0-9]+\)")

# (atom index, share of the token's weight)
TokenShares = list[tuple[int, float]]


# --------------------------------------------------------------------------- tokens -> atoms


def is_atom_token(token: str) -> bool:
    """True for a SMILES token that writes one atom (bracket atom or organic subset)."""
    return token in _ORGANIC or (len(token) > 2 and token[0] == "[" and token[-1] == "]")


def token_atoms(tokens: Sequence[str]) -> tuple[list[TokenShares], int]:
    """For each token, the atoms its weight goes to (module docstring rule); and the atom count."""
    shares: list[TokenShares] = [[] for _ in tokens]
    n_atoms = 0
    current: int | None = None  # the atom the next bond or atom attaches to
    branch_roots: list[int | None] = []
    pending_bond: int | None = None  # index of a bond token still waiting for its second atom
    open_rings: dict[str, tuple[int, int | None]] = {}  # label -> (atom, bond token written there)
    for i, tok in enumerate(tokens):
        if is_atom_token(tok):
            atom = n_atoms
            n_atoms += 1
            shares[i].append((atom, 1.0))
            if pending_bond is not None:
                ends = [atom] if current is None else [current, atom]
                shares[pending_bond].extend((a, 1.0 / len(ends)) for a in ends)
                pending_bond = None
            current = atom
        elif tok in _BONDS:
            pending_bond = i
        elif _RING.fullmatch(tok) and current is not None:
            shares[i].append((current, 1.0))
            bond, pending_bond = pending_bond, None
            if tok in open_rings:
                partner, first_bond = open_rings.pop(tok)
                for b in (first_bond, bond):
                    if b is not None:
                        shares[b].extend(((partner, 0.5), (current, 0.5)))
            else:
                open_rings[tok] = (current, bond)
        elif tok == "(":
            branch_roots.append(current)
        elif tok == ")":
            current = branch_roots.pop() if branch_roots else current
        elif tok == ".":
            current, pending_bond = None, None
    for atom, bond in open_rings.values():  # an unclosed ring bond: all to its one atom
        if bond is not None:
            shares[bond].append((atom, 1.0))
    return shares, n_atoms


def atom_weights(
    shares: Sequence[TokenShares], token_weights: Sequence[float] | np.ndarray, n_atoms: int
) -> np.ndarray:
    """Per-atom sums of token weights by the token -> atom shares; float64 [n_atoms]."""
    out = np.zeros(n_atoms, dtype=np.float64)
    for token_shares, w in zip(shares, token_weights, strict=True):
        for atom, share in token_shares:
            out[atom] += share * w
    return out


def _normalised(w: np.ndarray) -> tuple[np.ndarray, float]:
    """(w / max |w|, max |w|); all-zero (or empty) stays zero with scale 0."""
    scale = float(np.abs(w).max()) if w.size else 0.0
    return (w / scale if scale > 0 else np.zeros_like(w)), scale


# --------------------------------------------------------------------------- shared helpers


def user_output_fn(
    model: nn.Module, head: Head, calibration: Mapping[str, Any] | None = None
) -> Callable[..., torch.Tensor]:
    """model inputs -> [B, K] predictions in the user's units: class probabilities (softmax;
    sigmoid for multilabel; members' probabilities averaged, then the stored temperature
    calibration of workers/ml/calibration.py applied when given) or regression values
    (members' standardised outputs averaged, then de-standardised)."""
    device = next(model.parameters()).device
    scale = shift = temperature = None
    if isinstance(head, RegressionHead):
        scale = torch.as_tensor(head.std, dtype=torch.float32, device=device)
        shift = torch.as_tensor(head.mean, dtype=torch.float32, device=device)
    kind = (calibration or {}).get("type")
    if calibration is not None and isinstance(head, ClassificationHead) and kind == "classification":
        temperature = torch.tensor(float(calibration["temperature"]), device=device)
    elif calibration is not None and isinstance(head, MultilabelHead) and kind == "multilabel":
        temps = [float(calibration["temperature"][n]) for n in head.label_names]
        temperature = torch.tensor(temps, device=device)

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        raw = model(*inputs).float()
        if isinstance(head, ClassificationHead):
            raw = torch.softmax(raw, dim=-1)
        elif isinstance(head, MultilabelHead):
            raw = torch.sigmoid(raw)
        out = raw.mean(0) if raw.dim() == 3 else raw
        if scale is not None and shift is not None:
            out = out * scale + shift
        elif temperature is not None and isinstance(head, ClassificationHead):
            out = torch.softmax(out.clamp(min=_PROB_FLOOR).log() / temperature, dim=-1)
        elif temperature is not None:
            p = out.clamp(_PROB_FLOOR, 1.0 - 1e-7)
            out = torch.sigmoid((p.log() - (-p).log1p()) / temperature)
        return out

    return forward


def _embedding(model: nn.Module) -> nn.Module:
    if not isinstance(model, SequenceRNN):
        raise ValueError(f"SMILES attributions need a SequenceRNN, not {type(model).__name__}")
    return model.embedding


def _last_conv_block(model: nn.Module) -> nn.Module:
    if not isinstance(model, ImageCNN):
        raise ValueError(f"image attributions need an ImageCNN, not {type(model).__name__}")
    return model.features[-1]


def _check_target(target: int | None, num_outputs: int) -> None:
    if target is not None and not 0 <= target < num_outputs:
        raise ValueError(f"target must be an output index in 0..{num_outputs - 1}, got {target}")


def _image_rows(pixels_per_image: int) -> int:
    """Images per forward pass under the memory budget (>= 1)."""
    return max(1, min(512, _IMAGE_ELEMENT_BUDGET // max(1, pixels_per_image)))


class _EvalMode:
    """Eval mode (no dropout) for the duration, and with `rnn=True` no cuDNN (the cuDNN RNN
    backward needs train mode); the model's previous mode comes back afterwards."""

    def __init__(self, model: nn.Module, *, rnn: bool = False) -> None:
        self.model, self.was_training = model, model.training
        self.cudnn = torch.backends.cudnn.flags(enabled=False) if rnn else contextlib.nullcontext()

    def __enter__(self) -> None:
        self.model.eval()
        self.cudnn.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.cudnn.__exit__(*exc)
        self.model.train(self.was_training)


# --------------------------------------------------------------------------- sequences


def _sequence_ig(
    model: nn.Module,
    forward: Callable[..., torch.Tensor],
    ids: torch.Tensor,
    lengths: torch.Tensor,
    targets: Sequence[int],
    steps: int,
    device: torch.device,
) -> np.ndarray:
    """Token attributions float64 [R, L]: IG of forward(...)[r, targets[r]] over the
    embedding layer(s), baseline all-padding ids, summed over the embedding dimension."""
    layers = [_embedding(m) for m in members_of(model)]
    with warnings.catch_warnings():  # the members' embeddings are independent, as Captum asks
        warnings.filterwarnings("ignore", "Multiple layers provided", UserWarning)
        lig = LayerIntegratedGradients(forward, layers if len(layers) > 1 else layers[0])
    out = np.zeros(tuple(ids.shape), dtype=np.float64)
    with _EvalMode(model, rnn=True), torch.inference_mode(False), torch.enable_grad():
        for rows in _same_length_groups(lengths):
            index = rows.tolist()
            width = max(1, int(lengths[index[0]]))
            x = ids[rows, :width].to(device)
            attr = lig.attribute(
                x,
                baselines=torch.full_like(x, PAD_ID),
                target=[int(targets[r]) for r in index],
                additional_forward_args=(lengths[rows],),
                n_steps=steps,
                internal_batch_size=max(len(rows), _STEP_ROW_BUDGET),
            )
            parts = attr if isinstance(attr, list) else [attr]
            total = torch.stack([p.detach().float().sum(-1) for p in parts]).sum(0)
            out[index, :width] = total.cpu().numpy()
    return out


def _same_length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Row indices grouped by sequence length, at most _MAX_ROWS_PER_CALL rows per group.

    Every IG step of one input has that input's length, so a group is one Captum call with
    no padding, and a model that skips packing for equal lengths runs unpacked: the CPU
    backward of a packed RNN grows with length squared (each time step's slice of the
    packed input gets a full-size zero gradient).
    """
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order]
    groups: list[torch.Tensor] = []
    for run in torch.split(order, torch.unique_consecutive(sorted_lengths, return_counts=True)[1].tolist()):
        groups.extend(torch.split(run, _MAX_ROWS_PER_CALL))
    return groups


@torch.no_grad()
def _sequence_outputs(
    model: nn.Module,
    forward: Callable[..., torch.Tensor],
    ids: torch.Tensor,
    lengths: torch.Tensor,
    device: torch.device,
) -> np.ndarray:
    """User-unit outputs float64 [N, K] in eval mode, in batches."""
    outs = []
    with _EvalMode(model, rnn=True):
        for start in range(0, len(ids), _STEP_ROW_BUDGET):
            rows = slice(start, start + _STEP_ROW_BUDGET)
            outs.append(forward(ids[rows].to(device), lengths[rows]).double().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0))


def _pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    ids = torch.full((len(rows), max(1, int(lengths.max()))), PAD_ID, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
    return ids, lengths


def explain_smiles(
    predictor: Predictor, smiles: Sequence[str], *, steps: int = 32, target: int | None = None
) -> list[dict[str, Any]]:
    """Integrated-gradients atom attributions for canonical SMILES, one dict per input:

    `{"tokens": [...], "outputs": {output_name: {"atom_weights": {atom_idx: w},
    "token_weights": [w per token], "prediction", "baseline", "delta", "scale"}}}` or
    `{"error": reason}`. Every output is explained, or only output index `target`. Weights
    are signed, normalised to max |w| = 1; prediction/baseline/delta/scale are in the
    output's units (probability, or the regression target's units); delta = sum of raw
    token attributions - (prediction - baseline), IG's completeness gap.
    """
    if predictor.input["kind"] != "smiles" or predictor.tokenizer is None:
        raise ValueError(f"explanations need a SMILES model, not {predictor.input['kind']} input")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    tokenizer: Tokenizer = predictor.tokenizer
    head, names = predictor.head, predictor.output_names
    _check_target(target, head.num_outputs)
    outputs = [target] if target is not None else list(range(head.num_outputs))
    vocab = tokenizer._vocab()

    results: list[dict[str, Any]] = [{} for _ in smiles]
    valid: list[int] = []
    token_lists: list[list[str]] = []
    share_lists: list[list[TokenShares]] = []
    for i, s in enumerate(smiles):
        error, tokens, shares = _prepare_smiles(predictor, tokenizer, i, s)
        if error is not None:
            results[i] = {"error": error}
            continue
        valid.append(i)
        token_lists.append(tokens)
        share_lists.append(shares)
    if not valid:
        return results

    ids, lengths = _pad([vocab.lookup(t) for t in token_lists])
    model, device = predictor.model, predictor.device
    forward = user_output_fn(model, head, predictor.config.get("calibration"))
    n, k = len(valid), len(outputs)
    row_mol = np.repeat(np.arange(n), k)
    row_out = np.tile(np.asarray(outputs), n)
    attr = _sequence_ig(model, forward, ids[row_mol], lengths[row_mol], row_out.tolist(), steps, device)
    ends = _sequence_outputs(model, forward, torch.cat([ids, torch.full_like(ids, PAD_ID)]), lengths.repeat(2), device)
    pred, base = ends[:n], ends[n:]

    for r in range(len(row_mol)):
        j, out = int(row_mol[r]), int(row_out[r])
        tokens, shares = token_lists[j], share_lists[j]
        token_w = attr[r, : len(tokens)]
        atoms, scale = _normalised(atom_weights(shares, token_w, _atom_count(shares)))
        token_norm, _ = _normalised(token_w)
        entry = results[valid[j]]
        entry.setdefault("tokens", tokens)
        entry.setdefault("outputs", {})[names[out]] = {
            "atom_weights": {a: float(w) for a, w in enumerate(atoms)},
            "token_weights": [float(w) for w in token_norm],
            "prediction": float(pred[j, out]),
            "baseline": float(base[j, out]),
            "delta": float(token_w.sum() - (pred[j, out] - base[j, out])),
            "scale": scale,
        }
    return results


def _atom_count(shares: Sequence[TokenShares]) -> int:
    return 1 + max((a for s in shares for a, _ in s), default=-1)


def _prepare_smiles(
    predictor: Predictor, tokenizer: Tokenizer, index: int, smiles: object
) -> tuple[str | None, list[str], list[TokenShares]]:
    """(error or None, tokens, token -> atom shares) for one input."""
    if not isinstance(smiles, str) or not smiles.strip():
        return "empty or non-text input", [], []
    if (err := predictor.too_long(index, smiles)) is not None:
        return err, [], []
    mol = mol_from_smiles(smiles)
    if mol is None:
        return f"input {index} is not a valid SMILES", [], []
    tokens = tokenizer.tokenize(smiles)
    shares, n_atoms = token_atoms(tokens)
    if n_atoms != mol.GetNumAtoms():
        return f"input {index}: {n_atoms} atom tokens but RDKit reads {mol.GetNumAtoms()} atoms", [], []
    return None, tokens, shares


# --------------------------------------------------------------------------- images


def _image_heatmaps(
    model: nn.Module,
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    targets: Sequence[int],
    method: str,
    steps: int,
) -> np.ndarray:
    """float32 [B, H, W] heat maps for normalised images x [B, C, H, W] on the model's device."""
    size = tuple(x.shape[2:])
    with _EvalMode(model), torch.inference_mode(False), torch.enable_grad():
        if method == "gradcam":
            members = members_of(model)
            cams = [
                LayerGradCam(m, _last_conv_block(m)).attribute(x, target=list(targets), relu_attributions=False)
                for m in members
            ]
            cam = F.relu(torch.stack([c.detach().float() for c in cams]).mean(0))
            maps = LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")[:, 0]
            maps = maps.clamp(min=0)  # bilinear weights keep it >= 0; guards rounding
        elif method == "ig":
            ig = IntegratedGradients(forward)
            attr = ig.attribute(
                x,
                baselines=torch.zeros_like(x),
                target=list(targets),
                n_steps=steps,
                internal_batch_size=max(len(x), _image_rows(x[0].numel())),
            )
            maps = attr.detach().float().sum(1)
        else:
            raise ValueError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
    peak = maps.abs().flatten(1).amax(1).clamp(min=torch.finfo(torch.float32).tiny).view(-1, 1, 1)
    return (maps / peak).cpu().numpy().astype(np.float32)


def _default_targets(head: Head, outputs: np.ndarray) -> list[int]:
    """The predicted class (classification), the most probable label (multilabel), else output 0."""
    if isinstance(head, (ClassificationHead, MultilabelHead)):
        return [int(i) for i in outputs.argmax(1)]
    return [0] * len(outputs)


def explain_images(
    predictor: Predictor,
    images: list[np.ndarray],
    *,
    method: str = "gradcam",
    steps: int = 32,
    target: int | None = None,
) -> list[dict[str, Any]]:
    """Heat maps for images, one dict per input: `{"heatmap": float32 [H, W] at the model's
    input size ([0, 1] for gradcam, signed [-1, 1] for ig), "target": output index,
    "output": output name, "method"}` or `{"error": reason}`. target: an output index; by
    default the predicted class (classification), the most probable label (multilabel) or
    output 0 (regression)."""
    from .predict import preprocess_image

    if predictor.input["kind"] != "image":
        raise ValueError(f"image explanations need an image model, not {predictor.input['kind']} input")
    if method not in IMAGE_METHODS:
        raise ValueError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
    head = predictor.head
    _check_target(target, head.num_outputs)
    results: list[dict[str, Any]] = [{} for _ in images]
    tensors, valid = [], []
    for i, img in enumerate(images):
        try:
            pixels = preprocess_image(img, predictor.input["channels"], predictor.input["size"])
        except (ValueError, TypeError) as e:
            results[i] = {"error": str(e)}
            continue
        tensors.append((pixels - predictor.mean) / predictor.std)
        valid.append(i)
    if not valid:
        return results
    model = predictor.model
    x = torch.stack(tensors).to(predictor.device)
    calibration = predictor.config.get("calibration")
    forward = user_output_fn(model, head, calibration)
    with _EvalMode(model), torch.no_grad():
        outputs = forward(x).double().cpu().numpy()
    targets = [target] * len(valid) if target is not None else _default_targets(head, outputs)
    maps = _image_heatmaps(model, forward, x, targets, method, steps)
    for j, i in enumerate(valid):
        results[i] = {
            "heatmap": maps[j],
            "target": targets[j],
            "output": predictor.output_names[targets[j]],
            "method": method,
        }
    return results


# --------------------------------------------------------------------------- faithfulness


def _summary(top: np.ndarray, random: np.ndarray, fraction: float) -> dict[str, Any]:
    t, r = float(top.mean()) if top.size else 0.0, float(random.mean()) if random.size else 0.0
    return {"top": t, "random": r, "ratio": t / r if r > 0 else None, "n": int(top.size), "fraction": fraction}


def _rows(head: Head, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input index, output index) pairs a faithfulness test scores: the predicted class for
    classification, every output otherwise."""
    n = len(outputs)
    if isinstance(head, ClassificationHead):
        return np.arange(n), outputs.argmax(1)
    k = outputs.shape[1]
    return np.repeat(np.arange(n), k), np.tile(np.arange(k), n)


def faithfulness_sequences(
    model: nn.Module,
    head: Head,
    tokenizer: Tokenizer,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    fraction: float = 0.2,
    seed: int = 0,
    steps: int = 32,
) -> dict[str, Any]:
    """Mean |Δ output| (user units) masking each input's top `fraction` of atom tokens by
    |IG weight| with padding, vs a random `fraction` of its atom tokens (5 seeded draws
    averaged). ids int64 [N, L] (0 = padding), lengths [N]; the model on its device."""
    device = next(model.parameters()).device
    forward = user_output_fn(model, head)
    is_atom = np.array([is_atom_token(t) for t in tokenizer._vocab().itos])
    ids_np, lengths_np = ids.numpy(), lengths.numpy()
    positions = np.arange(ids_np.shape[1])
    atom_mask = is_atom[ids_np] & (positions[None, :] < lengths_np[:, None])
    keep = np.flatnonzero(atom_mask.any(1))
    ids_np, lengths_np, atom_mask = ids_np[keep], lengths_np[keep], atom_mask[keep]
    if not len(keep):
        return _summary(np.zeros(0), np.zeros(0), fraction)
    ids_t, lengths_t = torch.from_numpy(ids_np), torch.from_numpy(lengths_np)
    base = _sequence_outputs(model, forward, ids_t, lengths_t, device)
    row_in, row_out = _rows(head, base)
    attr = _sequence_ig(model, forward, ids_t[row_in], lengths_t[row_in], row_out.tolist(), steps, device)

    rng = np.random.default_rng(seed)
    top_ids = ids_np[row_in].copy()
    random_ids = np.repeat(ids_np[row_in][None], _RANDOM_DRAWS, axis=0)
    for r, i in enumerate(row_in):
        atoms = np.flatnonzero(atom_mask[i])
        count = max(1, round(fraction * len(atoms)))
        top_ids[r, atoms[np.argsort(-np.abs(attr[r, atoms]), kind="stable")[:count]]] = PAD_ID
        for d in range(_RANDOM_DRAWS):
            random_ids[d, r, rng.choice(atoms, count, replace=False)] = PAD_ID
    rows_lengths = lengths_t[row_in]
    cols = np.arange(len(row_in))
    before = base[row_in, row_out]
    top = _sequence_outputs(model, forward, torch.from_numpy(top_ids), rows_lengths, device)[cols, row_out]
    draws = [
        _sequence_outputs(model, forward, torch.from_numpy(random_ids[d]), rows_lengths, device)[cols, row_out]
        for d in range(_RANDOM_DRAWS)
    ]
    random_change = np.mean([np.abs(d - before) for d in draws], axis=0)
    return _summary(np.abs(top - before), random_change, fraction)


def faithfulness_images(
    model: nn.Module, head: Head, images: torch.Tensor, *, fraction: float = 0.2, seed: int = 0
) -> dict[str, Any]:
    """Mean |Δ output| (user units) setting each image's top `fraction` of pixels by
    Grad-CAM to 0 (normalised space, i.e. the training mean) vs a random `fraction` (5
    seeded draws averaged). images: normalised float [N, C, H, W], processed in chunks."""
    device = next(model.parameters()).device
    forward = user_output_fn(model, head)
    n_pixels = images.shape[2] * images.shape[3]
    count = max(1, round(fraction * n_pixels))
    rng = np.random.default_rng(seed)
    chunk = _image_rows(images[0].numel())
    top_parts, random_parts = [], []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float().to(device)
        with _EvalMode(model), torch.no_grad():
            base = forward(x).double().cpu().numpy()
        row_in, row_out = _rows(head, base)
        rows = x[row_in]
        maps = _image_heatmaps(model, forward, rows, row_out.tolist(), "gradcam", 1)
        before = base[row_in, row_out]

        def change(
            pixels: np.ndarray, rows: torch.Tensor = rows, row_out: np.ndarray = row_out, before: np.ndarray = before
        ) -> np.ndarray:
            masked = rows.clone()
            flat = masked.view(len(masked), masked.shape[1], -1)
            index = torch.as_tensor(pixels, device=device)[:, None, :].expand(-1, flat.shape[1], -1)
            flat.scatter_(2, index, 0.0)
            with _EvalMode(model), torch.no_grad():
                after = forward(masked).double().cpu().numpy()
            return np.abs(after[np.arange(len(masked)), row_out] - before)

        top_parts.append(change(np.argsort(-maps.reshape(len(maps), -1), axis=1, kind="stable")[:, :count]))
        draws = [np.stack([rng.choice(n_pixels, count, replace=False) for _ in row_in]) for _ in range(_RANDOM_DRAWS)]
        random_parts.append(np.mean([change(d) for d in draws], axis=0))
    return _summary(np.concatenate(top_parts), np.concatenate(random_parts), fraction)


def faithfulness(
    model: nn.Module,
    data: PreparedData,
    device: torch.device | str | None = None,
    *,
    fraction: float = 0.2,
    seed: int = 0,
    max_items: int = 256,
    steps: int = 32,
) -> dict[str, Any] | None:
    """The faithfulness figure for a trained model on `data`'s test split (val when there is
    none; at most `max_items` inputs, seeded sample): `{"top", "random", "ratio", "n",
    "fraction", "split", "method"}`, or None for inputs that are not explained (tokens) or
    when there is no held-out split. The model must already be on `device` (default: where
    its parameters are); its train/eval mode is restored afterwards."""
    from .data import ImageDataset, SequenceDataset

    kind = data.input.get("kind")
    if kind not in EXPLAINABLE_INPUTS:
        return None
    split, dataset = next(((s, d) for s, d in (("test", data.test), ("val", data.val)) if d is not None), ("", None))
    if dataset is None or len(dataset) == 0:
        return None
    if device is not None and torch.device(device).type != next(model.parameters()).device.type:
        raise ValueError(f"model is on {next(model.parameters()).device}, not {device}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(dataset), min(max_items, len(dataset)), replace=False))
    if kind == "smiles":
        if not isinstance(dataset, SequenceDataset) or data.tokenizer is None:
            raise ValueError("SMILES data must come with a SequenceDataset and a tokenizer")
        lengths = dataset.lengths[pick]
        width = max(1, int(lengths.max()))
        ids = dataset.ids[pick, :width]
        result = faithfulness_sequences(
            model, data.head, data.tokenizer, ids, lengths, fraction=fraction, seed=seed, steps=steps
        )
        method = "integrated_gradients"
    else:
        if not isinstance(dataset, ImageDataset):
            raise ValueError("image data must come with an ImageDataset")
        (images,), _ = dataset.__getitems__(pick.tolist())
        result = faithfulness_images(model, data.head, images, fraction=fraction, seed=seed)
        method = "gradcam"
    return {**result, "split": split, "method": method}
