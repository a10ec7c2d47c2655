"""MedMaaS Python client: `from medmaas.client import Client`.

This package talks HTTP to a MedMaaS server and depends on `requests` only; it never
imports the server (Flask), the workers or torch.
"""

from medmaas.client import TERMINAL_STATES, Client, MedmaasError

__all__ = ["TERMINAL_STATES", "Client", "MedmaasError"]
__version__ = "0.1.0"
