"""The web layer: the application object (``app``), Twilio's webhooks (``webhooks``)."""

from bridge.web.app import BridgeApp, Collaborators, create_app, default_collaborators

__all__ = ["BridgeApp", "Collaborators", "create_app", "default_collaborators"]
