"""The Cattle wire protocol: the event envelope and the controller connection."""

from agent.protocol.client import ControllerClient, PublishError
from agent.protocol.events import (
    Event,
    FrameError,
    make_error_reply,
    make_progress_reply,
    make_reply,
    parse_frame,
)

__all__ = [
    "ControllerClient",
    "Event",
    "FrameError",
    "PublishError",
    "make_error_reply",
    "make_progress_reply",
    "make_reply",
    "parse_frame",
]
