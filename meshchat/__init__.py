"""meshchat: a serverless chat that floods messages over UDP between peers."""

__version__ = "0.2.0"
