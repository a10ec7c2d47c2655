"""/api/v1/models/{name}/versions/{v}/card: a model version's card as JSON or Markdown, and
editing its written parts (app/cards.py renders it)."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask.typing import ResponseReturnValue
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app import cards
from app.api import db_session, requires, tenant_id
from app.models import KeyRole
from app.stores import tags as tags_store

blp = Blueprint("cards", __name__, url_prefix="/api/v1/models", description="Model cards")

TEXT = validate.Length(max=cards.MAX_TEXT)


class CardEditSchema(Schema):
    intended_use = fields.String(allow_none=True, validate=TEXT, metadata={"description": "what the model is for"})
    out_of_scope = fields.String(allow_none=True, validate=TEXT, metadata={"description": "uses it is not for"})
    limitations = fields.String(allow_none=True, validate=TEXT, metadata={"description": "known limitations"})


class CardSchema(Schema):
    model = fields.String()
    version = fields.Integer()
    arch = fields.String()
    task = fields.String()
    input_kind = fields.String()
    tags = fields.List(fields.String())
    intended_use = fields.String(allow_none=True)
    out_of_scope = fields.String(allow_none=True)
    limitations = fields.String(allow_none=True)
    training_data = fields.Dict(
        metadata={"description": "dataset id, name, sha256, rows, target, split (method, fractions, seed)"}
    )
    training = fields.Dict(metadata={"description": "epochs, batch size, learning rate, architecture parameters"})
    metrics = fields.Dict(metadata={"description": "metrics per split (val, test)"})
    best_epoch = fields.Integer(allow_none=True)
    applicability_domain = fields.Dict(allow_none=True)
    calibration = fields.Dict(allow_none=True)
    uncertainty = fields.Dict(allow_none=True)
    trained_by = fields.Dict(metadata={"description": "tenant and the API key that submitted the training job"})
    trained_at = fields.String(allow_none=True)
    training_job_id = fields.Integer(allow_none=True)
    software = fields.Dict(allow_none=True, metadata={"description": "versions recorded at training time"})
    edited_at = fields.String(allow_none=True)


def card_of(name: str, version: int) -> dict[str, Any]:
    return cards.build(db_session(), tags_store.model_version(db_session(), tenant_id(), name, version))


@blp.route("/<string:name>/versions/<id:version>/card", methods=["GET"])
@blp.response(200, CardSchema)
@requires(KeyRole.viewer)
def card(name: str, version: int) -> dict[str, Any]:
    """The version's model card as JSON."""
    return card_of(name, version)


@blp.route("/<string:name>/versions/<id:version>/card.json", methods=["GET"])
@blp.doc(
    responses={
        200: {
            "description": "the card as a JSON file (attachment)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
)
@requires(KeyRole.viewer)
def card_json(name: str, version: int) -> ResponseReturnValue:
    """The card as a downloadable JSON file, to keep with the weights."""
    response = jsonify(CardSchema().dump(card_of(name, version)))
    response.headers["Content-Disposition"] = f'attachment; filename="{name}-v{version}-card.json"'
    return response


@blp.route("/<string:name>/versions/<id:version>/card.md", methods=["GET"])
@blp.doc(
    responses={
        200: {"description": "the card as Markdown", "content": {"text/markdown": {"schema": {"type": "string"}}}}
    }
)
@requires(KeyRole.viewer)
def card_markdown(name: str, version: int) -> ResponseReturnValue:
    """The card as a Markdown document (attachment), to keep with the weights."""
    return Response(
        cards.markdown(card_of(name, version)),
        mimetype="text/markdown",
        headers={"Content-Disposition": f'attachment; filename="{name}-v{version}-card.md"'},
    )


@blp.route("/<string:name>/versions/<id:version>/card", methods=["PATCH"])
@blp.arguments(CardEditSchema, required=False)  # no body: nothing to change
@blp.response(200, CardSchema)
@requires(KeyRole.member)
def edit_card(body: dict[str, Any], name: str, version: int) -> dict[str, Any]:
    """Write or change the card's intended use, out-of-scope use and limitations (null or ""
    clears one; `{}` changes nothing); the rest of the card is the registry's."""
    session = db_session()
    mv = tags_store.model_version(session, tenant_id(), name, version, lock=True)
    if body:  # an empty edit changes nothing
        cards.edit(session, mv, body)
    return cards.build(session, mv)
