"""REST serving of a (compressed) model: ``create_app(lm, limits)`` and the ``embfactor serve`` command."""

from embfactor.server.app import create_app, generate_text, model_info, text_perplexities
from embfactor.server.schemas import Limits

__all__ = ["Limits", "create_app", "generate_text", "model_info", "text_perplexities"]
