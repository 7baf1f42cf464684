"""Shared testers: every component kind is tested the same way (see ``testers.py``, ``ddp.py``)."""
