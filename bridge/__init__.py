"""Voice Agent Bridge: Twilio Media Streams <-> AssemblyAI Voice Agent API, on Trio."""

__version__ = "0.1.0"
