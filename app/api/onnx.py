"""/api/v1/models/{name}/versions/{v}/onnx: a version's ONNX export (app/stores/onnx.py).

The file is the model as an ONNX graph (opset pinned, fp32, batch and sequence length
dynamic) that ONNX Runtime agreed with PyTorch on within 1e-4 when it was exported; the
version's `metrics.onnx` records the opset, that difference and the graph's inputs and
outputs (workers/ml/onnx_export.py documents them)."""

from __future__ import annotations

from flask.typing import ResponseReturnValue
from flask_smorest import Blueprint

from app.api import db_session, requires, settings, tenant_id
from app.artifacts import send_artifact
from app.models import KeyRole
from app.stores import onnx as onnx_store

blp = Blueprint("onnx", __name__, url_prefix="/api/v1/models", description="Model registry and predictions")

GRAPH_DOC = (
    "The version as ONNX (opset 17, float32). Sequence models take `ids` int64 [batch, length] (token ids, "
    "0 = padding, rows right-padded) and `lengths` int64 [batch]; the vocabulary and token regex are in the "
    "model metadata `medmaas.tokenizer`. Image models take `images` float32 [batch, C, H, W], normalised as "
    "metadata `medmaas.normalization` says. Outputs: `raw` [members, batch, K] (raw outputs) and `values` "
    "[batch, K] (probabilities or values in the targets' units, columns `medmaas.output_names`)."
)


@blp.route("/<string:name>/versions/<id:version>/onnx", methods=["GET"])
@blp.doc(
    summary="Download a version's ONNX export",
    responses={
        200: {
            "description": GRAPH_DOC,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
@requires(KeyRole.viewer)
def version_onnx(name: str, version: int) -> ResponseReturnValue:
    """Download the version's model.onnx. 404 `onnx_not_exported` says why a version has none
    (registered before exports, or its export failed the 1e-4 check)."""
    onnx = onnx_store.onnx_file(db_session(), settings(), tenant_id(), name, version)
    return send_artifact(
        onnx.path, settings(), as_attachment=True, download_name=onnx.download_name, mimetype="application/octet-stream"
    )
