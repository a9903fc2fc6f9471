"""Local mode: real daemon processes and a real trainer process on this machine, no cluster."""
