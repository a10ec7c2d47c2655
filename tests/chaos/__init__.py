"""The chaos suite: faults injected into a real deployment, judged by an exactly-once oracle."""
